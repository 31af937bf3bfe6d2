//! Structural checks of chunks Quarry copies but does not decode: for the image codecs that
//! replay buffers use (imagecodecs' `Jpeg2k` and `Qoi`), a chunk must be a whole image (its
//! end marker present, every JP2 box inside the file) holding as many samples as the chunk
//! has elements. A truncated or foreign chunk fails the round at inspection instead of
//! reaching a final that zarr cannot read.

/// An image codec whose chunks are checked by their structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signature {
    /// `imagecodecs_jpeg2k`: a JP2 file or a raw J2K codestream.
    Jpeg2k,
    /// `imagecodecs_qoi`: a QOI image.
    Qoi,
}

const JP2_SIGNATURE: [u8; 12] = [0, 0, 0, 12, b'j', b'P', b' ', b' ', 0x0d, 0x0a, 0x87, 0x0a];
const QOI_END: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 1];

fn be32(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as u64)
}

fn be16(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]) as u64)
}

impl Signature {
    /// The check for a numcodecs compressor id, if Quarry has one.
    pub fn from_id(id: &str) -> Option<Signature> {
        match id {
            "imagecodecs_jpeg2k" => Some(Signature::Jpeg2k),
            "imagecodecs_qoi" => Some(Signature::Qoi),
            _ => None,
        }
    }

    /// Checks that `raw` is a whole image of `elements` samples; `Err` says what is wrong.
    pub fn check(self, raw: &[u8], elements: u64) -> Result<(), String> {
        let samples = match self {
            Signature::Jpeg2k => jpeg2k_samples(raw)?,
            Signature::Qoi => qoi_samples(raw)?,
        };
        if samples != elements {
            return Err(format!(
                "the image holds {samples} samples, but a chunk holds {elements} elements"
            ));
        }
        Ok(())
    }
}

/// Samples (width × height × components) of a JP2 file or J2K codestream.
fn jpeg2k_samples(raw: &[u8]) -> Result<u64, String> {
    let codestream = if raw.starts_with(&JP2_SIGNATURE) {
        jp2_codestream(raw)?
    } else {
        raw
    };
    if !codestream.starts_with(&[0xff, 0x4f, 0xff, 0x51]) {
        return Err("not a JPEG 2000 image: no codestream start (SOC, SIZ markers)".into());
    }
    if !codestream.ends_with(&[0xff, 0xd9]) {
        return Err("JPEG 2000 codestream without its end marker (EOC): truncated".into());
    }
    let short = || "JPEG 2000 SIZ marker cut short".to_string();
    let (x, y) = (
        be32(codestream, 8).ok_or_else(short)?,
        be32(codestream, 12).ok_or_else(short)?,
    );
    let (x0, y0) = (
        be32(codestream, 16).ok_or_else(short)?,
        be32(codestream, 20).ok_or_else(short)?,
    );
    let c = be16(codestream, 40).ok_or_else(short)?;
    if x0 > x || y0 > y {
        return Err("JPEG 2000 image offset past its size".into());
    }
    Ok((x - x0).saturating_mul(y - y0).saturating_mul(c))
}

/// The `jp2c` box's contents of a JP2 file whose boxes all lie inside it.
fn jp2_codestream(raw: &[u8]) -> Result<&[u8], String> {
    let mut at = 0usize;
    let mut found = None;
    while at < raw.len() {
        let len = be32(raw, at).ok_or("JP2 box header cut short: truncated")?;
        let kind = raw
            .get(at + 4..at + 8)
            .ok_or("JP2 box header cut short: truncated")?;
        let (header, len) = match len {
            0 => (8, (raw.len() - at) as u64),
            1 => {
                let hi = be32(raw, at + 8).ok_or("JP2 box header cut short: truncated")?;
                let lo = be32(raw, at + 12).ok_or("JP2 box header cut short: truncated")?;
                (16, (hi << 32) | lo)
            }
            n => (8, n),
        };
        let end = u64::try_from(at)
            .ok()
            .and_then(|a| a.checked_add(len))
            .filter(|&e| len >= header && e <= raw.len() as u64)
            .ok_or_else(|| {
                format!(
                    "JP2 box {:?} of {len} bytes runs past the chunk's {} bytes: truncated",
                    String::from_utf8_lossy(kind),
                    raw.len()
                )
            })? as usize;
        if kind == b"jp2c" {
            found = Some(&raw[at + header as usize..end]);
        }
        at = end;
    }
    found.ok_or_else(|| "JP2 file without a codestream box (jp2c)".into())
}

/// Samples (width × height × channels) of a QOI image with its end marker.
fn qoi_samples(raw: &[u8]) -> Result<u64, String> {
    if !raw.starts_with(b"qoif") || raw.len() < 14 + QOI_END.len() {
        return Err("not a QOI image: no qoif header".into());
    }
    if !raw.ends_with(&QOI_END) {
        return Err("QOI image without its end marker: truncated".into());
    }
    let (w, h) = (be32(raw, 4).unwrap_or(0), be32(raw, 8).unwrap_or(0));
    Ok(w.saturating_mul(h).saturating_mul(raw[12] as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A J2K codestream of a `w`×`h` image of `c` components: SOC, SIZ, a body, EOC.
    fn j2k(w: u32, h: u32, c: u16) -> Vec<u8> {
        let mut b = vec![0xff, 0x4f, 0xff, 0x51, 0, 41, 0, 0];
        b.extend(w.to_be_bytes());
        b.extend(h.to_be_bytes());
        b.extend([0u8; 24]);
        b.extend(c.to_be_bytes());
        b.extend([7, 1, 1].repeat(c as usize));
        b.extend([1, 2, 3, 0xff, 0xd9]);
        b
    }

    fn jp2(codestream: &[u8]) -> Vec<u8> {
        let mut b = JP2_SIGNATURE.to_vec();
        b.extend(20u32.to_be_bytes());
        b.extend(b"ftypjp2 \0\0\0\0jp2 ");
        b.extend((codestream.len() as u32 + 8).to_be_bytes());
        b.extend(b"jp2c");
        b.extend(codestream);
        b
    }

    #[test]
    fn whole_images_pass_and_cut_ones_fail() {
        let cs = j2k(16, 8, 3);
        assert_eq!(Signature::Jpeg2k.check(&cs, 384), Ok(()));
        let file = jp2(&cs);
        assert_eq!(Signature::Jpeg2k.check(&file, 384), Ok(()));
        let cut = Signature::Jpeg2k
            .check(&file[..file.len() - 3], 384)
            .unwrap_err();
        assert!(cut.contains("truncated"), "{cut}");
        let wrong = Signature::Jpeg2k.check(&file, 385).unwrap_err();
        assert!(wrong.contains("384 samples"), "{wrong}");
        assert!(Signature::Jpeg2k.check(b"garbage", 1).is_err());

        let mut qoi = b"qoif".to_vec();
        qoi.extend(4u32.to_be_bytes());
        qoi.extend(2u32.to_be_bytes());
        qoi.extend([3, 0, 0xfe, 1, 2, 3]);
        qoi.extend(QOI_END);
        assert_eq!(Signature::Qoi.check(&qoi, 24), Ok(()));
        assert!(Signature::Qoi.check(&qoi[..qoi.len() - 1], 24).is_err());
    }
}
