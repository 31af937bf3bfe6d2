//! The merge of LeRobot rounds into one v3.0 dataset: episodes in round order, filtered,
//! de-duplicated and cut at the quota; frames, episode rows and videos renumbered; tasks
//! unified; statistics combined.
//!
//! Each round's data file becomes one data file of the final and each of its video files one
//! video file (copied, its trailing dropped episodes' samples cut), under the final's next
//! (chunk, file) index, or, with `video_files_size_in_mb`, appended to the key's pending video
//! file while it stays under the size, its episodes' timestamps shifted (see
//! [`mp4_concat`](super::mp4_concat)); the episode table is one file. Memory is a record
//! batch per file in flight, plus the episode rows of one round's episode table batch, plus,
//! with appending, the pending video file's sample tables.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, LargeStringArray, RecordBatch, StringArray,
};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, SchemaRef};
use parquet::arrow::ArrowWriter;
use serde_json::{Value, json};

use super::data::{self, DataWriter, Renumber, RowCheck};
use super::meta::{self, Episode, Info, data_rel, label, nth_chunk_file, video_rel};
use super::mp4_concat::{Group, Part};
use super::{select, stats, videos};
use crate::{DatasetError, MergeOptions, MergeSummary};

/// One input as the merge sees it.
struct Round {
    root: PathBuf,
    info: Info,
    episodes: Vec<Episode>,
    /// Per episode, whether the final keeps it (it passes the filter, is no duplicate and
    /// comes before the quota).
    keep: Vec<bool>,
    /// How many are kept.
    kept: usize,
}

impl Round {
    fn kept(&self) -> impl Iterator<Item = &Episode> {
        self.episodes
            .iter()
            .zip(&self.keep)
            .filter_map(|(e, k)| k.then_some(e))
    }

    /// Whether episode `index` is kept (false for an index the round does not have).
    fn keeps(&self, index: i64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.keep.get(i))
            .copied()
            .unwrap_or(false)
    }
}

/// The fields every round must share with round 0, as lerobot's `validate_all_metadata`.
fn agree(first: &Info, other: &Info, input: usize) -> Result<(), DatasetError> {
    for (field, a, b) in [
        ("fps", &first.fps, &other.fps),
        ("robot_type", &first.robot_type, &other.robot_type),
        ("features", &first.features, &other.features),
    ] {
        if a != b {
            let (a, b) = (a.to_string(), b.to_string());
            let cut = |s: &str| s.chars().take(300).collect::<String>();
            return Err(DatasetError::Mismatch {
                input,
                what: format!(
                    "meta/info.json {field} is {} in this round but {} in round 0; every round of a job must record the same {field}",
                    cut(&b),
                    cut(&a)
                ),
            });
        }
    }
    Ok(())
}

pub fn merge(
    inputs: &[PathBuf],
    options: &MergeOptions,
    out: &Path,
) -> Result<MergeSummary, DatasetError> {
    // Read and check every contributing round first, and choose its episodes: filtered,
    // de-duplicated (first occurrence wins, in round order), then cut at the quota. A bad
    // round fails before anything is written.
    let mut rounds: Vec<Round> = Vec::new();
    let mut left = options.limit;
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    let (mut filtered, mut duplicates) = (0u64, 0u64);
    for (i, root) in inputs.iter().enumerate() {
        if left == 0 && !rounds.is_empty() {
            break;
        }
        let info = Info::read(root)?;
        if let Some(r0) = rounds.first() {
            agree(&r0.info, &info, i)?;
        }
        let episodes = meta::read_episodes(root, &info)?;
        // Episode by episode until the quota is met, as the streaming formats count: those
        // after it are neither filtered nor duplicates, just not reached.
        let values = match (&options.filter, episodes.is_empty()) {
            (Some(f), false) => Some(select::filter_values(root, &episodes, f)?),
            _ => None,
        };
        let digests = if options.dedup.is_empty() || episodes.is_empty() {
            None
        } else {
            Some(select::digests(root, &episodes, &options.dedup)?)
        };
        let mut keep = vec![false; episodes.len()];
        let mut kept = 0usize;
        for (e, k) in keep.iter_mut().enumerate() {
            if left == 0 {
                break;
            }
            if let (Some(f), Some(v)) = (&options.filter, values.as_ref().and_then(|v| v.get(e)))
                && !f.keeps(*v)
            {
                filtered += 1;
                continue;
            }
            if let Some(d) = digests.as_ref().and_then(|d| d.get(e))
                && !seen.insert(*d)
            {
                duplicates += 1;
                continue;
            }
            *k = true;
            kept += 1;
            left -= 1;
        }
        rounds.push(Round {
            root: root.clone(),
            info,
            episodes,
            keep,
            kept,
        });
    }
    let Some(first) = rounds.first() else {
        return Err(DatasetError::NoInputs);
    };
    let video_keys = first.info.video_keys.clone();
    let chunks_size = first.info.chunks_size;

    // Tasks in the order kept episodes first name them.
    let mut tasks: Vec<String> = Vec::new();
    let mut task_ix: HashMap<String, i64> = HashMap::new();
    for r in &rounds {
        for e in r.kept() {
            for t in &e.tasks {
                if !task_ix.contains_key(t) {
                    task_ix.insert(t.clone(), tasks.len() as i64);
                    tasks.push(t.clone());
                }
            }
        }
    }

    std::fs::create_dir_all(out.join("meta")).map_err(DatasetError::io("create", out))?;
    let ep_path = out.join("meta/episodes/chunk-000/file-000.parquet");
    let mut ep_writer: Option<(ArrowWriter<std::fs::File>, SchemaRef)> = None;
    let mut data_schema: Option<SchemaRef> = None;
    let mut stat_parts: Vec<stats::Stats> = Vec::new();
    let (mut ep_offset, mut frame_offset) = (0i64, 0i64);
    let mut data_n = 0i64;
    let mut video_n = vec![0i64; video_keys.len()];
    let video_limit = options
        .video_files_size_in_mb
        .map(|mb| (mb * MIB).max(0.0) as u64);
    let mut pending: Vec<Option<Pending>> = video_keys.iter().map(|_| None).collect();

    for r in &rounds {
        if r.kept == 0 {
            continue;
        }
        let root = &r.root;
        let kept: Vec<Episode> = r.kept().cloned().collect();
        let src_tasks = meta::read_tasks(root)?;
        for e in &kept {
            if let Some(t) = e.tasks.iter().find(|t| !src_tasks.contains(t)) {
                return Err(DatasetError::invalid(
                    label(root, "meta/tasks.parquet"),
                    format!(
                        "episode {} names task {t:?}, which is not listed here",
                        e.index
                    ),
                ));
            }
        }
        let renumber_tasks: Vec<Option<i64>> =
            src_tasks.iter().map(|t| task_ix.get(t).copied()).collect();
        // Per source episode: its number and first frame index in the final, when kept.
        let mut placed: Vec<Option<(i64, i64)>> = Vec::with_capacity(r.episodes.len());
        let (mut next_ep, mut next_frame) = (ep_offset, frame_offset);
        for (e, k) in r.episodes.iter().zip(&r.keep) {
            placed.push(k.then_some((next_ep, next_frame)));
            if *k {
                next_ep += 1;
                next_frame += e.length;
            }
        }
        let renumber_eps: Vec<Option<(i64, i64)>> = r
            .episodes
            .iter()
            .zip(&placed)
            .map(|(e, p)| p.map(|(ep, from)| (ep, from - e.from)))
            .collect();
        let renumber = Renumber {
            episodes: &renumber_eps,
            tasks: &renumber_tasks,
        };

        // Frames: one final data file per data file the kept episodes live in.
        let mut check = RowCheck::new(&r.episodes);
        let mut data_map: HashMap<(i64, i64), (i64, i64)> = HashMap::new();
        for src in meta::data_files(&kept) {
            let rel = data_rel(src.0, src.1);
            let schema = meta::parquet_schema(root, &rel)?;
            let schema = data_schema.get_or_insert(schema).clone();
            let dst = nth_chunk_file(data_n, chunks_size);
            data_n += 1;
            let dst_rel = data_rel(dst.0, dst.1);
            let mut w = DataWriter::create(&out.join(&dst_rel), schema)?;
            data::copy_rows(root, src, &mut check, &renumber, &mut w)?;
            w.close(&label(out, &dst_rel))?;
            data_map.insert(src, dst);
        }
        check.finish(root, |e| r.keeps(e.index))?;

        // Videos, under the final's next indices: a file whose last episodes are dropped
        // loses their trailing samples (cut half a frame before the next episode's first).
        // With merge.video_files_size_in_mb, files are appended into the key's pending file
        // while it stays under the size, their episodes' timestamps shifted by where they
        // start in it.
        let fps = r.info.fps.as_f64().unwrap_or(1.0);
        let mut video_maps: Vec<HashMap<(i64, i64), VideoPlace>> = Vec::new();
        for (k, key) in video_keys.iter().enumerate() {
            let mut m = HashMap::new();
            for src in meta::video_files(&kept, k) {
                let in_file =
                    |e: &&Episode| e.videos.get(k).is_some_and(|v| (v.chunk, v.file) == src);
                let last_kept = kept
                    .iter()
                    .filter(in_file)
                    .filter_map(|e| e.videos.get(k).map(|v| v.to_ts))
                    .fold(f64::NEG_INFINITY, f64::max);
                let dropped_after = r
                    .episodes
                    .iter()
                    .filter(|e| !r.keeps(e.index))
                    .filter(in_file)
                    .any(|e| {
                        e.videos
                            .get(k)
                            .is_some_and(|v| v.from_ts >= last_kept - 0.5 / fps)
                    });
                let cut = dropped_after.then_some(last_kept - 0.5 / fps);
                let place = match video_limit {
                    None => {
                        let dst = nth_chunk_file(video_n[k], chunks_size);
                        video_n[k] += 1;
                        videos::copy(root, out, key, src, dst, cut)?;
                        VideoPlace { dst, shift: 0.0 }
                    }
                    Some(limit) => {
                        let mut next = || {
                            let dst = nth_chunk_file(video_n[k], chunks_size);
                            video_n[k] += 1;
                            dst
                        };
                        append_video(root, out, key, src, cut, limit, &mut pending[k], &mut next)?
                    }
                };
                m.insert(src, place);
            }
            video_maps.push(m);
        }

        // Episode rows, renumbered; the per-episode statistics of a round not kept whole.
        let cut = r.kept < r.episodes.len();
        for rel in meta::episode_files(root)? {
            let at = label(root, &rel);
            let b = meta::open_parquet(root, &rel)?;
            let schema = b.schema().clone();
            let (w, w_schema) = match &mut ep_writer {
                Some(w) => w,
                None => {
                    if let Some(dir) = ep_path.parent() {
                        std::fs::create_dir_all(dir).map_err(DatasetError::io("create", dir))?;
                    }
                    let f = std::fs::File::create_new(&ep_path)
                        .map_err(DatasetError::io("create", &ep_path))?;
                    let w = ArrowWriter::try_new(f, schema.clone(), Some(data::props(&schema)))
                        .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
                    ep_writer.insert((w, schema.clone()))
                }
            };
            if !data::same_fields(&schema, w_schema) {
                return Err(DatasetError::invalid(
                    &at,
                    "its columns differ from the first round's episode table (the rounds record different features or statistics)",
                ));
            }
            let reader = b
                .build()
                .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
            for batch in reader {
                let batch = batch.map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
                let eps = meta::episodes_of(&batch, &r.info, &at)?;
                let keep: Vec<bool> = eps.iter().map(|e| r.keeps(e.index)).collect();
                if cut {
                    for (row, k) in keep.iter().enumerate() {
                        if *k {
                            stat_parts.push(stats::of_episode(&batch, row, &at)?);
                        }
                    }
                }
                let batch = filter_record_batch(&batch, &BooleanArray::from(keep))
                    .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
                let eps: Vec<&Episode> = eps.iter().filter(|e| r.keeps(e.index)).collect();
                if eps.is_empty() {
                    continue;
                }
                let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
                let mut set = |name: &str, v: Vec<i64>| -> Result<(), DatasetError> {
                    if let Ok(i) = batch.schema().index_of(name) {
                        cols[i] = Arc::new(Int64Array::from(v));
                    }
                    Ok(())
                };
                let missing = |what: &str, e: &Episode| {
                    DatasetError::invalid(
                        &at,
                        format!("episode {}: {what} was not copied", e.index),
                    )
                };
                let place: Vec<(i64, i64)> = eps
                    .iter()
                    .map(|e| {
                        usize::try_from(e.index)
                            .ok()
                            .and_then(|i| placed.get(i).copied().flatten())
                            .ok_or_else(|| missing("its place in the final", e))
                    })
                    .collect::<Result<_, _>>()?;
                set("episode_index", place.iter().map(|p| p.0).collect())?;
                set("dataset_from_index", place.iter().map(|p| p.1).collect())?;
                set(
                    "dataset_to_index",
                    place
                        .iter()
                        .zip(&eps)
                        .map(|(p, e)| p.1 + e.length)
                        .collect(),
                )?;
                let data_dst: Vec<(i64, i64)> = eps
                    .iter()
                    .map(|e| {
                        data_map
                            .get(&(e.data_chunk, e.data_file))
                            .copied()
                            .ok_or_else(|| missing("its data file", e))
                    })
                    .collect::<Result<_, _>>()?;
                set("data/chunk_index", data_dst.iter().map(|d| d.0).collect())?;
                set("data/file_index", data_dst.iter().map(|d| d.1).collect())?;
                let mut shifts: Vec<(usize, Vec<f64>)> = Vec::new();
                for (k, key) in video_keys.iter().enumerate() {
                    let dst: Vec<VideoPlace> = eps
                        .iter()
                        .map(|e| {
                            let v = &e.videos[k];
                            video_maps[k]
                                .get(&(v.chunk, v.file))
                                .copied()
                                .ok_or_else(|| missing("its video file", e))
                        })
                        .collect::<Result<_, _>>()?;
                    set(
                        &format!("videos/{key}/chunk_index"),
                        dst.iter().map(|d| d.dst.0).collect(),
                    )?;
                    set(
                        &format!("videos/{key}/file_index"),
                        dst.iter().map(|d| d.dst.1).collect(),
                    )?;
                    if dst.iter().any(|d| d.shift != 0.0) {
                        shifts.push((k, dst.iter().map(|d| d.shift).collect()));
                    }
                }
                set("meta/episodes/chunk_index", vec![0; eps.len()])?;
                set("meta/episodes/file_index", vec![0; eps.len()])?;
                // Episodes of a file appended after others start where it starts.
                for (k, shift) in shifts {
                    let key = &video_keys[k];
                    for end in ["from_timestamp", "to_timestamp"] {
                        let name = format!("videos/{key}/{end}");
                        let Ok(i) = batch.schema().index_of(&name) else {
                            continue;
                        };
                        let old = meta::float_column(&batch, &name, &at)?;
                        let new: Float64Array = old
                            .iter()
                            .zip(&shift)
                            .map(|(t, s)| t.map(|t| t + s))
                            .collect();
                        cols[i] = arrow::compute::cast(&new, batch.column(i).data_type()).map_err(
                            |e| DatasetError::invalid(&at, format!("column {name}: {e}")),
                        )?;
                    }
                }
                let rewritten = RecordBatch::try_new(w_schema.clone(), cols)
                    .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
                let err =
                    |e: parquet::errors::ParquetError| DatasetError::invalid(&at, e.to_string());
                w.write(&rewritten).map_err(err)?;
                if w.in_progress_size() >= 8 << 20 {
                    w.flush().map_err(err)?;
                }
            }
        }
        if !cut {
            stat_parts.push(stats::read_json(root)?);
        }
        ep_offset = next_ep;
        frame_offset = next_frame;
    }
    for (k, key) in video_keys.iter().enumerate() {
        if let Some(p) = pending.get_mut(k) {
            flush_video(out, key, p)?;
        }
    }
    if let Some((w, _)) = ep_writer {
        w.close()
            .map_err(|e| DatasetError::invalid(label(out, "meta/episodes"), e.to_string()))?;
    }

    // The first round that gives episodes gives the tables' columns and info.json (an empty
    // round, as lerobot writes it, is info.json alone); a final without episodes is too.
    let model = rounds.iter().find(|r| r.kept > 0).unwrap_or(first);
    if model.kept > 0 {
        write_tasks(&model.root, out, &tasks)?;
    }
    let mut info = model.info.raw.clone();
    info.insert("total_episodes".into(), json!(ep_offset));
    info.insert("total_frames".into(), json!(frame_offset));
    info.insert("total_tasks".into(), json!(tasks.len()));
    info.insert(
        "splits".into(),
        json!({ "train": format!("0:{ep_offset}") }),
    );
    if let Some(mb) = options.video_files_size_in_mb {
        // A whole number as lerobot writes its default (200), any other as given.
        let v = if mb.fract() == 0.0 && mb.abs() < 1e15 {
            json!(mb as i64)
        } else {
            json!(mb)
        };
        info.insert("video_files_size_in_mb".into(), v);
    }
    let info_path = out.join("meta/info.json");
    let text = serde_json::to_vec_pretty(&Value::Object(info))
        .map_err(|e| DatasetError::invalid(label(out, "meta/info.json"), e.to_string()))?;
    std::fs::write(&info_path, text).map_err(DatasetError::io("write", &info_path))?;
    if !stat_parts.is_empty() {
        let combined = stats::aggregate(&stat_parts, &label(out, "meta/stats.json"))?;
        stats::write_json(out, &combined)?;
    }
    Ok(MergeSummary {
        samples: ep_offset as u64,
        bytes_written: tree_size(out)?,
        filtered,
        duplicates,
    })
}

/// Bytes in a MiB, as lerobot counts `video_files_size_in_mb`.
const MIB: f64 = 1024.0 * 1024.0;

/// Where a round's video file went: the final's file and the shift (seconds) of its
/// episodes' timestamps in it.
#[derive(Debug, Clone, Copy)]
struct VideoPlace {
    dst: (i64, i64),
    shift: f64,
}

/// A final video file still taking files: where it goes, the files appended so far, and the
/// first one's round root, (chunk, file) and cut, to write it as without appending when it
/// stays alone.
struct Pending {
    dst: (i64, i64),
    group: Group,
    first: (PathBuf, (i64, i64), Option<f64>),
}

/// Places round `root`'s video file `src` of `key` (cut at `cut`) with appending: after the
/// pending file's when it can be appended there under `limit` bytes, else as the start of a
/// new pending file (the pending one written first), or, for a file of a layout that is not
/// appended, copied alone as without appending. `next` hands out the final's next index.
#[allow(clippy::too_many_arguments)]
fn append_video(
    root: &Path,
    out: &Path,
    key: &str,
    src: (i64, i64),
    cut: Option<f64>,
    limit: u64,
    pending: &mut Option<Pending>,
    next: &mut dyn FnMut() -> (i64, i64),
) -> Result<VideoPlace, DatasetError> {
    videos::check(root, key, src)?;
    let rel = video_rel(key, src.0, src.1);
    let part = match Part::read(&root.join(&rel), cut, &label(root, &rel))? {
        Ok(p) => p,
        Err(_) => {
            flush_video(out, key, pending)?;
            let dst = next();
            videos::copy(root, out, key, src, dst, cut)?;
            return Ok(VideoPlace { dst, shift: 0.0 });
        }
    };
    if let Some(p) = pending
        && p.group.refuses(&part, limit).is_none()
    {
        let ticks = p.group.append(part);
        let shift = ticks as f64 / f64::from(p.group.timescale());
        return Ok(VideoPlace { dst: p.dst, shift });
    }
    flush_video(out, key, pending)?;
    let dst = next();
    *pending = Some(Pending {
        dst,
        group: Group::start(part),
        first: (root.to_path_buf(), src, cut),
    });
    Ok(VideoPlace { dst, shift: 0.0 })
}

/// Writes the pending video file of `key`, if any: one file alone as without appending
/// (copied, or cut), several appended.
fn flush_video(out: &Path, key: &str, pending: &mut Option<Pending>) -> Result<(), DatasetError> {
    let Some(p) = pending.take() else {
        return Ok(());
    };
    if p.group.len() == 1 {
        let (root, src, cut) = &p.first;
        videos::copy(root, out, key, *src, p.dst, *cut)?;
        return Ok(());
    }
    let dst = out.join(video_rel(key, p.dst.0, p.dst.1));
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir).map_err(DatasetError::io("create", dir))?;
    }
    if let Err(e) = p.group.write(&dst) {
        let _ = std::fs::remove_file(&dst);
        return Err(e);
    }
    Ok(())
}

/// `meta/tasks.parquet` with round 0's columns (pandas writes the task as the frame's
/// index, `__index_level_0__`, and its metadata says so).
fn write_tasks(first: &Path, out: &Path, tasks: &[String]) -> Result<(), DatasetError> {
    let rel = "meta/tasks.parquet";
    let schema = meta::parquet_schema(first, rel)?;
    let at = label(first, rel);
    let mut cols: Vec<ArrayRef> = Vec::new();
    for f in schema.fields() {
        let col: ArrayRef = match (f.name().as_str(), f.data_type()) {
            ("task_index", DataType::Int64) => {
                Arc::new(Int64Array::from_iter_values(0..tasks.len() as i64))
            }
            (_, DataType::Utf8) => Arc::new(StringArray::from_iter_values(tasks)),
            (_, DataType::LargeUtf8) => Arc::new(LargeStringArray::from_iter_values(tasks)),
            (n, t) => {
                return Err(DatasetError::Unsupported {
                    reason: format!(
                        "{at}: column {n} of type {t} (expected task_index and the task string)"
                    ),
                });
            }
        };
        cols.push(col);
    }
    let batch = RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
    let path = out.join(rel);
    let f = std::fs::File::create_new(&path).map_err(DatasetError::io("create", &path))?;
    let mut w = ArrowWriter::try_new(f, schema.clone(), Some(data::props(&schema)))
        .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
    w.write(&batch)
        .and_then(|_| w.close().map(|_| ()))
        .map_err(|e| DatasetError::invalid(label(out, rel), e.to_string()))
}

fn tree_size(dir: &Path) -> Result<u64, DatasetError> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(DatasetError::io("list", &d))? {
            let e = e.map_err(DatasetError::io("list", &d))?;
            let m = e.metadata().map_err(DatasetError::io("read", &e.path()))?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    Ok(total)
}
