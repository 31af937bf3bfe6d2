//! Writes an object's final: its committed rounds in round order, truncated to the quota,
//! streamed through the format-aware merge with bounded memory. The final is complete and
//! durable (fsync, then rename) before any intermediate is deleted; a crash at any point leaves
//! either no final (and every round still staged) or the whole final.
//!
//! On a local directory store the merge reads the staged rounds and writes the finals in place.
//! On a remote store (S3) it downloads the rounds into a scratch directory, merges the same way
//! into a local file, and uploads that under each final key (an object appears whole or not at
//! all); the scratch directory is removed afterwards, and its disk use peaks at the rounds plus
//! the final.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use quarry_common::storage::{Store, StoreError, keys};
use quarry_formats::npy;

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
        source: npy::FormatError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{object}: committed round {round} records no files")]
    NoFiles { object: String, round: u32 },
    #[error("merge task stopped: {0}")]
    Join(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MergeError + 'a {
    move |source| MergeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The final keys of an object for the job's `final_dir_mode`.
pub fn final_keys(spec: &JobSpec, object: &str, seed_min: i64, seed_max: i64) -> Vec<String> {
    let seed = keys::final_seed(&spec.exp_name, object, seed_min, seed_max);
    let plain = keys::final_plain(&spec.exp_name, object);
    match spec.final_dir_mode {
        FinalDirMode::SeedOnly => vec![seed],
        FinalDirMode::PlainOnly => vec![plain],
        FinalDirMode::Both => vec![seed, plain],
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
    let (samples, bytes) = match local_paths(store, &input_keys, &finals) {
        Some((inputs, outs)) => run_merge(object, inputs, counts, plan.limit, outs).await?,
        None => merge_remote(store, object, &input_keys, counts, plan.limit, &finals).await?,
    };
    Ok(MergeRecord {
        finals,
        count: samples,
        rounds,
        seed_min,
        seed_max,
        sha256: String::new(),
        bytes,
        cleaned: false,
        complete: plan.complete,
        unix_ms,
    })
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

/// [`merge_files`] off the async runtime.
async fn run_merge(
    object: &str,
    inputs: Vec<PathBuf>,
    counts: Vec<u64>,
    limit: u64,
    outs: Vec<PathBuf>,
) -> Result<(u64, u64), MergeError> {
    let object = object.to_string();
    tokio::task::spawn_blocking(move || merge_files(&object, &inputs, &counts, limit, &outs))
        .await
        .map_err(|e| MergeError::Join(e.to_string()))?
}

/// The merge for a remote store: download the rounds into a scratch directory, merge them into
/// one local file, upload it under every final key with create-only semantics
/// ([`Store::put_file_create`]: a merge redone after a crash finds the same bytes and succeeds).
async fn merge_remote(
    store: &Store,
    object: &str,
    input_keys: &[&str],
    counts: Vec<u64>,
    limit: u64,
    finals: &[String],
) -> Result<(u64, u64), MergeError> {
    let scratch = tempfile::Builder::new()
        .prefix("quarry-merge-")
        .tempdir()
        .map_err(io_err("create scratch directory in", &std::env::temp_dir()))?;
    let mut inputs = Vec::with_capacity(input_keys.len());
    for (i, key) in input_keys.iter().enumerate() {
        let local = scratch.path().join(format!("rounds/{i}.npy"));
        store.download_to(key, &local).await?;
        inputs.push(local);
    }
    let merged = scratch.path().join("final").join(format!("{object}.npy"));
    let (samples, bytes) = run_merge(object, inputs, counts, limit, vec![merged.clone()]).await?;
    for key in finals {
        store.put_file_create(key, &merged).await?;
    }
    // Dropping `scratch` removes it; close() reports a failure instead of ignoring it.
    let path = scratch.path().to_path_buf();
    scratch.close().map_err(io_err("remove", &path))?;
    Ok((samples, bytes))
}

/// Merges into a temporary file beside the first final, makes it durable, then publishes it
/// under every final name with a rename (atomic on one filesystem).
pub fn merge_files(
    object: &str,
    inputs: &[PathBuf],
    counts: &[u64],
    limit: u64,
    outs: &[PathBuf],
) -> Result<(u64, u64), MergeError> {
    let Some(first) = outs.first() else {
        return Ok((0, 0));
    };
    let dir = first.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let tmp = dir.join(format!(".{object}.npy.quarry-tmp"));
    let out = File::create(&tmp).map_err(io_err("create", &tmp))?;
    let summary =
        npy::merge(counts, limit, |i| File::open(&inputs[i]), &out).map_err(|source| {
            MergeError::Format {
                object: object.into(),
                source,
            }
        })?;
    out.sync_all().map_err(io_err("sync", &tmp))?;
    drop(out);
    for extra in &outs[1..] {
        let d = extra.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(d).map_err(io_err("create", d))?;
        let t = d.join(format!(".{object}.npy.quarry-tmp"));
        std::fs::copy(&tmp, &t).map_err(io_err("copy", &t))?;
        File::open(&t)
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", &t))?;
        std::fs::rename(&t, extra).map_err(io_err("rename", extra))?;
    }
    std::fs::rename(&tmp, first).map_err(io_err("rename", first))?;
    // The rename is durable once the directory entry is.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))?;
    Ok((summary.samples, summary.bytes_written))
}
