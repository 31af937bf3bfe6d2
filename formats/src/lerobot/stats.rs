//! `meta/stats.json` and the per-episode `stats/<feature>/<stat>` columns of the episode
//! table, and their combination exactly as lerobot 0.4.4's `aggregate_stats`
//! (`lerobot/datasets/compute_stats.py`) does it: `min`/`max` elementwise, `count` summed,
//! `mean` count-weighted, `std` from the pooled variance (each part's variance plus its mean's
//! squared distance from the total mean, count-weighted), and each quantile `qNN` present in
//! every part as the count-weighted mean of the parts' quantiles. That last one is lerobot's
//! approximation (quantiles do not combine exactly); Quarry reproduces it rather than
//! recomputing quantiles from the frames, so a final's statistics are what lerobot's own
//! aggregation of the same rounds gives. Other keys are dropped, as lerobot drops them.

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int64Type};
use serde_json::{Map, Number, Value};

use super::meta::label;
use crate::DatasetError;

/// One statistic of one feature: an n-d array, integer when lerobot wrote integers.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
    pub int: bool,
}

/// Statistics by feature, then by statistic name, in the order they were first seen.
pub type Stats = Vec<(String, Vec<(String, Stat)>)>;

/// Most elements one statistic may hold (a state vector's width; images are 3x1x1).
const MAX_ELEMS: usize = 1 << 20;

fn from_json(v: &Value, at: &str) -> Result<Stat, DatasetError> {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(a) = cur {
        shape.push(a.len());
        match a.first() {
            Some(x) => cur = x,
            None => break,
        }
    }
    let mut s = Stat {
        shape,
        values: Vec::new(),
        int: true,
    };
    fn walk(v: &Value, depth: usize, s: &mut Stat, at: &str) -> Result<(), DatasetError> {
        match v {
            Value::Array(a) => {
                if s.shape.get(depth) != Some(&a.len()) {
                    return Err(DatasetError::invalid(at, "a statistic is a ragged array"));
                }
                for x in a {
                    walk(x, depth + 1, s, at)?;
                }
            }
            Value::Number(n) if depth == s.shape.len() => {
                if s.values.len() >= MAX_ELEMS {
                    return Err(DatasetError::invalid(at, "a statistic is too large"));
                }
                s.int &= n.is_i64() || n.is_u64();
                s.values.push(n.as_f64().unwrap_or(f64::NAN));
            }
            _ => {
                return Err(DatasetError::invalid(
                    at,
                    "a statistic is not an array of numbers",
                ));
            }
        }
        Ok(())
    }
    walk(v, 0, &mut s, at)?;
    Ok(s)
}

fn to_json(s: &Stat) -> Value {
    fn build(s: &Stat, depth: usize, at: &mut usize) -> Value {
        if depth == s.shape.len() {
            let v = s.values.get(*at).copied().unwrap_or(f64::NAN);
            *at += 1;
            return if s.int && v.fract() == 0.0 && v.abs() < 9.0e15 {
                Value::Number(Number::from(v as i64))
            } else {
                Number::from_f64(v).map_or(Value::Null, Value::Number)
            };
        }
        Value::Array(
            (0..s.shape[depth])
                .map(|_| build(s, depth + 1, at))
                .collect(),
        )
    }
    build(s, 0, &mut 0)
}

/// Reads `meta/stats.json` of a dataset.
pub fn read_json(root: &Path) -> Result<Stats, DatasetError> {
    let rel = "meta/stats.json";
    let at = label(root, rel);
    let path = root.join(rel);
    let text = std::fs::read(&path).map_err(DatasetError::io("read", &path))?;
    let v: Map<String, Value> = serde_json::from_slice(&text)
        .map_err(|e| DatasetError::invalid(&at, format!("not a JSON object: {e}")))?;
    let mut out = Vec::new();
    for (feature, stats) in v {
        let Value::Object(stats) = stats else {
            return Err(DatasetError::invalid(
                &at,
                format!("{feature} is not an object"),
            ));
        };
        let mut fs = Vec::new();
        for (k, s) in stats {
            fs.push((k.clone(), from_json(&s, &format!("{at}: {feature}.{k}"))?));
        }
        out.push((feature, fs));
    }
    Ok(out)
}

/// Writes `stats` as `meta/stats.json` under `out`.
pub fn write_json(out: &Path, stats: &Stats) -> Result<u64, DatasetError> {
    let mut m = Map::new();
    for (feature, fs) in stats {
        let mut o = Map::new();
        for (k, s) in fs {
            o.insert(k.clone(), to_json(s));
        }
        m.insert(feature.clone(), Value::Object(o));
    }
    let path = out.join("meta/stats.json");
    let text = serde_json::to_vec_pretty(&Value::Object(m))
        .map_err(|e| DatasetError::invalid(path.display().to_string(), e.to_string()))?;
    std::fs::write(&path, &text).map_err(DatasetError::io("write", &path))?;
    Ok(text.len() as u64)
}

fn from_cell(a: &dyn Array, row: usize, at: &str) -> Result<Stat, DatasetError> {
    let mut s = Stat {
        shape: Vec::new(),
        values: Vec::new(),
        int: false,
    };
    fn walk(
        a: &dyn Array,
        row: usize,
        depth: usize,
        s: &mut Stat,
        at: &str,
    ) -> Result<(), DatasetError> {
        if a.is_null(row) {
            return Err(DatasetError::invalid(at, "a statistic is null"));
        }
        match a.data_type() {
            DataType::List(_) => {
                let l = a.as_list::<i32>().value(row);
                if s.shape.len() == depth {
                    s.shape.push(l.len());
                } else if s.shape[depth] != l.len() {
                    return Err(DatasetError::invalid(at, "a statistic is a ragged array"));
                }
                if s.values.len() + l.len() > MAX_ELEMS {
                    return Err(DatasetError::invalid(at, "a statistic is too large"));
                }
                for i in 0..l.len() {
                    walk(l.as_ref(), i, depth + 1, s, at)?;
                }
            }
            DataType::Float64 => s.values.push(a.as_primitive::<Float64Type>().value(row)),
            DataType::Float32 => s
                .values
                .push(f64::from(a.as_primitive::<Float32Type>().value(row))),
            DataType::Int64 => {
                s.int = true;
                s.values
                    .push(a.as_primitive::<Int64Type>().value(row) as f64)
            }
            t => {
                return Err(DatasetError::invalid(
                    at,
                    format!("a statistic is {t}, not a list of numbers"),
                ));
            }
        }
        Ok(())
    }
    walk(a, row, 0, &mut s, at)?;
    Ok(s)
}

/// The per-episode statistics of row `row` of an episode-table batch.
pub fn of_episode(batch: &RecordBatch, row: usize, at: &str) -> Result<Stats, DatasetError> {
    let mut out: Stats = Vec::new();
    let schema = batch.schema();
    for (i, f) in schema.fields().iter().enumerate() {
        let Some(rest) = f.name().strip_prefix("stats/") else {
            continue;
        };
        let Some((feature, key)) = rest.rsplit_once('/') else {
            continue;
        };
        let s = from_cell(
            batch.column(i).as_ref(),
            row,
            &format!("{at}: column {}", f.name()),
        )?;
        match out.iter_mut().find(|(n, _)| n == feature) {
            Some((_, fs)) => fs.push((key.to_string(), s)),
            None => out.push((feature.to_string(), vec![(key.to_string(), s)])),
        }
    }
    Ok(out)
}

fn is_quantile(k: &str) -> bool {
    k.len() > 1 && k.starts_with('q') && k[1..].bytes().all(|b| b.is_ascii_digit())
}

/// Combines the statistics of parts (rounds, episodes) as lerobot's `aggregate_stats`; `at`
/// names the dataset in errors (a part whose shapes disagree).
pub fn aggregate(parts: &[Stats], at: &str) -> Result<Stats, DatasetError> {
    // Features in first-seen order, each with the parts that have it.
    let mut order: Vec<&str> = Vec::new();
    let mut by: BTreeMap<&str, Vec<&Vec<(String, Stat)>>> = BTreeMap::new();
    for p in parts {
        for (f, fs) in p {
            if !by.contains_key(f.as_str()) {
                order.push(f);
            }
            by.entry(f).or_default().push(fs);
        }
    }
    let mut out = Vec::new();
    for f in order {
        let list = &by[f];
        out.push((
            f.to_string(),
            feature(list, &format!("{at}: stats of {f}"))?,
        ));
    }
    Ok(out)
}

fn get<'a>(fs: &'a [(String, Stat)], k: &str, at: &str) -> Result<&'a Stat, DatasetError> {
    fs.iter()
        .find(|(n, _)| n == k)
        .map(|(_, s)| s)
        .ok_or_else(|| DatasetError::invalid(at, format!("statistic {k} is missing")))
}

fn feature(list: &[&Vec<(String, Stat)>], at: &str) -> Result<Vec<(String, Stat)>, DatasetError> {
    let mut means = Vec::new();
    let mut stds = Vec::new();
    let mut counts = Vec::new();
    for fs in list {
        means.push(get(fs, "mean", at)?);
        stds.push(get(fs, "std", at)?);
        let c = get(fs, "count", at)?;
        match c.values.as_slice() {
            [n] if *n >= 0.0 => counts.push(*n),
            _ => {
                return Err(DatasetError::invalid(
                    at,
                    "count is not one non-negative number",
                ));
            }
        }
    }
    let shape = &means[0].shape;
    let n = means[0].values.len();
    let same = |s: &Stat| &s.shape == shape && s.values.len() == n;
    if !means.iter().chain(&stds).all(|s| same(s)) {
        return Err(DatasetError::invalid(
            at,
            "mean or std shapes differ between parts",
        ));
    }
    let total: f64 = counts.iter().sum();
    // numpy: (means * counts).sum(axis=0) / total_count, summed part by part in order.
    let mut mean = vec![0.0f64; n];
    for (m, c) in means.iter().zip(&counts) {
        for (acc, v) in mean.iter_mut().zip(&m.values) {
            *acc += v * c;
        }
    }
    mean.iter_mut().for_each(|v| *v /= total);
    let mut var = vec![0.0f64; n];
    for ((m, s), c) in means.iter().zip(&stds).zip(&counts) {
        for i in 0..n {
            let d = m.values[i] - mean[i];
            var[i] += (s.values[i] * s.values[i] + d * d) * c;
        }
    }
    let std: Vec<f64> = var.iter().map(|v| (v / total).sqrt()).collect();
    let ext = |k: &str, pick: fn(f64, f64) -> f64| -> Result<Stat, DatasetError> {
        let first = get(list[0], k, at)?;
        let mut acc = first.clone();
        for fs in &list[1..] {
            let s = get(fs, k, at)?;
            if s.shape != first.shape || s.values.len() != acc.values.len() {
                return Err(DatasetError::invalid(
                    at,
                    format!("{k} shapes differ between parts"),
                ));
            }
            acc.int &= s.int;
            for (a, v) in acc.values.iter_mut().zip(&s.values) {
                *a = pick(*a, *v);
            }
        }
        Ok(acc)
    };
    let float = |values: Vec<f64>| Stat {
        shape: shape.clone(),
        values,
        int: false,
    };
    let mut out = vec![
        ("min".to_string(), ext("min", f64::min)?),
        ("max".to_string(), ext("max", f64::max)?),
        ("mean".to_string(), float(mean)),
        ("std".to_string(), float(std)),
        (
            "count".to_string(),
            Stat {
                shape: vec![1],
                values: vec![total],
                int: true,
            },
        ),
    ];
    for (k, _) in list[0].iter().filter(|(k, _)| is_quantile(k)) {
        let qs: Option<Vec<&Stat>> = list
            .iter()
            .map(|fs| fs.iter().find(|(n, _)| n == k).map(|(_, s)| s))
            .collect();
        let Some(qs) = qs else { continue };
        if !qs.iter().all(|s| same(s)) {
            return Err(DatasetError::invalid(
                at,
                format!("{k} shapes differ between parts"),
            ));
        }
        let mut q = vec![0.0f64; n];
        for (s, c) in qs.iter().zip(&counts) {
            for (acc, v) in q.iter_mut().zip(&s.values) {
                *acc += v * c;
            }
        }
        q.iter_mut().for_each(|v| *v /= total);
        out.push((k.clone(), float(q)));
    }
    Ok(out)
}
