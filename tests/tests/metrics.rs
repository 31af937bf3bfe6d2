//! The coordinator's Prometheus endpoint, scraped over HTTP from a real `coordinator serve`
//! while a real worker runs a job: the counters agree with what the job did.

#![allow(clippy::unwrap_used)] // tests may unwrap

use quarry_tests::cluster::{
    metrics_addr, sample, scrape, served_job_file, spawn_worker, start_serve_with, submit,
};
use quarry_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_job_did() {
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("store");
    let job = served_job_file(home.path(), root.path(), "");
    let log = home.path().join("coordinator.log");
    let state = format!("file://{}", home.path().join("state.redb").display());
    let store_url = format!("file://{}", store.display());
    let (_serve, addr) = start_serve_with(
        &[
            "--state",
            &state,
            "--store",
            &store_url,
            "--lease-ttl",
            "5",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
        &log,
    );
    let metrics_addr = metrics_addr(&log);
    let before = scrape(&metrics_addr, "/metrics");
    assert!(before.starts_with("HTTP/1.1 200 OK"), "{before}");
    assert_eq!(sample(&before, "quarry_leader"), 1.0);
    assert_eq!(sample(&before, "quarry_rounds_committed_total"), 0.0);
    assert!(scrape(&metrics_addr, "/healthz").starts_with("HTTP/1.1 200"));

    let _worker = spawn_worker(&addr, "0,1", &[], None);
    let out = submit(&job, &addr, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = std::process::Command::new(bin("coordinator"))
        .args(["status", "served", "--json", "--coordinator", &addr])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let committed = status[0]["rounds_committed"].as_u64().unwrap();
    assert!(committed >= 4, "{status}");
    let m = manifest_at(&store.join("served/manifest.json"));

    let after = scrape(&metrics_addr, "/metrics");
    assert_eq!(
        sample(&after, "quarry_rounds_committed_total"),
        committed as f64
    );
    // Every committed round's samples count, including those past the quota.
    assert!(
        sample(&after, "quarry_samples_committed_total") >= 180.0,
        "{after}"
    );
    assert!(sample(&after, "quarry_rounds_leased_total") >= committed as f64);
    assert_eq!(
        sample(&after, "quarry_commit_seconds_count"),
        committed as f64
    );
    assert_eq!(
        sample(&after, "quarry_merge_seconds_count"),
        2.0,
        "one merge per object"
    );
    let final_bytes: u64 = ["obj_a", "obj_b"]
        .iter()
        .map(|o| {
            let key = m["objects"][o]["final"][0].as_str().unwrap();
            std::fs::metadata(store.join(key)).unwrap().len()
        })
        .sum();
    assert_eq!(
        sample(&after, "quarry_merge_bytes_total"),
        final_bytes as f64
    );
    assert!(
        after.contains("# TYPE quarry_acquire_seconds histogram"),
        "{after}"
    );
}

fn manifest_at(p: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}
