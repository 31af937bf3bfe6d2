//! Merge orchestration: once an object's committed rounds cover its quota (or its rounds ran
//! out), its final is written from them in round order (`crate::merge`), retried with backoff
//! on failure, and the job finishes when its last object is merged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Coordinator, FailureKind, unix_ms};
use crate::job::Phase;
use crate::merge;
use crate::state::{JobState, QuarantineRecord};

impl Coordinator {
    /// Starts merging `object` of `job_id` if its merge plan is ready (no-op otherwise): its
    /// rounds still running are stopped, and a tracked task writes the final.
    pub(super) fn start_merge(self: &Arc<Self>, job_id: &str, object: usize) {
        let (spec, plan, name) = {
            let mut inner = self.lock();
            let Some(job) = inner.jobs.get_mut(job_id) else {
                return;
            };
            let o = &mut job.objects[object];
            let Some(plan) = o.merge_plan(&job.spec) else {
                return;
            };
            o.phase = Phase::Merging;
            let spec = job.spec.clone();
            let name = o.name.clone();
            // Rounds of the object still running are surplus now: tell their workers to stop.
            inner.cancel_leases(|l| l.job == job_id && l.object == object);
            (spec, plan, name)
        };
        let c = Arc::clone(self);
        let job_id = job_id.to_string();
        // Its own trace, linked to the commits of the rounds it merges (their traces are the
        // rounds'); only commits this process saw are known.
        let links = self
            .commit_traces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(job_id.clone(), object))
            .unwrap_or_default();
        let span = tracing::info_span!(
            parent: None,
            "merge",
            job = %job_id,
            object = %name,
            rounds = plan.rounds.len(),
            bytes = tracing::field::Empty,
            samples = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        for tp in &links {
            quarry_common::telemetry::add_link(&span, tp);
        }
        self.tasks.spawn(tracing::Instrument::instrument(async move {
            let mut delay = Duration::from_millis(500);
            loop {
                let started = Instant::now();
                match merge::merge_object(&c.store, c.state.as_ref(), &spec, &name, &plan).await {
                    Ok(record) => {
                        c.cfg.metrics.merge_seconds.observe_duration(started.elapsed());
                        c.cfg.metrics.merge_bytes.add(record.bytes as f64);
                        let span = tracing::Span::current();
                        span.record("bytes", record.bytes);
                        span.record("samples", record.count);
                        span.record("outcome", "merged");
                        {
                            let mut inner = c.lock();
                            if let Some(job) = inner.jobs.get_mut(&job_id) {
                                if job.message.starts_with(&format!("merging {name}: retrying")) {
                                    job.message.clear();
                                }
                                let o = &mut job.objects[object];
                                o.phase = Phase::Done { complete: record.complete };
                                o.merge = Some(record.clone());
                            }
                        }
                        info!(job = %job_id, object = %name, samples = record.count, "final written");
                        c.manifest_dirty.notify_one();
                        c.bump();
                        let finished = {
                            let inner = c.lock();
                            inner.jobs.get(&job_id).is_some_and(|j| j.state == JobState::Running && j.finished())
                        };
                        if finished {
                            c.finish_job(&job_id).await;
                        }
                        return;
                    }
                    Err(merge::MergeError::BadRound { round, reason, .. }) => {
                        // The round's own bytes cannot be merged: retrying cannot help.
                        c.cfg.metrics.merges_failed.inc();
                        tracing::Span::current().record("outcome", "round quarantined");
                        c.quarantine_committed(&job_id, object, round, reason).await;
                        return;
                    }
                    Err(e @ merge::MergeError::JobFields { .. }) => {
                        // Every round fails on the job's own fields: a re-run writes the same.
                        c.cfg.metrics.merges_failed.inc();
                        tracing::Span::current().record("outcome", "job stopped");
                        c.stop_job(
                            &job_id,
                            format!("stopped: {e}; fix merge.filter / merge.dedup in the job file and submit it again"),
                        )
                        .await;
                        c.work.notify_waiters();
                        c.manifest_dirty.notify_one();
                        c.bump();
                        return;
                    }
                    Err(e) => {
                        // Otherwise the failure lies in the infrastructure (disk full, store
                        // down): retry with backoff rather than lose the object.
                        warn!(job = %job_id, object = %name, error = %e, "merge failed; will retry");
                        c.cfg.metrics.merges_failed.inc();
                        c.set_message(&job_id, format!("merging {name}: retrying after: {e}"));
                        if !c.back_off(&mut delay).await {
                            return;
                        }
                    }
                }
            }
        }, span));
    }

    /// Why the job is held up, for status (while it runs; `stop_job` and the end say theirs).
    pub(super) fn set_message(&self, job_id: &str, message: String) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.get_mut(job_id)
            && job.state == JobState::Running
        {
            job.message = message;
        }
        drop(inner);
        self.bump();
    }

    /// Quarantines committed `round` of `object`, whose files could not be merged, durably
    /// (retried until the state store takes it or the coordinator stops), and plans the
    /// object again: the next rounds take its place, exactly as for a round quarantined after
    /// failed attempts, so the plan stays deterministic.
    async fn quarantine_committed(
        self: &Arc<Self>,
        job_id: &str,
        object: usize,
        round: u32,
        reason: String,
    ) {
        let Some((name, commit)) = ({
            let inner = self.lock();
            inner.jobs.get(job_id).map(|j| {
                let o = &j.objects[object];
                (o.name.clone(), o.commits.get(&round).cloned())
            })
        }) else {
            return;
        };
        let Some(commit) = commit else {
            return;
        };
        let q = QuarantineRecord {
            round,
            seed: commit.seed,
            reason: format!(
                "{}: committed attempt {} (worker {}) cannot be merged: {reason}",
                FailureKind::OutputInvalid,
                commit.attempt,
                commit.worker
            ),
            log_tail: String::new(),
            attempts: 1,
            unix_ms: unix_ms(),
        };
        warn!(job = %job_id, object = %name, round, attempt = %commit.attempt, %reason, "committed round cannot be merged; quarantined");
        let mut delay = Duration::from_millis(500);
        loop {
            match self
                .state
                .quarantine_committed(job_id, &name, &commit.attempt, &q)
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    warn!(job = %job_id, object = %name, round, error = %e, "could not quarantine a committed round; will retry");
                    if !self.back_off(&mut delay).await {
                        return;
                    }
                }
            }
        }
        self.cfg.metrics.rounds_quarantined.inc();
        let merge_now = {
            let mut inner = self.lock();
            let Some(job) = inner.jobs.get_mut(job_id) else {
                return;
            };
            job.message = format!("{name} r{round} quarantined at merge: {}", q.reason);
            let o = &mut job.objects[object];
            o.quarantine_committed(q);
            o.phase = Phase::Running;
            o.merge_plan(&job.spec).is_some()
        };
        if merge_now {
            self.start_merge(job_id, object);
        }
        self.work.notify_waiters();
        self.manifest_dirty.notify_one();
        self.bump();
    }
}
