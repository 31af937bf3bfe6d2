//! The etcd state store: coordinator state in an etcd cluster (v3 API), for coordinators that
//! fail over between machines.
//!
//! Every write method is ONE etcd transaction whose compares carry the precondition, so the
//! create-if-absent of `create_job`, `commit_round` and `quarantine_round` is decided by etcd
//! itself (linearizable, durable once acknowledged: etcd fsyncs its log before answering).
//! When a compare fails, the same transaction reads the keys that made it fail, so the outcome
//! (`AlreadyCommitted` with the winner's record, `Quarantined`, `JobNotFound`) comes from the
//! same revision as the decision. `record_failure` and `bump_epoch` read, then write with a
//! compare that nothing changed in between, and retry (bounded) when something did.
//!
//! Layout under the store's prefix `P` (names are `[A-Za-z0-9._-]` and never hold `/`;
//! rounds and sequence numbers are zero-padded to 10 digits so that key order is numeric
//! order and range reads come back sorted); values are JSON like the embedded store's:
//!
//! | key                                      | value                     |
//! |------------------------------------------|---------------------------|
//! | `P/jobs/<job>`                           | [`JobRecord`]             |
//! | `P/commits/<job>/<object>/<round>`       | [`CommitRecord`]          |
//! | `P/failures/<job>/<object>/<round>/<seq>`| [`FailureRecord`]         |
//! | `P/quarantines/<job>/<object>/<round>`   | [`QuarantineRecord`]      |
//! | `P/merges/<job>/<object>`                | [`MergeRecord`]           |
//! | `P/meta/epoch`                           | `u64`                     |
//!
//! Different prefixes are independent stores on one etcd (tests use one per property).
//! Every request is bounded by a timeout: an unreachable etcd is an error, never a hang.
//!
//! This file holds the store's handle, key layout, fence and request plumbing; the
//! [`StateStore`] operations themselves are in `ops.rs`.

mod access;
mod ops;

pub use access::{EtcdAccess, flags};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KeyValue, KvClient, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};
use tokio_util::sync::CancellationToken;

use super::codec::{check_name, check_names, decode, encode, parse_num};
use super::{
    CommitOutcome, CommitRecord, CreateJob, FailureRecord, JobRecord, MergeRecord, ObjectRecord,
    QuarantineOutcome, QuarantineRecord, StateError, StateStore,
};

/// How long one etcd request may take before the operation fails with
/// [`StateError::Backend`] (see [`EtcdStore::connect_with_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Width of the zero-padded rounds and sequence numbers in keys (`u32::MAX` has 10 digits).
const NUM_WIDTH: usize = 10;

/// Keys per page of a range read; with etcd's 1.5 MiB value limit a page stays far below
/// [`MAX_RESPONSE_BYTES`].
const PAGE: i64 = 128;

/// Largest etcd response accepted (tonic's default of 4 MiB is too small for a page of
/// records with long log tails).
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// Read-then-write loops (`record_failure`, `bump_epoch`) give up after this many lost races.
/// Every lost race means another writer succeeded, so N concurrent writers need at most N.
const MAX_CONFLICTS: u32 = 256;

/// Coordinator state in etcd, under one key prefix.
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    prefix: String,
    endpoints: String,
    timeout: Duration,
    fence: Option<Arc<Fence>>,
    /// The commit batcher (see [`batch_commits`]); `None` in the batcher's own handle.
    commits: Option<tokio::sync::mpsc::Sender<PendingCommit>>,
    /// Commits applied as part of a multi-commit transaction (for tests and benchmarks).
    batched: Arc<std::sync::atomic::AtomicU64>,
}

/// Most commits one etcd transaction carries: each brings two or three compares, and etcd
/// refuses transactions of more than 128 (its `--max-txn-ops` default).
const MAX_COMMIT_BATCH: usize = 32;

/// A commit waiting for the batcher: `Ok(true)` applied; `Ok(false)` not applied (a duplicate
/// key in the batch, or the batch's guard failed): the caller runs it alone, which also tells
/// it precisely why it may not apply.
struct PendingCommit {
    job_key: String,
    commit_key: String,
    quarantine_key: String,
    bytes: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Result<bool, StateError>>,
}

/// Group commit on etcd: takes every commit waiting and applies them in one transaction whose
/// guard is the conjunction of their guards (each job exists, each round neither committed
/// nor quarantined, the leader's fence). When the guard holds, all are committed with one
/// etcd write; when it does not, each is retried alone (which also says precisely why it may
/// not apply). While one batch is in flight the next one gathers, so under load commits share
/// transactions and without load a commit costs one transaction as before.
async fn batch_commits(store: EtcdStore, mut rx: tokio::sync::mpsc::Receiver<PendingCommit>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_COMMIT_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // Two commits of one round go alone (their outcomes depend on each other).
        let mut seen = std::collections::HashSet::new();
        let (mut group, mut alone) = (Vec::new(), Vec::new());
        for p in batch {
            if seen.insert(p.commit_key.clone()) {
                group.push(p);
            } else {
                alone.push(p);
            }
        }
        for p in alone {
            let _ = p.reply.send(Ok(false));
        }
        let mut compares = Vec::new();
        let mut jobs = std::collections::HashSet::new();
        let mut puts = Vec::new();
        for p in &group {
            if jobs.insert(p.job_key.clone()) {
                compares.push(Compare::version(p.job_key.clone(), CompareOp::Greater, 0));
            }
            compares.push(Compare::create_revision(
                p.commit_key.clone(),
                CompareOp::Equal,
                0,
            ));
            compares.push(Compare::create_revision(
                p.quarantine_key.clone(),
                CompareOp::Equal,
                0,
            ));
            puts.push(TxnOp::put(p.commit_key.clone(), p.bytes.clone(), None));
        }
        let txn = store.guarded(compares).and_then(puts);
        let outcome = store.txn("commit_round (batch)", txn).await;
        let n = group.len() as u64;
        for p in group {
            let _ = p.reply.send(match &outcome {
                Ok(r) => Ok(r.succeeded()),
                Err(e) => Err(e.clone()),
            });
        }
        if n > 1 && outcome.as_ref().is_ok_and(|r| r.succeeded()) {
            store
                .batched
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The elected leader's key: a write applies only while that key exists with this create
/// revision, so a deposed leader (its lease expired, another process elected) writes nothing.
#[derive(Debug, Clone)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
    /// Cancelled when a write finds the fence gone: the process no longer leads.
    pub lost: CancellationToken,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port` or `host:port`) and
    /// keeps the state under `prefix` (e.g. `/quarry`; a trailing `/` is ignored). Fails with
    /// [`StateError::Backend`] if no endpoint answers within [`DEFAULT_TIMEOUT`].
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore, StateError> {
        EtcdStore::connect_with_timeout(endpoints, prefix, DEFAULT_TIMEOUT).await
    }

    /// [`EtcdStore::connect`] with another bound on every etcd request (connecting included).
    pub async fn connect_with_timeout(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<EtcdStore, StateError> {
        EtcdStore::connect_with(&EtcdAccess::plain(endpoints), prefix, timeout).await
    }

    /// [`EtcdStore::connect_with_timeout`] with TLS and credentials (`access`). A failure
    /// to connect is explained naming the flag to fix ([`EtcdAccess::explain`]).
    pub async fn connect_with(
        access: &EtcdAccess,
        prefix: &str,
        timeout: Duration,
    ) -> Result<EtcdStore, StateError> {
        let endpoints = access.endpoints();
        let shown = access.shown();
        if endpoints.is_empty() {
            return Err(StateError::Backend(
                "no etcd endpoints given for the state store".into(),
            ));
        }
        let options = access
            .options()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(10), timeout)
            // Without a leader a request fails at once instead of waiting for one.
            .with_require_leader(true);
        let client =
            match tokio::time::timeout(timeout, Client::connect(endpoints, Some(options))).await {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => {
                    return Err(StateError::Backend(format!(
                        "connecting to etcd at {shown}: {}",
                        access.explain(&e)
                    )));
                }
                Err(_) => {
                    return Err(StateError::Backend(format!(
                        "connecting to etcd at {shown}: no answer within {timeout:?}"
                    )));
                }
            };
        let store = EtcdStore {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            prefix: prefix.trim_end_matches('/').to_string(),
            endpoints: shown.clone(),
            timeout,
            fence: None,
            commits: None,
            batched: Arc::default(),
        };
        // The client connects lazily: one read proves that etcd answers (and that this prefix
        // may be read) before the coordinator relies on it; a TLS or permission failure shows
        // here first, and is explained.
        let mut kv = store.kv.clone();
        let probe = kv.get(store.epoch_key(), Some(GetOptions::new().with_keys_only()));
        match tokio::time::timeout(timeout, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(StateError::Backend(format!(
                    "connecting to etcd at {shown}: {}",
                    access.explain(&e)
                )));
            }
            Err(_) => {
                return Err(StateError::Backend(format!(
                    "connecting to etcd at {shown}: no answer within {timeout:?}"
                )));
            }
        }
        Ok(store.with_batcher())
    }

    /// Starts this handle's commit batcher (replacing one it had).
    fn with_batcher(mut self) -> EtcdStore {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let mut worker = self.clone();
        worker.commits = None;
        tokio::spawn(batch_commits(worker, rx));
        self.commits = Some(tx);
        self
    }

    /// Commits applied as part of a transaction of several commits so far.
    pub fn commits_batched(&self) -> u64 {
        self.batched.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every write from now on applies only while `fence` holds.
    pub fn with_fence(mut self, fence: Fence) -> EtcdStore {
        self.fence = Some(Arc::new(fence));
        // The batcher's writes must carry the fence too.
        self.with_batcher()
    }

    /// A transaction whose guard is `compares` and, with a fence, the fence's key.
    fn guarded(&self, compares: impl Into<Vec<Compare>>) -> Txn {
        let mut compares = compares.into();
        if let Some(f) = &self.fence {
            compares.push(Compare::create_revision(
                f.key.clone(),
                CompareOp::Equal,
                f.revision,
            ));
        }
        Txn::new().when(compares)
    }

    /// After a transaction's guard failed: was it the fence? Then this process no longer
    /// leads; says so and fails the write.
    async fn check_fence(&self, op: &str) -> Result<(), StateError> {
        let Some(f) = &self.fence else {
            return Ok(());
        };
        let mut kv = self.kv.clone();
        let got = self
            .call(
                op,
                kv.get(f.key.clone(), Some(GetOptions::new().with_keys_only())),
            )
            .await?;
        let holds = got
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == f.revision);
        if holds {
            return Ok(());
        }
        f.lost.cancel();
        Err(StateError::Fenced(format!(
            "{op}: this coordinator's leadership (key {}, revision {}) is gone; another leads now",
            String::from_utf8_lossy(&f.key),
            f.revision
        )))
    }

    /// The key prefix this store keeps its state under (without a trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // ----- keys -----

    fn job_key(&self, id: &str) -> String {
        format!("{}/jobs/{id}", self.prefix)
    }

    /// `P/<kind>/<job>/<object>/`: the directory of one object's records of one kind.
    fn object_dir(&self, kind: &str, job: &str, object: &str) -> String {
        format!("{}/{kind}/{job}/{object}/", self.prefix)
    }

    fn round_key(&self, kind: &str, job: &str, object: &str, round: u32) -> String {
        format!("{}{round:0NUM_WIDTH$}", self.object_dir(kind, job, object))
    }

    fn failure_dir(&self, job: &str, object: &str, round: u32) -> String {
        format!("{}/", self.round_key("failures", job, object, round))
    }

    fn merge_key(&self, job: &str, object: &str) -> String {
        format!("{}/merges/{job}/{object}", self.prefix)
    }

    fn epoch_key(&self) -> String {
        format!("{}/meta/epoch", self.prefix)
    }

    // ----- requests, each bounded by the timeout -----

    async fn call<T>(
        &self,
        op: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StateError> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StateError::Backend(format!(
                "{op}: etcd at {}: {e}",
                self.endpoints
            ))),
            Err(_) => Err(StateError::Backend(format!(
                "{op}: etcd at {} did not answer within {:?}",
                self.endpoints, self.timeout
            ))),
        }
    }

    async fn get(
        &self,
        op: &str,
        key: String,
        options: GetOptions,
    ) -> Result<etcd_client::GetResponse, StateError> {
        let mut kv = self.kv.clone();
        self.call(op, kv.get(key, Some(options))).await
    }

    async fn txn(&self, op: &str, txn: Txn) -> Result<TxnResponse, StateError> {
        let mut kv = self.kv.clone();
        let resp = self.call(op, kv.txn(txn)).await?;
        if !resp.succeeded() {
            self.check_fence(op).await?;
        }
        Ok(resp)
    }

    /// Every key-value under `dir` (which ends with `/`), in key order, read in pages at one
    /// revision: `revision` if positive, else the newest, which is returned for later reads.
    async fn range(
        &self,
        op: &str,
        dir: &str,
        mut revision: i64,
    ) -> Result<(Vec<KeyValue>, i64), StateError> {
        let end = prefix_end(dir);
        let mut start = dir.as_bytes().to_vec();
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE)
                .with_sort(SortTarget::Key, SortOrder::Ascend);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut kv = self.kv.clone();
            let mut page = self.call(op, kv.get(start.clone(), Some(options))).await?;
            if revision <= 0 {
                revision = page.header().map(|h| h.revision()).unwrap_or(0);
            }
            let kvs = page.take_kvs();
            let more = page.more();
            let Some(last) = kvs.last() else { break };
            // The next page starts right after the last key read.
            start = last.key().to_vec();
            start.push(0);
            out.extend(kvs);
            if !more {
                break;
            }
        }
        Ok((out, revision))
    }

    /// Reads a job's records; `None` when absent.
    async fn read_job(&self, id: &str) -> Result<Option<JobRecord>, StateError> {
        let k = self.job_key(id);
        let resp = self.get("get_job", k.clone(), GetOptions::new()).await?;
        resp.kvs()
            .first()
            .map(|kv| decode(|| format!("job {k:?}"), kv.value()))
            .transpose()
    }

    /// Everything stored about an object, at one revision.
    async fn load_at_one_revision(
        &self,
        job: &str,
        object: &str,
    ) -> Result<ObjectRecord, StateError> {
        let op = "load_object";
        let mut record = ObjectRecord::default();

        let dir = self.object_dir("commits", job, object);
        let (kvs, rev) = self.range(op, &dir, 0).await?;
        for kv in &kvs {
            let (k, rest) = key_under(&dir, kv, "commit")?;
            let round = parse_num("commit", k, rest)?;
            record
                .commits
                .insert(round, decode(|| format!("commit {k:?}"), kv.value())?);
        }

        let dir = self.object_dir("failures", job, object);
        let (kvs, _) = self.range(op, &dir, rev).await?;
        for kv in &kvs {
            let (k, rest) = key_under(&dir, kv, "failure")?;
            let Some((round, seq)) = rest.split_once('/') else {
                return Err(StateError::Corrupt {
                    what: "failure".into(),
                    detail: format!("key {k:?} has no sequence number"),
                });
            };
            let round = parse_num("failure", k, round)?;
            parse_num("failure", k, seq)?;
            // Keys sort by zero-padded sequence number: pushes keep the order of arrival.
            record
                .failures
                .entry(round)
                .or_default()
                .push(decode(|| format!("failure {k:?}"), kv.value())?);
        }

        let dir = self.object_dir("quarantines", job, object);
        let (kvs, _) = self.range(op, &dir, rev).await?;
        for kv in &kvs {
            let (k, rest) = key_under(&dir, kv, "quarantine")?;
            let round = parse_num("quarantine", k, rest)?;
            record
                .quarantined
                .insert(round, decode(|| format!("quarantine {k:?}"), kv.value())?);
        }

        let k = self.merge_key(job, object);
        let resp = self
            .get(op, k.clone(), GetOptions::new().with_revision(rev))
            .await?;
        if let Some(kv) = resp.kvs().first() {
            record.merge = Some(decode(|| format!("merge {k:?}"), kv.value())?);
        }
        Ok(record)
    }
}

/// The first key-value of the `get` at position `at` of a failed transaction's else branch.
fn txn_get(ops: &[TxnOpResponse], at: usize, op: &str) -> Result<Option<KeyValue>, StateError> {
    match ops.get(at) {
        Some(TxnOpResponse::Get(get)) => Ok(get.kvs().first().cloned()),
        other => Err(StateError::Backend(format!(
            "{op}: unexpected etcd transaction response at {at}: {other:?}"
        ))),
    }
}

/// Whether the job exists, from the `get` of its key that a failed transaction ran in its
/// else branch at position `at`.
fn job_in(ops: &[TxnOpResponse], at: usize, op: &str) -> Result<bool, StateError> {
    Ok(txn_get(ops, at, op)?.is_some())
}

/// The end of the range of every key starting with `prefix`: the prefix with its last byte
/// that can be incremented incremented (etcd's own `with_prefix` rule).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only reached for an empty or all-0xff prefix: `\0` means "to the end of the keyspace".
    vec![0]
}

/// The key of `kv` as text and the part of it after `dir`.
fn key_under<'a>(
    dir: &str,
    kv: &'a KeyValue,
    what: &str,
) -> Result<(&'a str, &'a str), StateError> {
    let k = std::str::from_utf8(kv.key()).map_err(|e| StateError::Corrupt {
        what: what.to_string(),
        detail: format!(
            "key {:?} is not UTF-8: {e}",
            String::from_utf8_lossy(kv.key())
        ),
    })?;
    match k.strip_prefix(dir) {
        Some(rest) => Ok((k, rest)),
        None => Err(StateError::Corrupt {
            what: what.to_string(),
            detail: format!("key {k:?} is outside {dir:?}"),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end("p/commits/j/o/"), b"p/commits/j/o0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
        let end = prefix_end("p/commits/j/o/");
        for inside in [
            "p/commits/j/o/0000000000",
            "p/commits/j/o/4294967295/0000000001",
        ] {
            assert!(inside.as_bytes() < end.as_slice(), "{inside}");
        }
        for outside in [
            "p/commits/j/o-1/0000000000",
            "p/commits/j/o.b/0",
            "p/commits/j/o0",
        ] {
            let inside = outside.as_bytes() >= b"p/commits/j/o/".as_slice()
                && outside.as_bytes() < end.as_slice();
            assert!(!inside, "{outside}");
        }
    }
}
