//! What Quarry's gRPC listeners accept from callers they should not trust: a `coordinator run`
//! answers only its own user (a token only that user can read), a worker's Register is bounded
//! in its strings and in the number of workers, one worker cannot take another live worker's
//! rounds, and a connection that never speaks is closed. Real processes and real gRPC over
//! sockets throughout.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quarry_cli::LegacyFlags;
use quarry_common::storage::Store;
use quarry_common::transport::{ClientSecurity, MAX_MESSAGE_BYTES, ServerSecurity};
use quarry_coordinator::coordinator::{Coordinator, CoordinatorConfig};
use quarry_coordinator::service::{Leadership, ServeOptions};
use quarry_coordinator::state::embedded::EmbeddedStore;
use quarry_proto::v1 as pb;
use quarry_proto::v1::job_service_client::JobServiceClient;
use quarry_proto::v1::worker_service_client::WorkerServiceClient;
use quarry_tests::cluster::{Killed, slow_job_file, wait_until};
use quarry_tests::{bin, legacy_root, log_tail};
use tokio_util::sync::CancellationToken;

/// The job of `job_file` as Submit carries it, renamed `exp`.
fn spec_json(job_file: &Path, exp: &str) -> String {
    let mut spec = quarry_cli::spec_from(&LegacyFlags::default(), Some(job_file), None).unwrap();
    spec.exp_name = exp.into();
    serde_json::to_string(&spec).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_run_answers_only_callers_with_its_private_token() {
    let root = legacy_root();
    let job = slow_job_file(root.path(), root.path(), 2000);
    let log = root.path().join("run.log");
    let mut run = Killed(
        Command::new(bin("coordinator"))
            .args(["run", "--job", job.to_str().unwrap(), "--progress", "off"])
            .current_dir(root.path())
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let state = root.path().join("data/experiments/served/.quarry");
    let (addr_file, token_file) = (
        state.join("coordinator.addr"),
        state.join("coordinator.token"),
    );
    wait_until(
        "the run publishes its address",
        Duration::from_secs(60),
        || addr_file.is_file(),
    );
    // Only this user can read the token (or list the directory that holds it).
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&token_file), 0o600);
    assert_eq!(mode(&addr_file), 0o600);
    let addr = std::fs::read_to_string(&addr_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    // Another client on the machine, without the token or with a guessed one: every call of
    // both services is refused, above all a Submit whose program would run as this user.
    let hostile = spec_json(&job, "intruder");
    for security in [
        ClientSecurity::plain(),
        ClientSecurity::plain().with_token("guess"),
    ] {
        let mut jobs = JobServiceClient::new(security.channel(&addr).unwrap())
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let st = jobs
            .submit(pb::SubmitRequest {
                spec_json: hostile.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::Unauthenticated, "{st:?}");
        let st = jobs
            .cancel_job(pb::CancelJobRequest {
                job_id: "served".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::Unauthenticated, "{st:?}");
        let st = jobs.list_jobs(pb::ListJobsRequest {}).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::Unauthenticated, "{st:?}");
        let mut workers = WorkerServiceClient::new(security.channel(&addr).unwrap());
        let st = workers
            .register(pb::RegisterRequest {
                host: "h".into(),
                gpu: "9".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::Unauthenticated, "{st:?}");
    }

    // The same user, from another process: `status` finds the run under --root, or from the
    // root as the current directory, without any address or token flag.
    let out = Command::new(bin("coordinator"))
        .args(["status", "served", "--json", "--root"])
        .arg(root.path())
        .env_remove("QUARRY_COORDINATOR")
        .env_remove("QUARRY_AUTH_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log_tail(&log)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["job"], "served", "{v}");
    let jobs: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["job"].as_str())
        .collect();
    assert!(!jobs.contains(&"intruder"), "{v}");
    let out = Command::new(bin("coordinator"))
        .args(["cancel", "served"])
        .current_dir(root.path())
        .env_remove("QUARRY_COORDINATOR")
        .env_remove("QUARRY_AUTH_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log_tail(&log)
    );
    // The cancelled run ends (exit 1: the job did not finish; 3 is kept for an object out of
    // rounds) and takes its endpoint files with it.
    let until = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(s) = run.0.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            Instant::now() < until,
            "the run did not end: {}",
            log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, Some(1), "{}", log_tail(&log));
    assert!(!addr_file.exists() && !token_file.exists());
}

/// A coordinator serving real gRPC on loopback (no token: these tests are about what a
/// caller who may call can do), with `cfg`; one job submitted (exp `served`, two objects).
struct Served {
    addr: String,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
    _root: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(cfg: CoordinatorConfig, options: ServeOptions) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let root = legacy_root();
    let state = EmbeddedStore::open(&dir.path().join("state.redb")).unwrap();
    let store = Store::open_dir(&dir.path().join("store")).unwrap();
    let stop = CancellationToken::new();
    let c = Coordinator::start(cfg, Arc::new(state), store, stop.child_token())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(quarry_coordinator::service::serve_with(
        Leadership::leading(c),
        listener,
        ServerSecurity::default(),
        options,
        stop.clone(),
    ));
    let job = slow_job_file(root.path(), root.path(), 0);
    jobs(&addr)
        .submit(pb::SubmitRequest {
            spec_json: spec_json(&job, "served"),
        })
        .await
        .unwrap();
    Served {
        addr,
        stop,
        _dir: dir,
        _root: root,
    }
}

fn jobs(addr: &str) -> JobServiceClient<quarry_common::transport::AuthChannel> {
    JobServiceClient::new(ClientSecurity::plain().channel(addr).unwrap())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
}

fn workers(addr: &str) -> WorkerServiceClient<quarry_common::transport::AuthChannel> {
    WorkerServiceClient::new(ClientSecurity::plain().channel(addr).unwrap())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

async fn get_job(addr: &str) -> Result<pb::JobStatus, tonic::Status> {
    jobs(addr)
        .get_job(pb::GetJobRequest {
            job_id: "served".into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_registrations_are_refused_and_status_keeps_answering() {
    let s = serve(CoordinatorConfig::default(), ServeOptions::default()).await;
    let mut w = workers(&s.addr);
    // Three 6 MiB host names would make every status 18 MiB, past the message limit.
    for _ in 0..3 {
        let st = w
            .register(pb::RegisterRequest {
                host: "h".repeat(6 << 20),
                gpu: "0".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{}", st.message());
        assert!(
            st.message().starts_with("host:") && st.message().contains("at most 256 bytes"),
            "{}",
            st.message()
        );
    }
    for (field, req) in [
        (
            "gpu_info.name",
            pb::RegisterRequest {
                host: "h".into(),
                gpu: "0".into(),
                gpu_info: Some(pb::GpuInfo {
                    name: "n".repeat(1 << 20),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
        (
            "agent_name",
            pb::RegisterRequest {
                host: "h".into(),
                gpu: "0".into(),
                agent_name: "a/../b".into(),
                ..Default::default()
            },
        ),
    ] {
        let st = w.register(req).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{}", st.message());
        assert!(st.message().contains(field), "{}", st.message());
    }
    // A registered worker's heartbeat texts are bounded too.
    let id = w
        .register(pb::RegisterRequest {
            host: "h".into(),
            gpu: "0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id;
    let st = w
        .heartbeat(pb::HeartbeatRequest {
            worker_id: id,
            agent_state: "s".repeat(6 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{}", st.message());
    assert!(st.message().starts_with("agent_state:"), "{}", st.message());
    let status = get_job(&s.addr).await.unwrap();
    assert_eq!(status.workers.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_bounded_and_a_full_one_keeps_status_small() {
    let s = serve(
        CoordinatorConfig {
            max_workers: 300,
            ..Default::default()
        },
        ServeOptions::default(),
    )
    .await;
    let mut w = workers(&s.addr);
    // Every string at its bound: 300 such workers, and status still answers.
    let big = |i: usize| pb::RegisterRequest {
        host: format!("{i:0>256}"),
        gpu: "g".repeat(64),
        gpu_info: Some(pb::GpuInfo {
            uuid: "u".repeat(64),
            name: "n".repeat(256),
            driver_version: "d".repeat(64),
            ..Default::default()
        }),
        ..Default::default()
    };
    for i in 0..300 {
        w.register(big(i)).await.unwrap();
    }
    let st = w.register(big(300)).await.unwrap_err();
    assert_eq!(
        st.code(),
        tonic::Code::ResourceExhausted,
        "{}",
        st.message()
    );
    assert!(st.message().contains("300"), "{}", st.message());
    let status = get_job(&s.addr).await.unwrap();
    assert_eq!(status.workers.len(), 300);
    jobs(&s.addr)
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap();

    // The byte bound holds on its own: with room for few bytes, the next worker is refused
    // before the count bound.
    let s = serve(
        CoordinatorConfig {
            max_worker_bytes: 10_000,
            ..Default::default()
        },
        ServeOptions::default(),
    )
    .await;
    let mut w = workers(&s.addr);
    let mut admitted = 0;
    let refused = loop {
        match w.register(big(admitted)).await {
            Ok(_) => admitted += 1,
            Err(st) => break st,
        }
        assert!(admitted < 100, "the byte bound never refused");
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("10000 bytes"),
        "{}",
        refused.message()
    );
    assert!(admitted >= 5, "{admitted}");
}

/// Worker ids are guessable (`<host>-gpu<id>-<epoch>.<n>`) and every worker holds the
/// cluster's token, so neither proves who a caller is: the secret Register returned does. A
/// caller naming another live worker without its secret can neither act as it nor take its
/// running rounds away, even claiming the same host and GPU; the holder's own agent, proving
/// itself with its previous id and secret, carries its rounds over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_take_over_a_live_workers_lease() {
    let s = serve(CoordinatorConfig::default(), ServeOptions::default()).await;
    let mut w = workers(&s.addr);
    let reg = |running: Vec<pb::Lease>| pb::RegisterRequest {
        host: "a".into(),
        gpu: "0".into(),
        running,
        ..Default::default()
    };
    let holder = w.register(reg(vec![])).await.unwrap().into_inner();
    assert_eq!(holder.worker_secret.len(), 64, "{holder:?}");
    let lease = w
        .acquire(pb::AcquireRequest {
            worker_id: holder.worker_id.clone(),
            worker_secret: holder.worker_secret.clone(),
            wait_ms: 5000,
            max_leases: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .expect("a round is leased");
    // Another agent claiming the holder's host and GPU names the lease: refused, told to stop.
    let thief = w
        .register(reg(vec![lease.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(thief.cancel_lease_ids, [lease.lease_id]);
    assert_ne!(thief.worker_secret, holder.worker_secret);
    // Naming the holder as its previous self with a guessed secret changes nothing.
    let guess = w
        .register(pb::RegisterRequest {
            previous_worker_id: holder.worker_id.clone(),
            previous_worker_secret: "0".repeat(64),
            ..reg(vec![lease.clone()])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(guess.cancel_lease_ids, [lease.lease_id]);
    // Acting as the holder without its secret: every call naming it is refused.
    let denied = |st: tonic::Status| {
        assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
        assert!(st.message().contains(&holder.worker_id), "{}", st.message());
    };
    denied(
        w.heartbeat(pb::HeartbeatRequest {
            worker_id: holder.worker_id.clone(),
            worker_secret: thief.worker_secret.clone(),
            lease_ids: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    denied(
        w.fail(pb::FailRequest {
            worker_id: holder.worker_id.clone(),
            lease_id: lease.lease_id,
            message: "sabotage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    denied(
        w.release(pb::ReleaseRequest {
            worker_id: holder.worker_id.clone(),
            lease_id: lease.lease_id,
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    denied(
        w.complete(pb::CompleteRequest {
            worker_id: holder.worker_id.clone(),
            lease_id: lease.lease_id,
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    denied(
        w.acquire(pb::AcquireRequest {
            worker_id: holder.worker_id.clone(),
            wait_ms: 10,
            max_leases: 1,
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    let batch = w
        .complete_batch(pb::CompleteBatchRequest {
            completions: vec![pb::CompleteRequest {
                worker_id: holder.worker_id.clone(),
                lease_id: lease.lease_id,
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        batch.results[0].error_code,
        tonic::Code::PermissionDenied as i32,
        "{batch:?}"
    );
    // The holder still holds its round.
    let hb = w
        .heartbeat(pb::HeartbeatRequest {
            worker_id: holder.worker_id.clone(),
            worker_secret: holder.worker_secret.clone(),
            lease_ids: vec![lease.lease_id],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        hb.cancel_lease_ids.is_empty(),
        "the holder lost its lease: {hb:?}"
    );
    let status = get_job(&s.addr).await.unwrap();
    assert_eq!(status.failed_attempts, 0, "{status:?}");
    let hb = w
        .heartbeat(pb::HeartbeatRequest {
            worker_id: thief.worker_id,
            worker_secret: thief.worker_secret,
            lease_ids: vec![lease.lease_id],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.cancel_lease_ids, [lease.lease_id]);
    // The holder's own agent registering again, proving itself, carries the round over.
    let again = w
        .register(pb::RegisterRequest {
            previous_worker_id: holder.worker_id.clone(),
            previous_worker_secret: holder.worker_secret.clone(),
            ..reg(vec![lease.clone()])
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.cancel_lease_ids.is_empty(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_and_a_live_one_is_not() {
    use tokio::io::AsyncReadExt;
    let idle = Duration::from_millis(800);
    let s = serve(
        CoordinatorConfig::default(),
        ServeOptions { idle_timeout: idle },
    )
    .await;
    // A TCP connection that never sends a byte (no HTTP/2 preface): closed by the server.
    let mut silent = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // The server's HTTP/2 settings: read on until it closes.
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a silent connection is still open after 20 s"
    );
    assert!(started.elapsed() >= idle, "{:?}", started.elapsed());
    // A live client: a long-poll lasting several idle timeouts (the job is cancelled, so
    // there is nothing to hand out) is answered, not cut: the server's pings keep it alive.
    let mut w = workers(&s.addr);
    let me = w
        .register(pb::RegisterRequest {
            host: "h".into(),
            gpu: "0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut j = jobs(&s.addr);
    j.cancel_job(pb::CancelJobRequest {
        job_id: "served".into(),
    })
    .await
    .unwrap();
    let t = Instant::now();
    let got = w
        .acquire(pb::AcquireRequest {
            worker_id: me.worker_id,
            worker_secret: me.worker_secret,
            wait_ms: 3000,
            max_leases: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.lease.is_none());
    assert!(t.elapsed() >= idle * 3, "{:?}", t.elapsed());
}
