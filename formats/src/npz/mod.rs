//! The `npz` format: one `.npz` archive (a zip of `.npy` members, as `np.savez` stores them
//! and `np.savez_compressed` deflates them). A sample is a row: every member must have the
//! same first-axis length.
//!
//! A merge concatenates each member along axis 0, in input order, keeping input 0's member
//! order and compression; the output loads with `np.load` and equals
//! `{k: np.concatenate([np.load(f)[k] for f in inputs])[mask][:limit]}`. Filters read a 1-D
//! numeric member (`success >= 1`); de-duplication hashes the listed members' rows. Numeric
//! members stream row by row; members of Python objects (`allow_pickle`) merge through
//! [`crate::npy::merge`] when no filter or de-duplication is asked for, and are refused
//! otherwise.

mod zip;

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::elem::{Elem, FieldDigest, SampleDigest};
use crate::npy::header::{self, Descr, Header};
use crate::{DatasetError, Filter, Inspection, MergeOptions, MergeSummary, Observer};

/// Most values [`examine`] reports for one member of one sample.
const VALUE_CAP: usize = 1 << 16;

/// One `.npy` member.
struct Member {
    key: String,
    entry: zip::Entry,
    header: Header,
    /// Bytes per row (numeric members).
    row_bytes: u64,
    /// The element type when it is a plain number (not structured, not objects).
    elem: Option<Elem>,
}

impl Member {
    fn is_object(&self) -> bool {
        matches!(self.header.descr, Descr::Object)
    }

    fn tail(&self) -> &[u64] {
        &self.header.shape[1..]
    }

    fn describe(&self) -> String {
        if self.is_object() {
            return format!("{} object", self.key);
        }
        let dims: Vec<String> = self.tail().iter().map(|d| d.to_string()).collect();
        let shape = if dims.is_empty() {
            "(*,)".to_string()
        } else {
            format!("(*,{})", dims.join(","))
        };
        format!("{} {} {shape}", self.key, self.header.descr.display())
    }
}

/// An opened archive.
struct Npz {
    label: String,
    archive: zip::Archive,
    members: Vec<Member>,
    count: u64,
}

impl Npz {
    /// Reads the directory and every member's npy header; checks the members share their
    /// first-axis length.
    fn open(path: &Path) -> Result<Npz, DatasetError> {
        let label = path.display().to_string();
        let archive = zip::Archive::open(path)?;
        let mut members = Vec::new();
        for e in &archive.entries {
            let at = format!("{label}:{}", e.name);
            let Some(key) = e.name.strip_suffix(".npy") else {
                return Err(DatasetError::Unsupported {
                    reason: format!("{at} is not an .npy member (np.savez writes only those)"),
                });
            };
            let mut r = archive.reader(e)?;
            let header = header::read_header(&mut r)
                .map_err(|x| DatasetError::invalid(&at, x.to_string()))?;
            if header.shape.is_empty() {
                return Err(DatasetError::invalid(
                    &at,
                    "a 0-d array has no first axis; every member needs one row per sample",
                ));
            }
            let (row_bytes, elem) = match &header.descr {
                Descr::Object => (0, None),
                Descr::Numeric { itemsize, .. } => {
                    if header.fortran_order && header.shape.len() > 1 {
                        return Err(DatasetError::Unsupported {
                            reason: format!("{at}: Fortran-ordered array"),
                        });
                    }
                    let rb = header.shape[1..]
                        .iter()
                        .try_fold(*itemsize, |a, d| a.checked_mul(*d))
                        .ok_or_else(|| DatasetError::invalid(&at, "row size overflows"))?;
                    (rb, Elem::parse_numpy(&header.descr.display()))
                }
            };
            members.push(Member {
                key: key.to_string(),
                entry: e.clone(),
                header,
                row_bytes,
                elem,
            });
        }
        let count = members.first().map(|m| m.header.shape[0]).unwrap_or(0);
        if let Some(m) = members.iter().find(|m| m.header.shape[0] != count) {
            return Err(DatasetError::invalid(
                format!("{label}:{}", m.entry.name),
                format!(
                    "{} rows, but {} has {count}: every member must have the same first-axis length",
                    m.header.shape[0], members[0].key
                ),
            ));
        }
        Ok(Npz {
            label,
            archive,
            members,
            count,
        })
    }

    fn at(&self, m: &Member) -> String {
        format!("{}:{}", self.label, m.entry.name)
    }

    /// `npz [action <f4 (*,7); success |b1 (*,)]` (keys sorted), ` empty` without samples.
    fn schema(&self) -> String {
        let mut parts: Vec<String> = self.members.iter().map(Member::describe).collect();
        parts.sort();
        let mut s = format!("npz [{}]", parts.join("; "));
        if self.count == 0 {
            s.push_str(crate::EMPTY_SCHEMA_SUFFIX);
        }
        s
    }

    fn member(&self, field: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.key == field).or_else(|| {
            self.members
                .iter()
                .find(|m| m.key == field.replace('.', "/"))
        })
    }

    /// A reader at the member's first data byte.
    fn rows(&self, m: &Member) -> Result<zip::Member, DatasetError> {
        let mut r = self.archive.reader(&m.entry)?;
        header::read_header(&mut r)
            .map_err(|x| DatasetError::invalid(self.at(m), x.to_string()))?;
        Ok(r)
    }

    fn read_err(&self, m: &Member) -> impl Fn(std::io::Error) -> DatasetError {
        let at = self.at(m);
        move |e| DatasetError::invalid(&at, e.to_string())
    }

    fn field_error(&self, reason: String) -> DatasetError {
        DatasetError::Filter {
            path: self.label.clone(),
            reason,
        }
    }

    /// Each row's value of the filter member (1-D, numeric).
    fn filter_values(&self, f: &Filter) -> Result<Vec<f64>, DatasetError> {
        let m = self
            .member(&f.field)
            .ok_or_else(|| self.field_error(format!("filter field {} names no member", f.field)))?;
        let elem = match &m.elem {
            Some(e) if e.is_numeric() && m.header.shape.len() == 1 => e.clone(),
            _ => {
                return Err(self.field_error(format!(
                    "filter field {} is {}, not a 1-D numeric array",
                    f.field,
                    m.describe()
                )));
            }
        };
        let mut r = self.rows(m)?;
        let mut values = Vec::with_capacity(self.count as usize);
        let mut buf = vec![0u8; elem.size * 8192];
        let mut left = self.count as usize * elem.size;
        while left > 0 {
            let n = left.min(buf.len());
            r.read_exact(&mut buf[..n]).map_err(self.read_err(m))?;
            values.extend(
                buf[..n]
                    .chunks_exact(elem.size)
                    .filter_map(|e| elem.value(e)),
            );
            left -= n;
        }
        Ok(values)
    }

    /// Each row's digest of the de-duplication members.
    fn digests(&self, fields: &[String]) -> Result<Vec<[u8; 32]>, DatasetError> {
        let mut digests: Vec<SampleDigest> = (0..self.count).map(|_| SampleDigest::new()).collect();
        let mut buf = vec![0u8; 1 << 16];
        for field in fields {
            let m = self.member(field).ok_or_else(|| {
                self.field_error(format!("de-duplication field {field} names no member"))
            })?;
            if m.is_object() {
                return Err(self.field_error(format!(
                    "de-duplication field {field} holds Python objects; only numeric members can be hashed"
                )));
            }
            let mut r = self.rows(m)?;
            for d in digests.iter_mut() {
                let mut fd = FieldDigest::new();
                let mut left = m.row_bytes as usize;
                while left > 0 {
                    let n = left.min(buf.len());
                    r.read_exact(&mut buf[..n]).map_err(self.read_err(m))?;
                    fd.update(&buf[..n]);
                    left -= n;
                }
                d.field(field, fd);
            }
        }
        Ok(digests.into_iter().map(SampleDigest::finish).collect())
    }
}

/// Reads a member to its end (checking its length and CRC-32); returns the bytes read.
fn drain(r: &mut impl Read) -> std::io::Result<u64> {
    std::io::copy(r, &mut std::io::sink())
}

/// Checks an archive: every member a well-formed `.npy` (object members' pickles included)
/// whose data matches its header, length and CRC-32; counts rows and those passing `filter`.
pub fn inspect(path: &Path, filter: Option<&Filter>) -> Result<Inspection, DatasetError> {
    let npz = Npz::open(path)?;
    for m in &npz.members {
        let mut r = npz.archive.reader(&m.entry)?;
        crate::npy::inspect(&mut r, m.entry.size)
            .map_err(|e| DatasetError::invalid(npz.at(m), e.to_string()))?;
        drain(&mut r).map_err(npz.read_err(m))?;
    }
    let kept = match filter {
        None => npz.count,
        Some(f) => npz
            .filter_values(f)?
            .iter()
            .filter(|v| f.keeps(**v))
            .count() as u64,
    };
    Ok(Inspection {
        count: npz.count,
        kept,
        schema: npz.schema(),
    })
}

fn check_match(t: &Npz, s: &Npz, i: usize) -> Result<(), DatasetError> {
    let mismatch = |what: String| DatasetError::Mismatch { input: i, what };
    let keys = |n: &Npz| {
        let mut k: Vec<String> = n.members.iter().map(|m| m.key.clone()).collect();
        k.sort_unstable();
        k
    };
    if keys(t) != keys(s) {
        return Err(mismatch(format!(
            "keys [{}] differ from input 0's [{}]",
            keys(s).join(", "),
            keys(t).join(", ")
        )));
    }
    for tm in &t.members {
        let Some(sm) = s.members.iter().find(|m| m.key == tm.key) else {
            continue;
        };
        if tm.header.descr != sm.header.descr || tm.tail() != sm.tail() {
            return Err(mismatch(format!(
                "{} differs from input 0's {}",
                sm.describe(),
                tm.describe()
            )));
        }
    }
    Ok(())
}

/// Contiguous runs of sorted, distinct rows as (start, length).
fn runs(rows: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &r in rows {
        match out.last_mut() {
            Some((s, n)) if *s + *n == r => *n += 1,
            _ => out.push((r, 1)),
        }
    }
    out
}

/// Merges archives into a new one at `out` (see the module documentation). Members keep the
/// order and compression of the template: input 0, or the first input holding samples when
/// input 0 holds none.
pub fn merge(
    inputs: &[PathBuf],
    counts: &[u64],
    options: &MergeOptions,
    out: &Path,
) -> Result<MergeSummary, DatasetError> {
    let t_idx = counts.iter().position(|&c| c > 0).unwrap_or(0);
    let template = Npz::open(&inputs[t_idx])?;
    let picky = options.filter.is_some() || !options.dedup.is_empty();
    if picky && let Some(m) = template.members.iter().find(|m| m.is_object()) {
        return Err(DatasetError::Unsupported {
            reason: format!(
                "{}: member {} holds Python objects; filters and de-duplication on .npz need numeric members",
                template.label, m.key
            ),
        });
    }
    let mut summary = MergeSummary::default();
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    // Inputs that contribute rows, with the runs of rows they contribute.
    let mut plan: Vec<(Npz, Vec<(u64, u64)>)> = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        if summary.samples >= options.limit {
            break;
        }
        let npz = Npz::open(input)?;
        if npz.count != counts[i] {
            return Err(DatasetError::invalid(
                &npz.label,
                format!(
                    "holds {} rows, but the round was committed with {}",
                    npz.count, counts[i]
                ),
            ));
        }
        if npz.count == 0 {
            continue;
        }
        check_match(&template, &npz, i)?;
        let mut keep = vec![true; npz.count as usize];
        if let Some(f) = &options.filter {
            for (k, v) in keep.iter_mut().zip(npz.filter_values(f)?) {
                if !f.keeps(v) {
                    *k = false;
                    summary.filtered += 1;
                }
            }
        }
        if !options.dedup.is_empty() {
            for (k, d) in keep.iter_mut().zip(npz.digests(&options.dedup)?) {
                if *k && !seen.insert(d) {
                    *k = false;
                    summary.duplicates += 1;
                }
            }
        }
        let room = usize::try_from(options.limit - summary.samples).unwrap_or(usize::MAX);
        let rows: Vec<u64> = (0..npz.count)
            .filter(|&r| keep[r as usize])
            .take(room)
            .collect();
        summary.samples += rows.len() as u64;
        plan.push((npz, runs(&rows)));
    }
    let total = summary.samples;
    let f = File::create_new(out).map_err(DatasetError::io("create", out))?;
    let mut w = zip::ZipWriter::new(f);
    let wio = |e: std::io::Error| DatasetError::Io {
        op: "write",
        path: out.to_path_buf(),
        source: e,
    };
    for tm in &template.members {
        let method = if tm.entry.method == zip::STORED {
            zip::STORED
        } else {
            zip::DEFLATED
        };
        w.begin(&tm.entry.name, method).map_err(wio)?;
        if tm.is_object() {
            // Without a contributing input, the template's own (cut to nothing) sets the
            // header and the empty pickle.
            let sources: Vec<&Npz> = if plan.is_empty() {
                vec![&template]
            } else {
                plan.iter().map(|(n, _)| n).collect()
            };
            let members: Vec<(&Npz, &zip::Entry)> = sources
                .iter()
                .filter_map(|n| {
                    n.members
                        .iter()
                        .find(|m| m.key == tm.key)
                        .map(|m| (*n, &m.entry))
                })
                .collect();
            let c: Vec<u64> = members.iter().map(|(n, _)| n.count).collect();
            crate::npy::merge(
                &c,
                total,
                |j| {
                    members[j]
                        .0
                        .archive
                        .reader(members[j].1)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                },
                &mut w,
            )
            .map_err(|e| {
                DatasetError::invalid(
                    format!("{}:{}", template.label, tm.entry.name),
                    e.to_string(),
                )
            })?;
        } else {
            let mut shape = tm.header.shape.clone();
            shape[0] = total;
            let h = header::write_header(&tm.header.descr, &shape)?;
            w.write_all(&h).map_err(wio)?;
            for (n, rs) in &plan {
                let Some(m) = n.members.iter().find(|m| m.key == tm.key) else {
                    continue;
                };
                let mut r = n.rows(m)?;
                let mut pos = 0u64;
                for &(start, len) in rs {
                    let skip = (start - pos) * m.row_bytes;
                    let skipped = std::io::copy(&mut (&mut r).take(skip), &mut std::io::sink())
                        .map_err(n.read_err(m))?;
                    let want = len * m.row_bytes;
                    let copied = copy_rows(&mut r, &mut w, want).map_err(|e| match e {
                        CopyError::Read(e) => n.read_err(m)(e),
                        CopyError::Write(e) => wio(e),
                    })?;
                    if skipped < skip || copied < want {
                        return Err(DatasetError::invalid(
                            n.at(m),
                            "member data ends before its header's shape",
                        ));
                    }
                    pos = start + len;
                }
            }
        }
        w.end().map_err(wio)?;
    }
    summary.bytes_written = w.finish().map_err(wio)?;
    Ok(summary)
}

enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copies up to `n` bytes; returns how many there were.
fn copy_rows(r: &mut impl Read, w: &mut impl Write, n: u64) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; (n as usize).clamp(1, 1 << 16)];
    let mut done = 0u64;
    while done < n {
        let want = ((n - done) as usize).min(buf.len());
        let got = match r.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(g) => g,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        w.write_all(&buf[..got]).map_err(CopyError::Write)?;
        done += got as u64;
    }
    Ok(done)
}

/// Walks every row: each numeric member's elements of the row (at most [`VALUE_CAP`]) under
/// the member's key; damaged members are problems at `<file>:<member>`.
pub fn examine(path: &Path, observer: &mut dyn Observer) -> Result<u64, DatasetError> {
    let npz = Npz::open(path)?;
    let mut readers: Vec<(&Member, Option<zip::Member>)> = Vec::new();
    for m in &npz.members {
        if m.is_object() {
            // No numbers to report; check the pickle.
            let checked = npz.archive.reader(&m.entry).and_then(|mut r| {
                crate::npy::inspect(&mut r, m.entry.size)
                    .map_err(|e| DatasetError::invalid(npz.at(m), e.to_string()))?;
                drain(&mut r).map_err(npz.read_err(m))
            });
            if let Err(e) = checked {
                observer.problem(&npz.at(m), &e.to_string());
            }
            continue;
        }
        match npz.rows(m) {
            Ok(r) => readers.push((m, Some(r))),
            Err(e) => observer.problem(&npz.at(m), &e.to_string()),
        }
    }
    let mut row = Vec::new();
    let mut values = Vec::new();
    for s in 0..npz.count {
        observer.sample(s);
        for (m, r) in readers.iter_mut() {
            let Some(reader) = r else { continue };
            row.resize(m.row_bytes as usize, 0);
            if let Err(e) = reader.read_exact(&mut row) {
                observer.problem(&npz.at(m), &format!("row {s}: {e}"));
                *r = None;
                continue;
            }
            if let Some(elem) = &m.elem {
                values.clear();
                elem.push_values(&row, &mut values, VALUE_CAP);
                if !values.is_empty() {
                    observer.values(&m.key, &values);
                }
            }
        }
    }
    for (m, r) in readers.iter_mut() {
        if let Some(reader) = r
            && let Err(e) = drain(reader)
        {
            observer.problem(&npz.at(m), &e.to_string());
        }
    }
    Ok(npz.count)
}
