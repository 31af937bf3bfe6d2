//! A network partition between hosts: the coordinator runs in one network namespace, a worker
//! in another, joined by a veth pair. The link is cut while the worker runs a round: past the
//! lease TTL the worker must stop its own run (self-fencing) while the coordinator re-issues
//! the round to a worker on its side; when the link comes back the cut-off worker registers
//! again and takes rounds. The finals are byte-identical to the fault-free run and nothing is
//! left behind. Needs root for the namespaces (fails, never skips, without).

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use quarry_tests::cluster::{Killed, reference_run, slow_job_file, wait_until};
use quarry_tests::netns::Link;
use quarry_tests::*;

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn spawn(ns: &str, program: &str, args: &[&str], log: &Path) -> Killed {
    Killed(
        Link::command(ns, &bin(program))
            .args(args)
            .env("QUARRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_past_its_ttl_stops_its_run_and_comes_back() {
    let link = Link::new(7);
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("store");
    let job = slow_job_file(home.path(), root.path(), 2500);
    let addr = format!("{}:50051", link.addr_a());
    let log = |name: &str| home.path().join(name);
    let _coordinator = spawn(
        &link.a,
        "coordinator",
        &[
            "serve",
            "--listen",
            &addr,
            "--state",
            &format!("file://{}", home.path().join("state.redb").display()),
            "--store",
            &format!("file://{}", store.display()),
            "--lease-ttl",
            "3",
            // The test is about the network: the link is private to it.
            "--allow-unauthenticated",
        ],
        &log("coordinator.log"),
    );
    wait_until("the coordinator listens", Duration::from_secs(20), || {
        read(&log("coordinator.log")).contains("coordinator listening on")
    });
    let status = || -> serde_json::Value {
        let out = Link::command(&link.a, &bin("coordinator"))
            .args(["status", "served", "--json", "--coordinator", &addr])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };

    // The worker on the far side of the link takes the first round.
    let _far = spawn(
        &link.b,
        "worker",
        &["--gpu", "0", "--coordinator", &addr],
        &log("far.log"),
    );
    wait_until("the far worker registers", Duration::from_secs(20), || {
        read(&log("far.log")).contains("agent registered")
    });
    let out = Link::command(&link.a, &bin("coordinator"))
        .arg("submit")
        .arg(&job)
        .args(["--coordinator", &addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "the far worker runs a round",
        Duration::from_secs(20),
        || status()[0]["rounds_in_flight"].as_u64().unwrap_or(0) >= 1,
    );

    // Partition. A worker on the coordinator's side will finish the job.
    link.set_up(false);
    let cut = Instant::now();
    let _near = spawn(
        &link.a,
        "worker",
        &["--gpu", "1", "--coordinator", &addr],
        &log("near.log"),
    );
    wait_until(
        "the cut-off worker fences itself",
        Duration::from_secs(15),
        || read(&log("far.log")).contains("fencing"),
    );
    let fenced_after = cut.elapsed();
    // The lease TTL is 3 s: the worker must not fence before it, and not much later.
    assert!(
        fenced_after >= Duration::from_secs(2),
        "fenced {fenced_after:?} after the cut, before the lease TTL could have passed"
    );

    // Heal: the worker registers again and the job completes.
    link.set_up(true);
    wait_until(
        "the cut-off worker registers again",
        Duration::from_secs(30),
        || read(&log("far.log")).matches("agent registered").count() >= 2,
    );
    wait_until("the job is done", Duration::from_secs(120), || {
        status()[0]["state"] == "done"
    });
    eprintln!("worker fenced {fenced_after:?} after the link was cut (lease TTL 3 s)");

    let reference = reference_run(2500, &["--gpus", "0,1"]).await;
    let store = quarry_common::storage::Store::open_dir(&store).unwrap();
    let manifest =
        assert_store_finals_match(&store, "served", &["obj_a", "obj_b"], reference.path()).await;
    // The fenced attempt was recorded as failed (its lease expired), and nothing else failed.
    let failed: u64 = ["obj_a", "obj_b"]
        .iter()
        .map(|o| manifest["objects"][o]["failed_attempts"].as_u64().unwrap())
        .sum();
    assert!(
        failed >= 1,
        "the cut-off attempt is not on record: {manifest}"
    );
    assert!(
        files_under(&root.path().join("data"))
            .iter()
            .all(|f| !f.contains("__r")),
        "round directories left in the generator's root: {:?}",
        files_under(&root.path().join("data"))
    );
}
