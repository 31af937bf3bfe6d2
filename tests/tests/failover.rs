//! Coordinator failover on a real etcd: two `coordinator serve` processes campaign, workers
//! and the CLI know both addresses; the leader is killed with SIGKILL while rounds are
//! running. The standby takes over, adopts the rounds the workers still run, and the job ends
//! with finals byte-identical to `coordinator run` of the same job, every round committed once.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::{Duration, Instant};

use quarry_tests::cluster::{FailoverPair, reference_run, wait_for_log};
use quarry_tests::etcd::Etcd;
use quarry_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_job_loses_and_duplicates_nothing() {
    let etcd = Etcd::start().await;
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("store");
    // Rounds take about a second, so some are running when the leader dies.
    let mut pair = FailoverPair::start(&etcd.endpoints()[0], home.path(), root.path(), 900);
    let log_b = pair.log_b.clone();

    // Wait until some rounds are committed and two are running, then kill the leader.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let v = pair.status();
        let committed = v["rounds_committed"].as_u64().unwrap();
        let running = v["rounds_in_flight"].as_u64().unwrap();
        if committed >= 2 && running >= 2 {
            break;
        }
        assert!(Instant::now() < until, "job made no progress: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let committed_at_kill = pair.status()["rounds_committed"].as_u64().unwrap();
    pair.a.0.kill().unwrap();
    pair.a.0.wait().unwrap();
    let killed_at = Instant::now();

    let b_log = wait_for_log(&log_b, "elected leader", Duration::from_secs(20));
    let took_over = killed_at.elapsed();
    // The job finishes under the new leader.
    let until = Instant::now() + Duration::from_secs(120);
    let mut first_commit: Option<Duration> = None;
    let done = loop {
        let v = pair.status();
        if first_commit.is_none() && v["rounds_committed"].as_u64().unwrap() > committed_at_kill {
            first_commit = Some(killed_at.elapsed());
        }
        if v["state"] == "done" {
            break v;
        }
        assert!(
            Instant::now() < until,
            "job did not finish after failover: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done["samples_collected"], 180, "{done}");
    let b_log = std::fs::read_to_string(&log_b).unwrap_or(b_log);
    assert!(
        b_log.contains("running rounds reported at registration"),
        "the new leader adopted no running round:\n{b_log}\n--- worker:\n{}",
        std::fs::read_to_string(&pair.worker_log).unwrap_or_default()
    );
    eprintln!(
        "standby took over {took_over:?} after the leader was killed; first commit by the new leader after {first_commit:?}"
    );

    // Every round committed once, and the same bytes as one coordinator running the job.
    let reference = reference_run(900, &["--gpus", "0,1"]).await;
    let store = quarry_common::storage::Store::open_dir(&store).unwrap();
    let manifest =
        assert_store_finals_match(&store, "served", &["obj_a", "obj_b"], reference.path()).await;
    for o in ["obj_a", "obj_b"] {
        let rounds: Vec<u64> = manifest["objects"][o]["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_u64().unwrap())
            .collect();
        let mut unique = rounds.clone();
        unique.dedup();
        assert_eq!(rounds, unique, "a round listed twice for {o}: {manifest}");
    }
}
