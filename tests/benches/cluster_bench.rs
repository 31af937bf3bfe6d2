//! Quarry's control-plane benchmark: `cargo bench -p quarry-tests --bench cluster_bench`.
//!
//! A coordinator (in this process, served over real gRPC on loopback) and `QUARRY_BENCH_AGENTS`
//! simulated workers (default 256): each is a gRPC client that acquires a round, uploads a
//! one-sample `.npy` to the staging key (zero-work generator), and completes it; the
//! coordinator verifies the upload's sha256, commits and merges as in production. Printed, for
//! the embedded state store and for etcd (started here; needs `etcd` on PATH): rounds committed
//! per second, and acquire / complete latency p50 and p99 as the workers saw them.
//! `QUARRY_BENCH_CLUSTER_ROUNDS` sets the rounds per backend (default 20000 embedded, 5000 etcd).
//! Each state store runs twice: with a local directory object store (fsynced, as in production
//! on one machine) and with the object store in memory, which leaves the control plane alone.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quarry_common::storage::Store;
use quarry_common::transport::{ClientSecurity, MAX_MESSAGE_BYTES, ServerSecurity};
use quarry_coordinator::coordinator::{Coordinator, CoordinatorConfig};
use quarry_coordinator::service::{Leadership, serve};
use quarry_coordinator::spec::JobSpec;
use quarry_coordinator::state::StateStore;
use quarry_coordinator::state::embedded::EmbeddedStore;
use quarry_coordinator::state::etcd::EtcdStore;
use quarry_proto::v1 as pb;
use quarry_proto::v1::worker_service_client::WorkerServiceClient;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const OBJECTS: usize = 64;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let agents: usize = env_num("QUARRY_BENCH_AGENTS", 256);
    let batch: usize = env_num("QUARRY_BENCH_BATCH", 1);
    println!("== Quarry control-plane benchmark ==");
    println!(
        "cpus: {}, simulated workers: {agents}, objects: {OBJECTS}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut rows = Vec::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let rounds = env_num("QUARRY_BENCH_CLUSTER_ROUNDS", 20_000);
    // `QUARRY_BENCH_ONLY=embedded-dir,embedded-mem,etcd-dir,etcd-mem` (any subset) picks rows.
    let only = std::env::var("QUARRY_BENCH_ONLY").unwrap_or_default();
    let etcd_rounds = env_num("QUARRY_BENCH_CLUSTER_ROUNDS", 5_000);
    for (key, name) in [
        ("embedded-dir", "embedded, directory store"),
        // The object store in memory: what the control plane itself sustains, without the
        // directory store's mkdir/fsync per staged file.
        ("embedded-mem", "embedded, memory store"),
        ("etcd-dir", "etcd, directory store"),
        ("etcd-mem", "etcd, memory store"),
    ] {
        if !(only.is_empty() || only.split(',').any(|o| o.trim() == key)) {
            continue;
        }
        let sub = dir.path().join(key);
        let figures = rt.block_on(async {
            let store = if key.ends_with("-dir") {
                Store::open_dir(&sub.join("store")).expect("store")
            } else {
                Store::in_memory()
            };
            if key.starts_with("embedded") {
                let state = EmbeddedStore::open(&sub.join("state.redb")).expect("state file");
                bench(Arc::new(state), store, &sub, agents, rounds, batch).await
            } else {
                let etcd = quarry_tests::etcd::Etcd::start().await;
                let state = EtcdStore::connect(&etcd.endpoints(), "/bench")
                    .await
                    .expect("etcd state");
                bench(Arc::new(state), store, &sub, agents, etcd_rounds, batch).await
            }
        });
        rows.push((name, figures));
    }

    println!();
    println!(
        "| state | rounds | rounds/s | acquire p50 | acquire p99 | complete p50 | complete p99 | target |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, r) in rows {
        let target = if name.starts_with("embedded") {
            10_000.0
        } else {
            2_000.0
        };
        println!(
            "| {name} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} rounds/s, acquire p99 < 10 ms: {} |",
            r.rounds,
            r.per_sec,
            r.acquire[0],
            r.acquire[1],
            r.complete[0],
            r.complete[1],
            target,
            if r.per_sec >= target && r.acquire[1] < 10.0 {
                "PASS"
            } else {
                "MISS"
            }
        );
    }
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Figures {
    rounds: usize,
    per_sec: f64,
    /// p50, p99 in milliseconds.
    acquire: [f64; 2],
    complete: [f64; 2],
}

/// One sample of `<f4` × 3, as a generator would write it.
fn one_sample_npy() -> Vec<u8> {
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3), }";
    let pad = (64 - (10 + dict.len() + 1) % 64) % 64;
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend_from_slice(&((dict.len() + pad + 1) as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h.extend(std::iter::repeat_n(b' ', pad));
    h.push(b'\n');
    for v in [1.0f32, 2.0, 3.0] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h
}

async fn bench(
    state: Arc<dyn StateStore>,
    store: Store,
    dir: &Path,
    agents: usize,
    rounds: usize,
    batch: usize,
) -> Figures {
    let per_object = rounds.div_ceil(OBJECTS) as u64;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "exp_name": "bench",
        "objects": (0..OBJECTS).map(|i| format!("obj{i}")).collect::<Vec<_>>(),
        "target_count_per_object": per_object,
        "round_batch_size": 1,
        "root": dir,
        "generator": serde_json::to_value(JobSpec::legacy_generator()).expect("generator"),
    }))
    .expect("bench spec");
    let total = per_object as usize * OBJECTS;
    let cfg = CoordinatorConfig {
        lease_ttl: Duration::from_secs(300),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let coord = Coordinator::start(cfg, state, store.clone(), stop.child_token())
        .await
        .expect("coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("addr").to_string();
    let server = tokio::spawn(serve(
        Leadership::leading(Arc::clone(&coord)),
        listener,
        ServerSecurity::default(),
        stop.clone(),
    ));
    coord.submit(spec).await.expect("submit");

    let npy = Arc::new(one_sample_npy());
    let sha = quarry_common::storage::hex(&Sha256::digest(npy.as_slice()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..agents {
        let (addr, store, npy, sha) = (addr.clone(), store.clone(), Arc::clone(&npy), sha.clone());
        tasks.push(tokio::spawn(async move {
            let channel = ClientSecurity::plain().channel(&addr).expect("channel");
            let mut c =
                WorkerServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
            let id = c
                .register(pb::RegisterRequest {
                    host: "bench".into(),
                    gpu: i.to_string(),
                    ..Default::default()
                })
                .await
                .expect("register")
                .into_inner()
                .worker_id;
            let (mut acq, mut com) = (Vec::new(), Vec::new());
            loop {
                let t = Instant::now();
                let got = c
                    .acquire(pb::AcquireRequest {
                        worker_id: id.clone(),
                        wait_ms: 200,
                        max_leases: batch as u32,
                    })
                    .await
                    .expect("acquire")
                    .into_inner();
                let leases: Vec<pb::Lease> = got.lease.into_iter().chain(got.more).collect();
                if leases.is_empty() {
                    return (acq, com);
                }
                acq.push(t.elapsed());
                let mut completions = Vec::with_capacity(leases.len());
                for lease in leases {
                    let prefix = lease.task.as_ref().expect("task").staging_prefix.clone();
                    let key = format!("{prefix}/out.npy");
                    store
                        .put_bytes(&key, npy.as_slice().to_vec())
                        .await
                        .expect("upload");
                    completions.push(pb::CompleteRequest {
                        worker_id: id.clone(),
                        lease_id: lease.lease_id,
                        files: vec![pb::UploadedFile {
                            name: "out.npy".into(),
                            key,
                            size: npy.len() as u64,
                            sha256: sha.clone(),
                            count: 1,
                            schema: "npy <f4 (*, 3)".into(),
                            kept: None,
                        }],
                        generator_ms: 0,
                        ..Default::default()
                    });
                }
                let t = Instant::now();
                // One round is reported with Complete, several with CompleteBatch, as the
                // worker agent does.
                let outcomes: Vec<i32> = if completions.len() == 1 {
                    let one = completions.pop().expect("one completion");
                    vec![
                        c.complete(one)
                            .await
                            .expect("complete")
                            .into_inner()
                            .outcome,
                    ]
                } else {
                    c.complete_batch(pb::CompleteBatchRequest { completions })
                        .await
                        .expect("complete batch")
                        .into_inner()
                        .results
                        .into_iter()
                        .map(|r| r.response.map_or(-1, |r| r.outcome))
                        .collect()
                };
                com.push(t.elapsed());
                assert!(
                    outcomes
                        .iter()
                        .all(|&o| o == pb::CommitOutcome::Committed as i32),
                    "not every round committed: {outcomes:?}"
                );
            }
        }));
    }
    let (mut acq, mut com) = (Vec::new(), Vec::new());
    for t in tasks {
        let (a, c) = t.await.expect("agent");
        acq.extend(a);
        com.extend(c);
    }
    // All rounds are handed out once every agent found nothing left; wait for the last merges.
    let until = Instant::now() + Duration::from_secs(600);
    loop {
        let st = coord.status("bench").expect("status");
        if st.state != pb::JobState::Running as i32 || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let st = coord.status("bench").expect("status");
    assert_eq!(
        st.state,
        pb::JobState::Done as i32,
        "bench job did not finish"
    );
    let committed = st.rounds_committed as usize;
    assert!(
        committed >= total,
        "{committed} of {total} rounds committed"
    );
    stop.cancel();
    let _ = server.await;
    coord.close().await;
    let figures = Figures {
        rounds: committed,
        per_sec: committed as f64 / elapsed.as_secs_f64(),
        acquire: quantiles(&mut acq),
        complete: quantiles(&mut com),
    };
    println!(
        "{committed} rounds by {agents} workers in {:.2} s",
        elapsed.as_secs_f64()
    );
    figures
}

fn quantiles(v: &mut [Duration]) -> [f64; 2] {
    v.sort();
    let q = |p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    [q(0.50), q(0.99)]
}
