//! Scheduling: which round goes to which worker next. Rounds are handed out job-major, then
//! object-major, each object's rounds in order; a lease taken back (released, expired,
//! failed) puts its round back to be handed out again.

use std::time::{Duration, Instant};

use quarry_common::storage::keys;
use quarry_common::transport::MAX_ROUNDS_PER_CALL;
use tracing::debug;

use super::{CoordError, Coordinator, Grant, Lease, OutputSpec, RoundLease, RoundTask};
use crate::spec::{JobSpec, RoundVars, render};
use crate::state::JobState;

impl Coordinator {
    /// Hands out the next round, waiting up to `wait` for one.
    pub async fn acquire(&self, worker: &str, wait: Duration) -> Result<Option<Grant>, CoordError> {
        Ok(self.acquire_many(worker, 1, wait).await?.into_iter().next())
    }

    /// Hands out up to `max` rounds (at least one, at most [`MAX_ROUNDS_PER_CALL`]), waiting up
    /// to `wait` for the first: the call returns with what is ready once one is.
    pub async fn acquire_many(
        &self,
        worker: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Grant>, CoordError> {
        let max = max.clamp(1, MAX_ROUNDS_PER_CALL);
        let started = Instant::now();
        let until = started + wait;
        loop {
            let notified = self.work.notified();
            let grants = self.try_acquire(worker, max)?;
            if !grants.is_empty() {
                self.cfg
                    .metrics
                    .acquire_seconds
                    .observe_duration(started.elapsed());
                return Ok(grants);
            }
            let now = Instant::now();
            if now >= until || self.shutdown.is_cancelled() {
                return Ok(Vec::new());
            }
            // Retries become ready by time, not by an event: re-check at least every 100 ms.
            let slice = (until - now).min(Duration::from_millis(100));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(slice) => {}
                _ = self.shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// Leases up to `max` rounds that are ready now, under one hold of the lock.
    fn try_acquire(&self, worker: &str, max: usize) -> Result<Vec<Grant>, CoordError> {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let w = inner
            .workers
            .get_mut(worker)
            .ok_or_else(|| CoordError::UnknownWorker(worker.into()))?;
        w.last_seen = now;
        let adopting = now < *self.adopt_until.lock().unwrap_or_else(|p| p.into_inner());
        let held_back = adopting.then(|| self.resumed.lock().unwrap_or_else(|p| p.into_inner()));
        let mut grants = Vec::new();
        for id in &inner.order {
            let Some(job) = inner.jobs.get_mut(id) else {
                continue;
            };
            if job.state != JobState::Running || held_back.as_ref().is_some_and(|r| r.contains(id))
            {
                continue;
            }
            let spec = &job.spec;
            // Each pass issues the first round ready in the job (objects in order), so a batch
            // takes the rounds a run of single calls would have taken.
            while grants.len() < max {
                let Some((idx, round)) = job
                    .objects
                    .iter()
                    .find_map(|o| o.next_to_issue(spec, now).map(|r| (o.index, r)))
                else {
                    break;
                };
                let o = &mut job.objects[idx];
                let seq = o.issue(round);
                let attempt = format!("e{}a{}", self.epoch, seq);
                let seed = spec.seed(idx, round);
                let name = spec.round_name(&o.name, round, seed);
                let staging_prefix = keys::staging(&spec.exp_name, &o.name, round, seed, &attempt);
                let lease_id = inner.next_lease;
                inner.next_lease += 1;
                let task = task_for(spec, &o.name, round, seed, &name, &staging_prefix);
                let lease = RoundLease {
                    lease_id,
                    job_id: id.clone(),
                    object: o.name.clone(),
                    object_index: idx as u32,
                    round,
                    seed,
                    attempt: attempt.clone(),
                    round_name: name,
                    task,
                };
                debug!(job = %id, object = %o.name, round, seed, %attempt, worker, "round leased");
                self.cfg.metrics.rounds_leased.inc();
                inner.leases.insert(
                    lease_id,
                    Lease {
                        job: id.clone(),
                        object: idx,
                        round,
                        seed,
                        attempt,
                        worker: worker.to_string(),
                        deadline: now + self.cfg.lease_ttl,
                        staging_prefix,
                    },
                );
                grants.push(Grant { lease });
            }
            if grants.len() == max {
                break;
            }
        }
        drop(held_back);
        drop(guard);
        if !grants.is_empty() {
            self.bump();
        }
        Ok(grants)
    }

    /// Takes `worker`'s lease `lease_id` out of the lease table, to judge its outcome.
    pub(super) fn take_lease(&self, worker: &str, lease_id: u64) -> Option<Lease> {
        let mut inner = self.lock();
        match inner.leases.get(&lease_id) {
            Some(l) if l.worker == worker => {}
            _ => return None,
        }
        // The round stays counted in flight until its outcome is applied (`settle`), so that
        // a slow commit does not make the scheduler hand out rounds the quota does not need.
        inner.leases.remove(&lease_id)
    }

    /// The round of a taken lease is no longer in flight (its outcome is applied or dropped).
    pub(super) fn settle(&self, lease: &Lease) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.get_mut(&lease.job) {
            job.objects[lease.object].lease_ended(lease.round);
        }
    }

    /// A lease given back without failing (drain or shutdown): re-issued at once.
    pub fn release(&self, worker: &str, lease_id: u64) {
        if let Some(lease) = self.take_lease(worker, lease_id) {
            self.cfg.metrics.rounds_released.inc();
            self.requeue(&lease);
        }
    }

    /// Settles a taken lease and puts its round back to be handed out at once.
    pub(super) fn requeue(&self, lease: &Lease) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.get_mut(&lease.job) {
            let o = &mut job.objects[lease.object];
            o.lease_ended(lease.round);
            o.requeue(lease.round, Instant::now());
        }
        drop(inner);
        self.work.notify_waiters();
    }
}

/// Renders the generator task of one round.
fn task_for(
    spec: &JobSpec,
    object: &str,
    round: u32,
    seed: i64,
    name: &str,
    staging_prefix: &str,
) -> RoundTask {
    let g = &spec.generator;
    let vars = RoundVars {
        exp: &spec.exp_name,
        name,
        object,
        seed,
        round,
        batch_size: spec.round_batch_size,
        num_iterations: spec.num_iterations,
    };
    let output = render(&g.output, &vars);
    let file_name = output.rsplit('/').next().unwrap_or(&output).to_string();
    RoundTask {
        // Pass-through arguments go verbatim, as scale_runner forwarded them.
        argv: g
            .argv
            .iter()
            .map(|a| render(a, &vars))
            .chain(g.extra_args.iter().cloned())
            .collect(),
        root: spec.root.display().to_string(),
        cwd: render(&g.cwd, &vars),
        env: g
            .env
            .iter()
            .map(|(k, v)| (k.clone(), render(v, &vars)))
            .collect(),
        outputs: vec![OutputSpec {
            path: output,
            name: file_name,
            // Validated at submit: a stored spec always has a format.
            format: spec
                .format()
                .map_or_else(|_| String::new(), |f| f.name().to_string()),
            filter: spec.merge.filter.clone().unwrap_or_default(),
        }],
        stats_path: g
            .stats
            .as_deref()
            .map(|p| render(p, &vars))
            .unwrap_or_default(),
        round_dir: g
            .round_dir
            .as_deref()
            .map(|d| render(d, &vars))
            .unwrap_or_default(),
        timeout_ms: g.timeout_secs.map_or(0, |s| s.saturating_mul(1000)),
        staging_prefix: staging_prefix.to_string(),
        keep_intermediate: spec.keep_intermediate,
        bind_gpu: g.bind_gpu,
        threads_per_gpu: g.threads_per_gpu.unwrap_or(0),
        min_free_gpu_memory_mib: g.min_free_gpu_memory_mib.unwrap_or(0),
        mode: g.mode.clone(),
        batch_size: spec.round_batch_size,
        num_iterations: spec.num_iterations,
        recycle_after_rounds: g.recycle_after_rounds.unwrap_or(0),
        recycle_above_memory_mib: g.recycle_above_memory_mib.unwrap_or(0),
        recycle_above_gpu_memory_mib: g.recycle_above_gpu_memory_mib.unwrap_or(0),
        audit: g.is_warm() && spec.audited(object, round),
    }
}
