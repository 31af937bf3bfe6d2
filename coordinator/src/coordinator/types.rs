//! The core's own vocabulary: what a worker is told to run, what it reports back, what it says
//! of its GPU, and the status snapshots the core answers with. The gRPC services convert these
//! to and from the wire types (`service/convert.rs`); nothing in the core names a `pb::` type.

use std::fmt;

use crate::state::{FileRecord, JobState, RoundGpuStats, RoundYield};

/// One round leased to a worker: which round it is and the task that produces it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundLease {
    pub lease_id: u64,
    pub job_id: String,
    pub object: String,
    pub object_index: u32,
    pub round: u32,
    pub seed: i64,
    /// `e<epoch>a<n>`: names this attempt's staging directory.
    pub attempt: String,
    /// `<exp>__<object>__r<round>_s<seed>`.
    pub round_name: String,
    pub task: RoundTask,
}

/// The generator run of one round, templates already rendered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundTask {
    pub argv: Vec<String>,
    pub root: String,
    pub cwd: String,
    /// Environment variables (name, value), sorted by name.
    pub env: Vec<(String, String)>,
    pub outputs: Vec<OutputSpec>,
    pub stats_path: String,
    pub round_dir: String,
    /// 0: no timeout.
    pub timeout_ms: u64,
    pub staging_prefix: String,
    pub keep_intermediate: bool,
    pub bind_gpu: bool,
    pub threads_per_gpu: u32,
    pub min_free_gpu_memory_mib: u64,
    /// `generator.mode` (`process` or `warm`).
    pub mode: String,
    pub batch_size: u64,
    pub num_iterations: u64,
    /// Warm mode: restart after this many rounds; 0: never.
    pub recycle_after_rounds: u32,
    /// Warm mode: restart once the process group holds more resident memory (MiB); 0: never.
    pub recycle_above_memory_mib: u64,
    /// Warm mode: restart once the process group holds more GPU memory (MiB); 0: never.
    pub recycle_above_gpu_memory_mib: u64,
    /// Warm mode: re-run this round cold and compare the outputs (`generator.audit`).
    pub audit: bool,
}

/// One output file a round's generator writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputSpec {
    /// Path relative to the job's root.
    pub path: String,
    /// Name the file is uploaded under.
    pub name: String,
    /// Dataset format (`npy`, `hdf5`, ...).
    pub format: String,
    /// The job's merge filter, empty without one.
    pub filter: String,
}

/// A round an agent still runs under a lease of an earlier coordinator, listed when it
/// registers (see `Coordinator::register`).
#[derive(Debug, Clone, PartialEq)]
pub struct RunningRound {
    pub lease_id: u64,
    pub job_id: String,
    pub object: String,
    pub object_index: u32,
    pub round: u32,
    pub seed: i64,
    pub attempt: String,
}

/// A file a worker reports as uploaded: the same fields the commit records.
pub type ReportedFile = FileRecord;

/// What a completion carries besides its files.
#[derive(Debug, Clone, Default)]
pub struct CompleteExtras {
    /// GPU figures sampled while the generator ran.
    pub gpu_stats: Option<RoundGpuStats>,
    /// The generator's log, uploaded under the attempt's staging prefix; empty when none.
    pub log_key: String,
    /// The generator's yield, from its sidecar.
    pub yield_stats: Option<RoundYield>,
}

/// How a completion was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The round is committed with this attempt.
    Committed,
    /// Another attempt resolved the round, or the lease is gone: the files were deleted.
    Duplicate,
    /// The attempt failed the checks; it counts as a failed attempt.
    Rejected,
}

impl Verdict {
    /// The label of the `commit` span's outcome.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Committed => "committed",
            Verdict::Duplicate => "duplicate",
            Verdict::Rejected => "rejected",
        }
    }
}

/// Why a round's attempt failed: reported by its worker, or judged by the coordinator. One
/// enum for every place a kind shows: the failure record (its `label`), the metric
/// `quarry_rounds_failed_total{kind}`, the wire (`service/convert.rs`) and status messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The generator exited non-zero or was killed by a signal.
    Exit,
    /// The generator ran past the round timeout.
    Timeout,
    /// The generator exited 0 without writing its output (or the worker reported no files).
    OutputMissing,
    /// The output is not a valid dataset, or the report does not match the stored bytes.
    OutputInvalid,
    /// The worker could not upload the output.
    Upload,
    /// The generator could not be started.
    Spawn,
    /// The output's schema disagrees with the object's earlier rounds.
    SchemaMismatch,
    /// The worker stopped renewing the lease.
    LeaseExpired,
    /// A warm round's output differs from its cold re-run (`generator.audit`): the generator
    /// keeps state across rounds. Stops the job.
    AuditMismatch,
    /// A worker that did not say why.
    Unspecified,
}

impl FailureKind {
    /// Every kind (the tests check their labels are distinct).
    #[cfg(test)]
    pub const ALL: [FailureKind; 10] = [
        FailureKind::Exit,
        FailureKind::Timeout,
        FailureKind::OutputMissing,
        FailureKind::OutputInvalid,
        FailureKind::Upload,
        FailureKind::Spawn,
        FailureKind::SchemaMismatch,
        FailureKind::LeaseExpired,
        FailureKind::AuditMismatch,
        FailureKind::Unspecified,
    ];

    /// The stable name: stored in failure records, used as the metric label, shown in status.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Exit => "exit",
            FailureKind::Timeout => "timeout",
            FailureKind::OutputMissing => "output_missing",
            FailureKind::OutputInvalid => "output_invalid",
            FailureKind::Upload => "upload",
            FailureKind::Spawn => "spawn",
            FailureKind::SchemaMismatch => "schema_mismatch",
            FailureKind::LeaseExpired => "lease_expired",
            FailureKind::AuditMismatch => "audit_mismatch",
            FailureKind::Unspecified => "unspecified",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What an agent said of its GPU when it registered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuInfo {
    /// NVML index; `None` when the GPU was named by an id NVML does not know.
    pub index: Option<u32>,
    pub uuid: String,
    pub name: String,
    pub memory_total_mib: u64,
    pub driver_version: String,
}

/// Whether a GPU can take work, as its agent judged it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GpuHealthState {
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

/// The last health sample an agent sent in a heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuHealth {
    pub state: GpuHealthState,
    pub reason: String,
    pub utilization_pct: Option<u32>,
    pub memory_used_mib: Option<u64>,
    pub memory_free_mib: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<u32>,
    pub ecc_uncorrected: Option<u64>,
    pub last_xid: Option<u64>,
}

/// Where an object stands, as status shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectState {
    /// Nothing committed or running yet.
    Pending,
    Running,
    Merging,
    /// Its final holds the quota.
    Done,
    /// It ran out of rounds below the quota; its final holds what was collected.
    Exhausted,
}

/// A snapshot of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    pub job_id: String,
    pub state: JobState,
    pub objects: Vec<ObjectStatus>,
    pub samples_collected: u64,
    pub samples_target: u64,
    pub rounds_committed: u32,
    pub failed_attempts: u32,
    pub rounds_quarantined: u32,
    pub rounds_in_flight: u32,
    pub elapsed_ms: u64,
    pub generator_ms: u64,
    pub workers: Vec<WorkerStatus>,
    /// Why the coordinator stopped the job, empty otherwise.
    pub message: String,
    pub samples_this_session: u64,
    pub attempts: u64,
    pub successes: u64,
    /// Committed rounds a cold re-run matched (`generator.audit`).
    pub rounds_audited: u32,
}

/// A snapshot of one object of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectStatus {
    pub name: String,
    pub state: ObjectState,
    pub collected: u64,
    pub target: u64,
    pub rounds_committed: u32,
    pub rounds_in_flight: u32,
    pub rounds_quarantined: u32,
    pub failed_attempts: u32,
    pub attempts: u64,
    pub successes: u64,
}

/// A registered worker, with what it runs of the job asked about.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub host: String,
    pub gpu: String,
    /// `object r<round>, ...` of the job asked about; empty when none.
    pub running: String,
    pub last_seen_ms_ago: u64,
    pub gpu_info: Option<GpuInfo>,
    pub health: Option<GpuHealth>,
    pub agent_state: String,
}
