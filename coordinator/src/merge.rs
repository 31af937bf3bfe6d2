//! Writes an object's final: its committed rounds in round order, filtered and de-duplicated as
//! the job asks, cut to the quota, through the format's merge (`quarry_formats`) with bounded
//! memory. The final is complete and durable (fsync, then rename) before any intermediate is
//! deleted; a crash at any point leaves either no final (and every round still staged) or the
//! whole final.
//!
//! On a local directory store the merge reads the staged rounds and writes the finals in place.
//! On a remote store (S3) it downloads the rounds into a scratch directory, merges the same way
//! into a local file, and uploads that under each final key (an object appears whole or not at
//! all; a directory dataset is uploaded file by file under the final's key, which becomes its
//! prefix); the scratch directory is removed afterwards, and its disk use peaks at the rounds
//! plus the final. Directory datasets (zarr, episodes) are staged as one tar archive per round
//! and unpacked into scratch before the merge.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use quarry_common::storage::{self, Store, StoreError, keys};
use quarry_formats::{DatasetError, Format, MergeOptions, MergeSummary, archive};
use sha2::{Digest, Sha256};

use crate::job::MergePlan;
use crate::spec::{FinalDirMode, JobSpec};
use crate::state::{MergeRecord, StateError, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("merging {object}: {source}")]
    Format {
        object: String,
        #[source]
        source: DatasetError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The committed round's own bytes cannot be merged (malformed, cut short, or holding
    /// other than its committed count): the round, not the infrastructure, is at fault, so
    /// retrying cannot help; the coordinator quarantines it and plans again.
    #[error("{object}: committed round {round} cannot be merged: {reason}")]
    BadRound {
        object: String,
        round: u32,
        reason: String,
    },
    /// The job's `merge.filter` or `merge.dedup` fields do not fit what the generator writes:
    /// every committed round of the object fails on them when merged alone (a field stored
    /// with a codec Quarry does not decode, say). No retry or re-run can help; the
    /// coordinator stops the job with this message.
    #[error(
        "merging {object}: the job's merge fields do not fit the rounds the generator writes: {reason}"
    )]
    JobFields { object: String, reason: String },
    #[error("{object}: committed round {round} records no files")]
    NoFiles { object: String, round: u32 },
    #[error("the job's spec no longer validates: {0}")]
    Spec(String),
    #[error("merge task stopped: {0}")]
    Join(String),
}

/// Round files downloaded at once by a merge from a remote store.
const PARALLEL_DOWNLOADS: usize = 16;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MergeError + 'a {
    move |source| MergeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The final's file (or directory) name: `<object>` plus the output's extension
/// (`mug.npy`, `mug.hdf5`, `mug.zarr`); an episode directory without one is named `<object>`.
pub fn final_name(spec: &JobSpec, object: &str) -> String {
    let out = &spec.generator.output;
    let file = out.rsplit('/').next().unwrap_or(out);
    match file.rsplit_once('.') {
        Some((_, ext)) if Format::from_extension(file).is_some() => format!("{object}.{ext}"),
        _ => object.to_string(),
    }
}

/// Where an object's final is written when it completes: `final/<object>/<name>`, or for
/// `seed_per_object` its own `final_seed_<min>-<max>/<object>/<name>`. In `seed_only` and
/// `both` the run's finals move (or are copied) under one seed-tagged directory when the run
/// ends ([`crate::final_layout`]).
pub fn final_keys(spec: &JobSpec, object: &str, seed_min: i64, seed_max: i64) -> Vec<String> {
    let name = final_name(spec, object);
    match spec.final_dir_mode {
        FinalDirMode::SeedPerObject => vec![keys::final_seed(
            &spec.exp_name,
            object,
            seed_min,
            seed_max,
            &name,
        )],
        FinalDirMode::SeedOnly | FinalDirMode::Both | FinalDirMode::PlainOnly => {
            vec![keys::final_plain(&spec.exp_name, object, &name)]
        }
    }
}

/// Merges (unless a durable final is already recorded), then deletes the object's
/// intermediates unless the job keeps them. Idempotent: safe to call again after a crash.
pub async fn merge_object(
    store: &Store,
    state: &dyn StateStore,
    spec: &JobSpec,
    object: &str,
    plan: &MergePlan,
) -> Result<MergeRecord, MergeError> {
    let job = spec.exp_name.as_str();
    let mut record = match state.load_object(job, object).await?.merge {
        Some(m) => m,
        None => {
            let m = write_final(store, spec, object, plan).await?;
            state.record_merge(job, object, &m).await?;
            m
        }
    };
    if !record.cleaned {
        if !spec.keep_intermediate {
            store
                .delete_prefix(&keys::object_rounds(job, object))
                .await?;
        }
        record.cleaned = true;
        state.record_merge(job, object, &record).await?;
    }
    Ok(record)
}

async fn write_final(
    store: &Store,
    spec: &JobSpec,
    object: &str,
    plan: &MergePlan,
) -> Result<MergeRecord, MergeError> {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let rounds: Vec<u32> = plan.rounds.iter().map(|c| c.round).collect();
    if plan.rounds.is_empty() {
        // Every round was quarantined: nothing to merge, and no dtype to write an empty file with.
        return Ok(MergeRecord {
            finals: vec![],
            count: 0,
            rounds,
            seed_min: 0,
            seed_max: 0,
            sha256: String::new(),
            bytes: 0,
            cleaned: false,
            complete: plan.complete,
            unix_ms,
            filtered: 0,
            duplicates: 0,
            publish_to: None,
        });
    }
    let seed_min = plan.rounds.iter().map(|c| c.seed).min().unwrap_or_default();
    let seed_max = plan.rounds.iter().map(|c| c.seed).max().unwrap_or_default();
    let finals = final_keys(spec, object, seed_min, seed_max);
    let mut input_keys = Vec::with_capacity(plan.rounds.len());
    for c in &plan.rounds {
        let Some(f) = c.files.first() else {
            return Err(MergeError::NoFiles {
                object: object.into(),
                round: c.round,
            });
        };
        input_keys.push(f.key.as_str());
    }
    let counts: Vec<u64> = plan.rounds.iter().map(|c| c.count).collect();
    let format = spec.format().map_err(|e| MergeError::Spec(e.to_string()))?;
    let job = Job {
        object: object.to_string(),
        format,
        rounds: plan.rounds.iter().map(|c| c.round).collect(),
        counts,
        options: MergeOptions {
            limit: plan.limit,
            filter: spec.merge.parsed_filter(),
            dedup: spec.merge.dedup.clone(),
            video_files_size_in_mb: spec.merge.video_files_size_in_mb.map(|m| m.0),
        },
    };
    let (summary, sha256) = match local_paths(store, &input_keys, &finals) {
        Some((inputs, outs)) => merge_local(job, inputs, outs).await?,
        None => merge_remote(store, job, &input_keys, &finals).await?,
    };
    Ok(MergeRecord {
        finals,
        count: summary.samples,
        rounds,
        seed_min,
        seed_max,
        sha256,
        bytes: summary.bytes_written,
        cleaned: false,
        complete: plan.complete,
        unix_ms,
        filtered: summary.filtered,
        duplicates: summary.duplicates,
        publish_to: None,
    })
}

/// What to merge, apart from where the inputs are.
struct Job {
    object: String,
    format: Format,
    /// The round of each input.
    rounds: Vec<u32>,
    /// Samples in each input, as committed.
    counts: Vec<u64>,
    options: MergeOptions,
}

/// The local files behind the inputs and the finals, when the store is a local directory.
fn local_paths(
    store: &Store,
    inputs: &[&str],
    finals: &[String],
) -> Option<(Vec<PathBuf>, Vec<PathBuf>)> {
    let inputs = inputs
        .iter()
        .map(|k| store.local_path(k))
        .collect::<Option<_>>()?;
    let outs = finals
        .iter()
        .map(|k| store.local_path(k))
        .collect::<Option<_>>()?;
    Some((inputs, outs))
}

/// The merge for a local directory store: inputs read where they are staged (archives
/// unpacked into scratch beside the final first), the final written beside its place and
/// renamed into it.
async fn merge_local(
    job: Job,
    inputs: Vec<PathBuf>,
    outs: Vec<PathBuf>,
) -> Result<(MergeSummary, String), MergeError> {
    tokio::task::spawn_blocking(move || {
        let Some(first) = outs.first() else {
            return Ok((MergeSummary::default(), String::new()));
        };
        let dir = first.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let scratch = Scratch::new(dir, &job.object)?;
        let inputs = scratch.unpacked(&job, inputs)?;
        let tmp = scratch.path.join("final");
        let summary = merge_into(&job, &inputs, &tmp)?;
        let sha = digest(&tmp)?;
        publish(&tmp, &outs, job.format.is_directory())?;
        scratch.remove()?;
        Ok((summary, sha))
    })
    .await
    .map_err(|e| MergeError::Join(e.to_string()))?
}

/// The merge for a remote store: download the rounds into a scratch directory, merge them into
/// a local file (or directory), upload it under every final key with create-only semantics
/// ([`Store::put_file_create`]: a merge redone after a crash finds the same bytes and succeeds).
async fn merge_remote(
    store: &Store,
    job: Job,
    input_keys: &[&str],
    finals: &[String],
) -> Result<(MergeSummary, String), MergeError> {
    let scratch = tempfile::Builder::new()
        .prefix("quarry-merge-")
        .tempdir()
        .map_err(io_err("create scratch directory in", &std::env::temp_dir()))?;
    // Several downloads at once: on S3 each costs a round trip, and an object has hundreds.
    let rounds_dir = scratch.path().join("rounds");
    let downloads: Vec<_> = input_keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let (store, key, local) = (
                store.clone(),
                key.to_string(),
                rounds_dir.join(i.to_string()),
            );
            async move { store.download_to(&key, &local).await.map(|_| local) }
        })
        .collect();
    let inputs: Vec<PathBuf> = futures::stream::iter(downloads)
        .buffered(PARALLEL_DOWNLOADS)
        .try_collect()
        .await?;
    let root = scratch.path().to_path_buf();
    let directory = job.format.is_directory();
    let (summary, sha, merged) = tokio::task::spawn_blocking(move || {
        let s = Scratch {
            path: root.join("work"),
        };
        std::fs::create_dir(&s.path).map_err(io_err("create", &s.path))?;
        let inputs = s.unpacked(&job, inputs)?;
        let merged = s.path.join("final");
        let summary = merge_into(&job, &inputs, &merged)?;
        let sha = digest(&merged)?;
        Ok::<_, MergeError>((summary, sha, merged))
    })
    .await
    .map_err(|e| MergeError::Join(e.to_string()))??;
    for key in finals {
        if directory {
            for (rel, path) in files_under(&merged)? {
                store
                    .put_file_create(&format!("{key}/{rel}"), &path)
                    .await?;
            }
        } else {
            store.put_file_create(key, &merged).await?;
        }
    }
    // Dropping `scratch` removes it; close() reports a failure instead of ignoring it.
    let path = scratch.path().to_path_buf();
    scratch.close().map_err(io_err("remove", &path))?;
    Ok((summary, sha))
}

/// The final's sha256 (hex): of the file, or, for a directory, of its `sha256sum`-style
/// listing (`<sha256 of the file>  <path relative to the directory>` lines in path order), so
/// `find . -type f | sort | xargs sha256sum` over the final reproduces it.
fn digest(path: &Path) -> Result<String, MergeError> {
    let file_sha = |p: &Path| {
        storage::hash_file(p)
            .map(|h| h.sha256)
            .map_err(io_err("hash", p))
    };
    if !path.is_dir() {
        return file_sha(path);
    }
    let mut listing = Sha256::new();
    for (rel, p) in files_under(path)? {
        listing.update(format!("{}  ./{rel}\n", file_sha(&p)?).as_bytes());
    }
    Ok(storage::hex(&listing.finalize()))
}

/// A scratch directory for one merge, removed when the merge is done (and, after a crash, by
/// the next merge of the same object).
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// `.<object>.quarry-merge` in `dir`, emptied first: what a crashed merge left is redone.
    fn new(dir: &Path, object: &str) -> Result<Scratch, MergeError> {
        let path = dir.join(format!(".{object}.quarry-merge"));
        remove_any(&path)?;
        std::fs::create_dir(&path).map_err(io_err("create", &path))?;
        Ok(Scratch { path })
    }

    /// The merge inputs: the staged files themselves, or, for directory formats, each
    /// archive unpacked into the scratch directory.
    fn unpacked(&self, job: &Job, inputs: Vec<PathBuf>) -> Result<Vec<PathBuf>, MergeError> {
        if !job.format.is_directory() {
            return Ok(inputs);
        }
        let dir = self.path.join("in");
        std::fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        inputs
            .iter()
            .enumerate()
            .map(|(i, ar)| {
                let to = dir.join(i.to_string());
                archive::unpack(ar, &to).map_err(|source| match round_at_fault(&source) {
                    true => MergeError::BadRound {
                        object: job.object.clone(),
                        round: job.rounds[i],
                        reason: format!("its archive does not unpack: {source}"),
                    },
                    false => MergeError::Format {
                        object: format!("round archive {}", ar.display()),
                        source,
                    },
                })?;
                Ok(to)
            })
            .collect()
    }

    fn remove(self) -> Result<(), MergeError> {
        remove_any(&self.path)
    }
}

pub(crate) fn remove_any(path: &Path) -> Result<(), MergeError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(io_err("remove", path)),
        Ok(_) => std::fs::remove_file(path).map_err(io_err("remove", path)),
        Err(_) => Ok(()),
    }
}

/// Runs the format's merge into `out` and makes the result durable. A merge that fails on
/// the data is blamed on the first round whose own file is malformed or holds other than its
/// committed count ([`MergeError::BadRound`]); one no round explains stays a
/// [`MergeError::Format`] and is retried.
fn merge_into(job: &Job, inputs: &[PathBuf], out: &Path) -> Result<MergeSummary, MergeError> {
    let summary = match quarry_formats::merge(job.format, inputs, &job.counts, &job.options, out) {
        Ok(s) => s,
        Err(source) => {
            if let DatasetError::Filter { .. } = source
                && let Some(e) = fields_misfit(job, inputs, out)
            {
                return Err(e);
            }
            return Err(match culprit(job, inputs, out, &source) {
                Some((i, reason)) => MergeError::BadRound {
                    object: job.object.clone(),
                    round: job.rounds[i],
                    reason,
                },
                None => MergeError::Format {
                    object: job.object.clone(),
                    source,
                },
            });
        }
    };
    sync_tree(out)?;
    Ok(summary)
}

/// The verdict on a merge that failed on the job's filter or de-duplication fields
/// ([`DatasetError::Filter`]): when every round fails on them merged alone, the job's fields
/// are at fault ([`MergeError::JobFields`]); when only some do, the first of those is
/// ([`MergeError::BadRound`]: its generator run wrote something the others did not). `None`
/// when no round fails alone (the failure lies elsewhere).
fn fields_misfit(job: &Job, inputs: &[PathBuf], out: &Path) -> Option<MergeError> {
    let mut first = None;
    let mut failing = 0;
    for (i, r) in merged_alone(job, inputs, out) {
        if let Err(e @ DatasetError::Filter { .. }) = r {
            failing += 1;
            first.get_or_insert((i, e.to_string()));
        }
    }
    let (i, reason) = first?;
    Some(if failing == inputs.len() {
        MergeError::JobFields {
            object: job.object.clone(),
            reason,
        }
    } else {
        MergeError::BadRound {
            object: job.object.clone(),
            round: job.rounds[i],
            reason,
        }
    })
}

/// The input (and why) that a failed merge is the fault of: the first whose own inspection
/// fails on its bytes or counts other than its commit says; failing that, the input a
/// mismatch names (it disagrees with the rounds before it), the input holding the file a
/// malformed-data error names, or, when the library died in the
/// merge ([`DatasetError::Crashed`]: a file that inspects but crashes libhdf5 when copied),
/// the first input whose merge alone dies too. `None` when the failure lies elsewhere (the
/// output's disk, a read error of the machine).
fn culprit(
    job: &Job,
    inputs: &[PathBuf],
    out: &Path,
    failure: &DatasetError,
) -> Option<(usize, String)> {
    if !round_at_fault(failure) {
        return None;
    }
    let filter = job.options.filter.as_ref();
    for (i, path) in inputs.iter().enumerate() {
        match quarry_formats::inspect(job.format, path, filter) {
            Ok(got) if got.count != job.counts[i] => {
                return Some((
                    i,
                    format!(
                        "its file holds {} samples but {} were committed ({failure})",
                        got.count, job.counts[i]
                    ),
                ));
            }
            Ok(_) => {}
            Err(e) if round_at_fault(&e) => return Some((i, e.to_string())),
            // The machine, not the file: no verdict on this round.
            Err(_) => return None,
        }
    }
    if let DatasetError::Crashed { .. } = failure {
        return merged_alone(job, inputs, out).find_map(|(i, r)| match r {
            Err(DatasetError::Crashed { reason, .. }) => {
                Some((i, format!("merged alone, {reason}")))
            }
            _ => None,
        });
    }
    let named = match failure {
        DatasetError::Mismatch { input, .. } => Some(*input),
        DatasetError::Npy(e) => e.input_index(),
        // A file of one round that its inspection does not read whole (a LeRobot video
        // file's tables, read only to cut or append it).
        DatasetError::Invalid { path, .. } => inputs
            .iter()
            .position(|input| Path::new(path).starts_with(input)),
        _ => None,
    };
    named
        .filter(|i| *i < inputs.len())
        .map(|i| (i, failure.to_string()))
}

/// Each input merged alone (its committed count, the job's filter and de-duplication) beside
/// `out`, lazily, in input order: how each merge ended. The trial output is removed after
/// each.
fn merged_alone<'a>(
    job: &'a Job,
    inputs: &'a [PathBuf],
    out: &Path,
) -> impl Iterator<Item = (usize, Result<(), DatasetError>)> + 'a {
    let alone = out.with_file_name(format!(
        "{}.alone",
        out.file_name()
            .map_or("final".into(), |n| n.to_string_lossy())
    ));
    inputs.iter().enumerate().map(move |(i, input)| {
        let options = MergeOptions {
            limit: job.counts[i],
            ..job.options.clone()
        };
        let _ = remove_any(&alone);
        let r = quarry_formats::merge(
            job.format,
            std::slice::from_ref(input),
            &job.counts[i..=i],
            &options,
            &alone,
        );
        let _ = remove_any(&alone);
        (i, r.map(|_| ()))
    })
}

/// Whether a dataset error lies in the data rather than in the machine: everything but an
/// I/O error other than a missing file or one that ends too soon.
fn round_at_fault(e: &DatasetError) -> bool {
    let io = match e {
        DatasetError::Io { source, .. } => source,
        DatasetError::Npy(f) => match f.root() {
            quarry_formats::npy::FormatError::Io(source) => source,
            _ => return true,
        },
        _ => return true,
    };
    matches!(
        io.kind(),
        std::io::ErrorKind::NotFound
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::InvalidData
    )
}

/// A directory tree as one walk sees it.
struct Tree {
    /// Every file with its path relative to the root (`/`-separated), in path order.
    files: Vec<(String, PathBuf)>,
    /// Every directory, the root first, with its path relative to the root.
    dirs: Vec<(String, PathBuf)>,
}

/// Walks the tree under `dir` once.
fn walk(dir: &Path) -> Result<Tree, MergeError> {
    let mut tree = Tree {
        files: Vec::new(),
        dirs: Vec::new(),
    };
    let mut stack = vec![(String::new(), dir.to_path_buf())];
    while let Some((rel, abs)) = stack.pop() {
        for e in std::fs::read_dir(&abs).map_err(io_err("list", &abs))? {
            let e = e.map_err(io_err("list", &abs))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let child_rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let child = e.path();
            if child.is_dir() {
                stack.push((child_rel, child));
            } else {
                tree.files.push((child_rel, child));
            }
        }
        tree.dirs.push((rel, abs));
    }
    tree.files.sort();
    Ok(tree)
}

/// Every file under `dir` with its path relative to it (`/`-separated), in path order.
fn files_under(dir: &Path) -> Result<Vec<(String, PathBuf)>, MergeError> {
    Ok(walk(dir)?.files)
}

/// fsyncs a file, or every file and directory under a directory.
pub(crate) fn sync_tree(path: &Path) -> Result<(), MergeError> {
    if !path.is_dir() {
        return sync_path(path);
    }
    let tree = walk(path)?;
    for (_, p) in tree.files.iter().chain(&tree.dirs) {
        sync_path(p)?;
    }
    Ok(())
}

pub(crate) fn sync_path(p: &Path) -> Result<(), MergeError> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", p))
}

/// Moves the durable merged `tmp` into every final place: copies for all but the first, then
/// a rename into the first (atomic on one filesystem). A final left by a merge that crashed
/// after publishing but before recording is replaced (the merge is deterministic).
fn publish(tmp: &Path, outs: &[PathBuf], directory: bool) -> Result<(), MergeError> {
    let Some(first) = outs.first() else {
        return Ok(());
    };
    for extra in &outs[1..] {
        let d = extra.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(d).map_err(io_err("create", d))?;
        let name = extra.file_name().unwrap_or_default().to_string_lossy();
        let t = d.join(format!(".{name}.quarry-tmp"));
        remove_any(&t)?;
        copy_tree(tmp, &t)?;
        sync_tree(&t)?;
        if directory {
            remove_any(extra)?;
        }
        std::fs::rename(&t, extra).map_err(io_err("rename", extra))?;
        sync_path(d)?;
    }
    if directory {
        remove_any(first)?;
    }
    std::fs::rename(tmp, first).map_err(io_err("rename", first))?;
    // The rename is durable once the directory entry is.
    sync_path(first.parent().unwrap_or(Path::new(".")))
}

pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<(), MergeError> {
    if !from.is_dir() {
        std::fs::copy(from, to).map_err(io_err("copy", to))?;
        return Ok(());
    }
    let tree = walk(from)?;
    // Parents come before their children in `dirs` (the root first).
    for (rel, _) in &tree.dirs {
        let d = to.join(rel);
        std::fs::create_dir_all(&d).map_err(io_err("create", &d))?;
    }
    for (rel, src) in &tree.files {
        let dst = to.join(rel);
        std::fs::copy(src, &dst).map_err(io_err("copy", &dst))?;
    }
    Ok(())
}
