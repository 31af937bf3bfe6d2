//! Cluster mode end to end: `coordinator serve` with its state in a real etcd and its data in
//! a real S3 server (moto), three `worker` processes; finals in S3 byte-identical to
//! `coordinator run` of the same job on one machine. Then the same with etcd killed (SIGKILL)
//! and restarted while the job runs.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use quarry_tests::cluster::{
    Killed, reference_run, slow_job_file, spawn_worker, start_serve_with, submit,
};
use quarry_tests::etcd::Etcd;
use quarry_tests::s3::Moto;
use quarry_tests::*;

struct Cluster {
    _serve: Killed,
    _workers: Vec<Killed>,
    addr: String,
    home: tempfile::TempDir,
}

fn start(etcd: &Etcd, moto: &Moto, prefix: &str) -> Cluster {
    let home = tempfile::tempdir().unwrap();
    let state = format!(
        "etcd://{}/{prefix}",
        etcd.endpoints()[0].trim_start_matches("http://")
    );
    let store = format!("s3://{}/{prefix}", moto.bucket());
    let env = moto.env();
    let (serve, addr) = start_serve_with(
        &[
            "--state",
            &state,
            "--store",
            &store,
            "--lease-ttl",
            "5",
            "--election-ttl",
            "10",
        ],
        &env,
        &home.path().join("coordinator.log"),
    );
    let workers = (0..3)
        .map(|i| {
            spawn_worker(
                &addr,
                &i.to_string(),
                &env,
                Some(&home.path().join(format!("worker{i}.log"))),
            )
        })
        .collect();
    Cluster {
        _serve: serve,
        _workers: workers,
        addr,
        home,
    }
}

impl Cluster {
    fn logs(&self) -> String {
        let mut out = String::new();
        for f in [
            "coordinator.log",
            "worker0.log",
            "worker1.log",
            "worker2.log",
        ] {
            let text = std::fs::read_to_string(self.home.path().join(f)).unwrap_or_default();
            let start = text.len().saturating_sub(2500);
            out.push_str(&format!(
                "--- {f}:\n{}\n",
                text.get(start..).unwrap_or(&text)
            ));
        }
        out
    }

    fn submit(&self, job: &Path) {
        let out = submit(job, &self.addr, false);
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    fn status(&self) -> serde_json::Value {
        let out = Command::new(bin("coordinator"))
            .args(["status", "served", "--json", "--coordinator", &self.addr])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Finals in the bucket under `prefix` equal `coordinator run`'s of the same job; no staging
/// and no open multipart upload is left.
async fn assert_same_as_local_run(moto: &Moto, prefix: &str, sleep_ms: u32) {
    let reference = reference_run(sleep_ms, &[]).await;
    let store = moto.store(prefix);
    let manifest =
        assert_store_finals_match(&store, "served", &["obj_a", "obj_b"], reference.path()).await;
    for o in ["obj_a", "obj_b"] {
        assert_eq!(manifest["objects"][o]["collected"], 90, "{manifest}");
    }
    assert!(
        moto.open_multipart_uploads().is_empty(),
        "multipart uploads left open: {:?}",
        moto.open_multipart_uploads()
    );
}

fn wait_done(c: &Cluster, limit: Duration) -> serde_json::Value {
    let until = Instant::now() + limit;
    loop {
        let v = c.status();
        if v[0]["state"] != "running" {
            return v;
        }
        assert!(
            Instant::now() < until,
            "job not done in {limit:?}: {v}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_s3_and_three_workers_give_the_single_machine_finals() {
    let etcd = Etcd::start().await;
    let moto = Moto::start("quarry-cluster");
    let c = start(&etcd, &moto, "e2e");
    let root = legacy_root();
    let jobfile = slow_job_file(c.home.path(), root.path(), 0);
    c.submit(&jobfile);
    let v = wait_done(&c, Duration::from_secs(90));
    assert_eq!(v[0]["state"], "done", "{v}\n{}", c.logs());
    let workers: Vec<&str> = v[0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["gpu"].as_str().unwrap())
        .collect();
    assert_eq!(workers.len(), 3, "{v}");
    assert_same_as_local_run(&moto, "e2e", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_mid_job_loses_nothing() {
    let mut etcd = Etcd::start().await;
    let moto = Moto::start("quarry-etcd-restart");
    let c = start(&etcd, &moto, "restart");
    let root = legacy_root();
    let jobfile = slow_job_file(c.home.path(), root.path(), 400);
    c.submit(&jobfile);
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c.status();
        if v[0]["rounds_committed"].as_u64().unwrap() >= 2 {
            break;
        }
        assert!(Instant::now() < until, "no progress: {v}\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGKILL etcd, leave it down for a second (commits fail and are retried), bring it back.
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.restart().await;
    let v = wait_done(&c, Duration::from_secs(120));
    assert_eq!(v[0]["state"], "done", "{v}\n{}", c.logs());
    assert_same_as_local_run(&moto, "restart", 400).await;
}
