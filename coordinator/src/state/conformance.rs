//! The conformance suite of [`StateStore`]: the contract of its doc comment, as assertions.
//!
//! Every implementation runs it from its tests with a factory of fresh, empty stores (a new
//! file for the embedded store; a fresh key prefix on a shared server for etcd):
//!
//! ```text
//! #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
//! async fn conformance_suite() {
//!     quarry_coordinator::state::conformance::run_all(|| async { make_fresh_store().await }).await;
//! }
//! ```
//!
//! Run it on a multi-thread runtime: the race properties spawn tasks that must really run at
//! the same time. Each property is also a public function taking one fresh store, for a
//! backend that wants one test per property. A failed property panics with its name.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use tokio::sync::Barrier;

use super::{
    CommitOutcome, CommitRecord, CreateJob, FailureRecord, FileRecord, JobRecord, JobState,
    MergeRecord, ObjectRecord, QuarantineOutcome, QuarantineRecord, RoundGpuStats, RoundYield,
    StateError, StateStore,
};
use crate::spec::{FinalDirMode, JobSpec};

/// Tasks racing on one round (or the epoch) in the concurrency properties.
pub const RACERS: usize = 16;

/// Runs every property, each against a fresh, empty store from `make`.
pub async fn run_all<F, Fut, S>(mut make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
    S: StateStore,
{
    macro_rules! property {
        ($name:ident) => {{
            eprintln!("state conformance: {}", stringify!($name));
            let store: Arc<dyn StateStore> = Arc::new(make().await);
            $name(store).await;
        }};
    }
    property!(create_job_is_create_if_absent);
    property!(get_list_and_update_jobs);
    property!(update_of_missing_job_fails);
    property!(first_commit_wins);
    property!(concurrent_commits_have_one_winner);
    property!(commits_are_independent);
    property!(quarantine_blocks_commit);
    property!(commit_blocks_quarantine);
    property!(quarantine_is_idempotent);
    property!(commit_and_quarantine_race_has_one_winner);
    property!(failures_count_per_round);
    property!(merge_is_stored_and_replaced);
    property!(untouched_object_is_empty);
    property!(epoch_counts_up);
    property!(writes_to_unknown_job_fail);
}

// ----- fixtures -----

/// A valid job record with id (and experiment name) `id`.
pub fn job(id: &str) -> JobRecord {
    JobRecord {
        id: id.to_string(),
        spec: JobSpec {
            exp_name: id.to_string(),
            objects: vec!["obj".into(), "obj-2".into()],
            target_count_per_object: 1000,
            round_batch_size: 64,
            num_iterations: 100,
            seed_base: 12_345,
            seed_stride: crate::spec::DEFAULT_SEED_STRIDE,
            max_rounds: None,
            final_dir_mode: FinalDirMode::SeedOnly,
            keep_intermediate: false,
            retries: 2,
            retry_backoff_ms: 1_000,
            root: "/data/quarry".into(),
            generator: JobSpec::legacy_generator(),
            merge: Default::default(),
        },
        created_unix_ms: 1_700_000_000_000,
        state: JobState::Running,
    }
}

/// A commit of `round` by `attempt`; records of different attempts differ in every field
/// an attempt sets.
pub fn commit(round: u32, attempt: &str) -> CommitRecord {
    CommitRecord {
        round,
        seed: 12_345 + i64::from(round),
        attempt: attempt.to_string(),
        count: 64,
        files: vec![FileRecord {
            name: "samples.npy".into(),
            key: format!("staging/{attempt}/samples.npy"),
            size: 4096,
            sha256: format!(
                "{:0<64.64}",
                attempt
                    .bytes()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
            count: 64,
            schema: "f4:(64,3)".into(),
            kept: Some(60),
        }],
        worker: format!("worker-of-{attempt}"),
        generator_ms: 1234,
        committed_unix_ms: 1_700_000_000_000 + u64::from(round),
        gpu: Some(RoundGpuStats {
            utilization_mean_pct: 50 + round % 50,
            memory_peak_mib: 1024 + u64::from(attempt.len() as u32),
            samples: 3,
        }),
        log_key: Some(format!("staging/{attempt}/generator.log")),
        kept: Some(60),
        yield_stats: Some(RoundYield {
            attempts: 90,
            successes: 64,
        }),
    }
}

pub fn failure(attempt: &str) -> FailureRecord {
    FailureRecord {
        attempt: attempt.to_string(),
        kind: "exit".into(),
        message: format!("{attempt} exited with status 1"),
        log_tail: "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n"
            .into(),
        worker: "w1".into(),
        unix_ms: 1_700_000_000_000,
    }
}

pub fn quarantine(round: u32) -> QuarantineRecord {
    QuarantineRecord {
        round,
        seed: 12_345 + i64::from(round),
        reason: "3 failed attempts".into(),
        log_tail: "RuntimeError: CUDA out of memory\n".into(),
        attempts: 3,
        unix_ms: 1_700_000_000_000,
    }
}

pub fn merge(complete: bool) -> MergeRecord {
    MergeRecord {
        finals: vec!["final_seed_12345-12360/obj/obj.npy".into()],
        count: 1000,
        rounds: vec![0, 1, 2, 4],
        seed_min: 12_345,
        seed_max: 12_360,
        sha256: "ab".repeat(32),
        bytes: 65_536,
        cleaned: false,
        complete,
        unix_ms: 1_700_000_000_000,
        filtered: 7,
        duplicates: 2,
    }
}

fn ok<T>(what: &str, r: Result<T, StateError>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: unexpected error: {e} ({e:?})"))
}

async fn create(store: &dyn StateStore, id: &str) -> JobRecord {
    let j = job(id);
    assert_eq!(
        ok("create_job", store.create_job(&j).await),
        CreateJob::Created,
        "create_job({id})"
    );
    j
}

async fn load(store: &dyn StateStore, job: &str, object: &str) -> ObjectRecord {
    ok("load_object", store.load_object(job, object).await)
}

fn assert_job_not_found<T: std::fmt::Debug>(what: &str, job: &str, r: Result<T, StateError>) {
    match r {
        Err(StateError::JobNotFound(id)) => {
            assert_eq!(id, job, "{what}: JobNotFound names the job")
        }
        other => panic!("{what}: want JobNotFound({job:?}), got {other:?}"),
    }
}

// ----- durability -----

/// Writes one record of every kind (job `job-1`, object `obj`: a commit of round 3, two
/// failures and a quarantine of round 4, a merge) and bumps the epoch to 1. A backend's restart
/// test calls this, restarts (reopens the file, restarts the server), then
/// [`assert_durable_sample`].
pub async fn write_durable_sample(store: &dyn StateStore) {
    assert_eq!(ok("bump_epoch", store.bump_epoch().await), 1);
    create(store, "job-1").await;
    assert_eq!(
        ok(
            "commit_round",
            store.commit_round("job-1", "obj", &commit(3, "e1-a")).await
        ),
        CommitOutcome::Committed
    );
    for want in 1..=2 {
        assert_eq!(
            ok(
                "record_failure",
                store
                    .record_failure("job-1", "obj", 4, &failure("e1-b"))
                    .await
            ),
            want
        );
    }
    assert_eq!(
        ok(
            "quarantine_round",
            store.quarantine_round("job-1", "obj", &quarantine(4)).await
        ),
        QuarantineOutcome::Quarantined
    );
    ok(
        "record_merge",
        store.record_merge("job-1", "obj", &merge(true)).await,
    );
}

/// After a restart: everything [`write_durable_sample`] wrote is there, the epoch and the
/// failure sequence continue where they were, and the commit still wins.
pub async fn assert_durable_sample(store: &dyn StateStore) {
    let j = job("job-1");
    assert_eq!(ok("list_jobs", store.list_jobs().await), vec![j.clone()]);
    assert_eq!(ok("get_job", store.get_job("job-1").await), Some(j));
    let object = load(store, "job-1", "obj").await;
    assert_eq!(object.commits, BTreeMap::from([(3, commit(3, "e1-a"))]));
    assert_eq!(
        object.failures,
        BTreeMap::from([(4, vec![failure("e1-b"), failure("e1-b")])])
    );
    assert_eq!(object.quarantined, BTreeMap::from([(4, quarantine(4))]));
    assert_eq!(object.merge, Some(merge(true)));
    assert_eq!(ok("bump_epoch", store.bump_epoch().await), 2);
    assert_eq!(
        ok(
            "record_failure",
            store
                .record_failure("job-1", "obj", 4, &failure("e1-b"))
                .await
        ),
        3
    );
    assert_eq!(
        ok(
            "commit_round",
            store.commit_round("job-1", "obj", &commit(3, "e2-a")).await
        ),
        CommitOutcome::AlreadyCommitted(commit(3, "e1-a"))
    );
}

// ----- properties -----

/// `create_job` creates once; a second create with another record returns the original,
/// unchanged, and does not overwrite it.
pub async fn create_job_is_create_if_absent(store: Arc<dyn StateStore>) {
    let original = create(&*store, "job-a").await;
    let mut other = job("job-a");
    other.created_unix_ms += 1;
    other.state = JobState::Cancelled;
    other.spec.target_count_per_object = 5;
    assert_eq!(
        ok("create_job again", store.create_job(&other).await),
        CreateJob::Exists(original.clone())
    );
    assert_eq!(
        ok("create_job same", store.create_job(&original).await),
        CreateJob::Exists(original.clone())
    );
    assert_eq!(
        ok("get_job", store.get_job("job-a").await),
        Some(original.clone())
    );
    assert_eq!(ok("list_jobs", store.list_jobs().await), vec![original]);
}

/// `get_job` returns what was stored (`None` when absent), `list_jobs` returns every job
/// ordered by id, `update_job` replaces a record.
pub async fn get_list_and_update_jobs(store: Arc<dyn StateStore>) {
    assert_eq!(
        ok("list_jobs on an empty store", store.list_jobs().await),
        Vec::<JobRecord>::new()
    );
    assert_eq!(
        ok("get_job of a missing job", store.get_job("nope").await),
        None
    );

    // Created out of order; includes ids that are prefixes of others and every allowed
    // punctuation character, which sort before letters.
    let ids = [
        "job-b", "job", "Job.c", "job-a", "job_a", "job-a.1", "9lives", "job-a-2",
    ];
    let mut created = Vec::new();
    for id in ids {
        created.push(create(&*store, id).await);
    }
    created.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        ok("list_jobs", store.list_jobs().await),
        created,
        "list_jobs is ordered by id"
    );
    for j in &created {
        assert_eq!(ok("get_job", store.get_job(&j.id).await).as_ref(), Some(j));
    }
    assert_eq!(
        ok("get_job of a prefix of a job", store.get_job("jo").await),
        None
    );

    let mut updated = job("job-a");
    updated.state = JobState::Done;
    updated.spec.retries = 7;
    ok("update_job", store.update_job(&updated).await);
    assert_eq!(
        ok("get_job after update", store.get_job("job-a").await),
        Some(updated.clone())
    );
    let mut again = updated.clone();
    again.state = JobState::Incomplete;
    ok("update_job again", store.update_job(&again).await);
    assert_eq!(
        ok("get_job after second update", store.get_job("job-a").await),
        Some(again.clone())
    );

    let listed = ok("list_jobs after update", store.list_jobs().await);
    assert_eq!(listed.len(), created.len());
    for (l, c) in listed.iter().zip(&created) {
        if l.id == "job-a" {
            assert_eq!(l, &again);
        } else {
            assert_eq!(l, c, "update_job touched only its own job");
        }
    }
}

/// `update_job` of a job that does not exist fails and creates nothing.
pub async fn update_of_missing_job_fails(store: Arc<dyn StateStore>) {
    let j = job("ghost");
    assert_job_not_found("update_job", "ghost", store.update_job(&j).await);
    assert_eq!(ok("get_job", store.get_job("ghost").await), None);
    assert_eq!(
        ok("list_jobs", store.list_jobs().await),
        Vec::<JobRecord>::new()
    );
}

/// The first commit of a round wins; a later one gets the first record back and writes
/// nothing.
pub async fn first_commit_wins(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let first = commit(5, "e1-a");
    let second = commit(5, "e1-b");
    assert_eq!(
        ok("first commit", store.commit_round("j", "obj", &first).await),
        CommitOutcome::Committed
    );
    assert_eq!(
        ok(
            "second commit",
            store.commit_round("j", "obj", &second).await
        ),
        CommitOutcome::AlreadyCommitted(first.clone())
    );
    // The same attempt again (a retried RPC) also learns it is the winner's record.
    assert_eq!(
        ok(
            "repeated commit",
            store.commit_round("j", "obj", &first).await
        ),
        CommitOutcome::AlreadyCommitted(first.clone())
    );
    let object = load(&*store, "j", "obj").await;
    assert_eq!(object.commits, BTreeMap::from([(5, first)]));
    assert!(object.quarantined.is_empty() && object.failures.is_empty() && object.merge.is_none());
}

/// Of [`RACERS`] concurrent commits of one round exactly one gets `Committed`; every other
/// gets `AlreadyCommitted` with the winner's record, which is what is stored.
pub async fn concurrent_commits_have_one_winner(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    for round in 0..3u32 {
        let barrier = Arc::new(Barrier::new(RACERS));
        let mut tasks = Vec::new();
        for i in 0..RACERS {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            let record = commit(round, &format!("e1-r{round}-t{i}"));
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let outcome = store.commit_round("j", "obj", &record).await;
                (record, outcome)
            }));
        }
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for t in tasks {
            let (record, outcome) = t.await.unwrap_or_else(|e| panic!("commit task: {e}"));
            match ok("concurrent commit", outcome) {
                CommitOutcome::Committed => winners.push(record),
                CommitOutcome::AlreadyCommitted(first) => losers.push(first),
                CommitOutcome::Quarantined => panic!("round {round} was never quarantined"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one commit wins, got {:?}",
            winners.iter().map(|w| &w.attempt).collect::<Vec<_>>()
        );
        let winner = &winners[0];
        for l in &losers {
            assert_eq!(
                l, winner,
                "round {round}: every loser sees the winner's record"
            );
        }
        let object = load(&*store, "j", "obj").await;
        assert_eq!(
            object.commits.get(&round),
            Some(winner),
            "round {round}: the winner is stored"
        );
        assert_eq!(object.commits.len(), round as usize + 1);
    }
}

/// Commits to different rounds, objects and jobs do not see each other, including objects
/// and jobs whose names extend one another.
pub async fn commits_are_independent(store: Arc<dyn StateStore>) {
    for j in ["j", "j2", "j-2"] {
        create(&*store, j).await;
    }
    // (job, object, round); rounds 9 and 10 sort differently as text than as numbers.
    let targets = [
        ("j", "obj", 0u32),
        ("j", "obj", 1),
        ("j", "obj", 9),
        ("j", "obj", 10),
        ("j", "obj", u32::MAX),
        ("j", "obj-2", 0),
        ("j", "obj.2", 1),
        ("j", "ob", 0),
        ("j", "obj2", 0),
        ("j2", "obj", 0),
        ("j-2", "obj", 0),
    ];
    let mut want: BTreeMap<(&str, &str), BTreeMap<u32, CommitRecord>> = BTreeMap::new();
    for (j, o, r) in targets {
        let record = commit(r, &format!("e1-{j}-{o}-{r}"));
        assert_eq!(
            ok("commit", store.commit_round(j, o, &record).await),
            CommitOutcome::Committed,
            "commit of ({j}, {o}, {r}) is independent of the others"
        );
        want.entry((j, o)).or_default().insert(r, record);
    }
    for ((j, o), commits) in &want {
        let object = load(&*store, j, o).await;
        assert_eq!(
            &object.commits, commits,
            "load_object({j}, {o}) holds exactly its own commits"
        );
        let keys: Vec<u32> = object.commits.keys().copied().collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
    }
    // A failure, quarantine or merge of one object does not leak into its neighbours.
    ok(
        "record_failure",
        store.record_failure("j", "obj2", 3, &failure("e1-x")).await,
    );
    assert_eq!(
        ok(
            "quarantine_round",
            store.quarantine_round("j", "obj2", &quarantine(4)).await
        ),
        QuarantineOutcome::Quarantined
    );
    ok(
        "record_merge",
        store.record_merge("j", "obj2", &merge(true)).await,
    );
    for (j, o) in [("j", "obj"), ("j", "ob"), ("j", "obj-2"), ("j2", "obj2")] {
        let object = load(&*store, j, o).await;
        assert!(
            object.failures.is_empty() && object.quarantined.is_empty() && object.merge.is_none(),
            "load_object({j}, {o}) sees another object's records: {object:?}"
        );
    }
}

/// A quarantined round is never committed: the commit gets `Quarantined` and writes nothing.
pub async fn quarantine_blocks_commit(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let q = quarantine(2);
    assert_eq!(
        ok("quarantine", store.quarantine_round("j", "obj", &q).await),
        QuarantineOutcome::Quarantined
    );
    assert_eq!(
        ok(
            "commit of a quarantined round",
            store.commit_round("j", "obj", &commit(2, "e1-late")).await
        ),
        CommitOutcome::Quarantined
    );
    let object = load(&*store, "j", "obj").await;
    assert!(
        object.commits.is_empty(),
        "nothing was committed: {:?}",
        object.commits
    );
    assert_eq!(object.quarantined, BTreeMap::from([(2, q)]));
    // Neighbouring rounds still commit.
    assert_eq!(
        ok(
            "commit round 3",
            store.commit_round("j", "obj", &commit(3, "e1-a")).await
        ),
        CommitOutcome::Committed
    );
}

/// A quarantine never overwrites a commit: it gets `AlreadyCommitted` with the commit.
pub async fn commit_blocks_quarantine(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let c = commit(2, "e1-a");
    assert_eq!(
        ok("commit", store.commit_round("j", "obj", &c).await),
        CommitOutcome::Committed
    );
    assert_eq!(
        ok(
            "quarantine of a committed round",
            store.quarantine_round("j", "obj", &quarantine(2)).await
        ),
        QuarantineOutcome::AlreadyCommitted(c.clone())
    );
    let object = load(&*store, "j", "obj").await;
    assert_eq!(object.commits, BTreeMap::from([(2, c)]));
    assert!(
        object.quarantined.is_empty(),
        "nothing was quarantined: {:?}",
        object.quarantined
    );
}

/// Quarantining a round twice answers `AlreadyQuarantined` and keeps the first record.
pub async fn quarantine_is_idempotent(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let first = quarantine(7);
    let mut second = quarantine(7);
    second.reason = "a different reason".into();
    second.attempts = 9;
    assert_eq!(
        ok(
            "quarantine",
            store.quarantine_round("j", "obj", &first).await
        ),
        QuarantineOutcome::Quarantined
    );
    assert_eq!(
        ok(
            "quarantine again",
            store.quarantine_round("j", "obj", &second).await
        ),
        QuarantineOutcome::AlreadyQuarantined
    );
    assert_eq!(
        load(&*store, "j", "obj").await.quarantined,
        BTreeMap::from([(7, first)])
    );
}

/// Concurrent commits and quarantines of one round: either one commit wins and every
/// quarantine sees it, or one quarantine wins and every commit is refused.
pub async fn commit_and_quarantine_race_has_one_winner(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    for round in 0..4u32 {
        let barrier = Arc::new(Barrier::new(RACERS));
        let mut commits = Vec::new();
        let mut quarantines = Vec::new();
        for i in 0..RACERS {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            // Alternate which kind starts first so both kinds get to win some rounds.
            if (i + round as usize).is_multiple_of(2) {
                let record = commit(round, &format!("e1-r{round}-t{i}"));
                commits.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let outcome = store.commit_round("j", "obj", &record).await;
                    (record, outcome)
                }));
            } else {
                quarantines.push(tokio::spawn(async move {
                    barrier.wait().await;
                    store.quarantine_round("j", "obj", &quarantine(round)).await
                }));
            }
        }
        let mut committed = Vec::new();
        let mut commit_outcomes = Vec::new();
        for t in commits {
            let (record, outcome) = t.await.unwrap_or_else(|e| panic!("commit task: {e}"));
            let outcome = ok("racing commit", outcome);
            if outcome == CommitOutcome::Committed {
                committed.push(record);
            }
            commit_outcomes.push(outcome);
        }
        let mut quarantine_outcomes = Vec::new();
        for t in quarantines {
            quarantine_outcomes.push(ok(
                "racing quarantine",
                t.await.unwrap_or_else(|e| panic!("quarantine task: {e}")),
            ));
        }
        let quarantined = quarantine_outcomes
            .iter()
            .filter(|o| **o == QuarantineOutcome::Quarantined)
            .count();
        let object = load(&*store, "j", "obj").await;
        assert_eq!(
            committed.len() + quarantined,
            1,
            "round {round}: exactly one winner"
        );
        if let Some(winner) = committed.first() {
            for o in &commit_outcomes {
                assert!(
                    *o == CommitOutcome::Committed
                        || *o == CommitOutcome::AlreadyCommitted(winner.clone()),
                    "round {round}: {o:?}"
                );
            }
            for o in &quarantine_outcomes {
                assert_eq!(
                    *o,
                    QuarantineOutcome::AlreadyCommitted(winner.clone()),
                    "round {round}"
                );
            }
            assert_eq!(object.commits.get(&round), Some(winner));
            assert!(!object.quarantined.contains_key(&round));
        } else {
            for o in &commit_outcomes {
                assert_eq!(*o, CommitOutcome::Quarantined, "round {round}");
            }
            for o in &quarantine_outcomes {
                assert!(
                    matches!(
                        o,
                        QuarantineOutcome::Quarantined | QuarantineOutcome::AlreadyQuarantined
                    ),
                    "round {round}: {o:?}"
                );
            }
            assert_eq!(object.quarantined.get(&round), Some(&quarantine(round)));
            assert!(!object.commits.contains_key(&round));
        }
    }
}

/// `record_failure` counts per round (1, 2, 3, …) and `load_object` returns the failures of
/// each round in the order they were recorded.
pub async fn failures_count_per_round(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let mut want: BTreeMap<u32, Vec<FailureRecord>> = BTreeMap::new();
    for (round, n) in [(3u32, 3u32), (1, 1), (12, 12)] {
        for i in 1..=n {
            let mut f = failure(&format!("e1-r{round}-{i}"));
            f.unix_ms += u64::from(i);
            assert_eq!(
                ok(
                    "record_failure",
                    store.record_failure("j", "obj", round, &f).await
                ),
                i,
                "round {round}"
            );
            want.entry(round).or_default().push(f);
        }
    }
    // Another object's rounds count on their own.
    assert_eq!(
        ok(
            "record_failure",
            store
                .record_failure("j", "obj-2", 3, &failure("e1-o2"))
                .await
        ),
        1
    );
    let object = load(&*store, "j", "obj").await;
    assert_eq!(object.failures, want);
    assert!(object.commits.is_empty() && object.quarantined.is_empty());

    // Failures of a round that is later committed (a losing attempt) are kept.
    let c = commit(3, "e1-win");
    assert_eq!(
        ok("commit", store.commit_round("j", "obj", &c).await),
        CommitOutcome::Committed
    );
    assert_eq!(
        ok(
            "record_failure after commit",
            store
                .record_failure("j", "obj", 3, &failure("e1-late"))
                .await
        ),
        4
    );
    let object = load(&*store, "j", "obj").await;
    assert_eq!(object.failures.get(&3).map(Vec::len), Some(4));
    assert_eq!(object.commits, BTreeMap::from([(3, c)]));

    // Concurrent failures of one round get distinct counts.
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .record_failure("j", "obj", 20, &failure(&format!("e1-race-{i}")))
                .await
        }));
    }
    let mut counts = BTreeSet::new();
    for t in tasks {
        counts.insert(ok(
            "racing record_failure",
            t.await.unwrap_or_else(|e| panic!("failure task: {e}")),
        ));
    }
    assert_eq!(counts, (1..=RACERS as u32).collect::<BTreeSet<_>>());
    assert_eq!(
        load(&*store, "j", "obj")
            .await
            .failures
            .get(&20)
            .map(Vec::len),
        Some(RACERS)
    );
}

/// `record_merge` stores the merge record and a second call replaces it.
pub async fn merge_is_stored_and_replaced(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    let first = merge(false);
    ok("record_merge", store.record_merge("j", "obj", &first).await);
    assert_eq!(load(&*store, "j", "obj").await.merge, Some(first.clone()));
    let mut second = first.clone();
    second.cleaned = true;
    second.complete = true;
    second.finals.push("final/obj/obj.npy".into());
    ok(
        "record_merge again",
        store.record_merge("j", "obj", &second).await,
    );
    let object = load(&*store, "j", "obj").await;
    assert_eq!(object.merge, Some(second));
    assert!(
        object.commits.is_empty() && object.failures.is_empty() && object.quarantined.is_empty()
    );
    assert_eq!(load(&*store, "j", "obj-2").await.merge, None);
}

/// An object nothing was written for loads as empty.
pub async fn untouched_object_is_empty(store: Arc<dyn StateStore>) {
    create(&*store, "j").await;
    assert_eq!(load(&*store, "j", "obj").await, ObjectRecord::default());
    assert_eq!(
        ok(
            "commit",
            store.commit_round("j", "obj", &commit(0, "e1-a")).await
        ),
        CommitOutcome::Committed
    );
    assert_eq!(load(&*store, "j", "obj-2").await, ObjectRecord::default());
    assert_eq!(load(&*store, "j", "ob").await, ObjectRecord::default());
}

/// `bump_epoch` returns 1 on a fresh store and one more on every call, also under races.
pub async fn epoch_counts_up(store: Arc<dyn StateStore>) {
    for want in 1..=3u64 {
        assert_eq!(ok("bump_epoch", store.bump_epoch().await), want);
    }
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move { store.bump_epoch().await }));
    }
    let mut seen = BTreeSet::new();
    for t in tasks {
        seen.insert(ok(
            "racing bump_epoch",
            t.await.unwrap_or_else(|e| panic!("epoch task: {e}")),
        ));
    }
    assert_eq!(
        seen,
        (4..4 + RACERS as u64).collect::<BTreeSet<_>>(),
        "every bump gets its own epoch"
    );
    assert_eq!(
        ok("bump_epoch", store.bump_epoch().await),
        4 + RACERS as u64
    );
}

/// Writes to a job that does not exist fail with `JobNotFound` and write nothing.
pub async fn writes_to_unknown_job_fail(store: Arc<dyn StateStore>) {
    create(&*store, "other").await;
    assert_job_not_found(
        "commit_round",
        "ghost",
        store.commit_round("ghost", "obj", &commit(0, "e1-a")).await,
    );
    assert_job_not_found(
        "record_failure",
        "ghost",
        store
            .record_failure("ghost", "obj", 0, &failure("e1-a"))
            .await,
    );
    assert_job_not_found(
        "quarantine_round",
        "ghost",
        store.quarantine_round("ghost", "obj", &quarantine(1)).await,
    );
    assert_job_not_found(
        "record_merge",
        "ghost",
        store.record_merge("ghost", "obj", &merge(true)).await,
    );
    assert_job_not_found("update_job", "ghost", store.update_job(&job("ghost")).await);
    // Nothing was written: once the job exists its object is empty and the round commits.
    create(&*store, "ghost").await;
    assert_eq!(load(&*store, "ghost", "obj").await, ObjectRecord::default());
    assert_eq!(
        ok(
            "commit",
            store.commit_round("ghost", "obj", &commit(0, "e1-b")).await
        ),
        CommitOutcome::Committed
    );
    assert_eq!(
        ok(
            "quarantine",
            store.quarantine_round("ghost", "obj", &quarantine(1)).await
        ),
        QuarantineOutcome::Quarantined
    );
}
