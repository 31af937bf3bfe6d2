//! Transport security of a real `coordinator serve` process: TLS, mutual TLS and the bearer
//! token, exercised by the real CLI and by a raw gRPC client. Certificates are made by the
//! `openssl` command for each test run.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use quarry_common::transport::{ClientSecurity, MAX_MESSAGE_BYTES};
use quarry_proto::v1 as pb;
use quarry_proto::v1::job_service_client::JobServiceClient;
use quarry_tests::bin;
use quarry_tests::cluster::{error_line, serve_exits, start_serve_with};
use quarry_tests::pki::Pki;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn cli(args: &[&str]) -> Output {
    Command::new(bin("coordinator"))
        .args(args)
        .output()
        .expect("run coordinator")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn serve_args(work: &Path) -> (PathBuf, PathBuf) {
    (work.join("state.redb"), work.join("store"))
}

#[test]
fn mutual_tls_and_token_admit_only_the_right_client() {
    let pki = Pki::generate();
    let work = tempfile::tempdir().unwrap();
    let (state, store) = serve_args(work.path());
    let state = format!("file://{}", state.display());
    let store = format!("file://{}", store.display());
    let (_serve, addr) = start_serve_with(
        &[
            "--state",
            &state,
            "--store",
            &store,
            "--tls-cert",
            &pki.path("server.pem"),
            "--tls-key",
            &pki.path("server.key"),
            "--tls-client-ca",
            &pki.path("ca.pem"),
            "--auth-token-file",
            &pki.path("token"),
        ],
        &[],
        &work.path().join("coordinator.log"),
    );
    let ok = [
        "jobs",
        "--json",
        "--connect-timeout",
        "2",
        "--coordinator",
        &addr,
        "--tls-ca",
        &pki.path("ca.pem"),
        "--tls-cert",
        &pki.path("client.pem"),
        "--tls-key",
        &pki.path("client.key"),
        "--tls-domain",
        "localhost",
    ];
    let (token, wrong_token) = (pki.path("token"), pki.path("wrong-token"));
    // Everything right: an empty job list.
    let with_token: Vec<&str> = ok
        .iter()
        .copied()
        .chain(["--auth-token-file", token.as_str()])
        .collect::<Vec<_>>();
    let o = cli(&with_token);
    assert!(o.status.success(), "{}", text(&o));
    let jobs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(jobs, serde_json::json!([]), "{}", text(&o));

    // The right certificates but no token, or the wrong one: refused as unauthenticated.
    let o = cli(&ok);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("requires a bearer token"), "{}", text(&o));
    let wrong: Vec<&str> = ok
        .iter()
        .copied()
        .chain(["--auth-token-file", wrong_token.as_str()])
        .collect();
    let o = cli(&wrong);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("wrong bearer token"), "{}", text(&o));

    // The token but a client certificate from a CA the server does not trust, or none.
    let stranger = [
        "jobs",
        "--connect-timeout",
        "2",
        "--coordinator",
        &addr,
        "--tls-ca",
        &pki.path("ca.pem"),
        "--tls-domain",
        "localhost",
        "--tls-cert",
        &pki.path("stranger.pem"),
        "--tls-key",
        &pki.path("stranger.key"),
        "--auth-token-file",
        &token,
    ];
    let o = cli(&stranger);
    assert!(!o.status.success(), "{}", text(&o));
    let no_cert = [
        "jobs",
        "--connect-timeout",
        "2",
        "--coordinator",
        &addr,
        "--tls-ca",
        &pki.path("ca.pem"),
        "--tls-domain",
        "localhost",
        "--auth-token-file",
        &token,
    ];
    let o = cli(&no_cert);
    assert!(!o.status.success(), "{}", text(&o));
    // A client that does not speak TLS at all.
    let o = cli(&[
        "jobs",
        "--connect-timeout",
        "2",
        "--coordinator",
        &addr,
        "--auth-token-file",
        &token,
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    // A client that trusts another CA does not accept the server.
    let o = cli(&[
        "jobs",
        "--connect-timeout",
        "2",
        "--coordinator",
        &addr,
        "--tls-ca",
        &pki.path("other-ca.pem"),
        "--tls-domain",
        "localhost",
        "--tls-cert",
        &pki.path("client.pem"),
        "--tls-key",
        &pki.path("client.key"),
        "--auth-token-file",
        &token,
    ]);
    assert!(!o.status.success(), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_the_token_is_unauthenticated_but_probes_pass() {
    let pki = Pki::generate();
    let work = tempfile::tempdir().unwrap();
    let (state, store) = serve_args(work.path());
    let state = format!("file://{}", state.display());
    let store = format!("file://{}", store.display());
    let (_serve, addr) = start_serve_with(
        &[
            "--state",
            &state,
            "--store",
            &store,
            "--auth-token-file",
            &pki.path("token"),
        ],
        &[],
        &work.path().join("coordinator.log"),
    );
    let call = |sec: ClientSecurity| {
        let addr = addr.clone();
        async move {
            let mut c = JobServiceClient::new(sec.channel(&addr).unwrap())
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
            c.list_jobs(pb::ListJobsRequest {}).await
        }
    };
    let st = call(ClientSecurity::plain()).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unauthenticated, "{st:?}");
    let st = call(ClientSecurity::plain().with_token("guess"))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unauthenticated, "{st:?}");
    let jobs = call(ClientSecurity::plain().with_token("quarry-test-token-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(jobs.jobs.is_empty());

    // Health probes carry no token: readiness (the leader) and liveness both answer.
    let mut health = HealthClient::new(ClientSecurity::plain().channel(&addr).unwrap());
    for service in ["", "liveness"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_to_start_unauthenticated_unless_told_to() {
    let work = tempfile::tempdir().unwrap();
    let (state, store) = serve_args(work.path());
    let state = format!("file://{}", state.display());
    let store = format!("file://{}", store.display());
    let base = ["--state", state.as_str(), "--store", store.as_str()];

    // Neither a token nor client certificates: exit status 2 and one sentence naming the
    // flags that fix it; nothing listens.
    let o = serve_exits(&base, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let line = error_line(&o);
    for flag in [
        "--auth-token-file",
        "--tls-client-ca",
        "--allow-unauthenticated",
    ] {
        assert!(line.contains(flag), "{flag} not named: {line}");
    }
    assert!(!err.contains("coordinator listening on"), "{}", text(&o));
    // TLS alone does not authenticate callers either.
    let pki = Pki::generate();
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let mut with_tls = base.to_vec();
    with_tls.extend(["--tls-cert", &cert, "--tls-key", &key]);
    let o = serve_exits(&with_tls, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // Said explicitly, it serves, and answers a call without a token.
    let log = work.path().join("open.log");
    let mut open = base.to_vec();
    open.push("--allow-unauthenticated");
    let (_serve, addr) = start_serve_with(&open, &[], &log);
    let mut c = JobServiceClient::new(ClientSecurity::plain().channel(&addr).unwrap());
    assert!(
        c.list_jobs(pb::ListJobsRequest {})
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty()
    );
}
