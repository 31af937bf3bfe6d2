//! Quarry's dataset inspector, behind `coordinator inspect PATH`: validates a dataset, prints
//! its statistics and, with `--png`, draws a report. It depends only on `quarry-formats`.
//!
//! PATH is one dataset (a final file or directory, its format from `--format` or
//! [`Format::detect`]) or an experiment directory holding `manifest.json`, in which case every
//! object's first final (keys relative to the experiments directory, `PATH/..`) is examined and
//! the manifest's per-object counts (`collected`, and where present `attempts`, `successes`,
//! `success_rate`, `filtered`, `duplicates`) are reported beside it.
//!
//! A dataset is valid when [`quarry_formats::examine`] walks it to the end and reports no
//! problem (and, in an experiment, when each final holds the `collected` samples its manifest
//! records). Exit status: [`EXIT_VALID`], [`EXIT_INVALID`], [`EXIT_USAGE`], [`EXIT_ERROR`].

pub mod chart;
pub mod font;
pub mod png;
pub mod stats;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Args;
use quarry_formats::{DatasetError, Format, Observer};
use serde::Serialize;
use serde_json::Value;

use stats::{Binner, Fact, FieldSummary, Problem, Stats};

/// Every dataset examined is valid.
pub const EXIT_VALID: i32 = 0;
/// Something other than the data failed (writing the PNG, reading the manifest).
pub const EXIT_ERROR: i32 = 1;
/// Bad usage: no such path, a format that cannot be told.
pub const EXIT_USAGE: i32 = 2;
/// A dataset is invalid: problems were found (and listed).
pub const EXIT_INVALID: i32 = 3;

/// Problems printed in the text output; the rest are counted.
pub const PRINTED_PROBLEMS: usize = 20;

const EXIT_HELP: &str = "\
Exit status:
  0  valid: every dataset examined was walked to the end without a problem
  1  error: the manifest could not be read or the PNG could not be written
  2  usage: no such path, or a format that cannot be told (name it with --format)
  3  invalid: problems were found; each is printed as `<path>: <reason>`";

/// `coordinator inspect`'s arguments.
#[derive(Debug, Args, Clone)]
#[command(after_help = EXIT_HELP)]
pub struct InspectArgs {
    /// A dataset (a final file or directory) or an experiment directory (one holding
    /// manifest.json, as data/experiments/<exp_name>/).
    pub path: PathBuf,
    /// The dataset's format: npy, hdf5, zarr, episodes, npz, jsonl or lerobot [default: from
    /// the name or the contents]. For an experiment: the format of every final.
    #[arg(long, value_parser = parse_format)]
    pub format: Option<Format>,
    /// Also draw a PNG report here: histograms of the per-sample fields, per-object yields.
    #[arg(long, value_name = "FILE")]
    pub png: Option<PathBuf>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Histogram bins (whole-number fields with fewer distinct values get one bin per value).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub bins: u16,
}

fn parse_format(s: &str) -> Result<Format, String> {
    Format::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
        format!("unknown format {s:?}; one of {}", names.join(", "))
    })
}

/// Why `inspect` could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Bad usage ([`EXIT_USAGE`]).
    #[error("{0}")]
    Usage(String),
    /// Anything else ([`EXIT_ERROR`]).
    #[error("{0}")]
    Failed(String),
}

impl InspectError {
    pub fn exit_code(&self) -> i32 {
        match self {
            InspectError::Usage(_) => EXIT_USAGE,
            InspectError::Failed(_) => EXIT_ERROR,
        }
    }
}

/// One dataset's walk.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetReport {
    pub path: String,
    pub format: Option<String>,
    pub valid: bool,
    pub samples: u64,
    /// Why the walk stopped early, when it did (also listed among the problems).
    pub error: Option<String>,
    pub problem_count: u64,
    pub problems: Vec<Problem>,
    /// What the format reports of the dataset as a whole (a LeRobot dataset's fps, tasks,
    /// features...), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub facts: Vec<Fact>,
    pub fields: Vec<FieldSummary>,
}

/// An object's yield as drawn in the report: a fraction, and what it is a fraction of.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Yield {
    pub value: f64,
    /// `success_rate` (successes / attempts) or `collected/quota`.
    pub basis: &'static str,
}

/// One object of an experiment.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectReport {
    pub object: String,
    /// The final examined (its key), `None` while the object has none.
    #[serde(rename = "final")]
    pub final_key: Option<String>,
    pub collected: Option<u64>,
    pub attempts: Option<u64>,
    pub successes: Option<u64>,
    pub success_rate: Option<f64>,
    pub filtered: Option<u64>,
    pub duplicates: Option<u64>,
    pub done: Option<bool>,
    #[serde(rename = "yield")]
    pub yield_: Option<Yield>,
    /// The final's walk (its fields without histograms).
    pub dataset: Option<DatasetReport>,
}

/// An experiment's manifest as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentReport {
    pub exp_name: Option<String>,
    pub state: Option<String>,
    pub quota: Option<u64>,
    pub objects: Vec<ObjectReport>,
}

/// What `inspect` found.
#[derive(Debug, Clone, Serialize)]
pub struct InspectOutcome {
    pub path: String,
    /// `dataset` or `experiment`.
    pub mode: &'static str,
    /// The dataset's file name or the experiment's name.
    pub name: String,
    /// The format (of every final, in an experiment where they agree).
    pub format: Option<String>,
    pub valid: bool,
    pub samples: u64,
    pub problem_count: u64,
    /// The first problems (all datasets together).
    pub problems: Vec<Problem>,
    /// What the format reports of the dataset as a whole (one dataset only; an experiment's
    /// are in each object's `dataset`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub facts: Vec<Fact>,
    /// All datasets together, with histograms of the per-sample fields.
    pub fields: Vec<FieldSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experiment: Option<ExperimentReport>,
    #[serde(skip)]
    pub bins: usize,
}

impl InspectOutcome {
    pub fn exit_code(&self) -> i32 {
        if self.valid { EXIT_VALID } else { EXIT_INVALID }
    }
}

/// How a dataset is walked ([`quarry_formats::examine`]; tests substitute their own).
pub type ExamineFn = fn(Format, &Path, &mut dyn Observer) -> Result<u64, DatasetError>;

/// The command: inspects, prints the report to `out`, writes the PNG; returns the exit
/// status. A reader that went away (`coordinator inspect ... | head`) ends the report
/// quietly.
pub fn main(args: &InspectArgs, out: &mut dyn std::io::Write) -> i32 {
    match run(args) {
        Ok(outcome) => {
            let text = if args.json {
                match serde_json::to_string_pretty(&outcome) {
                    Ok(s) => s + "\n",
                    Err(e) => {
                        eprintln!("error: {e}");
                        return EXIT_ERROR;
                    }
                }
            } else {
                render_text(&outcome)
            };
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("error: writing the report: {e}");
                    EXIT_ERROR
                }
                _ => outcome.exit_code(),
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// Inspects `args.path` and writes the PNG when asked to.
pub fn run(args: &InspectArgs) -> Result<InspectOutcome, InspectError> {
    run_with(args, quarry_formats::examine)
}

/// [`run`] with the walk `examine`.
pub fn run_with(args: &InspectArgs, examine: ExamineFn) -> Result<InspectOutcome, InspectError> {
    let outcome = inspect(args, examine)?;
    if let Some(png) = &args.png {
        let bytes = chart::render(&outcome).encode_png();
        std::fs::write(png, bytes)
            .map_err(|e| InspectError::Failed(format!("writing {}: {e}", png.display())))?;
    }
    Ok(outcome)
}

/// Inspects without printing or drawing.
pub fn inspect(args: &InspectArgs, examine: ExamineFn) -> Result<InspectOutcome, InspectError> {
    let path = &args.path;
    if !path.exists() {
        return Err(InspectError::Usage(format!(
            "{}: no such file or directory",
            path.display()
        )));
    }
    let bins = usize::from(args.bins.max(1));
    if path.is_dir() && path.join("manifest.json").is_file() {
        return inspect_experiment(args, examine, bins);
    }
    let format = match args.format.or_else(|| Format::detect(path)) {
        Some(f) => f,
        None => {
            return Err(InspectError::Usage(format!(
                "{}: cannot tell the dataset's format; name it with --format ({})",
                path.display(),
                Format::ALL.map(|f| f.name()).join("|")
            )));
        }
    };
    let mut stats = Stats::default();
    let walked = walk(examine, format, path, &mut stats);
    let binned = second_pass(examine, &[(format, path.clone())], &stats, bins);
    let fields = stats.summaries(bins, &binned);
    let report = dataset_report(path, Some(format), &walked, &stats, fields.clone());
    Ok(InspectOutcome {
        path: path.display().to_string(),
        mode: "dataset",
        name: file_name(path),
        format: Some(format.name().to_string()),
        valid: report.valid,
        samples: report.samples,
        problem_count: report.problem_count,
        problems: report.problems,
        facts: report.facts,
        fields,
        experiment: None,
        bins,
    })
}

/// Walks one dataset into `stats`; a walk that fails becomes a problem too.
fn walk(examine: ExamineFn, format: Format, path: &Path, stats: &mut Stats) -> Result<u64, String> {
    match examine(format, path, stats) {
        Ok(n) => Ok(n),
        Err(DatasetError::Invalid { path: at, reason }) => {
            stats.add_problem(&at, &reason);
            Err(format!("{at}: {reason}"))
        }
        Err(e) => {
            let reason = e.to_string();
            stats.add_problem(&path.display().to_string(), &reason);
            Err(reason)
        }
    }
}

/// Histograms of the fields whose values did not all fit in memory: a binning walk over the
/// same datasets.
fn second_pass(
    examine: ExamineFn,
    datasets: &[(Format, PathBuf)],
    stats: &Stats,
    bins: usize,
) -> HashMap<String, stats::Histogram> {
    let mut binner = Binner::for_stats(stats, bins);
    if binner.is_empty() {
        return HashMap::new();
    }
    for (format, path) in datasets {
        // Problems were reported by the first walk.
        let _ = examine(*format, path, &mut binner);
    }
    binner.histograms
}

fn dataset_report(
    path: &Path,
    format: Option<Format>,
    walked: &Result<u64, String>,
    stats: &Stats,
    fields: Vec<FieldSummary>,
) -> DatasetReport {
    DatasetReport {
        path: path.display().to_string(),
        format: format.map(|f| f.name().to_string()),
        valid: walked.is_ok() && stats.problem_count() == 0,
        samples: match walked {
            Ok(n) => *n,
            Err(_) => stats.samples_seen(),
        },
        error: walked.as_ref().err().cloned(),
        problem_count: stats.problem_count(),
        problems: stats.problems().to_vec(),
        facts: stats.facts().to_vec(),
        fields,
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn read_manifest(dir: &Path) -> Result<Value, InspectError> {
    let p = dir.join("manifest.json");
    let text = std::fs::read_to_string(&p)
        .map_err(|e| InspectError::Failed(format!("reading {}: {e}", p.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| InspectError::Failed(format!("{}: not JSON: {e}", p.display())))
}

fn inspect_experiment(
    args: &InspectArgs,
    examine: ExamineFn,
    bins: usize,
) -> Result<InspectOutcome, InspectError> {
    let dir = args
        .path
        .canonicalize()
        .map_err(|e| InspectError::Failed(format!("{}: {e}", args.path.display())))?;
    let manifest = read_manifest(&dir)?;
    let experiments = dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    let quota = manifest["target_count_per_object"].as_u64();
    let manifest_format = manifest["format"].as_str().and_then(Format::from_name);
    let objects = manifest["objects"].as_object();
    // Objects in the job's order, then any others the manifest holds.
    let mut names: Vec<String> = manifest["object_code_list"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    names.retain(|n| objects.is_some_and(|o| o.contains_key(n)));
    if let Some(o) = objects {
        for k in o.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }

    let mut all = Stats::default();
    let mut walked_datasets = Vec::new();
    let mut reports = Vec::new();
    let mut formats = Vec::new();
    for name in &names {
        let entry = &manifest["objects"][name.as_str()];
        let u = |k: &str| entry[k].as_u64();
        let final_key = entry["final"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(String::from);
        let attempts = u("attempts");
        let successes = u("successes");
        let success_rate = entry["success_rate"].as_f64();
        let collected = u("collected");
        let yield_ = match (success_rate, attempts, successes) {
            (Some(r), _, _) => Some(Yield {
                value: r,
                basis: "success_rate",
            }),
            (None, Some(a), Some(s)) if a > 0 => Some(Yield {
                value: s as f64 / a as f64,
                basis: "success_rate",
            }),
            _ => match (collected, quota) {
                (Some(c), Some(q)) if q > 0 => Some(Yield {
                    value: c as f64 / q as f64,
                    basis: "collected/quota",
                }),
                _ => None,
            },
        };
        let dataset = final_key.as_ref().map(|key| {
            let path = experiments.join(key);
            let mut stats = Stats::default();
            let format = args
                .format
                .or(manifest_format)
                .or_else(|| Format::detect(&path));
            let walked = if !path.exists() {
                let reason = "the manifest lists this final but it does not exist";
                stats.add_problem(&path.display().to_string(), reason);
                Err(reason.to_string())
            } else if let Some(f) = format {
                walked_datasets.push((f, path.clone()));
                walk(examine, f, &path, &mut stats)
            } else {
                let reason = "cannot tell the final's format; name it with --format";
                stats.add_problem(&path.display().to_string(), reason);
                Err(reason.to_string())
            };
            if let (Ok(n), Some(c)) = (&walked, collected)
                && *n != c
            {
                stats.add_problem(
                    &path.display().to_string(),
                    &format!("holds {n} samples but the manifest records collected = {c}"),
                );
            }
            if let Some(f) = format {
                formats.push(f);
            }
            let r = dataset_report(&path, format, &walked, &stats, stats.plain_summaries());
            all.absorb(stats);
            r
        });
        reports.push(ObjectReport {
            object: name.clone(),
            final_key,
            collected,
            attempts,
            successes,
            success_rate,
            filtered: u("filtered"),
            duplicates: u("duplicates"),
            done: entry["done"].as_bool(),
            yield_,
            dataset,
        });
    }
    let binned = second_pass(examine, &walked_datasets, &all, bins);
    formats.dedup();
    let format = match formats.as_slice() {
        [f] => Some(f.name().to_string()),
        _ => None,
    };
    let samples = reports
        .iter()
        .filter_map(|r| r.dataset.as_ref())
        .map(|d| d.samples)
        .sum();
    let valid = reports
        .iter()
        .filter_map(|r| r.dataset.as_ref())
        .all(|d| d.valid);
    let exp_name = manifest["exp_name"].as_str().map(String::from);
    Ok(InspectOutcome {
        path: args.path.display().to_string(),
        mode: "experiment",
        name: exp_name.clone().unwrap_or_else(|| file_name(&dir)),
        format,
        valid,
        samples,
        problem_count: all.problem_count(),
        problems: all.problems().to_vec(),
        facts: Vec::new(),
        fields: all.summaries(bins, &binned),
        experiment: Some(ExperimentReport {
            exp_name,
            state: manifest["state"].as_str().map(String::from),
            quota,
            objects: reports,
        }),
        bins,
    })
}

/// A number in at most `sig` significant digits, short: `0`, `0.125`, `1250`, `1.2e-05`.
pub fn fmt_num(v: f64, sig: usize) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return format!("{v}");
    }
    let sig = sig.max(1);
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        let s = format!("{:.*e}", sig - 1, v);
        return match s.split_once('e') {
            Some((m, e)) => format!("{}e{e}", trim_zeros(m)),
            None => s,
        };
    }
    let decimals = (sig as i32 - 1 - a.log10().floor() as i32).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| fmt_num(v, 6))
}

fn opt_u(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Rows as an aligned table: the first `left` columns and the last `left_end` left-aligned,
/// the others (numbers) right-aligned.
fn table(rows: &[Vec<String>], left: usize, left_end: usize) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let pad = widths[c].saturating_sub(cell.chars().count());
            if c > 0 {
                line.push_str("  ");
            }
            if c < left || c + left_end >= cols {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn field_table(fields: &[FieldSummary]) -> String {
    let mut rows = vec![
        [
            "field", "kind", "samples", "count", "nan", "inf", "min", "mean", "max",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for f in fields {
        let kind = if f.kind == "scalar" {
            "scalar".to_string()
        } else {
            format!("array[{}]", f.max_values_per_sample)
        };
        rows.push(vec![
            f.name.clone(),
            kind,
            f.samples.to_string(),
            f.count.to_string(),
            f.nan.to_string(),
            f.inf.to_string(),
            opt(f.min),
            opt(f.mean),
            opt(f.max),
        ]);
    }
    table(&rows, 2, 0)
}

/// The text output: a header, the problems (at most [`PRINTED_PROBLEMS`]), the objects of an
/// experiment, the field table.
pub fn render_text(o: &InspectOutcome) -> String {
    let mut out = String::new();
    let status = if o.valid {
        "valid".to_string()
    } else {
        format!("INVALID: {} problem(s)", o.problem_count)
    };
    let mut head = vec![
        vec![o.mode.to_string(), o.name.clone()],
        vec!["path".into(), o.path.clone()],
    ];
    if let Some(f) = &o.format {
        head.push(vec!["format".into(), f.clone()]);
    }
    if let Some(e) = &o.experiment {
        let with_final = e.objects.iter().filter(|r| r.dataset.is_some()).count();
        head.push(vec![
            "objects".into(),
            format!("{} ({with_final} with a final)", e.objects.len()),
        ]);
        if let Some(q) = e.quota {
            head.push(vec!["quota".into(), format!("{q} per object")]);
        }
        if let Some(s) = &e.state {
            head.push(vec!["state".into(), s.clone()]);
        }
    }
    head.push(vec!["samples".into(), o.samples.to_string()]);
    head.push(vec!["status".into(), status]);
    let w = head.iter().map(|r| r[0].len()).max().unwrap_or(0) + 2;
    for r in &head {
        out.push_str(&format!("{:<w$}{}\n", r[0], r[1]));
    }
    if !o.facts.is_empty() {
        out.push_str("\ndataset:\n");
        let w = o
            .facts
            .iter()
            .map(|f| f.key.chars().count())
            .max()
            .unwrap_or(0)
            + 2;
        for f in &o.facts {
            out.push_str(&format!("  {:<w$}{}\n", f.key, f.value));
        }
    }
    if o.problem_count > 0 {
        out.push_str("\nproblems:\n");
        for p in o.problems.iter().take(PRINTED_PROBLEMS) {
            out.push_str(&format!("  {}: {}\n", p.path, p.reason));
        }
        let shown = o.problems.len().min(PRINTED_PROBLEMS) as u64;
        if o.problem_count > shown {
            out.push_str(&format!("  ... and {} more\n", o.problem_count - shown));
        }
    }
    if let Some(e) = &o.experiment {
        let mut rows = vec![
            [
                "object",
                "samples",
                "collected",
                "attempts",
                "successes",
                "yield",
                "filtered",
                "duplicates",
                "status",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for r in &e.objects {
            let status = match &r.dataset {
                None => "no final".to_string(),
                Some(d) if d.valid => "valid".to_string(),
                Some(d) => format!("INVALID ({})", d.problem_count),
            };
            rows.push(vec![
                r.object.clone(),
                opt_u(r.dataset.as_ref().map(|d| d.samples)),
                opt_u(r.collected),
                opt_u(r.attempts),
                opt_u(r.successes),
                r.yield_.as_ref().map_or_else(
                    || "-".into(),
                    |y| {
                        let tag = if y.basis == "success_rate" {
                            ""
                        } else {
                            " (of quota)"
                        };
                        format!("{}%{tag}", fmt_num(y.value * 100.0, 3))
                    },
                ),
                opt_u(r.filtered),
                opt_u(r.duplicates),
                status,
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows, 1, 1));
    }
    out.push('\n');
    if o.fields.is_empty() {
        out.push_str("no numeric fields\n");
    } else {
        if o.experiment.is_some() {
            out.push_str("fields (all objects):\n");
        }
        out.push_str(&field_table(&o.fields));
    }
    out
}

#[cfg(test)]
mod tests;
