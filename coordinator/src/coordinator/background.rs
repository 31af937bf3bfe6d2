//! Background tasks of a coordinator: the reaper (expired leases become failed attempts,
//! quiet workers are forgotten, gauges refreshed) and the manifest writer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quarry_common::storage::keys;
use tracing::warn;

use super::{Coordinator, FailureKind, Lease};
use crate::manifest;
use crate::state::JobState;

impl Coordinator {
    /// Re-issues leases whose worker stopped renewing them and forgets workers gone quiet.
    pub(super) async fn reaper(self: Arc<Self>) {
        let tick =
            (self.cfg.lease_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.shutdown.cancelled() => return,
            }
            let now = Instant::now();
            let expired: Vec<Lease> = {
                let mut inner = self.lock();
                let ids: Vec<u64> = inner
                    .leases
                    .iter()
                    .filter(|(_, l)| l.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                // Settled by `fail_lease` below, once the failure is applied.
                ids.iter()
                    .filter_map(|id| inner.leases.remove(id))
                    .collect()
            };
            self.expire_workers(now);
            self.refresh_gauges();
            for l in expired {
                self.cfg.metrics.lease_expiries.inc();
                let msg = format!(
                    "lease not renewed by worker {} within {:?}",
                    l.worker, self.cfg.lease_ttl
                );
                self.fail_lease(l, FailureKind::LeaseExpired, msg, String::new())
                    .await;
            }
        }
    }

    fn refresh_gauges(&self) {
        let inner = self.lock();
        let m = &self.cfg.metrics;
        m.workers.set(inner.workers.len() as f64);
        m.rounds_in_flight.set(inner.leases.len() as f64);
        m.jobs_running.set(
            inner
                .jobs
                .values()
                .filter(|j| j.state == JobState::Running)
                .count() as f64,
        );
    }

    /// Rewrites the manifests of every job when one changed, at most once per
    /// `manifest_interval`.
    pub(super) async fn manifest_writer(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.manifest_dirty.notified() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let ids: Vec<String> = self.lock().order.clone();
            for id in ids {
                self.write_manifest(&id).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.manifest_interval) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Writes `<exp>/manifest.json` from the current picture (atomic replace).
    pub async fn write_manifest(&self, job_id: &str) {
        let _guard = self.manifest_lock.lock().await;
        let doc = {
            let inner = self.lock();
            let Some(job) = inner.jobs.get(job_id) else {
                return;
            };
            manifest::build(job)
        };
        self.put_manifest(job_id, &doc).await;
    }

    /// Writes the last manifest of a job that ended in `state`, then shows the job as ended,
    /// both under the manifest lock so that no older picture is written after it.
    pub(super) async fn publish_end(&self, job_id: &str, state: JobState) {
        let _guard = self.manifest_lock.lock().await;
        let doc = {
            let inner = self.lock();
            inner.jobs.get(job_id).map(|job| {
                let mut doc = manifest::build(job);
                if job.state == JobState::Running {
                    doc.state = state;
                }
                doc
            })
        };
        if let Some(doc) = doc {
            self.put_manifest(job_id, &doc).await;
        }
        let mut inner = self.lock();
        inner.finishing.remove(job_id);
        if let Some(job) = inner.jobs.get_mut(job_id)
            && job.state == JobState::Running
        {
            job.state = state;
        }
    }

    async fn put_manifest(&self, job_id: &str, doc: &manifest::Manifest) {
        match serde_json::to_vec_pretty(doc) {
            Ok(bytes) => {
                if let Err(e) = self.store.put_bytes(&keys::manifest(job_id), bytes).await {
                    warn!(job = %job_id, error = %e, "could not write the manifest");
                }
            }
            Err(e) => warn!(job = %job_id, error = %e, "could not encode the manifest"),
        }
    }
}
