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
//!
//! This file holds the runner, the fixtures and the durability sample; the properties are in
//! `properties.rs`.

mod properties;
pub use properties::*;

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
    property!(a_committed_round_that_cannot_merge_is_quarantined);
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
        // A final marked for the run's seed-tagged directory: the mark must survive a restart.
        publish_to: Some("final_seed_12345-212360".into()),
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
