//! Blosc 1 chunks (what numcodecs' `Blosc` and zarr v3's `blosc` codec write): a 16-byte
//! header, a table of block starts, then blocks, each byte- or bit-shuffled and compressed by
//! an inner codec. Decoding understands every layout c-blosc 1.x writes with the LZ4
//! (LZ4HC), Zlib and Zstd inner codecs; encoding writes unsplit blocks (flag 0x10), which
//! every c-blosc since 1.11 reads.

use std::io::{Read, Write};

const HEADER: usize = 16;
const FLAG_SHUFFLE: u8 = 0x01;
const FLAG_MEMCPYED: u8 = 0x02;
const FLAG_BITSHUFFLE: u8 = 0x04;
const FLAG_DONT_SPLIT: u8 = 0x10;
/// c-blosc 1.x's limits for splitting a block into one stream per byte of the type.
const MAX_SPLITS: usize = 16;
const MIN_BUFFERSIZE: usize = 128;
/// Blosc 1 buffers are at most this long.
const MAX_BUFFERSIZE: usize = i32::MAX as usize - HEADER;

/// An inner codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cname {
    Lz4,
    Zlib,
    Zstd,
}

impl Cname {
    /// The codec named as numcodecs names it; `lz4hc` is written as plain LZ4 (same format).
    pub fn parse(name: &str) -> Option<Cname> {
        match name {
            "lz4" | "lz4hc" => Some(Cname::Lz4),
            "zlib" => Some(Cname::Zlib),
            "zstd" => Some(Cname::Zstd),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            Cname::Lz4 => 1,
            Cname::Zlib => 3,
            Cname::Zstd => 4,
        }
    }
}

/// How elements are rearranged before compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shuffle {
    None,
    Byte,
    Bit,
}

/// What an encoder writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Params {
    pub cname: Cname,
    pub clevel: u8,
    pub shuffle: Shuffle,
    pub typesize: usize,
    /// 0: chosen here.
    pub blocksize: usize,
}

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// Decodes one blosc buffer, refusing one that would decode to more than `max_len` bytes.
pub(crate) fn decode(src: &[u8], max_len: usize) -> Result<Vec<u8>, String> {
    if src.len() < HEADER {
        return Err(format!(
            "blosc buffer of {} bytes is shorter than its header",
            src.len()
        ));
    }
    let (version, flags, typesize) = (src[0], src[2], (src[3] as usize).max(1));
    if !(1..=2).contains(&version) {
        return Err(format!(
            "blosc format version {version} (only Blosc 1's versions 1 and 2 are read)"
        ));
    }
    let nbytes = u32_at(src, 4);
    let blocksize = u32_at(src, 8);
    let cbytes = u32_at(src, 12);
    if nbytes > max_len {
        return Err(format!(
            "blosc header says {nbytes} bytes, more than the {max_len} expected"
        ));
    }
    if cbytes > src.len() {
        return Err(format!(
            "blosc buffer is truncated: header says {cbytes} bytes, {} present",
            src.len()
        ));
    }
    if flags & FLAG_MEMCPYED != 0 {
        let body = src
            .get(HEADER..HEADER + nbytes)
            .ok_or("blosc buffer is shorter than its uncompressed payload")?;
        return Ok(body.to_vec());
    }
    if nbytes == 0 {
        return Ok(Vec::new());
    }
    if blocksize == 0 {
        return Err("blosc header has a zero block size".into());
    }
    let compformat = flags >> 5;
    let nblocks = nbytes.div_ceil(blocksize);
    let leftover = nbytes % blocksize;
    let starts_end = HEADER + 4 * nblocks;
    if starts_end > cbytes {
        return Err("blosc block table runs past the buffer".into());
    }
    let src = &src[..cbytes];
    let mut out = vec![0u8; nbytes];
    let mut tmp = Vec::new();
    for j in 0..nblocks {
        let is_leftover = j == nblocks - 1 && leftover > 0;
        let bsize = if is_leftover { leftover } else { blocksize };
        let start = u32_at(src, HEADER + 4 * j);
        if start < starts_end || start > src.len() {
            return Err(format!("blosc block {j} starts outside the buffer"));
        }
        let dont_split = flags & FLAG_DONT_SPLIT != 0;
        let nsplits = if !dont_split
            && typesize <= MAX_SPLITS
            && blocksize / typesize >= MIN_BUFFERSIZE
            && !is_leftover
        {
            typesize
        } else {
            1
        };
        let neblock = bsize / nsplits;
        tmp.clear();
        tmp.resize(bsize, 0);
        let mut at = start;
        for s in 0..nsplits {
            let cb = src
                .get(at..at + 4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| format!("blosc block {j} is truncated"))?;
            at += 4;
            let cb = usize::try_from(cb).map_err(|_| format!("blosc block {j}: bad size"))?;
            let stream = src
                .get(at..at + cb)
                .ok_or_else(|| format!("blosc block {j} is truncated"))?;
            at += cb;
            let dst = &mut tmp[s * neblock..(s + 1) * neblock];
            if cb == neblock {
                dst.copy_from_slice(stream);
            } else {
                inner_decode(compformat, stream, dst).map_err(|e| format!("blosc block {j}: {e}"))?;
            }
        }
        let dst = &mut out[j * blocksize..j * blocksize + bsize];
        if flags & FLAG_SHUFFLE != 0 && typesize > 1 {
            unshuffle(typesize, &tmp, dst);
        } else if flags & FLAG_BITSHUFFLE != 0 && bsize >= typesize {
            bitunshuffle(typesize, &tmp, dst);
        } else {
            dst.copy_from_slice(&tmp);
        }
    }
    Ok(out)
}

fn inner_decode(compformat: u8, src: &[u8], dst: &mut [u8]) -> Result<(), String> {
    let n = match compformat {
        1 => lz4_flex::block::decompress_into(src, dst).map_err(|e| format!("lz4: {e}"))?,
        3 => {
            let mut d = flate2::read::ZlibDecoder::new(src);
            read_full(&mut d, dst).map_err(|e| format!("zlib: {e}"))?
        }
        4 => ruzstd::decoding::FrameDecoder::new()
            .decode_all(src, dst)
            .map_err(|e| format!("zstd: {e}"))?,
        0 => return Err("inner codec blosclz is not supported (use lz4, zstd or zlib)".into()),
        2 => return Err("inner codec snappy is not supported (use lz4, zstd or zlib)".into()),
        c => return Err(format!("unknown inner codec {c}")),
    };
    if n != dst.len() {
        return Err(format!("decoded {n} bytes, expected {}", dst.len()));
    }
    Ok(())
}

/// Reads until `dst` is full or the stream ends; errors if the stream holds more.
fn read_full(r: &mut impl Read, dst: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < dst.len() {
        match r.read(&mut dst[got..])? {
            0 => break,
            n => got += n,
        }
    }
    let mut probe = [0u8; 1];
    if got == dst.len() && r.read(&mut probe)? > 0 {
        return Err(std::io::Error::other("stream is longer than expected"));
    }
    Ok(got)
}

/// Encodes `data` as one blosc buffer.
pub(crate) fn encode(data: &[u8], p: &Params) -> Result<Vec<u8>, String> {
    if data.len() > MAX_BUFFERSIZE {
        return Err(format!(
            "a blosc chunk holds at most {MAX_BUFFERSIZE} bytes, this one has {}",
            data.len()
        ));
    }
    let typesize = p.typesize.clamp(1, 255);
    let nbytes = data.len();
    let blocksize = if p.blocksize > 0 {
        p.blocksize.max(MIN_BUFFERSIZE).min(nbytes.max(1))
    } else if nbytes >= 32 << 10 {
        // c-blosc's choice for clevel 5: 32 KiB, doubled for the heavier codecs.
        match p.cname {
            Cname::Lz4 => 32 << 10,
            _ => 64 << 10,
        }
    } else {
        nbytes.max(1)
    };
    let blocksize = if blocksize > typesize {
        blocksize / typesize * typesize
    } else {
        blocksize
    };
    let mut flags = FLAG_DONT_SPLIT | (p.cname.code() << 5);
    match p.shuffle {
        Shuffle::Byte => flags |= FLAG_SHUFFLE,
        Shuffle::Bit => flags |= FLAG_BITSHUFFLE,
        Shuffle::None => {}
    }
    let header = |flags: u8, cbytes: usize| {
        let mut h = Vec::with_capacity(HEADER);
        h.extend_from_slice(&[2, 1, flags, typesize as u8]);
        h.extend_from_slice(&(nbytes as u32).to_le_bytes());
        h.extend_from_slice(&(blocksize as u32).to_le_bytes());
        h.extend_from_slice(&(cbytes as u32).to_le_bytes());
        h
    };
    let memcpyed = || {
        let mut out = header(flags | FLAG_MEMCPYED, HEADER + nbytes);
        out.extend_from_slice(data);
        out
    };
    if p.clevel == 0 || nbytes == 0 {
        return Ok(memcpyed());
    }
    let nblocks = nbytes.div_ceil(blocksize);
    let mut body = Vec::new();
    let mut starts = Vec::with_capacity(nblocks);
    let mut shuffled = vec![0u8; blocksize];
    let table = HEADER + 4 * nblocks;
    for j in 0..nblocks {
        let block = &data[j * blocksize..((j + 1) * blocksize).min(nbytes)];
        let tmp = &mut shuffled[..block.len()];
        match p.shuffle {
            Shuffle::Byte if typesize > 1 => shuffle(typesize, block, tmp),
            Shuffle::Bit if block.len() >= typesize => bitshuffle(typesize, block, tmp),
            _ => tmp.copy_from_slice(block),
        }
        starts.push(table + body.len());
        let c = inner_encode(p.cname, p.clevel, tmp)?;
        if c.is_empty() || c.len() >= tmp.len() {
            body.extend_from_slice(&(tmp.len() as i32).to_le_bytes());
            body.extend_from_slice(tmp);
        } else {
            body.extend_from_slice(&(c.len() as i32).to_le_bytes());
            body.extend_from_slice(&c);
        }
        if table + body.len() >= HEADER + nbytes {
            return Ok(memcpyed());
        }
    }
    let mut out = header(flags, table + body.len());
    for s in starts {
        out.extend_from_slice(&(s as u32).to_le_bytes());
    }
    out.extend_from_slice(&body);
    Ok(out)
}

fn inner_encode(cname: Cname, clevel: u8, src: &[u8]) -> Result<Vec<u8>, String> {
    Ok(match cname {
        Cname::Lz4 => lz4_flex::block::compress(src),
        Cname::Zlib => {
            let level = flate2::Compression::new(u32::from(clevel.min(9)));
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), level);
            e.write_all(src).map_err(|e| format!("zlib: {e}"))?;
            e.finish().map_err(|e| format!("zlib: {e}"))?
        }
        Cname::Zstd => super::codec::zstd_compress(src),
    })
}

/// c-blosc's byte shuffle of one block: byte `j` of every element, then byte `j + 1`...; a
/// tail shorter than an element stays in place.
fn shuffle(ts: usize, src: &[u8], dst: &mut [u8]) {
    let n = src.len() / ts;
    for (i, e) in src.chunks_exact(ts).enumerate() {
        for (j, &b) in e.iter().enumerate() {
            dst[j * n + i] = b;
        }
    }
    dst[n * ts..].copy_from_slice(&src[n * ts..]);
}

fn unshuffle(ts: usize, src: &[u8], dst: &mut [u8]) {
    let n = src.len() / ts;
    for (i, e) in dst.chunks_exact_mut(ts).enumerate() {
        for (j, b) in e.iter_mut().enumerate() {
            *b = src[j * n + i];
        }
    }
    dst[n * ts..].copy_from_slice(&src[n * ts..]);
}

/// c-blosc 1.x's bit shuffle of one block: for each byte `q` of the element and bit `k`, a
/// row of one bit per element (element `i` at bit `i % 8` of byte `i / 8`). Only done when
/// the block holds a multiple of 8 elements; otherwise the block is left as it is.
fn bitshuffle(ts: usize, src: &[u8], dst: &mut [u8]) {
    let n = src.len() / ts;
    if n % 8 != 0 {
        dst.copy_from_slice(src);
        return;
    }
    let row = n / 8;
    dst[n * ts..].copy_from_slice(&src[n * ts..]);
    for q in 0..ts {
        for k in 0..8 {
            let out = &mut dst[(q * 8 + k) * row..(q * 8 + k + 1) * row];
            for (r, o) in out.iter_mut().enumerate() {
                let mut byte = 0u8;
                for m in 0..8 {
                    byte |= ((src[(8 * r + m) * ts + q] >> k) & 1) << m;
                }
                *o = byte;
            }
        }
    }
}

fn bitunshuffle(ts: usize, src: &[u8], dst: &mut [u8]) {
    let n = src.len() / ts;
    if n % 8 != 0 {
        dst.copy_from_slice(src);
        return;
    }
    let row = n / 8;
    dst[n * ts..].copy_from_slice(&src[n * ts..]);
    dst[..n * ts].fill(0);
    for q in 0..ts {
        for k in 0..8 {
            let bits = &src[(q * 8 + k) * row..(q * 8 + k + 1) * row];
            for (r, &byte) in bits.iter().enumerate() {
                for m in 0..8 {
                    dst[(8 * r + m) * ts + q] |= ((byte >> m) & 1) << k;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_layout() {
        let data: Vec<u8> = (0..100_003u32).flat_map(|i| (i / 3).to_le_bytes()).collect();
        for cname in [Cname::Lz4, Cname::Zlib, Cname::Zstd] {
            for shuffle in [Shuffle::None, Shuffle::Byte, Shuffle::Bit] {
                for len in [0, 5, 4000, data.len()] {
                    let p = Params {
                        cname,
                        clevel: 5,
                        shuffle,
                        typesize: 4,
                        blocksize: 0,
                    };
                    let enc = encode(&data[..len], &p).expect("encode");
                    let dec = decode(&enc, len).expect("decode");
                    assert!(dec == data[..len], "{cname:?} {shuffle:?} {len}");
                }
            }
        }
    }

    #[test]
    fn refuses_damage() {
        let data = vec![7u8; 10_000];
        let p = Params {
            cname: Cname::Lz4,
            clevel: 5,
            shuffle: Shuffle::Byte,
            typesize: 8,
            blocksize: 0,
        };
        let enc = encode(&data, &p).expect("encode");
        assert!(decode(&enc[..enc.len() - 3], 10_000).is_err());
        assert!(decode(&enc, 100).is_err());
        assert!(decode(b"short", 100).is_err());
    }
}
