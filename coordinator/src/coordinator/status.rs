//! Status snapshots of jobs, their objects and the workers serving them.

use std::collections::HashMap;
use std::time::Instant;

use super::{
    CoordError, Coordinator, Inner, JobStatus, Lease, ObjectState, ObjectStatus, WorkerStatus,
};
use crate::job::{JobRt, Phase};
use crate::state::JobState;

impl Coordinator {
    /// A status snapshot of one job.
    pub fn status(&self, job_id: &str) -> Result<JobStatus, CoordError> {
        let inner = self.lock();
        let job = inner
            .jobs
            .get(job_id)
            .ok_or_else(|| CoordError::JobNotFound(job_id.into()))?;
        Ok(status_of(&inner, job_id, job))
    }

    /// Status snapshots of every job, in submission order.
    pub fn list(&self) -> Vec<JobStatus> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .filter_map(|id| inner.jobs.get(id).map(|j| status_of(&inner, id, j)))
            .collect()
    }

    /// Whether the job has ended (done, incomplete or cancelled).
    pub fn job_ended(&self, job_id: &str) -> bool {
        self.lock()
            .jobs
            .get(job_id)
            .is_none_or(|j| j.state != JobState::Running)
    }
}

fn status_of(inner: &Inner, job_id: &str, job: &JobRt) -> JobStatus {
    let quota = job.spec.target_count_per_object;
    let objects: Vec<ObjectStatus> = job
        .objects
        .iter()
        .map(|o| ObjectStatus {
            name: o.name.clone(),
            state: match o.phase {
                Phase::Running if o.commits.is_empty() && o.in_flight.is_empty() => {
                    ObjectState::Pending
                }
                Phase::Running => ObjectState::Running,
                Phase::Merging => ObjectState::Merging,
                Phase::Done { complete: true } => ObjectState::Done,
                Phase::Done { complete: false } => ObjectState::Exhausted,
            },
            collected: o.collected(quota),
            target: quota,
            rounds_committed: o.commits.len() as u32,
            rounds_in_flight: o.in_flight.len() as u32,
            rounds_quarantined: o.quarantined.len() as u32,
            failed_attempts: o.failed_attempts,
            attempts: o.yields().attempts,
            successes: o.yields().successes,
        })
        .collect();
    let now = Instant::now();
    // The job's leases by worker, in one pass over the leases (not one per worker).
    let mut held: HashMap<&str, Vec<&Lease>> = HashMap::new();
    for l in inner.leases.values().filter(|l| l.job == job_id) {
        held.entry(l.worker.as_str()).or_default().push(l);
    }
    let mut workers: Vec<WorkerStatus> = inner
        .workers
        .iter()
        .map(|(id, w)| {
            let mut mine = held.remove(id.as_str()).unwrap_or_default();
            mine.sort_by_key(|l| (l.object, l.round));
            let running = mine
                .iter()
                .map(|l| format!("{} r{}", job.objects[l.object].name, l.round))
                .collect::<Vec<_>>()
                .join(", ");
            WorkerStatus {
                worker_id: id.clone(),
                host: w.host.clone(),
                gpu: w.gpu.clone(),
                running,
                last_seen_ms_ago: now.duration_since(w.last_seen).as_millis() as u64,
                gpu_info: w.gpu_info.clone(),
                health: w.health.clone(),
                agent_state: w.agent_state.clone(),
            }
        })
        .collect();
    workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
    JobStatus {
        job_id: job_id.to_string(),
        state: job.state,
        samples_collected: objects.iter().map(|o| o.collected).sum(),
        samples_target: quota * job.objects.len() as u64,
        rounds_committed: objects.iter().map(|o| o.rounds_committed).sum(),
        failed_attempts: objects.iter().map(|o| o.failed_attempts).sum(),
        rounds_quarantined: objects.iter().map(|o| o.rounds_quarantined).sum(),
        rounds_in_flight: objects.iter().map(|o| o.rounds_in_flight).sum(),
        attempts: objects.iter().map(|o| o.attempts).sum(),
        successes: objects.iter().map(|o| o.successes).sum(),
        objects,
        elapsed_ms: job.started.elapsed().as_millis() as u64,
        generator_ms: job.generator_ms,
        workers,
        message: job.message.clone(),
        samples_this_session: job.samples_this_session,
        rounds_audited: job.rounds_audited(),
    }
}
