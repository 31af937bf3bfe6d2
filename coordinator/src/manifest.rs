//! `<exp>/manifest.json`: a superset of scale_runner's manifest. `objects.<obj>.{collected,
//! rounds, seeds, done}` keep their meaning (samples merged or committed so far, the rounds and
//! seeds they came from, whether the quota is met); Quarry adds the final's keys, per-round
//! commit records and quarantines, from which a wiped state store could be rebuilt.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::job::{JobRt, Phase};
use crate::state::{JobState, MergeRecord, QuarantineRecord, RoundYield};

#[derive(Debug, Serialize)]
pub struct Manifest {
    pub exp_name: String,
    pub object_code_list: Vec<String>,
    pub target_count_per_object: u64,
    pub round_batch_size: u64,
    pub num_iterations: u64,
    pub seed_base: i64,
    pub seed_stride: u64,
    pub final_dir_mode: String,
    /// The dataset format of the rounds and finals (`npy`, `hdf5`, `zarr`, ...).
    pub format: String,
    /// The merge's quality filter and de-duplication fields, when the job has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dedup: Vec<String>,
    /// The determinism audit of warm rounds (`generator.audit`), when the job has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSummary>,
    /// Sums over every object (see [`ObjectEntry`]).
    pub totals: Totals,
    /// `running`, `done`, `incomplete` or `cancelled`.
    pub state: JobState,
    pub objects: BTreeMap<String, ObjectEntry>,
    pub updated_unix_ms: u64,
    pub writer: String,
}

#[derive(Debug, Serialize)]
pub struct ObjectEntry {
    pub collected: u64,
    /// Committed rounds (once merged: the rounds the final holds), in order.
    pub rounds: Vec<u32>,
    pub seeds: Vec<i64>,
    pub done: bool,
    /// Keys of the final file(s), relative to the experiments directory.
    #[serde(rename = "final")]
    pub final_files: Vec<String>,
    /// sha256 of the final once merged: of the file, or for a directory dataset of its
    /// `sha256sum`-style listing (see `docs/job-file.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_sha256: Option<String>,
    pub commits: Vec<CommitEntry>,
    pub quarantined: Vec<QuarantineRecord>,
    pub failed_attempts: u32,
    /// True when the object ran out of rounds below its quota.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exhausted: bool,
    /// Trials attempted and successes kept over committed rounds that report a yield, and
    /// their ratio; absent when the generator reports none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub successes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    /// Samples the merge's filter dropped and duplicates it dropped (once merged).
    pub filtered: u64,
    pub duplicates: u64,
}

/// What the determinism audit found: the fraction of warm rounds re-run cold, how many
/// committed rounds passed (each is marked `audited` in its commit record), and the first
/// mismatch, which stopped the job.
#[derive(Debug, Serialize)]
pub struct AuditSummary {
    pub fraction: f64,
    pub rounds_passed: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mismatch: Option<String>,
}

/// Job-wide sums.
#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub collected: u64,
    pub target: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub successes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    pub filtered: u64,
    pub duplicates: u64,
}

#[derive(Debug, Serialize)]
pub struct CommitEntry {
    pub round: u32,
    pub seed: i64,
    pub attempt: String,
    pub count: u64,
    pub key: String,
    pub size: u64,
    pub sha256: String,
    /// Which worker's attempt won, and how long its generator ran.
    pub worker: String,
    pub generator_ms: u64,
    /// Mean GPU utilization (percent) and peak GPU memory (MiB) of the winning run, when its
    /// worker could sample the GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_utilization_mean_pct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory_peak_mib: Option<u64>,
    /// The generator's log, beside the outputs (gone with the staging unless kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// The round's warm run was re-run cold and matched (`generator.audit`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub audited: bool,
}

pub fn build(job: &JobRt) -> Manifest {
    let quota = job.spec.target_count_per_object;
    let objects = job
        .objects
        .iter()
        .map(|o| {
            let commits: Vec<CommitEntry> = o
                .commits
                .values()
                .map(|c| {
                    let f = c.files.first();
                    CommitEntry {
                        round: c.round,
                        seed: c.seed,
                        attempt: c.attempt.clone(),
                        count: c.count,
                        key: f.map(|f| f.key.clone()).unwrap_or_default(),
                        size: f.map_or(0, |f| f.size),
                        sha256: f.map(|f| f.sha256.clone()).unwrap_or_default(),
                        worker: c.worker.clone(),
                        generator_ms: c.generator_ms,
                        gpu_utilization_mean_pct: c.gpu.as_ref().map(|g| g.utilization_mean_pct),
                        gpu_memory_peak_mib: c.gpu.as_ref().map(|g| g.memory_peak_mib),
                        log: c.log_key.clone(),
                        audited: job.audited(&o.name, c.round),
                    }
                })
                .collect();
            let y = o.yields();
            let reported = o.commits.values().any(|c| c.yield_stats.is_some());
            let mut entry = ObjectEntry {
                collected: o.collected(quota),
                rounds: o.commits.keys().copied().collect(),
                seeds: o.commits.values().map(|c| c.seed).collect(),
                done: matches!(o.phase, Phase::Done { complete: true }),
                final_files: vec![],
                final_sha256: None,
                commits,
                quarantined: o.quarantined.values().cloned().collect(),
                failed_attempts: o.failed_attempts,
                exhausted: matches!(o.phase, Phase::Done { complete: false }),
                attempts: reported.then_some(y.attempts),
                successes: reported.then_some(y.successes),
                success_rate: RoundYield::rate(y.attempts, y.successes),
                filtered: 0,
                duplicates: 0,
            };
            if let Some(m) = &o.merge {
                apply_merge(&mut entry, m);
            }
            (o.name.clone(), entry)
        })
        .collect::<BTreeMap<String, ObjectEntry>>();
    let mut totals = Totals {
        target: quota * objects.len() as u64,
        ..Totals::default()
    };
    for e in objects.values() {
        totals.collected += e.collected;
        totals.filtered += e.filtered;
        totals.duplicates += e.duplicates;
        if let (Some(a), Some(s)) = (e.attempts, e.successes) {
            totals.attempts = Some(totals.attempts.unwrap_or(0) + a);
            totals.successes = Some(totals.successes.unwrap_or(0) + s);
        }
    }
    totals.success_rate =
        RoundYield::rate(totals.attempts.unwrap_or(0), totals.successes.unwrap_or(0));
    Manifest {
        exp_name: job.spec.exp_name.clone(),
        object_code_list: job.spec.objects.clone(),
        target_count_per_object: quota,
        round_batch_size: job.spec.round_batch_size,
        num_iterations: job.spec.num_iterations,
        seed_base: job.spec.seed_base,
        seed_stride: job.spec.seed_stride,
        final_dir_mode: job.spec.final_dir_mode.to_string(),
        format: job
            .spec
            .format()
            .map_or_else(|_| String::new(), |f| f.name().to_string()),
        filter: job.spec.merge.filter.clone(),
        dedup: job.spec.merge.dedup.clone(),
        audit: job
            .spec
            .generator
            .audit
            .filter(|f| job.spec.generator.is_warm() && f.0 > 0.0)
            .map(|f| AuditSummary {
                fraction: f.0,
                rounds_passed: job.rounds_audited(),
                mismatch: job.audit_failure.clone(),
            }),
        totals,
        state: job.state,
        objects,
        updated_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        writer: format!("quarry {}", env!("CARGO_PKG_VERSION")),
    }
}

/// Fills in what the final holds once the object is merged.
pub fn apply_merge(entry: &mut ObjectEntry, m: &MergeRecord) {
    entry.final_files = m.finals.clone();
    entry.final_sha256 = Some(m.sha256.clone()).filter(|s| !s.is_empty());
    entry.collected = m.count;
    entry.rounds = m.rounds.clone();
    let used: std::collections::BTreeSet<u32> = m.rounds.iter().copied().collect();
    entry.seeds = entry
        .commits
        .iter()
        .filter(|c| used.contains(&c.round))
        .map(|c| c.seed)
        .collect();
    entry.done = m.complete;
    entry.filtered = m.filtered;
    entry.duplicates = m.duplicates;
}
