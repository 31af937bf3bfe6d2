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
use std::io::Write;
use std::path::Path;

use super::mp4_box::*;
use crate::DatasetError;

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

/// Checks a video file without decoding it: one video track (other tracks, such as audio,
/// are left alone); its sample tables consistent (every table covering the same samples, the
/// chunks holding them all); its first sample a sync (key) frame; every sample's bytes inside
/// its `mdat` (a file cut short is read up to its end, and samples past it are reported). A
/// file that cannot be parsed at all is [`DatasetError::Invalid`]; a fragmented one is
/// [`Probe::NotChecked`].
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
    // Every sample's bytes must lie inside mdat: the first one outside is reported, with how
    // many are.
    let len = m.top.last().map_or(0, BoxAt::end);
    let (data_from, data_to) = (m.mdat.start + m.mdat.header, m.mdat.end());
    let (mut first_out, mut out_count) = (None, 0u64);
    let mut sample = 0usize;
    for (&k, &off) in m.chunks.iter().zip(&m.s.chunk_offsets) {
        let mut p = off;
        for _ in 0..k {
            let size = u64::from(m.s.sizes[sample]);
            let end = p.saturating_add(size);
            if p < data_from || end > data_to {
                out_count += 1;
                first_out.get_or_insert((sample, p, end));
            }
            p = end;
            sample += 1;
        }
    }
    let outside = first_out.is_some();
    if let Some((i, a, b)) = first_out {
        let end = match m.truncated {
            Some(claimed) if m.mdat.end() == len && b > len => format!(
                ", past the file's end at byte {len} (mdat claims to end at byte {claimed}): the file is truncated"
            ),
            _ => String::new(),
        };
        let which = match i {
            0 => format!("first sample (sample 1, {} bytes", b - a),
            i if i + 1 == n => format!("last sample (sample {n}, {} bytes", b - a),
            i => format!("sample {} ({} bytes", i + 1, b - a),
        };
        let more = match out_count {
            1 => String::new(),
            c => format!("; {c} of its {n} samples do"),
        };
        problems.push(format!(
            "its {which} at byte {a}) lies outside mdat (bytes {data_from}..{data_to}){end}{more}"
        ));
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

/// Writes `src` with the samples presented from `cut` seconds on dropped (the prefix in
/// decode order up to the last sample presented before `cut`) to `dst`; `at` names `src` in
/// errors.
pub fn trim(src: &Path, dst: &Path, cut: f64, at: &str) -> Result<Trimmed, DatasetError> {
    let m = match Movie::open(src, at, false, true)? {
        Ok(m) => m,
        Err(why) => return Ok(Trimmed::Unsupported(why)),
    };
    let (top, moov_box, mdat, moov, t, stbl_children, s) = (
        &m.top,
        m.moov_box,
        m.mdat,
        &m.moov,
        &m.t,
        &m.stbl_children,
        &m.s,
    );

    // Time: media timescale, edit list.
    let timescale = timescale_of(moov, &t.mdhd, at)?;
    let movie_ts = timescale_of(moov, &t.mvhd, at)?;
    let edit = match edit_of(moov, t, at)? {
        Ok(e) => e,
        Err(why) => return Ok(Trimmed::Unsupported(why)),
    };
    let (media_time, empty_dur) = (edit.media_time, edit.empty);

    // Kept: decode-order prefix up to the last sample presented before the cut.
    let keep = kept_prefix(s, edit, movie_ts, timescale, cut);
    let total = s.sizes.len();
    if keep == total {
        return Ok(Trimmed::Whole);
    }
    if keep == 0 {
        return Ok(Trimmed::Unsupported(format!(
            "no sample is presented before {cut} s"
        )));
    }
    let media_dur = media_end(s, keep);

    // The kept samples' bytes: where the last one ends, all inside mdat.
    let data_from = mdat.start + mdat.header;
    let kept = kept_chunks(&m, keep, at)?;
    let end = kept
        .iter()
        .filter(|c| c.samples > 0)
        .map(|c| c.offset + c.len)
        .fold(data_from, u64::max);
    let n_chunks = kept.len();
    let kept_in_last = kept.last().map_or(0, |c| c.samples);

    // New sample tables.
    let new_stbl = |moov_delta: i64| -> Result<Result<Vec<u8>, String>, DatasetError> {
        let mut out = Vec::new();
        for b in stbl_children {
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
                    let rs = run_length(vals);
                    body.extend((rs.len() as u32).to_be_bytes());
                    for (n, v) in rs {
                        body.extend(n.to_be_bytes());
                        body.extend(v.to_be_bytes());
                    }
                }
                b"stss" => {
                    let (_, _, e) = table(moov, b, 0, 4, at)?;
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
    let tkhd_full = full(moov, &t.tkhd, 20, at)?;
    if tkhd_full.version == 1 && tkhd_full.body.len() < 32 {
        return Err(DatasetError::invalid(at, "tkhd is cut short"));
    }
    let build = |moov_delta: i64| -> Result<Result<Vec<u8>, String>, DatasetError> {
        let stbl = match new_stbl(moov_delta)? {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let edit = |b: &BoxAt| -> Option<Vec<u8>> {
            let raw = &moov[b.start as usize..b.end() as usize];
            if b.start == t.stbl.start {
                Some(stbl.clone())
            } else if b.start == t.mdhd.start {
                Some(set_duration(raw, b.header, 12, 20, media_dur))
            } else if b.start == t.tkhd.start {
                Some(set_duration(raw, b.header, 16, 24, movie_dur))
            } else if b.start == t.mvhd.start {
                Some(set_duration(raw, b.header, 12, 20, movie_dur))
            } else if t.elst.is_some_and(|e| e.start == b.start) {
                Some(set_edit_duration(raw, b.header, scaled))
            } else {
                None
            }
        };
        Ok(Ok(rebuild_moov(moov, &edit, at)?))
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
    for b in top {
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
            copy_range(&m.file, &mut out, data_from, payload, src)?;
            written += size;
        } else {
            copy_range(&m.file, &mut out, b.start, b.size, src)?;
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
        let t = locate(&moov, "out", false).unwrap().unwrap();
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
