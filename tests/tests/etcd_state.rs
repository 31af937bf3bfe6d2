//! The etcd state store against a real etcd, started by each test on free loopback ports with
//! its own data directory (Debian package `etcd-server`; the tests fail, never skip, without
//! it). The conformance suite gives every property a fresh key prefix on one shared server.
//! Each test owns its etcd through an [`Etcd`] guard that kills it when the test ends, passed
//! or panicked.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use quarry_coordinator::state::conformance;
use quarry_coordinator::state::etcd::EtcdStore;
use quarry_coordinator::state::{CommitOutcome, CreateJob, StateError, StateStore};
use quarry_tests::etcd::Etcd;

async fn connect(etcd: &Etcd, prefix: &str) -> EtcdStore {
    EtcdStore::connect(&etcd.endpoints(), prefix)
        .await
        .unwrap_or_else(|e| panic!("connecting to etcd with prefix {prefix:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite() {
    let etcd = Etcd::start().await;
    let n = AtomicUsize::new(0);
    let started = Instant::now();
    conformance::run_all(|| {
        let prefix = format!(
            "/quarry-test/conformance-{}",
            n.fetch_add(1, Ordering::Relaxed)
        );
        let etcd = &etcd;
        async move { connect(etcd, &prefix).await }
    })
    .await;
    eprintln!(
        "etcd state conformance: {} properties passed in {:?}",
        n.load(Ordering::Relaxed),
        started.elapsed()
    );
}

/// Everything acknowledged survives kill -9 and a restart of etcd; a fresh client sees it,
/// and so does the client that was connected before the restart once etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_a_restart_of_etcd() {
    let mut etcd = Etcd::start().await;
    let before = connect(&etcd, "/quarry").await;
    conformance::write_durable_sample(&before).await;

    etcd.restart().await;

    conformance::assert_durable_sample(&connect(&etcd, "/quarry").await).await;

    // The client from before the restart reconnects by itself (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(15);
    let seen = loop {
        match before.get_job("job-1").await {
            Ok(seen) => break seen,
            Err(e) if Instant::now() < deadline => {
                eprintln!("old client not back yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the client connected before the restart never recovered: {e}"),
        }
    };
    assert_eq!(seen, Some(conformance::job("job-1")));
    assert_eq!(before.bump_epoch().await.unwrap(), 3);
}

/// A commit under a job that does not exist under this store's prefix is `JobNotFound`,
/// even when a job of that name exists under another prefix or a similar name exists here;
/// nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_under_a_wrong_job_is_job_not_found() {
    let etcd = Etcd::start().await;
    let a = connect(&etcd, "/quarry/a").await;
    // Same prefix spelled with a trailing slash, and a prefix extending it.
    let a_again = connect(&etcd, "/quarry/a/").await;
    let ab = connect(&etcd, "/quarry/ab").await;
    assert_eq!(
        a.create_job(&conformance::job("j")).await.unwrap(),
        CreateJob::Created
    );
    let record = conformance::commit(0, "e1-a");
    for (store, job) in [(&ab, "j"), (&a, "j2"), (&a, "J"), (&a, "jj"), (&a, "i")] {
        match store.commit_round(job, "obj", &record).await {
            Err(StateError::JobNotFound(id)) => assert_eq!(id, job),
            other => panic!("commit under {job:?} in {store:?}: want JobNotFound, got {other:?}"),
        }
    }
    assert_eq!(ab.list_jobs().await.unwrap(), Vec::new());
    assert_eq!(
        a.commit_round("j", "obj", &record).await.unwrap(),
        CommitOutcome::Committed
    );
    assert_eq!(
        a_again.commit_round("j", "obj", &record).await.unwrap(),
        CommitOutcome::AlreadyCommitted(record.clone())
    );
    // Once `j` exists under the other prefix its round is still free there.
    assert_eq!(
        ab.create_job(&conformance::job("j")).await.unwrap(),
        CreateJob::Created
    );
    assert!(ab.load_object("j", "obj").await.unwrap().commits.is_empty());
    assert_eq!(
        ab.commit_round("j", "obj", &conformance::commit(0, "e1-b"))
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    assert_eq!(
        a.load_object("j", "obj").await.unwrap().commits,
        BTreeMap::from([(0, record)])
    );
}

/// With etcd gone, operations fail with `Backend` within the timeout instead of hanging,
/// and connecting to a dead endpoint fails the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_is_an_error_not_a_hang() {
    let mut etcd = Etcd::start().await;
    let timeout = Duration::from_secs(2);
    let store = EtcdStore::connect_with_timeout(&etcd.endpoints(), "/quarry", timeout)
        .await
        .unwrap();
    store.create_job(&conformance::job("j")).await.unwrap();
    etcd.kill();

    let started = Instant::now();
    let err = store
        .commit_round("j", "obj", &conformance::commit(0, "e1-a"))
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Backend(_)), "{err:?}");
    assert!(err.to_string().contains("commit_round"), "{err}");
    let err = store.load_object("j", "obj").await.unwrap_err();
    assert!(matches!(err, StateError::Backend(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let err = EtcdStore::connect_with_timeout(&etcd.endpoints(), "/quarry", timeout)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Backend(_)), "{err:?}");
    assert!(
        err.to_string().contains(&etcd.endpoints()[0]),
        "the error names the endpoint: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// Records etcd holds but that do not decode are `Corrupt`, naming the key; other rounds
/// are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_are_corrupt() {
    let etcd = Etcd::start().await;
    let store = connect(&etcd, "/quarry").await;
    store.create_job(&conformance::job("j")).await.unwrap();
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    raw.put("/quarry/commits/j/o/0000000001", "{not json", None)
        .await
        .unwrap();
    raw.put("/quarry/jobs/k", "[]", None).await.unwrap();
    raw.put("/quarry/meta/epoch", "-1", None).await.unwrap();

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
        matches!(&err, StateError::Corrupt { what, .. } if what.contains("jobs/k")),
        "{err:?}"
    );
    let err = store.bump_epoch().await.unwrap_err();
    assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
    assert_eq!(
        store
            .commit_round("j", "o", &conformance::commit(2, "e1-a"))
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    // Names that would break the key layout are refused before reaching etcd.
    assert!(matches!(
        store
            .commit_round("j", "a/b", &conformance::commit(0, "e1-a"))
            .await,
        Err(StateError::Backend(_))
    ));
    assert!(store.create_job(&conformance::job("x/y")).await.is_err());
}

/// Two coordinators campaign on one etcd: the first leads and commits; once it resigns
/// (as a paused leader's lease would expire) the second is elected, and the first one's
/// writes are refused as fenced, with its `lost` token cancelled, while the new leader's
/// commits go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_commit() {
    use quarry_coordinator::election::Election;

    let etcd = Etcd::start().await;
    let prefix = "/quarry-fence";
    let ttl = Duration::from_secs(3);
    let a = Election::connect(&etcd.endpoints(), prefix, ttl)
        .await
        .unwrap();
    let b = Election::connect(&etcd.endpoints(), prefix, ttl)
        .await
        .unwrap();
    let leader_a = a.campaign("a:50051").await.unwrap();
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("a:50051"));
    let fence_a = leader_a.fence();
    let lost_a = fence_a.lost.clone();
    let store_a = connect(&etcd, prefix).await.with_fence(fence_a);
    assert_eq!(
        store_a.create_job(&conformance::job("j")).await.unwrap(),
        CreateJob::Created
    );
    assert_eq!(
        store_a
            .commit_round("j", "obj", &conformance::commit(0, "e1a0"))
            .await
            .unwrap(),
        CommitOutcome::Committed
    );

    // B waits in the election while A leads.
    let b_campaign = tokio::spawn(async move {
        let l = b.campaign("b:50051").await.unwrap();
        (b, l)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b_campaign.is_finished(), "B was elected while A led");
    a.resign(leader_a).await;
    let (b, leader_b) = tokio::time::timeout(Duration::from_secs(10), b_campaign)
        .await
        .expect("B is elected once A resigns")
        .unwrap();
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("b:50051"));

    // A still holds its store handle, as a paused leader would: every write is refused.
    let err = store_a
        .commit_round("j", "obj", &conformance::commit(1, "e1a1"))
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Fenced(_)), "{err:?}");
    assert!(lost_a.is_cancelled(), "the deposed leader learns it lost");
    assert!(matches!(
        store_a.bump_epoch().await.unwrap_err(),
        StateError::Fenced(_)
    ));

    let store_b = connect(&etcd, prefix).await.with_fence(leader_b.fence());
    assert_eq!(
        store_b
            .commit_round("j", "obj", &conformance::commit(1, "e2a0"))
            .await
            .unwrap(),
        CommitOutcome::Committed
    );
    let obj = store_b.load_object("j", "obj").await.unwrap();
    let attempts: Vec<_> = obj.commits.values().map(|c| c.attempt.clone()).collect();
    assert_eq!(attempts, ["e1a0", "e2a0"], "round 1 holds B's commit only");
}

/// Concurrent commits share etcd transactions (group commit) and keep their meaning: 64
/// commits of distinct rounds plus two racing commits of one more round give 64 + 1
/// `Committed`, one `AlreadyCommitted`, and some of them went through a multi-commit
/// transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_are_batched_and_stay_exactly_once() {
    let etcd = Etcd::start().await;
    let store = std::sync::Arc::new(connect(&etcd, "/quarry-batch").await);
    store.create_job(&conformance::job("j")).await.unwrap();
    let mut tasks = Vec::new();
    for r in 0..64u32 {
        let s = std::sync::Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            s.commit_round("j", "obj", &conformance::commit(r, &format!("e1a{r}")))
                .await
        }));
    }
    for attempt in ["e1a100", "e1a101"] {
        let s = std::sync::Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            s.commit_round("j", "obj", &conformance::commit(100, attempt))
                .await
        }));
    }
    let (mut committed, mut already) = (0, 0);
    for t in tasks {
        match t.await.unwrap().unwrap() {
            CommitOutcome::Committed => committed += 1,
            CommitOutcome::AlreadyCommitted(_) => already += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((committed, already), (65, 1));
    let obj = store.load_object("j", "obj").await.unwrap();
    assert_eq!(obj.commits.len(), 65);
    assert!(
        store.commits_batched() > 0,
        "no commit went through a batch"
    );
}
