//! The coordinator's core: jobs in memory, the worker registry, leases, commit judgement, and
//! the tasks that merge, write the manifest and reap expired leases. The gRPC services
//! (`service/`) are thin shells over this; the core speaks its own types (`types.rs`).
//!
//! One concern per file:
//!
//! | file | what |
//! |---|---|
//! | `jobs.rs` | admission (submit, resume), finishing, cancelling |
//! | `registry.rs` | workers: register, adopt running rounds, heartbeats, expiry |
//! | `scheduling.rs` | leasing rounds, releasing and re-queueing them, the task of a round |
//! | `judgement.rs` | the pure checks of a completion (keys, stored bytes, schema) |
//! | `commit.rs` | completions and failures applied: commit, reject, retry, quarantine |
//! | `merging.rs` | merge orchestration once an object's rounds cover its quota |
//! | `background.rs` | lease reaper, worker expiry, gauges, manifest writer |
//! | `status.rs` | status snapshots |
//!
//! Locking: one `std::sync::Mutex` over the in-memory picture, held only for short, non-async
//! sections. Durable changes go to the state store first (outside the lock); the memory is
//! updated after the store said yes, so a crash at any point leaves the store authoritative.

mod background;
mod commit;
mod jobs;
pub mod judgement;
mod merging;
mod publishing;
mod registry;
mod scheduling;
mod status;
mod types;

impl Coordinator {
    /// Waits `delay` before a retry, then doubles it (at most 30 s); false when the
    /// coordinator stops first. The one backoff of merges, quarantines and publishing.
    pub(super) async fn back_off(&self, delay: &mut Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(*delay) => {}
            _ = self.shutdown.cancelled() => return false,
        }
        *delay = (*delay * 2).min(Duration::from_secs(30));
        true
    }
}

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quarry_common::storage::Store;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::job::JobRt;
use crate::metrics::CoordMetrics;
use crate::spec::SpecError;
use crate::state::{JobState, StateError, StateStore};

pub use registry::{Registration, WorkerProof};
pub use types::{
    CompleteExtras, FailureKind, GpuHealth, GpuHealthState, GpuInfo, JobStatus, ObjectState,
    ObjectStatus, OutputSpec, ReportedFile, RoundLease, RoundTask, RunningRound, Verdict,
    WorkerStatus,
};

/// Tunables of a coordinator process.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// A lease not renewed by a heartbeat within this time is re-issued as a new attempt.
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// Shortest interval between two manifest writes of one job while it runs.
    pub manifest_interval: Duration,
    /// After start, how long no new round is handed out, so that workers still running
    /// rounds of a previous leader re-register and have them adopted instead of duplicated.
    pub adopt_window: Duration,
    /// Where the coordinator's metrics go (shared with the `/metrics` endpoint).
    pub metrics: Arc<CoordMetrics>,
    /// Most workers registered at once; a Register beyond is refused (RESOURCE_EXHAUSTED).
    pub max_workers: usize,
    /// Most bytes of strings the registered workers may hold together (each counted with
    /// room for its heartbeat texts), so that a status listing every worker stays far
    /// below the message limit; a Register beyond is refused (RESOURCE_EXHAUSTED).
    pub max_worker_bytes: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            manifest_interval: Duration::from_secs(2),
            adopt_window: Duration::ZERO,
            metrics: Arc::default(),
            max_workers: registry::MAX_WORKERS,
            max_worker_bytes: registry::MAX_WORKER_BYTES,
        }
    }
}

impl CoordinatorConfig {
    /// A worker not heard from for this long is forgotten (its leases expired a TTL earlier);
    /// if it is alive after all, its next heartbeat is told to register again.
    pub fn worker_expiry(&self) -> Duration {
        self.lease_ttl * 2
    }
}

/// Errors a caller branches on; mapped to gRPC codes in one place (`service::convert`).
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("invalid job spec: {0}")]
    Spec(#[from] SpecError),
    #[error("job {job:?} exists with a different spec; changed: {}. Use a new --exp_name, or run the original command to resume", changes.join("; "))]
    SpecChanged { job: String, changes: Vec<String> },
    #[error("job {0:?} not found")]
    JobNotFound(String),
    #[error("unknown worker {0:?}: register again")]
    UnknownWorker(String),
    /// The registry is full (too many workers, or too many bytes of their strings).
    #[error("{0}")]
    RegistryFull(String),
    /// A call named a registered worker without that worker's secret.
    #[error(
        "worker {0:?} is registered with another secret: only the agent that registered it may act as it"
    )]
    WrongWorkerSecret(String),
    /// The kernel's random generator could not be read.
    #[error("no random secret for a worker: {0}")]
    Random(String),
    #[error(transparent)]
    State(#[from] StateError),
    /// The object store failed; the operation can be retried.
    #[error("object store: {0}")]
    Store(String),
}

/// A lease held by a worker: the core's record of one attempt in flight.
#[derive(Debug, Clone)]
struct Lease {
    job: String,
    object: usize,
    round: u32,
    seed: i64,
    attempt: String,
    worker: String,
    deadline: Instant,
    staging_prefix: String,
}

/// A registered worker.
#[derive(Debug)]
struct WorkerInfo {
    host: String,
    gpu: String,
    last_seen: Instant,
    /// Leases the worker must stop, reported on its next heartbeat.
    cancel: Vec<u64>,
    /// What the agent said of its GPU at Register.
    gpu_info: Option<GpuInfo>,
    /// The last health sample and agent state from its heartbeats, shown in status. Acting on
    /// them (an unhealthy GPU stops acquiring) is the agent's job, not the coordinator's.
    health: Option<GpuHealth>,
    agent_state: String,
    /// Returned at Register and required on every later call naming this worker.
    secret: String,
}

#[derive(Default)]
struct Inner {
    jobs: BTreeMap<String, JobRt>,
    /// Jobs in submission order: rounds are handed out job-major, then object-major.
    order: Vec<String>,
    leases: HashMap<u64, Lease>,
    next_lease: u64,
    workers: HashMap<String, WorkerInfo>,
    next_worker: u64,
    /// Jobs whose end is being recorded (`finish_job`): they still show as running until
    /// their last manifest is written.
    finishing: HashSet<String>,
}

impl Inner {
    /// Tells the workers holding leases that match `which` to stop them.
    fn cancel_leases(&mut self, which: impl Fn(&Lease) -> bool) {
        let Inner {
            leases, workers, ..
        } = self;
        for (id, l) in leases.iter() {
            if which(l)
                && let Some(w) = workers.get_mut(&l.worker)
            {
                w.cancel.push(*id);
            }
        }
    }
}

/// The coordinator service state shared by every RPC and background task.
pub struct Coordinator {
    state: Arc<dyn StateStore>,
    store: Store,
    cfg: CoordinatorConfig,
    epoch: u64,
    /// No new round of the jobs resumed at start is handed out before this instant (see
    /// `adopt_window`): only they can have rounds running on workers that are still to
    /// re-register. Jobs submitted later are not held back.
    adopt_until: Mutex<Instant>,
    /// The jobs resumed at start (only those wait for the adopt window).
    resumed: Mutex<HashSet<String>>,
    inner: Mutex<Inner>,
    /// Bumped on every change a status watcher may care about.
    changed: watch::Sender<u64>,
    /// Woken when a round may have become available.
    work: Notify,
    /// Woken when a job's manifest should be rewritten.
    manifest_dirty: Notify,
    manifest_lock: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    /// Every background task (reaper, manifest writer, merges, status streams), so that
    /// `close` can wait for them and release the state store.
    tasks: TaskTracker,
    /// Trace contexts of the commits of each object (job, object index) since this process
    /// started, so that the object's `merge` span links to them. Empty when traces are off.
    commit_traces: Mutex<HashMap<(String, usize), Vec<String>>>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a worker is told to run.
pub struct Grant {
    pub lease: RoundLease,
}

impl Coordinator {
    /// Opens the coordinator over its state and store, resumes every running job found in the
    /// state, and starts the background tasks (lease reaper, manifest writer). They stop when
    /// `shutdown` is cancelled.
    pub async fn start(
        cfg: CoordinatorConfig,
        state: Arc<dyn StateStore>,
        store: Store,
        shutdown: CancellationToken,
    ) -> Result<Arc<Coordinator>, CoordError> {
        let epoch = state.bump_epoch().await?;
        let (changed, _) = watch::channel(0);
        let c = Arc::new(Coordinator {
            state,
            store,
            adopt_until: Mutex::new(Instant::now()),
            resumed: Mutex::new(HashSet::new()),
            cfg,
            epoch,
            inner: Mutex::new(Inner {
                // Lease ids carry the epoch, so that a lease adopted from a previous leader
                // never collides with one this coordinator issues.
                next_lease: (epoch << 32) | 1,
                next_worker: 1,
                ..Default::default()
            }),
            changed,
            work: Notify::new(),
            manifest_dirty: Notify::new(),
            manifest_lock: tokio::sync::Mutex::new(()),
            shutdown,
            tasks: TaskTracker::new(),
            commit_traces: Mutex::new(HashMap::new()),
        });
        let mut resumed = HashSet::new();
        for job in c.state.list_jobs().await? {
            if job.state == JobState::Running {
                let id = job.id.clone();
                c.load_job(job).await?;
                resumed.insert(id);
            }
        }
        if !resumed.is_empty() && !c.cfg.adopt_window.is_zero() {
            *c.resumed.lock().unwrap_or_else(|p| p.into_inner()) = resumed;
            *c.adopt_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Instant::now() + c.cfg.adopt_window;
            info!(window = ?c.cfg.adopt_window, "resumed running jobs: waiting for workers to report their rounds before handing out new ones");
        }
        c.tasks.spawn(Arc::clone(&c).reaper());
        c.tasks.spawn(Arc::clone(&c).manifest_writer());
        info!(epoch, store = c.store.url(), "coordinator started");
        Ok(c)
    }

    /// Stops the background tasks and waits for them (a merge in progress finishes first), so
    /// that the state store is released when the last handle is dropped.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.state.close().await;
    }

    /// Runs `fut` as a tracked background task that `close` waits for.
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut);
    }

    /// Cancelled when the coordinator shuts down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug; keep serving with the data as it is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
