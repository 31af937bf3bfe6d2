//! The core exercised directly (no gRPC) and one batch completion over real gRPC: adopt
//! window, commit judgement against the store, stale attempts, batch acquire and complete.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quarry_common::storage::Store;
use quarry_common::transport::MAX_ROUNDS_PER_CALL;
use quarry_proto::v1 as pb;
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::spec::JobSpec;
use crate::state::embedded::EmbeddedStore;

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
        &first.lease.task.staging_prefix,
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
    assert_eq!(outcome, Verdict::Rejected, "{msg}");
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
    let files = upload(
        &store,
        &retry.lease.task.staging_prefix,
        b"same bytes",
        b"same bytes",
    )
    .await;
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
    assert_eq!(outcome, Verdict::Committed, "{msg}");
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
        // Long enough that the fast worker's lease (never renewed here) outlives its upload on a
        // loaded machine; the slow one's still expires well inside the 10 s wait below.
        lease_ttl: Duration::from_millis(1000),
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
    let stale_files = upload(
        &store,
        &stale.task.staging_prefix,
        b"slow attempt",
        b"slow attempt",
    )
    .await;
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
    let files = upload(
        &store,
        &retry.task.staging_prefix,
        b"fast attempt",
        b"fast attempt",
    )
    .await;
    let (outcome, _) = c
        .complete(&fast, retry.lease_id, files, 1, CompleteExtras::default())
        .await
        .unwrap();
    assert_eq!(outcome, Verdict::Committed);

    // A confused report naming the committed attempt's file deletes nothing.
    let committed_key = files_key(&retry.task.staging_prefix);
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
    assert_eq!(outcome, Verdict::Duplicate);
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
    assert_eq!(outcome, Verdict::Duplicate, "{msg}");
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
    let key = |l: &RoundLease| (l.object.clone(), l.round, l.seed, l.task.clone());
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
    let registered = client
        .register(pb::RegisterRequest {
            host: "h".into(),
            gpu: "0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (worker_id, secret) = (registered.worker_id, registered.worker_secret);
    let got = client
        .acquire(pb::AcquireRequest {
            worker_id: worker_id.clone(),
            worker_secret: secret.clone(),
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
        worker_secret: secret.clone(),
        lease_id: lease.lease_id,
        files,
        generator_ms: 1,
        ..Default::default()
    };
    let good0 = wire(upload(&store, prefix(&leases[0]), b"round bytes", b"round bytes").await);
    let bad1 = wire(upload(&store, prefix(&leases[1]), b"stored", b"hashed").await);
    let good2 = wire(upload(&store, prefix(&leases[2]), b"more bytes", b"more bytes").await);
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

/// Puts `stored` in the attempt's staging (`staging_prefix`) and returns the report of a
/// worker that hashed `reported`.
async fn upload(
    store: &Store,
    staging_prefix: &str,
    stored: &'static [u8],
    reported: &'static [u8],
) -> Vec<ReportedFile> {
    // Real `.npy` files of 10 rows, their data drawn from the given bytes, so that the
    // coordinator's own reading of the stored file agrees with an honest report.
    let (stored, reported) = (npy_rows(10, stored), npy_rows(10, reported));
    let key = files_key(staging_prefix);
    store.put_bytes(&key, stored).await.unwrap();
    vec![ReportedFile {
        name: "a.npy".into(),
        key,
        size: reported.len() as u64,
        sha256: hex(&sha2::Sha256::digest(&reported)),
        count: 10,
        schema: "npy <f4 (*, 3)".into(),
        kept: None,
    }]
}

/// A `<f4` `.npy` of `rows` × 3 as numpy writes it, its data `fill` repeated.
fn npy_rows(rows: u64, fill: &[u8]) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, 3), }}");
    let mut header = dict.into_bytes();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend((0..rows * 12).map(|i| fill[i as usize % fill.len()]));
    out
}

/// The staging prefix of a lease as the wire carries it.
fn prefix(lease: &pb::Lease) -> &str {
    &lease.task.as_ref().unwrap().staging_prefix
}

/// A report as a worker sends it.
fn wire(files: Vec<ReportedFile>) -> Vec<pb::UploadedFile> {
    files.into_iter().map(pb::UploadedFile::from).collect()
}

fn files_key(staging_prefix: &str) -> String {
    format!("{staging_prefix}/a.npy")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Registrations do not pile up: a worker not heard from for twice the lease TTL is
/// forgotten (status no longer lists it, its next heartbeat is told to register again), while
/// a worker that keeps heartbeating stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_worker_is_forgotten_after_twice_the_lease_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CoordinatorConfig {
        lease_ttl: Duration::from_millis(150),
        ..Default::default()
    };
    let c = Coordinator::start(
        cfg,
        Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap()),
        Store::in_memory(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    c.submit(spec(dir.path())).await.unwrap();
    let (quiet, _) = c.register("host", "0", "quiet", None, &[]);
    let (alive, _) = c.register("host", "1", "alive", None, &[]);
    let listed = |c: &Coordinator| -> Vec<String> {
        c.status("verify")
            .unwrap()
            .workers
            .into_iter()
            .map(|w| w.worker_id)
            .collect()
    };
    assert_eq!(listed(&c), [alive.clone(), quiet.clone()]);
    // Bounded: 40 heartbeats of the live worker, 20 ms apart (about 5 TTLs).
    let mut forgotten_after = None;
    for i in 0..40 {
        assert!(c.heartbeat(&alive, &[], None, String::new()).is_some());
        if forgotten_after.is_none() && listed(&c) == [alive.clone()] {
            forgotten_after = Some(i);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = forgotten_after.expect("the quiet worker is still listed after 5 lease TTLs");
    assert!(
        after >= 10,
        "forgotten after {after} x 20 ms, before twice the TTL"
    );
    assert_eq!(c.heartbeat(&quiet, &[], None, String::new()), None);
    // Registering again works as for any new agent.
    let (back, _) = c.register("host", "0", "quiet", None, &[]);
    assert!(listed(&c).contains(&back));
    c.close().await;
}

/// A coordinator serving WorkerService on a loopback socket, and a client of it.
async fn serve_grpc(
    c: &Arc<Coordinator>,
    stop: &CancellationToken,
) -> (
    quarry_proto::v1::worker_service_client::WorkerServiceClient<
        quarry_common::transport::AuthChannel,
    >,
    tokio::task::JoinHandle<()>,
) {
    use quarry_common::transport::{ClientSecurity, ServerSecurity};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn({
        let (c, stop) = (Arc::clone(c), stop.clone());
        async move {
            let _ = crate::service::serve(
                crate::service::Leadership::leading(c),
                listener,
                ServerSecurity::default(),
                stop,
            )
            .await;
        }
    });
    let client = quarry_proto::v1::worker_service_client::WorkerServiceClient::new(
        ClientSecurity::plain().channel(&addr).unwrap(),
    );
    (client, server)
}

/// Registers a worker over gRPC and returns its id.
async fn register_grpc(
    client: &mut quarry_proto::v1::worker_service_client::WorkerServiceClient<
        quarry_common::transport::AuthChannel,
    >,
) -> (String, String) {
    let r = client
        .register(pb::RegisterRequest {
            host: "h".into(),
            gpu: "0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (r.worker_id, r.worker_secret)
}

/// A worker over real gRPC that uploads a 2-row `.npy` with its true size and sha256 but
/// reports 10 rows is refused: the coordinator counts the stored file itself. The attempt is
/// a failed `output_invalid` naming the file and the field; nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_overstates_its_count_is_rejected() {
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
    c.submit(spec(dir.path())).await.unwrap();
    let (mut client, server) = serve_grpc(&c, &stop).await;
    let (worker_id, secret) = register_grpc(&mut client).await;
    let lease = client
        .acquire(pb::AcquireRequest {
            worker_id: worker_id.clone(),
            worker_secret: secret.clone(),
            wait_ms: 5000,
            max_leases: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let bytes = npy_rows(2, b"two rows");
    let key = files_key(prefix(&lease));
    store.put_bytes(&key, bytes.clone()).await.unwrap();
    let lie = pb::UploadedFile {
        name: "a.npy".into(),
        key: key.clone(),
        size: bytes.len() as u64,
        sha256: hex(&sha2::Sha256::digest(&bytes)),
        count: 10,
        schema: "npy <f4 (*, 3)".into(),
        kept: None,
    };
    let resp = client
        .complete(pb::CompleteRequest {
            worker_id: worker_id.clone(),
            worker_secret: secret.clone(),
            lease_id: lease.lease_id,
            files: vec![lie],
            generator_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.outcome(), pb::CommitOutcome::Rejected, "{resp:?}");
    assert!(
        resp.message.contains(&key)
            && resp.message.contains("count 10")
            && resp.message.contains("holds 2"),
        "{}",
        resp.message
    );
    let st = c.status("verify").unwrap();
    assert_eq!((st.rounds_committed, st.failed_attempts), (0, 1));
    // A truncated file with its real sha256 (cut after the header) is refused as well.
    let retry = client
        .acquire(pb::AcquireRequest {
            worker_id: worker_id.clone(),
            worker_secret: secret.clone(),
            wait_ms: 5000,
            max_leases: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    let full = npy_rows(10, b"ten rows");
    let cut = full[..full.len() - 7].to_vec();
    let key = files_key(prefix(&retry));
    store.put_bytes(&key, cut.clone()).await.unwrap();
    let resp = client
        .complete(pb::CompleteRequest {
            worker_id: worker_id.clone(),
            worker_secret: secret.clone(),
            lease_id: retry.lease_id,
            files: vec![pb::UploadedFile {
                name: "a.npy".into(),
                key: key.clone(),
                size: cut.len() as u64,
                sha256: hex(&sha2::Sha256::digest(&cut)),
                count: 10,
                schema: "npy <f4 (*, 3)".into(),
                kept: None,
            }],
            generator_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.outcome(), pb::CommitOutcome::Rejected, "{resp:?}");
    assert!(resp.message.contains("truncated"), "{}", resp.message);
    assert_eq!(c.status("verify").unwrap().rounds_committed, 0);
    stop.cancel();
    let _ = server.await;
    c.close().await;
}

/// Drives job `verify` (3 rounds of 10 rows for a quota of 30) with one in-process worker;
/// after rounds 0 and 1 commit, round 1's stored file is replaced by garbage (a lie that
/// passed the commit checks). The merge finds it, quarantines round 1 durably, and round 3
/// takes its place; the job finishes with its quota. Returns the final's bytes and the
/// manifest.
async fn run_with_a_poisoned_round(dir: &std::path::Path) -> (Vec<u8>, String) {
    let state = Arc::new(EmbeddedStore::open(&dir.join("state.redb")).unwrap());
    let store = Store::open_dir(&dir.join("store")).unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        state.clone(),
        store.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let mut job = spec(dir);
    job.target_count_per_object = 30;
    c.submit(job).await.unwrap();
    let (worker, _) = c.register("host", "0", "", None, &[]);
    let fills: [&'static [u8]; 4] = [b"round 0", b"round 1", b"round 2", b"round 3"];
    let mut poisoned_key = None;
    let until = Instant::now() + Duration::from_secs(30);
    while c.status("verify").unwrap().state == crate::state::JobState::Running {
        assert!(
            Instant::now() < until,
            "the job did not finish: {:?}",
            c.status("verify")
        );
        let Some(g) = c
            .acquire(&worker, Duration::from_millis(200))
            .await
            .unwrap()
        else {
            continue;
        };
        let round = g.lease.round;
        let files = upload(
            &store,
            &g.lease.task.staging_prefix,
            fills[round as usize],
            fills[round as usize],
        )
        .await;
        let key = files[0].key.clone();
        if round == 2 {
            // Round 1 committed; its bytes go bad before the merge reads them.
            let k: &String = poisoned_key.as_ref().unwrap();
            store
                .put_bytes(k, b"not an npy file at all".to_vec())
                .await
                .unwrap();
        }
        let (v, msg) = c
            .complete(
                &worker,
                g.lease.lease_id,
                files,
                1,
                CompleteExtras::default(),
            )
            .await
            .unwrap();
        assert_eq!(v, Verdict::Committed, "round {round}: {msg}");
        if round == 1 {
            poisoned_key = Some(key);
        }
    }
    let st = c.status("verify").unwrap();
    assert_eq!(st.state, crate::state::JobState::Done, "{st:?}");
    assert_eq!(
        (st.samples_collected, st.rounds_quarantined),
        (30, 1),
        "{st:?}"
    );
    assert!(
        st.message.contains("r1 quarantined at merge"),
        "{}",
        st.message
    );
    let rec = state.load_object("verify", "a").await.unwrap();
    let merge = rec.merge.unwrap();
    assert_eq!(merge.rounds, [0, 2, 3]);
    assert!(!rec.commits.contains_key(&1), "{:?}", rec.commits.keys());
    assert!(
        rec.quarantined[&1].reason.contains("cannot be merged"),
        "{:?}",
        rec.quarantined
    );
    let final_bytes = store
        .get_bytes(&merge.finals[0])
        .await
        .unwrap()
        .unwrap()
        .to_vec();
    let mut expected = npy_rows(30, b"x")[..128].to_vec();
    for r in [0, 2, 3] {
        expected.extend_from_slice(&npy_rows(10, fills[r])[128..]);
    }
    assert_eq!(final_bytes, expected, "the final holds rounds 0, 2 and 3");
    c.close().await;
    let manifest = store
        .get_bytes(&quarry_common::storage::keys::manifest("verify"))
        .await
        .unwrap()
        .unwrap();
    (final_bytes, String::from_utf8(manifest.to_vec()).unwrap())
}

/// A committed round whose stored file later turns out to be garbage is quarantined at the
/// merge (not retried forever), with its reason in status, state and manifest; the object is
/// planned again and the job completes its quota from the other rounds. A rerun gives the
/// same final, byte for byte, and a restart over the finished state leaves it as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_round_that_cannot_merge_is_quarantined_and_replaced() {
    let first = tempfile::tempdir().unwrap();
    let (final1, manifest) = run_with_a_poisoned_round(first.path()).await;
    assert!(
        manifest.contains("cannot be merged") && manifest.contains("\"done\": true"),
        "{manifest}"
    );
    let rerun = tempfile::tempdir().unwrap();
    let (final2, _) = run_with_a_poisoned_round(rerun.path()).await;
    assert_eq!(final1, final2, "the rerun's final is byte-identical");
    // A restart over the first run's state and store: the job stays done, the final intact.
    let state = Arc::new(EmbeddedStore::open(&first.path().join("state.redb")).unwrap());
    let store = Store::open_dir(&first.path().join("store")).unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        state.clone(),
        store.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let rec = state.load_object("verify", "a").await.unwrap();
    let merge = rec.merge.unwrap();
    assert_eq!(merge.rounds, [0, 2, 3]);
    let again = store.get_bytes(&merge.finals[0]).await.unwrap().unwrap();
    assert_eq!(again.to_vec(), final1);
    c.close().await;
}

/// After a restart, a Complete for an unknown lease that names the kept round file of a
/// finished `keep_intermediate` job deletes nothing: the job is not running here, so nothing
/// tells its committed attempt from a loser's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_less_report_after_a_restart_leaves_kept_rounds_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store = Store::open_dir(&dir.path().join("store")).unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(EmbeddedStore::open(&path).unwrap()),
        store.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let mut job = spec(dir.path());
    job.keep_intermediate = true;
    c.submit(job).await.unwrap();
    let (worker, _) = c.register("host", "0", "", None, &[]);
    let g = c
        .acquire(&worker, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let files = upload(&store, &g.lease.task.staging_prefix, b"kept", b"kept").await;
    let kept = files[0].clone();
    let (v, msg) = c
        .complete(
            &worker,
            g.lease.lease_id,
            files,
            1,
            CompleteExtras::default(),
        )
        .await
        .unwrap();
    assert_eq!(v, Verdict::Committed, "{msg}");
    let until = Instant::now() + Duration::from_secs(20);
    while c.status("verify").unwrap().state == crate::state::JobState::Running {
        assert!(Instant::now() < until, "the job did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.close().await;

    // A new coordinator over the same state and store; a confused worker reports a lease it
    // never had, naming the kept file.
    let stop = CancellationToken::new();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(EmbeddedStore::open(&path).unwrap()),
        store.clone(),
        stop.child_token(),
    )
    .await
    .unwrap();
    let (mut client, server) = serve_grpc(&c, &stop).await;
    let (worker_id, secret) = register_grpc(&mut client).await;
    let resp = client
        .complete(pb::CompleteRequest {
            worker_id,
            worker_secret: secret.clone(),
            lease_id: 424_242,
            files: wire(vec![kept.clone()]),
            generator_ms: 1,
            log_key: kept.key.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.outcome(), pb::CommitOutcome::Duplicate, "{resp:?}");
    let held = store.hash_object(&kept.key).await.unwrap();
    assert_eq!(
        held.map(|h| h.sha256),
        Some(kept.sha256.clone()),
        "the kept round file survives"
    );
    stop.cancel();
    let _ = server.await;
    c.close().await;
}

/// An experiment named like another job's round directory (`verify__a__r0_s12345`, where job
/// `verify` runs round 0 of `a`) is refused at submit, naming the field and the fix, so job
/// `verify`'s round cleanup can never remove its finals, manifest or state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_named_like_a_round_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(&dir.path().join("store")).unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap()),
        store.clone(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let job = spec(dir.path());
    let round_dir = job.round_name("a", 0, job.seed(0, 0));
    let mut other = spec(dir.path());
    other.exp_name = round_dir.clone();
    let err = c.submit(other).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("exp_name: ") && text.contains("'__'") && text.contains(&round_dir),
        "{text}"
    );
    assert!(c.list().is_empty(), "nothing was created");
    assert!(store.list(&round_dir).await.unwrap().is_empty());
    c.close().await;
}

/// A coordinator that stopped midway through publishing the run's finals (every final marked
/// with the run's directory, one already moved, one not) finishes into the same directory when
/// it starts again, records the new keys, and only then shows the job as done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_interrupted_midway_is_finished_after_a_restart() {
    use crate::state::{CreateJob, JobRecord, JobState, MergeRecord};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open_dir(&root).unwrap();
    let state = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    let mut s = spec(dir.path());
    s.exp_name = "pub".into();
    s.objects = vec!["a".into(), "b".into()];
    let created = state
        .create_job(&JobRecord {
            id: "pub".into(),
            spec: s,
            created_unix_ms: 0,
            state: JobState::Running,
        })
        .await
        .unwrap();
    assert!(matches!(created, CreateJob::Created));
    // The directory was chosen from both finals (seeds 12345.. and 112345..) before the stop.
    let tagged = "final_seed_12345-112346";
    for (o, seeds) in [("a", (12_345, 12_346)), ("b", (112_345, 112_346))] {
        let m = MergeRecord {
            finals: vec![format!("pub/final/{o}/{o}.npy")],
            count: 10,
            rounds: vec![0, 1],
            seed_min: seeds.0,
            seed_max: seeds.1,
            sha256: String::new(),
            bytes: 7,
            cleaned: true,
            complete: true,
            unix_ms: 0,
            filtered: 0,
            duplicates: 0,
            publish_to: Some(tagged.into()),
        };
        state.record_merge("pub", o, &m).await.unwrap();
    }
    // a moved before the stop, b did not.
    let a_dst = root.join(format!("pub/{tagged}/a/a.npy"));
    std::fs::create_dir_all(a_dst.parent().unwrap()).unwrap();
    std::fs::write(&a_dst, b"final a").unwrap();
    let b_src = root.join("pub/final/b/b.npy");
    std::fs::create_dir_all(b_src.parent().unwrap()).unwrap();
    std::fs::write(&b_src, b"final b").unwrap();

    let c = Coordinator::start(
        CoordinatorConfig::default(),
        state.clone(),
        store,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.status("pub").unwrap().state == JobState::Running {
        assert!(Instant::now() < deadline, "the job did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.status("pub").unwrap().state, JobState::Done);
    assert_eq!(std::fs::read(&a_dst).unwrap(), b"final a");
    assert_eq!(
        std::fs::read(root.join(format!("pub/{tagged}/b/b.npy"))).unwrap(),
        b"final b"
    );
    assert!(
        !root.join("pub/final").exists(),
        "seed_only leaves no final/"
    );
    for o in ["a", "b"] {
        let m = state.load_object("pub", o).await.unwrap().merge.unwrap();
        assert_eq!(m.finals, vec![format!("pub/{tagged}/{o}/{o}.npy")]);
        assert_eq!(m.publish_to, None);
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("pub/manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["objects"]["b"]["final"][0],
        format!("pub/{tagged}/b/b.npy")
    );
    c.close().await;
}

/// A job held in memory (as by `serve`) that ended takes objects appended by a new submission:
/// it runs again with them, and the earlier objects keep their index (and so their seeds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_appended_to_an_ended_job_in_memory_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(&dir.path().join("store")).unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap()),
        store,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let s = spec(dir.path());
    c.submit(s.clone()).await.unwrap();
    c.cancel("verify").await.unwrap();
    {
        // Ended as a finished job would be: appending must bring it back.
        let mut inner = c.lock();
        inner.jobs.get_mut("verify").unwrap().state = JobState::Done;
    }
    let mut more = s.clone();
    more.objects.push("b".into());
    let (_, created) = c.submit(more).await.unwrap();
    assert!(!created);
    let st = c.status("verify").unwrap();
    assert_eq!(st.state, JobState::Running);
    let names: Vec<&str> = st.objects.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    // Removing an object is still a changed plan.
    let err = c.submit(s).await.unwrap_err();
    assert!(err.to_string().contains("object_code_list"), "{err}");
    c.close().await;
}

/// A warm job with `generator.audit = 1`: every task is marked for audit, and an audit
/// mismatch stops the job at once (no retry), its status message naming the first failing
/// round even when another round's mismatch arrives after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_mismatch_stops_the_job_keeping_the_first_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(&dir.path().join("store")).unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap()),
        store,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let mut s = spec(dir.path());
    s.target_count_per_object = 100;
    s.generator.argv = vec!["python3".into(), "main.py".into()];
    s.generator.mode = crate::spec::MODE_WARM.into();
    s.generator.audit = Some(crate::spec::Fraction(1.0));
    c.submit(s).await.unwrap();
    let (worker, _) = c.register("host", "0", "", None, &[]);
    let first = c
        .acquire(&worker, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let second = c
        .acquire(&worker, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(first.lease.task.audit && first.lease.task.mode == "warm");
    assert_eq!((first.lease.round, second.lease.round), (0, 1));
    for l in [&first, &second] {
        c.fail(
            &worker,
            l.lease.lease_id,
            FailureKind::AuditMismatch,
            format!("round r{} differs", l.lease.round),
            String::new(),
        )
        .await;
    }
    let st = c.status("verify").unwrap();
    assert_eq!(st.state, JobState::Cancelled);
    assert!(
        st.message.contains("determinism audit failed for a r0")
            && st.message.contains("round r0 differs"),
        "{}",
        st.message
    );
    c.close().await;
}
