//! Quarry's control-plane benchmark: `cargo bench -p quarry-tests --bench cluster_bench`.
//!
//! A coordinator (in this process, served over real gRPC on loopback) and `QUARRY_BENCH_AGENTS`
//! simulated workers (default 256): each is a gRPC client that acquires rounds, uploads a
//! one-sample `.npy` per round to its staging key (zero-work generator), and completes them;
//! the coordinator verifies each upload's sha256, commits and merges as in production.
//!
//! Each state store (embedded redb; etcd, started here, needs `etcd` on PATH) runs with a local
//! directory object store (fsynced, as in production on one machine) and with the object store
//! in memory (the control plane alone), in three modes:
//! - `single`: closed loop, one round per Acquire and per Complete (a worker with
//!   `--lease-batch 1`): the most the coordinator commits that way;
//! - `batch`: closed loop, `QUARRY_BENCH_BATCH` (8) rounds per Acquire and per CompleteBatch
//!   (`--lease-batch 8`);
//! - `paced`: the batched workers offered the target rate in all (10,000 rounds/s embedded,
//!   2,000 on etcd; each worker starts a cycle every agents x batch / rate seconds, staggered):
//!   the latency a worker sees when the coordinator carries the target load. In a closed loop
//!   every worker is always waiting on the coordinator, so its latencies are only the
//!   throughput seen the other way round (Little's law: workers / rate).
//!
//! State files and the directory store go under `QUARRY_BENCH_DIR` (default: the temp dir);
//! the coordinator's merge scratch (rounds downloaded from a remote store) under `TMPDIR`.
//!
//! Printed: rounds committed per second (from the first Acquire to the job's end, merges
//! included), and acquire / complete call latency p50 and p99 as the workers saw them.
//! `QUARRY_BENCH_CLUSTER_ROUNDS` sets the rounds per run (default 20000 embedded, 8000 etcd);
//! `QUARRY_BENCH_ONLY` picks backends (`embedded-dir,embedded-mem,etcd-dir,etcd-mem`) and
//! `QUARRY_BENCH_MODES` modes (`single,batch,paced`).
//!
//! Last (`failover` in `QUARRY_BENCH_ONLY`): two `coordinator serve` processes on one etcd and
//! a worker running rounds; the leader is killed with SIGKILL, and the time to the standby's
//! election and to its first commit is printed. It runs the binaries of the bench's own
//! profile: build them first (`cargo build --release -p quarry-cli`),
//! and it needs Python with numpy for the example generator (`QUARRY_TEST_PYTHON`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quarry_common::storage::Store;
use quarry_common::transport::{ClientSecurity, MAX_MESSAGE_BYTES, ServerSecurity};
use quarry_coordinator::coordinator::{Coordinator, CoordinatorConfig};
use quarry_coordinator::service::{Leadership, serve};
use quarry_coordinator::spec::JobSpec;
use quarry_coordinator::state::embedded::EmbeddedStore;
use quarry_coordinator::state::etcd::EtcdStore;
use quarry_coordinator::state::{JobState, StateStore};
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
    let batch: usize = env_num("QUARRY_BENCH_BATCH", 8);
    println!("== Quarry control-plane benchmark ==");
    println!(
        "cpus: {}, simulated workers: {agents}, objects: {OBJECTS}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut rows = Vec::new();
    // State files and the directory store live under QUARRY_BENCH_DIR (default: the temp
    // dir); the coordinator's merge scratch follows TMPDIR (see docs/benchmarks.md).
    let base = std::env::var_os("QUARRY_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("quarry-cluster-bench-")
        .tempdir_in(&base)
        .expect("bench dir");
    println!(
        "state and directory store under {}, merge scratch under {}",
        base.display(),
        std::env::temp_dir().display()
    );
    let only = std::env::var("QUARRY_BENCH_ONLY").unwrap_or_default();
    let modes = std::env::var("QUARRY_BENCH_MODES").unwrap_or_default();
    let picked =
        |list: &str, key: &str| list.is_empty() || list.split(',').any(|o| o.trim() == key);
    for (key, name) in [
        ("embedded-dir", "embedded, directory store"),
        // The object store in memory: what the control plane itself sustains, without the
        // directory store's mkdir/fsync per staged file.
        ("embedded-mem", "embedded, memory store"),
        ("etcd-dir", "etcd, directory store"),
        ("etcd-mem", "etcd, memory store"),
    ] {
        if !picked(&only, key) {
            continue;
        }
        let embedded = key.starts_with("embedded");
        let target = if embedded { 10_000.0 } else { 2_000.0 };
        let rounds = env_num(
            "QUARRY_BENCH_CLUSTER_ROUNDS",
            if embedded { 20_000 } else { 8_000 },
        );
        for (mode, per_call, pace) in [
            ("single", 1, None),
            ("batch", batch, None),
            ("paced", batch, Some(target)),
        ] {
            if !picked(&modes, mode) {
                continue;
            }
            let sub = dir.path().join(format!("{key}-{mode}"));
            let load = Load {
                agents,
                rounds,
                per_call,
                pace,
            };
            let figures = rt.block_on(async {
                let store = if key.ends_with("-dir") {
                    Store::open_dir(&sub.join("store")).expect("store")
                } else {
                    Store::in_memory()
                };
                if embedded {
                    let state = EmbeddedStore::open(&sub.join("state.redb")).expect("state file");
                    bench(Arc::new(state), store, &sub, &load).await
                } else {
                    let etcd = quarry_tests::etcd::Etcd::start().await;
                    let state = EtcdStore::connect(&etcd.endpoints(), "/bench")
                        .await
                        .expect("etcd state");
                    bench(Arc::new(state), store, &sub, &load).await
                }
            });
            let how = match pace {
                None => format!("{mode}, {per_call}/call"),
                Some(r) => format!("{mode} at {r:.0}/s, {per_call}/call"),
            };
            println!(
                "{name}, {how}: {} rounds in {:.2} s",
                figures.rounds, figures.seconds
            );
            rows.push((name, how, target, figures));
        }
    }

    let failover = picked(&only, "failover").then(|| rt.block_on(failover(&base)));

    if !rows.is_empty() {
        println!();
        println!(
            "| state, object store | mode | rounds | rounds/s | acquire p50 | acquire p99 | complete p50 | complete p99 | target |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for (name, how, target, r) in rows {
            // The throughput target is judged in the closed loops, the latency target where the
            // target load is offered.
            let verdict = if how.starts_with("paced") {
                let ok = r.acquire[1] < 10.0 && r.per_sec >= 0.97 * target;
                format!(
                    "acquire p99 < 10 ms at {target:.0} rounds/s: {}",
                    if ok { "PASS" } else { "MISS" }
                )
            } else {
                format!(
                    ">= {target:.0} rounds/s: {}",
                    if r.per_sec >= target { "PASS" } else { "MISS" }
                )
            };
            println!(
                "| {name} | {how} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {verdict} |",
                r.rounds, r.per_sec, r.acquire[0], r.acquire[1], r.complete[0], r.complete[1],
            );
        }
    }
    if let Some((elected, first_commit)) = failover {
        println!();
        println!("| failover (etcd, --election-ttl 3) | after SIGKILL of the leader | target |");
        println!("|---|---|---|");
        println!("| standby elected | {:.2} s | |", elected.as_secs_f64());
        println!(
            "| first commit by the new leader | {:.2} s | < 10 s: {} |",
            first_commit.as_secs_f64(),
            if first_commit < Duration::from_secs(10) {
                "PASS"
            } else {
                "MISS"
            }
        );
    }
}

/// Two `coordinator serve` processes on one etcd (built binaries of this profile), a worker
/// with two agents running rounds of about 300 ms; the leader is killed with SIGKILL once
/// rounds commit. Returns how long after the kill the standby was elected and committed its
/// first round (the status is polled every 50 ms through both addresses).
async fn failover(base: &Path) -> (Duration, Duration) {
    use quarry_tests::cluster::{FailoverPair, status};
    let etcd = quarry_tests::etcd::Etcd::start().await;
    let root = quarry_tests::legacy_root();
    let home = tempfile::Builder::new()
        .prefix("quarry-failover-bench-")
        .tempdir_in(base)
        .expect("failover dir");
    let mut pair = FailoverPair::start(&etcd.endpoints()[0], home.path(), root.path(), 300);
    let committed = |v: &serde_json::Value| v["rounds_committed"].as_u64().unwrap_or(0);
    let until = Instant::now() + Duration::from_secs(60);
    while committed(&pair.status()) < 2 {
        assert!(Instant::now() < until, "the failover job made no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = committed(&pair.status());
    pair.a.0.kill().expect("kill the leader");
    let killed = Instant::now();
    let _ = pair.a.0.wait();
    let mut elected = None;
    let until = killed + Duration::from_secs(60);
    let first_commit = loop {
        if elected.is_none()
            && std::fs::read_to_string(&pair.log_b)
                .unwrap_or_default()
                .contains("elected leader")
        {
            elected = Some(killed.elapsed());
        }
        // A standby answers UNAVAILABLE until it is elected: no status then.
        if status(&pair.addr_b, "served").is_some_and(|v| committed(&v) > before) {
            break killed.elapsed();
        }
        assert!(Instant::now() < until, "no commit within 60 s of the kill");
        std::thread::sleep(Duration::from_millis(50));
    };
    let elected = elected.unwrap_or(first_commit);
    println!(
        "failover: standby elected {:.2} s and first commit {:.2} s after SIGKILL of the leader",
        elected.as_secs_f64(),
        first_commit.as_secs_f64()
    );
    (elected, first_commit)
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the simulated workers do.
struct Load {
    agents: usize,
    /// Rounds in the job (rounded up to a multiple of the objects).
    rounds: usize,
    /// Rounds asked for per Acquire (and so reported per CompleteBatch).
    per_call: usize,
    /// `Some(rate)`: all workers together start cycles at this many rounds per second.
    pace: Option<f64>,
}

struct Figures {
    rounds: usize,
    seconds: f64,
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

async fn bench(state: Arc<dyn StateStore>, store: Store, dir: &Path, load: &Load) -> Figures {
    let agents = load.agents;
    let batch = load.per_call;
    let per_object = load.rounds.div_ceil(OBJECTS) as u64;
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
    // Every worker connects and registers first; the clock starts when all have.
    let ready = Arc::new(tokio::sync::Barrier::new(agents + 1));
    let go = Arc::new(tokio::sync::Barrier::new(agents + 1));
    // Paced: worker i starts a cycle every `period`, the first at `i * period / agents`.
    let period = load
        .pace
        .map(|rate| Duration::from_secs_f64(agents as f64 * batch as f64 / rate));
    let begin = Arc::new(std::sync::OnceLock::<tokio::time::Instant>::new());
    let mut tasks = Vec::new();
    for i in 0..agents {
        let (addr, store, npy, sha) = (addr.clone(), store.clone(), Arc::clone(&npy), sha.clone());
        let (ready, go, begin) = (Arc::clone(&ready), Arc::clone(&go), Arc::clone(&begin));
        tasks.push(tokio::spawn(async move {
            let channel = ClientSecurity::plain().channel(&addr).expect("channel");
            let mut c =
                WorkerServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
            let me = c
                .register(pb::RegisterRequest {
                    host: "bench".into(),
                    gpu: i.to_string(),
                    ..Default::default()
                })
                .await
                .expect("register")
                .into_inner();
            let (id, secret) = (me.worker_id, me.worker_secret);
            ready.wait().await;
            go.wait().await;
            let mut next = period.map(|p| {
                *begin.get().expect("start instant") + p.mul_f64(i as f64 / agents as f64)
            });
            let (mut acq, mut com) = (Vec::new(), Vec::new());
            loop {
                if let (Some(at), Some(p)) = (next.as_mut(), period) {
                    // A fixed schedule: a late cycle starts at once and does not move the next.
                    tokio::time::sleep_until(*at).await;
                    *at += p;
                }
                let t = Instant::now();
                let got = c
                    .acquire(pb::AcquireRequest {
                        worker_id: id.clone(),
                        worker_secret: secret.clone(),
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
                        worker_secret: secret.clone(),
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
    ready.wait().await;
    let _ = begin.set(tokio::time::Instant::now());
    go.wait().await;
    let started = Instant::now();
    // The clock stops when the job is done (every round committed, every final written), not
    // when the last worker has found out that nothing is left.
    let until = Instant::now() + Duration::from_secs(600);
    while coord.status("bench").expect("status").state == JobState::Running
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    let (mut acq, mut com) = (Vec::new(), Vec::new());
    for t in tasks {
        let (a, c) = t.await.expect("agent");
        acq.extend(a);
        com.extend(c);
    }
    let st = coord.status("bench").expect("status");
    assert_eq!(st.state, JobState::Done, "bench job did not finish");
    let committed = st.rounds_committed as usize;
    assert!(
        committed >= total,
        "{committed} of {total} rounds committed"
    );
    stop.cancel();
    let _ = server.await;
    coord.close().await;
    Figures {
        rounds: committed,
        seconds: elapsed.as_secs_f64(),
        per_sec: committed as f64 / elapsed.as_secs_f64(),
        acquire: quantiles(&mut acq),
        complete: quantiles(&mut com),
    }
}

fn quantiles(v: &mut [Duration]) -> [f64; 2] {
    v.sort();
    let q = |p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    [q(0.50), q(0.99)]
}
