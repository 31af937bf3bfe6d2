//! `coordinator serve`, `worker`, `coordinator submit --watch` and `coordinator status` as
//! separate processes on one machine, sharing a directory store: the finals are byte-identical
//! to `coordinator run` of the same job.

use std::process::Command;
use std::time::{Duration, Instant};

use quarry_tests::cluster::{Killed, served_job_file, spawn_worker, status, submit};
use quarry_tests::*;

fn job_file(dir: &std::path::Path, root: &std::path::Path) -> std::path::PathBuf {
    served_job_file(dir, root, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_worker_submit_status_as_processes() {
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("store");
    let job = job_file(home.path(), root.path());

    let (serve, addr) = start_serve(home.path(), &store, "5");

    let _worker = spawn_worker(&addr, "0,1", &[], None);
    let submit = submit(&job, &addr, true);
    let submit_err = String::from_utf8_lossy(&submit.stderr);
    assert!(submit.status.success(), "{submit_err}");
    assert_eq!(String::from_utf8_lossy(&submit.stdout).trim(), "served");
    assert!(submit_err.contains("job served: done"), "{submit_err}");

    let status = Command::new(bin("coordinator"))
        .args(["status", "served", "--json", "--coordinator", &addr])
        .output()
        .unwrap();
    assert!(status.status.success());
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v[0]["state"], "done", "{v}");
    assert_eq!(v[0]["samples_collected"], 180);
    assert_eq!(v[0]["workers"].as_array().unwrap().len(), 2, "{v}");
    // `coordinator status | head`: a reader that goes away before the output is written ends
    // it quietly with the command's exit status, not a panic.
    for args in [
        vec!["status", "served"],
        vec!["status", "served", "--json"],
        vec!["jobs"],
    ] {
        let mut child = Command::new(bin("coordinator"))
            .args(&args)
            .args(["--coordinator", &addr])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.status.success(), "{args:?}: {stderr}");
    }

    // The same job through `coordinator run` gives the same bytes.
    let reference = legacy_root();
    let reference_job = job_file(reference.path(), reference.path());
    let out = run(&[
        "--job",
        reference_job.to_str().unwrap(),
        "--progress",
        "off",
    ])
    .await
    .unwrap();
    assert_eq!(out.exit_code(), 0);
    let served_manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("served/manifest.json")).unwrap())
            .unwrap();
    for o in ["obj_a", "obj_b"] {
        let key = served_manifest["objects"][o]["final"][0].as_str().unwrap();
        assert_eq!(
            sha256_file(&store.join(key)),
            sha256_file(&finals(reference.path(), "served", o)[0])
        );
    }

    // SIGTERM stops the coordinator cleanly.
    let mut serve = serve;
    let pid = serve.0.id() as i32;
    // SAFETY: kill(2) with a pid of our own live child; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = serve.0.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "coordinator did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_serve(home: &std::path::Path, store: &std::path::Path, ttl: &str) -> (Killed, String) {
    start_serve_with_state(
        &format!("file://{}", home.join("state.redb").display()),
        store,
        ttl,
    )
}

fn start_serve_with_state(state: &str, store: &std::path::Path, ttl: &str) -> (Killed, String) {
    let store_url = format!("file://{}", store.display());
    quarry_tests::cluster::start_serve(
        state,
        &store_url,
        ttl,
        &[],
        &store.with_extension("coordinator.log"),
    )
}

/// A worker killed with SIGKILL mid-round stops heartbeating; after the lease TTL its round is
/// re-issued as a new attempt to another worker, and the finals are the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_round_is_reissued_after_the_lease_ttl() {
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("store");
    let text = std::fs::read_to_string(job_file(home.path(), root.path())).unwrap();
    // Slow rounds so the kill lands mid-round.
    let text = text.replace("\"uneven\"]", "\"uneven\", \"--sleep_ms\", \"700\"]");
    let job = home.path().join("slow.toml");
    std::fs::write(&job, text).unwrap();
    let (_serve, addr) = start_serve(home.path(), &store, "2");

    let mut doomed = spawn_worker(&addr, "0", &[], None);
    let submit = submit(&job, &addr, false);
    assert!(
        submit.status.success(),
        "{}",
        String::from_utf8_lossy(&submit.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(&addr, "served");
        if s.as_ref()
            .is_some_and(|s| s["rounds_in_flight"].as_u64().unwrap_or(0) > 0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "no round started: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    doomed.0.kill().unwrap(); // SIGKILL, mid-round
    doomed.0.wait().unwrap();

    let _rescuer = spawn_worker(&addr, "1", &[], None);
    let watch = Command::new(bin("coordinator"))
        .args(["status", "served", "--watch", "--coordinator", &addr])
        .output()
        .unwrap();
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("served/manifest.json")).unwrap())
            .unwrap();
    let failed: u64 = ["obj_a", "obj_b"]
        .iter()
        .map(|o| manifest["objects"][o]["failed_attempts"].as_u64().unwrap())
        .sum();
    assert!(
        failed >= 1,
        "the killed worker's lease expired as a failed attempt: {manifest}"
    );

    let reference = legacy_root();
    let reference_job = job_file(reference.path(), reference.path());
    assert_eq!(
        run(&[
            "--job",
            reference_job.to_str().unwrap(),
            "--progress",
            "off"
        ])
        .await
        .unwrap()
        .exit_code(),
        0
    );
    for o in ["obj_a", "obj_b"] {
        let key = manifest["objects"][o]["final"][0].as_str().unwrap();
        assert_eq!(
            sha256_file(&store.join(key)),
            sha256_file(&finals(reference.path(), "served", o)[0])
        );
    }
    assert!(!store.join("served/rounds").exists(), "staging left behind");
}

/// The same job with its state in a real etcd (`--state etcd://...`): same bytes as `run`,
/// and the commits are in etcd under the given prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_etcd_state_gives_the_same_finals() {
    let etcd = quarry_tests::etcd::Etcd::start().await;
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("store");
    let job = job_file(home.path(), root.path());
    let hostport = etcd.endpoints()[0]
        .trim_start_matches("http://")
        .to_string();
    let (_serve, addr) =
        start_serve_with_state(&format!("etcd://{hostport}/quarry-e2e"), &store, "5");
    let _worker = spawn_worker(&addr, "0,1", &[], None);
    let submit = submit(&job, &addr, true);
    assert!(
        submit.status.success(),
        "{}",
        String::from_utf8_lossy(&submit.stderr)
    );

    let state =
        quarry_coordinator::state::etcd::EtcdStore::connect(&etcd.endpoints(), "/quarry-e2e")
            .await
            .unwrap();
    let job_rec = quarry_coordinator::state::StateStore::get_job(&state, "served")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job_rec.state, quarry_coordinator::state::JobState::Done);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("served/manifest.json")).unwrap())
            .unwrap();
    let reference = legacy_root();
    let reference_job = job_file(reference.path(), reference.path());
    assert_eq!(
        run(&[
            "--job",
            reference_job.to_str().unwrap(),
            "--progress",
            "off"
        ])
        .await
        .unwrap()
        .exit_code(),
        0
    );
    for o in ["obj_a", "obj_b"] {
        let rec = quarry_coordinator::state::StateStore::load_object(&state, "served", o)
            .await
            .unwrap();
        let merge = rec.merge.expect("merge record in etcd");
        assert!(merge.cleaned && merge.complete);
        let key = manifest["objects"][o]["final"][0].as_str().unwrap();
        assert_eq!(merge.finals[0], key);
        assert_eq!(
            sha256_file(&store.join(key)),
            sha256_file(&finals(reference.path(), "served", o)[0])
        );
    }
}

/// SIGTERM to an idle `coordinator serve` (no connection open) is a clean stop, every time:
/// the server may finish before the coordinator closes, which is not an error.
#[test]
fn sigterm_of_an_idle_coordinator_exits_0() {
    for i in 0..3 {
        let home = tempfile::tempdir().unwrap();
        let store = home.path().join("store");
        let (serve, _addr) = start_serve(home.path(), &store, "5");
        let mut serve = serve;
        // SAFETY: kill(2) with a pid of our own live child; no memory is involved.
        unsafe { libc::kill(serve.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let st = loop {
            if let Some(st) = serve.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "run {i}: no exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            st.success(),
            "run {i}: {st}\n{}",
            std::fs::read_to_string(store.with_extension("coordinator.log")).unwrap_or_default()
        );
    }
}
