//! The `lerobot` format: a LeRobot v3.0 dataset, as lerobot's `LeRobotDataset` writes it
//! (checked against lerobot 0.4.4): `meta/info.json`, `meta/tasks.parquet`,
//! `meta/episodes/chunk-*/file-*.parquet`, `meta/stats.json`, `data/chunk-*/file-*.parquet`
//! and `videos/<key>/chunk-*/file-*.mp4`. A sample is an episode.
//!
//! `inspect` checks the layout (version, features, fps, every file the episode table names,
//! every frame row where the table says it is, totals that agree) without trusting any count
//! the round states; `merge` writes one v3.0 dataset (see [`merge`]); `examine` reports the
//! dataset's facts, each episode's fields and frame values, and checks every video file's
//! structure without decoding it. Episodes are filtered and de-duplicated on their fields (see
//! [`select`]). With `video_files_size_in_mb`, video files are appended into fewer, larger
//! ones without re-encoding (see [`mp4_concat`]). Reading v2.1 datasets is not done yet.

mod data;
mod examine;
mod merge;
mod meta;
mod mp4_box;
mod mp4_concat;
mod mp4_trim;
mod select;
mod stats;
mod videos;

use std::path::{Path, PathBuf};

use crate::{DatasetError, Filter, Inspection, MergeOptions, MergeSummary, Observer};
use meta::{Episode, Info};

/// What `inspect` checks but the videos and `meta/stats.json`: the info, episode table and
/// tasks it read.
fn check_layout(root: &Path) -> Result<(Info, Vec<Episode>, Vec<String>), DatasetError> {
    if !root.join("meta/info.json").is_file() {
        return Err(DatasetError::invalid(
            root.display().to_string(),
            "no meta/info.json: a LeRobot dataset's root holds meta/, data/ and videos/ (point generator.output at the dataset's root)",
        ));
    }
    let info = Info::read(root)?;
    let eps = meta::read_episodes(root, &info)?;
    let tasks = meta::read_tasks(root)?;
    for e in &eps {
        if let Some(t) = e.tasks.iter().find(|t| !tasks.contains(t)) {
            return Err(DatasetError::invalid(
                meta::label(root, "meta/tasks.parquet"),
                format!(
                    "episode {} names task {t:?}, which is not listed here",
                    e.index
                ),
            ));
        }
    }
    let mut rows = data::RowCheck::new(&eps);
    for f in meta::data_files(&eps) {
        data::scan(root, f, &mut rows)?;
    }
    rows.finish(root, |_| true)?;
    Ok((info, eps, tasks))
}

/// Everything `inspect` checks; the info and episode table it read.
fn check(root: &Path) -> Result<(Info, Vec<Episode>), DatasetError> {
    let (info, eps, _) = check_layout(root)?;
    for (k, key) in info.video_keys.iter().enumerate() {
        for f in meta::video_files(&eps, k) {
            videos::check(root, key, f)?;
        }
    }
    if !eps.is_empty() {
        stats::read_json(root)?;
    }
    Ok((info, eps))
}

/// Checks a round's dataset and counts its episodes, and those passing `filter`.
pub fn inspect(root: &Path, filter: Option<&Filter>) -> Result<Inspection, DatasetError> {
    let (info, eps) = check(root)?;
    let n = eps.len() as u64;
    let kept = match filter {
        Some(f) if !eps.is_empty() => select::filter_values(root, &eps, f)?
            .into_iter()
            .filter(|v| f.keeps(*v))
            .count() as u64,
        _ => n,
    };
    Ok(Inspection {
        count: n,
        kept,
        schema: info.schema(),
    })
}

/// Merges rounds into one LeRobot v3.0 dataset at `out` (see the `merge` module).
pub fn merge(
    inputs: &[PathBuf],
    _counts: &[u64],
    options: &MergeOptions,
    out: &Path,
) -> Result<MergeSummary, DatasetError> {
    merge::merge(inputs, options, out)
}

/// Walks a dataset: the layout checks of `inspect` (a failure stops the walk), the
/// dataset's facts (fps, robot type, totals, tasks, features, video keys), each episode as a
/// sample (`length`, `tasks`, the episode table's scalar numeric columns, every element of its
/// frames' numeric features), then every video file checked without decoding it and
/// `meta/stats.json` read, each failure a problem (see the `examine` module).
pub fn examine(root: &Path, observer: &mut dyn Observer) -> Result<u64, DatasetError> {
    let (info, eps, tasks) = check_layout(root)?;
    examine::examine(root, &info, &eps, &tasks, observer)?;
    if !eps.is_empty()
        && let Err(e) = stats::read_json(root)
    {
        match e {
            DatasetError::Invalid { path, reason } => observer.problem(&path, &reason),
            e => observer.problem(&meta::label(root, "meta/stats.json"), &e.to_string()),
        }
    }
    Ok(eps.len() as u64)
}
