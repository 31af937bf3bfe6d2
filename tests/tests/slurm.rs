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
use quarry_tests::process::running_instances_of;
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
    // The workers Slurm started are the binary the harness resolved: with QUARRY_BIN_DIR (CI
    // runs this test so with the pip wheel's venv) the installed one, not a workspace build.
    let worker_bin = bin("worker");
    eprintln!("the Slurm tasks run {}", worker_bin.display());
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|d| !d.is_empty()) {
        assert!(worker_bin.starts_with(&dir), "{}", worker_bin.display());
    }
    let running = running_instances_of(&worker_bin);
    assert!(
        running >= 4,
        "{running} processes run {}, not the 4 tasks' workers",
        worker_bin.display()
    );

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
    // The rounds the stopped tasks ran were given back, not failed (failed_attempts is 0
    // below): Slurm's SIGTERM reached their generators too, and the draining workers knew
    // why. A task whose signal came between two rounds had none to give back (one run in
    // seven), so the logs are checked for the drain only.
    for i in [1, 2] {
        let log = log_tail(&task_log(i));
        assert!(log.contains("draining"), "task {i}:\n{log}");
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

/// A worker that knows when its allocation ends (`--end-time`, or SLURM_JOB_END_TIME) takes
/// rounds only while the longest one so far still fits, then drains and exits 0 before the
/// end: no round is cut half-way, nothing fails. It registers under its `--name`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stops_taking_rounds_that_cannot_finish_before_its_allocation_ends() {
    let home = tempfile::tempdir().unwrap();
    let root = legacy_root();
    let (_serve, addr) = start_serve_with(
        &[
            "--state",
            &format!("file://{}", home.path().join("state.redb").display()),
            "--store",
            &format!("file://{}", home.path().join("store").display()),
            "--allow-unauthenticated",
        ],
        &[],
        &home.path().join("coordinator.log"),
    );
    let job_file = slow_job_file(home.path(), root.path(), SLEEP_MS);
    let out = quarry_tests::cluster::submit(&job_file, &addr, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 15 s are kept for upload and report: with 24 s left the first round is taken, and a
    // few more, until less than 2.5 s + 10% + 15 s remain.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let end = now + 24;
    let log = home.path().join("worker.log");
    let started = std::time::Instant::now();
    let mut worker = Command::new(bin("worker"))
        .args(["--gpu", "0", "--coordinator", &addr, "--name", "slurm-77_3"])
        .arg("--end-time")
        .arg(end.to_string())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = worker.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the worker is still running past its allocation's end:\n{}",
            log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(status.success(), "{status}\n{}", log_tail(&log));
    assert!(ended <= end, "exited at {ended}, after the end {end}");
    let text = log_tail(&log);
    assert!(
        text.contains("no new rounds before the allocation ends"),
        "{text}"
    );
    assert!(text.contains("worker=slurm-77_3-"), "{text}");
    let st = quarry_tests::cluster::status(&addr, "served").unwrap();
    let committed = st["rounds_committed"].as_u64().unwrap();
    assert!(committed >= 2, "{st}");
    assert_eq!(st["failed_attempts"], 0, "{st}");
    assert_eq!(st["rounds_in_flight"], 0, "{st}");
}

/// Recipe a: one allocation runs the coordinator on its first node, a worker per node
/// (`srun`) and the job to its end, with state and finals on the shared file system; the
/// finals equal `coordinator run`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_allocation_runs_a_whole_job_with_exact_finals() {
    let slurm = Slurm::start(2, 8);
    let shared = tempfile::tempdir().unwrap();
    let root = legacy_root();
    let job_file = slow_job_file(shared.path(), root.path(), 300);
    let script = repo_root().join("deploy/slurm/quarry-allocation.sbatch");
    let bin_dir = bin("coordinator").parent().unwrap().to_path_buf();
    let out = slurm
        .command("sbatch")
        .args(["--parsable", "--nodes=1", "--gres=gpu:2", "--export=ALL"])
        .arg(format!(
            "--output={}/quarry-%j.log",
            shared.path().display()
        ))
        .arg(&script)
        .arg(&job_file)
        .env("QUARRY_SHARED", shared.path())
        .env("QUARRY_BIN", &bin_dir)
        .env("QUARRY_GPUS", "0,1")
        .env("QUARRY_PORT", free_port().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let log = shared.path().join(format!("quarry-{job}.log"));
    let started = std::time::Instant::now();
    while !slurm.tasks(&job).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the allocation still runs after 180 s:\n{}\n{}",
            log_tail(&log),
            slurm.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let text = log_tail(&log);
    assert!(text.contains("job served: done"), "{text}");
    assert_eq!(text.matches("agent registered").count(), 2, "{text}");
    let reference = reference_run(300, &["--gpus", "0,1"]).await;
    let store = quarry_common::storage::Store::open_dir(&shared.path().join("store")).unwrap();
    let manifest =
        assert_store_finals_match(&store, "served", &["obj_a", "obj_b"], reference.path()).await;
    assert_eq!(manifest["state"], "done", "{manifest}");
    // The allocation's token is gone with it.
    let left: Vec<String> = std::fs::read_dir(shared.path().join(".quarry-slurm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("token"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
