//! Quarry on a real Slurm (recipe b of docs/slurm.md): a long-lived `coordinator serve`, and
//! workers as a 4-task job array submitted with the repository's own batch script
//! (`deploy/slurm/quarry-workers.sbatch`). Mid-job one task is `scancel`led (SIGTERM: the
//! worker drains and gives its round back) and another requeued (it comes back and registers
//! again). The finals are byte-identical to `coordinator run` of the same job, no staging is
//! left, and every round is committed exactly once. Needs root and `slurm-wlm` + `munge`
//! (installed by .ci/run); fails, never skips, without them.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use quarry_tests::cluster::{reference_run, slow_job_file, start_serve_with, wait_until};
use quarry_tests::slurm::Slurm;
use quarry_tests::*;

const SLEEP_MS: u32 = 2500;

fn status(addr: &str, token: &Path) -> serde_json::Value {
    let out = Command::new(bin("coordinator"))
        .args(["status", "served", "--json", "--coordinator", addr])
        .arg("--auth-token-file")
        .arg(token)
        .output()
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .map(|v| v[0].clone())
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_array_under_slurm_survives_scancel_and_requeue_with_exact_finals() {
    let slurm = Slurm::start(4, 8);
    let home = tempfile::tempdir().unwrap();
    let root = legacy_root();
    let quarry_home = home.path().join(".quarry");
    std::fs::create_dir_all(&quarry_home).unwrap();
    let token = quarry_home.join("token");
    std::fs::write(&token, "slurm-test-token\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let store = home.path().join("store");
    let (_serve, addr) = start_serve_with(
        &[
            "--state",
            &format!("file://{}", home.path().join("state.redb").display()),
            "--store",
            &format!("file://{}", store.display()),
            "--lease-ttl",
            "3",
            "--auth-token-file",
            token.to_str().unwrap(),
        ],
        &[],
        &home.path().join("coordinator.log"),
    );

    let script = repo_root().join("deploy/slurm/quarry-workers.sbatch");
    let logs = home.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let export = format!(
        "ALL,QUARRY_COORDINATOR={addr},QUARRY_HOME={},QUARRY_WORKER_BIN={},QUARRY_GPUS=0,QUARRY_DRAIN_GRACE=4",
        quarry_home.display(),
        bin("worker").display()
    );
    let job = slurm.sbatch(
        &[
            "--array=0-3",
            "--cpus-per-task=1",
            &format!("--output={}/worker-%A_%a.log", logs.display()),
            &format!("--export={export}"),
        ],
        &script,
    );
    let task_log = |i: u32| logs.join(format!("worker-{job}_{i}.log"));
    wait_until("4 workers registered", Duration::from_secs(60), || {
        (0..4).all(|i| log_tail(&task_log(i)).contains("agent registered"))
    });

    let job_file = slow_job_file(home.path(), root.path(), SLEEP_MS);
    let out = Command::new(bin("coordinator"))
        .arg("submit")
        .arg(&job_file)
        .args(["--coordinator", &addr])
        .arg("--auth-token-file")
        .arg(&token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("4 rounds running", Duration::from_secs(30), || {
        status(&addr, &token)["rounds_in_flight"]
            .as_u64()
            .unwrap_or(0)
            >= 4
    });

    // scancel: SIGTERM to the task; its worker drains and exits.
    slurm.ok("scancel", &[&format!("{job}_1")]);
    // Requeue: the task is stopped the same way and runs again, registering anew.
    slurm.ok("scontrol", &["requeue", &format!("{job}_2")]);
    // Slurm holds a requeued job for about two minutes (BeginTime); once its first run has
    // ended (a start in the same second would find its credential revoked), start it at
    // once, as an operator would.
    wait_until(
        "the requeued task's worker stops",
        Duration::from_secs(30),
        || log_tail(&task_log(2)).contains("agent stopped"),
    );
    std::thread::sleep(Duration::from_secs(2));
    wait_until(
        "the requeued task is pending",
        Duration::from_secs(30),
        || {
            slurm
                .tasks(&format!("{job}_2"))
                .iter()
                .any(|(_, s)| s == "PENDING")
        },
    );
    slurm.ok(
        "scontrol",
        &["update", &format!("JobId={job}_2"), "StartTime=now"],
    );
    wait_until(
        "the cancelled worker drains",
        Duration::from_secs(30),
        || log_tail(&task_log(1)).contains("draining"),
    );
    let started = std::time::Instant::now();
    while log_tail(&task_log(2)).matches("agent registered").count() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the requeued worker did not register again: {:?}\n{}\n{}",
            slurm.tasks(&job),
            log_tail(&task_log(2)),
            slurm.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until("the job is done", Duration::from_secs(180), || {
        status(&addr, &token)["state"] == "done"
    });
    let cancelled: Vec<(String, String)> = slurm.tasks(&format!("{job}_1"));
    assert!(
        cancelled.iter().all(|(_, s)| s != "RUNNING"),
        "the cancelled task still runs: {cancelled:?}"
    );

    let reference = reference_run(SLEEP_MS, &["--gpus", "0,1"]).await;
    let store = quarry_common::storage::Store::open_dir(&store).unwrap();
    let manifest =
        assert_store_finals_match(&store, "served", &["obj_a", "obj_b"], reference.path()).await;
    // The rounds the stopped tasks ran were given back, not failed: Slurm's SIGTERM reached
    // their generators too, and the draining workers knew why.
    for i in [1, 2] {
        let log = log_tail(&task_log(i));
        assert!(log.contains("giving the round back"), "task {i}:\n{log}");
    }
    for object in ["obj_a", "obj_b"] {
        let entry = &manifest["objects"][object];
        assert_eq!(entry["failed_attempts"], 0, "{entry}");
        let commits: Vec<u64> = entry["commits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["round"].as_u64().unwrap())
            .collect();
        let unique: BTreeSet<u64> = commits.iter().copied().collect();
        assert_eq!(
            unique.len(),
            commits.len(),
            "a round committed twice: {entry}"
        );
        let rounds: BTreeSet<u64> = entry["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_u64().unwrap())
            .collect();
        assert_eq!(unique, rounds, "{entry}");
    }
    assert!(
        files_under(&root.path().join("data"))
            .iter()
            .all(|f| !f.contains("__r")),
        "round directories left in the generator's root: {:?}",
        files_under(&root.path().join("data"))
    );
    drop(slurm);
}
