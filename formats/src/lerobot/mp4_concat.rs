//! Appending MP4 files into one without re-encoding: what a merge does with
//! `merge.video_files_size_in_mb`, the operator's ask for fewer, larger video files. The
//! samples (packets) of consecutive files are concatenated: one `moov` whose sample tables
//! are the files' appended (`stts`, `ctts`, `stss`, `stsz`, `stsc`, chunk offsets moved to
//! the new `mdat`, `co64` once an offset passes 4 GiB), durations summed, and one `mdat`
//! streamed from the files' chunks, never read whole into memory.
//!
//! Files are appended only when their sample description (the `stsd` box, byte for byte:
//! codec, size and codec configuration), media timescale and edit list agree, their first
//! sample is a sync (key) frame and none of their samples is presented before their edit
//! starts; otherwise the caller starts a new file. A file of a layout
//! [`mp4_box`](super::mp4_box) does not edit is never a [`Part`]: the caller copies it as its
//! own file. Each file's kept samples are a prefix in decode order, as
//! [`mp4_trim`](super::mp4_trim) keeps them, so the cut of trailing dropped episodes still
//! applies.
//!
//! Time: each appended file starts (in decode and presentation time) where the one before
//! ends: after its last decoded sample and after its last presented one, whichever is later
//! (the previous file's last sample lasts longer when a trimmed file's kept reference frame
//! is presented past its last decoded one). That start, in the track's timescale, is the
//! shift of the file's episodes' `from_timestamp`/`to_timestamp`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::mp4_box::*;
use crate::DatasetError;

/// Most samples one appended file holds: its tables are held in memory while it grows
/// (about 20 bytes a sample); a file that would pass it starts a new one.
const MAX_GROUP_SAMPLES: usize = 1 << 20;
/// Largest `ftyp` box carried over.
const MAX_FTYP: u64 = 4096;

/// A video file read to be appended: what must agree for files to share an output, its
/// kept samples' tables and where their bytes lie.
pub struct Part {
    src: PathBuf,
    at: String,
    ftyp: Vec<u8>,
    moov: Vec<u8>,
    track: Track,
    stsd: Vec<u8>,
    /// `stsd` with its `btrt` figures zeroed: what must agree.
    signature: Vec<u8>,
    /// Where `btrt` payloads lie in `stsd`, and their figures (buffer size, maximum and
    /// average bit rate).
    btrt: Vec<(usize, [u32; 3])>,
    timescale: u32,
    movie_ts: u32,
    edit: Edit,
    sizes: Vec<u32>,
    stts: Vec<(u32, u32)>,
    /// Composition offsets, run-length (`None` without `ctts`).
    ctts: Option<Vec<(u32, i64)>>,
    /// Sync samples, 1-based (`None` without `stss`: every sample is one).
    sync: Option<Vec<u32>>,
    sdtp: Option<Vec<u8>>,
    /// The chunks of the kept samples, with their sample description index.
    chunks: Vec<(ChunkBytes, u32)>,
    /// Sum of the kept samples' decode deltas.
    decode_end: u64,
    /// Where their media ends (see [`media_end`]).
    media_end: u64,
    starts_with_sync: bool,
    /// Whether a sample is presented before the edit's start (hidden in its own file).
    hides_samples: bool,
    bytes: u64,
}

impl Part {
    /// Reads `src` (`at` names it in errors), keeping the samples presented before `cut`
    /// seconds (all without one). A well-formed file of a layout this does not append (see
    /// [`Movie::open`], the edit list), or whose cut keeps no sample, is `Ok(Err(why))`; a
    /// malformed one is [`DatasetError::Invalid`].
    pub fn read(
        src: &Path,
        cut: Option<f64>,
        at: &str,
    ) -> Result<Result<Part, String>, DatasetError> {
        let m = match Movie::open(src, at, false, true)? {
            Ok(m) => m,
            Err(why) => return Ok(Err(why)),
        };
        let timescale = timescale_of(&m.moov, &m.t.mdhd, at)?;
        let movie_ts = timescale_of(&m.moov, &m.t.mvhd, at)?;
        let edit = match edit_of(&m.moov, &m.t, at)? {
            Ok(e) => e,
            Err(why) => return Ok(Err(why)),
        };
        let total = m.s.sizes.len();
        let keep = cut.map_or(total, |c| kept_prefix(&m.s, edit, movie_ts, timescale, c));
        if keep == 0 {
            return Ok(Err(match cut {
                Some(c) => format!("no sample is presented before {c} s"),
                None => "a track without samples".into(),
            }));
        }
        let tkhd = full(&m.moov, &m.t.tkhd, 20, at)?;
        if tkhd.version == 1 && tkhd.body.len() < 32 {
            return Err(DatasetError::invalid(at, "tkhd is cut short"));
        }
        let ftyp_box = m.top[0];
        if ftyp_box.size > MAX_FTYP {
            return Ok(Err(format!("an ftyp of {} bytes", ftyp_box.size)));
        }
        let mut ftyp = Vec::new();
        copy_range(&m.file, &mut ftyp, ftyp_box.start, ftyp_box.size, src)?;
        let stsd_box = one(&m.stbl_children, b"stsd", "stbl", at)?;
        let stsd = m.moov[stsd_box.start as usize..stsd_box.end() as usize].to_vec();
        let btrt = bit_rates(&stsd, stsd_box.header);
        let mut signature = stsd.clone();
        for (at, _) in &btrt {
            signature[*at..*at + 12].fill(0);
        }
        let sync = match find(&m.stbl_children, b"stss").as_slice() {
            [] => None,
            [b] => {
                let (_, _, e) = table(&m.moov, b, 0, 4, at)?;
                Some(
                    e.chunks_exact(4)
                        .map(|x| u32_at(x, 0))
                        .filter(|i| (1..=keep as u64).contains(&u64::from(*i)))
                        .collect::<Vec<u32>>(),
                )
            }
            _ => return Err(DatasetError::invalid(at, "stbl holds several stss boxes")),
        };
        let starts_with_sync = sync.as_ref().is_none_or(|s| s.first() == Some(&1));
        let sdtp = match find(&m.stbl_children, b"sdtp").as_slice() {
            [] => None,
            [b] => {
                let p = &m.moov[(b.start + b.header + 4) as usize..b.end() as usize];
                if p.len() < total {
                    return Err(DatasetError::invalid(
                        at,
                        "sdtp holds fewer bytes than samples",
                    ));
                }
                Some(p[..keep].to_vec())
            }
            _ => return Ok(Err("several sdtp boxes".into())),
        };
        let has_ctts = !find(&m.stbl_children, b"ctts").is_empty();
        let offsets = &m.s.offsets[..keep];
        let ctts = has_ctts.then(|| {
            let mut rs: Vec<(u32, i64)> = Vec::new();
            for o in offsets {
                match rs.last_mut() {
                    Some((n, x)) if x == o => *n += 1,
                    _ => rs.push((1, *o)),
                }
            }
            rs
        });
        let mut dts = 0i128;
        let mut hides_samples = false;
        for (d, o) in m.s.deltas[..keep].iter().zip(offsets) {
            hides_samples |= dts + i128::from(*o) < i128::from(edit.media_time);
            dts += i128::from(*d);
        }
        let decode_end = u64::try_from(dts).unwrap_or(u64::MAX);
        let media_end = media_end(&m.s, keep);
        let kept = kept_chunks(&m, keep, at)?;
        // The sample description of each chunk, from stsc.
        let mut chunks = Vec::with_capacity(kept.len());
        let mut entry = 0usize;
        for (i, c) in kept.into_iter().enumerate() {
            let n = i as u64 + 1;
            while m.s.stsc.get(entry + 1).is_some_and(|e| u64::from(e.0) <= n) {
                entry += 1;
            }
            let sdi = m.s.stsc.get(entry).map_or(1, |e| e.2);
            chunks.push((c, sdi));
        }
        let bytes = chunks.iter().map(|(c, _)| c.len).sum();
        let mut sizes = m.s.sizes;
        sizes.truncate(keep);
        Ok(Ok(Part {
            src: src.to_path_buf(),
            at: at.to_string(),
            ftyp,
            stsd,
            signature,
            btrt,
            timescale,
            movie_ts,
            edit,
            sizes,
            stts: run_length(m.s.deltas[..keep].iter().copied()),
            ctts,
            sync,
            sdtp,
            chunks,
            decode_end,
            media_end,
            starts_with_sync,
            hides_samples,
            bytes,
            moov: m.moov,
            track: m.t,
        }))
    }

    /// Where the next file appended after this one starts, relative to this one's start:
    /// after its last decoded sample and its last presented one.
    fn next_start(&self) -> u64 {
        let presented = self
            .media_end
            .saturating_sub(u64::try_from(self.edit.media_time).unwrap_or(0));
        self.decode_end.max(presented)
    }
}

/// Files appended into one, in order; written by [`Group::write`].
pub struct Group {
    /// The first file: its `ftyp`, `moov` (every box but the sample tables and durations
    /// comes from it), sample description, timescales and edit list.
    first: Part,
    /// The files whose chunks the output holds, in order.
    sources: Vec<(PathBuf, String)>,
    sizes: Vec<u32>,
    stts: Vec<(u32, u32)>,
    ctts: Option<Vec<(u32, i64)>>,
    sync: Option<Vec<u32>>,
    sdtp: Option<Vec<u8>>,
    /// (source, bytes, sample description index) per chunk.
    chunks: Vec<(usize, ChunkBytes, u32)>,
    /// Decode time where the samples so far end, and where the next file starts.
    decode_end: u64,
    next_start: u64,
    media_end: u64,
    bytes: u64,
    /// Per `btrt` of the sample description: the largest buffer size and maximum bit rate
    /// of the files.
    btrt: Vec<[u32; 2]>,
}

impl Group {
    /// A group of `part` alone.
    pub fn start(mut part: Part) -> Group {
        let sources = vec![(part.src.clone(), part.at.clone())];
        let chunks = std::mem::take(&mut part.chunks)
            .into_iter()
            .map(|(c, sdi)| (0, c, sdi))
            .collect();
        Group {
            sources,
            sizes: std::mem::take(&mut part.sizes),
            stts: std::mem::take(&mut part.stts),
            ctts: part.ctts.take(),
            sync: part.sync.take(),
            sdtp: part.sdtp.take(),
            chunks,
            decode_end: part.decode_end,
            next_start: part.next_start(),
            media_end: part.media_end,
            bytes: part.bytes,
            btrt: part.btrt.iter().map(|(_, b)| [b[0], b[1]]).collect(),
            first: part,
        }
    }

    /// How many files it holds.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// The media timescale its shifts count in.
    pub fn timescale(&self) -> u32 {
        self.first.timescale
    }

    /// Why `part` cannot be appended (`None` when it can) while the output stays under
    /// `limit` bytes.
    pub fn refuses(&self, part: &Part, limit: u64) -> Option<String> {
        let f = &self.first;
        if part.signature != f.signature {
            return Some(
                "its sample description (stsd: codec, size or codec configuration) differs".into(),
            );
        }
        if part.timescale != f.timescale {
            return Some(format!(
                "its timescale {} differs from {}",
                part.timescale, f.timescale
            ));
        }
        if part.edit != f.edit || f.edit.empty != 0 {
            return Some("its edit list differs or delays the start".into());
        }
        if !part.starts_with_sync || part.hides_samples {
            return Some("it does not start with a sync sample presented at its start".into());
        }
        if self.sizes.len() + part.sizes.len() > MAX_GROUP_SAMPLES {
            return Some(format!("over {MAX_GROUP_SAMPLES} samples"));
        }
        // Durations must fit the boxes that hold them, and the delta stretched to the next
        // start a u32.
        let start = self.next_start;
        let gap = start - self.decode_end;
        let last_delta = self.stts.last().map_or(0, |r| r.1);
        let media = start.checked_add(part.media_end);
        let fits = match media {
            Some(m) => self.durations_fit(m) && u64::from(last_delta) + gap <= u64::from(u32::MAX),
            None => false,
        };
        if !fits {
            return Some("the durations would overflow their fields".into());
        }
        let size = self.size_bound(Some(part));
        if size >= limit {
            return Some(format!(
                "{size} bytes would reach the size of {limit} bytes"
            ));
        }
        None
    }

    /// Appends `part` (after [`Group::refuses`] said none); returns where it starts, in the
    /// timescale's ticks: the shift of its episodes' timestamps.
    pub fn append(&mut self, mut part: Part) -> u64 {
        let start = self.next_start;
        let gap = start - self.decode_end;
        if gap > 0
            && let Some((n, d)) = self.stts.last_mut()
        {
            // The last sample lasts until the appended file starts.
            let stretched = (*d as u64 + gap) as u32;
            if *n == 1 {
                *d = stretched;
            } else {
                *n -= 1;
                self.stts.push((1, stretched));
            }
        }
        let before = self.sizes.len() as u32;
        let src = self.sources.len();
        self.sources.push((part.src.clone(), part.at.clone()));
        // Tables one file has and another lacks: no ctts is offsets of 0, no stss every
        // sample a sync one, sdtp kept only while every file has it.
        let pad_ctts = |c: &mut Vec<(u32, i64)>, n: u32| {
            if n > 0 {
                c.push((n, 0));
            }
        };
        match (&mut self.ctts, part.ctts.take()) {
            (Some(c), Some(p)) => c.extend(p),
            (Some(c), None) => pad_ctts(c, part.sizes.len() as u32),
            (None, Some(p)) => {
                let mut c = Vec::new();
                pad_ctts(&mut c, before);
                c.extend(p);
                self.ctts = Some(c);
            }
            (None, None) => {}
        }
        match (&mut self.sync, part.sync.take()) {
            (Some(s), Some(p)) => s.extend(p.into_iter().map(|i| i + before)),
            (Some(s), None) => s.extend((1..=part.sizes.len() as u32).map(|i| i + before)),
            (None, Some(p)) => {
                let mut s: Vec<u32> = (1..=before).collect();
                s.extend(p.into_iter().map(|i| i + before));
                self.sync = Some(s);
            }
            (None, None) => {}
        }
        self.sdtp = match (self.sdtp.take(), part.sdtp.take()) {
            (Some(mut s), Some(p)) => {
                s.extend(p);
                Some(s)
            }
            _ => None,
        };
        self.stts.extend(std::mem::take(&mut part.stts));
        self.sizes.extend(std::mem::take(&mut part.sizes));
        self.chunks.extend(
            std::mem::take(&mut part.chunks)
                .into_iter()
                .map(|(c, sdi)| (src, c, sdi)),
        );
        self.decode_end = start + part.decode_end;
        self.media_end = start + part.media_end;
        self.next_start = start + part.next_start();
        self.bytes += part.bytes;
        for (g, (_, b)) in self.btrt.iter_mut().zip(&part.btrt) {
            g[0] = g[0].max(b[0]);
            g[1] = g[1].max(b[1]);
        }
        start
    }

    /// The first file's sample description, its `btrt` figures those of the whole output:
    /// the largest buffer size and maximum bit rate of the files, the average bit rate of
    /// all the bytes over the whole duration.
    fn stsd(&self) -> Vec<u8> {
        let mut stsd = self.first.stsd.clone();
        let secs = self.media_end as f64 / f64::from(self.first.timescale);
        let avg = if secs > 0.0 {
            (self.bytes as f64 * 8.0 / secs).min(f64::from(u32::MAX)) as u32
        } else {
            0
        };
        for ((at, _), g) in self.first.btrt.iter().zip(&self.btrt) {
            for (i, v) in [g[0], g[1], avg].into_iter().enumerate() {
                stsd[at + 4 * i..at + 4 * i + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        stsd
    }

    fn version_of(&self, b: &BoxAt) -> u8 {
        // Read with the box's fields checked (Part::read), so the byte is there.
        self.first
            .moov
            .get((b.start + b.header) as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Whether a media duration of `media` and the presentation it makes fit `mdhd`,
    /// `tkhd`, `mvhd` and `elst` in their versions.
    fn durations_fit(&self, media: u64) -> bool {
        let t = &self.first.track;
        let movie = self.movie_duration(media);
        let max = u64::from(u32::MAX);
        (self.version_of(&t.mdhd) == 1 || media <= max)
            && [Some(t.tkhd), Some(t.mvhd), t.elst]
                .into_iter()
                .flatten()
                .all(|b| self.version_of(&b) == 1 || movie <= max)
    }

    /// The presentation of a media duration of `media`, in the movie timescale (rounded).
    fn movie_duration(&self, media: u64) -> u64 {
        let f = &self.first;
        let presented = media.saturating_sub(u64::try_from(f.edit.media_time).unwrap_or(0));
        let scaled = (u128::from(presented) * u128::from(f.movie_ts) + u128::from(f.timescale) / 2)
            / u128::from(f.timescale);
        u64::try_from(scaled).unwrap_or(u64::MAX)
    }

    /// At least the size of the output, with `part` appended: the first file's `ftyp` and
    /// `moov` less its sample tables, the tables at their largest (each file's runs and
    /// entries apart, 64-bit chunk offsets), a 64-bit `mdat` header and every kept byte.
    fn size_bound(&self, part: Option<&Part>) -> u64 {
        let p = |f: fn(&Part) -> usize| part.map_or(0, f) as u64;
        let f = &self.first;
        let stbl_old = f.track.stbl.size;
        let samples = self.sizes.len() as u64 + p(|x| x.sizes.len());
        let mut tables = 8 + f.stsd.len() as u64;
        tables += 16 + 8 * (self.stts.len() as u64 + p(|x| x.stts.len()) + 1);
        if self.ctts.is_some() || part.is_some_and(|x| x.ctts.is_some()) {
            let runs = self.ctts.as_ref().map_or(1, Vec::len) as u64
                + part.map_or(1, |x| x.ctts.as_ref().map_or(1, Vec::len)) as u64;
            tables += 16 + 8 * runs;
        }
        if self.sync.is_some() || part.is_some_and(|x| x.sync.is_some()) {
            tables += 16 + 4 * samples;
        }
        let chunks = self.chunks.len() as u64 + p(|x| x.chunks.len());
        tables += 16 + 12 * chunks;
        tables += 20 + 4 * samples;
        tables += 16 + 8 * chunks;
        if self.sdtp.is_some() {
            tables += 12 + samples;
        }
        let moov = f.moov.len() as u64 - stbl_old + tables;
        f.ftyp.len() as u64 + moov + 16 + self.bytes + part.map_or(0, |x| x.bytes)
    }

    /// The sample tables' box (`stbl`), chunk offsets counted from `base` (where the
    /// `mdat` payload starts), in 64 bits with `co64`.
    fn stbl(&self, base: u64, co64: bool) -> Vec<u8> {
        let mut out = self.stsd();
        let mut body = vec![0u8; 4];
        body.extend((self.stts.len() as u32).to_be_bytes());
        for (n, d) in &self.stts {
            body.extend(n.to_be_bytes());
            body.extend(d.to_be_bytes());
        }
        push_box(&mut out, b"stts", &body);
        if let Some(sync) = &self.sync {
            let mut body = vec![0u8; 4];
            body.extend((sync.len() as u32).to_be_bytes());
            sync.iter().for_each(|i| body.extend(i.to_be_bytes()));
            push_box(&mut out, b"stss", &body);
        }
        if let Some(ctts) = &self.ctts {
            let v1 = ctts.iter().any(|(_, o)| *o < 0);
            let mut body = vec![u8::from(v1), 0, 0, 0];
            body.extend((ctts.len() as u32).to_be_bytes());
            for (n, o) in ctts {
                body.extend(n.to_be_bytes());
                body.extend((*o as u32).to_be_bytes());
            }
            push_box(&mut out, b"ctts", &body);
        }
        let mut stsc: Vec<(u32, u32, u32)> = Vec::new();
        for (i, (_, c, sdi)) in self.chunks.iter().enumerate() {
            if stsc.last().is_none_or(|l| (l.1, l.2) != (c.samples, *sdi)) {
                stsc.push((i as u32 + 1, c.samples, *sdi));
            }
        }
        let mut body = vec![0u8; 4];
        body.extend((stsc.len() as u32).to_be_bytes());
        for (a, b, c) in stsc {
            body.extend(a.to_be_bytes());
            body.extend(b.to_be_bytes());
            body.extend(c.to_be_bytes());
        }
        push_box(&mut out, b"stsc", &body);
        let mut body = vec![0u8; 8];
        body.extend((self.sizes.len() as u32).to_be_bytes());
        self.sizes.iter().for_each(|s| body.extend(s.to_be_bytes()));
        push_box(&mut out, b"stsz", &body);
        let mut body = vec![0u8; 4];
        body.extend((self.chunks.len() as u32).to_be_bytes());
        let mut at = base;
        for (_, c, _) in &self.chunks {
            if co64 {
                body.extend(at.to_be_bytes());
            } else {
                body.extend((at as u32).to_be_bytes());
            }
            at += c.len;
        }
        push_box(&mut out, if co64 { b"co64" } else { b"stco" }, &body);
        if let Some(sdtp) = &self.sdtp {
            let mut body = vec![0u8; 4];
            body.extend(sdtp);
            push_box(&mut out, b"sdtp", &body);
        }
        let mut stbl = Vec::new();
        push_box(&mut stbl, b"stbl", &out);
        stbl
    }

    /// The `moov`: the first file's, its sample tables and durations replaced.
    fn moov(&self, base: u64, co64: bool) -> Result<Vec<u8>, DatasetError> {
        let f = &self.first;
        let t = &f.track;
        let stbl = self.stbl(base, co64);
        let media = self.media_end;
        let movie = self.movie_duration(media);
        let edit = |b: &BoxAt| -> Option<Vec<u8>> {
            let raw = &f.moov[b.start as usize..b.end() as usize];
            if b.start == t.stbl.start {
                Some(stbl[8..].to_vec())
            } else if b.start == t.mdhd.start {
                Some(set_duration(raw, b.header, 12, 20, media))
            } else if b.start == t.tkhd.start {
                Some(set_duration(raw, b.header, 16, 24, movie))
            } else if b.start == t.mvhd.start {
                Some(set_duration(raw, b.header, 12, 20, movie))
            } else if t.elst.is_some_and(|e| e.start == b.start) {
                Some(set_edit_duration(raw, b.header, movie))
            } else {
                None
            }
        };
        rebuild_moov(&f.moov, &edit, &f.at)
    }

    /// Writes the appended file at `dst` (`ftyp`, `moov`, `mdat`), streaming each file's
    /// kept chunks; returns its size.
    pub fn write(&self, dst: &Path) -> Result<u64, DatasetError> {
        let f = &self.first;
        // The moov's length does not depend on the offsets' values, only their width.
        let ftyp = f.ftyp.len() as u64;
        let probe = self.moov(0, false)?;
        let payload = self.bytes;
        let co64 = ftyp + probe.len() as u64 + 16 + payload > u64::from(u32::MAX);
        let moov_len = if co64 {
            self.moov(0, true)?.len() as u64
        } else {
            probe.len() as u64
        };
        let big_mdat = payload + 8 > u64::from(u32::MAX);
        let header = if big_mdat { 16 } else { 8 };
        let base = ftyp + moov_len + header;
        let moov = self.moov(base, co64)?;
        debug_assert_eq!(moov.len() as u64, moov_len);

        let werr = || DatasetError::io("write", dst);
        let mut out = std::io::BufWriter::new(
            File::create_new(dst).map_err(DatasetError::io("create", dst))?,
        );
        out.write_all(&f.ftyp).map_err(werr())?;
        out.write_all(&moov).map_err(werr())?;
        if big_mdat {
            out.write_all(&1u32.to_be_bytes()).map_err(werr())?;
            out.write_all(b"mdat").map_err(werr())?;
            out.write_all(&(payload + 16).to_be_bytes())
                .map_err(werr())?;
        } else {
            out.write_all(&((payload + 8) as u32).to_be_bytes())
                .map_err(werr())?;
            out.write_all(b"mdat").map_err(werr())?;
        }
        // Chunk by chunk, runs of chunks lying back to back in their file in one copy.
        let mut i = 0;
        while i < self.chunks.len() {
            let src = self.chunks[i].0;
            let (path, _) = &self.sources[src];
            let file = File::open(path).map_err(DatasetError::io("open", path))?;
            while i < self.chunks.len() && self.chunks[i].0 == src {
                let (from, mut len) = (self.chunks[i].1.offset, self.chunks[i].1.len);
                i += 1;
                while i < self.chunks.len()
                    && self.chunks[i].0 == src
                    && self.chunks[i].1.offset == from + len
                {
                    len += self.chunks[i].1.len;
                    i += 1;
                }
                copy_range(&file, &mut out, from, len, path)?;
            }
        }
        out.flush().map_err(werr())?;
        Ok(ftyp + moov_len + header + payload)
    }
}

/// The `btrt` boxes of the sample entries of `stsd` (a whole box): where their 12-byte
/// payloads lie in it and their figures. A sample description laid out otherwise gives
/// none: its files are then appended only when their `stsd` bytes are equal.
fn bit_rates(stsd: &[u8], header: u64) -> Vec<(usize, [u32; 3])> {
    let mut out = Vec::new();
    // stsd: its header, version and flags, entry count; entries are boxes whose children
    // follow a visual sample entry's 78 bytes of fields.
    let Ok(entries) = children(stsd, header + 8, stsd.len() as u64, "stsd") else {
        return out;
    };
    for e in entries {
        let from = e.start + e.header + 78;
        if from >= e.end() {
            continue;
        }
        let Ok(kids) = children(stsd, from, e.end(), "stsd") else {
            continue;
        };
        for b in kids {
            if &b.typ == b"btrt" && b.size == b.header + 12 {
                let at = (b.start + b.header) as usize;
                let v = |i: usize| u32_at(stsd, at + 4 * i);
                out.push((at, [v(0), v(1), v(2)]));
            }
        }
    }
    out
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

    /// A one-track movie, `moov` first, timescale 1000 (movie 100), samples of 100 ticks two
    /// to a chunk: per sample its size and composition offset; `sync` the stss entries
    /// (none: no stss); `media_time` the edit's start; `tag` a byte of the sample entry.
    /// Its payload bytes count up from `seed`.
    fn mp4(
        samples: &[(u32, i32)],
        sync: Option<&[u32]>,
        media_time: u32,
        tag: u8,
        seed: u8,
    ) -> (Vec<u8>, Vec<u8>) {
        let ftyp = bx(b"ftyp", b"isom\0\0\0\0");
        let total: u32 = samples.iter().map(|s| s.0).sum();
        let payload: Vec<u8> = (0..total).map(|i| (i as u8).wrapping_add(seed)).collect();
        let n = samples.len() as u32;
        let chunks = n.div_ceil(2);
        let moov_for = |base: u32| {
            let mut offs = Vec::new();
            let mut at = base;
            for c in samples.chunks(2) {
                offs.push(at);
                at += c.iter().map(|s| s.0).sum::<u32>();
            }
            let entry = bx(
                b"av01",
                &[vec![tag; 78], bx(b"btrt", &be(&[1, 2, 3]))].concat(),
            );
            let mut stbl = vec![
                fullbx(b"stsd", &[be(&[1]), entry].concat()),
                fullbx(b"stts", &be(&[1, n, 100])),
            ];
            if let Some(s) = sync {
                stbl.push(fullbx(b"stss", &[be(&[s.len() as u32]), be(s)].concat()));
            }
            if samples.iter().any(|s| s.1 != 0) {
                let mut e = vec![n];
                for s in samples {
                    e.extend([1, s.1 as u32]);
                }
                stbl.push(fullbx(b"ctts", &be(&e)));
            }
            let stsc = if n % 2 == 1 && chunks > 1 {
                be(&[2, 1, 2, 1, chunks, 1, 1])
            } else {
                be(&[1, 1, n.min(2), 1])
            };
            stbl.push(fullbx(b"stsc", &stsc));
            let sizes: Vec<u32> = samples.iter().map(|s| s.0).collect();
            stbl.push(fullbx(b"stsz", &[be(&[0, n]), be(&sizes)].concat()));
            stbl.push(fullbx(b"stco", &[be(&[chunks]), be(&offs)].concat()));
            let stbl = bx(b"stbl", &stbl.concat());
            let mdhd = fullbx(b"mdhd", &[be(&[0, 0, 1000, n * 100]), vec![0; 4]].concat());
            let mdia = bx(b"mdia", &[mdhd, bx(b"minf", &stbl)].concat());
            let tkhd = fullbx(b"tkhd", &[be(&[0, 0, 1, 0, n * 10]), vec![0; 60]].concat());
            let elst = fullbx(b"elst", &be(&[1, n * 10, media_time, 0x10000]));
            let trak = bx(b"trak", &[tkhd, bx(b"edts", &elst), mdia].concat());
            let mvhd = fullbx(b"mvhd", &[be(&[0, 0, 100, n * 10]), vec![0; 80]].concat());
            bx(b"moov", &[mvhd, trak].concat())
        };
        let len = moov_for(0).len() as u32;
        let base = ftyp.len() as u32 + len + 8;
        let file = [ftyp, moov_for(base), bx(b"mdat", &payload)].concat();
        (file, payload)
    }

    fn part(dir: &Path, name: &str, file: &[u8], cut: Option<f64>) -> Part {
        let p = dir.join(name);
        std::fs::write(&p, file).unwrap();
        Part::read(&p, cut, name).unwrap().unwrap()
    }

    /// The written file's tables, presentation times (decode time + offset - edit start,
    /// in decode order) and the payload each chunk offset points at.
    fn read(path: &Path) -> (Movie, Vec<i64>) {
        let m = Movie::open(path, "out", false, true).unwrap().unwrap();
        let edit = edit_of(&m.moov, &m.t, "out").unwrap().unwrap();
        let mut dts = 0i64;
        let mut pts = Vec::new();
        for (d, o) in m.s.deltas.iter().zip(&m.s.offsets) {
            pts.push(dts + o - edit.media_time);
            dts += i64::from(*d);
        }
        (m, pts)
    }

    fn duration(m: &Movie, b: &BoxAt, at: usize) -> u32 {
        u32_at(full(&m.moov, b, 20, "out").unwrap().body, at)
    }

    #[test]
    fn appends_tables_and_moves_the_chunk_offsets() {
        let t = tempfile::tempdir().unwrap();
        let a_s = [(10, 0), (11, 0), (12, 0), (13, 0), (14, 0)];
        let (a, pa) = mp4(&a_s, Some(&[1, 3, 5]), 0, 7, 0);
        let (b, pb) = mp4(&[(20, 0), (21, 0), (22, 0)], None, 0, 7, 100);
        let mut g = Group::start(part(t.path(), "a.mp4", &a, None));
        let pb_part = part(t.path(), "b.mp4", &b, None);
        assert_eq!(g.refuses(&pb_part, 1 << 20), None);
        assert_eq!(g.append(pb_part), 500);
        assert_eq!(g.len(), 2);
        let dst = t.path().join("out.mp4");
        let written = g.write(&dst).unwrap();
        let bytes = std::fs::read(&dst).unwrap();
        assert_eq!(written, bytes.len() as u64);
        assert!(written < g.size_bound(None));
        let (m, pts) = read(&dst);
        assert_eq!(m.s.sizes, vec![10, 11, 12, 13, 14, 20, 21, 22]);
        assert_eq!(m.s.deltas, vec![100; 8]);
        assert_eq!(pts, (0..8).map(|i| i * 100).collect::<Vec<i64>>());
        // stss: a's entries, then b's samples (no stss: all sync) moved after a's.
        let stss = one(&m.stbl_children, b"stss", "stbl", "out").unwrap();
        let (_, _, e) = table(&m.moov, &stss, 0, 4, "out").unwrap();
        let sync: Vec<u32> = e.chunks_exact(4).map(|x| u32_at(x, 0)).collect();
        assert_eq!(sync, vec![1, 3, 5, 6, 7, 8]);
        // Chunks: a's 2, 2, 1 then b's 2, 1; each offset at its bytes.
        assert_eq!(m.chunks, vec![2, 2, 1, 2, 1]);
        let want: Vec<&[u8]> = vec![
            &pa[0..21],
            &pa[21..46],
            &pa[46..60],
            &pb[0..41],
            &pb[41..63],
        ];
        for ((off, w), n) in m.s.chunk_offsets.iter().zip(want).zip([21, 25, 14, 41, 22]) {
            assert_eq!(&bytes[*off as usize..*off as usize + n], w);
        }
        // Durations summed: media 800 ticks, presentation 80 in the movie's 100.
        assert_eq!(duration(&m, &m.t.mdhd, 12), 800);
        assert_eq!(duration(&m, &m.t.tkhd, 16), 80);
        assert_eq!(duration(&m, &m.t.mvhd, 12), 80);
        // btrt: the largest buffer and maximum rate, the average over all the bytes.
        let stsd = one(&m.stbl_children, b"stsd", "stbl", "out").unwrap();
        let raw = &m.moov[stsd.start as usize..stsd.end() as usize];
        let (at, rates) = bit_rates(raw, 8)[0];
        assert_eq!(rates, [1, 2, (123 * 8 * 10 / 8) as u32]);
        assert!(at > 0);
    }

    #[test]
    fn a_cut_b_frame_file_is_followed_after_its_last_presented_frame() {
        let t = tempfile::tempdir().unwrap();
        // Decode order I0 P3 B1 B2 I4 (presented 0, 3, 1, 2, 4), edit from 100.
        let s = [(10, 100), (11, 300), (12, 0), (13, 0), (14, 100)];
        let (a, _) = mp4(&s, Some(&[1, 5]), 100, 7, 0);
        // Cut at 0.15 s: I0 P3 B1 kept (B1 at 0.1 s needs P3, presented at 0.3 s).
        let pa = part(t.path(), "a.mp4", &a, Some(0.15));
        assert_eq!(pa.sizes, vec![10, 11, 12]);
        let mut g = Group::start(pa);
        let (b, _) = mp4(&[(20, 100), (21, 100)], None, 100, 7, 9);
        let pb = part(t.path(), "b.mp4", &b, None);
        assert_eq!(g.refuses(&pb, 1 << 20), None);
        // a's three samples decode over 300 ticks, but P3 is presented until 400.
        assert_eq!(g.append(pb), 400);
        let dst = t.path().join("out.mp4");
        g.write(&dst).unwrap();
        let (m, pts) = read(&dst);
        assert_eq!(m.s.deltas, vec![100, 100, 200, 100, 100]);
        assert_eq!(pts, vec![0, 300, 100, 400, 500]);
        assert_eq!(duration(&m, &m.t.mdhd, 12), 700);
        assert_eq!(duration(&m, &m.t.mvhd, 12), 60);
    }

    #[test]
    fn what_differs_or_does_not_fit_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let s = [(10, 0), (11, 0)];
        let (a, _) = mp4(&s, None, 0, 7, 0);
        let g = Group::start(part(t.path(), "a.mp4", &a, None));
        let refused = |file: &[u8], limit: u64| {
            let p = part(t.path(), "b.mp4", file, None);
            g.refuses(&p, limit).unwrap_or_default()
        };
        assert_eq!(refused(&mp4(&s, None, 0, 7, 0).0, 1 << 20), "");
        assert!(refused(&mp4(&s, None, 0, 8, 0).0, 1 << 20).contains("stsd"));
        assert!(refused(&mp4(&s, None, 100, 7, 0).0, 1 << 20).contains("edit list"));
        assert!(refused(&mp4(&s, Some(&[2]), 0, 7, 0).0, 1 << 20).contains("sync"));
        let mut other_ts = mp4(&s, None, 0, 7, 0).0;
        let at = other_ts.windows(4).position(|w| w == b"mdhd").unwrap() + 16;
        other_ts[at..at + 4].copy_from_slice(&500u32.to_be_bytes());
        assert!(refused(&other_ts, 1 << 20).contains("timescale"));
        // The size: what both would take, and a byte less than the bound.
        let b = mp4(&s, None, 0, 7, 0).0;
        let bound = g.size_bound(Some(&part(t.path(), "b.mp4", &b, None)));
        assert_eq!(refused(&b, bound + 1), "");
        assert!(refused(&b, bound).contains("would reach"));
    }

    #[test]
    fn chunk_offsets_past_4_gib_are_written_in_64_bits() {
        let t = tempfile::tempdir().unwrap();
        let (a, _) = mp4(&[(10, 0), (11, 0), (12, 0)], None, 0, 7, 0);
        let g = Group::start(part(t.path(), "a.mp4", &a, None));
        let base = 5u64 << 30;
        let stbl = g.stbl(base, true);
        let kids = children(&stbl, 8, stbl.len() as u64, "stbl").unwrap();
        let co64 = one(&kids, b"co64", "stbl", "stbl").unwrap();
        let (_, n, e) = table(&stbl, &co64, 0, 8, "stbl").unwrap();
        assert_eq!(n, 2);
        assert_eq!((u64_at(e, 0), u64_at(e, 8)), (base, base + 21));
        assert!(find(&kids, b"stco").is_empty());
    }
}
