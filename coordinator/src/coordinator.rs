//! The coordinator's core: jobs in memory, leases, commits, and the tasks that merge, write
//! the manifest and reap expired leases. The gRPC services are thin shells over this.
//!
//! Locking: one `std::sync::Mutex` over the in-memory picture, held only for short, non-async
//! sections. Durable changes go to the state store first (outside the lock); the memory is
//! updated after the store said yes, so a crash at any point leaves the store authoritative.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quarry_common::storage::{Store, keys};
use quarry_common::transport::MAX_ROUNDS_PER_CALL;
use quarry_proto::v1 as pb;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::job::{JobRt, ObjectRt, Phase, backoff};
use crate::metrics::CoordMetrics;
use crate::spec::{JobSpec, RoundVars, SpecError, render};
use crate::state::{
    CommitOutcome, CommitRecord, CreateJob, FailureRecord, FileRecord, JobRecord, JobState,
    QuarantineOutcome, QuarantineRecord, RoundGpuStats, RoundYield, StateError, StateStore,
};
use crate::{manifest, merge};

/// Tunables of a coordinator process.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// A lease not renewed by a heartbeat within this time is re-issued as a new attempt.
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// Shortest interval between two manifest writes of one job while it runs.
    pub manifest_interval: Duration,
    /// After start, how long no new round is handed out, so that workers still running
    /// rounds of a previous leader re-register and have them adopted instead of duplicated.
    pub adopt_window: Duration,
    /// Where the coordinator's metrics go (shared with the `/metrics` endpoint).
    pub metrics: Arc<CoordMetrics>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            manifest_interval: Duration::from_secs(2),
            adopt_window: Duration::ZERO,
            metrics: Arc::default(),
        }
    }
}

/// Errors a caller branches on; mapped to gRPC codes in `service`.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("invalid job spec: {0}")]
    Spec(#[from] SpecError),
    #[error("job {job:?} exists with a different spec; changed: {}. Use a new --exp_name, or run the original command to resume", changes.join("; "))]
    SpecChanged { job: String, changes: Vec<String> },
    #[error("job {0:?} not found")]
    JobNotFound(String),
    #[error("unknown worker {0:?}: register again")]
    UnknownWorker(String),
    #[error(transparent)]
    State(#[from] StateError),
    /// The object store failed; the operation can be retried.
    #[error("object store: {0}")]
    Store(String),
}

#[derive(Debug, Clone)]
struct Lease {
    job: String,
    object: usize,
    round: u32,
    seed: i64,
    attempt: String,
    worker: String,
    deadline: Instant,
    staging_prefix: String,
}

#[derive(Debug)]
struct WorkerInfo {
    host: String,
    gpu: String,
    last_seen: Instant,
    /// Leases the worker must stop, reported on its next heartbeat.
    cancel: Vec<u64>,
    /// What the agent said of its GPU at Register.
    gpu_info: Option<pb::GpuInfo>,
    /// The last health sample and agent state from its heartbeats, shown in status. Acting on
    /// them (an unhealthy GPU stops acquiring) is the agent's job, not the coordinator's.
    health: Option<pb::GpuHealth>,
    agent_state: String,
}

#[derive(Default)]
struct Inner {
    jobs: BTreeMap<String, JobRt>,
    /// Jobs in submission order: rounds are handed out job-major, then object-major.
    order: Vec<String>,
    leases: HashMap<u64, Lease>,
    next_lease: u64,
    workers: HashMap<String, WorkerInfo>,
    next_worker: u64,
}

/// The coordinator service state shared by every RPC and background task.
pub struct Coordinator {
    state: Arc<dyn StateStore>,
    store: Store,
    cfg: CoordinatorConfig,
    epoch: u64,
    /// No new round of the jobs resumed at start is handed out before this instant (see
    /// `adopt_window`): only they can have rounds running on workers that are still to
    /// re-register. Jobs submitted later are not held back.
    adopt_until: Mutex<Instant>,
    /// The jobs resumed at start (only those wait for the adopt window).
    resumed: Mutex<std::collections::HashSet<String>>,
    inner: Mutex<Inner>,
    /// Bumped on every change a status watcher may care about.
    changed: watch::Sender<u64>,
    /// Woken when a round may have become available.
    work: Notify,
    /// Woken when a job's manifest should be rewritten.
    manifest_dirty: Notify,
    manifest_lock: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    /// Every background task (reaper, manifest writer, merges, status streams), so that
    /// `close` can wait for them and release the state store.
    tasks: TaskTracker,
    /// Trace contexts of the commits of each object (job, object index) since this process
    /// started, so that the object's `merge` span links to them. Empty when traces are off.
    commit_traces: Mutex<HashMap<(String, usize), Vec<String>>>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a worker is told to run.
pub struct Grant {
    pub lease: pb::Lease,
}

/// What a Complete carries besides its files.
#[derive(Debug, Clone, Default)]
pub struct CompleteExtras {
    /// GPU figures sampled while the generator ran.
    pub gpu_stats: Option<pb::RoundGpuStats>,
    /// The generator's log, uploaded under the attempt's staging prefix; empty when none.
    pub log_key: String,
    /// The generator's yield, from its sidecar.
    pub yield_stats: Option<pb::RoundYield>,
}

impl Coordinator {
    /// Opens the coordinator over its state and store, resumes every running job found in the
    /// state, and starts the background tasks (lease reaper, manifest writer). They stop when
    /// `shutdown` is cancelled.
    pub async fn start(
        cfg: CoordinatorConfig,
        state: Arc<dyn StateStore>,
        store: Store,
        shutdown: CancellationToken,
    ) -> Result<Arc<Coordinator>, CoordError> {
        let epoch = state.bump_epoch().await?;
        let (changed, _) = watch::channel(0);
        let c = Arc::new(Coordinator {
            state,
            store,
            adopt_until: Mutex::new(Instant::now()),
            resumed: Mutex::new(std::collections::HashSet::new()),
            cfg,
            epoch,
            inner: Mutex::new(Inner {
                // Lease ids carry the epoch, so that a lease adopted from a previous leader
                // never collides with one this coordinator issues.
                next_lease: (epoch << 32) | 1,
                next_worker: 1,
                ..Default::default()
            }),
            changed,
            work: Notify::new(),
            manifest_dirty: Notify::new(),
            manifest_lock: tokio::sync::Mutex::new(()),
            shutdown,
            tasks: TaskTracker::new(),
            commit_traces: Mutex::new(HashMap::new()),
        });
        let mut resumed = std::collections::HashSet::new();
        for job in c.state.list_jobs().await? {
            if job.state == JobState::Running {
                let id = job.id.clone();
                c.load_job(job).await?;
                resumed.insert(id);
            }
        }
        if !resumed.is_empty() && !c.cfg.adopt_window.is_zero() {
            *c.resumed.lock().unwrap_or_else(|p| p.into_inner()) = resumed;
            *c.adopt_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Instant::now() + c.cfg.adopt_window;
            info!(window = ?c.cfg.adopt_window, "resumed running jobs: waiting for workers to report their rounds before handing out new ones");
        }
        c.tasks.spawn(Arc::clone(&c).reaper());
        c.tasks.spawn(Arc::clone(&c).manifest_writer());
        info!(epoch, store = c.store.url(), "coordinator started");
        Ok(c)
    }

    /// Stops the background tasks and waits for them (a merge in progress finishes first), so
    /// that the state store is released when the last handle is dropped.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.state.close().await;
    }

    /// Runs `fut` as a tracked background task that `close` waits for.
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut);
    }

    /// Cancelled when the coordinator shuts down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug; keep serving with the data as it is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Creates the job, or resumes the stored job of that name if its plan is unchanged.
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
                let mut updated = stored.clone();
                // Fields that do not change the plan follow the newest submission.
                updated.spec = spec;
                if updated.state == JobState::Cancelled {
                    updated.state = JobState::Running;
                }
                if updated != stored {
                    self.state.update_job(&updated).await?;
                }
                (updated, false)
            }
        };
        let loaded = self.lock().jobs.contains_key(&id);
        if loaded {
            let mut inner = self.lock();
            if let Some(job) = inner.jobs.get_mut(&id) {
                job.spec = record.spec.clone();
                if job.state == JobState::Cancelled {
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

    async fn load_job(self: &Arc<Self>, record: JobRecord) -> Result<(), CoordError> {
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
            message: String::new(),
        };
        let id = record.id;
        let mut to_merge = Vec::new();
        for o in &mut job.objects {
            // Objects whose final was written but not cleaned up, or whose rounds already
            // cover the quota, go straight to merging.
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

    /// Registers an agent; `running` are rounds it still runs from a previous coordinator,
    /// adopted when they can still commit (answered in the returned list of lease ids to
    /// stop otherwise).
    pub fn register(
        &self,
        host: &str,
        gpu: &str,
        name: &str,
        gpu_info: Option<pb::GpuInfo>,
        running: &[pb::Lease],
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
    fn adopt(&self, worker: &str, l: &pb::Lease) -> bool {
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
        gpu_info: Option<pb::GpuInfo>,
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
        health: Option<pb::GpuHealth>,
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
                let lease = pb::Lease {
                    lease_id,
                    job_id: id.clone(),
                    object: o.name.clone(),
                    object_index: idx as u32,
                    round,
                    seed,
                    attempt: attempt.clone(),
                    round_name: name,
                    task: Some(task),
                    // Filled in by the service from its `lease` span.
                    traceparent: String::new(),
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

    fn take_lease(&self, worker: &str, lease_id: u64) -> Option<Lease> {
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
    fn settle(&self, lease: &Lease) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.get_mut(&lease.job) {
            job.objects[lease.object].lease_ended(lease.round);
        }
    }

    /// Commits a finished attempt: the first commit of a round wins; a loser's files are
    /// deleted. Outputs whose schema disagrees with the object's earlier rounds count as a
    /// failed attempt.
    pub async fn complete(
        self: &Arc<Self>,
        worker: &str,
        lease_id: u64,
        files: Vec<pb::UploadedFile>,
        generator_ms: u64,
        extras: CompleteExtras,
    ) -> Result<(pb::CommitOutcome, String), CoordError> {
        let started = Instant::now();
        // A losing attempt's log goes with its outputs.
        let mut doomed = files.clone();
        if !extras.log_key.is_empty() {
            doomed.push(pb::UploadedFile {
                key: extras.log_key.clone(),
                ..Default::default()
            });
        }
        let Some(lease) = self.take_lease(worker, lease_id) else {
            self.cfg.metrics.rounds_duplicate.inc();
            // Expired (and re-issued) or from a previous coordinator: it cannot commit.
            self.delete_files(None, &doomed).await;
            return Ok((
                pb::CommitOutcome::Duplicate,
                "lease expired or unknown; files deleted".into(),
            ));
        };
        if files.is_empty() {
            self.fail_lease(
                lease,
                "output_missing",
                "worker reported no files".into(),
                String::new(),
            )
            .await;
            return Ok((pb::CommitOutcome::Rejected, "no files".into()));
        }
        let known = {
            let inner = self.lock();
            inner.jobs.get(&lease.job).map(|job| {
                let o = &job.objects[lease.object];
                (
                    o.name.clone(),
                    o.schema().map(str::to_string),
                    o.phase == Phase::Running,
                    job.spec.merge.filter.is_some(),
                )
            })
        };
        {
            // The caller's `commit` span (see service.rs) names the round it commits.
            let span = tracing::Span::current();
            span.record("job", lease.job.as_str());
            span.record("round", lease.round);
            span.record("seed", lease.seed);
            span.record("attempt", lease.attempt.as_str());
            if let Some((name, ..)) = &known {
                span.record("object", name.as_str());
            }
        }
        let (object_name, schema, filtered) = match known {
            Some((name, schema, true, filtered)) => (name, schema, filtered),
            // The object's final is fixed (merging or merged; its staging is being or was
            // deleted): a round that finishes now, e.g. one a worker prefetched, is surplus.
            Some((_, _, false, _)) | None => {
                self.cfg.metrics.rounds_duplicate.inc();
                self.settle(&lease);
                self.delete_files(Some(&lease), &doomed).await;
                return Ok((
                    pb::CommitOutcome::Duplicate,
                    "object already merged; files deleted".into(),
                ));
            }
        };
        for f in &files {
            if !f.key.starts_with(&format!("{}/", lease.staging_prefix)) {
                self.fail_lease(
                    lease.clone(),
                    "output_invalid",
                    format!(
                        "file key {:?} is outside the attempt's staging prefix",
                        f.key
                    ),
                    String::new(),
                )
                .await;
                return Ok((pb::CommitOutcome::Rejected, "bad key".into()));
            }
        }
        // What the worker reported must be what the store holds: a file cut short or
        // corrupted between the worker's hash and the store is a failed attempt, not a commit.
        for f in &files {
            let problem = match self.store.hash_object(&f.key).await {
                Ok(Some(got)) if got.size == f.size && got.sha256 == f.sha256 => None,
                Ok(Some(got)) => Some(format!(
                    "file {:?} in the store has {} bytes, sha256 {}; the worker reported {} bytes, sha256 {}",
                    f.key, got.size, got.sha256, f.size, f.sha256
                )),
                Ok(None) => Some(format!("file {:?} is not in the store", f.key)),
                Err(e) => {
                    self.cfg.metrics.store_errors.inc();
                    // The store did not answer: retry the round rather than judge the files.
                    warn!(job = %lease.job, round = lease.round, error = %e, "cannot verify uploaded files");
                    self.requeue(&lease);
                    return Err(CoordError::Store(e.to_string()));
                }
            };
            if let Some(msg) = problem {
                self.delete_files(Some(&lease), &files).await;
                self.fail_lease(lease, "output_invalid", msg.clone(), String::new())
                    .await;
                return Ok((pb::CommitOutcome::Rejected, msg));
            }
        }
        if let Some(expected) = schema
            && !crate::job::schema_compatible(&expected, &files[0].schema)
        {
            let msg = format!(
                "output schema `{}` disagrees with the object's earlier rounds (`{expected}`)",
                files[0].schema
            );
            self.delete_files(Some(&lease), &doomed).await;
            self.fail_lease(lease, "schema_mismatch", msg.clone(), String::new())
                .await;
            return Ok((pb::CommitOutcome::Rejected, msg));
        }
        let record = CommitRecord {
            round: lease.round,
            seed: lease.seed,
            attempt: lease.attempt.clone(),
            count: files[0].count,
            files: files
                .iter()
                .map(|f| FileRecord {
                    name: f.name.clone(),
                    key: f.key.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                    count: f.count,
                    schema: f.schema.clone(),
                    kept: f.kept,
                })
                .collect(),
            worker: worker.to_string(),
            generator_ms,
            committed_unix_ms: unix_ms(),
            gpu: extras.gpu_stats.map(|g| RoundGpuStats {
                utilization_mean_pct: g.utilization_mean_pct,
                memory_peak_mib: g.memory_peak_mib,
                samples: g.samples,
            }),
            // Only a key inside the attempt's staging is recorded (and later deleted with it).
            log_key: Some(extras.log_key)
                .filter(|k| k.starts_with(&format!("{}/", lease.staging_prefix))),
            // Without a filter every sample counts: a worker's `kept` is ignored then.
            kept: files[0].kept.filter(|_| filtered),
            yield_stats: extras.yield_stats.map(|y| RoundYield {
                attempts: y.attempts,
                successes: y.successes,
            }),
        };
        match self
            .state
            .commit_round(&lease.job, &object_name, &record)
            .await
        {
            Ok(CommitOutcome::Committed) => {}
            // Our own commit, applied by an earlier try whose answer was lost.
            Ok(CommitOutcome::AlreadyCommitted(existing)) if existing.attempt == record.attempt => {
            }
            Ok(CommitOutcome::AlreadyCommitted(_)) | Ok(CommitOutcome::Quarantined) => {
                self.cfg.metrics.rounds_duplicate.inc();
                self.settle(&lease);
                self.delete_files(Some(&lease), &doomed).await;
                return Ok((
                    pb::CommitOutcome::Duplicate,
                    "round already resolved; files deleted".into(),
                ));
            }
            Err(e) => {
                // Unknown whether it was applied: put the round back so it is retried; if
                // the commit did land, the retry's commit will be refused as a duplicate.
                warn!(job = %lease.job, round = lease.round, error = %e, "commit failed");
                self.requeue(&lease);
                return Err(e.into());
            }
        }
        debug!(job = %lease.job, object = %object_name, round = lease.round, count = record.count, "round committed");
        if let Some(tp) = quarry_common::telemetry::current_traceparent() {
            self.commit_traces
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((lease.job.clone(), lease.object))
                .or_default()
                .push(tp);
        }
        self.cfg.metrics.rounds_committed.inc();
        self.cfg.metrics.samples_committed.add(record.count as f64);
        self.cfg
            .metrics
            .commit_seconds
            .observe_duration(started.elapsed());
        let merge_now = {
            let mut inner = self.lock();
            let Inner {
                jobs,
                leases,
                workers,
                ..
            } = &mut *inner;
            let Some(job) = jobs.get_mut(&lease.job) else {
                return Ok((pb::CommitOutcome::Committed, String::new()));
            };
            job.generator_ms += generator_ms;
            job.samples_this_session += record.count;
            let o = &mut job.objects[lease.object];
            o.apply_commit(record);
            o.lease_ended(lease.round);
            // Other attempts of this round are now pointless: tell their workers to stop.
            // (Only looked for when the round still has leases: rare, and a scan of them all.)
            if o.in_flight.contains_key(&lease.round) {
                for (id, l) in leases.iter() {
                    if l.job == lease.job
                        && l.object == lease.object
                        && l.round == lease.round
                        && let Some(w) = workers.get_mut(&l.worker)
                    {
                        w.cancel.push(*id);
                    }
                }
            }
            o.merge_plan(&job.spec).is_some()
        };
        if merge_now {
            self.start_merge(&lease.job, lease.object);
        }
        self.work.notify_waiters();
        self.manifest_dirty.notify_one();
        self.bump();
        Ok((pb::CommitOutcome::Committed, String::new()))
    }

    /// A failed attempt reported by its worker.
    pub async fn fail(
        self: &Arc<Self>,
        worker: &str,
        lease_id: u64,
        kind: &str,
        message: String,
        log_tail: String,
    ) {
        if let Some(lease) = self.take_lease(worker, lease_id) {
            self.fail_lease(lease, kind, message, log_tail).await;
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
    fn requeue(&self, lease: &Lease) {
        let mut inner = self.lock();
        if let Some(job) = inner.jobs.get_mut(&lease.job) {
            let o = &mut job.objects[lease.object];
            o.lease_ended(lease.round);
            o.requeue(lease.round, Instant::now());
        }
        drop(inner);
        self.work.notify_waiters();
    }

    async fn fail_lease(
        self: &Arc<Self>,
        lease: Lease,
        kind: &str,
        message: String,
        log_tail: String,
    ) {
        let (object, retries, backoff_ms) = {
            let inner = self.lock();
            let Some(job) = inner.jobs.get(&lease.job) else {
                return;
            };
            (
                job.objects[lease.object].name.clone(),
                job.spec.retries,
                job.spec.retry_backoff_ms,
            )
        };
        warn!(job = %lease.job, %object, round = lease.round, attempt = %lease.attempt, kind, %message, "attempt failed");
        self.cfg.metrics.failed(kind);
        let failure = FailureRecord {
            attempt: lease.attempt.clone(),
            kind: kind.to_string(),
            message: message.clone(),
            log_tail: log_tail.clone(),
            worker: lease.worker.clone(),
            unix_ms: unix_ms(),
        };
        let failures = match self
            .state
            .record_failure(&lease.job, &object, lease.round, &failure)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "could not record a failure; retrying the round");
                self.requeue(&lease);
                return;
            }
        };
        if failures > retries {
            let q = QuarantineRecord {
                round: lease.round,
                seed: lease.seed,
                reason: format!("{kind}: {message}"),
                log_tail,
                attempts: failures,
                unix_ms: unix_ms(),
            };
            match self.state.quarantine_round(&lease.job, &object, &q).await {
                Ok(QuarantineOutcome::Quarantined) | Ok(QuarantineOutcome::AlreadyQuarantined) => {
                    warn!(job = %lease.job, %object, round = lease.round, failures, "round quarantined");
                    self.cfg.metrics.rounds_quarantined.inc();
                    let (merge_now, broken) = {
                        let mut inner = self.lock();
                        let Some(job) = inner.jobs.get_mut(&lease.job) else {
                            return;
                        };
                        let o = &mut job.objects[lease.object];
                        o.lease_ended(lease.round);
                        o.apply_failure(lease.round, failures);
                        o.apply_quarantine(q.clone());
                        let merge_now = o.merge_plan(&job.spec).is_some();
                        (
                            merge_now,
                            job.state == JobState::Running && job.generator_broken(),
                        )
                    };
                    if broken {
                        let why = format!(
                            "stopped: the first {} rounds to finish all failed and none succeeded; the generator looks broken. Last failure ({} r{}): {}",
                            crate::job::FAILING_JOB_QUARANTINES,
                            object,
                            lease.round,
                            q.reason
                        );
                        self.stop_job(&lease.job, why).await;
                    } else if merge_now {
                        self.start_merge(&lease.job, lease.object);
                    }
                }
                Ok(QuarantineOutcome::AlreadyCommitted(_)) => self.settle(&lease),
                Err(e) => {
                    warn!(error = %e, "could not quarantine; retrying the round");
                    self.requeue(&lease);
                }
            }
        } else {
            let mut inner = self.lock();
            if let Some(job) = inner.jobs.get_mut(&lease.job) {
                let o = &mut job.objects[lease.object];
                o.lease_ended(lease.round);
                o.apply_failure(lease.round, failures);
                o.schedule_retry(lease.round, Instant::now() + backoff(backoff_ms, failures));
            }
        }
        self.work.notify_waiters();
        self.manifest_dirty.notify_one();
        self.bump();
    }

    /// Deletes an attempt's uploaded files, refusing keys outside its staging prefix.
    async fn delete_files(&self, lease: Option<&Lease>, files: &[pb::UploadedFile]) {
        for f in files {
            let inside = match lease {
                Some(l) => f.key.starts_with(&format!("{}/", l.staging_prefix)),
                // Without a lease only staging-shaped keys are touched, and never the files
                // of a round's committed attempt (whatever a confused worker reports) nor of a
                // round with a lease still out or being judged (a repeated report must not
                // delete what the first report is about to commit); staging left here goes
                // with the object's cleanup after its merge.
                None => {
                    f.key.split('/').nth(1) == Some("rounds") && !self.is_protected_file(&f.key)
                }
            };
            if inside && let Err(e) = self.store.delete(&f.key).await {
                warn!(key = %f.key, error = %e, "could not delete a losing attempt's file");
            }
        }
    }

    /// Whether `key` (`<job>/rounds/<object>/r<round>_s<seed>/<attempt>/<file>`) belongs to the
    /// committed attempt of its round, or to a round still in flight.
    fn is_protected_file(&self, key: &str) -> bool {
        let parts: Vec<&str> = key.split('/').collect();
        let [job, "rounds", object, round_dir, attempt, ..] = parts.as_slice() else {
            return false;
        };
        let Some(round) = round_dir
            .strip_prefix('r')
            .and_then(|r| r.split('_').next())
            .and_then(|r| r.parse::<u32>().ok())
        else {
            return false;
        };
        let inner = self.lock();
        inner
            .jobs
            .get(*job)
            .and_then(|j| j.objects.iter().find(|o| o.name == *object))
            .is_some_and(|o| {
                o.in_flight.contains_key(&round)
                    || o.commits.get(&round).is_some_and(|c| c.attempt == *attempt)
            })
    }

    fn start_merge(self: &Arc<Self>, job_id: &str, object: usize) {
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
            // Rounds of the object still running are surplus now: tell their workers to stop.
            let Inner {
                leases, workers, ..
            } = &mut *inner;
            for (id, l) in leases.iter() {
                if l.job == job_id
                    && l.object == object
                    && let Some(w) = workers.get_mut(&l.worker)
                {
                    w.cancel.push(*id);
                }
            }
            let job = &inner.jobs[job_id];
            (job.spec.clone(), plan, job.objects[object].name.clone())
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

    async fn finish_job(self: &Arc<Self>, job_id: &str) {
        let record = {
            let mut inner = self.lock();
            let Some(job) = inner.jobs.get_mut(job_id) else {
                return;
            };
            job.state = job.end_state();
            JobRecord {
                id: job_id.to_string(),
                spec: job.spec.clone(),
                created_unix_ms: job.created_unix_ms,
                state: job.state,
            }
        };
        if let Err(e) = self.state.update_job(&record).await {
            warn!(job = %job_id, error = %e, "could not store the job's end state");
        }
        if !record.spec.keep_intermediate {
            let prefix = format!("{job_id}/rounds");
            if let Err(e) = self.store.delete_prefix(&prefix).await {
                warn!(job = %job_id, error = %e, "could not remove leftover staging");
            }
        }
        self.write_manifest(job_id).await;
        info!(job = %job_id, state = ?record.state, "job finished");
        self.bump();
    }

    /// Stops a job on the coordinator's own decision, saying why in its status.
    async fn stop_job(&self, job_id: &str, why: String) {
        warn!(job = %job_id, "{why}");
        if let Some(job) = self.lock().jobs.get_mut(job_id) {
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
            for (id, l) in inner.leases.iter() {
                if l.job == job_id
                    && let Some(w) = inner.workers.get_mut(&l.worker)
                {
                    w.cancel.push(*id);
                }
            }
            JobRecord {
                id: job_id.into(),
                spec: job.spec.clone(),
                created_unix_ms: job.created_unix_ms,
                state: JobState::Cancelled,
            }
        };
        self.state.update_job(&record).await?;
        self.write_manifest(job_id).await;
        self.bump();
        Ok(())
    }

    /// Re-issues leases whose worker stopped renewing them.
    async fn reaper(self: Arc<Self>) {
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
                let mut out = Vec::new();
                for id in ids {
                    // Settled by `fail_lease` below, once the failure is applied.
                    if let Some(l) = inner.leases.remove(&id) {
                        out.push(l);
                    }
                }
                out
            };
            self.refresh_gauges();
            for l in expired {
                self.cfg.metrics.lease_expiries.inc();
                let msg = format!(
                    "lease not renewed by worker {} within {:?}",
                    l.worker, self.cfg.lease_ttl
                );
                self.fail_lease(l, "lease_expired", msg, String::new())
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

    async fn manifest_writer(self: Arc<Self>) {
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
        match serde_json::to_vec_pretty(&doc) {
            Ok(bytes) => {
                if let Err(e) = self.store.put_bytes(&keys::manifest(job_id), bytes).await {
                    warn!(job = %job_id, error = %e, "could not write the manifest");
                }
            }
            Err(e) => warn!(job = %job_id, error = %e, "could not encode the manifest"),
        }
    }

    /// A status snapshot of one job.
    pub fn status(&self, job_id: &str) -> Result<pb::JobStatus, CoordError> {
        let inner = self.lock();
        let job = inner
            .jobs
            .get(job_id)
            .ok_or_else(|| CoordError::JobNotFound(job_id.into()))?;
        Ok(self.status_of(&inner, job_id, job))
    }

    pub fn list(&self) -> Vec<pb::JobStatus> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .filter_map(|id| inner.jobs.get(id).map(|j| self.status_of(&inner, id, j)))
            .collect()
    }

    /// Whether the job has ended (done, incomplete or cancelled).
    pub fn job_ended(&self, job_id: &str) -> bool {
        self.lock()
            .jobs
            .get(job_id)
            .is_none_or(|j| j.state != JobState::Running)
    }

    fn status_of(&self, inner: &Inner, job_id: &str, job: &JobRt) -> pb::JobStatus {
        let quota = job.spec.target_count_per_object;
        let objects: Vec<pb::ObjectStatus> = job
            .objects
            .iter()
            .map(|o| pb::ObjectStatus {
                name: o.name.clone(),
                state: match o.phase {
                    Phase::Running if o.commits.is_empty() && o.in_flight.is_empty() => {
                        pb::ObjectState::Pending
                    }
                    Phase::Running => pb::ObjectState::Running,
                    Phase::Merging => pb::ObjectState::Merging,
                    Phase::Done { complete: true } => pb::ObjectState::Done,
                    Phase::Done { complete: false } => pb::ObjectState::Exhausted,
                } as i32,
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
        let mut workers: Vec<pb::WorkerStatus> = inner
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
                pb::WorkerStatus {
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
        pb::JobStatus {
            job_id: job_id.to_string(),
            state: match job.state {
                JobState::Running => pb::JobState::Running,
                JobState::Done => pb::JobState::Done,
                JobState::Incomplete => pb::JobState::Incomplete,
                JobState::Cancelled => pb::JobState::Cancelled,
            } as i32,
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
        }
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
) -> pb::Task {
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
    pb::Task {
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
            .map(|(k, v)| pb::EnvVar {
                name: k.clone(),
                value: render(v, &vars),
            })
            .collect(),
        outputs: vec![pb::OutputFile {
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
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::state::embedded::EmbeddedStore;
    use sha2::Digest;
    use std::collections::HashSet;

    fn spec(root: &std::path::Path) -> JobSpec {
        let mut s: JobSpec = serde_json::from_value(serde_json::json!({
            "exp_name": "verify",
            "objects": ["a"],
            "target_count_per_object": 10,
            "round_batch_size": 10,
            "retry_backoff_ms": 1,
            "root": root,
            "generator": serde_json::to_value(JobSpec::legacy_generator()).unwrap(),
        }))
        .unwrap();
        s.retry_backoff_ms = 1;
        s
    }

    /// A worker whose report does not match what the store holds (a file changed or cut
    /// short after it was hashed) gets its attempt rejected and recorded as failed; a correct
    /// report of the retried round commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_adopt_window_holds_back_resumed_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = Store::open_dir(&dir.path().join("store")).unwrap();
        let first = Coordinator::start(
            CoordinatorConfig::default(),
            Arc::new(EmbeddedStore::open(&path).unwrap()),
            store.clone(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        first.submit(spec(dir.path())).await.unwrap();
        first.close().await;
        // A new leader resumes "verify" and waits for its rounds to be reported ...
        let cfg = CoordinatorConfig {
            adopt_window: Duration::from_secs(30),
            ..Default::default()
        };
        let c = Coordinator::start(
            cfg,
            Arc::new(EmbeddedStore::open(&path).unwrap()),
            store,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let (worker, _) = c.register("host", "0", "", None, &[]);
        let none = c
            .acquire(&worker, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(none.is_none(), "the resumed job waits for the adopt window");
        // ... but a job submitted now has nothing to adopt and starts at once.
        let mut fresh = spec(dir.path());
        fresh.exp_name = "fresh".into();
        c.submit(fresh).await.unwrap();
        let got = c
            .acquire(&worker, Duration::from_secs(5))
            .await
            .unwrap()
            .expect("the new job's round is handed out during the window");
        assert_eq!(got.lease.job_id, "fresh");
        c.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_whose_files_differ_from_the_report_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let state = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        let store = Store::open_dir(&dir.path().join("store")).unwrap();
        let c = Coordinator::start(
            CoordinatorConfig::default(),
            Arc::new(state),
            store.clone(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        c.submit(spec(dir.path())).await.unwrap();
        let (worker, refused) = c.register("host", "0", "", None, &[]);
        assert!(refused.is_empty());

        let first = c
            .acquire(&worker, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        let files = upload(
            &store,
            &first.lease,
            b"what the store holds",
            b"what the worker hashed",
        )
        .await;
        let (outcome, msg) = c
            .complete(
                &worker,
                first.lease.lease_id,
                files,
                1,
                CompleteExtras::default(),
            )
            .await
            .unwrap();
        assert_eq!(outcome, pb::CommitOutcome::Rejected, "{msg}");
        assert!(msg.contains("sha256"), "{msg}");
        let st = c.status("verify").unwrap();
        assert_eq!((st.failed_attempts, st.rounds_committed), (1, 0));

        // The round is retried; an honest report commits it.
        let retry = c
            .acquire(&worker, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(retry.lease.round, first.lease.round);
        let files = upload(&store, &retry.lease, b"same bytes", b"same bytes").await;
        let (outcome, msg) = c
            .complete(
                &worker,
                retry.lease.lease_id,
                files,
                1,
                CompleteExtras::default(),
            )
            .await
            .unwrap();
        assert_eq!(outcome, pb::CommitOutcome::Committed, "{msg}");
        c.close().await;
    }

    /// The race of a slow attempt: its lease expires, the round is re-leased and committed by
    /// another worker, and then the slow one reports. It is refused as a duplicate and its
    /// files are deleted; the round keeps the second attempt's commit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_attempt_after_the_round_was_recommitted_is_rejected_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let state = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        let store = Store::open_dir(&dir.path().join("store")).unwrap();
        let cfg = CoordinatorConfig {
            lease_ttl: Duration::from_millis(200),
            ..Default::default()
        };
        let c = Coordinator::start(
            cfg,
            Arc::new(state),
            store.clone(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        c.submit(spec(dir.path())).await.unwrap();
        let (slow, _) = c.register("host", "0", "slow", None, &[]);
        let (fast, _) = c.register("host", "1", "fast", None, &[]);
        let stale = c
            .acquire(&slow, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap()
            .lease;
        let stale_files = upload(&store, &stale, b"slow attempt", b"slow attempt").await;
        // No heartbeat from the slow worker: the reaper expires its lease and the round is
        // retried (after the spec's 1 ms backoff) by the fast worker, which commits it.
        let until = Instant::now() + Duration::from_secs(10);
        let retry = loop {
            if let Some(g) = c.acquire(&fast, Duration::from_millis(100)).await.unwrap() {
                break g.lease;
            }
            assert!(
                Instant::now() < until,
                "the expired round was never re-leased"
            );
        };
        assert_eq!((retry.round, retry.seed), (stale.round, stale.seed));
        assert_ne!(retry.attempt, stale.attempt);
        let files = upload(&store, &retry, b"fast attempt", b"fast attempt").await;
        let (outcome, _) = c
            .complete(&fast, retry.lease_id, files, 1, CompleteExtras::default())
            .await
            .unwrap();
        assert_eq!(outcome, pb::CommitOutcome::Committed);

        // A confused report naming the committed attempt's file deletes nothing.
        let committed_key = files_key(&retry);
        let mut confused = stale_files.clone();
        confused[0].key = committed_key.clone();
        let (outcome, _) = c
            .complete(
                &slow,
                stale.lease_id + 1_000,
                confused,
                1,
                CompleteExtras::default(),
            )
            .await
            .unwrap();
        assert_eq!(outcome, pb::CommitOutcome::Duplicate);
        assert!(store.get_bytes(&committed_key).await.unwrap().is_some());

        let (outcome, msg) = c
            .complete(
                &slow,
                stale.lease_id,
                stale_files.clone(),
                1,
                CompleteExtras::default(),
            )
            .await
            .unwrap();
        assert_eq!(outcome, pb::CommitOutcome::Duplicate, "{msg}");
        assert!(
            store
                .get_bytes(&stale_files[0].key)
                .await
                .unwrap()
                .is_none(),
            "the stale attempt's file is still in the store"
        );
        let st = c.status("verify").unwrap();
        assert_eq!(st.rounds_committed, 1);
        let rec = c.state.load_object("verify", "a").await.unwrap();
        assert_eq!(rec.commits[&retry.round].attempt, retry.attempt);
        c.close().await;
    }

    /// A batch Acquire hands out exactly the rounds, in the order, that single calls would,
    /// and never more than the bound per call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_acquire_takes_what_single_acquires_would() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = spec(dir.path());
        job.objects = vec!["a".into(), "b".into()];
        job.target_count_per_object = 40; // 4 rounds of 10 per object
        let start = |name: &str| {
            let path = dir.path().join(name);
            async move {
                Coordinator::start(
                    CoordinatorConfig::default(),
                    Arc::new(EmbeddedStore::open(&path).unwrap()),
                    Store::in_memory(),
                    CancellationToken::new(),
                )
                .await
                .unwrap()
            }
        };
        let key = |l: &pb::Lease| (l.object.clone(), l.round, l.seed, l.task.clone());
        let single = start("single.redb").await;
        single.submit(job.clone()).await.unwrap();
        let (w, _) = single.register("host", "0", "", None, &[]);
        let mut one_by_one = Vec::new();
        while let Some(g) = single.acquire(&w, Duration::from_millis(50)).await.unwrap() {
            one_by_one.push(key(&g.lease));
        }
        assert_eq!(one_by_one.len(), 8);

        let batched = start("batched.redb").await;
        batched.submit(job.clone()).await.unwrap();
        let (w, _) = batched.register("host", "0", "", None, &[]);
        let (mut sizes, mut together, mut ids) = (Vec::new(), Vec::new(), HashSet::new());
        loop {
            let grants = batched
                .acquire_many(&w, 3, Duration::from_millis(50))
                .await
                .unwrap();
            if grants.is_empty() {
                break;
            }
            sizes.push(grants.len());
            for g in grants {
                assert!(ids.insert(g.lease.lease_id), "lease ids are distinct");
                together.push(key(&g.lease));
            }
        }
        assert_eq!(sizes, [3, 3, 2]);
        assert_eq!(together, one_by_one);
        single.close().await;
        batched.close().await;

        // However many are asked for, one call grants at most MAX_ROUNDS_PER_CALL.
        job.exp_name = "big".into();
        job.objects = vec!["a".into()];
        job.target_count_per_object = 10 * 100;
        let big = start("big.redb").await;
        big.submit(job).await.unwrap();
        let (w, _) = big.register("host", "0", "", None, &[]);
        let grants = big
            .acquire_many(&w, 1000, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(grants.len(), MAX_ROUNDS_PER_CALL);
        big.close().await;
    }

    /// CompleteBatch over real gRPC: each completion is judged alone (a commit, a rejection
    /// for a file that differs from the report, a duplicate for a lease named twice or
    /// unknown), and a repeat never deletes what its first mention commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_complete_batch_judges_each_completion_alone() {
        use quarry_common::transport::{ClientSecurity, ServerSecurity};
        use quarry_proto::v1::worker_service_client::WorkerServiceClient;

        let dir = tempfile::tempdir().unwrap();
        let state = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
        let store = Store::open_dir(&dir.path().join("store")).unwrap();
        let stop = CancellationToken::new();
        let c = Coordinator::start(
            CoordinatorConfig::default(),
            Arc::new(state),
            store.clone(),
            stop.child_token(),
        )
        .await
        .unwrap();
        let mut job = spec(dir.path());
        job.target_count_per_object = 30;
        c.submit(job).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(crate::service::serve(
            crate::service::Leadership::leading(Arc::clone(&c)),
            listener,
            ServerSecurity::default(),
            stop.clone(),
        ));
        let mut client = WorkerServiceClient::new(ClientSecurity::plain().channel(&addr).unwrap());
        let worker_id = client
            .register(pb::RegisterRequest {
                host: "h".into(),
                gpu: "0".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .worker_id;
        let got = client
            .acquire(pb::AcquireRequest {
                worker_id: worker_id.clone(),
                wait_ms: 5000,
                max_leases: 3,
            })
            .await
            .unwrap()
            .into_inner();
        let leases: Vec<pb::Lease> = got.lease.into_iter().chain(got.more).collect();
        assert_eq!(leases.len(), 3);
        let report = |lease: &pb::Lease, files: Vec<pb::UploadedFile>| pb::CompleteRequest {
            worker_id: worker_id.clone(),
            lease_id: lease.lease_id,
            files,
            generator_ms: 1,
            ..Default::default()
        };
        let good0 = upload(&store, &leases[0], b"round bytes", b"round bytes").await;
        let bad1 = upload(&store, &leases[1], b"stored", b"hashed").await;
        let good2 = upload(&store, &leases[2], b"more bytes", b"more bytes").await;
        let mut unknown = report(&leases[0], good0.clone());
        unknown.lease_id = 999_999;
        let completions = vec![
            report(&leases[0], good0.clone()),
            report(&leases[1], bad1),
            report(&leases[2], good2.clone()),
            report(&leases[0], good0.clone()),
            unknown,
        ];
        let results = client
            .complete_batch(pb::CompleteBatchRequest { completions })
            .await
            .unwrap()
            .into_inner()
            .results;
        let outcomes: Vec<pb::CommitOutcome> = results
            .iter()
            .map(|r| r.response.as_ref().unwrap().outcome())
            .collect();
        use pb::CommitOutcome::{Committed, Duplicate, Rejected};
        assert_eq!(
            outcomes,
            [Committed, Rejected, Committed, Duplicate, Duplicate]
        );
        let st = c.status("verify").unwrap();
        assert_eq!((st.rounds_committed, st.failed_attempts), (2, 1));
        // The committed attempts' files are intact, the repeat of round 0 included (round 1
        // is still to be retried, so no merge has consumed them yet).
        for files in [&good0, &good2] {
            let held = store.hash_object(&files[0].key).await.unwrap();
            assert_eq!(held.map(|h| h.sha256), Some(files[0].sha256.clone()));
        }

        // Too many completions in one call is refused as a whole, naming the bound.
        let many = (0..MAX_ROUNDS_PER_CALL + 1)
            .map(|_| report(&leases[0], good0.clone()))
            .collect();
        let err = client
            .complete_batch(pb::CompleteBatchRequest { completions: many })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("at most"), "{}", err.message());
        stop.cancel();
        let _ = server.await;
        c.close().await;
    }

    /// Puts `stored` at the lease's staging key and returns the report of a worker that
    /// hashed `reported`.
    async fn upload(
        store: &Store,
        lease: &pb::Lease,
        stored: &'static [u8],
        reported: &'static [u8],
    ) -> Vec<pb::UploadedFile> {
        let key = files_key(lease);
        store.put_bytes(&key, stored).await.unwrap();
        vec![pb::UploadedFile {
            name: "a.npy".into(),
            key,
            size: reported.len() as u64,
            sha256: hex(&sha2::Sha256::digest(reported)),
            count: 10,
            schema: "npy <f4 (*, 3)".into(),
            kept: None,
        }]
    }

    fn files_key(lease: &pb::Lease) -> String {
        format!("{}/a.npy", lease.task.as_ref().unwrap().staging_prefix)
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
