//! Outcomes applied: a completion is judged (`judgement.rs`) and committed exactly once, or
//! rejected as a failed attempt; failed attempts are retried with backoff and quarantined past
//! the job's retries; a losing attempt's files are deleted. What a round commits (its sample
//! count, schema, filtered count) is read back from the stored bytes (`rederive.rs`), never
//! taken on the worker's word alone.

pub(super) mod rederive;

use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, warn};

use super::judgement::{self, Attempt, Rejection};
use super::{
    CompleteExtras, CoordError, Coordinator, FailureKind, Inner, Lease, ReportedFile, Verdict,
    unix_ms,
};
use crate::job::{Phase, backoff};
use crate::state::{CommitOutcome, FailureRecord, JobState, QuarantineOutcome, QuarantineRecord};

impl Coordinator {
    /// Commits a finished attempt: the first commit of a round wins; a loser's files are
    /// deleted. Outputs whose schema disagrees with the object's earlier rounds count as a
    /// failed attempt.
    pub async fn complete(
        self: &Arc<Self>,
        worker: &str,
        lease_id: u64,
        files: Vec<ReportedFile>,
        generator_ms: u64,
        extras: CompleteExtras,
    ) -> Result<(Verdict, String), CoordError> {
        let started = Instant::now();
        // A losing attempt's log goes with its outputs.
        let mut doomed = files.clone();
        if !extras.log_key.is_empty() {
            doomed.push(ReportedFile {
                key: extras.log_key.clone(),
                ..empty_file()
            });
        }
        let Some(lease) = self.take_lease(worker, lease_id) else {
            self.cfg.metrics.rounds_duplicate.inc();
            // Expired (and re-issued) or from a previous coordinator: it cannot commit.
            self.delete_files(None, &doomed).await;
            return Ok((
                Verdict::Duplicate,
                "lease expired or unknown; files deleted".into(),
            ));
        };
        if let Err(r) = judgement::check_present(&files) {
            self.fail_lease(lease, r.kind, r.message, String::new())
                .await;
            return Ok((Verdict::Rejected, "no files".into()));
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
                    (job.spec.format().ok(), job.spec.merge.parsed_filter()),
                )
            })
        };
        {
            // The caller's `commit` span (see service/) names the round it commits.
            let span = tracing::Span::current();
            span.record("job", lease.job.as_str());
            span.record("round", lease.round);
            span.record("seed", lease.seed);
            span.record("attempt", lease.attempt.as_str());
            if let Some((name, ..)) = &known {
                span.record("object", name.as_str());
            }
        }
        let (object_name, schema, filtered, (format, filter)) = match known {
            Some((name, schema, true, filtered, how)) => (name, schema, filtered, how),
            // The object's final is fixed (merging or merged; its staging is being or was
            // deleted): a round that finishes now, e.g. one a worker prefetched, is surplus.
            Some((_, _, false, _, _)) | None => {
                self.cfg.metrics.rounds_duplicate.inc();
                self.settle(&lease);
                self.delete_files(Some(&lease), &doomed).await;
                return Ok((
                    Verdict::Duplicate,
                    "object already merged; files deleted".into(),
                ));
            }
        };
        if let Err(r) = judgement::check_report(&files, &lease.staging_prefix) {
            self.fail_lease(lease.clone(), r.kind, r.message, String::new())
                .await;
            return Ok((Verdict::Rejected, "bad key".into()));
        }
        // A remote store's first file, small enough to inspect whole, is read once: copied
        // into scratch and hashed on the way; the check below and the inspection use the copy.
        let mut first = match format {
            Some(_) => match rederive::fetch(&self.store, &files[0].key, files[0].size).await {
                Ok(copy) => copy,
                Err(
                    rederive::DeriveError::Infrastructure(e) | rederive::DeriveError::Invalid(e),
                ) => {
                    self.cfg.metrics.store_errors.inc();
                    warn!(job = %lease.job, round = lease.round, error = %e, "cannot verify uploaded files");
                    self.requeue(&lease);
                    return Err(CoordError::Store(e));
                }
            },
            None => None,
        };
        for (i, f) in files.iter().enumerate() {
            let fetched = first.as_ref().filter(|_| i == 0).map(|c| c.held.clone());
            let held = match fetched {
                Some(held) => Ok(held),
                None => self.store.hash_object(&f.key).await,
            };
            let held = match held {
                Ok(held) => held,
                Err(e) => {
                    self.cfg.metrics.store_errors.inc();
                    // The store did not answer: retry the round rather than judge the files.
                    warn!(job = %lease.job, round = lease.round, error = %e, "cannot verify uploaded files");
                    self.requeue(&lease);
                    return Err(CoordError::Store(e.to_string()));
                }
            };
            if let Err(Rejection { kind, message }) = judgement::check_stored(f, held.as_ref()) {
                self.delete_files(Some(&lease), &files).await;
                self.fail_lease(lease, kind, message.clone(), String::new())
                    .await;
                return Ok((Verdict::Rejected, message));
            }
        }
        // The merge reads the first file: what it holds is what the round commits.
        if let Some(format) = format {
            let f = &files[0];
            let derived =
                rederive::derive(&self.store, format, filter, &f.key, f.size, first.take()).await;
            let judged = match derived {
                Ok(d) => judgement::check_derived(f, &d, filtered),
                Err(rederive::DeriveError::Invalid(why)) => Err(Rejection {
                    kind: FailureKind::OutputInvalid,
                    message: format!("file {:?}: {why}", f.key),
                }),
                Err(rederive::DeriveError::Infrastructure(e)) => {
                    self.cfg.metrics.store_errors.inc();
                    warn!(job = %lease.job, round = lease.round, error = %e, "cannot read back an uploaded file");
                    self.requeue(&lease);
                    return Err(CoordError::Store(e));
                }
            };
            if let Err(Rejection { kind, message }) = judged {
                self.delete_files(Some(&lease), &doomed).await;
                self.fail_lease(lease, kind, message.clone(), String::new())
                    .await;
                return Ok((Verdict::Rejected, message));
            }
        }
        if let Err(Rejection { kind, message }) =
            judgement::check_schema(schema.as_deref(), &files[0].schema)
        {
            self.delete_files(Some(&lease), &doomed).await;
            self.fail_lease(lease, kind, message.clone(), String::new())
                .await;
            return Ok((Verdict::Rejected, message));
        }
        let record = judgement::commit_record(
            &Attempt {
                round: lease.round,
                seed: lease.seed,
                attempt: &lease.attempt,
                staging_prefix: &lease.staging_prefix,
                worker,
            },
            files,
            generator_ms,
            extras,
            filtered,
            unix_ms(),
        );
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
                    Verdict::Duplicate,
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
            let mut guard = self.lock();
            let inner: &mut Inner = &mut guard;
            let Some(job) = inner.jobs.get_mut(&lease.job) else {
                return Ok((Verdict::Committed, String::new()));
            };
            job.generator_ms += generator_ms;
            job.samples_this_session += record.count;
            let o = &mut job.objects[lease.object];
            o.apply_commit(record);
            o.lease_ended(lease.round);
            // Other attempts of this round are now pointless: tell their workers to stop.
            // (Only looked for when the round still has leases: rare, and a scan of them all.)
            let others = o.in_flight.contains_key(&lease.round);
            let merge_now = o.merge_plan(&job.spec).is_some();
            if others {
                inner.cancel_leases(|l| {
                    l.job == lease.job && l.object == lease.object && l.round == lease.round
                });
            }
            merge_now
        };
        if merge_now {
            self.start_merge(&lease.job, lease.object);
        }
        self.work.notify_waiters();
        self.manifest_dirty.notify_one();
        self.bump();
        Ok((Verdict::Committed, String::new()))
    }

    /// A failed attempt reported by its worker.
    pub async fn fail(
        self: &Arc<Self>,
        worker: &str,
        lease_id: u64,
        kind: FailureKind,
        message: String,
        log_tail: String,
    ) {
        if let Some(lease) = self.take_lease(worker, lease_id) {
            self.fail_lease(lease, kind, message, log_tail).await;
        }
    }

    /// Records a failed attempt of a taken lease: retried after a backoff, or quarantined once
    /// the round has failed more often than the job's retries allow.
    pub(super) async fn fail_lease(
        self: &Arc<Self>,
        lease: Lease,
        kind: FailureKind,
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
        warn!(job = %lease.job, %object, round = lease.round, attempt = %lease.attempt, %kind, %message, "attempt failed");
        self.cfg.metrics.failed(kind.label());
        if kind == FailureKind::AuditMismatch {
            // A retry cannot help: the generator's warm rounds depend on what ran before them,
            // so no final of this job can be trusted to be byte-identical.
            let why = format!(
                "stopped: the determinism audit failed for {object} r{} (attempt {}): {message}",
                lease.round, lease.attempt
            );
            if let Some(job) = self.lock().jobs.get_mut(&lease.job)
                && job.audit_failure.is_none()
            {
                job.audit_failure = Some(format!("{object} r{}: {message}", lease.round));
            }
            self.stop_job(&lease.job, why).await;
            self.work.notify_waiters();
            self.manifest_dirty.notify_one();
            self.bump();
            return;
        }
        let failure = FailureRecord {
            attempt: lease.attempt.clone(),
            kind: kind.label().to_string(),
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
            self.quarantine(&lease, &object, q, failures).await;
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

    /// Quarantines the round of a lease that failed `failures` times; stops the job when its
    /// generator looks broken, or merges the object when the round was its last hope.
    async fn quarantine(
        self: &Arc<Self>,
        lease: &Lease,
        object: &str,
        q: QuarantineRecord,
        failures: u32,
    ) {
        match self.state.quarantine_round(&lease.job, object, &q).await {
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
            Ok(QuarantineOutcome::AlreadyCommitted(_)) => self.settle(lease),
            Err(e) => {
                warn!(error = %e, "could not quarantine; retrying the round");
                self.requeue(lease);
            }
        }
    }

    /// Deletes an attempt's uploaded files, refusing keys outside its staging prefix.
    async fn delete_files(&self, lease: Option<&Lease>, files: &[ReportedFile]) {
        for f in files {
            let inside = match lease {
                Some(l) => judgement::inside_staging(&f.key, &l.staging_prefix),
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

    /// Whether `key` (`<job>/rounds/<object>/r<round>_s<seed>/<attempt>/<file>`) must survive a
    /// lease-less report: it belongs to the committed attempt of its round, to a round still in
    /// flight, or to a job that is not running here.
    fn is_protected_file(&self, key: &str) -> bool {
        let Some((job, object, round, attempt)) = judgement::parse_staging_key(key) else {
            return false;
        };
        let inner = self.lock();
        // A job this coordinator does not hold as running (finished, stopped, unknown, or
        // not loaded after a restart) has no commits in memory to tell a committed attempt
        // or kept staging from a loser's: nothing of it is deleted on a lease-less report.
        let Some(job) = inner.jobs.get(job).filter(|j| j.state == JobState::Running) else {
            return true;
        };
        job.objects
            .iter()
            .find(|o| o.name == object)
            .is_none_or(|o| {
                o.in_flight.contains_key(&round)
                    || o.commits.get(&round).is_some_and(|c| c.attempt == attempt)
            })
    }
}

/// A report with nothing but a key (a log file to delete with its attempt).
fn empty_file() -> ReportedFile {
    ReportedFile {
        name: String::new(),
        key: String::new(),
        size: 0,
        sha256: String::new(),
        count: 0,
        schema: String::new(),
        kept: None,
    }
}
