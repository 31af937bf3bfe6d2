//! Cutting the trailing samples of an MP4 file: what a merge does to a video file whose last
//! episodes are dropped. The kept samples are a prefix in decode order, so nothing they need
//! is removed and nothing is re-encoded: the sample tables (`stsz`, `stts`, `ctts`, `stss`,
//! `stsc`, `stco`/`co64`, `sdtp`) are cut, the durations (`mvhd`, `tkhd`, `mdhd`, `elst`)
//! set, and `mdat` ends after the last kept sample's bytes (chunk offsets moved by however
//! much `moov`, when it comes first, shrank).
//!
//! Every size and count is checked against the bytes holding it before anything is sized by
//! it; a malformed file is [`DatasetError::Invalid`]. A well-formed file of a layout this
//! does not edit (fragmented, several tracks, `stz2`, sample groups, a `moov` over 64 MiB,
//! an edit list other than one edit after an optional empty one) is
//! [`Trimmed::Unsupported`]: the caller copies it whole.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::DatasetError;

/// Largest `moov` read into memory.
const MAX_MOOV: u64 = 64 << 20;
/// Most top-level boxes walked.
const MAX_TOP_BOXES: usize = 4096;
/// Most samples a trimmed track may hold (its tables are held in memory: 16 bytes a
/// sample); a longer track is copied whole.
const MAX_SAMPLES: u64 = 1 << 22;
/// Deepest box nesting followed inside `moov`.
const MAX_DEPTH: usize = 8;

/// Ends the reason a file of several tracks (or none) is not read.
const NOT_ONE_TRACK: &str = " tracks, not one";

/// What [`trim`] did.
#[derive(Debug, PartialEq)]
pub enum Trimmed {
    /// Written at the destination: `kept` of `total` samples, `bytes` in all.
    Done { kept: u64, total: u64, bytes: u64 },
    /// Every sample is before the cut: nothing written.
    Whole,
    /// A layout this does not edit (the reason): nothing written.
    Unsupported(String),
}

/// One box: type, where it starts, its header's length and its whole size.
#[derive(Debug, Clone, Copy)]
struct BoxAt {
    typ: [u8; 4],
    start: u64,
    header: u64,
    size: u64,
}

impl BoxAt {
    fn end(&self) -> u64 {
        self.start + self.size
    }
    fn name(&self) -> String {
        String::from_utf8_lossy(&self.typ).into_owned()
    }
}

/// Reads one box header from `head` (at least 8 bytes, 16 for a 64-bit size) for a box at
/// `start` inside a region ending at `limit`.
fn header(head: &[u8], start: u64, limit: u64, at: &str) -> Result<BoxAt, DatasetError> {
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
fn children(buf: &[u8], from: u64, to: u64, at: &str) -> Result<Vec<BoxAt>, DatasetError> {
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
struct Full<'a> {
    version: u8,
    body: &'a [u8],
}

fn full<'a>(buf: &'a [u8], b: &BoxAt, fixed: usize, at: &str) -> Result<Full<'a>, DatasetError> {
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
fn timescale_of(buf: &[u8], b: &BoxAt, at: &str) -> Result<u32, DatasetError> {
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

fn u32_at(b: &[u8], i: usize) -> u32 {
    b.get(i..i + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_be_bytes)
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    b.get(i..i + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_be_bytes)
}

/// A table box: `count` entries of `width` bytes after a 4-byte count (and `pre` bytes
/// before it), each checked to lie inside the box.
fn table<'a>(
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

/// What [`probe`] found in a video file.
#[derive(Debug, PartialEq)]
pub enum Probe {
    /// Read: its samples, its codec (the sample entry's fourcc: `av01`, `avc1`, `hvc1`...)
    /// and what is wrong with it, each a reason (empty for a sound file).
    Read {
        samples: u64,
        fourcc: String,
        problems: Vec<String>,
    },
    /// A layout this does not read (a fragmented MP4, a huge moov): why.
    NotChecked(String),
}

/// Checks a video file without decoding it: one track, and a video one; its sample tables
/// consistent (every table covering the same samples, the chunks holding them all); its first
/// sample a sync (key) frame; its first and last samples' bytes inside its `mdat` (a file cut
/// short is read up to its end, and samples past it are reported). A file that cannot be
/// parsed at all is [`DatasetError::Invalid`]; a fragmented one is [`Probe::NotChecked`].
pub fn probe(src: &Path, at: &str) -> Result<Probe, DatasetError> {
    let m = match Movie::open(src, at, true, false)? {
        Ok(m) => m,
        Err(why) if why.ends_with(NOT_ONE_TRACK) => {
            return Ok(Probe::Read {
                samples: 0,
                fourcc: String::new(),
                problems: vec![format!(
                    "holds {why} (a LeRobot video file holds exactly one video track)"
                )],
            });
        }
        Err(why) if why.starts_with("a fragmented MP4") => {
            return Ok(Probe::NotChecked("fragmented".into()));
        }
        Err(why) => return Ok(Probe::NotChecked(why)),
    };
    let mut problems = Vec::new();
    if let Some(h) = &m.t.hdlr {
        let f = full(&m.moov, h, 8, at)?;
        let kind = &f.body[4..8];
        if kind != b"vide" {
            problems.push(format!(
                "its one track is a {:?} track, not a video (vide) one",
                String::from_utf8_lossy(kind)
            ));
        }
    }
    let stsd = one(&m.stbl_children, b"stsd", "stbl", at)?;
    let f = full(&m.moov, &stsd, 12, at)?;
    if u32_at(f.body, 0) == 0 {
        return Err(DatasetError::invalid(at, "stsd lists no sample entry"));
    }
    let fourcc = String::from_utf8_lossy(&f.body[8..12]).into_owned();
    let n = m.s.sizes.len();
    if n == 0 {
        problems.push("its track holds no samples".into());
    }
    match find(&m.stbl_children, b"stss").as_slice() {
        [] => {}
        [b] => {
            let (_, count, e) = table(&m.moov, b, 0, 4, at)?;
            if count == 0 && n > 0 {
                problems.push("stss lists no sync (key) sample: no frame can be decoded".into());
            } else if count > 0 && u32_at(e, 0) != 1 {
                problems.push(format!(
                    "its first sample is not a sync (key) frame (stss starts at sample {}): the first frame cannot be decoded",
                    u32_at(e, 0)
                ));
            }
        }
        _ => return Err(DatasetError::invalid(at, "stbl holds several stss boxes")),
    }
    // Where the first and the last samples lie.
    let (mut first, mut last) = (None, None);
    let mut sample = 0usize;
    for (&k, &off) in m.chunks.iter().zip(&m.s.chunk_offsets) {
        let mut p = off;
        for _ in 0..k {
            let size = u64::from(m.s.sizes[sample]);
            let range = (sample, p, p.saturating_add(size));
            if sample == 0 {
                first = Some(range);
            }
            if sample + 1 == n {
                last = Some(range);
            }
            p = p.saturating_add(size);
            sample += 1;
        }
    }
    let len = m.top.last().map_or(0, BoxAt::end);
    let (data_from, data_to) = (m.mdat.start + m.mdat.header, m.mdat.end());
    let mut outside = false;
    for (which, r) in [("first", first), ("last", last)] {
        let Some((i, a, b)) = r else { continue };
        if (which == "last" && n == 1) || outside {
            continue;
        }
        if a < data_from || b > data_to {
            outside = true;
            let end = match m.truncated {
                Some(claimed) if m.mdat.end() == len && b > len => format!(
                    ", past the file's end at byte {len} (mdat claims to end at byte {claimed}): the file is truncated"
                ),
                _ => String::new(),
            };
            problems.push(format!(
                "its {which} sample (sample {}, {} bytes at byte {a}) lies outside mdat (bytes {data_from}..{data_to}){end}",
                i + 1,
                b - a
            ));
        }
    }
    if let (Some(claimed), false) = (m.truncated, outside) {
        problems.push(format!(
            "the file ends at byte {len} but its last box claims to end at byte {claimed}: the file is truncated"
        ));
    }
    Ok(Probe::Read {
        samples: n as u64,
        fourcc,
        problems,
    })
}

/// Where the boxes a trim edits lie in `moov` (offsets into the moov buffer).
struct Track {
    mvhd: BoxAt,
    tkhd: BoxAt,
    mdhd: BoxAt,
    hdlr: Option<BoxAt>,
    elst: Option<BoxAt>,
    stbl: BoxAt,
}

fn find(list: &[BoxAt], t: &[u8; 4]) -> Vec<BoxAt> {
    list.iter().filter(|b| &b.typ == t).copied().collect()
}

fn one(list: &[BoxAt], t: &[u8; 4], inside: &str, at: &str) -> Result<BoxAt, DatasetError> {
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

fn inner(buf: &[u8], b: &BoxAt, at: &str) -> Result<Vec<BoxAt>, DatasetError> {
    children(buf, b.start + b.header, b.end(), at)
}

fn locate(moov: &[u8], at: &str) -> Result<Result<Track, String>, DatasetError> {
    let top = children(moov, 8, moov.len() as u64, at)?;
    if !find(&top, b"mvex").is_empty() {
        return Ok(Err("a fragmented MP4 (mvex)".into()));
    }
    let traks = find(&top, b"trak");
    if traks.len() != 1 {
        return Ok(Err(format!("{} tracks{NOT_ONE_TRACK}", traks.len())));
    }
    let mvhd = one(&top, b"mvhd", "moov", at)?;
    let trak = inner(moov, &traks[0], at)?;
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
struct Samples {
    sizes: Vec<u32>,
    /// Decode time deltas, per sample.
    deltas: Vec<u32>,
    /// Composition offsets, per sample (0 without ctts).
    offsets: Vec<i64>,
    /// (first chunk, samples per chunk, description index), first chunks rising from 1.
    stsc: Vec<(u32, u32, u32)>,
    chunk_offsets: Vec<u64>,
    large_offsets: bool,
}

fn runs(entries: &[u8], total: u64, name: &str, at: &str) -> Result<Vec<(u32, u32)>, DatasetError> {
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

fn expand(runs: &[(u32, u32)], total: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(total);
    for (n, x) in runs {
        v.extend(std::iter::repeat_n(*x, *n as usize));
    }
    v
}

fn read_samples(
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
fn per_chunk(s: &Samples, at: &str) -> Result<Vec<u32>, DatasetError> {
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
struct Movie {
    file: File,
    top: Vec<BoxAt>,
    moov_box: BoxAt,
    mdat: BoxAt,
    moov: Vec<u8>,
    t: Track,
    stbl_children: Vec<BoxAt>,
    s: Samples,
    /// Samples per chunk (see [`per_chunk`]).
    chunks: Vec<u32>,
    /// Where the last top-level box claims to end when that is past the file's end (only
    /// when opened with `clamp_tail`: the box is then cut at the end of the file).
    truncated: Option<u64>,
}

impl Movie {
    /// Opens `src` (`at` names it in errors). A well-formed layout this cannot read is
    /// `Ok(Err(why))`. With `clamp_tail`, a last top-level box running past the end of the
    /// file (a file cut short) is read up to the end of the file and noted in `truncated`;
    /// with `editing`, boxes of `stbl` a trim would not carry over are layouts it cannot read.
    fn open(
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
        let t = match locate(&moov, at)? {
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

/// Writes `src` with the samples presented from `cut` seconds on dropped (the prefix in
/// decode order up to the last sample presented before `cut`) to `dst`; `at` names `src` in
/// errors.
pub fn trim(src: &Path, dst: &Path, cut: f64, at: &str) -> Result<Trimmed, DatasetError> {
    let Movie {
        file: mut f,
        top,
        moov_box,
        mdat,
        moov,
        t,
        stbl_children,
        s,
        chunks,
        truncated: _,
    } = match Movie::open(src, at, false, true)? {
        Ok(m) => m,
        Err(why) => return Ok(Trimmed::Unsupported(why)),
    };

    // Time: media timescale, edit list.
    let timescale = timescale_of(&moov, &t.mdhd, at)?;
    let movie_ts = timescale_of(&moov, &t.mvhd, at)?;
    // The edit list: optionally one empty edit, then one edit from `media_time`.
    let mut media_time = 0i64;
    let mut empty_dur = 0u64;
    if let Some(e) = &t.elst {
        let f = full(&moov, e, 4, at)?;
        let w = if f.version == 1 { 20 } else { 12 };
        let (_, count, entries) = table(&moov, e, 0, w, at)?;
        let entry = |i: usize| -> (u64, i64) {
            let x = &entries[i * w..];
            if w == 20 {
                (u64_at(x, 0), u64_at(x, 8) as i64)
            } else {
                (u64::from(u32_at(x, 0)), i64::from(u32_at(x, 4) as i32))
            }
        };
        match count {
            1 => media_time = entry(0).1,
            2 if entry(0).1 == -1 => {
                empty_dur = entry(0).0;
                media_time = entry(1).1;
            }
            _ => {
                return Ok(Trimmed::Unsupported(format!(
                    "an edit list of {count} edits"
                )));
            }
        }
        if media_time < 0 {
            return Ok(Trimmed::Unsupported(
                "an edit list ending in an empty edit".into(),
            ));
        }
    }

    // Kept: decode-order prefix up to the last sample presented before the cut (an empty
    // edit first delays every sample).
    let delay = empty_dur as f64 / f64::from(movie_ts);
    let mut dts = 0i128;
    let mut keep = 0usize;
    for (i, (d, o)) in s.deltas.iter().zip(&s.offsets).enumerate() {
        let pts = dts + i128::from(*o) - i128::from(media_time);
        if delay + (pts as f64) / f64::from(timescale) < cut {
            keep = i + 1;
        }
        dts += i128::from(*d);
    }
    let total = s.sizes.len();
    if keep == total {
        return Ok(Trimmed::Whole);
    }
    if keep == 0 {
        return Ok(Trimmed::Unsupported(format!(
            "no sample is presented before {cut} s"
        )));
    }
    // The kept samples' media duration: to the end of the last one presented (with
    // B-frames, past the end of the last one decoded), as ffmpeg writes mdhd.
    let mut dts = 0i128;
    let mut media_end = 0i128;
    for (d, o) in s.deltas[..keep].iter().zip(&s.offsets) {
        dts += i128::from(*d);
        media_end = media_end.max(dts.max(dts + i128::from(*o)));
    }
    let media_dur = u64::try_from(media_end).unwrap_or(0);

    // The kept samples' bytes: where the last one ends, all inside mdat.
    let (data_from, data_to) = (mdat.start + mdat.header, mdat.end());
    let mut end = data_from;
    let mut sample = 0usize;
    let mut last_chunk = 0usize;
    let mut kept_in_last = 0u32;
    'chunks: for (c, (&n, &off)) in chunks.iter().zip(&s.chunk_offsets).enumerate() {
        let mut p = off;
        for k in 0..n {
            if sample == keep {
                break 'chunks;
            }
            let size = u64::from(s.sizes[sample]);
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
            end = end.max(e);
            p = e;
            sample += 1;
            last_chunk = c;
            kept_in_last = k + 1;
        }
    }
    let n_chunks = last_chunk + 1;

    // New sample tables.
    let new_stbl = |moov_delta: i64| -> Result<Result<Vec<u8>, String>, DatasetError> {
        let mut out = Vec::new();
        for b in &stbl_children {
            let raw = &moov[b.start as usize..b.end() as usize];
            let vf = &raw[b.header as usize..b.header as usize + 4];
            let mut body = vf.to_vec();
            match &b.typ {
                b"stsz" => {
                    let constant = u32_at(&raw[b.header as usize + 4..], 0);
                    body.extend(constant.to_be_bytes());
                    body.extend((keep as u32).to_be_bytes());
                    if constant == 0 {
                        for sz in &s.sizes[..keep] {
                            body.extend(sz.to_be_bytes());
                        }
                    }
                }
                b"stts" | b"ctts" => {
                    let vals: Vec<u32> = if &b.typ == b"stts" {
                        s.deltas[..keep].to_vec()
                    } else {
                        s.offsets[..keep].iter().map(|o| *o as u32).collect()
                    };
                    let mut rs: Vec<(u32, u32)> = Vec::new();
                    for v in vals {
                        match rs.last_mut() {
                            Some((n, x)) if *x == v => *n += 1,
                            _ => rs.push((1, v)),
                        }
                    }
                    body.extend((rs.len() as u32).to_be_bytes());
                    for (n, v) in rs {
                        body.extend(n.to_be_bytes());
                        body.extend(v.to_be_bytes());
                    }
                }
                b"stss" => {
                    let (_, _, e) = table(&moov, b, 0, 4, at)?;
                    let kept: Vec<u32> = e
                        .chunks_exact(4)
                        .map(|x| u32_at(x, 0))
                        .filter(|i| *i as usize <= keep)
                        .collect();
                    body.extend((kept.len() as u32).to_be_bytes());
                    kept.iter().for_each(|i| body.extend(i.to_be_bytes()));
                }
                b"sdtp" => {
                    let p = &raw[b.header as usize + 4..];
                    if p.len() < total {
                        return Err(DatasetError::invalid(
                            at,
                            "sdtp holds fewer bytes than samples",
                        ));
                    }
                    body.extend(&p[..keep]);
                }
                b"stsc" => {
                    let mut es: Vec<(u32, u32, u32)> = s
                        .stsc
                        .iter()
                        .filter(|e| (e.0 as usize) <= n_chunks)
                        .copied()
                        .collect();
                    if let Some(l) = es.last_mut()
                        && l.1 != kept_in_last
                    {
                        if l.0 as usize == n_chunks {
                            l.1 = kept_in_last;
                        } else {
                            let sdi = l.2;
                            es.push((n_chunks as u32, kept_in_last, sdi));
                        }
                    }
                    body.extend((es.len() as u32).to_be_bytes());
                    for (a, b2, c) in es {
                        body.extend(a.to_be_bytes());
                        body.extend(b2.to_be_bytes());
                        body.extend(c.to_be_bytes());
                    }
                }
                b"stco" | b"co64" => {
                    body.extend((n_chunks as u32).to_be_bytes());
                    for off in &s.chunk_offsets[..n_chunks] {
                        let moved = i128::from(*off) + i128::from(moov_delta);
                        if s.large_offsets {
                            match u64::try_from(moved) {
                                Ok(v) => body.extend(v.to_be_bytes()),
                                Err(_) => return Ok(Err("a chunk offset out of range".into())),
                            }
                        } else {
                            match u32::try_from(moved) {
                                Ok(v) => body.extend(v.to_be_bytes()),
                                Err(_) => return Ok(Err("a chunk offset past 4 GiB".into())),
                            }
                        }
                    }
                }
                _ => {
                    out.extend(raw);
                    continue;
                }
            }
            push_box(&mut out, &b.typ, &body);
        }
        Ok(Ok(out))
    };

    // Durations: media (mdhd), presentation in the movie timescale (tkhd, mvhd, elst).
    // The edit ends where the last kept frame's presentation does.
    let presented = media_dur.saturating_sub(media_time as u64);
    let scaled = ((u128::from(presented) * u128::from(movie_ts) + u128::from(timescale) / 2)
        / u128::from(timescale)) as u64;
    let movie_dur = empty_dur.saturating_add(scaled);
    let set_dur = |raw: &[u8], b: &BoxAt, at_v0: usize, at_v1: usize, d: u64| -> Vec<u8> {
        let mut body = raw[b.header as usize..].to_vec();
        let v1 = body[0] == 1;
        let i = 4 + if v1 { at_v1 } else { at_v0 };
        if v1 {
            body[i..i + 8].copy_from_slice(&d.to_be_bytes());
        } else {
            body[i..i + 4].copy_from_slice(&(d.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        }
        body
    };
    let tkhd_full = full(&moov, &t.tkhd, 20, at)?;
    if tkhd_full.version == 1 && tkhd_full.body.len() < 32 {
        return Err(DatasetError::invalid(at, "tkhd is cut short"));
    }
    let build = |moov_delta: i64| -> Result<Result<Vec<u8>, String>, DatasetError> {
        let stbl = match new_stbl(moov_delta)? {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        // Rebuild moov: containers on the way to the edited boxes re-wrapped, the rest raw.
        fn rebuild(
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
                    let body = rebuild(moov, &kids, depth + 1, edit, at)?;
                    push_box(&mut out, &b.typ, &body);
                } else {
                    out.extend(&moov[b.start as usize..b.end() as usize]);
                }
            }
            Ok(out)
        }
        let edit = |b: &BoxAt| -> Option<Vec<u8>> {
            let raw = &moov[b.start as usize..b.end() as usize];
            let rel = BoxAt { start: 0, ..*b };
            if b.start == t.stbl.start {
                Some(stbl.clone())
            } else if b.start == t.mdhd.start {
                Some(set_dur(raw, &rel, 12, 20, media_dur))
            } else if b.start == t.tkhd.start {
                Some(set_dur(raw, &rel, 16, 24, movie_dur))
            } else if b.start == t.mvhd.start {
                Some(set_dur(raw, &rel, 12, 20, movie_dur))
            } else if t.elst.is_some_and(|e| e.start == b.start) {
                let mut body = raw[b.header as usize..].to_vec();
                let v1 = body[0] == 1;
                let w = if v1 { 20 } else { 12 };
                let count = u32_at(&body, 4) as usize;
                let i = 8 + (count - 1) * w;
                if v1 {
                    body[i..i + 8].copy_from_slice(&scaled.to_be_bytes());
                } else {
                    body[i..i + 4]
                        .copy_from_slice(&(scaled.min(u64::from(u32::MAX)) as u32).to_be_bytes());
                }
                Some(body)
            } else {
                None
            }
        };
        let kids = children(&moov, 8, moov.len() as u64, at)?;
        let body = rebuild(&moov, &kids, 0, &edit, at)?;
        let mut out = Vec::new();
        push_box(&mut out, b"moov", &body);
        Ok(Ok(out))
    };
    let first = match build(0)? {
        Ok(v) => v,
        Err(e) => return Ok(Trimmed::Unsupported(e)),
    };
    let delta = if moov_box.start < mdat.start {
        first.len() as i64 - moov_box.size as i64
    } else {
        0
    };
    let new_moov = match build(delta)? {
        Ok(v) => v,
        Err(e) => return Ok(Trimmed::Unsupported(e)),
    };

    // Write: every top-level box in order, moov rebuilt, mdat cut after the kept bytes.
    let mut out =
        std::io::BufWriter::new(File::create_new(dst).map_err(DatasetError::io("create", dst))?);
    let werr = DatasetError::io("write", dst);
    let mut written = 0u64;
    for b in &top {
        if b.start == moov_box.start {
            out.write_all(&new_moov)
                .map_err(DatasetError::io("write", dst))?;
            written += new_moov.len() as u64;
        } else if b.start == mdat.start {
            let payload = end - data_from;
            let size = payload + mdat.header;
            if mdat.header == 16 {
                out.write_all(&1u32.to_be_bytes())
                    .map_err(DatasetError::io("write", dst))?;
                out.write_all(b"mdat")
                    .map_err(DatasetError::io("write", dst))?;
                out.write_all(&size.to_be_bytes())
                    .map_err(DatasetError::io("write", dst))?;
            } else {
                let Ok(s32) = u32::try_from(size) else {
                    return Ok(Trimmed::Unsupported(
                        "an mdat over 4 GiB with a 32-bit size".into(),
                    ));
                };
                out.write_all(&s32.to_be_bytes())
                    .map_err(DatasetError::io("write", dst))?;
                out.write_all(b"mdat")
                    .map_err(DatasetError::io("write", dst))?;
            }
            copy_range(&mut f, &mut out, data_from, payload, src)?;
            written += size;
        } else {
            copy_range(&mut f, &mut out, b.start, b.size, src)?;
            written += b.size;
        }
    }
    out.flush().map_err(werr)?;
    Ok(Trimmed::Done {
        kept: keep as u64,
        total: total as u64,
        bytes: written,
    })
}

fn push_box(out: &mut Vec<u8>, typ: &[u8; 4], body: &[u8]) {
    out.extend(((body.len() + 8) as u32).to_be_bytes());
    out.extend(typ);
    out.extend(body);
}

fn copy_range(
    f: &mut File,
    out: &mut impl Write,
    from: u64,
    len: u64,
    src: &Path,
) -> Result<(), DatasetError> {
    f.seek(SeekFrom::Start(from))
        .map_err(DatasetError::io("seek", src))?;
    let n = std::io::copy(&mut (&mut *f).take(len), out).map_err(DatasetError::io("copy", src))?;
    if n != len {
        return Err(DatasetError::Io {
            op: "read",
            path: src.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file shrank"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code may unwrap
    use super::*;

    fn bx(typ: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_box(&mut out, typ, body);
        out
    }

    fn fullbx(typ: &[u8; 4], body: &[u8]) -> Vec<u8> {
        bx(typ, &[&[0u8, 0, 0, 0][..], body].concat())
    }

    fn be(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_be_bytes()).collect()
    }

    const SIZES: [u32; 6] = [10, 11, 12, 13, 14, 15];

    /// A one-track movie of six samples of 0.1 s in three chunks of two, `stco` or `co64`
    /// offsets, `moov` before or after `mdat`, and optionally a second track.
    fn movie(co64: bool, moov_first: bool, two_tracks: bool) -> (Vec<u8>, Vec<u8>) {
        let ftyp = bx(b"ftyp", b"isom\0\0\0\0");
        let payload: Vec<u8> = (0..SIZES.iter().sum::<u32>()).map(|i| i as u8).collect();
        let mdat = bx(b"mdat", &payload);
        let moov_for = |base: u64| {
            let starts = [0u64, 21, 46].map(|s| base + s);
            let stco = if co64 {
                fullbx(
                    b"co64",
                    &[
                        be(&[3]),
                        starts.iter().flat_map(|s| s.to_be_bytes()).collect(),
                    ]
                    .concat(),
                )
            } else {
                fullbx(
                    b"stco",
                    &be(&[3, starts[0] as u32, starts[1] as u32, starts[2] as u32]),
                )
            };
            let stbl = bx(
                b"stbl",
                &[
                    fullbx(b"stsd", &be(&[0])),
                    fullbx(b"stts", &be(&[1, 6, 100])),
                    fullbx(b"stss", &be(&[2, 1, 4])),
                    fullbx(b"stsc", &be(&[1, 1, 2, 1])),
                    fullbx(b"stsz", &[be(&[0, 6]), be(&SIZES)].concat()),
                    stco,
                ]
                .concat(),
            );
            let mdhd = fullbx(b"mdhd", &[be(&[0, 0, 1000, 600]), vec![0; 4]].concat());
            let mdia = bx(b"mdia", &[mdhd, bx(b"minf", &stbl)].concat());
            let tkhd = fullbx(b"tkhd", &[be(&[0, 0, 1, 0, 600]), vec![0; 60]].concat());
            let elst = fullbx(b"elst", &be(&[1, 600, 0, 0x10000]));
            let trak = bx(b"trak", &[tkhd, bx(b"edts", &elst), mdia].concat());
            let mvhd = fullbx(b"mvhd", &[be(&[0, 0, 1000, 600]), vec![0; 80]].concat());
            let mut body = [mvhd, trak.clone()].concat();
            if two_tracks {
                body.extend(trak);
            }
            bx(b"moov", &body)
        };
        let file = if moov_first {
            let n = moov_for(0).len() as u64;
            let base = (ftyp.len() as u64) + n + 8;
            [ftyp, moov_for(base), mdat].concat()
        } else {
            let base = ftyp.len() as u64 + 8;
            [ftyp.clone(), mdat.clone(), moov_for(base)].concat()
        };
        (file, payload)
    }

    fn run(file: &[u8], cut: f64) -> (Trimmed, Vec<u8>) {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("in.mp4"), t.path().join("out.mp4"));
        std::fs::write(&src, file).unwrap();
        let r = trim(&src, &dst, cut, "in.mp4").unwrap();
        (r, std::fs::read(&dst).unwrap_or_default())
    }

    /// The output's moov tables and mdat, read back with the same checks.
    fn read_back(file: &[u8]) -> (Samples, Vec<u8>, u64) {
        let len = file.len() as u64;
        let top = children(file, 0, len, "out").unwrap();
        let moov_b = find(&top, b"moov")[0];
        let mdat = find(&top, b"mdat")[0];
        let moov = file[moov_b.start as usize..moov_b.end() as usize].to_vec();
        let t = locate(&moov, "out").unwrap().unwrap();
        let kids = inner(&moov, &t.stbl, "out").unwrap();
        let s = read_samples(&moov, &kids, len, "out", true)
            .unwrap()
            .unwrap();
        let mdhd = full(&moov, &t.mdhd, 20, "out").unwrap();
        let dur = u64::from(u32_at(mdhd.body, 12));
        (
            s,
            file[(mdat.start + mdat.header) as usize..mdat.end() as usize].to_vec(),
            dur,
        )
    }

    #[test]
    fn trims_inside_a_chunk_and_moves_the_offsets() {
        for (co64, moov_first) in [(false, true), (true, true), (false, false)] {
            let (file, payload) = movie(co64, moov_first, false);
            let (r, out) = run(&file, 0.25);
            assert_eq!(
                r,
                Trimmed::Done {
                    kept: 3,
                    total: 6,
                    bytes: out.len() as u64
                }
            );
            let (s, mdat, dur) = read_back(&out);
            assert_eq!(s.sizes, &SIZES[..3]);
            assert_eq!(s.deltas, vec![100; 3]);
            assert_eq!(s.stsc, vec![(1, 2, 1), (2, 1, 1)]);
            assert_eq!(s.large_offsets, co64);
            assert_eq!(mdat, &payload[..33]);
            assert_eq!(dur, 300);
            // The chunk offsets point at the kept bytes in the new file.
            for (c, want) in s.chunk_offsets.iter().zip([0usize, 21]) {
                assert_eq!(out[*c as usize..*c as usize + 5], payload[want..want + 5]);
            }
            // A cut on a chunk boundary, and none at all.
            let (_, out) = run(&file, 0.35);
            let (s, mdat, _) = read_back(&out);
            assert_eq!(
                (s.stsc, s.chunk_offsets.len(), mdat.len()),
                (vec![(1, 2, 1)], 2, 46)
            );
            assert_eq!(run(&file, 10.0).0, Trimmed::Whole);
        }
    }

    #[test]
    fn layouts_it_does_not_edit_are_left_to_a_whole_copy() {
        let (file, _) = movie(false, true, true);
        assert!(matches!(run(&file, 0.25).0, Trimmed::Unsupported(w) if w.contains("2 tracks")));
        let (mut file, _) = movie(false, true, false);
        file.extend(bx(b"moof", &[0; 8]));
        assert!(matches!(run(&file, 0.25).0, Trimmed::Unsupported(w) if w.contains("fragmented")));
        let (file, _) = movie(false, true, false);
        assert!(matches!(run(&file, 0.0).0, Trimmed::Unsupported(_)));
    }

    #[test]
    fn lying_sizes_are_errors() {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("in.mp4"), t.path().join("out.mp4"));
        let (file, _) = movie(false, true, false);
        let err = |f: &[u8]| {
            std::fs::write(&src, f).unwrap();
            let _ = std::fs::remove_file(&dst);
            trim(&src, &dst, 0.25, "in.mp4").unwrap_err().to_string()
        };
        // A 64-bit box size past the end.
        let mut f = file.clone();
        let at = f.windows(4).position(|w| w == b"mdat").unwrap() - 4;
        f[at..at + 4].copy_from_slice(&1u32.to_be_bytes());
        f.splice(at + 8..at + 8, u64::MAX.to_be_bytes());
        assert!(err(&f).contains("claims 18446744073709551615 bytes"));
        // A box smaller than its header.
        let mut f = file.clone();
        let at = f.windows(4).position(|w| w == b"stts").unwrap() - 4;
        f[at..at + 4].copy_from_slice(&3u32.to_be_bytes());
        assert!(err(&f).contains("less than its header"));
        // stts covering more samples than stsz.
        let mut f = file.clone();
        let at = f.windows(4).position(|w| w == b"stts").unwrap() + 12;
        f[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(err(&f).contains("stts covers more samples"));
        // stsc placing more samples than there are.
        let mut f = file.clone();
        let at = f.windows(4).position(|w| w == b"stsc").unwrap() + 16;
        f[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(err(&f).contains("stsc places"));
        // Boxes nested in a box that claims too little.
        let mut f = file;
        let at = f.windows(4).position(|w| w == b"trak").unwrap() - 4;
        f[at..at + 4].copy_from_slice(&16u32.to_be_bytes());
        assert!(!err(&f).is_empty());
    }
}
