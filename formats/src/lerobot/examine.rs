//! `examine` of a LeRobot dataset: the dataset's facts (fps, robot type, totals, tasks,
//! features, video keys), each episode as a sample (its length, its number of tasks, the
//! scalar numeric columns of the episode table, every element of its frames' numeric
//! features, read in record batches), then each video file checked without decoding it.

use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};
use serde_json::Value;

use super::meta::{self, Episode, Info, label};
use super::videos;
use crate::{DatasetError, Observer};

/// Features every LeRobot frame carries for bookkeeping: not reported as values.
const BOOKKEEPING: [&str; 5] = [
    "timestamp",
    "frame_index",
    "episode_index",
    "index",
    "task_index",
];
/// Tasks named in the `tasks` fact; the rest are counted.
const TASKS_SHOWN: usize = 5;

/// Whether a column of the episode table places the episode (its number, length, files and
/// ranges) rather than describing it.
fn placement(name: &str) -> bool {
    matches!(
        name,
        "episode_index" | "length" | "dataset_from_index" | "dataset_to_index" | "tasks"
    ) || ["data/", "videos/", "meta/", "stats/"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Whether `t` holds numbers (or booleans), possibly in (fixed-size) lists.
fn numeric(t: &DataType) -> bool {
    match t {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            numeric(f.data_type())
        }
        t => t.is_numeric() || *t == DataType::Boolean,
    }
}

/// Every leaf value of `a` as f64, in order (a null is NaN; a null list holds nothing).
fn flatten(a: &dyn Array, out: &mut Vec<f64>) -> Result<(), String> {
    match a.data_type() {
        DataType::FixedSizeList(_, n) => {
            let l = a.as_fixed_size_list();
            let n = *n as usize;
            for r in 0..l.len() {
                if l.is_valid(r) {
                    flatten(l.values().slice(r * n, n).as_ref(), out)?;
                }
            }
        }
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            for r in 0..l.len() {
                if l.is_valid(r) {
                    flatten(l.value(r).as_ref(), out)?;
                }
            }
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>();
            for r in 0..l.len() {
                if l.is_valid(r) {
                    flatten(l.value(r).as_ref(), out)?;
                }
            }
        }
        _ => {
            let c = arrow::compute::cast(a, &DataType::Float64).map_err(|e| e.to_string())?;
            let c = c.as_primitive::<Float64Type>();
            out.extend((0..c.len()).map(|i| if c.is_valid(i) { c.value(i) } else { f64::NAN }));
        }
    }
    Ok(())
}

/// The scalar numeric (and boolean) columns of the episode table that describe episodes
/// (`success`, a reward...), per column its values by episode.
fn episode_columns(
    root: &Path,
    n: usize,
    observer: &mut dyn Observer,
) -> Result<Vec<(String, Vec<f64>)>, DatasetError> {
    let mut cols: Vec<(String, Vec<f64>)> = Vec::new();
    for rel in meta::episode_files(root)? {
        let at = label(root, &rel);
        let b = meta::open_parquet(root, &rel)?;
        let schema = b.schema().clone();
        let mut roots = Vec::new();
        for (i, f) in schema.fields().iter().enumerate() {
            let t = f.data_type();
            if !placement(f.name()) && (t.is_numeric() || *t == DataType::Boolean) {
                roots.push(i);
            }
        }
        roots.push(
            schema
                .index_of("episode_index")
                .map_err(|_| DatasetError::invalid(&at, "column episode_index is missing"))?,
        );
        for batch in meta::projected(b, roots, &at)? {
            let batch = batch?;
            let eps = meta::int_column(&batch, "episode_index", &at)?;
            for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
                if field.name() == "episode_index" {
                    continue;
                }
                let mut v = Vec::with_capacity(col.len());
                if let Err(e) = flatten(col.as_ref(), &mut v) {
                    observer.problem(&format!("{at}: column {}", field.name()), &e);
                    continue;
                }
                let slot = match cols.iter().position(|(c, _)| c == field.name()) {
                    Some(i) => i,
                    None => {
                        cols.push((field.name().clone(), vec![f64::NAN; n]));
                        cols.len() - 1
                    }
                };
                for (e, x) in eps.values().iter().zip(v) {
                    // read_episodes numbered the episodes 0..n.
                    if let Some(s) = usize::try_from(*e)
                        .ok()
                        .and_then(|e| cols[slot].1.get_mut(e))
                    {
                        *s = x;
                    }
                }
            }
        }
    }
    Ok(cols)
}

/// The frame features reported as values: the numeric ones of info.json that the data
/// files hold, bookkeeping aside.
fn frame_features(info: &Info) -> Vec<String> {
    let Some(f) = info.features.as_object() else {
        return Vec::new();
    };
    f.iter()
        .filter(|(name, v)| {
            let dtype = v["dtype"].as_str().unwrap_or("");
            !BOOKKEEPING.contains(&name.as_str()) && !matches!(dtype, "video" | "image" | "string")
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// `float32 [4]`.
fn feature_fact(info: &Info, name: &str) -> String {
    let f = &info.features[name];
    let dtype = f["dtype"].as_str().unwrap_or("?");
    let shape = match &f["shape"] {
        Value::Array(a) => format!(
            "[{}]",
            a.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => "[?]".into(),
    };
    if dtype == "video" {
        format!("{dtype} {shape} ({})", videos::describe(info, name))
    } else {
        format!("{dtype} {shape}")
    }
}

fn facts(info: &Info, tasks: &[String], observer: &mut dyn Observer) {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    };
    observer.fact("codebase_version", meta::CODEBASE_VERSION);
    observer.fact("fps", &text(&info.fps));
    observer.fact("robot_type", &text(&info.robot_type));
    observer.fact("episodes", &info.total_episodes.to_string());
    observer.fact("frames", &info.total_frames.to_string());
    let mut t = tasks
        .iter()
        .take(TASKS_SHOWN)
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if tasks.len() > TASKS_SHOWN {
        t.push_str(&format!(", ... ({} more)", tasks.len() - TASKS_SHOWN));
    }
    observer.fact(
        "tasks",
        &if tasks.is_empty() {
            "0".into()
        } else {
            format!("{}: {t}", tasks.len())
        },
    );
    if let Some(f) = info.features.as_object() {
        for name in f.keys() {
            observer.fact(&format!("feature {name}"), &feature_fact(info, name));
        }
    }
    observer.fact(
        "video keys",
        &if info.video_keys.is_empty() {
            "none".into()
        } else {
            info.video_keys.join(", ")
        },
    );
}

/// Reports the facts, then each episode with its values, then the video files' checks.
pub fn examine(
    root: &Path,
    info: &Info,
    eps: &[Episode],
    tasks: &[String],
    observer: &mut dyn Observer,
) -> Result<(), DatasetError> {
    facts(info, tasks, observer);
    let cols = episode_columns(root, eps.len(), observer)?;
    let features = frame_features(info);
    let mut next = 0usize;
    // Reports every episode up to `upto` not yet reported as a sample, with its fields.
    let begin = |upto: usize, next: &mut usize, observer: &mut dyn Observer| {
        while *next <= upto && *next < eps.len() {
            let e = &eps[*next];
            observer.sample(e.index as u64);
            observer.values("length", &[e.length as f64]);
            observer.values("tasks", &[e.tasks.len() as f64]);
            for (name, v) in &cols {
                observer.values(name, &v[*next..=*next]);
            }
            *next += 1;
        }
    };
    let mut current: Option<i64> = None;
    let mut values = Vec::new();
    for (chunk, file) in meta::data_files(eps) {
        let rel = meta::data_rel(chunk, file);
        let at = label(root, &rel);
        let b = meta::open_parquet(root, &rel)?;
        let schema = b.schema().clone();
        let mut roots = vec![
            schema
                .index_of("episode_index")
                .map_err(|_| DatasetError::invalid(&at, "column episode_index is missing"))?,
        ];
        for name in &features {
            match schema.index_of(name) {
                Ok(i) if numeric(schema.field(i).data_type()) => roots.push(i),
                Ok(_) => {}
                Err(_) => observer.problem(
                    &at,
                    &format!(
                        "info.json lists feature {name} but this data file has no such column"
                    ),
                ),
            }
        }
        roots.sort_unstable();
        roots.dedup();
        for batch in meta::projected(b, roots, &at)? {
            let batch: RecordBatch = batch?;
            let ep = meta::int_column(&batch, "episode_index", &at)?.clone();
            let cols: Vec<(String, ArrayRef)> = batch
                .schema()
                .fields()
                .iter()
                .zip(batch.columns())
                .filter(|(f, _)| f.name() != "episode_index")
                .map(|(f, c)| (f.name().clone(), c.clone()))
                .collect();
            let mut r = 0;
            while r < ep.len() {
                let e = ep.value(r);
                let mut end = r + 1;
                while end < ep.len() && ep.value(end) == e {
                    end += 1;
                }
                if current != Some(e) {
                    // The row check put each episode's rows together in one file.
                    let i = usize::try_from(e).unwrap_or(usize::MAX);
                    if i < next {
                        observer.problem(
                            &at,
                            &format!(
                                "the rows of episode {e} come after a later episode's in file order: their values are not reported"
                            ),
                        );
                        r = end;
                        continue;
                    }
                    begin(i, &mut next, observer);
                    current = Some(e);
                }
                for (name, c) in &cols {
                    values.clear();
                    match flatten(c.slice(r, end - r).as_ref(), &mut values) {
                        Ok(()) => observer.values(name, &values),
                        Err(why) => observer.problem(&format!("{at}: column {name}"), &why),
                    }
                }
                r = end;
            }
        }
    }
    begin(usize::MAX, &mut next, observer);
    let mut tally = videos::VideoTally::default();
    for k in 0..info.video_keys.len() {
        for f in meta::video_files(eps, k) {
            videos::examine_file(root, info, eps, k, f, observer, &mut tally);
        }
    }
    if !info.video_keys.is_empty() {
        let mut s = format!("{} checked", tally.checked);
        if !tally.not_checked.is_empty() {
            s.push_str(&format!(", {} not checked", tally.not_checked.len()));
        }
        observer.fact("video files", &s);
        for (at, why) in &tally.not_checked {
            observer.fact(&format!("video {at}"), &format!("not checked ({why})"));
        }
    }
    Ok(())
}
