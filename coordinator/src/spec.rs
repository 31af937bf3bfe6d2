//! The job spec: what a user asks for, as a job file (TOML), scale_runner-style flags or JSON
//! on the wire. Validated once, before anything runs, with errors that name the field and the fix.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use quarry_common::names;
use quarry_formats::{Filter, Format};
use serde::{Deserialize, Serialize};

/// Seeds of object `i` start at `seed_base + i * seed_stride` (the legacy tool's 100000).
pub const DEFAULT_SEED_STRIDE: u64 = 100_000;

/// Where the finals go (scale_runner's `--final_dir_mode`). In `seed_only`, `both` and
/// `plain_only` every object's final is written to `final/<object>/` as the object completes,
/// as scale_runner does; in `seed_only` and `both`, when the run ends (every object merged or
/// out of rounds) the run's finals are published under one `final_seed_<min>-<max>/` whose
/// range covers the seeds of the rounds those finals hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FinalDirMode {
    /// `final/` is renamed to `final_seed_<min>-<max>/` when the run ends (scale_runner's
    /// default).
    #[default]
    #[value(name = "seed_only")]
    SeedOnly,
    /// `final/` stays and is copied to `final_seed_<min>-<max>/` when the run ends.
    #[value(name = "both")]
    Both,
    /// Only `final/<object>/`.
    #[value(name = "plain_only")]
    PlainOnly,
    /// Quarry's own: each object's final goes straight to its own
    /// `final_seed_<object min>-<object max>/<object>/` when it completes, for cluster jobs
    /// whose consumers take objects before the run ends.
    #[value(name = "seed_per_object")]
    SeedPerObject,
}

impl FinalDirMode {
    /// Whether the run's finals are published under one seed-tagged directory at its end.
    pub fn publishes_at_end(self) -> bool {
        matches!(self, FinalDirMode::SeedOnly | FinalDirMode::Both)
    }
}

impl fmt::Display for FinalDirMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FinalDirMode::SeedOnly => "seed_only",
            FinalDirMode::Both => "both",
            FinalDirMode::PlainOnly => "plain_only",
            FinalDirMode::SeedPerObject => "seed_per_object",
        })
    }
}

/// How to run the generator for one round. Every string may hold the placeholders
/// `{name} {seed} {object} {batch_size} {num_iterations} {round} {exp}`; argv also `{gpu}`
/// (filled in by the worker with its GPU id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSpec {
    /// Program and arguments; run directly, never through a shell.
    pub argv: Vec<String>,
    /// Working directory, relative to the job root (or absolute).
    #[serde(default)]
    pub cwd: String,
    /// Extra environment for the generator.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The round's dataset (a file, or a directory for zarr, episode and LeRobot datasets),
    /// relative to the job root.
    pub output: String,
    /// The dataset format: `npy`, `hdf5`, `zarr`, `episodes`, `npz`, `jsonl` or `lerobot`.
    /// By default the output's extension tells (`.npy`, `.hdf5`/`.h5`, `.zarr`, `.npz`,
    /// `.jsonl`); an episode directory or a LeRobot dataset must be named here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A yield sidecar the generator writes each round, relative to the job root:
    /// `{"attempts": A, "successes": S}` (trials tried, successes kept). Quarry records the
    /// yield per round and shows success rates per object; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<String>,
    /// Directory the generator creates for the round, removed after upload unless
    /// `keep_intermediate`; relative to the job root.
    #[serde(default)]
    pub round_dir: Option<String>,
    /// Per-attempt time limit in seconds; none by default.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Set `CUDA_VISIBLE_DEVICES` to the worker's GPU (default true).
    #[serde(default = "default_true")]
    pub bind_gpu: bool,
    /// Arguments appended after the rendered argv (scale_runner's `-- <args>`).
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// `OMP_NUM_THREADS` and `MKL_NUM_THREADS` for each generator run; by default each
    /// worker divides its host's CPUs among its agents (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads_per_gpu: Option<u32>,
    /// A round starts only when its GPU has this much memory free (MiB); until then the
    /// agent waits (another process may be using the GPU). Not checked without NVML.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free_gpu_memory_mib: Option<u64>,
    /// `process` (default): one generator process per round. `warm`: one long-lived process
    /// per agent, handed rounds one JSON line at a time (see `docs/job-file.md`, "Warm
    /// generators"); its argv, cwd and env may not use per-round placeholders.
    #[serde(default = "default_mode", skip_serializing_if = "is_process_mode")]
    pub mode: String,
    /// Warm mode: the generator process is restarted after this many rounds (a leak bound);
    /// none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recycle_after_rounds: Option<u32>,
    /// Warm mode: the generator is restarted between rounds once its process group holds
    /// more resident host memory than this (MiB); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recycle_above_memory_mib: Option<u64>,
    /// Warm mode: the generator is restarted between rounds once the processes of its
    /// process group hold more memory of the agent's GPU than this (MiB), as the GPU
    /// inventory reports it; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recycle_above_gpu_memory_mib: Option<u64>,
    /// Warm mode: the fraction (0 to 1) of rounds, chosen deterministically from the job,
    /// object and round, re-run cold in a fresh process after they are done; their outputs'
    /// sha256 (a directory dataset's: of its tree) must agree, or the job stops. None by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<Fraction>,
}

/// A number from 0 to 1 in a job file (`generator.audit`); validated, so never NaN, which
/// makes it safe to compare as equal.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fraction(pub f64);

impl Eq for Fraction {}

/// `generator.mode` of one process per round.
pub const MODE_PROCESS: &str = "process";
/// `generator.mode` of one long-lived process serving rounds.
pub const MODE_WARM: &str = "warm";

/// Placeholders whose value changes from round to round; a warm generator's argv, cwd and
/// env cannot use them, since it is started once for many rounds.
const PER_ROUND_PLACEHOLDERS: &[&str] = &["name", "seed", "object", "round"];

fn default_mode() -> String {
    MODE_PROCESS.to_string()
}

fn is_process_mode(m: &String) -> bool {
    m == MODE_PROCESS
}

impl GeneratorSpec {
    /// Whether rounds are served by one long-lived process (`mode = "warm"`).
    pub fn is_warm(&self) -> bool {
        self.mode == MODE_WARM
    }
}

/// Largest `merge.video_files_size_in_mb`: 1 TiB, past any video file a merge writes.
pub const MAX_VIDEO_FILES_SIZE_IN_MB: f64 = 1024.0 * 1024.0;

/// Most threads a job may ask for per generator run; more is a typo, not a machine.
pub const MAX_THREADS_PER_GPU: u32 = 4096;

fn default_true() -> bool {
    true
}

fn default_batch() -> u64 {
    512
}
fn default_iterations() -> u64 {
    10_000
}
fn default_seed_base() -> i64 {
    12_345
}
fn default_stride() -> u64 {
    DEFAULT_SEED_STRIDE
}
fn default_retries() -> u32 {
    2
}
fn default_backoff_ms() -> u64 {
    1_000
}

/// A job. Field names follow scale_runner's flags where one exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The experiment name (`--exp_name`); also the job id.
    pub exp_name: String,
    /// Object codes in order; an object's index fixes its seeds.
    pub objects: Vec<String>,
    pub target_count_per_object: u64,
    #[serde(default = "default_batch")]
    pub round_batch_size: u64,
    #[serde(default = "default_iterations")]
    pub num_iterations: u64,
    #[serde(default = "default_seed_base")]
    pub seed_base: i64,
    #[serde(default = "default_stride")]
    pub seed_stride: u64,
    /// Cap on rounds per object; at most (and by default) the seed stride.
    #[serde(default)]
    pub max_rounds: Option<u64>,
    #[serde(default)]
    pub final_dir_mode: FinalDirMode,
    #[serde(default)]
    pub keep_intermediate: bool,
    /// Failed attempts retried per round before it is quarantined.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First retry delay; doubles per failure, capped at 60 s.
    #[serde(default = "default_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Absolute directory on the workers that generator paths are relative to.
    pub root: PathBuf,
    pub generator: GeneratorSpec,
    /// What the merge keeps: a quality filter and de-duplication.
    #[serde(default, skip_serializing_if = "MergeSpec::is_default")]
    pub merge: MergeSpec,
}

/// The `[merge]` table: per-sample quality filter and de-duplication, applied in round order
/// before the final is cut to the quota (so the final still holds the quota when enough
/// samples pass).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeSpec {
    /// Keep only samples for which `<field> <op> <number>` holds, e.g. `"E_pen <= 0.02"`.
    /// Workers count the passing samples of each round, so the quota counts only those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Drop a sample whose listed fields equal an earlier sample's (by content hash), e.g.
    /// `["qpos"]`. Duplicates are found at merge time: a final may then hold fewer samples
    /// than the quota, which the manifest records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dedup: Vec<String>,
    /// `lerobot` only: consecutive video files of a key are appended into one (packets
    /// remuxed, never re-encoded) while it stays under this many MiB, as lerobot's own
    /// `video_files_size_in_mb`; unset, each round's video file is a file of the final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_files_size_in_mb: Option<Megabytes>,
}

/// A size in MiB in a job file (`merge.video_files_size_in_mb`); validated finite and
/// positive, so never NaN, which makes it safe to compare as equal.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Megabytes(pub f64);

impl Eq for Megabytes {}

impl MergeSpec {
    fn is_default(&self) -> bool {
        *self == MergeSpec::default()
    }

    /// The parsed filter (validated with the spec, so a stored spec parses).
    pub fn parsed_filter(&self) -> Option<Filter> {
        self.filter.as_deref().and_then(|f| Filter::parse(f).ok())
    }
}

/// A spec refused before anything runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}; {fix}")]
pub struct SpecError {
    pub field: String,
    pub problem: String,
    pub fix: String,
}

fn spec_err(
    field: impl Into<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> SpecError {
    SpecError {
        field: field.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

const PLACEHOLDERS: &[&str] = &[
    "name",
    "seed",
    "object",
    "batch_size",
    "num_iterations",
    "round",
    "exp",
    "gpu",
];

impl JobSpec {
    /// A job of the legacy generator ([`JobSpec::legacy_generator`]) with every other field at
    /// the default a job file gets when it leaves the field out; `root` is empty until set.
    pub fn legacy(exp_name: String, objects: Vec<String>, target_count_per_object: u64) -> JobSpec {
        JobSpec {
            exp_name,
            objects,
            target_count_per_object,
            round_batch_size: default_batch(),
            num_iterations: default_iterations(),
            seed_base: default_seed_base(),
            seed_stride: default_stride(),
            max_rounds: None,
            final_dir_mode: FinalDirMode::default(),
            keep_intermediate: false,
            retries: default_retries(),
            retry_backoff_ms: default_backoff_ms(),
            root: PathBuf::new(),
            generator: JobSpec::legacy_generator(),
            merge: MergeSpec::default(),
        }
    }

    /// The legacy generator: `python3 main.py ...` in `<root>/BimanGrasp-Optimization`,
    /// output read from `<root>/data/experiments/<name>/results/<object>.npy`.
    pub fn legacy_generator() -> GeneratorSpec {
        let argv = [
            "python3",
            "main.py",
            "--name",
            "{name}",
            "--object_code",
            "{object}",
            "--batch_size",
            "{batch_size}",
            "--num_iterations",
            "{num_iterations}",
            "--seed",
            "{seed}",
            "--gpu",
            "0",
        ];
        GeneratorSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            cwd: "BimanGrasp-Optimization".into(),
            env: BTreeMap::new(),
            output: "data/experiments/{name}/results/{object}.npy".into(),
            round_dir: Some("data/experiments/{name}".into()),
            timeout_secs: None,
            bind_gpu: true,
            extra_args: Vec::new(),
            threads_per_gpu: None,
            min_free_gpu_memory_mib: None,
            format: None,
            stats: None,
            mode: default_mode(),
            recycle_after_rounds: None,
            recycle_above_memory_mib: None,
            recycle_above_gpu_memory_mib: None,
            audit: None,
        }
    }

    /// Whether `generator.audit` picks this round: a hash of (exp, object, round) below the
    /// fraction, so the same rounds are audited in every run of the job.
    pub fn audited(&self, object: &str, round: u32) -> bool {
        let Some(Fraction(fraction)) = self.generator.audit.filter(|f| f.0 > 0.0) else {
            return false;
        };
        // FNV-1a: stable across builds and platforms, unlike the standard library's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self
            .exp_name
            .bytes()
            .chain([0])
            .chain(object.bytes())
            .chain([0])
            .chain(round.to_le_bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
    }

    /// The effective round cap: `max_rounds` or, when unset, the seed stride.
    pub fn round_cap(&self) -> u64 {
        self.max_rounds.unwrap_or(self.seed_stride)
    }

    /// Checks everything that can be checked before a round runs.
    pub fn validate(&self) -> Result<(), SpecError> {
        names::validate_round_part("exp_name", &self.exp_name)
            .map_err(|e| spec_err("exp_name", e.problem(), e.fix()))?;
        if self.objects.is_empty() {
            return Err(spec_err(
                "object_code_list",
                "no objects given",
                "list at least one object code",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, o) in self.objects.iter().enumerate() {
            names::validate_round_part("object code", o)
                .map_err(|e| spec_err(format!("object_code_list[{i}]"), e.problem(), e.fix()))?;
            if !seen.insert(o.as_str()) {
                return Err(spec_err(
                    format!("object_code_list[{i}]"),
                    format!("object code {o:?} appears twice"),
                    "list each object once (its index fixes its seeds)",
                ));
            }
        }
        if self.target_count_per_object == 0 {
            return Err(spec_err(
                "target_count_per_object",
                "must be positive",
                "give the number of samples wanted per object, e.g. 10000",
            ));
        }
        if self.round_batch_size == 0 {
            return Err(spec_err(
                "round_batch_size",
                "must be positive",
                "give the generator's batch size, e.g. 512",
            ));
        }
        if self.seed_stride == 0 {
            return Err(spec_err(
                "seed_stride",
                "must be positive",
                "leave it at 100000",
            ));
        }
        let cap = self.round_cap();
        if cap == 0 {
            return Err(spec_err(
                "max_rounds",
                "must be positive",
                "omit it to allow up to the seed stride",
            ));
        }
        if cap > self.seed_stride {
            return Err(spec_err(
                "max_rounds",
                format!(
                    "{cap} rounds would reach the seed stride {} and reuse the next object's seeds",
                    self.seed_stride
                ),
                format!("use at most {} (or omit --max_rounds)", self.seed_stride),
            ));
        }
        if cap > u64::from(u32::MAX) {
            return Err(spec_err(
                "max_rounds",
                "too large",
                "use at most 4294967295",
            ));
        }
        // The largest seed must fit: base + (n-1)*stride + (cap-1).
        let last = (self.objects.len() as i128 - 1) * self.seed_stride as i128 + cap as i128 - 1;
        if i128::from(self.seed_base) + last > i128::from(i64::MAX)
            || i128::from(self.seed_base) < i128::from(i64::MIN) / 2
        {
            return Err(spec_err(
                "seed_base",
                "seeds would overflow a 64-bit integer",
                "use a smaller seed_base",
            ));
        }
        if !self.root.is_absolute() {
            return Err(spec_err(
                "root",
                format!("{:?} is not absolute", self.root),
                "give an absolute path",
            ));
        }
        let g = &self.generator;
        if g.argv.is_empty() || g.argv[0].is_empty() {
            return Err(spec_err(
                "generator.argv",
                "is empty",
                "give the program and its arguments",
            ));
        }
        for (field, s) in g
            .argv
            .iter()
            .map(|a| ("generator.argv", a))
            .chain(std::iter::once(("generator.output", &g.output)))
            .chain(std::iter::once(("generator.cwd", &g.cwd)))
            .chain(g.round_dir.iter().map(|d| ("generator.round_dir", d)))
            .chain(g.env.values().map(|v| ("generator.env", v)))
        {
            check_placeholders(field, s)?;
        }
        for (field, p) in std::iter::once(("generator.output", &g.output))
            .chain(g.round_dir.iter().map(|d| ("generator.round_dir", d)))
        {
            check_round_path(field, p)?;
        }
        self.format()?;
        if let Some(stats) = &g.stats {
            check_placeholders("generator.stats", stats)?;
            check_round_path("generator.stats", stats)?;
        }
        if let Some(f) = &self.merge.filter {
            Filter::parse(f).map_err(|e| {
                spec_err(
                    "merge.filter",
                    e.problem.clone(),
                    format!(
                        "write it as `<field> <op> <number>`, e.g. \"E_pen <= 0.02\" (got {f:?})"
                    ),
                )
            })?;
        }
        if let Some(Megabytes(mb)) = self.merge.video_files_size_in_mb {
            if !(mb.is_finite() && mb > 0.0 && mb <= MAX_VIDEO_FILES_SIZE_IN_MB) {
                return Err(spec_err(
                    "merge.video_files_size_in_mb",
                    format!("{mb} is not a size from above 0 to {MAX_VIDEO_FILES_SIZE_IN_MB} MiB"),
                    "give the size in MiB under which a final's video file takes more rounds' videos, e.g. 200 (lerobot's default), or remove it to keep one video file per round's file",
                ));
            }
            if self.format().ok() != Some(Format::Lerobot) {
                return Err(spec_err(
                    "merge.video_files_size_in_mb",
                    "only applies to LeRobot datasets (generator.format = \"lerobot\"), whose video files it appends into fewer, larger ones",
                    "remove it, or set generator.format = \"lerobot\"",
                ));
            }
        }
        let mut fields = std::collections::HashSet::new();
        for (i, d) in self.merge.dedup.iter().enumerate() {
            let ok = d
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            if !ok {
                return Err(spec_err(
                    format!("merge.dedup[{i}]"),
                    format!("{d:?} is not a field name"),
                    "give dotted paths of letters, digits and underscores, e.g. \"qpos\" or \"data.action\"",
                ));
            }
            if !fields.insert(d.as_str()) {
                return Err(spec_err(
                    format!("merge.dedup[{i}]"),
                    format!("{d:?} is listed twice"),
                    "list each field once",
                ));
            }
        }
        for k in g.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(spec_err(
                    "generator.env",
                    format!("bad variable name {k:?}"),
                    "use NAME = \"value\"",
                ));
            }
        }
        if g.timeout_secs == Some(0) {
            return Err(spec_err(
                "generator.timeout_secs",
                "must be positive",
                "omit it for no timeout",
            ));
        }
        match g.threads_per_gpu {
            Some(0) => {
                return Err(spec_err(
                    "generator.threads_per_gpu",
                    "must be positive",
                    "omit it to divide each host's CPUs among its GPUs",
                ));
            }
            Some(n) if n > MAX_THREADS_PER_GPU => {
                return Err(spec_err(
                    "generator.threads_per_gpu",
                    format!("{n} is more than {MAX_THREADS_PER_GPU}"),
                    "give the CPU threads one generator run should use, e.g. 8",
                ));
            }
            _ => {}
        }
        if g.min_free_gpu_memory_mib == Some(0) {
            return Err(spec_err(
                "generator.min_free_gpu_memory_mib",
                "must be positive",
                "omit it for no requirement",
            ));
        }
        self.validate_mode()
    }

    /// `generator.mode` is `process` or `warm`; a warm generator is started once, so what
    /// starts it (argv, cwd, env) cannot depend on the round.
    fn validate_mode(&self) -> Result<(), SpecError> {
        let g = &self.generator;
        if g.mode != MODE_PROCESS && g.mode != MODE_WARM {
            return Err(spec_err(
                "generator.mode",
                format!("{:?} is not a mode", g.mode),
                "use \"process\" (one process per round, the default) or \"warm\" (one process serving many rounds)",
            ));
        }
        if g.recycle_after_rounds == Some(0) {
            return Err(spec_err(
                "generator.recycle_after_rounds",
                "must be positive",
                "omit it to keep a warm generator until it fails",
            ));
        }
        if g.recycle_after_rounds.is_some() && !g.is_warm() {
            return Err(spec_err(
                "generator.recycle_after_rounds",
                "only applies to warm generators",
                "set generator.mode = \"warm\", or remove it",
            ));
        }
        if g.recycle_above_memory_mib == Some(0) {
            return Err(spec_err(
                "generator.recycle_above_memory_mib",
                "must be positive",
                "give the resident memory (MiB) above which a warm generator is restarted between rounds, or omit it",
            ));
        }
        if g.recycle_above_memory_mib.is_some() && !g.is_warm() {
            return Err(spec_err(
                "generator.recycle_above_memory_mib",
                "only applies to warm generators",
                "set generator.mode = \"warm\", or remove it",
            ));
        }
        if g.recycle_above_gpu_memory_mib == Some(0) {
            return Err(spec_err(
                "generator.recycle_above_gpu_memory_mib",
                "must be positive",
                "give the GPU memory (MiB) above which a warm generator is restarted between rounds, or omit it",
            ));
        }
        if g.recycle_above_gpu_memory_mib.is_some() && !g.is_warm() {
            return Err(spec_err(
                "generator.recycle_above_gpu_memory_mib",
                "only applies to warm generators",
                "set generator.mode = \"warm\", or remove it",
            ));
        }
        if let Some(Fraction(a)) = g.audit {
            if !(0.0..=1.0).contains(&a) {
                return Err(spec_err(
                    "generator.audit",
                    format!("{a} is not a fraction from 0 to 1"),
                    "give the fraction of warm rounds to re-run cold, e.g. 0.02",
                ));
            }
            if !g.is_warm() {
                return Err(spec_err(
                    "generator.audit",
                    "only applies to warm generators",
                    "set generator.mode = \"warm\", or remove it",
                ));
            }
        }
        if !g.is_warm() {
            return Ok(());
        }
        let cwd = std::slice::from_ref(&g.cwd);
        let env: Vec<String> = g.env.values().cloned().collect();
        for (field, values) in [
            ("generator.argv", g.argv.as_slice()),
            ("generator.extra_args", g.extra_args.as_slice()),
            ("generator.cwd", cwd),
            ("generator.env", env.as_slice()),
        ] {
            let used: Vec<String> = PER_ROUND_PLACEHOLDERS
                .iter()
                .map(|p| format!("{{{p}}}"))
                .filter(|p| values.iter().any(|v| v.contains(p.as_str())))
                .collect();
            if !used.is_empty() {
                return Err(spec_err(
                    field,
                    format!(
                        "uses the per-round placeholder{} {} in a warm generator, which is started once for many rounds",
                        if used.len() > 1 { "s" } else { "" },
                        used.join(" ")
                    ),
                    "remove them: a warm generator reads each round's name, seed, object and round from the JSON line it is handed (see docs/job-file.md, \"Warm generators\"), or use mode = \"process\"",
                ));
            }
        }
        Ok(())
    }

    /// The dataset format: `generator.format`, or what the output's extension says.
    pub fn format(&self) -> Result<Format, SpecError> {
        let g = &self.generator;
        let names = Format::ALL.map(Format::name).join(", ");
        let by_ext = Format::from_extension(&g.output);
        match &g.format {
            Some(name) => {
                let f = Format::from_name(name).ok_or_else(|| {
                    spec_err(
                        "generator.format",
                        format!("unknown format {name:?}"),
                        format!("use one of {names}"),
                    )
                })?;
                match by_ext {
                    Some(e) if e != f => Err(spec_err(
                        "generator.output",
                        format!("{:?} names a {e} dataset but generator.format is {f}", g.output),
                        "make the output's extension match the format (or drop the format)",
                    )),
                    _ => Ok(f),
                }
            }
            None => by_ext.ok_or_else(|| {
                spec_err(
                    "generator.format",
                    format!("the format of {:?} cannot be told from its name", g.output),
                    format!("name it with generator.format (one of {names}), or give the output an extension such as .npy or .hdf5"),
                )
            }),
        }
    }

    /// Seed of object `index`, round `round`.
    pub fn seed(&self, index: usize, round: u32) -> i64 {
        self.seed_base + (index as i64) * (self.seed_stride as i64) + i64::from(round)
    }

    /// `<exp>__<object>__r<round>_s<seed>`.
    pub fn round_name(&self, object: &str, round: u32, seed: i64) -> String {
        format!("{}__{}__r{}_s{}", self.exp_name, object, round, seed)
    }

    /// Differences in fields that change the plan or the bytes of the finals; empty when a
    /// stored job may be resumed with this spec.
    /// Whether this spec's objects are the stored spec's followed by more.
    pub fn appends_objects(&self, stored: &JobSpec) -> bool {
        self.objects.len() > stored.objects.len() && self.objects.starts_with(&stored.objects)
    }

    pub fn plan_differences(&self, stored: &JobSpec) -> Vec<String> {
        let mut d = Vec::new();
        macro_rules! cmp {
            ($label:expr, $a:expr, $b:expr) => {
                if $a != $b {
                    d.push(format!("{}: was {:?}, now {:?}", $label, $b, $a));
                }
            };
        }
        // Objects appended at the end keep every earlier object's index and seeds: a resumed
        // run may add them, as scale_runner's may.
        if !self.appends_objects(stored) {
            cmp!("object_code_list", &self.objects, &stored.objects);
        }
        cmp!(
            "target_count_per_object",
            self.target_count_per_object,
            stored.target_count_per_object
        );
        cmp!(
            "round_batch_size",
            self.round_batch_size,
            stored.round_batch_size
        );
        cmp!("num_iterations", self.num_iterations, stored.num_iterations);
        cmp!("seed_base", self.seed_base, stored.seed_base);
        cmp!("seed_stride", self.seed_stride, stored.seed_stride);
        cmp!("max_rounds", self.round_cap(), stored.round_cap());
        cmp!("root", &self.root, &stored.root);
        cmp!(
            "generator.argv",
            &self.generator.argv,
            &stored.generator.argv
        );
        cmp!(
            "generator.extra_args (after --)",
            &self.generator.extra_args,
            &stored.generator.extra_args
        );
        cmp!("generator.cwd", &self.generator.cwd, &stored.generator.cwd);
        cmp!("generator.env", &self.generator.env, &stored.generator.env);
        cmp!(
            "generator.output",
            &self.generator.output,
            &stored.generator.output
        );
        cmp!("generator.format", self.format().ok(), stored.format().ok());
        cmp!("merge.filter", &self.merge.filter, &stored.merge.filter);
        cmp!("merge.dedup", &self.merge.dedup, &stored.merge.dedup);
        cmp!(
            "merge.video_files_size_in_mb",
            &self.merge.video_files_size_in_mb,
            &stored.merge.video_files_size_in_mb
        );
        d
    }
}

/// A per-round path: relative, inside the job root, not GPU-dependent, different per round.
fn check_round_path(field: &str, p: &str) -> Result<(), SpecError> {
    if p.trim().is_empty() {
        return Err(spec_err(
            field,
            "is empty",
            "give a path relative to the job root",
        ));
    }
    if p.starts_with('/') || p.split('/').any(|c| c == "..") {
        return Err(spec_err(
            field,
            format!("{p:?} leaves the job root"),
            "give a path relative to the job root without '..'",
        ));
    }
    if p.contains("{gpu}") {
        return Err(spec_err(
            field,
            "may not use {gpu}",
            "paths must not depend on the GPU",
        ));
    }
    // Two rounds running at once on one machine must not share a path.
    if !["{name}", "{seed}", "{round}"]
        .iter()
        .any(|ph| p.contains(ph))
    {
        return Err(spec_err(
            field,
            format!("{p:?} is the same for every round"),
            "include {name} (or {seed}) in the path so rounds do not overwrite each other",
        ));
    }
    Ok(())
}

fn check_placeholders(field: &str, s: &str) -> Result<(), SpecError> {
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(spec_err(
                field,
                format!("unclosed '{{' in {s:?}"),
                "close the placeholder",
            ));
        };
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(spec_err(
                field,
                format!("unknown placeholder {{{name}}} in {s:?}"),
                format!(
                    "use one of {}",
                    PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Values for the placeholders of one round.
#[derive(Debug, Clone)]
pub struct RoundVars<'a> {
    pub exp: &'a str,
    pub name: &'a str,
    pub object: &'a str,
    pub seed: i64,
    pub round: u32,
    pub batch_size: u64,
    pub num_iterations: u64,
}

/// Renders every placeholder but `{gpu}`, which stays for the worker. One pass: a value is
/// never scanned again for placeholders.
pub fn render(template: &str, v: &RoundVars<'_>) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(end) = rest.find('}') else {
            break;
        };
        // `write!` into a String cannot fail.
        let _ = match &rest[1..end] {
            "name" => out.write_str(v.name),
            "object" => out.write_str(v.object),
            "exp" => out.write_str(v.exp),
            "seed" => write!(out, "{}", v.seed),
            "round" => write!(out, "{}", v.round),
            "batch_size" => write!(out, "{}", v.batch_size),
            "num_iterations" => write!(out, "{}", v.num_iterations),
            _ => {
                // Not a placeholder (or `{gpu}`): keep the brace and go on after it.
                out.push('{');
                rest = &rest[1..];
                continue;
            }
        };
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec() -> JobSpec {
        JobSpec {
            exp_name: "exp".into(),
            objects: vec!["a".into(), "b".into()],
            target_count_per_object: 100,
            round_batch_size: 32,
            num_iterations: 10,
            seed_base: 12345,
            seed_stride: DEFAULT_SEED_STRIDE,
            max_rounds: None,
            final_dir_mode: FinalDirMode::SeedOnly,
            keep_intermediate: false,
            retries: 2,
            retry_backoff_ms: 10,
            root: "/tmp/root".into(),
            generator: JobSpec::legacy_generator(),
            merge: Default::default(),
        }
    }

    #[test]
    fn seeds_and_names_match_the_legacy_tool() {
        let s = spec();
        assert_eq!(s.seed(0, 0), 12345);
        assert_eq!(s.seed(1, 3), 12345 + 100_000 + 3);
        assert_eq!(s.round_name("b", 3, s.seed(1, 3)), "exp__b__r3_s112348");
    }

    #[test]
    fn a_bad_name_is_refused_in_one_sentence_naming_the_field_and_the_fix() {
        let mut s = spec();
        s.exp_name = "a/b".into();
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "exp_name: \"a/b\" contains '/'; use only letters, digits, '.', '_' and '-'"
        );
        let mut s = spec();
        s.objects = vec!["ok".into(), "m ug".into()];
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "object_code_list[1]: \"m ug\" contains ' '; use only letters, digits, '.', '_' and '-'"
        );
    }

    #[test]
    fn names_that_could_be_a_round_directory_are_refused() {
        // Job `demo`'s round 0 of `mug` runs in `demo__mug__r0_s12345`: an experiment of that
        // name would have its directory removed with the round's.
        let mut s = spec();
        s.exp_name = "demo__mug__r0_s12345".into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "exp_name", "{e}");
        assert!(
            e.problem.contains("'__'") && e.fix.contains("single '_'"),
            "{e}"
        );
        let mut s = spec();
        s.objects = vec!["ok".into(), "mug__r0".into()];
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "object_code_list[1]", "{e}");
        assert!(e.problem.contains("'__'"), "{e}");
        let mut s = spec();
        s.objects = vec!["_mug".into()];
        assert_eq!(s.validate().unwrap_err().field, "object_code_list[0]");
        let mut s = spec();
        s.exp_name = "demo_mug_r0".into();
        s.validate().unwrap();
    }

    #[test]
    fn generator_mode_is_validated_and_warm_refuses_per_round_placeholders() {
        let mut s = spec();
        assert!(!s.generator.is_warm(), "process is the default");
        s.generator.mode = "hot".into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "generator.mode", "{e}");
        assert!(e.fix.contains("\"warm\""), "{e}");
        // The legacy argv renders {name} {object} {seed} per round: a warm job refuses it,
        // naming them.
        s.generator.mode = MODE_WARM.into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "generator.argv", "{e}");
        assert!(e.problem.contains("{name}"), "{e}");
        s.generator.argv = vec![
            "python3".into(),
            "main.py".into(),
            "--seed".into(),
            "{seed}".into(),
        ];
        let e = s.validate().unwrap_err();
        assert!(
            e.problem.contains("{seed}") && !e.problem.contains("{name}"),
            "{e}"
        );
        // Per-job placeholders stay allowed.
        s.generator.argv = vec![
            "python3".into(),
            "main.py".into(),
            "--batch_size".into(),
            "{batch_size}".into(),
            "--gpu".into(),
            "{gpu}".into(),
        ];
        s.validate().unwrap();
        s.generator.env.insert("RUN".into(), "{object}".into());
        assert_eq!(s.validate().unwrap_err().field, "generator.env");
        s.generator.env.clear();
        s.generator.recycle_after_rounds = Some(0);
        assert_eq!(
            s.validate().unwrap_err().field,
            "generator.recycle_after_rounds"
        );
        s.generator.recycle_after_rounds = Some(50);
        s.validate().unwrap();
        s.generator.mode = MODE_PROCESS.into();
        assert_eq!(
            s.validate().unwrap_err().field,
            "generator.recycle_after_rounds"
        );
        s.generator.mode = MODE_WARM.into();
        s.generator.recycle_above_memory_mib = Some(0);
        assert_eq!(
            s.validate().unwrap_err().field,
            "generator.recycle_above_memory_mib"
        );
        s.generator.recycle_above_memory_mib = Some(4096);
        s.validate().unwrap();
        s.generator.recycle_after_rounds = None;
        s.generator.mode = MODE_PROCESS.into();
        assert_eq!(
            s.validate().unwrap_err().field,
            "generator.recycle_above_memory_mib"
        );
        s.generator.recycle_after_rounds = Some(50);
        s.generator.recycle_above_memory_mib = None;
        s.generator.mode = MODE_WARM.into();
        s.generator.recycle_above_gpu_memory_mib = Some(0);
        assert_eq!(
            s.validate().unwrap_err().field,
            "generator.recycle_above_gpu_memory_mib"
        );
        s.generator.recycle_above_gpu_memory_mib = Some(20_000);
        s.validate().unwrap();
        s.generator.mode = MODE_PROCESS.into();
        s.generator.recycle_after_rounds = None;
        assert_eq!(
            s.validate().unwrap_err().field,
            "generator.recycle_above_gpu_memory_mib"
        );
        s.generator.recycle_after_rounds = Some(50);
        s.generator.recycle_above_gpu_memory_mib = None;
        s.generator.mode = MODE_WARM.into();
        s.generator.audit = Some(Fraction(1.5));
        assert_eq!(s.validate().unwrap_err().field, "generator.audit");
        s.generator.audit = Some(Fraction(0.25));
        s.validate().unwrap();
        // The audited rounds are a deterministic fraction.
        let picked = (0..4000).filter(|r| s.audited("mug", *r)).count();
        assert!((800..1200).contains(&picked), "{picked}");
        assert_eq!(
            (0..50).map(|r| s.audited("mug", r)).collect::<Vec<_>>(),
            (0..50).map(|r| s.audited("mug", r)).collect::<Vec<_>>()
        );
        s.generator.audit = Some(Fraction(1.0));
        assert!((0..100).all(|r| s.audited("bowl", r)));
        s.generator.audit = Some(Fraction(0.0));
        assert!(!(0..100).any(|r| s.audited("bowl", r)));
        s.generator.mode = MODE_PROCESS.into();
        s.generator.recycle_after_rounds = None;
        s.generator.audit = Some(Fraction(0.5));
        assert_eq!(s.validate().unwrap_err().field, "generator.audit");
        // A process-mode spec serializes as before (older readers see no new field).
        let json = serde_json::to_string(&spec().generator).unwrap();
        assert!(!json.contains("mode"), "{json}");
    }

    #[test]
    fn max_rounds_reaching_the_stride_is_refused() {
        let mut s = spec();
        s.max_rounds = Some(1_000_000);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "max_rounds");
        assert!(e.to_string().contains("100000"), "{e}");
        s.max_rounds = Some(100_000);
        s.validate().unwrap();
        s.max_rounds = None;
        assert_eq!(s.round_cap(), 100_000);
    }

    #[test]
    fn bad_names_and_sizes_are_refused_naming_the_field() {
        for bad in ["../x", "a b", "$(id)", "", "..", "-rf"] {
            let mut s = spec();
            s.objects = vec!["ok".into(), bad.into()];
            let e = s.validate().unwrap_err();
            assert_eq!(e.field, "object_code_list[1]", "{bad}: {e}");
        }
        let mut s = spec();
        s.objects = vec!["a".into(), "a".into()];
        assert!(s.validate().unwrap_err().problem.contains("twice"));
        let mut s = spec();
        s.target_count_per_object = 0;
        assert_eq!(s.validate().unwrap_err().field, "target_count_per_object");
        let mut s = spec();
        s.round_batch_size = 0;
        assert_eq!(s.validate().unwrap_err().field, "round_batch_size");
        let mut s = spec();
        s.generator.argv.push("{oops}".into());
        assert!(s.validate().unwrap_err().problem.contains("{oops}"));
        let mut s = spec();
        s.generator.output = "out/result.npy".into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "generator.output");
        assert!(e.fix.contains("{name}"), "{e}");
    }

    #[test]
    fn formats_come_from_the_spec_or_the_extension() {
        let mut s = spec();
        assert_eq!(s.format().unwrap(), Format::Npy);
        s.generator.output = "out/{name}/demo.hdf5".into();
        assert_eq!(s.format().unwrap(), Format::Hdf5);
        s.generator.output = "out/{name}/dataset".into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "generator.format");
        assert!(e.fix.contains("episodes"), "{e}");
        s.generator.format = Some("episodes".into());
        s.validate().unwrap();
        // A LeRobot dataset's root (parquet and mp4 files inside) is named by its format;
        // "parquet" alone is still no format, and the fix lists lerobot.
        s.generator.format = Some("lerobot".into());
        s.validate().unwrap();
        assert_eq!(s.format().unwrap(), Format::Lerobot);
        // Episodes are filtered and de-duplicated on their fields (checked at inspect).
        s.merge.filter = Some("length >= 10".into());
        s.merge.dedup = vec!["action".into(), "observation.state".into()];
        s.validate().unwrap();
        s.merge.filter = None;
        s.merge.dedup.clear();
        s.generator.format = Some("parquet".into());
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "generator.format");
        assert!(
            e.problem.contains("parquet") && e.fix.contains("zarr") && e.fix.contains("lerobot"),
            "{e}"
        );
        s.generator.format = Some("zarr".into());
        s.generator.output = "out/{name}/demo.npz".into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "generator.output");
        assert!(
            e.problem.contains("npz") && e.problem.contains("zarr"),
            "{e}"
        );
    }

    #[test]
    fn merge_options_and_sidecars_are_checked() {
        let mut s = spec();
        s.merge.filter = Some("E_pen <= 0.02".into());
        s.merge.dedup = vec!["qpos_left".into(), "obs.state".into()];
        s.generator.stats = Some("out/{name}/stats.json".into());
        s.validate().unwrap();
        assert_eq!(s.merge.parsed_filter().unwrap().value, 0.02);
        let mut bad = s.clone();
        bad.merge.filter = Some("E_pen <=".into());
        let e = bad.validate().unwrap_err();
        assert_eq!(e.field, "merge.filter");
        assert!(e.fix.contains("E_pen <= 0.02"), "{e}");
        let mut bad = s.clone();
        bad.merge.dedup = vec!["a".into(), "a".into()];
        assert_eq!(bad.validate().unwrap_err().field, "merge.dedup[1]");
        bad.merge.dedup = vec!["a b".into()];
        assert_eq!(bad.validate().unwrap_err().field, "merge.dedup[0]");
        let mut bad = s.clone();
        bad.generator.stats = Some("stats.json".into());
        let e = bad.validate().unwrap_err();
        assert_eq!(e.field, "generator.stats");
        assert!(e.fix.contains("{name}"), "{e}");
        // A changed filter changes the finals: resuming with it is refused.
        let mut other = s.clone();
        other.merge.filter = Some("E_pen <= 0.5".into());
        assert!(other.plan_differences(&s)[0].starts_with("merge.filter"));
        // Specs without the new fields serialize as before.
        let json = serde_json::to_string(&spec()).unwrap();
        assert!(!json.contains("merge") && !json.contains("stats"), "{json}");
    }

    #[test]
    fn video_files_size_is_checked_and_lerobot_only() {
        let mut s = spec();
        s.generator.output = "out/{name}/dataset".into();
        s.generator.format = Some("lerobot".into());
        s.merge.video_files_size_in_mb = Some(Megabytes(200.0));
        s.validate().unwrap();
        // Whole numbers and fractions, as the job file writes them.
        let m: MergeSpec =
            serde_json::from_value(serde_json::json!({"video_files_size_in_mb": 200})).unwrap();
        assert_eq!(m.video_files_size_in_mb, Some(Megabytes(200.0)));
        let m: MergeSpec =
            serde_json::from_value(serde_json::json!({"video_files_size_in_mb": 0.5})).unwrap();
        assert_eq!(m.video_files_size_in_mb, Some(Megabytes(0.5)));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 2e6] {
            let mut b = s.clone();
            b.merge.video_files_size_in_mb = Some(Megabytes(bad));
            let e = b.validate().unwrap_err();
            assert_eq!(e.field, "merge.video_files_size_in_mb", "{bad}");
            assert!(e.fix.contains("200"), "{e}");
        }
        // Another format: refused, naming what it applies to.
        let mut other = spec();
        other.merge.video_files_size_in_mb = Some(Megabytes(200.0));
        let e = other.validate().unwrap_err();
        assert_eq!(e.field, "merge.video_files_size_in_mb");
        assert!(e.problem.contains("lerobot"), "{e}");
        // A changed size changes the finals: resuming with it is refused.
        let mut changed = s.clone();
        changed.merge.video_files_size_in_mb = Some(Megabytes(100.0));
        assert!(changed.plan_differences(&s)[0].starts_with("merge.video_files_size_in_mb"));
        changed.merge.video_files_size_in_mb = None;
        assert!(changed.plan_differences(&s)[0].starts_with("merge.video_files_size_in_mb"));
    }

    #[test]
    fn gpu_fields_are_optional_and_checked() {
        let mut s = spec();
        s.validate().unwrap();
        // Omitted fields stay out of the JSON, so specs stored before they existed compare equal.
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("threads_per_gpu"), "{json}");
        s.generator.threads_per_gpu = Some(0);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "generator.threads_per_gpu");
        s.generator.threads_per_gpu = Some(MAX_THREADS_PER_GPU + 1);
        assert_eq!(s.validate().unwrap_err().field, "generator.threads_per_gpu");
        s.generator.threads_per_gpu = Some(8);
        s.generator.min_free_gpu_memory_mib = Some(0);
        let e = s.validate().unwrap_err();
        assert_eq!(e.field, "generator.min_free_gpu_memory_mib");
        assert!(e.fix.contains("omit"), "{e}");
        s.generator.min_free_gpu_memory_mib = Some(4096);
        s.validate().unwrap();
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn plan_differences_name_what_changed() {
        let a = spec();
        let mut b = spec();
        assert!(a.plan_differences(&b).is_empty());
        b.round_batch_size = 64;
        b.keep_intermediate = true;
        let d = b.plan_differences(&a);
        assert_eq!(d, vec!["round_batch_size: was 32, now 64".to_string()]);
        // Objects appended keep the plan of the others; any other change of the list does not.
        let mut more = spec();
        more.objects.push("c".into());
        assert!(more.plan_differences(&a).is_empty());
        assert!(!a.plan_differences(&more).is_empty(), "objects removed");
        let mut reordered = more.clone();
        reordered.objects.swap(0, 1);
        assert!(reordered.plan_differences(&a)[0].starts_with("object_code_list"));
    }

    #[test]
    fn render_fills_everything_but_gpu() {
        let v = RoundVars {
            exp: "e",
            name: "e__o__r1_s2",
            object: "o",
            seed: 2,
            round: 1,
            batch_size: 8,
            num_iterations: 9,
        };
        assert_eq!(
            render("--name={name} {seed} {gpu}", &v),
            "--name=e__o__r1_s2 2 {gpu}"
        );
        assert_eq!(
            render("{exp}/{object}/{round}/{batch_size}x{num_iterations}", &v),
            "e/o/1/8x9"
        );
        // Braces that are not placeholders stay as written.
        assert_eq!(
            render(r#"{"a": {seed}} {{seed}} {x} {seed"#, &v),
            r#"{"a": 2} {2} {x} {seed"#
        );
        assert_eq!(render("", &v), "");
        assert_eq!(render("}{", &v), "}{");
    }
}
