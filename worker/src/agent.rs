//! One worker agent: drives one GPU. Registers with the coordinator, long-polls for a round,
//! runs the generator bound to its GPU, validates and uploads the outputs to the attempt's
//! staging prefix, and reports the outcome. Heartbeats renew its lease meanwhile and carry the
//! coordinator's orders to stop a run.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quarry_common::npy;
use quarry_common::storage::{Store, keys};
use quarry_proto::v1 as pb;
use quarry_proto::v1::worker_service_client::WorkerServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::runner::{self, RunOutcome, RunSpec};

/// Settings of one agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Coordinator address, `host:port` or `http://host:port`.
    pub coordinator: String,
    /// The GPU this agent drives, as given by the operator.
    pub gpu: String,
    pub host: String,
    /// Run tasks under this root instead of the job's (a worker with its own disk layout).
    pub root_override: Option<PathBuf>,
    /// Longest long-poll for a round.
    pub acquire_wait: Duration,
    /// Bytes of generator output kept per run (head and tail).
    pub log_limit: usize,
    /// Between SIGTERM and SIGKILL when a run is stopped.
    pub kill_grace: Duration,
}

impl AgentConfig {
    pub fn new(coordinator: impl Into<String>, gpu: impl Into<String>) -> Self {
        AgentConfig {
            coordinator: coordinator.into(),
            gpu: gpu.into(),
            host: hostname(),
            root_override: None,
            acquire_wait: Duration::from_secs(10),
            log_limit: 1 << 20,
            kill_grace: Duration::from_secs(10),
        }
    }
}

/// What an agent did, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AgentStats {
    pub rounds_run: u64,
    pub committed: u64,
    pub failed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("coordinator address {addr:?}: {detail}")]
    BadAddress { addr: String, detail: String },
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs one agent until `shutdown` is cancelled. Connection problems are retried with
/// jittered backoff; they never end the agent.
pub async fn run_agent(
    cfg: AgentConfig,
    shutdown: CancellationToken,
) -> Result<AgentStats, AgentError> {
    let url = if cfg.coordinator.contains("://") {
        cfg.coordinator.clone()
    } else {
        format!("http://{}", cfg.coordinator)
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| AgentError::BadAddress {
            addr: cfg.coordinator.clone(),
            detail: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = endpoint.connect_lazy();
    let mut client = WorkerServiceClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let mut stats = AgentStats::default();
    let mut backoff = Backoff::new();
    while !shutdown.is_cancelled() {
        let reg = match client
            .register(pb::RegisterRequest {
                host: cfg.host.clone(),
                gpu: cfg.gpu.clone(),
                agent_name: String::new(),
                running: Vec::new(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => {
                debug!(gpu = %cfg.gpu, error = %e, "register failed; retrying");
                if backoff.wait(&shutdown).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        let store = match Store::open(&reg.store_url) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot open the coordinator's store; retrying");
                if backoff.wait(&shutdown).await {
                    break;
                }
                continue;
            }
        };
        info!(worker = %reg.worker_id, gpu = %cfg.gpu, "agent registered");
        let session = Session {
            cfg: &cfg,
            client: client.clone(),
            worker_id: reg.worker_id.clone(),
            store,
            running: Arc::new(Mutex::new(HashMap::new())),
        };
        let lost = CancellationToken::new();
        let hb = tokio::spawn(heartbeat_loop(
            client.clone(),
            reg.worker_id.clone(),
            Duration::from_millis(reg.heartbeat_interval_ms.max(50)),
            Arc::clone(&session.running),
            lost.clone(),
            shutdown.clone(),
        ));
        session.work(&shutdown, &lost, &mut stats).await;
        hb.abort();
    }
    Ok(stats)
}

/// Leases this agent is running, with the token that stops each.
type Running = Arc<Mutex<HashMap<u64, CancellationToken>>>;

fn lock(r: &Running) -> std::sync::MutexGuard<'_, HashMap<u64, CancellationToken>> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

async fn heartbeat_loop(
    mut client: WorkerServiceClient<Channel>,
    worker_id: String,
    every: Duration,
    running: Running,
    lost: CancellationToken,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let lease_ids: Vec<u64> = lock(&running).keys().copied().collect();
        match client
            .heartbeat(pb::HeartbeatRequest {
                worker_id: worker_id.clone(),
                lease_ids,
            })
            .await
        {
            Ok(resp) => {
                let resp = resp.into_inner();
                let r = lock(&running);
                for id in &resp.cancel_lease_ids {
                    if let Some(t) = r.get(id) {
                        info!(lease = id, "coordinator asked to stop this run");
                        t.cancel();
                    }
                }
                drop(r);
                if resp.reregister {
                    lost.cancel();
                    return;
                }
            }
            Err(e) => debug!(error = %e, "heartbeat failed"),
        }
    }
}

struct Session<'a> {
    cfg: &'a AgentConfig,
    client: WorkerServiceClient<Channel>,
    worker_id: String,
    store: Store,
    running: Running,
}

impl Session<'_> {
    async fn work(
        &self,
        shutdown: &CancellationToken,
        lost: &CancellationToken,
        stats: &mut AgentStats,
    ) {
        let mut client = self.client.clone();
        let mut backoff = Backoff::new();
        while !shutdown.is_cancelled() && !lost.is_cancelled() {
            let req = pb::AcquireRequest {
                worker_id: self.worker_id.clone(),
                wait_ms: self.cfg.acquire_wait.as_millis() as u64,
            };
            let resp = tokio::select! {
                r = client.acquire(req) => r,
                _ = shutdown.cancelled() => return,
                _ = lost.cancelled() => return,
            };
            let lease = match resp {
                Ok(r) => {
                    backoff.reset();
                    match r.into_inner().lease {
                        Some(l) => l,
                        None => continue,
                    }
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => return, // unknown worker
                Err(e) => {
                    debug!(error = %e, "acquire failed; retrying");
                    if backoff.wait(shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            stats.rounds_run += 1;
            match self.run_lease(lease, shutdown).await {
                Some(true) => stats.committed += 1,
                Some(false) => stats.failed += 1,
                None => {}
            }
        }
    }

    /// Runs one lease to its report. `Some(true)` committed, `Some(false)` failed or rejected,
    /// `None` stopped (released or cancelled).
    async fn run_lease(&self, lease: pb::Lease, shutdown: &CancellationToken) -> Option<bool> {
        let stop = CancellationToken::new();
        lock(&self.running).insert(lease.lease_id, stop.clone());
        // A shutdown stops the run too; the lease is then released, not failed.
        let guard = {
            let stop = stop.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => stop.cancel(),
                    _ = stop.cancelled() => {}
                }
            })
        };
        let outcome = self.execute(&lease, &stop).await;
        guard.abort();
        lock(&self.running).remove(&lease.lease_id);
        let mut client = self.client.clone();
        let worker_id = self.worker_id.clone();
        match outcome {
            Outcome::Uploaded {
                files,
                generator_ms,
            } => {
                let req = pb::CompleteRequest {
                    worker_id,
                    lease_id: lease.lease_id,
                    files,
                    generator_ms,
                };
                match client.complete(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let committed = r.outcome == pb::CommitOutcome::Committed as i32;
                        if !committed {
                            info!(object = %lease.object, round = lease.round, message = %r.message, "attempt not committed");
                        }
                        Some(committed)
                    }
                    Err(e) => {
                        warn!(object = %lease.object, round = lease.round, error = %e, "could not report completion");
                        Some(false)
                    }
                }
            }
            Outcome::Failed {
                kind,
                message,
                log_tail,
                generator_ms,
            } => {
                let req = pb::FailRequest {
                    worker_id,
                    lease_id: lease.lease_id,
                    kind: kind as i32,
                    message,
                    log_tail,
                    generator_ms,
                };
                if let Err(e) = client.fail(req).await {
                    warn!(error = %e, "could not report a failure");
                }
                Some(false)
            }
            Outcome::Stopped => {
                // Released, not failed: on shutdown the round is re-issued at once; when the
                // coordinator ordered the stop (round committed elsewhere, job cancelled) the
                // release just ends the lease.
                let reason = if shutdown.is_cancelled() {
                    "agent shutting down"
                } else {
                    "stopped by the coordinator"
                };
                let req = pb::ReleaseRequest {
                    worker_id,
                    lease_id: lease.lease_id,
                    reason: reason.into(),
                };
                let _ = client.release(req).await;
                None
            }
        }
    }

    async fn execute(&self, lease: &pb::Lease, stop: &CancellationToken) -> Outcome {
        let Some(task) = lease.task.as_ref() else {
            return Outcome::failed(
                pb::FailureKind::Spawn,
                "lease carries no task".into(),
                String::new(),
                0,
            );
        };
        let root = self
            .cfg
            .root_override
            .clone()
            .unwrap_or_else(|| PathBuf::from(&task.root));
        let resolve = |rel: &str| -> Result<PathBuf, String> {
            let p = Path::new(rel);
            if p.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err(format!("path {rel:?} leaves the task root"));
            }
            Ok(if p.is_absolute() {
                p.to_path_buf()
            } else {
                root.join(p)
            })
        };
        let paths = (|| -> Result<_, String> {
            let cwd = resolve(&task.cwd)?;
            let outs = task
                .outputs
                .iter()
                .map(|o| resolve(&o.path))
                .collect::<Result<Vec<_>, _>>()?;
            let round_dir = if task.round_dir.is_empty() {
                None
            } else {
                Some(resolve(&task.round_dir)?)
            };
            Ok((cwd, outs, round_dir))
        })();
        let (cwd, outs, round_dir) = match paths {
            Ok(p) => p,
            Err(m) => return Outcome::failed(pb::FailureKind::Spawn, m, String::new(), 0),
        };
        // A previous attempt's leftovers must not pass for this attempt's output.
        for o in &outs {
            let _ = std::fs::remove_file(o);
        }
        let mut env: Vec<(String, String)> = task
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        if task.bind_gpu {
            env.push(("CUDA_VISIBLE_DEVICES".into(), self.cfg.gpu.clone()));
        }
        env.push(("QUARRY_SEED".into(), lease.seed.to_string()));
        env.push(("QUARRY_ROUND".into(), lease.round.to_string()));
        env.push(("QUARRY_ATTEMPT".into(), lease.attempt.clone()));
        env.push(("QUARRY_OBJECT".into(), lease.object.clone()));
        let spec = RunSpec {
            argv: task
                .argv
                .iter()
                .map(|a| a.replace("{gpu}", &self.cfg.gpu))
                .collect(),
            cwd,
            env,
            timeout: (task.timeout_ms > 0).then(|| Duration::from_millis(task.timeout_ms)),
            kill_grace: self.cfg.kill_grace,
            log_limit: self.cfg.log_limit,
        };
        debug!(object = %lease.object, round = lease.round, seed = lease.seed, "generator starting");
        let report = match runner::run(&spec, stop.clone()).await {
            Ok(r) => r,
            Err(e) => {
                return Outcome::failed(pb::FailureKind::Spawn, e.to_string(), String::new(), 0);
            }
        };
        let generator_ms = report.duration.as_millis() as u64;
        let tail = report.log.tail_lines(20);
        let outcome = match report.outcome {
            RunOutcome::Cancelled => Outcome::Stopped,
            RunOutcome::TimedOut => Outcome::failed(
                pb::FailureKind::Timeout,
                format!(
                    "generator ran past its timeout of {} s and was killed",
                    task.timeout_ms / 1000
                ),
                tail,
                generator_ms,
            ),
            RunOutcome::Exited(0) => self.upload(lease, task, &outs, generator_ms, tail).await,
            RunOutcome::Exited(code) => Outcome::failed(
                pb::FailureKind::Exit,
                format!("generator exited with status {code}"),
                tail,
                generator_ms,
            ),
            RunOutcome::Signaled(sig) => Outcome::failed(
                pb::FailureKind::Exit,
                format!("generator killed by signal {sig}"),
                tail,
                generator_ms,
            ),
        };
        if let Outcome::Failed { .. } = outcome {
            let key = keys::log(
                &lease.job_id,
                &lease.object,
                lease.round,
                lease.seed,
                &lease.attempt,
            );
            if let Err(e) = self.store.put_bytes(&key, report.log.to_bytes()).await {
                debug!(error = %e, "could not upload the failed attempt's log");
            }
        }
        if !task.keep_intermediate {
            match &round_dir {
                Some(d) => {
                    let _ = std::fs::remove_dir_all(d);
                }
                None => {
                    for o in &outs {
                        let _ = std::fs::remove_file(o);
                    }
                }
            }
        }
        outcome
    }

    async fn upload(
        &self,
        lease: &pb::Lease,
        task: &pb::Task,
        outs: &[PathBuf],
        generator_ms: u64,
        tail: String,
    ) -> Outcome {
        let mut files = Vec::with_capacity(outs.len());
        for (spec, path) in task.outputs.iter().zip(outs) {
            if !path.is_file() {
                return Outcome::failed(
                    pb::FailureKind::OutputMissing,
                    format!("generator exited 0 but wrote no {}", spec.path),
                    tail,
                    generator_ms,
                );
            }
            let p = path.clone();
            let inspected = tokio::task::spawn_blocking(move || npy::inspect_path(&p)).await;
            let info = match inspected {
                Ok(Ok(i)) => i,
                Ok(Err(e)) => {
                    return Outcome::failed(
                        pb::FailureKind::OutputInvalid,
                        format!("{}: {e}", spec.path),
                        tail,
                        generator_ms,
                    );
                }
                Err(e) => {
                    return Outcome::failed(
                        pb::FailureKind::OutputInvalid,
                        e.to_string(),
                        tail,
                        generator_ms,
                    );
                }
            };
            let key = format!("{}/{}", task.staging_prefix, spec.name);
            match self.store.put_file(&key, path).await {
                Ok(up) => files.push(pb::UploadedFile {
                    name: spec.name.clone(),
                    key,
                    size: up.size,
                    sha256: up.sha256,
                    count: info.count,
                    schema: info.schema,
                }),
                Err(e) => {
                    let _ = self.store.delete_prefix(&task.staging_prefix).await;
                    return Outcome::failed(
                        pb::FailureKind::Upload,
                        e.to_string(),
                        tail,
                        generator_ms,
                    );
                }
            }
        }
        debug!(object = %lease.object, round = lease.round, "outputs uploaded");
        Outcome::Uploaded {
            files,
            generator_ms,
        }
    }
}

enum Outcome {
    Uploaded {
        files: Vec<pb::UploadedFile>,
        generator_ms: u64,
    },
    Failed {
        kind: pb::FailureKind,
        message: String,
        log_tail: String,
        generator_ms: u64,
    },
    Stopped,
}

impl Outcome {
    fn failed(kind: pb::FailureKind, message: String, log_tail: String, generator_ms: u64) -> Self {
        Outcome::Failed {
            kind,
            message,
            log_tail,
            generator_ms,
        }
    }
}

/// Jittered exponential backoff for reconnects: 100 ms doubling to 5 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
    /// Sleeps; returns true when shutdown came first.
    async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = Duration::from_millis(u64::from(nanos % 100));
        let d = self.next + jitter;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = shutdown.cancelled() => true,
        }
    }
}
