//! A LeRobot v3.0 dataset's metadata: `meta/info.json` (version, fps, robot type, features,
//! totals, path templates), `meta/tasks.parquet` (task strings by `task_index`) and the
//! episode table `meta/episodes/chunk-*/file-*.parquet` (one row per episode: its length,
//! tasks, the data file and index range it lives in, each video's file and time range, its
//! statistics).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value};

use crate::DatasetError;

/// The only version read and written.
pub const CODEBASE_VERSION: &str = "v3.0";
/// lerobot's default templates; a dataset naming others is refused.
pub const DATA_PATH: &str = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet";
pub const VIDEO_PATH: &str = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4";
/// Most episodes or frames one round may claim: far above any real round, low enough that
/// sums over thousands of rounds cannot overflow.
pub const MAX_COUNT: i64 = 1 << 40;
/// Rows per record batch read from any parquet file: bounds memory per file in flight.
pub const BATCH_ROWS: usize = 1024;

/// `meta/info.json`, the fields Quarry reads; `raw` keeps every field for the final.
#[derive(Debug, Clone)]
pub struct Info {
    pub raw: Map<String, Value>,
    pub fps: Value,
    pub robot_type: Value,
    pub features: Value,
    pub total_episodes: i64,
    pub total_frames: i64,
    pub chunks_size: i64,
    /// Feature names whose dtype is `video`, in the order info.json lists them.
    pub video_keys: Vec<String>,
}

/// The label of a file inside a dataset in messages: `<root>/meta/info.json`.
pub fn label(root: &Path, rel: &str) -> String {
    format!("{}/{rel}", root.display())
}

/// `chunk-CCC/file-FFF` as lerobot formats it.
pub fn chunk_file(chunk: i64, file: i64) -> String {
    format!("chunk-{chunk:03}/file-{file:03}")
}

/// The data file of (chunk, file), relative to the root.
pub fn data_rel(chunk: i64, file: i64) -> String {
    format!("data/{}.parquet", chunk_file(chunk, file))
}

/// The video file of `key` at (chunk, file), relative to the root.
pub fn video_rel(key: &str, chunk: i64, file: i64) -> String {
    format!("videos/{key}/{}.mp4", chunk_file(chunk, file))
}

/// The (chunk, file) of the `n`-th file written, as lerobot's `update_chunk_file_indices`
/// counts: `chunks_size` files per chunk.
pub fn nth_chunk_file(n: i64, chunks_size: i64) -> (i64, i64) {
    (n / chunks_size, n % chunks_size)
}

fn int_field(obj: &Map<String, Value>, at: &str, key: &str, max: i64) -> Result<i64, DatasetError> {
    match obj.get(key).and_then(Value::as_i64) {
        Some(v) if (0..=max).contains(&v) => Ok(v),
        Some(v) => Err(DatasetError::invalid(
            at,
            format!("{key} is {v}, outside 0..={max}"),
        )),
        None => Err(DatasetError::invalid(
            at,
            format!("{key} is missing or not an integer"),
        )),
    }
}

impl Info {
    /// Reads and checks `meta/info.json` under `root`.
    pub fn read(root: &Path) -> Result<Info, DatasetError> {
        let path = root.join("meta/info.json");
        let at = label(root, "meta/info.json");
        let text = std::fs::read(&path).map_err(DatasetError::io("read", &path))?;
        let raw: Map<String, Value> = serde_json::from_slice(&text)
            .map_err(|e| DatasetError::invalid(&at, format!("not a JSON object: {e}")))?;
        match raw.get("codebase_version").and_then(Value::as_str) {
            Some(CODEBASE_VERSION) => {}
            Some(v) => {
                return Err(DatasetError::Unsupported {
                    reason: format!(
                        "{at}: codebase_version is {v:?}; Quarry reads LeRobot {CODEBASE_VERSION} datasets (convert older ones with lerobot's convert_dataset_v21_to_v30)"
                    ),
                });
            }
            None => {
                return Err(DatasetError::invalid(
                    &at,
                    "codebase_version is missing (expected \"v3.0\")",
                ));
            }
        }
        for (key, want) in [("data_path", DATA_PATH), ("video_path", VIDEO_PATH)] {
            match raw.get(key) {
                Some(Value::String(s)) if s == want => {}
                Some(Value::Null) | None if key == "video_path" => {}
                other => {
                    return Err(DatasetError::Unsupported {
                        reason: format!(
                            "{at}: {key} is {other:?}; Quarry reads lerobot's default layout {want:?}"
                        ),
                    });
                }
            }
        }
        let fps = raw.get("fps").cloned().unwrap_or(Value::Null);
        if !fps.as_f64().is_some_and(|f| f > 0.0) {
            return Err(DatasetError::invalid(&at, "fps is missing or not positive"));
        }
        let features = raw.get("features").cloned().unwrap_or(Value::Null);
        let Some(fmap) = features.as_object() else {
            return Err(DatasetError::invalid(
                &at,
                "features is missing or not an object",
            ));
        };
        let mut video_keys = Vec::new();
        for (name, f) in fmap {
            let dtype = f.get("dtype").and_then(Value::as_str).ok_or_else(|| {
                DatasetError::invalid(&at, format!("features.{name}.dtype is missing"))
            })?;
            if dtype == "video" {
                if name.contains('/') || name.starts_with('.') {
                    return Err(DatasetError::invalid(
                        &at,
                        format!("features.{name}: a video key may not hold '/' or start with '.'"),
                    ));
                }
                video_keys.push(name.clone());
            }
        }
        for required in ["episode_index", "index", "task_index"] {
            if !fmap.contains_key(required) {
                return Err(DatasetError::invalid(
                    &at,
                    format!("features.{required} is missing"),
                ));
            }
        }
        Ok(Info {
            fps,
            robot_type: raw.get("robot_type").cloned().unwrap_or(Value::Null),
            features,
            total_episodes: int_field(&raw, &at, "total_episodes", MAX_COUNT)?,
            total_frames: int_field(&raw, &at, "total_frames", MAX_COUNT)?,
            chunks_size: int_field(&raw, &at, "chunks_size", 1 << 20)?.max(1),
            video_keys,
            raw,
        })
    }

    /// What two rounds must agree on to merge, one line (the features as compact JSON).
    pub fn schema(&self) -> String {
        format!(
            "lerobot {CODEBASE_VERSION} fps {} robot_type {} features {}",
            self.fps, self.robot_type, self.features
        )
    }
}

/// Opens a parquet file for record batches of [`BATCH_ROWS`].
pub fn open_parquet(
    root: &Path,
    rel: &str,
) -> Result<ParquetRecordBatchReaderBuilder<File>, DatasetError> {
    let path = root.join(rel);
    let f = File::open(&path).map_err(DatasetError::io("open", &path))?;
    ParquetRecordBatchReaderBuilder::try_new(f)
        .map(|b| b.with_batch_size(BATCH_ROWS))
        .map_err(|e| DatasetError::invalid(label(root, rel), format!("not a parquet file: {e}")))
}

/// The record batches of the columns `roots` (indices into the file's schema, in file order)
/// of a parquet file opened with [`open_parquet`]; `at` names the file in errors.
pub fn projected(
    b: ParquetRecordBatchReaderBuilder<File>,
    roots: impl IntoIterator<Item = usize>,
    at: &str,
) -> Result<impl Iterator<Item = Result<RecordBatch, DatasetError>>, DatasetError> {
    let mask = ProjectionMask::roots(b.parquet_schema(), roots);
    let reader = b
        .with_projection(mask)
        .build()
        .map_err(|e| DatasetError::invalid(at, e.to_string()))?;
    let at = at.to_string();
    Ok(reader.map(move |batch| batch.map_err(|e| DatasetError::invalid(&at, e.to_string()))))
}

/// Every batch of a parquet file (small metadata tables only).
pub fn read_all(root: &Path, rel: &str) -> Result<(SchemaRef, Vec<RecordBatch>), DatasetError> {
    let b = open_parquet(root, rel)?;
    let schema = b.schema().clone();
    let reader = b
        .build()
        .map_err(|e| DatasetError::invalid(label(root, rel), e.to_string()))?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DatasetError::invalid(label(root, rel), e.to_string()))?;
    Ok((schema, batches))
}

/// Column `name` of `batch` as int64, or an error naming the file and column.
pub fn int_column<'a>(
    batch: &'a RecordBatch,
    name: &str,
    at: &str,
) -> Result<&'a Int64Array, DatasetError> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| DatasetError::invalid(at, format!("column {name} is missing")))?;
    if col.data_type() != &DataType::Int64 || col.null_count() > 0 {
        return Err(DatasetError::invalid(
            at,
            format!(
                "column {name} is {} with {} nulls, not int64 without nulls",
                col.data_type(),
                col.null_count()
            ),
        ));
    }
    Ok(col.as_primitive::<Int64Type>())
}

/// Column `name` of `batch` as float64 (float32 widened), or an error naming the file and
/// column.
pub fn float_column(
    batch: &RecordBatch,
    name: &str,
    at: &str,
) -> Result<Float64Array, DatasetError> {
    let col = batch
        .column_by_name(name)
        .ok_or_else(|| DatasetError::invalid(at, format!("column {name} is missing")))?;
    if !matches!(col.data_type(), DataType::Float64 | DataType::Float32) || col.null_count() > 0 {
        return Err(DatasetError::invalid(
            at,
            format!(
                "column {name} is {} with {} nulls, not float64 without nulls",
                col.data_type(),
                col.null_count()
            ),
        ));
    }
    let cast = arrow::compute::cast(col, &DataType::Float64)
        .map_err(|e| DatasetError::invalid(at, format!("column {name}: {e}")))?;
    Ok(cast.as_primitive::<Float64Type>().clone())
}

/// The task strings of `meta/tasks.parquet`, by `task_index` (which must be 0..n).
pub fn read_tasks(root: &Path) -> Result<Vec<String>, DatasetError> {
    let rel = "meta/tasks.parquet";
    let at = label(root, rel);
    if !root.join(rel).exists() {
        return Ok(Vec::new());
    }
    let (schema, batches) = read_all(root, rel)?;
    // pandas writes the task string as the frame's index; name it from the pandas metadata
    // or take the one string column.
    let name = schema
        .fields()
        .iter()
        .find(|f| matches!(f.data_type(), DataType::Utf8 | DataType::LargeUtf8))
        .map(|f| f.name().clone())
        .ok_or_else(|| DatasetError::invalid(&at, "no string column holds the tasks"))?;
    let mut tasks: Vec<Option<String>> = Vec::new();
    for b in &batches {
        let idx = int_column(b, "task_index", &at)?;
        let col = b
            .column_by_name(&name)
            .ok_or_else(|| DatasetError::invalid(&at, format!("column {name} is missing")))?;
        let strings: Vec<Option<&str>> = match col.data_type() {
            DataType::Utf8 => col.as_string::<i32>().iter().collect(),
            _ => col.as_string::<i64>().iter().collect(),
        };
        for (i, s) in idx.values().iter().zip(strings) {
            let s = s.ok_or_else(|| DatasetError::invalid(&at, "a task is null"))?;
            let i = usize::try_from(*i)
                .ok()
                .filter(|i| *i < MAX_TASKS)
                .ok_or_else(|| {
                    DatasetError::invalid(&at, format!("task_index {i} is out of range"))
                })?;
            if tasks.len() <= i {
                tasks.resize(i + 1, None);
            }
            if tasks[i].replace(s.to_string()).is_some() {
                return Err(DatasetError::invalid(
                    &at,
                    format!("task_index {i} appears twice"),
                ));
            }
        }
    }
    tasks
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.ok_or_else(|| DatasetError::invalid(&at, format!("task_index {i} is missing")))
        })
        .collect()
}

/// Most distinct tasks one dataset may list.
const MAX_TASKS: usize = 1 << 20;

/// Where one video of an episode lives: its file and its time range in it, seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoRef {
    pub chunk: i64,
    pub file: i64,
    pub from_ts: f64,
    pub to_ts: f64,
}

/// One row of the episode table, the fields a merge rewrites or checks.
#[derive(Debug, Clone)]
pub struct Episode {
    pub index: i64,
    pub length: i64,
    pub tasks: Vec<String>,
    pub data_chunk: i64,
    pub data_file: i64,
    pub from: i64,
    pub to: i64,
    /// Per video key, in [`Info::video_keys`] order.
    pub videos: Vec<VideoRef>,
}

/// The episode table's files, `meta/episodes/chunk-*/file-*.parquet`, in order.
pub fn episode_files(root: &Path) -> Result<Vec<String>, DatasetError> {
    let mut out = Vec::new();
    let dir = root.join("meta/episodes");
    // lerobot writes no episode table (and no tasks) for a dataset without episodes.
    if !dir.exists() {
        return Ok(out);
    }
    let mut chunks = list_sorted(&dir)?;
    chunks.retain(|c| c.starts_with("chunk-"));
    for c in chunks {
        let mut files = list_sorted(&dir.join(&c))?;
        files.retain(|f| f.starts_with("file-") && f.ends_with(".parquet"));
        out.extend(files.into_iter().map(|f| format!("meta/episodes/{c}/{f}")));
    }
    Ok(out)
}

fn list_sorted(dir: &Path) -> Result<Vec<String>, DatasetError> {
    let mut names = std::fs::read_dir(dir)
        .map_err(DatasetError::io("list", dir))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(DatasetError::io("list", dir))?;
    names.sort();
    Ok(names)
}

/// The episodes of one episode-table batch, checked for types and ranges.
pub fn episodes_of(
    batch: &RecordBatch,
    info: &Info,
    at: &str,
) -> Result<Vec<Episode>, DatasetError> {
    let index = int_column(batch, "episode_index", at)?;
    let length = int_column(batch, "length", at)?;
    let dc = int_column(batch, "data/chunk_index", at)?;
    let df = int_column(batch, "data/file_index", at)?;
    let from = int_column(batch, "dataset_from_index", at)?;
    let to = int_column(batch, "dataset_to_index", at)?;
    let mut vids = Vec::new();
    for k in &info.video_keys {
        vids.push((
            int_column(batch, &format!("videos/{k}/chunk_index"), at)?,
            int_column(batch, &format!("videos/{k}/file_index"), at)?,
            float_column(batch, &format!("videos/{k}/from_timestamp"), at)?,
            float_column(batch, &format!("videos/{k}/to_timestamp"), at)?,
        ));
    }
    let tasks_col = batch
        .column_by_name("tasks")
        .ok_or_else(|| DatasetError::invalid(at, "column tasks is missing"))?;
    let tasks_list = tasks_col
        .as_list_opt::<i32>()
        .ok_or_else(|| DatasetError::invalid(at, "column tasks is not a list of strings"))?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let ep = index.value(r);
        let e_at = || format!("{at}: episode {ep}");
        let in_range = |v: i64| (0..=MAX_COUNT).contains(&v);
        let (f, t, n) = (from.value(r), to.value(r), length.value(r));
        if !(in_range(ep) && in_range(f) && in_range(t) && in_range(n)) || t - f != n {
            return Err(DatasetError::invalid(
                e_at(),
                format!(
                    "dataset_from_index {f}, dataset_to_index {t} and length {n} do not agree (to - from must equal length, all in 0..=2^40)"
                ),
            ));
        }
        let mut videos = Vec::new();
        for (k, (c, fi, t0, t1)) in info.video_keys.iter().zip(&vids) {
            let (c, fi) = (c.value(r), fi.value(r));
            if !(in_range(c) && in_range(fi)) {
                return Err(DatasetError::invalid(
                    e_at(),
                    format!("videos/{k}/chunk_index {c} or file_index {fi} is negative or huge"),
                ));
            }
            let (t0, t1) = (t0.value(r), t1.value(r));
            if !(t0.is_finite() && t1.is_finite() && 0.0 <= t0 && t0 <= t1) {
                return Err(DatasetError::invalid(
                    e_at(),
                    format!(
                        "videos/{k}/from_timestamp {t0} and to_timestamp {t1} are not a time range (finite, 0 <= from <= to)"
                    ),
                ));
            }
            videos.push(VideoRef {
                chunk: c,
                file: fi,
                from_ts: t0,
                to_ts: t1,
            });
        }
        let (c, fi) = (dc.value(r), df.value(r));
        if !(in_range(c) && in_range(fi)) {
            return Err(DatasetError::invalid(
                e_at(),
                format!("data/chunk_index {c} or data/file_index {fi} is negative or huge"),
            ));
        }
        let list = if tasks_list.is_null(r) {
            Vec::new()
        } else {
            let v = tasks_list.value(r);
            let s = v.as_string_opt::<i32>().ok_or_else(|| {
                DatasetError::invalid(at, "column tasks is not a list of strings")
            })?;
            s.iter().flatten().map(str::to_string).collect()
        };
        out.push(Episode {
            index: ep,
            length: n,
            tasks: list,
            data_chunk: c,
            data_file: fi,
            from: f,
            to: t,
            videos,
        });
    }
    Ok(out)
}

/// The whole episode table of a dataset: episodes numbered 0..n in order, index ranges
/// contiguous from 0, the count agreeing with info.json.
pub fn read_episodes(root: &Path, info: &Info) -> Result<Vec<Episode>, DatasetError> {
    let mut all: Vec<Episode> = Vec::new();
    for rel in episode_files(root)? {
        let at = label(root, &rel);
        let (_, batches) = read_all(root, &rel)?;
        for b in &batches {
            for e in episodes_of(b, info, &at)? {
                let want = all.len() as i64;
                let from = all.last().map_or(0, |p| p.to);
                if e.index != want || e.from != from {
                    return Err(DatasetError::invalid(
                        format!("{at}: episode {}", e.index),
                        format!(
                            "expected episode_index {want} starting at dataset_from_index {from} (episodes must be numbered in order with contiguous frames)"
                        ),
                    ));
                }
                all.push(e);
            }
        }
    }
    let at = label(root, "meta/info.json");
    if all.len() as i64 != info.total_episodes {
        return Err(DatasetError::invalid(
            at,
            format!(
                "total_episodes is {} but meta/episodes lists {} episodes",
                info.total_episodes,
                all.len()
            ),
        ));
    }
    let frames = all.last().map_or(0, |e| e.to);
    if frames != info.total_frames {
        return Err(DatasetError::invalid(
            at,
            format!(
                "total_frames is {} but meta/episodes covers {frames} frames",
                info.total_frames
            ),
        ));
    }
    Ok(all)
}

/// The files a dataset's episodes live in, each once, in (chunk, file) order.
pub fn data_files(eps: &[Episode]) -> Vec<(i64, i64)> {
    let mut v: Vec<(i64, i64)> = eps.iter().map(|e| (e.data_chunk, e.data_file)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Video files of key number `k`, each once, in (chunk, file) order.
pub fn video_files(eps: &[Episode], k: usize) -> Vec<(i64, i64)> {
    let mut v: Vec<(i64, i64)> = eps
        .iter()
        .filter_map(|e| e.videos.get(k).map(|r| (r.chunk, r.file)))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Arc'd schema of a parquet file without reading rows.
pub fn parquet_schema(
    root: &Path,
    rel: &str,
) -> Result<Arc<arrow::datatypes::Schema>, DatasetError> {
    Ok(open_parquet(root, rel)?.schema().clone())
}

/// Calls `f` with each batch of columns `cols` (in that order) of a parquet file.
pub fn each_batch(
    root: &Path,
    rel: &str,
    cols: &[&str],
    mut f: impl FnMut(&RecordBatch) -> Result<(), DatasetError>,
) -> Result<(), DatasetError> {
    let at = label(root, rel);
    let b = open_parquet(root, rel)?;
    let roots: Vec<usize> = cols
        .iter()
        .map(|n| {
            b.schema()
                .index_of(n)
                .map_err(|_| DatasetError::invalid(&at, format!("column {n} is missing")))
        })
        .collect::<Result<_, _>>()?;
    for batch in projected(b, roots, &at)? {
        let batch = batch?;
        // The projection keeps file order; put the columns in the asked order.
        let batch = batch
            .project(
                &cols
                    .iter()
                    .map(|n| batch.schema().index_of(n))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| DatasetError::invalid(&at, e.to_string()))?,
            )
            .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
        f(&batch)?;
    }
    Ok(())
}
