//! Traces over OTLP from real processes: a real `coordinator serve` and two real `worker`
//! processes export to an OTLP/gRPC trace receiver hosted by this test. Every committed round
//! must be exactly one trace holding the coordinator's `lease` and `commit` spans and the
//! worker's `round`, `prepare`, `generator` and `upload` spans, correctly parented, with the
//! round's attributes.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use quarry_tests::cluster::{
    served_job_file, spawn_worker, spawn_worker_args, start_serve_with, submit,
};
use quarry_tests::*;

/// A span as received, with its resource's `service.name` and `host.name`.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    host: String,
    /// `deployment.environment`, from `OTEL_RESOURCE_ATTRIBUTES`.
    environment: Option<String>,
    span: Span,
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = text(&attrs, "service.name").unwrap_or_default();
            let host = text(&attrs, "host.name").unwrap_or_default();
            let environment = text(&attrs, "deployment.environment");
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        host: host.clone(),
                        environment: environment.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn value(attrs: &[KeyValue], key: &str) -> Option<any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v: AnyValue| v.value)
}

fn text(attrs: &[KeyValue], key: &str) -> Option<String> {
    match value(attrs, key)? {
        any_value::Value::StringValue(s) => Some(s),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn int(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match value(attrs, key)? {
        any_value::Value::IntValue(i) => Some(i),
        any_value::Value::StringValue(s) => s.parse().ok(),
        _ => None,
    }
}

/// Hosts the receiver on a loopback port; returns its spans and its `http://` address.
async fn receiver() -> (Sink, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = Sink::default();
    let svc = TraceServiceServer::new(sink.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (sink, format!("http://{addr}"))
}

/// SIGTERM (so the process flushes its spans), then waits for the exit, bounded.
fn terminate(child: &mut Child, what: &str) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        assert!(Instant::now() < until, "{what} did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_round_is_one_trace_across_processes() {
    let (sink, endpoint) = receiver().await;
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("store");
    let job = served_job_file(home.path(), root.path(), "");
    let state = format!("file://{}", home.path().join("state.redb").display());
    let store_url = format!("file://{}", store.display());
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone())];
    let (mut serve, addr) = start_serve_with(
        &["--state", &state, "--store", &store_url, "--lease-ttl", "5"],
        &env,
        &home.path().join("coordinator.log"),
    );
    let w0_log = home.path().join("worker0.log");
    let w1_log = home.path().join("worker1.log");
    let mut w0 = spawn_worker(&addr, "0", &env, Some(&w0_log));
    // The standard variables reach the resource: worker 1 names its environment.
    let w1_env = [
        env[0].clone(),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=tracing-test".to_string(),
        ),
    ];
    // Worker 1 leases rounds four at a time: a queued round's trace is as any other's.
    let mut w1 = spawn_worker_args(
        &["--gpu", "1", "--coordinator", &addr, "--lease-batch", "4"],
        &w1_env,
        Some(&w1_log),
    );
    let out = submit(&job, &addr, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    terminate(&mut w0.0, "worker 0");
    terminate(&mut w1.0, "worker 1");
    terminate(&mut serve.0, "coordinator");

    let manifest = std::fs::read_to_string(store.join("served/manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let mut commits = Vec::new();
    for o in ["obj_a", "obj_b"] {
        for c in m["objects"][o]["commits"].as_array().unwrap() {
            commits.push((
                o.to_string(),
                c["round"].as_u64().unwrap() as i64,
                c["seed"].as_i64().unwrap(),
                c["attempt"].as_str().unwrap().to_string(),
            ));
        }
    }
    assert!(commits.len() >= 4, "{m}");

    // Every process flushed on SIGTERM; the receiver may still be storing the last batch.
    let until = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = sink.0.lock().unwrap().clone();
        let commit_spans = spans.iter().filter(|g| g.span.name == "commit").count();
        if commit_spans >= commits.len() || Instant::now() > until {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    eprintln!(
        "{} spans received for {} committed rounds",
        spans.len(),
        commits.len()
    );
    let names: HashSet<&str> = spans.iter().map(|g| g.span.name.as_str()).collect();
    for n in &names {
        assert!(
            [
                "lease",
                "round",
                "prepare",
                "generator",
                "upload",
                "commit",
                "merge"
            ]
            .contains(n),
            "unexpected span {n:?} exported (transport internals must be filtered): {names:?}"
        );
    }
    for g in &spans {
        assert!(!g.host.is_empty(), "no host.name on {:?}", g.span.name);
        let want = match g.span.name.as_str() {
            "lease" | "commit" | "fail" | "merge" => "quarry-coordinator",
            _ => "quarry-worker",
        };
        assert_eq!(g.service, want, "service of {:?}", g.span.name);
    }

    let mut by_trace: HashMap<Vec<u8>, Vec<&Got>> = HashMap::new();
    for g in &spans {
        by_trace.entry(g.span.trace_id.clone()).or_default().push(g);
    }
    let mut gpus = HashSet::new();
    for (object, round, seed, attempt) in &commits {
        // Every span naming this attempt is in one trace.
        let traces: HashSet<&Vec<u8>> = spans
            .iter()
            .filter(|g| text(&g.span.attributes, "attempt").as_deref() == Some(attempt))
            .filter(|g| int(&g.span.attributes, "round") == Some(*round))
            .filter(|g| text(&g.span.attributes, "object").as_deref() == Some(object))
            .map(|g| &g.span.trace_id)
            .collect();
        assert_eq!(
            traces.len(),
            1,
            "{object} round {round} attempt {attempt}: spans in {} traces",
            traces.len()
        );
        let trace = *traces.iter().next().unwrap();
        let members = &by_trace[trace];
        let ids: HashSet<&Vec<u8>> = members.iter().map(|g| &g.span.span_id).collect();
        let roots: Vec<&&Got> = members
            .iter()
            .filter(|g| g.span.parent_span_id.is_empty())
            .collect();
        assert_eq!(roots.len(), 1, "trace {}: roots {roots:?}", hex(trace));
        assert_eq!(
            roots[0].span.name, "lease",
            "the coordinator's lease is the root"
        );
        for g in members {
            if !g.span.parent_span_id.is_empty() {
                assert!(
                    ids.contains(&g.span.parent_span_id),
                    "trace {}: {:?} has a parent outside the trace",
                    hex(trace),
                    g.span.name
                );
            }
        }
        let one = |name: &str| -> &Got {
            let v: Vec<&&Got> = members.iter().filter(|g| g.span.name == name).collect();
            assert_eq!(
                v.len(),
                1,
                "trace {}: {name} spans: {}",
                hex(trace),
                v.len()
            );
            v[0]
        };
        let lease = one("lease");
        let round_span = one("round");
        let commit = one("commit");
        assert_eq!(round_span.span.parent_span_id, lease.span.span_id);
        assert_eq!(commit.span.parent_span_id, round_span.span.span_id);
        for name in ["prepare", "generator", "upload"] {
            assert_eq!(
                one(name).span.parent_span_id,
                round_span.span.span_id,
                "{name} is a child of round"
            );
        }
        for g in [lease, round_span, commit] {
            let a = &g.span.attributes;
            assert_eq!(text(a, "job").as_deref(), Some("served"), "{}", g.span.name);
            assert_eq!(text(a, "object").as_deref(), Some(object.as_str()));
            assert_eq!(int(a, "round"), Some(*round));
            assert_eq!(int(a, "seed"), Some(*seed), "{}", g.span.name);
            assert_eq!(text(a, "attempt").as_deref(), Some(attempt.as_str()));
        }
        let a = &round_span.span.attributes;
        gpus.insert(text(a, "gpu").unwrap());
        assert_eq!(text(a, "outcome").as_deref(), Some("committed"));
        assert!(int(a, "bytes").unwrap() > 0);
        assert!(int(a, "samples").unwrap() > 0);
        let a = &commit.span.attributes;
        assert_eq!(text(a, "outcome").as_deref(), Some("committed"));
        assert!(int(a, "bytes").unwrap() > 0);
        assert!(int(a, "samples").unwrap() > 0);
        let a = &one("upload").span.attributes;
        assert!(int(a, "bytes").unwrap() > 0);
        assert_eq!(
            text(&one("generator").span.attributes, "outcome").as_deref(),
            Some("ok")
        );
        // One process per round in this job: the cold start is inside the span.
        assert_eq!(
            text(&one("generator").span.attributes, "mode").as_deref(),
            Some("process")
        );
    }
    eprintln!("rounds ran on GPUs {gpus:?}");
    // Worker 1's spans carry its OTEL_RESOURCE_ATTRIBUTES; worker 0's and the coordinator's
    // do not.
    for g in &spans {
        if g.span.name == "round" {
            let from_w1 = text(&g.span.attributes, "gpu").as_deref() == Some("1");
            assert_eq!(
                g.environment.as_deref(),
                from_w1.then_some("tracing-test"),
                "resource of a round on GPU {:?}",
                text(&g.span.attributes, "gpu")
            );
        } else if g.service == "quarry-coordinator" {
            assert_eq!(g.environment, None, "{:?}", g.span.name);
        }
    }
    assert!(
        gpus.iter().all(|g| g == "0" || g == "1"),
        "gpu attributes: {gpus:?}"
    );

    // One merge per object, each its own trace, linked to commits of that object.
    let commit_ids: HashSet<&Vec<u8>> = spans
        .iter()
        .filter(|g| g.span.name == "commit")
        .map(|g| &g.span.span_id)
        .collect();
    let merges: Vec<&Got> = spans.iter().filter(|g| g.span.name == "merge").collect();
    assert_eq!(merges.len(), 2, "one merge span per object");
    for g in merges {
        assert!(g.span.parent_span_id.is_empty());
        assert_eq!(
            text(&g.span.attributes, "outcome").as_deref(),
            Some("merged")
        );
        assert!(!g.span.links.is_empty(), "merge links to its commits");
        for l in &g.span.links {
            assert!(commit_ids.contains(&l.span_id), "merge links a commit span");
        }
    }
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let home = tempfile::tempdir().unwrap();
    let log = home.path().join("worker.log");
    // A coordinator address where nothing listens: the worker starts, logs, and retries.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut w = quarry_tests::cluster::spawn_worker_args(
        &[
            "--gpu",
            "0",
            "--coordinator",
            &closed,
            "--log-format",
            "json",
        ],
        &[],
        Some(&log),
    );
    let until = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("worker starting")
    {
        assert!(Instant::now() < until, "the worker logged nothing");
        std::thread::sleep(Duration::from_millis(50));
    }
    terminate(&mut w.0, "worker");
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 2, "start and drain are logged:\n{text}");
}
