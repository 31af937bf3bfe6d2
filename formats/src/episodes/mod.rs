//! Episode directories, as scripted collectors write them:
//!
//! ```text
//! dataset/
//!   episodes/episode_00000.pkl           one file per episode, any extension (one per dataset);
//!                                        .pkl/.pickle: a pickle of (data_dict, attrs_dict)
//!   metadata/episode_00000_meta.json     {"episode_idx": 0, "filepath": ..., "timestamp": ...,
//!                                         "statistics": {"num_timesteps": 520, ...}}
//!   metadata/collection_summary.json     {"env_name": ..., "total_episodes": 50,
//!                                         "successful_episodes": 48, ...}
//!   logs/                                optional
//! ```
//!
//! A sample is an episode. A well-formed dataset has, for indices `0..n` without gaps
//! (`%05d`), one episode file and one metadata file each and nothing else but the summary
//! (and `logs/`); every metadata file is a JSON object whose `episode_idx` is its index; every
//! episode file is non-empty and, for `.pkl`/`.pickle`, one complete pickle stream (checked to
//! its `STOP` without loading it: see `pickle::check_complete`). The schema is
//! `episodes <ext> meta [statistics keys, sorted]` (every episode's `statistics` must have the
//! same keys) or `episodes empty`.
//!
//! Filter and de-duplication fields are dotted paths into an episode's metadata
//! (`statistics.num_timesteps`; a bool counts as 0/1). The de-duplication field `file` is
//! special: the SHA-256 of the episode file's bytes (a metadata field named `file` cannot be
//! used for de-duplication).
//!
//! A merge writes a new dataset: kept episodes renumbered `0..` across the inputs in input
//! order, their files copied byte for byte under their new names, their metadata rewritten
//! with the new `episode_idx`, `filepath` (`episodes/episode_%05d.<ext>`, relative to the
//! dataset root) and `source: {"input": i, "episode_idx": old}` (replacing any earlier
//! `source`), every other field kept; and one merged `collection_summary.json` (see
//! `summary`: collection counts summed as collected, plus `episodes_in_dataset` and
//! `merged_from`). The inputs' `logs/` are not merged.

mod layout;
mod summary;

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::jsonl::fields;
use crate::{DatasetError, Filter, Inspection, MergeOptions, MergeSummary, Observer};
use layout::{EPISODES, METADATA, SUMMARY, episode_name, meta_name};

/// The de-duplication field that stands for the episode file's bytes.
pub const FILE_FIELD: &str = "file";

const WRITE_BUF: usize = 1 << 18;

fn schema_of(ext: &str, keys: &[String]) -> String {
    format!("episodes {ext} meta [{}]", keys.join(", "))
}

fn empty_schema() -> String {
    format!("episodes{}", crate::EMPTY_SCHEMA_SUFFIX)
}

fn filter_error(lay: &layout::Layout, idx: u64, reason: String) -> DatasetError {
    DatasetError::Filter {
        path: lay.meta_path(idx).display().to_string(),
        reason,
    }
}

/// Checks that episode `idx`'s statistics keys are `keys` (those of episode 0).
fn check_keys(meta: &Map<String, Value>, keys: &[String]) -> Result<(), String> {
    let k = layout::statistics_keys(meta);
    if k == keys {
        return Ok(());
    }
    Err(format!(
        "statistics keys [{}] differ from episode 0's [{}]; every episode's statistics has \
         the same keys",
        k.join(", "),
        keys.join(", ")
    ))
}

/// [`crate::inspect`] for an episode directory: the layout, every metadata file, every
/// episode file (pickles walked to their end) and the summary checked; the filter applied to
/// each episode's metadata.
pub fn inspect(path: &Path, filter: Option<&Filter>) -> Result<Inspection, DatasetError> {
    let lay = layout::scan(path)?;
    lay.check()?;
    layout::read_summary(path)?;
    let mut keys: Option<Vec<String>> = None;
    let mut kept = 0;
    for idx in 0..lay.count() {
        let meta = layout::read_meta(&lay, idx)?;
        match &keys {
            None => keys = Some(layout::statistics_keys(&meta)),
            Some(k) => check_keys(&meta, k).map_err(|reason| {
                DatasetError::invalid(lay.meta_path(idx).display().to_string(), reason)
            })?,
        }
        layout::check_episode(&lay, idx, None)?;
        if let Some(f) = filter {
            let v = fields::filter_number(fields::lookup_in(&meta, &f.field), &f.field)
                .map_err(|reason| filter_error(&lay, idx, reason))?;
            if f.keeps(v) {
                kept += 1;
            }
        } else {
            kept += 1;
        }
    }
    let schema = match (&lay.ext, &keys) {
        (Some(ext), Some(k)) => schema_of(ext, k),
        _ => empty_schema(),
    };
    Ok(Inspection {
        count: lay.count(),
        kept,
        schema,
    })
}

/// [`crate::merge`] for episode directories into a new directory `out` (its parent must
/// exist).
///
/// Every input's summary is read first (all of them count in the merged summary); then the
/// inputs' episodes in order, each input listed and checked as [`inspect`] checks it (it must
/// hold `counts[i]` episodes, its [`Inspection::count`]) as it is reached, until `limit`
/// episodes are kept: inputs past that point are not listed. Each episode is filtered on its
/// metadata, then de-duplicated against the episodes kept before it, then copied (a pickle is
/// walked to its `STOP` as it is copied) and its metadata rewritten. The output is the same,
/// byte for byte, for the same inputs and options. The inputs' `logs/` are not merged.
pub fn merge(
    inputs: &[PathBuf],
    counts: &[u64],
    options: &MergeOptions,
    out: &Path,
) -> Result<MergeSummary, DatasetError> {
    let summaries = inputs
        .iter()
        .map(|p| layout::read_summary(p))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir(out).map_err(DatasetError::io("create", out))?;
    let (out_eps, out_meta) = (out.join(EPISODES), out.join(METADATA));
    for d in [&out_eps, &out_meta] {
        std::fs::create_dir(d).map_err(DatasetError::io("create", d))?;
    }
    let mut s = MergeSummary::default();
    // The first non-empty input's schema: (input, ext, statistics keys).
    let mut reference: Option<(usize, String, Vec<String>)> = None;
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    'inputs: for (i, input) in inputs.iter().enumerate() {
        if s.samples >= options.limit {
            break;
        }
        let lay = layout::scan(input)?;
        lay.check()?;
        if lay.count() != counts[i] {
            return Err(DatasetError::invalid(
                input.display().to_string(),
                format!(
                    "holds {} episodes but the round was committed with {}",
                    lay.count(),
                    counts[i]
                ),
            ));
        }
        let ext = lay.ext.clone().unwrap_or_default();
        for idx in 0..lay.count() {
            let mut meta = layout::read_meta(&lay, idx)?;
            let keys = layout::statistics_keys(&meta);
            match &reference {
                None => reference = Some((i, ext.clone(), keys)),
                Some((r, rext, rkeys)) if *rext != ext || *rkeys != keys => {
                    let what = format!(
                        "{} has schema {}, input {r}'s is {}",
                        lay.meta_path(idx).display(),
                        schema_of(&ext, &keys),
                        schema_of(rext, rkeys)
                    );
                    return Err(if *r == i {
                        DatasetError::invalid(lay.meta_path(idx).display().to_string(), what)
                    } else {
                        DatasetError::Mismatch { input: i, what }
                    });
                }
                Some(_) => {}
            }
            if let Some(f) = &options.filter {
                let v = fields::filter_number(fields::lookup_in(&meta, &f.field), &f.field)
                    .map_err(|reason| filter_error(&lay, idx, reason))?;
                if !f.keeps(v) {
                    s.filtered += 1;
                    continue;
                }
            }
            if !options.dedup.is_empty() {
                let mut key = fields::KeyHasher::new();
                for f in &options.dedup {
                    if f == FILE_FIELD {
                        key.bytes(&layout::file_digest(&lay, idx)?);
                    } else {
                        let v = fields::lookup_in(&meta, f).ok_or_else(|| {
                            filter_error(&lay, idx, format!("no field `{f}` to de-duplicate on"))
                        })?;
                        key.value(v);
                    }
                }
                if !seen.insert(key.finish()) {
                    s.duplicates += 1;
                    continue;
                }
            }

            let new = s.samples;
            let name = episode_name(new, &ext);
            let dst = out_eps.join(&name);
            let f = File::create_new(&dst).map_err(DatasetError::io("create", &dst))?;
            let mut w = BufWriter::with_capacity(WRITE_BUF, f);
            s.bytes_written += layout::check_episode(&lay, idx, Some((&mut w, &dst)))?;
            let f = w.into_inner().map_err(|e| DatasetError::Io {
                op: "write",
                path: dst.clone(),
                source: e.into_error(),
            })?;
            f.sync_all().map_err(DatasetError::io("sync", &dst))?;

            meta.insert("episode_idx".into(), Value::from(new));
            meta.insert("filepath".into(), Value::from(format!("{EPISODES}/{name}")));
            let mut source = Map::new();
            source.insert("input".into(), Value::from(i as u64));
            source.insert("episode_idx".into(), Value::from(idx));
            meta.insert("source".into(), Value::Object(source));
            s.bytes_written += write_json(&out_meta.join(meta_name(new)), meta)?;

            s.samples += 1;
            if s.samples >= options.limit {
                break 'inputs;
            }
        }
    }
    let merged = summary::merge_summaries(&summaries, s.samples)?;
    s.bytes_written += write_json(&out_meta.join(SUMMARY), merged)?;
    for d in [&out_eps, &out_meta, &out.to_path_buf()] {
        // Make the new names durable (best effort where directories cannot be opened).
        if let Ok(dir) = File::open(d) {
            dir.sync_all().map_err(DatasetError::io("sync", d))?;
        }
    }
    Ok(s)
}

/// Writes an object as indented JSON (keys in serde_json's map order) and a newline to a new
/// file; returns the bytes written.
fn write_json(path: &Path, m: Map<String, Value>) -> Result<u64, DatasetError> {
    let mut data =
        serde_json::to_vec_pretty(&Value::Object(m)).map_err(|e| DatasetError::Unsupported {
            reason: format!("{}: cannot write JSON: {e}", path.display()),
        })?;
    data.push(b'\n');
    let mut f = File::create_new(path).map_err(DatasetError::io("create", path))?;
    f.write_all(&data)
        .map_err(DatasetError::io("write", path))?;
    f.sync_all().map_err(DatasetError::io("sync", path))?;
    Ok(data.len() as u64)
}

/// [`crate::examine`] for episode directories: every problem of the layout, the summary,
/// each metadata file and each episode file reported with its path; per episode (numbered in
/// index order) `file_bytes` and the numeric fields of its metadata's `statistics`
/// (`statistics.num_timesteps`, arrays of numbers element by element). Returns the number of
/// episode files. An error only when the directory cannot be walked at all.
pub fn examine(path: &Path, observer: &mut dyn Observer) -> Result<u64, DatasetError> {
    let lay = layout::scan(path)?;
    for p in &lay.problems {
        observer.problem(&p.path, &p.reason);
    }
    let report = |observer: &mut dyn Observer, e: DatasetError| match e {
        DatasetError::Invalid { path, reason } | DatasetError::Filter { path, reason } => {
            observer.problem(&path, &reason)
        }
        DatasetError::Io { op, path, source } => observer.problem(
            &path.display().to_string(),
            &format!("cannot {op}: {source}"),
        ),
        e => observer.problem(&lay.root.display().to_string(), &e.to_string()),
    };
    if lay.has_summary
        && let Err(e) = layout::read_summary(path)
    {
        report(observer, e);
    }
    let mut keys: Option<Vec<String>> = None;
    let mut n = 0u64;
    for &idx in lay.episodes.keys() {
        observer.sample(n);
        n += 1;
        match layout::check_episode(&lay, idx, None) {
            Ok(len) => observer.values("file_bytes", &[len as f64]),
            Err(e) => {
                if let Ok(m) = std::fs::metadata(lay.episode_path(idx)) {
                    observer.values("file_bytes", &[m.len() as f64]);
                }
                report(observer, e);
            }
        }
        if !lay.metas.contains(&idx) {
            continue; // Reported by the layout scan.
        }
        let meta = match layout::read_meta(&lay, idx) {
            Ok(m) => m,
            Err(e) => {
                report(observer, e);
                continue;
            }
        };
        match &keys {
            None => keys = Some(layout::statistics_keys(&meta)),
            Some(k) => {
                if let Err(reason) = check_keys(&meta, k) {
                    observer.problem(&lay.meta_path(idx).display().to_string(), &reason);
                }
            }
        }
        if let Some(stats) = meta.get("statistics") {
            fields::numeric_fields("statistics", stats, &mut |name, vals| {
                observer.values(name, vals)
            });
        }
    }
    Ok(n)
}
