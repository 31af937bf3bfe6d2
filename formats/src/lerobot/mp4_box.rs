//! MP4 boxes as the merge reads them: box headers walked with every size checked against
//! the bytes holding it, the `moov` of a one-track file and its sample tables read into
//! memory, the edit list, the kept prefix of samples and where their bytes lie. Shared by
//! [`mp4_trim`](super::mp4_trim) (a file's trailing samples cut) and
//! [`mp4_concat`](super::mp4_concat) (files appended into one).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::DatasetError;

/// Largest `moov` read into memory.
pub(super) const MAX_MOOV: u64 = 64 << 20;
/// Most top-level boxes walked.
pub(super) const MAX_TOP_BOXES: usize = 4096;
/// Most samples a trimmed track may hold (its tables are held in memory: 16 bytes a
/// sample); a longer track is copied whole.
pub(super) const MAX_SAMPLES: u64 = 1 << 22;
/// Deepest box nesting followed inside `moov`.
pub(super) const MAX_DEPTH: usize = 8;

/// Ends the reason a file without exactly one video track (or, when edited, of several tracks)
/// is not read.
pub(super) const NOT_ONE_TRACK: &str = ", not one video track";

/// One box: type, where it starts, its header's length and its whole size.
#[derive(Debug, Clone, Copy)]
pub(super) struct BoxAt {
    pub(super) typ: [u8; 4],
    pub(super) start: u64,
    pub(super) header: u64,
    pub(super) size: u64,
}

impl BoxAt {
    pub(super) fn end(&self) -> u64 {
        self.start + self.size
    }
    pub(super) fn name(&self) -> String {
        String::from_utf8_lossy(&self.typ).into_owned()
    }
}

/// Reads one box header from `head` (at least 8 bytes, 16 for a 64-bit size) for a box at
/// `start` inside a region ending at `limit`.
pub(super) fn header(head: &[u8], start: u64, limit: u64, at: &str) -> Result<BoxAt, DatasetError> {
    let bad = |r: String| DatasetError::invalid(at, r);
    let b4 = |i: usize| -> Option<[u8; 4]> { head.get(i..i + 4)?.try_into().ok() };
    let (Some(size), Some(typ)) = (b4(0), b4(4)) else {
        return Err(bad(format!("a box header at byte {start} is cut short")));
    };
    let mut size = u64::from(u32::from_be_bytes(size));
    let mut hdr = 8;
    if size == 1 {
        let Some(big) = head.get(8..16).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
            return Err(bad(format!("a box header at byte {start} is cut short")));
        };
        size = u64::from_be_bytes(big);
        hdr = 16;
    } else if size == 0 {
        size = limit.saturating_sub(start);
    }
    let name = String::from_utf8_lossy(&typ).into_owned();
    if size < hdr {
        return Err(bad(format!(
            "box {name:?} at byte {start} claims {size} bytes, less than its header"
        )));
    }
    if start.checked_add(size).is_none_or(|e| e > limit) {
        return Err(bad(format!(
            "box {name:?} at byte {start} claims {size} bytes but only {} remain where it lies (the file is truncated or the size lies)",
            limit.saturating_sub(start)
        )));
    }
    Ok(BoxAt {
        typ,
        start,
        header: hdr,
        size,
    })
}

/// The boxes inside `buf[from..to]` (offsets relative to `buf`).
pub(super) fn children(
    buf: &[u8],
    from: u64,
    to: u64,
    at: &str,
) -> Result<Vec<BoxAt>, DatasetError> {
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        if to - pos < 8 {
            return Err(DatasetError::invalid(
                at,
                format!("{} stray bytes at byte {pos} inside a box", to - pos),
            ));
        }
        let head = &buf[pos as usize..(pos + 16).min(to) as usize];
        let b = header(head, pos, to, at)?;
        if b.size == 0 || head[..4] == [0, 0, 0, 0] {
            return Err(DatasetError::invalid(
                at,
                format!("box at byte {pos} inside moov has size 0"),
            ));
        }
        out.push(b);
        pos = b.end();
    }
    Ok(out)
}

/// A full box's payload after version and flags, checked to hold `fixed` bytes.
pub(super) struct Full<'a> {
    pub(super) version: u8,
    pub(super) body: &'a [u8],
}

pub(super) fn full<'a>(
    buf: &'a [u8],
    b: &BoxAt,
    fixed: usize,
    at: &str,
) -> Result<Full<'a>, DatasetError> {
    let p = &buf[(b.start + b.header) as usize..b.end() as usize];
    if p.len() < 4 + fixed {
        return Err(DatasetError::invalid(
            at,
            format!(
                "box {} at byte {} holds {} bytes, too few for its fields",
                b.name(),
                b.start,
                p.len()
            ),
        ));
    }
    Ok(Full {
        version: p[0],
        body: &p[4..],
    })
}

/// The timescale of an `mdhd` or `mvhd` box (after the creation and modification times, 4 or
/// 8 bytes each by version), checked non-zero and followed by a whole duration field.
pub(super) fn timescale_of(buf: &[u8], b: &BoxAt, at: &str) -> Result<u32, DatasetError> {
    let f = full(buf, b, 20, at)?;
    let (ts_at, dur_w) = if f.version == 1 { (16, 8) } else { (8, 4) };
    let timescale = u32_at(f.body, ts_at);
    if timescale == 0 || f.body.len() < ts_at + 4 + dur_w {
        return Err(DatasetError::invalid(
            at,
            format!("{}'s timescale is 0 or the box is cut short", b.name()),
        ));
    }
    Ok(timescale)
}

pub(super) fn u32_at(b: &[u8], i: usize) -> u32 {
    b.get(i..i + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_be_bytes)
}

pub(super) fn u64_at(b: &[u8], i: usize) -> u64 {
    b.get(i..i + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_be_bytes)
}

/// A table box: `count` entries of `width` bytes after a 4-byte count (and `pre` bytes
/// before it), each checked to lie inside the box.
pub(super) fn table<'a>(
    buf: &'a [u8],
    b: &BoxAt,
    pre: usize,
    width: usize,
    at: &str,
) -> Result<(Full<'a>, u32, &'a [u8]), DatasetError> {
    let f = full(buf, b, pre + 4, at)?;
    let count = u32_at(f.body, pre);
    let need = (count as u64).checked_mul(width as u64);
    let room = (f.body.len() - pre - 4) as u64;
    if need.is_none_or(|n| n > room) {
        return Err(DatasetError::invalid(
            at,
            format!(
                "box {} at byte {} claims {count} entries of {width} bytes but holds room for {}",
                b.name(),
                b.start,
                room / width as u64
            ),
        ));
    }
    let entries = &f.body[pre + 4..pre + 4 + count as usize * width];
    Ok((f, count, entries))
}

/// Where the boxes a trim edits lie in `moov` (offsets into the moov buffer).
pub(super) struct Track {
    pub(super) mvhd: BoxAt,
    pub(super) tkhd: BoxAt,
    pub(super) mdhd: BoxAt,
    pub(super) hdlr: Option<BoxAt>,
    pub(super) elst: Option<BoxAt>,
    pub(super) stbl: BoxAt,
}

pub(super) fn find(list: &[BoxAt], t: &[u8; 4]) -> Vec<BoxAt> {
    list.iter().filter(|b| &b.typ == t).copied().collect()
}

pub(super) fn one(
    list: &[BoxAt],
    t: &[u8; 4],
    inside: &str,
    at: &str,
) -> Result<BoxAt, DatasetError> {
    match find(list, t).as_slice() {
        [b] => Ok(*b),
        v => Err(DatasetError::invalid(
            at,
            format!(
                "{inside} holds {} {} boxes, not one",
                v.len(),
                String::from_utf8_lossy(t)
            ),
        )),
    }
}

pub(super) fn inner(buf: &[u8], b: &BoxAt, at: &str) -> Result<Vec<BoxAt>, DatasetError> {
    children(buf, b.start + b.header, b.end(), at)
}

/// The handler type (`vide`, `soun`...) of a `trak`'s media, when it has one.
fn handler_of(moov: &[u8], trak: &BoxAt, at: &str) -> Result<Option<[u8; 4]>, DatasetError> {
    let trak = inner(moov, trak, at)?;
    let Some(mdia) = find(&trak, b"mdia").first().copied() else {
        return Ok(None);
    };
    let Some(hdlr) = find(&inner(moov, &mdia, at)?, b"hdlr").first().copied() else {
        return Ok(None);
    };
    let f = full(moov, &hdlr, 8, at)?;
    Ok(f.body[4..8].try_into().ok())
}

/// The movie's track. With `video_among_several` (reading, not editing), a file of several
/// tracks (a video and its audio) gives its one video track; otherwise it must hold exactly
/// one track.
pub(super) fn locate(
    moov: &[u8],
    at: &str,
    video_among_several: bool,
) -> Result<Result<Track, String>, DatasetError> {
    let top = children(moov, 8, moov.len() as u64, at)?;
    if !find(&top, b"mvex").is_empty() {
        return Ok(Err("a fragmented MP4 (mvex)".into()));
    }
    let traks = find(&top, b"trak");
    let chosen = match traks.as_slice() {
        [t] => *t,
        several if video_among_several && !several.is_empty() => {
            let mut video = Vec::new();
            for t in several {
                if handler_of(moov, t, at)? == Some(*b"vide") {
                    video.push(*t);
                }
            }
            match video.as_slice() {
                [v] => *v,
                v => {
                    return Ok(Err(format!(
                        "{} tracks, {} of them video{NOT_ONE_TRACK}",
                        several.len(),
                        v.len()
                    )));
                }
            }
        }
        v => return Ok(Err(format!("{} tracks{NOT_ONE_TRACK}", v.len()))),
    };
    let mvhd = one(&top, b"mvhd", "moov", at)?;
    let trak = inner(moov, &chosen, at)?;
    let tkhd = one(&trak, b"tkhd", "trak", at)?;
    let elst = match find(&trak, b"edts").as_slice() {
        [] => None,
        [e] => Some(one(&inner(moov, e, at)?, b"elst", "edts", at)?),
        _ => return Ok(Err("several edts boxes".into())),
    };
    let mdia = inner(moov, &one(&trak, b"mdia", "trak", at)?, at)?;
    let mdhd = one(&mdia, b"mdhd", "mdia", at)?;
    let hdlr = find(&mdia, b"hdlr").first().copied();
    let minf = inner(moov, &one(&mdia, b"minf", "mdia", at)?, at)?;
    let stbl = one(&minf, b"stbl", "minf", at)?;
    Ok(Ok(Track {
        mvhd,
        tkhd,
        mdhd,
        hdlr,
        elst,
        stbl,
    }))
}

/// The sample tables, read and checked.
pub(super) struct Samples {
    pub(super) sizes: Vec<u32>,
    /// Decode time deltas, per sample.
    pub(super) deltas: Vec<u32>,
    /// Composition offsets, per sample (0 without ctts).
    pub(super) offsets: Vec<i64>,
    /// (first chunk, samples per chunk, description index), first chunks rising from 1.
    pub(super) stsc: Vec<(u32, u32, u32)>,
    pub(super) chunk_offsets: Vec<u64>,
    pub(super) large_offsets: bool,
}

pub(super) fn runs(
    entries: &[u8],
    total: u64,
    name: &str,
    at: &str,
) -> Result<Vec<(u32, u32)>, DatasetError> {
    let mut out = Vec::with_capacity(entries.len() / 8);
    let mut sum = 0u64;
    for e in entries.chunks_exact(8) {
        let (n, v) = (u32_at(e, 0), u32_at(e, 4));
        sum += u64::from(n);
        if sum > total {
            return Err(DatasetError::invalid(
                at,
                format!("{name} covers more samples than stsz's {total}"),
            ));
        }
        out.push((n, v));
    }
    if sum != total {
        return Err(DatasetError::invalid(
            at,
            format!("{name} covers {sum} samples but stsz counts {total}"),
        ));
    }
    Ok(out)
}

pub(super) fn expand(runs: &[(u32, u32)], total: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(total);
    for (n, x) in runs {
        v.extend(std::iter::repeat_n(*x, *n as usize));
    }
    v
}

pub(super) fn read_samples(
    moov: &[u8],
    stbl: &[BoxAt],
    file_len: u64,
    at: &str,
    editing: bool,
) -> Result<Result<Samples, String>, DatasetError> {
    for b in stbl {
        match &b.typ {
            b"stsd" | b"stts" | b"ctts" | b"stss" | b"stsc" | b"stsz" | b"stco" | b"co64"
            | b"sdtp" => {}
            _ if !editing => {}
            other => {
                return Ok(Err(format!(
                    "stbl holds a {} box",
                    String::from_utf8_lossy(other)
                )));
            }
        }
    }
    let stsz = one(stbl, b"stsz", "stbl", at)?;
    let f = full(moov, &stsz, 8, at)?;
    let (constant, count) = (u32_at(f.body, 0), u32_at(f.body, 4));
    if constant != 0 && u64::from(count) * u64::from(constant) > file_len {
        return Err(DatasetError::invalid(
            at,
            format!(
                "stsz claims {count} samples of {constant} bytes, more than the file's {file_len} bytes"
            ),
        ));
    }
    if constant == 0 {
        // The entries must be there before the count is trusted.
        table(moov, &stsz, 4, 4, at)?;
    }
    if u64::from(count) > MAX_SAMPLES {
        return Ok(Err(format!("{count} samples (over {MAX_SAMPLES})")));
    }
    let sizes: Vec<u32> = if constant != 0 {
        vec![constant; count as usize]
    } else {
        let (_, _, entries) = table(moov, &stsz, 4, 4, at)?;
        entries.chunks_exact(4).map(|e| u32_at(e, 0)).collect()
    };
    let total = sizes.len() as u64;
    let (_, _, e) = table(moov, &one(stbl, b"stts", "stbl", at)?, 0, 8, at)?;
    let deltas = expand(&runs(e, total, "stts", at)?, sizes.len());
    let offsets = match find(stbl, b"ctts").as_slice() {
        [] => vec![0; sizes.len()],
        [c] => {
            let (f, _, e) = table(moov, c, 0, 8, at)?;
            let r = runs(e, total, "ctts", at)?;
            expand(&r, sizes.len())
                .into_iter()
                .map(|o| {
                    if f.version == 0 {
                        i64::from(o)
                    } else {
                        i64::from(o as i32)
                    }
                })
                .collect()
        }
        _ => return Ok(Err("several ctts boxes".into())),
    };
    let (_, _, e) = table(moov, &one(stbl, b"stsc", "stbl", at)?, 0, 12, at)?;
    let mut stsc = Vec::with_capacity(e.len() / 12);
    for x in e.chunks_exact(12) {
        let entry = (u32_at(x, 0), u32_at(x, 4), u32_at(x, 8));
        let rising = stsc
            .last()
            .map_or(entry.0 == 1, |p: &(u32, u32, u32)| entry.0 > p.0);
        if !rising {
            return Err(DatasetError::invalid(
                at,
                "stsc's first chunks do not start at 1 and rise",
            ));
        }
        stsc.push(entry);
    }
    let (chunk_offsets, large_offsets) = match (
        find(stbl, b"stco").as_slice(),
        find(stbl, b"co64").as_slice(),
    ) {
        ([b], []) => {
            let (_, _, e) = table(moov, b, 0, 4, at)?;
            (
                e.chunks_exact(4).map(|x| u64::from(u32_at(x, 0))).collect(),
                false,
            )
        }
        ([], [b]) => {
            let (_, _, e) = table(moov, b, 0, 8, at)?;
            (e.chunks_exact(8).map(|x| u64_at(x, 0)).collect(), true)
        }
        _ => {
            return Err(DatasetError::invalid(
                at,
                "stbl holds no single stco or co64 box",
            ));
        }
    };
    Ok(Ok(Samples {
        sizes,
        deltas,
        offsets,
        stsc,
        chunk_offsets,
        large_offsets,
    }))
}

/// Per chunk (0-based), how many samples it holds, per stsc; checked to add up to `total`.
pub(super) fn per_chunk(s: &Samples, at: &str) -> Result<Vec<u32>, DatasetError> {
    let n = s.chunk_offsets.len();
    let mut out = Vec::with_capacity(n);
    let mut sum = 0u64;
    for (i, e) in s.stsc.iter().enumerate() {
        let first = e.0 as usize;
        let next = s.stsc.get(i + 1).map_or(n + 1, |x| x.0 as usize);
        if first > n {
            break;
        }
        for _ in first..next.min(n + 1) {
            out.push(e.1);
            sum += u64::from(e.1);
        }
    }
    if out.len() != n || sum != s.sizes.len() as u64 {
        return Err(DatasetError::invalid(
            at,
            format!(
                "stsc places {sum} samples in {} of {n} chunks but stsz counts {}",
                out.len(),
                s.sizes.len()
            ),
        ));
    }
    Ok(out)
}

/// An MP4 file opened for reading its one track's sample tables: the top-level boxes, the
/// `moov` (rebased so its own header is 8 bytes at offset 0), the track's boxes and its
/// samples, every size and count checked against the bytes holding it.
pub(super) struct Movie {
    pub(super) file: File,
    pub(super) top: Vec<BoxAt>,
    pub(super) moov_box: BoxAt,
    pub(super) mdat: BoxAt,
    pub(super) moov: Vec<u8>,
    pub(super) t: Track,
    pub(super) stbl_children: Vec<BoxAt>,
    pub(super) s: Samples,
    /// Samples per chunk (see [`per_chunk`]).
    pub(super) chunks: Vec<u32>,
    /// Where the last top-level box claims to end when that is past the file's end (only
    /// when opened with `clamp_tail`: the box is then cut at the end of the file).
    pub(super) truncated: Option<u64>,
}

impl Movie {
    /// Opens `src` (`at` names it in errors). A well-formed layout this cannot read is
    /// `Ok(Err(why))`. With `clamp_tail`, a last top-level box running past the end of the
    /// file (a file cut short) is read up to the end of the file and noted in `truncated`;
    /// with `editing`, boxes of `stbl` a trim would not carry over are layouts it cannot read.
    pub(super) fn open(
        src: &Path,
        at: &str,
        clamp_tail: bool,
        editing: bool,
    ) -> Result<Result<Movie, String>, DatasetError> {
        let mut f = File::open(src).map_err(DatasetError::io("open", src))?;
        let len = f.metadata().map_err(DatasetError::io("read", src))?.len();
        // Top-level boxes.
        let mut top = Vec::new();
        let mut truncated = None;
        let mut pos = 0u64;
        while pos < len {
            if top.len() >= MAX_TOP_BOXES {
                return Ok(Err(format!("over {MAX_TOP_BOXES} top-level boxes")));
            }
            let mut head = [0u8; 16];
            let n = (len - pos).min(16) as usize;
            f.seek(SeekFrom::Start(pos))
                .map_err(DatasetError::io("seek", src))?;
            f.read_exact(&mut head[..n])
                .map_err(DatasetError::io("read", src))?;
            let b = match header(&head[..n], pos, len, at) {
                Ok(b) => b,
                Err(e) if clamp_tail => {
                    // Only a box whose header is whole and whose size runs past the end.
                    let Ok(b) = header(&head[..n], pos, u64::MAX, at) else {
                        return Err(e);
                    };
                    truncated = Some(b.end());
                    BoxAt {
                        size: len - pos,
                        ..b
                    }
                }
                Err(e) => return Err(e),
            };
            top.push(b);
            pos = b.end();
        }
        if top.first().is_none_or(|b| &b.typ != b"ftyp") {
            return Err(DatasetError::invalid(
                at,
                "not an MP4 file (no ftyp box at its start)",
            ));
        }
        if !find(&top, b"moof").is_empty() {
            return Ok(Err("a fragmented MP4 (moof)".into()));
        }
        let (moov_box, mdat) = match (
            find(&top, b"moov").as_slice(),
            find(&top, b"mdat").as_slice(),
        ) {
            ([m], [d]) => (*m, *d),
            ([], _) => return Err(DatasetError::invalid(at, "no moov box")),
            (_, []) => return Err(DatasetError::invalid(at, "no mdat box")),
            _ => return Ok(Err("several moov or mdat boxes".into())),
        };
        if truncated.is_some() && moov_box.start == top[top.len() - 1].start {
            return Err(DatasetError::invalid(
                at,
                format!(
                    "the file ends at byte {len}, inside its moov box (which claims to end at byte {}): the file is truncated",
                    truncated.unwrap_or(0)
                ),
            ));
        }
        if moov_box.size > MAX_MOOV {
            return Ok(Err(format!("a moov of {} bytes", moov_box.size)));
        }
        // The moov, rebased so its own header is 8 bytes at offset 0.
        let mut moov = vec![0u8; moov_box.size as usize];
        f.seek(SeekFrom::Start(moov_box.start))
            .map_err(DatasetError::io("seek", src))?;
        f.read_exact(&mut moov)
            .map_err(DatasetError::io("read", src))?;
        if moov_box.header == 16 {
            let body = moov.split_off(16);
            moov = [[0u8; 8].as_slice(), body.as_slice()].concat();
        }
        let t = match locate(&moov, at, !editing)? {
            Ok(t) => t,
            Err(why) => return Ok(Err(why)),
        };
        let stbl_children = inner(&moov, &t.stbl, at)?;
        let s = match read_samples(&moov, &stbl_children, truncated.unwrap_or(len), at, editing)? {
            Ok(s) => s,
            Err(why) => return Ok(Err(why)),
        };
        let chunks = per_chunk(&s, at)?;
        Ok(Ok(Movie {
            file: f,
            top,
            moov_box,
            mdat,
            moov,
            t,
            stbl_children,
            s,
            chunks,
            truncated,
        }))
    }
}

pub(super) fn push_box(out: &mut Vec<u8>, typ: &[u8; 4], body: &[u8]) {
    out.extend(((body.len() + 8) as u32).to_be_bytes());
    out.extend(typ);
    out.extend(body);
}

pub(super) fn copy_range(
    mut f: &File,
    out: &mut impl Write,
    from: u64,
    len: u64,
    src: &Path,
) -> Result<(), DatasetError> {
    f.seek(SeekFrom::Start(from))
        .map_err(DatasetError::io("seek", src))?;
    let n = std::io::copy(&mut f.take(len), out).map_err(DatasetError::io("copy", src))?;
    if n != len {
        return Err(DatasetError::Io {
            op: "read",
            path: src.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file shrank"),
        });
    }
    Ok(())
}

/// A track's edit list as a merge edits it: an optional empty edit (`empty`, in the movie
/// timescale) then one edit presenting the media from `media_time` (media timescale). No
/// edit list is `media_time` 0 without delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Edit {
    pub(super) empty: u64,
    pub(super) media_time: i64,
}

/// Reads the edit list of `t`; an edit list of another shape is `Ok(Err(why))`.
pub(super) fn edit_of(
    moov: &[u8],
    t: &Track,
    at: &str,
) -> Result<Result<Edit, String>, DatasetError> {
    let Some(e) = &t.elst else {
        return Ok(Ok(Edit::default()));
    };
    let f = full(moov, e, 4, at)?;
    let w = if f.version == 1 { 20 } else { 12 };
    let (_, count, entries) = table(moov, e, 0, w, at)?;
    let entry = |i: usize| -> (u64, i64) {
        let x = &entries[i * w..];
        if w == 20 {
            (u64_at(x, 0), u64_at(x, 8) as i64)
        } else {
            (u64::from(u32_at(x, 0)), i64::from(u32_at(x, 4) as i32))
        }
    };
    let edit = match count {
        1 => Edit {
            empty: 0,
            media_time: entry(0).1,
        },
        2 if entry(0).1 == -1 => Edit {
            empty: entry(0).0,
            media_time: entry(1).1,
        },
        _ => return Ok(Err(format!("an edit list of {count} edits"))),
    };
    if edit.media_time < 0 {
        return Ok(Err("an edit list ending in an empty edit".into()));
    }
    Ok(Ok(edit))
}

/// How many samples, in decode order, a cut at `cut` seconds keeps: up to the last one
/// presented before it (an empty edit first delays every sample).
pub(super) fn kept_prefix(
    s: &Samples,
    edit: Edit,
    movie_ts: u32,
    timescale: u32,
    cut: f64,
) -> usize {
    let delay = edit.empty as f64 / f64::from(movie_ts);
    let mut dts = 0i128;
    let mut keep = 0usize;
    for (i, (d, o)) in s.deltas.iter().zip(&s.offsets).enumerate() {
        let pts = dts + i128::from(*o) - i128::from(edit.media_time);
        if delay + (pts as f64) / f64::from(timescale) < cut {
            keep = i + 1;
        }
        dts += i128::from(*d);
    }
    keep
}

/// Where the media of the first `keep` samples ends: the end of the last one presented
/// (with B-frames, past the end of the last one decoded), as ffmpeg writes `mdhd`.
pub(super) fn media_end(s: &Samples, keep: usize) -> u64 {
    let mut dts = 0i128;
    let mut end = 0i128;
    for (d, o) in s.deltas[..keep].iter().zip(&s.offsets) {
        dts += i128::from(*d);
        end = end.max(dts.max(dts + i128::from(*o)));
    }
    u64::try_from(end).unwrap_or(0)
}

/// The bytes of a run of samples stored together: one chunk, or its kept part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChunkBytes {
    /// Where they start in the file.
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) samples: u32,
}

/// The chunks holding the first `keep` samples (the last one cut to the kept samples), each
/// sample checked to lie inside `mdat`.
pub(super) fn kept_chunks(
    m: &Movie,
    keep: usize,
    at: &str,
) -> Result<Vec<ChunkBytes>, DatasetError> {
    let (data_from, data_to) = (m.mdat.start + m.mdat.header, m.mdat.end());
    let mut out = Vec::new();
    let mut sample = 0usize;
    for (&n, &off) in m.chunks.iter().zip(&m.s.chunk_offsets) {
        if sample == keep {
            break;
        }
        let mut c = ChunkBytes {
            offset: off,
            len: 0,
            samples: 0,
        };
        let mut p = off;
        for _ in 0..n {
            if sample == keep {
                break;
            }
            let size = u64::from(m.s.sizes[sample]);
            let e = p
                .checked_add(size)
                .filter(|e| *e <= data_to && p >= data_from);
            let Some(e) = e else {
                return Err(DatasetError::invalid(
                    at,
                    format!(
                        "sample {sample} ({size} bytes at byte {p}) lies outside mdat (bytes {data_from}..{data_to})"
                    ),
                ));
            };
            p = e;
            c.len += size;
            c.samples += 1;
            sample += 1;
        }
        out.push(c);
    }
    Ok(out)
}

/// A duration field of `mdhd`, `mvhd` (at 12 in version 0, 20 in version 1, after version and
/// flags) or `tkhd` (16, 24) set to `d` in a copy of the box's payload (`raw` is the whole
/// box, `header` its header's length); a version 0 field saturates at `u32::MAX`.
pub(super) fn set_duration(raw: &[u8], header: u64, at_v0: usize, at_v1: usize, d: u64) -> Vec<u8> {
    let mut body = raw[header as usize..].to_vec();
    let v1 = body[0] == 1;
    let i = 4 + if v1 { at_v1 } else { at_v0 };
    if v1 {
        body[i..i + 8].copy_from_slice(&d.to_be_bytes());
    } else {
        body[i..i + 4].copy_from_slice(&(d.min(u64::from(u32::MAX)) as u32).to_be_bytes());
    }
    body
}

/// The edit list's payload with its last edit's duration set to `d` (movie timescale).
pub(super) fn set_edit_duration(raw: &[u8], header: u64, d: u64) -> Vec<u8> {
    let mut body = raw[header as usize..].to_vec();
    let v1 = body[0] == 1;
    let w = if v1 { 20 } else { 12 };
    let count = u32_at(&body, 4) as usize;
    let i = 8 + (count - 1) * w;
    if v1 {
        body[i..i + 8].copy_from_slice(&d.to_be_bytes());
    } else {
        body[i..i + 4].copy_from_slice(&(d.min(u64::from(u32::MAX)) as u32).to_be_bytes());
    }
    body
}

/// `moov` rebuilt from `list` (its children): a box `edit` answers for gets that payload,
/// the containers on the way to the edited boxes are re-wrapped, the rest copied raw.
pub(super) fn rebuild_moov(
    moov: &[u8],
    edit: &dyn Fn(&BoxAt) -> Option<Vec<u8>>,
    at: &str,
) -> Result<Vec<u8>, DatasetError> {
    fn walk(
        moov: &[u8],
        list: &[BoxAt],
        depth: usize,
        edit: &dyn Fn(&BoxAt) -> Option<Vec<u8>>,
        at: &str,
    ) -> Result<Vec<u8>, DatasetError> {
        if depth > MAX_DEPTH {
            return Err(DatasetError::invalid(at, "boxes nested too deep"));
        }
        let mut out = Vec::new();
        for b in list {
            if let Some(body) = edit(b) {
                push_box(&mut out, &b.typ, &body);
            } else if matches!(&b.typ, b"trak" | b"mdia" | b"minf" | b"edts") {
                let kids = children(moov, b.start + b.header, b.end(), at)?;
                let body = walk(moov, &kids, depth + 1, edit, at)?;
                push_box(&mut out, &b.typ, &body);
            } else {
                out.extend(&moov[b.start as usize..b.end() as usize]);
            }
        }
        Ok(out)
    }
    let kids = children(moov, 8, moov.len() as u64, at)?;
    let body = walk(moov, &kids, 0, edit, at)?;
    let mut out = Vec::new();
    push_box(&mut out, b"moov", &body);
    Ok(out)
}

/// Run-length entries (count, value) of `values`, as `stts` and `ctts` store them.
pub(super) fn run_length(values: impl IntoIterator<Item = u32>) -> Vec<(u32, u32)> {
    let mut rs: Vec<(u32, u32)> = Vec::new();
    for v in values {
        match rs.last_mut() {
            Some((n, x)) if *x == v => *n += 1,
            _ => rs.push((1, v)),
        }
    }
    rs
}
