//! The worker registry: agents register (adopting the rounds they still run from an earlier
//! coordinator), renew their leases with heartbeats, and are forgotten when they go quiet.

use std::time::Instant;

use quarry_common::storage::keys;
use tracing::{debug, info};

use super::{Coordinator, GpuHealth, GpuInfo, Lease, RunningRound, WorkerInfo};
use crate::state::JobState;

impl Coordinator {
    /// Registers an agent; `running` are rounds it still runs from a previous coordinator,
    /// adopted when they can still commit (answered in the returned list of lease ids to
    /// stop otherwise).
    pub fn register(
        &self,
        host: &str,
        gpu: &str,
        name: &str,
        gpu_info: Option<GpuInfo>,
        running: &[RunningRound],
    ) -> (String, Vec<u64>) {
        let id = self.register_worker(host, gpu, name, gpu_info);
        let mut refused = Vec::new();
        for l in running {
            if !self.adopt(&id, l) {
                refused.push(l.lease_id);
            }
        }
        if !running.is_empty() {
            info!(worker = %id, adopted = running.len() - refused.len(), refused = refused.len(), "running rounds reported at registration");
            self.bump();
        }
        (id, refused)
    }

    /// Takes over `l`, a round a worker runs under a lease of an earlier coordinator: it keeps
    /// its lease id and attempt, so its commit goes through as if nothing had happened.
    /// Refused when the round is resolved, the job is not running, or the lease does not
    /// match the job's plan.
    fn adopt(&self, worker: &str, l: &RunningRound) -> bool {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(existing) = inner.leases.get_mut(&l.lease_id) {
            // Known already (the worker re-registered with this coordinator): move it.
            if existing.attempt != l.attempt {
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
    ) -> String {
        let mut inner = self.lock();
        let n = inner.next_worker;
        inner.next_worker += 1;
        let base = if name.is_empty() {
            format!("{host}-gpu{gpu}")
        } else {
            name.to_string()
        };
        let id = format!("{base}-{}.{n}", self.epoch);
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
            },
        );
        info!(worker = %id, gpu, "worker registered");
        drop(inner);
        self.bump();
        id
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
