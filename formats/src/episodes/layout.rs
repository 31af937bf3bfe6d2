//! Reading an episode directory: its file layout, per-episode metadata, episode files and
//! collection summary, each check giving the path it is about.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::DatasetError;
use crate::npy::FormatError;

pub(super) const EPISODES: &str = "episodes";
pub(super) const METADATA: &str = "metadata";
pub(super) const LOGS: &str = "logs";
pub(super) const SUMMARY: &str = "collection_summary.json";

/// Largest metadata or summary file read (they are a few hundred bytes in practice).
const MAX_JSON: u64 = 64 << 20;
const READ_BUF: usize = 1 << 16;

/// Something wrong at a path inside the dataset.
#[derive(Debug, Clone)]
pub(super) struct Problem {
    pub path: String,
    pub reason: String,
}

impl Problem {
    pub fn into_error(self) -> DatasetError {
        DatasetError::invalid(self.path, self.reason)
    }
}

pub(super) fn episode_name(idx: u64, ext: &str) -> String {
    format!("episode_{idx:05}.{ext}")
}

pub(super) fn meta_name(idx: u64) -> String {
    format!("episode_{idx:05}_meta.json")
}

/// The index in a `%05d` number, when `digits` is exactly how `%05d` writes it.
fn index_of(digits: &str) -> Option<u64> {
    let i: u64 = digits.parse().ok()?;
    (digits.bytes().all(|b| b.is_ascii_digit()) && format!("{i:05}") == digits).then_some(i)
}

/// What the directory listing of a dataset shows.
#[derive(Debug)]
pub(super) struct Layout {
    pub root: PathBuf,
    /// Episode files by index: their extension.
    pub episodes: BTreeMap<u64, String>,
    /// Indices that have a metadata file.
    pub metas: BTreeSet<u64>,
    /// The extension of the lowest-numbered episode file (the dataset's).
    pub ext: Option<String>,
    pub has_summary: bool,
    /// Everything wrong with the listing, in a stable order.
    pub problems: Vec<Problem>,
}

impl Layout {
    pub fn episode_path(&self, idx: u64) -> PathBuf {
        let ext = self.episodes.get(&idx).or(self.ext.as_ref());
        let ext = ext.map_or("*", String::as_str);
        self.root.join(EPISODES).join(episode_name(idx, ext))
    }

    pub fn meta_path(&self, idx: u64) -> PathBuf {
        self.root.join(METADATA).join(meta_name(idx))
    }

    /// Episodes in the dataset; for a listing without problems, indices `0..count`.
    pub fn count(&self) -> u64 {
        self.episodes.len() as u64
    }

    /// The first problem as an error: what `inspect` and `merge` give for a bad listing.
    pub fn check(&self) -> Result<(), DatasetError> {
        match self.problems.first() {
            Some(p) => Err(p.clone().into_error()),
            None => Ok(()),
        }
    }
}

fn list(dir: &Path) -> Result<Vec<(String, bool)>, DatasetError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(DatasetError::io("list", dir))? {
        let e = e.map_err(DatasetError::io("list", dir))?;
        let is_dir = e
            .file_type()
            .map_err(DatasetError::io("stat", &e.path()))?
            .is_dir();
        match e.file_name().into_string() {
            Ok(name) => out.push((name, is_dir)),
            Err(name) => out.push((name.to_string_lossy().into_owned(), is_dir)),
        }
    }
    out.sort();
    Ok(out)
}

/// Lists the dataset at `root`. An error only when it cannot be walked at all (not a
/// directory, no `episodes/`, unreadable); everything else is a [`Problem`].
pub(super) fn scan(root: &Path) -> Result<Layout, DatasetError> {
    if !root.is_dir() {
        return Err(DatasetError::invalid(
            root.display().to_string(),
            "not a directory; an episode dataset is a directory holding episodes/ and metadata/",
        ));
    }
    let eps_dir = root.join(EPISODES);
    if !eps_dir.is_dir() {
        return Err(DatasetError::invalid(
            eps_dir.display().to_string(),
            "missing: an episode dataset keeps its episode files in episodes/",
        ));
    }
    let mut lay = Layout {
        root: root.to_path_buf(),
        episodes: BTreeMap::new(),
        metas: BTreeSet::new(),
        ext: None,
        has_summary: false,
        problems: Vec::new(),
    };
    let mut problems = Vec::new();
    let mut problem = |path: PathBuf, reason: String| {
        problems.push(Problem {
            path: path.display().to_string(),
            reason,
        })
    };

    for (name, is_dir) in list(root)? {
        let known = matches!(name.as_str(), EPISODES | METADATA | LOGS);
        if !known || !is_dir {
            problem(
                root.join(&name),
                "unexpected entry; an episode dataset holds only the directories episodes/, \
                 metadata/ and (optionally) logs/"
                    .into(),
            );
        }
    }

    for (name, is_dir) in list(&eps_dir)? {
        let parsed = name
            .strip_prefix("episode_")
            .and_then(|r| r.split_once('.'))
            .and_then(|(d, ext)| Some((index_of(d)?, ext)))
            .filter(|(_, ext)| !ext.is_empty());
        match parsed {
            Some((idx, ext)) if !is_dir => {
                lay.episodes.insert(idx, ext.to_string());
            }
            _ => problem(
                eps_dir.join(&name),
                "unexpected entry; episodes/ holds only files named episode_%05d.<ext> \
                 (episode_00000.pkl, episode_00001.pkl, ...)"
                    .into(),
            ),
        }
    }
    lay.ext = lay.episodes.values().next().cloned();
    if let Some(ext) = &lay.ext {
        for (idx, e) in &lay.episodes {
            if e != ext {
                problem(
                    eps_dir.join(episode_name(*idx, e)),
                    format!(
                        "extension .{e} differs from the dataset's .{ext} (of its first \
                         episode file); every episode file has the same extension"
                    ),
                );
            }
        }
    }

    let meta_dir = root.join(METADATA);
    if !meta_dir.is_dir() {
        problem(
            meta_dir.clone(),
            "missing: an episode dataset keeps per-episode metadata and its \
             collection_summary.json in metadata/"
                .into(),
        );
    } else {
        for (name, is_dir) in list(&meta_dir)? {
            let idx = name
                .strip_prefix("episode_")
                .and_then(|r| r.strip_suffix("_meta.json"))
                .and_then(index_of);
            match idx {
                Some(i) if !is_dir => {
                    lay.metas.insert(i);
                }
                _ if name == SUMMARY && !is_dir => lay.has_summary = true,
                _ => problem(
                    meta_dir.join(&name),
                    format!(
                        "unexpected entry; metadata/ holds only episode_%05d_meta.json files \
                         and {SUMMARY}"
                    ),
                ),
            }
        }
        if !lay.has_summary {
            problem(
                meta_dir.join(SUMMARY),
                "missing: every episode dataset has a collection summary".into(),
            );
        }
    }

    let last = [lay.episodes.keys().last(), lay.metas.iter().last()]
        .into_iter()
        .flatten()
        .max()
        .copied();
    if let Some(last) = last {
        let ext = lay.ext.clone().unwrap_or_else(|| "*".into());
        for idx in 0..=last {
            let (ep, meta) = (lay.episodes.contains_key(&idx), lay.metas.contains(&idx));
            let ep_path = eps_dir.join(episode_name(idx, &ext));
            match (ep, meta) {
                (true, true) => {}
                (true, false) => problem(
                    meta_dir.join(meta_name(idx)),
                    format!(
                        "missing: episodes/{} has no metadata",
                        episode_name(idx, &ext)
                    ),
                ),
                (false, true) => problem(
                    ep_path,
                    format!("missing: metadata/{} has no episode file", meta_name(idx)),
                ),
                (false, false) => problem(
                    ep_path,
                    format!(
                        "missing: no episode {idx} while episode {last} exists; episode \
                         indices run from 0 without gaps"
                    ),
                ),
            }
        }
    }
    lay.problems = problems;
    Ok(lay)
}

/// Reads a small JSON file that must hold an object.
pub(super) fn read_json_object(path: &Path) -> Result<Map<String, Value>, DatasetError> {
    let f = File::open(path).map_err(DatasetError::io("open", path))?;
    let len = f.metadata().map_err(DatasetError::io("stat", path))?.len();
    let where_ = || path.display().to_string();
    if len > MAX_JSON {
        return Err(DatasetError::invalid(
            where_(),
            format!("{len} bytes; metadata files over {MAX_JSON} bytes are not read"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(MAX_JSON)
        .read_to_end(&mut buf)
        .map_err(DatasetError::io("read", path))?;
    match serde_json::from_slice::<Value>(&buf) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(v) => Err(DatasetError::invalid(
            where_(),
            format!(
                "{} where a JSON object was expected",
                crate::jsonl::fields::kind(&v)
            ),
        )),
        Err(e) => Err(DatasetError::invalid(
            where_(),
            format!("invalid JSON: {e}"),
        )),
    }
}

/// One episode's metadata, checked: a JSON object whose `episode_idx` is `idx` and whose
/// `statistics`, if present, is an object.
pub(super) fn read_meta(lay: &Layout, idx: u64) -> Result<Map<String, Value>, DatasetError> {
    let path = lay.meta_path(idx);
    let m = read_json_object(&path)?;
    let bad = |reason: String| DatasetError::invalid(path.display().to_string(), reason);
    match m.get("episode_idx") {
        Some(Value::Number(n)) if n.as_u64() == Some(idx) => {}
        Some(v) => {
            return Err(bad(format!(
                "episode_idx is {v}, but the file is metadata for episode {idx}"
            )));
        }
        None => return Err(bad(format!("no episode_idx (it should be {idx})"))),
    }
    match m.get("statistics") {
        None | Some(Value::Object(_)) => {}
        Some(v) => {
            return Err(bad(format!(
                "statistics is {}; it should be an object",
                crate::jsonl::fields::kind(v)
            )));
        }
    }
    Ok(m)
}

/// The sorted keys of a metadata object's `statistics` (none without one).
pub(super) fn statistics_keys(m: &Map<String, Value>) -> Vec<String> {
    match m.get("statistics") {
        Some(Value::Object(s)) => {
            let mut k: Vec<String> = s.keys().cloned().collect();
            k.sort_unstable();
            k
        }
        _ => Vec::new(),
    }
}

/// Counts that a collection summary sums over rounds; each must be a non-negative number.
pub(super) const SUMMED: [&str; 5] = [
    "total_episodes",
    "successful_episodes",
    "failed_episodes",
    "total_timesteps",
    "duration_seconds",
];

/// The collection summary, checked: a JSON object whose summed counts (where present) are
/// non-negative numbers and whose `error_log` (where present) is an array.
pub(super) fn read_summary(root: &Path) -> Result<Map<String, Value>, DatasetError> {
    let path = root.join(METADATA).join(SUMMARY);
    let m = read_json_object(&path)?;
    let bad = |reason: String| DatasetError::invalid(path.display().to_string(), reason);
    for k in SUMMED {
        if let Some(v) = m.get(k)
            && !v.as_f64().is_some_and(|x| x >= 0.0)
        {
            return Err(bad(format!(
                "{k} is {v}; it should be a non-negative number"
            )));
        }
    }
    if let Some(v) = m.get("error_log")
        && !v.is_array()
    {
        return Err(bad(format!(
            "error_log is {}; it should be an array",
            crate::jsonl::fields::kind(v)
        )));
    }
    Ok(m)
}

/// Whether episode files with this extension are pickles (checked to their `STOP`).
pub(super) fn is_pickle(ext: &str) -> bool {
    ext.eq_ignore_ascii_case("pkl") || ext.eq_ignore_ascii_case("pickle")
}

/// Passes what it reads on to a writer (the merge's copy), counting bytes.
struct Tee<'a, R> {
    r: R,
    w: Option<&'a mut dyn Write>,
    n: u64,
    write_error: Option<std::io::Error>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.r.read(buf)?;
        if let Some(w) = self.w.as_mut()
            && let Err(e) = w.write_all(&buf[..k])
        {
            let msg = e.to_string();
            self.write_error = Some(e);
            return Err(std::io::Error::other(msg));
        }
        self.n += k as u64;
        Ok(k)
    }
}

/// Checks episode file `idx` (not empty; a complete pickle stream for a pickle extension)
/// and, with `copy`, writes its bytes there as they are read (`out_path` names it in errors).
/// Returns its length.
pub(super) fn check_episode(
    lay: &Layout,
    idx: u64,
    copy: Option<(&mut dyn Write, &Path)>,
) -> Result<u64, DatasetError> {
    let path = lay.episode_path(idx);
    let where_ = || path.display().to_string();
    let f = File::open(&path).map_err(DatasetError::io("open", &path))?;
    let len = f.metadata().map_err(DatasetError::io("stat", &path))?.len();
    if len == 0 {
        return Err(DatasetError::invalid(where_(), "empty episode file"));
    }
    let (w, out_path) = match copy {
        Some((w, p)) => (Some(w), Some(p)),
        None => (None, None),
    };
    let mut tee = Tee {
        r: f,
        w,
        n: 0,
        write_error: None,
    };
    let ext = lay.episodes.get(&idx).map(String::as_str).unwrap_or("");
    let res = if is_pickle(ext) {
        crate::pickle::check_complete(BufReader::with_capacity(READ_BUF, &mut tee), len).map(|_| ())
    } else if tee.w.is_some() {
        std::io::copy(&mut tee, &mut std::io::sink())
            .map(|_| ())
            .map_err(FormatError::Io)
    } else {
        Ok(())
    };
    if let Some(e) = tee.write_error.take() {
        return Err(DatasetError::Io {
            op: "write",
            path: out_path.map_or_else(|| path.clone(), Path::to_path_buf),
            source: e,
        });
    }
    match res {
        Ok(()) => {}
        Err(FormatError::Io(e)) => {
            return Err(DatasetError::Io {
                op: "read",
                path,
                source: e,
            });
        }
        Err(e) => return Err(DatasetError::invalid(where_(), e.to_string())),
    }
    if tee.w.is_some() && tee.n != len {
        return Err(DatasetError::invalid(
            where_(),
            format!(
                "{} bytes copied but the file has {len}; it changed while being merged",
                tee.n
            ),
        ));
    }
    Ok(len)
}

/// The SHA-256 of episode file `idx`'s bytes (for de-duplication by `file`).
pub(super) fn file_digest(lay: &Layout, idx: u64) -> Result<[u8; 32], DatasetError> {
    use sha2::Digest;
    let path = lay.episode_path(idx);
    let mut f = File::open(&path).map_err(DatasetError::io("open", &path))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; READ_BUF];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(h.finalize().into()),
            Ok(k) => h.update(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(DatasetError::Io {
                    op: "read",
                    path,
                    source: e,
                });
            }
        }
    }
}
