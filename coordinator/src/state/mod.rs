//! Durable coordinator state behind one domain trait.
//!
//! The store holds what must survive a crash: job specs and their end state, round commits,
//! failed attempts, quarantines, merge records and the coordinator epoch. Leases and
//! heartbeats are deliberately NOT here: they are soft state in the coordinator's memory.
//!
//! Two implementations share one contract, checked by one conformance suite
//! (`state::conformance`): the embedded redb file (default on one machine) and etcd (cluster).

mod codec;
pub mod embedded;
pub mod etcd;

/// The suite every implementation must pass; public so backend tests elsewhere can run it.
/// The contract every [`StateStore`] must keep, as assertions; compiled for the crate's own
/// tests and, with the `conformance` feature, for other crates' (the etcd tests).
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::spec::JobSpec;

/// Job lifecycle as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Done,
    Incomplete,
    Cancelled,
}

/// A job: its spec and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub spec: JobSpec,
    pub created_unix_ms: u64,
    pub state: JobState,
}

/// One file of a committed attempt, as uploaded by the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub count: u64,
    pub schema: String,
    /// Samples that pass the job's filter; absent when the job has none (then all count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<u64>,
}

/// The winning attempt of a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub round: u32,
    pub seed: i64,
    pub attempt: String,
    /// Samples in the round (first axis of its sample file).
    pub count: u64,
    pub files: Vec<FileRecord>,
    pub worker: String,
    pub generator_ms: u64,
    pub committed_unix_ms: u64,
    /// GPU figures of the winning run, when its worker could sample the GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<RoundGpuStats>,
    /// Key of the generator's log, uploaded beside the outputs (deleted with the staging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_key: Option<String>,
    /// Samples that pass the job's filter; absent without a filter (then all `count` do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<u64>,
    /// The generator's yield for the round, when the job names a yield sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yield_stats: Option<RoundYield>,
}

impl CommitRecord {
    /// Samples of this round that count toward the quota: those passing the filter.
    pub fn quota_count(&self) -> u64 {
        self.kept.unwrap_or(self.count)
    }
}

/// Trials a generator attempted in one round and the successes it kept (its samples).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundYield {
    pub attempts: u64,
    pub successes: u64,
}

impl RoundYield {
    /// Successes per attempt; `None` before any attempt is reported.
    pub fn rate(attempts: u64, successes: u64) -> Option<f64> {
        (attempts > 0).then(|| successes as f64 / attempts as f64)
    }
}

/// GPU figures of one generator run, sampled by its worker while it ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundGpuStats {
    /// Mean GPU utilization over the run, in percent (rounded).
    pub utilization_mean_pct: u32,
    /// Highest memory used on the GPU during the run (the whole device), in MiB.
    pub memory_peak_mib: u64,
    /// How many samples the figures come from.
    pub samples: u32,
}

/// A failed attempt of a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub attempt: String,
    /// Short machine-readable kind: `exit`, `timeout`, `output_missing`, `output_invalid`,
    /// `schema_mismatch`, `upload`, `spawn`, `lease_expired`.
    pub kind: String,
    pub message: String,
    pub log_tail: String,
    pub worker: String,
    pub unix_ms: u64,
}

/// A round given up on after its attempts ran out; skipped by the merge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub round: u32,
    pub seed: i64,
    pub reason: String,
    pub log_tail: String,
    pub attempts: u32,
    pub unix_ms: u64,
}

/// The final of an object, written completely before intermediates are deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRecord {
    /// Object-store keys of the final file(s) (seed-tagged and/or plain).
    pub finals: Vec<String>,
    pub count: u64,
    /// Committed rounds whose samples the final holds, in order.
    pub rounds: Vec<u32>,
    pub seed_min: i64,
    pub seed_max: i64,
    pub sha256: String,
    pub bytes: u64,
    /// Set once the object's intermediates are deleted (or kept by policy).
    pub cleaned: bool,
    /// True when the quota was reached; false when the object ran out of rounds.
    pub complete: bool,
    pub unix_ms: u64,
    /// Samples the filter dropped, and duplicates dropped, before the cut to the quota.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub filtered: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub duplicates: u64,
    /// The run's seed-tagged directory (`final_seed_<min>-<max>`) this final is being moved
    /// or copied into at the end of the run: recorded for every such final before the first
    /// one moves, so that a coordinator that restarts midway finishes into the same directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_to: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Everything stored about one object of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub commits: BTreeMap<u32, CommitRecord>,
    pub failures: BTreeMap<u32, Vec<FailureRecord>>,
    pub quarantined: BTreeMap<u32, QuarantineRecord>,
    pub merge: Option<MergeRecord>,
}

/// Result of [`StateStore::create_job`].
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum CreateJob {
    Created,
    /// A job of that id exists; it is returned unchanged.
    Exists(JobRecord),
}

/// Result of [`StateStore::commit_round`].
#[derive(Debug, Clone, PartialEq)]
pub enum CommitOutcome {
    Committed,
    /// Another attempt committed the round first; its record is returned.
    AlreadyCommitted(CommitRecord),
    /// The round was quarantined before this commit arrived; nothing was written.
    Quarantined,
}

/// Result of [`StateStore::quarantine_round`].
#[derive(Debug, Clone, PartialEq)]
pub enum QuarantineOutcome {
    Quarantined,
    /// A commit won the race; the round is not quarantined.
    AlreadyCommitted(CommitRecord),
    /// Already quarantined (idempotent).
    AlreadyQuarantined,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    #[error("job {0:?} not found")]
    JobNotFound(String),
    /// The backend failed; the operation may or may not have been applied and can be retried.
    #[error("state store: {0}")]
    Backend(String),
    /// This coordinator was deposed: another process leads now, and nothing was written.
    #[error("not the leader any more: {0}")]
    Fenced(String),
    #[error("state store holds a record it cannot decode ({what}): {detail}")]
    Corrupt { what: String, detail: String },
}

/// The coordinator's durable state.
///
/// Contract, for every implementation:
/// - Every method is atomic and linearizable: once it returns `Ok`, every later call (from
///   any coordinator process sharing the store) sees its effect.
/// - `commit_round` is a create-if-absent on `(job, object, round)`: of concurrent commits of
///   one round exactly one gets `Committed`; a round that is quarantined is never committed.
/// - `quarantine_round` is the mirror: it never overwrites a commit. Only
///   `quarantine_committed` replaces a commit (of the attempt it names) with a quarantine.
/// - Writes to a job that does not exist fail with [`StateError::JobNotFound`], except
///   `create_job`.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Creates the job unless one with the same id exists (then returns it unchanged).
    async fn create_job(&self, job: &JobRecord) -> Result<CreateJob, StateError>;
    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StateError>;
    /// All jobs, ordered by id.
    async fn list_jobs(&self) -> Result<Vec<JobRecord>, StateError>;
    /// Replaces a job's record (spec fields that do not change the plan, or its state).
    async fn update_job(&self, job: &JobRecord) -> Result<(), StateError>;
    async fn load_object(&self, job: &str, object: &str) -> Result<ObjectRecord, StateError>;
    async fn commit_round(
        &self,
        job: &str,
        object: &str,
        commit: &CommitRecord,
    ) -> Result<CommitOutcome, StateError>;
    /// Appends a failed attempt; returns how many failures the round now has.
    async fn record_failure(
        &self,
        job: &str,
        object: &str,
        round: u32,
        failure: &FailureRecord,
    ) -> Result<u32, StateError>;
    async fn quarantine_round(
        &self,
        job: &str,
        object: &str,
        quarantine: &QuarantineRecord,
    ) -> Result<QuarantineOutcome, StateError>;
    /// Quarantines a round that was committed but whose committed files cannot be merged
    /// (a lie or damage that passed the commit checks): atomically, the commit of `attempt`
    /// is removed and the quarantine stored, so the round is skipped by every later plan
    /// exactly as a round quarantined after failed attempts. A commit of another attempt is
    /// left alone (`AlreadyCommitted`); an uncommitted round is quarantined as by
    /// `quarantine_round`; a quarantined one answers `AlreadyQuarantined`. The stored records
    /// are the ones `quarantine_round` writes, so older coordinators read them as they are.
    async fn quarantine_committed(
        &self,
        job: &str,
        object: &str,
        attempt: &str,
        quarantine: &QuarantineRecord,
    ) -> Result<QuarantineOutcome, StateError>;
    /// Stores (or replaces) the object's merge record.
    async fn record_merge(
        &self,
        job: &str,
        object: &str,
        merge: &MergeRecord,
    ) -> Result<(), StateError>;
    /// Increments and returns the coordinator epoch (1 on a fresh store). Attempt ids carry
    /// the epoch so that they stay unique across coordinator restarts.
    async fn bump_epoch(&self) -> Result<u64, StateError>;
    /// Releases the backend (the embedded store's file lock) before the store is dropped, so
    /// that the next coordinator can open it at once even while clones of the handle linger
    /// in tasks that are winding down. Every later call fails with [`StateError::Backend`].
    async fn close(&self) {}
}
