//! Jobs: admission (a new job, or the stored job of that name resumed when its plan is
//! unchanged), loading a job's durable state into memory, finishing and cancelling.

use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::{CoordError, Coordinator, unix_ms};
use crate::job::{JobRt, ObjectRt, Phase};
use crate::spec::JobSpec;
use crate::state::{CreateJob, JobRecord, JobState};

impl Coordinator {
    /// Creates the job, or resumes the stored job of that name if its plan is unchanged (or
    /// only has objects appended, which run as the job resumes).
    pub async fn submit(self: &Arc<Self>, spec: JobSpec) -> Result<(String, bool), CoordError> {
        spec.validate()?;
        let id = spec.exp_name.clone();
        let record = JobRecord {
            id: id.clone(),
            spec: spec.clone(),
            created_unix_ms: unix_ms(),
            state: JobState::Running,
        };
        let (record, created) = match self.state.create_job(&record).await? {
            CreateJob::Created => (record, true),
            CreateJob::Exists(stored) => {
                let changes = spec.plan_differences(&stored.spec);
                if !changes.is_empty() {
                    return Err(CoordError::SpecChanged { job: id, changes });
                }
                let appended = spec.appends_objects(&stored.spec);
                let mut updated = stored.clone();
                // Fields that do not change the plan follow the newest submission.
                updated.spec = spec;
                // Cancelled, or ended with objects appended since: it runs again.
                if updated.state == JobState::Cancelled || appended {
                    updated.state = JobState::Running;
                }
                if updated != stored {
                    self.state.update_job(&updated).await?;
                }
                (updated, false)
            }
        };
        let known = self.lock().jobs.get(&id).map(|j| j.objects.len());
        if let Some(known) = known {
            // Objects appended to a job in memory start from their stored records (none yet).
            let now = Instant::now();
            let mut added = Vec::new();
            for (i, name) in record.spec.objects.iter().enumerate().skip(known) {
                let rec = self.state.load_object(&id, name).await?;
                added.push(ObjectRt::from_record(i, name, rec, now));
            }
            let mut inner = self.lock();
            if let Some(job) = inner.jobs.get_mut(&id) {
                job.spec = record.spec.clone();
                if job.objects.len() == known {
                    job.objects.extend(added);
                }
                if record.state == JobState::Running {
                    job.state = JobState::Running;
                }
            }
        } else {
            self.load_job(record).await?;
        }
        self.work.notify_waiters();
        self.bump();
        Ok((id, created))
    }

    /// Loads a stored job into memory; objects whose rounds already cover the quota (or whose
    /// final was written but not cleaned up) go straight to merging.
    pub(super) async fn load_job(self: &Arc<Self>, record: JobRecord) -> Result<(), CoordError> {
        let now = Instant::now();
        let mut objects = Vec::with_capacity(record.spec.objects.len());
        for (i, name) in record.spec.objects.iter().enumerate() {
            let rec = self.state.load_object(&record.id, name).await?;
            objects.push(ObjectRt::from_record(i, name, rec, now));
        }
        let mut job = JobRt {
            spec: record.spec,
            objects,
            state: record.state,
            created_unix_ms: record.created_unix_ms,
            started: now,
            generator_ms: 0,
            samples_this_session: 0,
            audit_failure: None,
            message: String::new(),
        };
        let id = record.id;
        let mut to_merge = Vec::new();
        for o in &mut job.objects {
            if o.phase == Phase::Running && o.merge_plan(&job.spec).is_some() {
                to_merge.push(o.index);
            }
        }
        let finished = job.state == JobState::Running && job.finished();
        {
            let mut inner = self.lock();
            if !inner.order.contains(&id) {
                inner.order.push(id.clone());
            }
            inner.jobs.insert(id.clone(), job);
        }
        info!(job = %id, "job loaded");
        for idx in to_merge {
            self.start_merge(&id, idx);
        }
        if finished {
            self.finish_job(&id).await;
        }
        self.manifest_dirty.notify_one();
        Ok(())
    }

    /// Publishes the run's finals (`seed_only`, `both`), records the job's end state, removes
    /// leftover staging and writes the last manifest.
    /// The job shows as ended only once its last manifest is written, so a client that reads
    /// the manifest when `status` says the job ended reads the final one.
    pub(super) async fn finish_job(self: &Arc<Self>, job_id: &str) {
        let record = {
            let mut inner = self.lock();
            if inner.finishing.contains(job_id) {
                return;
            }
            let Some(job) = inner.jobs.get(job_id) else {
                return;
            };
            let record = JobRecord {
                id: job_id.to_string(),
                spec: job.spec.clone(),
                created_unix_ms: job.created_unix_ms,
                state: job.end_state(),
            };
            inner.finishing.insert(job_id.to_string());
            record
        };
        // The run's finals reach their seed-tagged directory before the job is recorded as
        // ended: a coordinator that restarts in between finds the job running and finishes it.
        if !self.publish_finals_until_done(job_id).await {
            self.lock().finishing.remove(job_id);
            return;
        }
        if let Err(e) = self.state.update_job(&record).await {
            warn!(job = %job_id, error = %e, "could not store the job's end state");
        }
        if !record.spec.keep_intermediate {
            let prefix = format!("{job_id}/rounds");
            if let Err(e) = self.store.delete_prefix(&prefix).await {
                warn!(job = %job_id, error = %e, "could not remove leftover staging");
            }
        }
        self.publish_end(job_id, record.state).await;
        info!(job = %job_id, state = ?record.state, "job finished");
        self.bump();
    }

    /// Stops a job on the coordinator's own decision, saying why in its status.
    pub(super) async fn stop_job(&self, job_id: &str, why: String) {
        warn!(job = %job_id, "{why}");
        // The first reason stands: a failure reported after the job stopped (another audited
        // round of the same generator, say) must not replace the one that stopped it.
        if let Some(job) = self
            .lock()
            .jobs
            .get_mut(job_id)
            .filter(|j| j.state == JobState::Running)
        {
            job.message = why;
        }
        if let Err(e) = self.cancel(job_id).await {
            warn!(job = %job_id, error = %e, "could not stop the job");
        }
    }

    /// Stops a job: no more rounds are handed out and running attempts are told to stop.
    pub async fn cancel(&self, job_id: &str) -> Result<(), CoordError> {
        let record = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let job = inner
                .jobs
                .get_mut(job_id)
                .ok_or_else(|| CoordError::JobNotFound(job_id.into()))?;
            if job.state != JobState::Running {
                return Ok(());
            }
            job.state = JobState::Cancelled;
            let record = JobRecord {
                id: job_id.into(),
                spec: job.spec.clone(),
                created_unix_ms: job.created_unix_ms,
                state: JobState::Cancelled,
            };
            inner.cancel_leases(|l| l.job == job_id);
            record
        };
        self.state.update_job(&record).await?;
        self.write_manifest(job_id).await;
        self.bump();
        Ok(())
    }
}
