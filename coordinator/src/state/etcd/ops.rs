//! The [`StateStore`] operations on etcd, each one transaction (see the parent module for
//! the layout and the rules every operation keeps).

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, GetOptions, SortOrder, SortTarget, TxnOp};

use super::*;

#[async_trait]
impl StateStore for EtcdStore {
    async fn create_job(&self, job: &JobRecord) -> Result<CreateJob, StateError> {
        check_name("job", &job.id)?;
        let op = "create_job";
        let k = self.job_key(&job.id);
        let bytes = encode("job", job)?;
        let txn = self
            .guarded([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k.clone(), bytes, None)])
            .or_else([TxnOp::get(k.clone(), None)]);
        let resp = self.txn(op, txn).await?;
        if resp.succeeded() {
            return Ok(CreateJob::Created);
        }
        let ops = resp.op_responses();
        match txn_get(&ops, 0, op)? {
            Some(kv) => Ok(CreateJob::Exists(decode(
                || format!("job {k:?}"),
                kv.value(),
            )?)),
            None => Err(StateError::Backend(format!(
                "{op}: etcd refused to create {k:?} but holds no such key"
            ))),
        }
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StateError> {
        self.read_job(id).await
    }

    async fn list_jobs(&self) -> Result<Vec<JobRecord>, StateError> {
        let dir = format!("{}/jobs/", self.prefix);
        let (kvs, _) = self.range("list_jobs", &dir, 0).await?;
        kvs.iter()
            .map(|kv| {
                let (k, _) = key_under(&dir, kv, "job")?;
                decode(|| format!("job {k:?}"), kv.value())
            })
            .collect()
    }

    async fn update_job(&self, job: &JobRecord) -> Result<(), StateError> {
        let k = self.job_key(&job.id);
        let bytes = encode("job", job)?;
        let txn = self
            .guarded([Compare::version(k.clone(), CompareOp::Greater, 0)])
            .and_then([TxnOp::put(k, bytes, None)]);
        if self.txn("update_job", txn).await?.succeeded() {
            Ok(())
        } else {
            Err(StateError::JobNotFound(job.id.clone()))
        }
    }

    async fn load_object(&self, job: &str, object: &str) -> Result<ObjectRecord, StateError> {
        check_names(job, object)?;
        // The reads are pinned to one revision; if etcd compacts it away between two of
        // them (a long read racing an auto-compaction), read again at a newer one.
        let mut tries = 0;
        loop {
            match self.load_at_one_revision(job, object).await {
                Err(StateError::Backend(e)) if e.contains("compacted") && tries < 3 => {
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    async fn commit_round(
        &self,
        job: &str,
        object: &str,
        commit: &CommitRecord,
    ) -> Result<CommitOutcome, StateError> {
        check_names(job, object)?;
        let op = "commit_round";
        let jk = self.job_key(job);
        let ck = self.round_key("commits", job, object, commit.round);
        let qk = self.round_key("quarantines", job, object, commit.round);
        let bytes = encode("commit", commit)?;
        if let Some(batcher) = &self.commits {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let pending = PendingCommit {
                job_key: jk.clone(),
                commit_key: ck.clone(),
                quarantine_key: qk.clone(),
                bytes: bytes.clone(),
                reply,
            };
            if batcher.send(pending).await.is_ok()
                && let Ok(batched) = answer.await
                && batched?
            {
                return Ok(CommitOutcome::Committed);
            }
        }
        let txn = self
            .guarded([
                Compare::version(jk.clone(), CompareOp::Greater, 0),
                Compare::create_revision(ck.clone(), CompareOp::Equal, 0),
                Compare::create_revision(qk.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(ck.clone(), bytes, None)])
            .or_else([
                TxnOp::get(jk, Some(GetOptions::new().with_keys_only())),
                TxnOp::get(qk, Some(GetOptions::new().with_keys_only())),
                TxnOp::get(ck.clone(), None),
            ]);
        let resp = self.txn(op, txn).await?;
        if resp.succeeded() {
            return Ok(CommitOutcome::Committed);
        }
        // Same precedence as the embedded store: job, then quarantine, then commit.
        let ops = resp.op_responses();
        if !job_in(&ops, 0, op)? {
            return Err(StateError::JobNotFound(job.to_string()));
        }
        if txn_get(&ops, 1, op)?.is_some() {
            return Ok(CommitOutcome::Quarantined);
        }
        match txn_get(&ops, 2, op)? {
            Some(kv) => Ok(CommitOutcome::AlreadyCommitted(decode(
                || format!("commit {ck:?}"),
                kv.value(),
            )?)),
            None => Err(StateError::Backend(format!(
                "{op}: etcd refused to create {ck:?} but no precondition failed"
            ))),
        }
    }

    async fn record_failure(
        &self,
        job: &str,
        object: &str,
        round: u32,
        failure: &FailureRecord,
    ) -> Result<u32, StateError> {
        check_names(job, object)?;
        let op = "record_failure";
        let jk = self.job_key(job);
        let dir = self.failure_dir(job, object, round);
        let bytes = encode("failure", failure)?;
        for _ in 0..MAX_CONFLICTS {
            // The next sequence number follows the last one stored. Failure keys are never
            // deleted, so the sequence numbers are 0..n and the count is the next one plus one.
            let last = self
                .get(
                    op,
                    dir.clone(),
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(1)
                        .with_keys_only(),
                )
                .await?;
            let seq = match last.kvs().first() {
                None => Some(0),
                Some(kv) => {
                    let (k, rest) = key_under(&dir, kv, "failure")?;
                    parse_num("failure", k, rest)?.checked_add(1)
                }
            };
            let (seq, count) = seq
                .and_then(|s| Some((s, s.checked_add(1)?)))
                .ok_or_else(|| StateError::Corrupt {
                    what: "failure".into(),
                    detail: format!("round {dir:?} holds too many failures to count"),
                })?;
            let fk = format!("{dir}{seq:0NUM_WIDTH$}");
            let txn = self
                .guarded([
                    Compare::version(jk.clone(), CompareOp::Greater, 0),
                    Compare::create_revision(fk.clone(), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(fk, bytes.clone(), None)])
                .or_else([TxnOp::get(
                    jk.clone(),
                    Some(GetOptions::new().with_keys_only()),
                )]);
            let resp = self.txn(op, txn).await?;
            if resp.succeeded() {
                return Ok(count);
            }
            if !job_in(&resp.op_responses(), 0, op)? {
                return Err(StateError::JobNotFound(job.to_string()));
            }
            // Another failure of this round took the sequence number: read again.
        }
        Err(StateError::Backend(format!(
            "{op}: gave up after {MAX_CONFLICTS} conflicting writers to {dir:?}"
        )))
    }

    async fn quarantine_round(
        &self,
        job: &str,
        object: &str,
        quarantine: &QuarantineRecord,
    ) -> Result<QuarantineOutcome, StateError> {
        check_names(job, object)?;
        let op = "quarantine_round";
        let jk = self.job_key(job);
        let ck = self.round_key("commits", job, object, quarantine.round);
        let qk = self.round_key("quarantines", job, object, quarantine.round);
        let bytes = encode("quarantine", quarantine)?;
        let txn = self
            .guarded([
                Compare::version(jk.clone(), CompareOp::Greater, 0),
                Compare::create_revision(ck.clone(), CompareOp::Equal, 0),
                Compare::create_revision(qk.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(qk.clone(), bytes, None)])
            .or_else([
                TxnOp::get(jk, Some(GetOptions::new().with_keys_only())),
                TxnOp::get(ck.clone(), None),
                TxnOp::get(qk.clone(), Some(GetOptions::new().with_keys_only())),
            ]);
        let resp = self.txn(op, txn).await?;
        if resp.succeeded() {
            return Ok(QuarantineOutcome::Quarantined);
        }
        // Same precedence as the embedded store: job, then commit, then quarantine.
        let ops = resp.op_responses();
        if !job_in(&ops, 0, op)? {
            return Err(StateError::JobNotFound(job.to_string()));
        }
        if let Some(kv) = txn_get(&ops, 1, op)? {
            return Ok(QuarantineOutcome::AlreadyCommitted(decode(
                || format!("commit {ck:?}"),
                kv.value(),
            )?));
        }
        if txn_get(&ops, 2, op)?.is_some() {
            return Ok(QuarantineOutcome::AlreadyQuarantined);
        }
        Err(StateError::Backend(format!(
            "{op}: etcd refused to create {qk:?} but no precondition failed"
        )))
    }

    async fn quarantine_committed(
        &self,
        job: &str,
        object: &str,
        attempt: &str,
        quarantine: &QuarantineRecord,
    ) -> Result<QuarantineOutcome, StateError> {
        check_names(job, object)?;
        let op = "quarantine_committed";
        let jk = self.job_key(job);
        let ck = self.round_key("commits", job, object, quarantine.round);
        let qk = self.round_key("quarantines", job, object, quarantine.round);
        let bytes = encode("quarantine", quarantine)?;
        for _ in 0..MAX_CONFLICTS {
            // The commit as it stands; the transaction applies only if it is still that one.
            let seen = self.get(op, ck.clone(), GetOptions::new()).await?;
            let (revision, commit) = match seen.kvs().first() {
                None => (0, None),
                Some(kv) => (
                    kv.mod_revision(),
                    Some(decode::<CommitRecord>(
                        || format!("commit {ck:?}"),
                        kv.value(),
                    )?),
                ),
            };
            let mut apply = vec![TxnOp::put(qk.clone(), bytes.clone(), None)];
            if let Some(c) = &commit {
                if c.attempt != attempt {
                    // Answered below after the same checks as a refused transaction.
                    apply.clear();
                } else {
                    apply.push(TxnOp::delete(ck.clone(), None));
                }
            }
            let txn = self
                .guarded([
                    Compare::version(jk.clone(), CompareOp::Greater, 0),
                    Compare::create_revision(qk.clone(), CompareOp::Equal, 0),
                    Compare::mod_revision(ck.clone(), CompareOp::Equal, revision),
                ])
                .and_then(apply.clone())
                .or_else([
                    TxnOp::get(jk.clone(), Some(GetOptions::new().with_keys_only())),
                    TxnOp::get(qk.clone(), Some(GetOptions::new().with_keys_only())),
                ]);
            let resp = self.txn(op, txn).await?;
            if resp.succeeded() {
                return Ok(match commit {
                    Some(c) if apply.is_empty() => QuarantineOutcome::AlreadyCommitted(c),
                    _ => QuarantineOutcome::Quarantined,
                });
            }
            let ops = resp.op_responses();
            if !job_in(&ops, 0, op)? {
                return Err(StateError::JobNotFound(job.to_string()));
            }
            if txn_get(&ops, 1, op)?.is_some() {
                return Ok(QuarantineOutcome::AlreadyQuarantined);
            }
            // The commit changed in between: read it again.
        }
        Err(StateError::Backend(format!(
            "{op}: gave up after {MAX_CONFLICTS} conflicting writers to {ck:?}"
        )))
    }

    async fn record_merge(
        &self,
        job: &str,
        object: &str,
        merge: &MergeRecord,
    ) -> Result<(), StateError> {
        check_names(job, object)?;
        let jk = self.job_key(job);
        let bytes = encode("merge", merge)?;
        let txn = self
            .guarded([Compare::version(jk, CompareOp::Greater, 0)])
            .and_then([TxnOp::put(self.merge_key(job, object), bytes, None)]);
        if self.txn("record_merge", txn).await?.succeeded() {
            Ok(())
        } else {
            Err(StateError::JobNotFound(job.to_string()))
        }
    }

    async fn bump_epoch(&self) -> Result<u64, StateError> {
        let op = "bump_epoch";
        let k = self.epoch_key();
        for _ in 0..MAX_CONFLICTS {
            let resp = self.get(op, k.clone(), GetOptions::new()).await?;
            // An absent key compares as mod_revision 0, so the first bump is a create.
            let (current, mod_revision) = match resp.kvs().first() {
                None => (0u64, 0),
                Some(kv) => (
                    decode::<u64>(|| format!("epoch {k:?}"), kv.value())?,
                    kv.mod_revision(),
                ),
            };
            let next = current.checked_add(1).ok_or_else(|| StateError::Corrupt {
                what: "epoch".into(),
                detail: format!("{current} cannot be incremented"),
            })?;
            let txn = self
                .guarded([Compare::mod_revision(
                    k.clone(),
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then([TxnOp::put(k.clone(), encode("epoch", &next)?, None)]);
            if self.txn(op, txn).await?.succeeded() {
                return Ok(next);
            }
            // Another coordinator bumped it in between: read again.
        }
        Err(StateError::Backend(format!(
            "{op}: gave up after {MAX_CONFLICTS} conflicting writers to {k:?}"
        )))
    }
}
