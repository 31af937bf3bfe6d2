//! Merge orchestration: once an object's committed rounds cover its quota (or its rounds ran
//! out), its final is written from them in round order (`crate::merge`), retried with backoff
//! on failure, and the job finishes when its last object is merged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::Coordinator;
use crate::job::Phase;
use crate::merge;
use crate::state::JobState;

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
                    Err(e) => {
                        // A merge failure is an infrastructure problem (disk full, store down):
                        // retry with backoff rather than lose the object.
                        warn!(job = %job_id, object = %name, error = %e, "merge failed; will retry");
                        c.cfg.metrics.merges_failed.inc();
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = c.shutdown.cancelled() => return,
                        }
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }, span));
    }
}
