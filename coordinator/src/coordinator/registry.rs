//! The worker registry: agents register (adopting the rounds they still run from an earlier
//! coordinator), renew their leases with heartbeats, and are forgotten when they go quiet.
//!
//! The registry is bounded: at most [`CoordinatorConfig::max_workers`] workers, whose strings
//! take at most [`CoordinatorConfig::max_worker_bytes`] together (each worker counted with
//! room for its heartbeat texts), so that a status listing every worker always fits in a gRPC
//! message. The service checks each string's own bound before calling in.
//!
//! [`CoordinatorConfig::max_workers`]: super::CoordinatorConfig::max_workers
//! [`CoordinatorConfig::max_worker_bytes`]: super::CoordinatorConfig::max_worker_bytes

use std::time::Instant;

use quarry_common::secret;
use quarry_common::storage::keys;
use tracing::{debug, info, warn};

use super::{CoordError, Coordinator, GpuHealth, GpuInfo, Lease, RunningRound, WorkerInfo};
use crate::state::JobState;

/// Default bound on the workers registered at once.
pub const MAX_WORKERS: usize = 10_000;

/// Default bound on the bytes of the registered workers' strings together (6 MiB: a status
/// that lists every worker stays well below the 16 MiB message limit).
pub const MAX_WORKER_BYTES: usize = 6 << 20;

/// Room counted per worker for the texts its heartbeats may set later (agent state and GPU
/// health reason), so that heartbeats can never push the registry past its byte bound. Equal
/// to the service's bound on each of the two.
pub const HEARTBEAT_TEXT_RESERVE: usize = 2 * 256;

/// Bytes of the random secret each registration gets (as hex: twice as many characters).
const SECRET_BYTES: usize = 32;

/// A registration's identity and secret, presented by an agent registering again to show that
/// the rounds it lists are its own.
#[derive(Debug, Clone, Copy)]
pub struct WorkerProof<'a> {
    pub worker: &'a str,
    pub secret: &'a str,
}

/// What Register answers.
#[derive(Debug)]
pub struct Registration {
    pub worker: String,
    /// Required on every later call naming `worker` (see [`Coordinator::check_worker`]).
    pub secret: String,
    /// Lease ids of the listed running rounds that were not adopted: the agent stops them.
    pub refused: Vec<u64>,
}

/// Bytes one worker's record counts against [`MAX_WORKER_BYTES`].
fn worker_bytes(id: &str, host: &str, gpu: &str, info: Option<&GpuInfo>) -> usize {
    let info = info.map_or(0, |i| i.uuid.len() + i.name.len() + i.driver_version.len());
    id.len() + host.len() + gpu.len() + info + HEARTBEAT_TEXT_RESERVE
}

impl Coordinator {
    /// [`Coordinator::try_register`] for tests, where the registry never fills up.
    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    pub fn register(
        &self,
        host: &str,
        gpu: &str,
        name: &str,
        gpu_info: Option<GpuInfo>,
        running: &[RunningRound],
    ) -> (String, Vec<u64>) {
        let r = self
            .try_register(host, gpu, name, gpu_info, running, None)
            .unwrap();
        (r.worker, r.refused)
    }

    /// Registers an agent; `running` are rounds it still runs from a previous coordinator,
    /// adopted when they can still commit (answered in the returned list of lease ids to
    /// stop otherwise); `previous` is the registration the agent held until now, if any.
    /// Refused with [`CoordError::RegistryFull`] when the registry is at its bound (see the
    /// module's doc).
    pub fn try_register(
        &self,
        host: &str,
        gpu: &str,
        name: &str,
        gpu_info: Option<GpuInfo>,
        running: &[RunningRound],
        previous: Option<WorkerProof<'_>>,
    ) -> Result<Registration, CoordError> {
        let secret =
            secret::random_hex(SECRET_BYTES).map_err(|e| CoordError::Random(e.to_string()))?;
        let id = self.register_worker(host, gpu, name, gpu_info, secret.clone())?;
        let mut refused = Vec::new();
        for l in running {
            if !self.adopt(&id, previous, l) {
                refused.push(l.lease_id);
            }
        }
        if !running.is_empty() {
            info!(worker = %id, adopted = running.len() - refused.len(), refused = refused.len(), "running rounds reported at registration");
            self.bump();
        }
        Ok(Registration {
            worker: id,
            secret,
            refused,
        })
    }

    /// Checks that `secret` is the one registered worker `worker` was given. A worker this
    /// coordinator does not know passes: the call itself then answers that it must register
    /// again (after a restart or failover, or once it was forgotten).
    pub fn check_worker(&self, worker: &str, secret: &str) -> Result<(), CoordError> {
        match self.lock().workers.get(worker) {
            Some(w) if !secret::constant_time_eq(w.secret.as_bytes(), secret.as_bytes()) => {
                Err(CoordError::WrongWorkerSecret(worker.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Takes over `l`, a round a worker runs under a lease of an earlier coordinator: it keeps
    /// its lease id and attempt, so its commit goes through as if nothing had happened.
    /// Refused when the round is resolved, the job is not running, or the lease does not
    /// match the job's plan.
    ///
    /// A lease this coordinator knows already moves to the registrant (an agent registering
    /// again after losing its connection) only with the same attempt, and, while the worker
    /// holding it is alive (heard from within the lease TTL), only when the registrant proves
    /// it is that worker's agent: `previous` names the holder with its secret. One worker
    /// cannot take another's running rounds away, whatever host and GPU it claims.
    fn adopt(&self, worker: &str, previous: Option<WorkerProof<'_>>, l: &RunningRound) -> bool {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(existing) = inner.leases.get_mut(&l.lease_id) {
            // Known already (the worker re-registered with this coordinator): move it.
            if existing.attempt != l.attempt {
                return false;
            }
            if let Some(holder) = inner.workers.get(&existing.worker)
                && now.saturating_duration_since(holder.last_seen) <= self.cfg.lease_ttl
                && !previous.is_some_and(|p| {
                    p.worker == existing.worker
                        && secret::constant_time_eq(p.secret.as_bytes(), holder.secret.as_bytes())
                })
            {
                warn!(
                    lease = l.lease_id,
                    holder = %existing.worker,
                    registrant = worker,
                    "refused to move a lease held by a live worker: the registrant did not prove \
                     it is that worker's agent"
                );
                return false;
            }
            existing.worker = worker.to_string();
            existing.deadline = now + self.cfg.lease_ttl;
            return true;
        }
        let Some(job) = inner.jobs.get_mut(&l.job_id) else {
            return false;
        };
        if job.state != JobState::Running {
            return false;
        }
        let idx = l.object_index as usize;
        let spec = &job.spec;
        let Some(o) = job.objects.get_mut(idx) else {
            return false;
        };
        if o.name != l.object
            || spec.seed(idx, l.round) != l.seed
            || u64::from(l.round) >= spec.round_cap()
            || o.resolved(l.round)
            || quarry_common::names::validate("attempt", &l.attempt).is_err()
        {
            return false;
        }
        o.issue(l.round);
        let staging_prefix = keys::staging(&spec.exp_name, &o.name, l.round, l.seed, &l.attempt);
        inner.leases.insert(
            l.lease_id,
            Lease {
                job: l.job_id.clone(),
                object: idx,
                round: l.round,
                seed: l.seed,
                attempt: l.attempt.clone(),
                worker: worker.to_string(),
                deadline: now + self.cfg.lease_ttl,
                staging_prefix,
            },
        );
        debug!(job = %l.job_id, object = %l.object, round = l.round, attempt = %l.attempt, worker, "round adopted");
        true
    }

    fn register_worker(
        &self,
        host: &str,
        gpu: &str,
        name: &str,
        gpu_info: Option<GpuInfo>,
        secret: String,
    ) -> Result<String, CoordError> {
        let mut inner = self.lock();
        let base = if name.is_empty() {
            format!("{host}-gpu{gpu}")
        } else {
            name.to_string()
        };
        let id = format!("{base}-{}.{}", self.epoch, inner.next_worker);
        if inner.workers.len() >= self.cfg.max_workers {
            return Err(CoordError::RegistryFull(format!(
                "{} workers are registered, the most this coordinator accepts ({}); quiet \
                 workers are forgotten after twice the lease TTL",
                inner.workers.len(),
                self.cfg.max_workers
            )));
        }
        let held: usize = inner
            .workers
            .iter()
            .map(|(id, w)| worker_bytes(id, &w.host, &w.gpu, w.gpu_info.as_ref()))
            .sum();
        let adding = worker_bytes(&id, host, gpu, gpu_info.as_ref());
        if held + adding > self.cfg.max_worker_bytes {
            return Err(CoordError::RegistryFull(format!(
                "the registered workers' names and GPU descriptions take {held} bytes; this \
                 worker's {adding} more would pass the bound of {} bytes",
                self.cfg.max_worker_bytes
            )));
        }
        inner.next_worker += 1;
        inner.workers.insert(
            id.clone(),
            WorkerInfo {
                host: host.into(),
                gpu: gpu.into(),
                last_seen: Instant::now(),
                cancel: Vec::new(),
                gpu_info,
                health: None,
                agent_state: String::new(),
                secret,
            },
        );
        info!(worker = %id, gpu, "worker registered");
        drop(inner);
        self.bump();
        Ok(id)
    }

    /// Renews the worker's listed leases and records its GPU health and state; returns leases
    /// it must stop, or `None` when the worker is unknown (it must register again).
    pub fn heartbeat(
        &self,
        worker: &str,
        running: &[u64],
        health: Option<GpuHealth>,
        agent_state: String,
    ) -> Option<Vec<u64>> {
        let now = Instant::now();
        let mut inner = self.lock();
        let w = inner.workers.get_mut(worker)?;
        w.last_seen = now;
        if health.is_some() {
            w.health = health;
        }
        let state_changed = w.agent_state != agent_state;
        if state_changed {
            w.agent_state = agent_state;
        }
        let mut cancel = std::mem::take(&mut w.cancel);
        let deadline = now + self.cfg.lease_ttl;
        for id in running {
            match inner.leases.get_mut(id) {
                Some(l) if l.worker == worker => l.deadline = deadline,
                _ => {
                    if !cancel.contains(id) {
                        cancel.push(*id);
                    }
                }
            }
        }
        drop(inner);
        if state_changed {
            // Status watchers see an agent turn unhealthy or start draining.
            self.bump();
        }
        Some(cancel)
    }

    /// Forgets workers not heard from for [`CoordinatorConfig::worker_expiry`] that hold no
    /// lease (theirs expired a TTL earlier); returns how many. A forgotten worker that is
    /// alive after all is told to register again by its next heartbeat, listing its rounds.
    ///
    /// [`CoordinatorConfig::worker_expiry`]: super::CoordinatorConfig::worker_expiry
    pub(super) fn expire_workers(&self, now: Instant) -> usize {
        let expiry = self.cfg.worker_expiry();
        let mut inner = self.lock();
        let holding: std::collections::HashSet<&str> =
            inner.leases.values().map(|l| l.worker.as_str()).collect();
        let gone: Vec<String> = inner
            .workers
            .iter()
            .filter(|(id, w)| {
                now.saturating_duration_since(w.last_seen) > expiry
                    && !holding.contains(id.as_str())
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            inner.workers.remove(id);
            info!(worker = %id, "worker forgotten: not heard from within twice the lease TTL");
        }
        drop(inner);
        if !gone.is_empty() {
            self.bump();
        }
        gone.len()
    }
}
