//! The embedded state store: one redb file on the coordinator's machine.
//!
//! Every trait method is one redb transaction run on the blocking pool: a write method reads,
//! checks and writes inside one write transaction, and redb serializes write transactions, so
//! create-if-absent (`create_job`, `commit_round`, `quarantine_round`) is atomic. A commit
//! that returned `Ok` has been fsynced (redb's default `Durability::Immediate`) and survives
//! a crash of the process or the machine.
//!
//! Layout (keys are `/`-separated names, which are `[A-Za-z0-9._-]` and so never hold `/`;
//! rounds and sequence numbers are zero-padded to 10 digits so that byte order is numeric
//! order and range scans come back sorted):
//!
//! | table         | key                              | value                    |
//! |---------------|----------------------------------|--------------------------|
//! | `jobs`        | `job`                            | JSON [`JobRecord`]       |
//! | `commits`     | `job/object/round`               | JSON [`CommitRecord`]    |
//! | `failures`    | `job/object/round/seq`           | JSON [`FailureRecord`]   |
//! | `quarantines` | `job/object/round`               | JSON [`QuarantineRecord`]|
//! | `merges`      | `job/object`                     | JSON [`MergeRecord`]     |
//! | `meta`        | `epoch`                          | `u64`                    |
//!
//! redb locks the file: a second coordinator opening the same file is refused with an error
//! that names the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, DatabaseError, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};

use super::codec::{check_name, check_names, decode, encode, parse_num};
use super::{
    CommitOutcome, CommitRecord, CreateJob, FailureRecord, JobRecord, MergeRecord, ObjectRecord,
    QuarantineOutcome, QuarantineRecord, StateError, StateStore,
};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const COMMITS: TableDefinition<&str, &[u8]> = TableDefinition::new("commits");
const FAILURES: TableDefinition<&str, &[u8]> = TableDefinition::new("failures");
const QUARANTINES: TableDefinition<&str, &[u8]> = TableDefinition::new("quarantines");
const MERGES: TableDefinition<&str, &[u8]> = TableDefinition::new("merges");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const EPOCH: &str = "epoch";

/// Width of the zero-padded rounds and sequence numbers in keys (`u32::MAX` has 10 digits).
const NUM_WIDTH: usize = 10;

/// Coordinator state in a local redb file (the default on one machine).
pub struct EmbeddedStore {
    /// `None` once [`StateStore::close`] has released the file.
    db: std::sync::Mutex<Option<Arc<Database>>>,
    /// The group-commit writer: every write operation goes through it (see [`writer_loop`]).
    writer: std::sync::Mutex<Option<Writer>>,
    /// Write transactions committed (each one fsync), for tests and benchmarks.
    commits: Arc<std::sync::atomic::AtomicU64>,
    path: PathBuf,
}

struct Writer {
    jobs: std::sync::mpsc::Sender<WriteJob>,
    thread: std::thread::JoinHandle<()>,
}

/// One write operation, run by the writer inside a shared transaction; what it returns says
/// whether it wrote, and how to answer its caller once the transaction's fate is known.
type WriteJob = Box<dyn FnOnce(&WriteTransaction) -> Written + Send>;

struct Written {
    wrote: bool,
    reply: Box<dyn FnOnce(Result<(), StateError>) + Send>,
}

/// Most operations one transaction (and one fsync) carries.
const MAX_BATCH: usize = 1024;

/// Group commit: takes every write operation waiting, runs them one after another in ONE write
/// transaction and commits it with one fsync; then answers each. An operation sees the writes
/// of those before it in the batch, so the batch is equivalent to running them one by one in
/// that order. When the commit fails, every operation of the batch gets the error (what a
/// read-only answer saw may have depended on a write that is now lost). Write closures keep one
/// rule: all checks first, the write last, so an operation that fails has written nothing.
fn writer_loop(
    db: Arc<Database>,
    jobs: std::sync::mpsc::Receiver<WriteJob>,
    commits: Arc<std::sync::atomic::AtomicU64>,
) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let txn = match db.begin_write() {
            Ok(t) => t,
            Err(e) => {
                // Dropping the operations unanswered fails each caller with an error; none
                // of them ran, so nothing was written.
                tracing::error!(error = %e, ops = batch.len(), "state writer cannot start a transaction");
                drop(batch);
                continue;
            }
        };
        let mut replies = Vec::with_capacity(batch.len());
        let mut wrote = false;
        for job in batch {
            let w = job(&txn);
            wrote |= w.wrote;
            replies.push(w.reply);
        }
        let outcome = if wrote {
            commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            txn.commit()
                .map_err(|e| StateError::Backend(format!("committing the state: {e}")))
        } else {
            txn.abort()
                .map_err(|e| StateError::Backend(format!("ending a read-only batch: {e}")))
        };
        for reply in replies {
            reply(outcome.clone());
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // The writer holds the database: wait for it, so that the file is unlocked when the
        // store is gone (a reopen right after a drop must succeed).
        if let Some(thread) = self.stop_writer() {
            let _ = thread.join();
        }
    }
}

impl EmbeddedStore {
    /// Opens the state file at `path`, creating it (and its parent directories) if missing.
    ///
    /// Fails if another live `EmbeddedStore` (in this or another process) has the file open:
    /// two coordinators must never share one state file.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StateError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StateError::Backend(format!(
                    "creating the state directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        let db = Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StateError::Backend(format!(
                "another coordinator is using the state file {} (it is locked); stop that \
                 coordinator or give this one its own state file",
                path.display()
            )),
            e => StateError::Backend(format!("opening the state file {}: {e}", path.display())),
        })?;
        // Create every table up front so that read transactions always find them.
        let txn = db
            .begin_write()
            .map_err(backend("initializing the state file"))?;
        txn.open_table(JOBS)
            .map_err(backend("creating table jobs"))?;
        txn.open_table(COMMITS)
            .map_err(backend("creating table commits"))?;
        txn.open_table(FAILURES)
            .map_err(backend("creating table failures"))?;
        txn.open_table(QUARANTINES)
            .map_err(backend("creating table quarantines"))?;
        txn.open_table(MERGES)
            .map_err(backend("creating table merges"))?;
        txn.open_table(META)
            .map_err(backend("creating table meta"))?;
        txn.commit()
            .map_err(backend("initializing the state file"))?;
        let db = Arc::new(db);
        let (jobs, rx) = std::sync::mpsc::channel();
        let writer_db = Arc::clone(&db);
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&commits);
        let thread = std::thread::Builder::new()
            .name("quarry-state-writer".into())
            .spawn(move || writer_loop(writer_db, rx, counter))
            .map_err(|e| StateError::Backend(format!("starting the state writer: {e}")))?;
        Ok(EmbeddedStore {
            db: std::sync::Mutex::new(Some(db)),
            writer: std::sync::Mutex::new(Some(Writer { jobs, thread })),
            commits,
            path: path.to_path_buf(),
        })
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write transactions committed so far (one fsync each; a batch of writes shares one).
    pub fn transactions_committed(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The open database, or an error naming the file once the store is closed.
    fn db(&self) -> Result<Arc<Database>, StateError> {
        let guard = self.db.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(Arc::clone).ok_or_else(|| {
            StateError::Backend(format!("the state file {} is closed", self.path.display()))
        })
    }

    /// Runs `f` inside a write transaction of the group-commit writer. `f` says whether it
    /// wrote ([`Txn::Commit`]) or only read ([`Txn::Abort`]); an error means it wrote nothing.
    /// Returns once the transaction holding `f`'s write is durable.
    async fn write<T, F>(&self, op: &'static str, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<Txn<T>, StateError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T, StateError>>();
        let job: WriteJob = Box::new(move |txn| {
            let (wrote, result) = match f(txn) {
                Ok(Txn::Commit(out)) => (true, Ok(out)),
                Ok(Txn::Abort(out)) => (false, Ok(out)),
                Err(e) => (false, Err(e)),
            };
            Written {
                wrote,
                reply: Box::new(move |batch: Result<(), StateError>| {
                    let _ = tx.send(batch.and(result));
                }),
            }
        });
        {
            let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let Some(w) = guard.as_ref() else {
                return Err(StateError::Backend(format!(
                    "{op}: the state file {} is closed",
                    self.path.display()
                )));
            };
            w.jobs
                .send(job)
                .map_err(|_| StateError::Backend(format!("{op}: the state writer has stopped")))?;
        }
        rx.await.map_err(|_| {
            StateError::Backend(format!("{op}: the state writer dropped the operation"))
        })?
    }

    /// Stops the writer after the operations already queued, and waits for it.
    fn stop_writer(&self) -> Option<std::thread::JoinHandle<()>> {
        let w = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        drop(w.jobs);
        Some(w.thread)
    }

    /// Runs `f` in one read transaction (a snapshot of the last commit) on the blocking pool.
    async fn read<T, F>(&self, op: &'static str, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StateError> + Send + 'static,
    {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(backend(op))?;
            f(&txn)
        })
        .await
        .map_err(|e| StateError::Backend(format!("{op}: the state task failed: {e}")))?
    }
}

/// What a write closure wants done with its transaction.
enum Txn<T> {
    Commit(T),
    /// Nothing was written (a precondition answered); skip the fsync.
    Abort(T),
}

/// Maps any redb error to [`StateError::Backend`] with what was being done.
fn backend<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StateError {
    move |e| StateError::Backend(format!("{context}: {}", e.into()))
}

/// The key of a job, object and optional numbered parts, in one place.
fn key(job: &str, object: Option<&str>, nums: &[u32]) -> String {
    let mut k = String::with_capacity(job.len() + 32);
    k.push_str(job);
    if let Some(o) = object {
        k.push('/');
        k.push_str(o);
    }
    for n in nums {
        k.push('/');
        k.push_str(&format!("{n:0NUM_WIDTH$}"));
    }
    k
}

/// Range bounds covering every key that starts with `prefix/` (`'0'` follows `'/'`).
fn children(prefix: &str) -> (String, String) {
    (format!("{prefix}/"), format!("{prefix}0"))
}

fn require_job(txn: &WriteTransaction, job: &str) -> Result<(), StateError> {
    let jobs = txn
        .open_table(JOBS)
        .map_err(backend("opening table jobs"))?;
    match jobs.get(job).map_err(backend("reading table jobs"))? {
        Some(_) => Ok(()),
        None => Err(StateError::JobNotFound(job.to_string())),
    }
}

#[async_trait]
impl StateStore for EmbeddedStore {
    async fn close(&self) {
        if let Some(thread) = self.stop_writer() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let taken = self.db.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut db) = taken else { return };
        // A transaction still running on the blocking pool holds a clone; it is short, so wait
        // for it (bounded) to be sure the file lock is gone when `close` returns.
        for _ in 0..500 {
            match Arc::try_unwrap(db) {
                Ok(db) => {
                    drop(db);
                    return;
                }
                Err(shared) => db = shared,
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tracing::warn!(
            path = %self.path.display(),
            "a state transaction is still running after 5 s; the file is released when it ends"
        );
    }

    async fn create_job(&self, job: &JobRecord) -> Result<CreateJob, StateError> {
        check_name("job", &job.id)?;
        let id = job.id.clone();
        let bytes = encode("job", job)?;
        self.write("create_job", move |txn| {
            let mut jobs = txn
                .open_table(JOBS)
                .map_err(backend("opening table jobs"))?;
            if let Some(existing) = jobs
                .get(id.as_str())
                .map_err(backend("reading table jobs"))?
            {
                let record = decode(|| format!("job {id:?}"), existing.value())?;
                return Ok(Txn::Abort(CreateJob::Exists(record)));
            }
            jobs.insert(id.as_str(), bytes.as_slice())
                .map_err(backend("writing table jobs"))?;
            Ok(Txn::Commit(CreateJob::Created))
        })
        .await
    }

    async fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StateError> {
        let id = id.to_string();
        self.read("get_job", move |txn| {
            let jobs = txn
                .open_table(JOBS)
                .map_err(backend("opening table jobs"))?;
            let value = jobs
                .get(id.as_str())
                .map_err(backend("reading table jobs"))?;
            value
                .map(|v| decode(|| format!("job {id:?}"), v.value()))
                .transpose()
        })
        .await
    }

    async fn list_jobs(&self) -> Result<Vec<JobRecord>, StateError> {
        self.read("list_jobs", |txn| {
            let jobs = txn
                .open_table(JOBS)
                .map_err(backend("opening table jobs"))?;
            let mut out = Vec::new();
            for entry in jobs.iter().map_err(backend("reading table jobs"))? {
                let (k, v) = entry.map_err(backend("reading table jobs"))?;
                out.push(decode(|| format!("job {:?}", k.value()), v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn update_job(&self, job: &JobRecord) -> Result<(), StateError> {
        let id = job.id.clone();
        let bytes = encode("job", job)?;
        self.write("update_job", move |txn| {
            require_job(txn, &id)?;
            let mut jobs = txn
                .open_table(JOBS)
                .map_err(backend("opening table jobs"))?;
            jobs.insert(id.as_str(), bytes.as_slice())
                .map_err(backend("writing table jobs"))?;
            Ok(Txn::Commit(()))
        })
        .await
    }

    async fn load_object(&self, job: &str, object: &str) -> Result<ObjectRecord, StateError> {
        check_names(job, object)?;
        let prefix = key(job, Some(object), &[]);
        self.read("load_object", move |txn| {
            let (lo, hi) = children(&prefix);
            let mut record = ObjectRecord::default();

            let commits = txn
                .open_table(COMMITS)
                .map_err(backend("opening table commits"))?;
            for entry in commits
                .range(lo.as_str()..hi.as_str())
                .map_err(backend("reading table commits"))?
            {
                let (k, v) = entry.map_err(backend("reading table commits"))?;
                let k = k.value();
                let round = parse_num("commit", k, &k[lo.len()..])?;
                record
                    .commits
                    .insert(round, decode(|| format!("commit {k:?}"), v.value())?);
            }

            let failures = txn
                .open_table(FAILURES)
                .map_err(backend("opening table failures"))?;
            let mut by_round: BTreeMap<u32, Vec<FailureRecord>> = BTreeMap::new();
            for entry in failures
                .range(lo.as_str()..hi.as_str())
                .map_err(backend("reading table failures"))?
            {
                let (k, v) = entry.map_err(backend("reading table failures"))?;
                let k = k.value();
                let rest = &k[lo.len()..];
                let Some((round, _seq)) = rest.split_once('/') else {
                    return Err(StateError::Corrupt {
                        what: "failure".into(),
                        detail: format!("key {k:?} has no sequence number"),
                    });
                };
                let round = parse_num("failure", k, round)?;
                // Keys sort by zero-padded sequence number, so pushes keep the order of arrival.
                by_round
                    .entry(round)
                    .or_default()
                    .push(decode(|| format!("failure {k:?}"), v.value())?);
            }
            record.failures = by_round;

            let quarantines = txn
                .open_table(QUARANTINES)
                .map_err(backend("opening table quarantines"))?;
            for entry in quarantines
                .range(lo.as_str()..hi.as_str())
                .map_err(backend("reading table quarantines"))?
            {
                let (k, v) = entry.map_err(backend("reading table quarantines"))?;
                let k = k.value();
                let round = parse_num("quarantine", k, &k[lo.len()..])?;
                record
                    .quarantined
                    .insert(round, decode(|| format!("quarantine {k:?}"), v.value())?);
            }

            let merges = txn
                .open_table(MERGES)
                .map_err(backend("opening table merges"))?;
            if let Some(v) = merges
                .get(prefix.as_str())
                .map_err(backend("reading table merges"))?
            {
                record.merge = Some(decode(|| format!("merge {prefix:?}"), v.value())?);
            }
            Ok(record)
        })
        .await
    }

    async fn commit_round(
        &self,
        job: &str,
        object: &str,
        commit: &CommitRecord,
    ) -> Result<CommitOutcome, StateError> {
        check_names(job, object)?;
        let job = job.to_string();
        let k = key(&job, Some(object), &[commit.round]);
        let bytes = encode("commit", commit)?;
        self.write("commit_round", move |txn| {
            require_job(txn, &job)?;
            let quarantines = txn
                .open_table(QUARANTINES)
                .map_err(backend("opening table quarantines"))?;
            if quarantines
                .get(k.as_str())
                .map_err(backend("reading table quarantines"))?
                .is_some()
            {
                return Ok(Txn::Abort(CommitOutcome::Quarantined));
            }
            let mut commits = txn
                .open_table(COMMITS)
                .map_err(backend("opening table commits"))?;
            if let Some(existing) = commits
                .get(k.as_str())
                .map_err(backend("reading table commits"))?
            {
                let first: CommitRecord = decode(|| format!("commit {k:?}"), existing.value())?;
                return Ok(Txn::Abort(CommitOutcome::AlreadyCommitted(first)));
            }
            commits
                .insert(k.as_str(), bytes.as_slice())
                .map_err(backend("writing table commits"))?;
            Ok(Txn::Commit(CommitOutcome::Committed))
        })
        .await
    }

    async fn record_failure(
        &self,
        job: &str,
        object: &str,
        round: u32,
        failure: &FailureRecord,
    ) -> Result<u32, StateError> {
        check_names(job, object)?;
        let job = job.to_string();
        let round_key = key(&job, Some(object), &[round]);
        let bytes = encode("failure", failure)?;
        self.write("record_failure", move |txn| {
            require_job(txn, &job)?;
            let mut failures = txn
                .open_table(FAILURES)
                .map_err(backend("opening table failures"))?;
            let (lo, hi) = children(&round_key);
            // Sequence numbers count from 0 without gaps, so the next one is the number of
            // failures the round holds so far; the round then holds one more.
            let seq = {
                let last = failures
                    .range(lo.as_str()..hi.as_str())
                    .map_err(backend("reading table failures"))?
                    .next_back()
                    .transpose()
                    .map_err(backend("reading table failures"))?;
                match last {
                    None => Some(0),
                    Some((k, _)) => {
                        parse_num("failure", k.value(), &k.value()[lo.len()..])?.checked_add(1)
                    }
                }
            };
            let (seq, count) = seq
                .and_then(|s| Some((s, s.checked_add(1)?)))
                .ok_or_else(|| StateError::Corrupt {
                    what: "failure".into(),
                    detail: format!("round {round_key:?} holds too many failures to count"),
                })?;
            let k = format!("{lo}{seq:0NUM_WIDTH$}");
            failures
                .insert(k.as_str(), bytes.as_slice())
                .map_err(backend("writing table failures"))?;
            Ok(Txn::Commit(count))
        })
        .await
    }

    async fn quarantine_round(
        &self,
        job: &str,
        object: &str,
        quarantine: &QuarantineRecord,
    ) -> Result<QuarantineOutcome, StateError> {
        check_names(job, object)?;
        let job = job.to_string();
        let k = key(&job, Some(object), &[quarantine.round]);
        let bytes = encode("quarantine", quarantine)?;
        self.write("quarantine_round", move |txn| {
            require_job(txn, &job)?;
            let commits = txn
                .open_table(COMMITS)
                .map_err(backend("opening table commits"))?;
            if let Some(existing) = commits
                .get(k.as_str())
                .map_err(backend("reading table commits"))?
            {
                let first: CommitRecord = decode(|| format!("commit {k:?}"), existing.value())?;
                return Ok(Txn::Abort(QuarantineOutcome::AlreadyCommitted(first)));
            }
            let mut quarantines = txn
                .open_table(QUARANTINES)
                .map_err(backend("opening table quarantines"))?;
            if quarantines
                .get(k.as_str())
                .map_err(backend("reading table quarantines"))?
                .is_some()
            {
                return Ok(Txn::Abort(QuarantineOutcome::AlreadyQuarantined));
            }
            quarantines
                .insert(k.as_str(), bytes.as_slice())
                .map_err(backend("writing table quarantines"))?;
            Ok(Txn::Commit(QuarantineOutcome::Quarantined))
        })
        .await
    }

    async fn quarantine_committed(
        &self,
        job: &str,
        object: &str,
        attempt: &str,
        quarantine: &QuarantineRecord,
    ) -> Result<QuarantineOutcome, StateError> {
        check_names(job, object)?;
        let job = job.to_string();
        let attempt = attempt.to_string();
        let k = key(&job, Some(object), &[quarantine.round]);
        let bytes = encode("quarantine", quarantine)?;
        self.write("quarantine_committed", move |txn| {
            require_job(txn, &job)?;
            let mut quarantines = txn
                .open_table(QUARANTINES)
                .map_err(backend("opening table quarantines"))?;
            if quarantines
                .get(k.as_str())
                .map_err(backend("reading table quarantines"))?
                .is_some()
            {
                return Ok(Txn::Abort(QuarantineOutcome::AlreadyQuarantined));
            }
            let mut commits = txn
                .open_table(COMMITS)
                .map_err(backend("opening table commits"))?;
            let existing = commits
                .get(k.as_str())
                .map_err(backend("reading table commits"))?
                .map(|v| decode::<CommitRecord>(|| format!("commit {k:?}"), v.value()))
                .transpose()?;
            if let Some(first) = existing {
                if first.attempt != attempt {
                    return Ok(Txn::Abort(QuarantineOutcome::AlreadyCommitted(first)));
                }
                commits
                    .remove(k.as_str())
                    .map_err(backend("writing table commits"))?;
            }
            quarantines
                .insert(k.as_str(), bytes.as_slice())
                .map_err(backend("writing table quarantines"))?;
            Ok(Txn::Commit(QuarantineOutcome::Quarantined))
        })
        .await
    }

    async fn record_merge(
        &self,
        job: &str,
        object: &str,
        merge: &MergeRecord,
    ) -> Result<(), StateError> {
        check_names(job, object)?;
        let job = job.to_string();
        let k = key(&job, Some(object), &[]);
        let bytes = encode("merge", merge)?;
        self.write("record_merge", move |txn| {
            require_job(txn, &job)?;
            let mut merges = txn
                .open_table(MERGES)
                .map_err(backend("opening table merges"))?;
            merges
                .insert(k.as_str(), bytes.as_slice())
                .map_err(backend("writing table merges"))?;
            Ok(Txn::Commit(()))
        })
        .await
    }

    async fn bump_epoch(&self) -> Result<u64, StateError> {
        self.write("bump_epoch", |txn| {
            let mut meta = txn
                .open_table(META)
                .map_err(backend("opening table meta"))?;
            let current = meta
                .get(EPOCH)
                .map_err(backend("reading table meta"))?
                .map(|v| v.value())
                .unwrap_or(0);
            let next = current.checked_add(1).ok_or_else(|| StateError::Corrupt {
                what: "epoch".into(),
                detail: format!("{current} cannot be incremented"),
            })?;
            meta.insert(EPOCH, next)
                .map_err(backend("writing table meta"))?;
            Ok(Txn::Commit(next))
        })
        .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::state::conformance;

    fn open_in(dir: &tempfile::TempDir, name: &str) -> EmbeddedStore {
        EmbeddedStore::open(&dir.path().join(name)).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let n = AtomicUsize::new(0);
        conformance::run_all(|| {
            let path = dir
                .path()
                .join(format!("state-{}.redb", n.fetch_add(1, Ordering::Relaxed)));
            async move { EmbeddedStore::open(&path).unwrap() }
        })
        .await;
    }

    #[test]
    fn keys_sort_numerically_and_stay_under_their_prefix() {
        assert_eq!(key("j", None, &[]), "j");
        assert_eq!(key("j", Some("o"), &[]), "j/o");
        assert_eq!(key("j", Some("o"), &[7]), "j/o/0000000007");
        assert_eq!(key("j", Some("o"), &[7, 12]), "j/o/0000000007/0000000012");
        assert_eq!(key("j", Some("o"), &[u32::MAX]), "j/o/4294967295");
        assert!(key("j", Some("o"), &[9]) < key("j", Some("o"), &[10]));
        let (lo, hi) = children("j/o");
        for inside in [
            key("j", Some("o"), &[0]),
            key("j", Some("o"), &[u32::MAX, u32::MAX]),
        ] {
            assert!(lo <= inside && inside < hi, "{inside}");
        }
        // Neighbouring objects whose names extend this one's stay outside its range.
        for outside in [
            "j/o-1/0000000000",
            "j/o.b/0000000000",
            "j/o_/0000000000",
            "j/oo/0000000000",
            "j/o",
        ] {
            assert!(
                !(lo.as_str() <= outside && outside < hi.as_str()),
                "{outside}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_creates_missing_parent_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("b").join("state.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.path(), path);
        assert!(path.is_file());
        assert_eq!(store.bump_epoch().await.unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_sees_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open_in(&dir, "state.redb");
            conformance::write_durable_sample(&store).await;
        }
        conformance::assert_durable_sample(&open_in(&dir, "state.redb")).await;
    }

    /// Env var that turns [`kill_child`] into the process that is killed.
    const KILL_CHILD_ENV: &str = "QUARRY_STATE_KILL_CHILD";
    const KILL_CHILD_MARK: &str = "quarry-state-kill-child: committed";

    /// A commit that returned `Ok` survives kill -9 of the process that made it: a child
    /// process (this test binary, running [`kill_child`]) commits, says so, and is killed with
    /// SIGKILL while the store is still open; the file then opens with the commit in it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_commit_survives_kill_9() {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "state::embedded::tests::kill_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(KILL_CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let marked = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .any(|l| l.contains(KILL_CHILD_MARK))
        });
        let marked = tokio::time::timeout(std::time::Duration::from_secs(60), marked).await;
        // Child::kill sends SIGKILL: no destructor, no clean close of the database.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            matches!(marked, Ok(Ok(true))),
            "the child never reported its commit: {marked:?}"
        );

        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            store.get_job("j").await.unwrap(),
            Some(conformance::job("j"))
        );
        let object = store.load_object("j", "o").await.unwrap();
        assert_eq!(
            object.commits,
            BTreeMap::from([(0, conformance::commit(0, "e1-a"))])
        );
        assert_eq!(store.bump_epoch().await.unwrap(), 2);
    }

    /// The process [`acknowledged_commit_survives_kill_9`] kills; does nothing unless started
    /// by it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_child() {
        let Some(path) = std::env::var_os(KILL_CHILD_ENV) else {
            return;
        };
        let store = EmbeddedStore::open(Path::new(&path)).unwrap();
        assert_eq!(store.bump_epoch().await.unwrap(), 1);
        store.create_job(&conformance::job("j")).await.unwrap();
        let outcome = store
            .commit_round("j", "o", &conformance::commit(0, "e1-a"))
            .await
            .unwrap();
        assert_eq!(outcome, CommitOutcome::Committed);
        println!("{KILL_CHILD_MARK}");
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_open_of_a_live_file_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let first = EmbeddedStore::open(&path).unwrap();
        let err = EmbeddedStore::open(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StateError::Backend(_)), "{err:?}");
        assert!(
            msg.contains("another coordinator is using the state file"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        // The first store is unaffected, and the file opens again once it is gone.
        assert_eq!(first.bump_epoch().await.unwrap(), 1);
        drop(first);
        let again = EmbeddedStore::open(&path).unwrap();
        assert_eq!(again.bump_epoch().await.unwrap(), 2);
    }

    /// Concurrent writers share transactions (group commit): 256 commits of distinct rounds
    /// all succeed with far fewer fsyncs than commits, and all are there after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_commits_share_transactions_and_all_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = Arc::new(EmbeddedStore::open(&path).unwrap());
        store.create_job(&conformance::job("j")).await.unwrap();
        let before = store.transactions_committed();
        let tasks: Vec<_> = (0..256u32)
            .map(|r| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .commit_round("j", "obj", &conformance::commit(r, &format!("e1a{r}")))
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), CommitOutcome::Committed);
        }
        let txns = store.transactions_committed() - before;
        assert!(
            txns < 256,
            "256 commits took {txns} transactions: no grouping"
        );
        drop(store);
        let again = EmbeddedStore::open(&path).unwrap();
        assert_eq!(
            again.load_object("j", "obj").await.unwrap().commits.len(),
            256
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_releases_the_file_while_handles_linger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let first = Arc::new(EmbeddedStore::open(&path).unwrap());
        assert_eq!(first.bump_epoch().await.unwrap(), 1);
        // A clone held elsewhere (a task winding down) must not keep the file locked.
        let lingering = Arc::clone(&first);
        first.close().await;
        let again = EmbeddedStore::open(&path).unwrap();
        assert_eq!(again.bump_epoch().await.unwrap(), 2);
        let err = lingering.bump_epoch().await.unwrap_err();
        assert!(err.to_string().contains("is closed"), "{err}");
        // Closing twice is harmless.
        lingering.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn undecodable_record_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(&dir, "state.redb");
        store.create_job(&conformance::job("j")).await.unwrap();
        {
            let txn = store.db().unwrap().begin_write().unwrap();
            {
                let mut commits = txn.open_table(COMMITS).unwrap();
                commits
                    .insert(key("j", Some("o"), &[1]).as_str(), b"{not json".as_slice())
                    .unwrap();
                let mut jobs = txn.open_table(JOBS).unwrap();
                jobs.insert("k", b"[]".as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let err = store.load_object("j", "o").await.unwrap_err();
        assert!(
            matches!(&err, StateError::Corrupt { what, .. } if what.contains("j/o/0000000001")),
            "{err:?}"
        );
        let err = store
            .commit_round("j", "o", &conformance::commit(1, "e1-a"))
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
        let err = store.list_jobs().await.unwrap_err();
        assert!(
            matches!(&err, StateError::Corrupt { what, .. } if what.contains("\"k\"")),
            "{err:?}"
        );
        // Other rounds and objects are unaffected.
        assert_eq!(
            store
                .commit_round("j", "o", &conformance::commit(2, "e1-a"))
                .await
                .unwrap(),
            CommitOutcome::Committed
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn names_that_would_break_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(&dir, "state.redb");
        store.create_job(&conformance::job("j")).await.unwrap();
        let err = store
            .commit_round("j", "a/b", &conformance::commit(0, "e1-a"))
            .await
            .unwrap_err();
        assert!(matches!(err, StateError::Backend(_)), "{err:?}");
        assert!(store.create_job(&conformance::job("x/y")).await.is_err());
        assert_eq!(store.list_jobs().await.unwrap().len(), 1);
    }
}
