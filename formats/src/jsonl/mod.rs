//! JSON Lines: one file, one sample per line, each line one JSON object.
//!
//! - Every line holds a JSON object; the last line may lack its `\n` (a merge adds it); a
//!   blank line (empty or only whitespace) is an error naming it, as is invalid JSON or a line
//!   that is not an object. `\r\n` endings are accepted and kept.
//! - Every line has the same set of top-level keys as line 1; the schema is
//!   `jsonl keys [a, b, c]` (those keys, sorted) or `jsonl empty`.
//! - Fields for the filter and de-duplication are dotted paths (see `fields`): the filter
//!   compares a number (a bool counts as 0/1); de-duplication hashes the canonical JSON
//!   (sorted keys) of the listed fields. A missing field is a [`DatasetError::Filter`]
//!   naming the file and line.
//! - A merge copies the kept lines byte for byte (never re-serialized), in input order:
//!   filtered, then de-duplicated (against earlier kept lines), then cut to the limit.
//!
//! Everything streams: memory is bounded by the longest line (and its parsed value) plus, when
//! de-duplicating, one 32-byte digest per distinct kept line.

pub(crate) mod fields;

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{DatasetError, Filter, Inspection, MergeOptions, MergeSummary, Observer};

const READ_BUF: usize = 1 << 16;
const WRITE_BUF: usize = 1 << 18;

/// Reads a JSON Lines file (or its bytes, named `path` in messages) line by line.
struct Lines<R = BufReader<File>> {
    path: PathBuf,
    r: R,
    buf: Vec<u8>,
    /// 1-based number of the line in `buf`.
    n: u64,
}

impl Lines {
    fn open(path: &Path) -> Result<Lines, DatasetError> {
        let f = File::open(path).map_err(DatasetError::io("open", path))?;
        Ok(Lines::new(path, BufReader::with_capacity(READ_BUF, f)))
    }
}

impl<R> Lines<R> {
    fn new(path: &Path, r: R) -> Lines<R> {
        Lines {
            path: path.to_path_buf(),
            r,
            buf: Vec::new(),
            n: 0,
        }
    }

    /// `file:line N` of the current line.
    fn place(&self) -> String {
        format!("{}:line {}", self.path.display(), self.n)
    }
}

impl<R: BufRead> Lines<R> {
    /// The next line, its `\n` included when it has one; `None` at the end of the file.
    fn next_raw(&mut self) -> Result<Option<&[u8]>, DatasetError> {
        self.buf.clear();
        let got = self
            .r
            .read_until(b'\n', &mut self.buf)
            .map_err(DatasetError::io("read", &self.path))?;
        if got == 0 {
            return Ok(None);
        }
        self.n += 1;
        Ok(Some(&self.buf))
    }

    /// The next line parsed as an object, with the line's raw bytes left in `self.buf`.
    fn next(&mut self) -> Result<Option<Map<String, Value>>, DatasetError> {
        if self.next_raw()?.is_none() {
            return Ok(None);
        }
        parse(&self.buf)
            .map(Some)
            .map_err(|reason| DatasetError::invalid(self.place(), reason))
    }
}

/// One line (with or without its `\n`) as a JSON object, or what is wrong with it.
fn parse(line: &[u8]) -> Result<Map<String, Value>, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(
            "blank line; JSON Lines holds one JSON object on every line, with no blank lines"
                .into(),
        );
    }
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(v) => Err(format!(
            "{} where a JSON object was expected (every line is one sample object)",
            fields::kind(&v)
        )),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

fn sorted_keys(m: &Map<String, Value>) -> Vec<String> {
    let mut k: Vec<String> = m.keys().cloned().collect();
    k.sort_unstable();
    k
}

fn schema_of(keys: &[String]) -> String {
    format!("jsonl keys [{}]", keys.join(", "))
}

/// Why `m` does not have exactly `keys` (sorted), if it does not.
fn key_difference(m: &Map<String, Value>, keys: &[String]) -> Option<String> {
    if m.len() == keys.len() && keys.iter().all(|k| m.contains_key(k)) {
        return None;
    }
    let missing: Vec<&str> = keys
        .iter()
        .filter(|k| !m.contains_key(*k))
        .map(String::as_str)
        .collect();
    let mut extra: Vec<&str> = m
        .keys()
        .filter(|k| keys.binary_search(k).is_err())
        .map(String::as_str)
        .collect();
    extra.sort_unstable();
    Some(format!(
        "keys differ: missing [{}], extra [{}]",
        missing.join(", "),
        extra.join(", ")
    ))
}

/// [`crate::inspect`] for JSON Lines: every line parsed and checked against line 1's keys,
/// the filter applied to each.
pub fn inspect(path: &Path, filter: Option<&Filter>) -> Result<Inspection, DatasetError> {
    inspect_lines(Lines::open(path)?, filter)
}

/// [`inspect`] on a file's bytes in memory; `name` stands for the file in messages.
pub fn inspect_bytes(
    name: &Path,
    bytes: &[u8],
    filter: Option<&Filter>,
) -> Result<Inspection, DatasetError> {
    inspect_lines(Lines::new(name, bytes), filter)
}

fn inspect_lines<R: BufRead>(
    mut lines: Lines<R>,
    filter: Option<&Filter>,
) -> Result<Inspection, DatasetError> {
    let mut keys: Option<Vec<String>> = None;
    let (mut count, mut kept) = (0u64, 0u64);
    while let Some(m) = lines.next()? {
        count += 1;
        match &keys {
            None => keys = Some(sorted_keys(&m)),
            Some(k) => {
                if let Some(d) = key_difference(&m, k) {
                    return Err(DatasetError::invalid(
                        lines.place(),
                        format!("{d} (line 1 has [{}])", k.join(", ")),
                    ));
                }
            }
        }
        if keeps(filter, &m, &lines)? {
            kept += 1;
        }
    }
    Ok(Inspection {
        count,
        kept,
        schema: match keys {
            Some(k) => schema_of(&k),
            None => format!("jsonl{}", crate::EMPTY_SCHEMA_SUFFIX),
        },
    })
}

fn keeps<R>(
    filter: Option<&Filter>,
    m: &Map<String, Value>,
    at: &Lines<R>,
) -> Result<bool, DatasetError> {
    let Some(f) = filter else {
        return Ok(true);
    };
    let v = fields::filter_number(fields::lookup_in(m, &f.field), &f.field).map_err(|reason| {
        DatasetError::Filter {
            path: at.place(),
            reason,
        }
    })?;
    Ok(f.keeps(v))
}

/// [`crate::merge`] for JSON Lines into a new file `out`.
///
/// Inputs are read in order, each once, front to back; reading stops once `limit` lines are
/// kept, so inputs past that point are never opened. Every line read is checked as
/// [`inspect`] checks it, and its keys against the first line of the merge (an input with
/// other keys is a [`DatasetError::Mismatch`]). An input read to its end must hold
/// `counts[i]` lines (its [`Inspection::count`], before any filter). Kept lines are copied
/// byte for byte; a last line without `\n` gets one.
pub fn merge(
    inputs: &[PathBuf],
    counts: &[u64],
    options: &MergeOptions,
    out: &Path,
) -> Result<MergeSummary, DatasetError> {
    let f = File::create_new(out).map_err(DatasetError::io("create", out))?;
    let mut w = BufWriter::with_capacity(WRITE_BUF, f);
    let mut s = MergeSummary::default();
    // Line 1 of the first non-empty input: (input, its sorted keys).
    let mut reference: Option<(usize, Vec<String>)> = None;
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    let write =
        |w: &mut BufWriter<File>, b: &[u8]| w.write_all(b).map_err(DatasetError::io("write", out));
    'inputs: for (i, input) in inputs.iter().enumerate() {
        if s.samples >= options.limit {
            break;
        }
        let mut lines = Lines::open(input)?;
        while let Some(m) = lines.next()? {
            match &reference {
                None => reference = Some((i, sorted_keys(&m))),
                Some((r, k)) => {
                    if let Some(d) = key_difference(&m, k) {
                        let what = format!(
                            "{} {d} (input {r} line 1 has [{}])",
                            lines.place(),
                            k.join(", ")
                        );
                        return Err(if *r == i {
                            DatasetError::invalid(lines.place(), what)
                        } else {
                            DatasetError::Mismatch { input: i, what }
                        });
                    }
                }
            }
            if !keeps(options.filter.as_ref(), &m, &lines)? {
                s.filtered += 1;
                continue;
            }
            if !options.dedup.is_empty() {
                let mut key = fields::KeyHasher::new();
                fields::add_fields(&mut key, &options.dedup, |f| fields::lookup_in(&m, f))
                    .map_err(|reason| DatasetError::Filter {
                        path: lines.place(),
                        reason,
                    })?;
                if !seen.insert(key.finish()) {
                    s.duplicates += 1;
                    continue;
                }
            }
            write(&mut w, &lines.buf)?;
            s.bytes_written += lines.buf.len() as u64;
            if lines.buf.last() != Some(&b'\n') {
                write(&mut w, b"\n")?;
                s.bytes_written += 1;
            }
            s.samples += 1;
            if s.samples >= options.limit {
                break 'inputs;
            }
        }
        if lines.n != counts[i] {
            return Err(DatasetError::invalid(
                input.display().to_string(),
                format!(
                    "holds {} lines but the round was committed with {} samples",
                    lines.n, counts[i]
                ),
            ));
        }
    }
    let f = w.into_inner().map_err(|e| DatasetError::Io {
        op: "write",
        path: out.to_path_buf(),
        source: e.into_error(),
    })?;
    f.sync_all().map_err(DatasetError::io("sync", out))?;
    Ok(s)
}

/// [`crate::examine`] for JSON Lines: every line a sample (numbered from 0 among the lines
/// that parse as objects); its numeric fields, nested ones with dotted names, arrays of numbers
/// element by element (see `fields::numeric_fields`). A blank, unparsable or non-object line,
/// or one whose keys differ from the first sample's, is a problem at `file:line N`; examining
/// goes on. Returns the number of samples.
pub fn examine(path: &Path, observer: &mut dyn Observer) -> Result<u64, DatasetError> {
    let mut lines = Lines::open(path)?;
    let mut keys: Option<Vec<String>> = None;
    let mut samples = 0u64;
    while lines.next_raw()?.is_some() {
        let m = match parse(&lines.buf) {
            Ok(m) => m,
            Err(reason) => {
                observer.problem(&lines.place(), &reason);
                continue;
            }
        };
        match &keys {
            None => keys = Some(sorted_keys(&m)),
            Some(k) => {
                if let Some(d) = key_difference(&m, k) {
                    observer.problem(
                        &lines.place(),
                        &format!("{d} (the first sample has [{}])", k.join(", ")),
                    );
                }
            }
        }
        observer.sample(samples);
        samples += 1;
        let v = Value::Object(m);
        fields::numeric_fields("", &v, &mut |name, vals| observer.values(name, vals));
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn last_line_without_newline_is_kept_and_terminated() {
        let d = tempfile::tempdir().unwrap();
        let a = write(
            d.path(),
            "a.jsonl",
            b"{\"x\": 1, \"y\": {\"z\": true}}\n{\"y\": {}, \"x\": 2}",
        );
        let b = write(d.path(), "b.jsonl", b"{\"x\":3,\"y\":null}\r\n");
        let e = write(d.path(), "e.jsonl", b"");
        let i = inspect(&a, None).unwrap();
        assert_eq!((i.count, i.schema.as_str()), (2, "jsonl keys [x, y]"));
        assert_eq!(inspect(&e, None).unwrap().schema, "jsonl empty");
        let f = Filter::parse("y.z == 1").unwrap();
        let err = inspect(&a, Some(&f)).unwrap_err();
        assert!(
            err.to_string().contains("a.jsonl:line 2: no field `y.z`"),
            "{err}"
        );
        let out = d.path().join("m.jsonl");
        let o = MergeOptions {
            limit: 10,
            ..MergeOptions::default()
        };
        let s = merge(&[e.clone(), a, e, b], &[0, 2, 0, 1], &o, &out).unwrap();
        assert_eq!(s.samples, 3);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"{\"x\": 1, \"y\": {\"z\": true}}\n{\"y\": {}, \"x\": 2}\n{\"x\":3,\"y\":null}\r\n"
        );
    }

    #[test]
    fn blank_and_bad_lines_name_their_line() {
        let d = tempfile::tempdir().unwrap();
        for (body, line, what) in [
            (&b"{\"a\": 1}\n\n{\"a\": 2}\n"[..], 2, "blank line"),
            (b"{\"a\": 1}\n{\"a\": 2}\n\n", 3, "blank line"),
            (b"{\"a\": 1}\n{\"a\": }\n", 2, "invalid JSON"),
            (b"{\"a\": 1}\n\"a\"\n", 2, "a string where"),
            (b"{\"a\": 1}\n{\"b\": 1}\n", 2, "missing [a], extra [b]"),
        ] {
            let p = write(d.path(), "x.jsonl", body);
            let e = inspect(&p, None).unwrap_err().to_string();
            assert!(e.contains(&format!("x.jsonl:line {line}: ")), "{e}");
            assert!(e.contains(what), "{e}");
        }
    }
}
