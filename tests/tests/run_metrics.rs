//! `coordinator run --metrics-listen`: one endpoint with the coordinator's series and the
//! in-process agents' (what `serve` and `worker` serve between them), scraped by a real
//! Prometheus while a real run goes on, and its committed-round counters equal the rounds
//! the job committed.
//!
//! The run is kept alive for the scrape without a sleep: the job's last round (object obj_b,
//! round 1) runs behind a gate, a file the test creates once Prometheus has seen the counters,
//! and then fails. Its object has no rounds left (`max_rounds = 2`, no retries), so nothing
//! commits after the scrape: the counters seen are the job's final count, which the run's
//! summary then confirms (and the run exits 3, exhausted).

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quarry_tests::cluster::{Killed, metrics_addr, wait_until};
use quarry_tests::prometheus::Prometheus;
use quarry_tests::*;

/// The seed of obj_b's round 1 (seed_base 5 + 1 * 100000 + 1): the gated round.
const GATED_SEED: u64 = 100_006;

/// A job of two objects, two rounds of 25 each; obj_b's round 1 waits for `dir/gate`, then
/// fails.
fn gated_job(dir: &Path, root: &Path) -> std::path::PathBuf {
    let gate = dir.join("gate.sh");
    std::fs::write(
        &gate,
        format!(
            r#"#!/bin/sh
# $1: the round's seed; the rest: the generator's command line.
seed=$1; shift
if [ "$seed" = {GATED_SEED} ]; then
  touch "{dir}/waiting"
  i=0
  while [ ! -e "{dir}/gate" ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done
  exit 3
fi
exec "$@"
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    let text = format!(
        r#"
exp_name = "metered"
objects = ["obj_a", "obj_b"]
target_count_per_object = 50
round_batch_size = 25
num_iterations = 1
seed_base = 5
max_rounds = 2
retries = 0
root = "{root}"

[generator]
argv = ["sh", "{gate}", "{{seed}}", "python3", "main.py", "--name", "{{name}}",
        "--object_code", "{{object}}", "--batch_size", "{{batch_size}}",
        "--num_iterations", "{{num_iterations}}", "--seed", "{{seed}}"]
cwd = "BimanGrasp-Optimization"
output = "data/experiments/{{name}}/results/{{object}}.npy"
round_dir = "data/experiments/{{name}}"
"#,
        root = root.display(),
        gate = gate.display(),
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `rounds_committed` of the job as `coordinator status --root` reports it.
fn status_committed(root: &Path) -> Option<u64> {
    let out = Command::new(bin("coordinator"))
        .args(["status", "metered", "--json", "--root"])
        .arg(root)
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v[0]["rounds_committed"].as_u64()
}

#[test]
fn prometheus_scrapes_run_and_counts_the_jobs_committed_rounds() {
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let job = gated_job(home.path(), root.path());
    let log = home.path().join("run.log");
    let mut run = Killed(
        Command::new(bin("coordinator"))
            .arg("run")
            .arg("--job")
            .arg(&job)
            .args(["--gpus", "0,1", "--progress", "off"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("QUARRY_GPU_INVENTORY", "none")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr = metrics_addr(&log);
    let config = home.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
             - job_name: quarry-run\n    static_configs:\n      - targets: [\"{addr}\"]\n"
        ),
    )
    .unwrap();
    let prom = Prometheus::start(&config, home.path());

    // Every round but the gated one is committed, and the gated one is running.
    wait_until(
        "obj_b's round 1 waiting at its gate",
        Duration::from_secs(60),
        || home.path().join("waiting").exists(),
    );
    let mut committed = None;
    wait_until(
        "three committed rounds in `coordinator status`",
        Duration::from_secs(60),
        || {
            committed = status_committed(root.path()).filter(|&n| n == 3);
            committed.is_some()
        },
    );
    let committed = committed.unwrap() as f64;

    // Prometheus sees the coordinator's counter and the agents' on the one target.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (coord, agents, leader) = loop {
        let coord = prom.scalar("sum(quarry_rounds_committed_total)");
        let agents = prom.scalar("sum(quarry_worker_rounds_total{outcome=\"committed\"})");
        let leader = prom.scalar("quarry_leader");
        if coord == Some(committed) && agents == Some(committed) {
            break (coord, agents, leader);
        }
        assert!(
            Instant::now() < deadline,
            "prometheus saw committed rounds {coord:?} (coordinator), {agents:?} (agents); \
             the job committed {committed}; run log:\n{}",
            log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(leader, Some(1.0), "the run's coordinator leads");
    assert_eq!(prom.scalar("sum(up{job=\"quarry-run\"})"), Some(1.0));

    // Let the gated round fail: its object has no rounds left, the run ends exhausted.
    std::fs::write(home.path().join("gate"), "").unwrap();
    let mut code = None;
    wait_until("the run to end", Duration::from_secs(60), || {
        code = run.0.try_wait().unwrap().map(|s| s.code());
        code.is_some()
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code.flatten(), Some(3), "{text}");
    let final_committed: f64 = text
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("rounds")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no rounds line in the summary:\n{text}"));
    assert_eq!(coord, Some(final_committed), "{text}");
    assert_eq!(agents, Some(final_committed), "{text}");
}
