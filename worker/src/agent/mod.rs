//! One worker agent: drives one GPU.
//!
//! An agent connects to a coordinator (the first reachable of its addresses), registers, and
//! runs a [`session`](session) until the coordinator is lost or the agent is told to stop;
//! then it reconnects with jittered backoff and registers again. Within a session it acquires
//! rounds, runs the generator bound to its GPU, uploads and reports, prefetching the next
//! round while the previous one uploads.
//!
//! Stopping ([`Shutdown`]): `drain` stops acquiring and lets the running round finish; `stop`
//! kills the running generator and releases its lease so it is re-leased at once. A session
//! that cannot reach the coordinator for longer than its lease TTL fences itself: it kills
//! its run and discards its staging, because the coordinator has re-issued the round by then.

mod audit;
mod deadline;
mod digest;
mod outbox;
mod output;
mod round;
mod round_dir;
mod session;
mod staged;
mod warm;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quarry_common::storage::Store;
use quarry_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use deadline::Deadline;

use crate::connect::{ConnectError, coordinators, register};
use crate::gpu::{GpuInfo, Inventory, NoInventory};
use crate::monitor::Monitor;
use quarry_common::transport::{ClientSecurity, MAX_ROUNDS_PER_CALL};

/// Settings of one agent.
#[derive(Clone)]
pub struct AgentConfig {
    /// Coordinator addresses (`host:port` or a URL; an entry may list several, comma-separated),
    /// tried in order.
    pub coordinators: Vec<String>,
    /// TLS and bearer token for every call to the coordinators.
    pub security: ClientSecurity,
    /// Where the agent's metrics go (shared with the worker's `/metrics` endpoint).
    pub metrics: Arc<crate::metrics::WorkerMetrics>,
    /// The GPU this agent drives.
    pub gpu: GpuInfo,
    /// Where its health and metrics come from; `None`: NVML if it loads (see [`crate::gpu::detect`]).
    pub inventory: Option<Arc<dyn Inventory>>,
    /// Agents in this process: the default thread count divides the host's CPUs among them.
    pub agents_in_process: usize,
    pub host: String,
    /// Run tasks under this root instead of the job's (a worker with its own disk layout).
    pub root_override: Option<PathBuf>,
    /// Longest long-poll for a round.
    pub acquire_wait: Duration,
    /// Bytes of generator output kept per run (head and tail).
    pub log_limit: usize,
    /// Between SIGTERM and SIGKILL when a run is stopped.
    pub kill_grace: Duration,
    /// Acquire the next round while the previous one uploads.
    pub prefetch: bool,
    /// Rounds asked for per Acquire call (1..=[`MAX_LEASE_BATCH`]); the unstarted ones wait
    /// in the agent's queue, and up to this many finished rounds upload at once. 1: one
    /// round per call, the finish of at most one round overlapping the next run.
    pub lease_batch: u32,
    /// How often the GPU is sampled for health and metrics.
    pub sample_interval: Duration,
    /// How long a round waits for the job's minimum free GPU memory before it is released.
    pub gpu_wait: Duration,
    /// Free space (MiB) needed under the task root before a round is accepted.
    pub min_scratch_mib: u64,
    /// The name the agent registers under (`--name`; the coordinator makes the worker id
    /// from it); empty: `<host>-gpu<id>`.
    pub name: String,
    /// The end of the allocation this worker runs in, shared by its agents.
    pub deadline: Option<Arc<Deadline>>,
    /// When its warm generator failed to start too often, end the agent with
    /// [`AgentError::OutOfRotation`] rather than stay registered showing why (the choice of
    /// `coordinator run`, whose agents are the only ones its job has).
    pub end_when_out_of_rotation: bool,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("coordinators", &self.coordinators)
            .field("gpu", &self.gpu)
            .field("inventory", &self.inventory.as_ref().map(|i| i.describe()))
            .field("prefetch", &self.prefetch)
            .field("lease_batch", &self.lease_batch)
            .finish_non_exhaustive()
    }
}

impl AgentConfig {
    /// Defaults for an agent of GPU `gpu` talking to `coordinator` (comma-separated
    /// addresses allowed).
    pub fn new(coordinator: impl Into<String>, gpu: impl Into<String>) -> Self {
        AgentConfig {
            coordinators: vec![coordinator.into()],
            security: ClientSecurity::plain(),
            metrics: Arc::default(),
            gpu: GpuInfo::unlisted(&gpu.into()),
            inventory: None,
            agents_in_process: 1,
            host: hostname(),
            root_override: None,
            acquire_wait: Duration::from_secs(10),
            log_limit: 1 << 20,
            kill_grace: Duration::from_secs(10),
            prefetch: true,
            lease_batch: 1,
            sample_interval: Duration::from_secs(1),
            gpu_wait: Duration::from_secs(60),
            min_scratch_mib: 1024,
            name: String::new(),
            deadline: None,
            end_when_out_of_rotation: false,
        }
    }
}

/// Most rounds an agent asks for in one Acquire call: the protocol's bound.
const MAX_LEASE_BATCH: u32 = MAX_ROUNDS_PER_CALL as u32;

/// Checks a `--lease-batch` value: a whole number from 1 to [`MAX_LEASE_BATCH`]. The error
/// names the flag and the range (clap adds the value given).
pub fn parse_lease_batch(s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .map_err(|_| lease_batch_range())
        .and_then(check_lease_batch)
}

/// `n` when it is a valid [`AgentConfig::lease_batch`]; otherwise the message
/// [`parse_lease_batch`] gives.
pub fn check_lease_batch(n: u32) -> Result<u32, String> {
    if (1..=MAX_LEASE_BATCH).contains(&n) {
        Ok(n)
    } else {
        Err(lease_batch_range())
    }
}

fn lease_batch_range() -> String {
    format!(
        "--lease-batch takes a whole number of rounds from 1 to {MAX_LEASE_BATCH} (1: no batching)"
    )
}

/// How agents are told to stop. Cancelling `stop` also cancels `drain`.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Stop acquiring; let running rounds finish and report, then end.
    pub drain: CancellationToken,
    /// Stop now: running generators are killed and their leases released.
    pub stop: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        let stop = CancellationToken::new();
        Shutdown {
            drain: stop.child_token(),
            stop,
        }
    }

    /// Stops at once when `token` is cancelled (no drain): what `coordinator run` does.
    pub fn immediate(token: CancellationToken) -> Self {
        Shutdown {
            drain: token.child_token(),
            stop: token,
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

/// What an agent did, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AgentStats {
    /// Generator runs started.
    pub rounds_run: u64,
    pub committed: u64,
    /// Failed or rejected attempts.
    pub failed: u64,
    /// Leases given back unrun or stopped (drain, shutdown, coordinator's order, GPU busy).
    pub released: u64,
    /// Sessions ended by self-fencing (no coordinator contact for longer than the lease TTL).
    pub fenced: u64,
}

#[derive(Debug, Default)]
struct Counters {
    rounds_run: AtomicU64,
    committed: AtomicU64,
    failed: AtomicU64,
    released: AtomicU64,
    fenced: AtomicU64,
}

impl Counters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> AgentStats {
        AgentStats {
            rounds_run: self.rounds_run.load(Ordering::Relaxed),
            committed: self.committed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            fenced: self.fenced.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("GPU: {0}")]
    Gpu(#[from] crate::gpu::GpuError),
    #[error("agent task failed: {0}")]
    Task(String),
    /// A setting out of range; the message names it and its range.
    #[error("{0}")]
    Config(String),
    /// The warm generator failed to start too many times in a row (the message says why).
    #[error("gpu {gpu}: {why}")]
    OutOfRotation { gpu: String, why: String },
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Bound on Register, Release, Fail and Complete calls: a coordinator that is stopped (not
/// dead) accepts connections and never answers.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one agent until `shutdown`. Connection problems are retried with jittered backoff;
/// they never end the agent. Returns only after every generator it started is gone.
pub async fn run_agent(cfg: AgentConfig, shutdown: Shutdown) -> Result<AgentStats, AgentError> {
    check_lease_batch(cfg.lease_batch).map_err(AgentError::Config)?;
    let mut coords = coordinators(&cfg.coordinators, &cfg.security)?;
    let inventory = cfg.inventory.clone().unwrap_or_else(|| {
        Arc::new(NoInventory {
            reason: "no inventory configured".into(),
        })
    });
    let monitor =
        Monitor::start(Arc::clone(&inventory), cfg.gpu.clone(), cfg.sample_interval).await;
    let cfg = Arc::new(cfg);
    let counters = Arc::new(Counters::default());
    let mut backoff = Backoff::new();
    let gpu = cfg.gpu.id.clone();
    // The warm generator (if a job asks for one) outlives sessions: a re-registration does
    // not cost it its cold start.
    let warm = Arc::new(tokio::sync::Mutex::new(warm::Slot::new(
        Arc::clone(&cfg.metrics),
        cfg.gpu.clone(),
        inventory,
    )));
    // Drain between sessions means nothing is running: stop at once.
    while !shutdown.drain.is_cancelled() {
        let req = pb::RegisterRequest {
            host: cfg.host.clone(),
            gpu: gpu.clone(),
            agent_name: cfg.name.clone(),
            gpu_info: Some(cfg.gpu.to_proto()),
            running: Vec::new(),
            // A first registration: nothing to prove.
            previous_worker_id: String::new(),
            previous_worker_secret: String::new(),
        };
        let reg = tokio::select! {
            r = register(&mut coords, &req, RPC_TIMEOUT) => r,
            _ = shutdown.drain.cancelled() => break,
        };
        let (client, reg, at) = match reg {
            Ok(r) => r,
            Err(e) if e.is_permanent() => return Err(e.into()),
            Err(e) => {
                debug!(%gpu, error = %e, "register failed; retrying");
                if backoff.wait(&shutdown.drain).await {
                    break;
                }
                continue;
            }
        };
        let store = match Store::open(&reg.store_url) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, url = %reg.store_url, "cannot open the coordinator's store; retrying");
                if backoff.wait(&shutdown.drain).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        info!(worker = %reg.worker_id, %gpu, coordinator = %at, "agent registered");
        let session = session::Session::new(
            Arc::clone(&cfg),
            coords.clone(),
            client,
            at,
            reg,
            store,
            monitor.clone(),
            Arc::clone(&counters),
            shutdown.clone(),
            Arc::clone(&warm),
        );
        match session.run().await {
            session::End::Shutdown => break,
            session::End::OutOfRotation(why) => {
                warm.lock().await.shut_down().await;
                return Err(AgentError::OutOfRotation { gpu, why });
            }
            session::End::Lost(why, learned) => {
                warn!(%gpu, reason = %why, "session lost; reconnecting");
                if matches!(why, session::Lost::Fenced(_)) {
                    Counters::bump(&counters.fenced);
                }
                // Keep what the session learned about who leads.
                coords = *learned;
                if backoff.wait(&shutdown.drain).await {
                    break;
                }
            }
        }
    }
    warm.lock().await.shut_down().await;
    Ok(counters.snapshot())
}

/// Jittered exponential backoff for reconnects: 100 ms doubling to 5 s, plus up to 50% more.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Backoff { next: Self::FIRST }
    }
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
    /// Sleeps; returns true when `cancel` came first.
    async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let d = self.next + jitter(self.next / 2);
        self.next = (self.next * 2).min(Self::MAX);
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = cancel.cancelled() => true,
        }
    }
}

/// A pseudo-random duration in `[0, max)`: agents that lost the same coordinator must not
/// all come back in the same millisecond.
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let nanos = max.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(h.finish() % nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_below_its_bound() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_millis(50)) < Duration::from_millis(50));
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn stop_implies_drain() {
        let s = Shutdown::new();
        s.drain.cancel();
        assert!(!s.stop.is_cancelled());
        let s = Shutdown::new();
        s.stop.cancel();
        assert!(s.drain.is_cancelled());
    }
}
