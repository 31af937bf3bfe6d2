//! Warm generators (`generator.mode = "warm"`) end to end: the example grasp generator
//! (deploy/examples/grasp_gen.py through deploy/python's quarry_generator) serving many rounds
//! per process, against the same job run one process per round.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::time::Duration;

use quarry_tests::cluster::{
    metrics_addr, scrape, spawn_worker, spawn_worker_args, start_serve, status, submit, wait_until,
};
use quarry_tests::*;

const OBJECTS: [&str; 2] = ["mug", "bowl"];

/// The same job in process mode or in warm mode (`warm_flags` then being the flags the
/// process is started with), under a fresh legacy root; `pids` collects one file per
/// generator process that served a round.
fn job(root: &Path, pids: &Path, warm: bool, flags: &[&str]) -> std::path::PathBuf {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let flags: String = flags.iter().map(|f| format!(", {}", q(f))).collect();
    let generator = if warm {
        format!(
            "mode = \"warm\"\nargv = [\"python3\", \"main.py\", \"--yield_mode\", \"uneven\", \
             \"--num_iterations\", \"{{num_iterations}}\"{flags}]"
        )
    } else {
        format!(
            "argv = [\"python3\", \"main.py\", \"--name\", \"{{name}}\", \"--object_code\", \"{{object}}\", \
             \"--batch_size\", \"{{batch_size}}\", \"--num_iterations\", \"{{num_iterations}}\", \
             \"--seed\", \"{{seed}}\", \"--yield_mode\", \"uneven\"{flags}]"
        )
    };
    let text = format!(
        r#"
exp_name = "warm"
objects = ["mug", "bowl"]
target_count_per_object = 130
round_batch_size = 30
num_iterations = 2
seed_base = 11
retries = 3
retry_backoff_ms = 10
root = {root}

[generator]
{generator}
cwd = "BimanGrasp-Optimization"
output = "data/experiments/{{name}}/results/{{object}}.npy"
round_dir = "data/experiments/{{name}}"
[generator.env]
PYTHONPATH = {pythonpath}
QUARRY_EXAMPLE_PID_DIR = {pids}
"#,
        root = q(root.to_str().unwrap()),
        pythonpath = q(repo_root().join("deploy/python").to_str().unwrap()),
        pids = q(pids.to_str().unwrap()),
    );
    let p = root.join("job.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Process mode, one agent: the finals every warm run must equal.
async fn reference() -> Vec<String> {
    let root = legacy_root();
    let pids = root.path().join("pids");
    let job = job(root.path(), &pids, false, &[]);
    run_job_to_end(&job, &["--gpu", "0"]).await;
    // One process per round.
    let m = manifest(root.path(), "warm");
    let rounds: usize = OBJECTS
        .iter()
        .map(|o| m["objects"][o]["rounds"].as_array().unwrap().len())
        .sum();
    assert!(count(&pids) > 1, "{} pids, {rounds} rounds", count(&pids));
    final_hashes(root.path(), "warm", &OBJECTS)
}

/// A warm run of [`job`] on one agent, its finals checked against process mode's.
struct WarmRun {
    root: tempfile::TempDir,
    out: quarry_cli::RunOutcome,
    manifest: serde_json::Value,
    /// Rounds committed, over both objects.
    rounds: usize,
    /// Generator processes that served rounds.
    processes: usize,
}

/// Runs the warm job with `setting` added to `[generator]` and `flags` to the generator's
/// argv, on one agent, and checks that its finals are those of process mode.
async fn warm_run_with(setting: &str, flags: &[&str]) -> WarmRun {
    let reference = reference().await;
    let root = legacy_root();
    let pids = root.path().join("pids");
    let job = job(root.path(), &pids, true, flags);
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "mode = \"warm\"\n",
        &format!("mode = \"warm\"\n{setting}\n"),
    );
    std::fs::write(&job, text).unwrap();
    let out = run_job_to_end(&job, &["--gpu", "0"]).await;
    assert_eq!(final_hashes(root.path(), "warm", &OBJECTS), reference);
    let m = manifest(root.path(), "warm");
    let rounds: usize = OBJECTS
        .iter()
        .map(|o| m["objects"][o]["rounds"].as_array().unwrap().len())
        .sum();
    WarmRun {
        processes: count(&pids),
        root,
        out,
        manifest: m,
        rounds,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_finals_are_byte_identical_to_process_mode_with_one_and_four_agents() {
    let reference = reference().await;
    for gpus in ["0", "0,1,2,3"] {
        let root = legacy_root();
        let pids = root.path().join("pids");
        let job = job(root.path(), &pids, true, &[]);
        run_job_to_end(&job, &["--gpus", gpus]).await;
        assert_eq!(
            final_hashes(root.path(), "warm", &OBJECTS),
            reference,
            "warm, gpus {gpus}"
        );
        // One process per agent served every round of this run.
        let agents = gpus.split(',').count();
        let m = manifest(root.path(), "warm");
        let rounds: usize = OBJECTS
            .iter()
            .map(|o| m["objects"][o]["rounds"].as_array().unwrap().len())
            .sum();
        assert!(rounds > agents, "{rounds} rounds");
        assert!(
            (1..=agents).contains(&count(&pids)),
            "gpus {gpus}: {} generator processes for {rounds} rounds",
            count(&pids)
        );
    }
}

/// A warm generator SIGKILLed in the middle of a round: that attempt fails, the process is
/// started again, the round is retried, and the finals are those of process mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_generator_killed_mid_round_is_restarted_and_the_round_retried() {
    let reference = reference().await;
    let root = legacy_root();
    let pids = root.path().join("pids");
    let state = root.path().join("state");
    // Round 1 of mug (seed 12) and round 0 of bowl (seed 100011) die on their first attempt.
    let job = job(
        root.path(),
        &pids,
        true,
        &[
            "--sigkill_seeds",
            "12,100011",
            "--state_dir",
            state.to_str().unwrap(),
        ],
    );
    run_job_to_end(&job, &["--gpu", "0"]).await;
    assert_eq!(final_hashes(root.path(), "warm", &OBJECTS), reference);
    assert_eq!(
        count(&pids),
        3,
        "the first process and one restart per kill"
    );
    let m = manifest(root.path(), "warm");
    for o in OBJECTS {
        let q = &m["objects"][o]["quarantined"];
        assert!(q.as_array().is_none_or(|q| q.is_empty()), "{o}: {m}");
    }
}

/// Each round's log holds that round's output only, though one process wrote them all: the
/// log of a failed attempt (kept under `<exp>/logs/`) names its own seed and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_rounds_keep_separate_logs() {
    let root = legacy_root();
    let pids = root.path().join("pids");
    // Seed 12 (mug round 1) always fails, so the round is quarantined after its retries and
    // every attempt's log is stored.
    let job = job(root.path(), &pids, true, &["--fail_seeds", "12"]);
    let job = job.to_str().unwrap();
    run(&["--job", job, "--progress", "off", "--gpu", "0"])
        .await
        .unwrap();
    let exp = experiments(root.path());
    let logs: Vec<String> = files_under(&exp)
        .into_iter()
        .filter(|f| f.contains("logs/") && f.ends_with(".log"))
        .collect();
    assert_eq!(logs.len(), 4, "one log per attempt: {logs:?}");
    for l in &logs {
        let path = if Path::new(l).is_absolute() {
            std::path::PathBuf::from(l)
        } else {
            exp.join(l)
        };
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("seed=12 "), "{l}: {text}");
        assert!(text.contains("injected failure for seed 12"), "{l}: {text}");
        assert_eq!(
            text.matches("seed=").count(),
            1,
            "{l} holds another round's output: {text}"
        );
    }
    assert_eq!(
        count(&pids),
        1,
        "a failed round does not restart the process"
    );
}

/// Job `cold` (one object, two rounds) whose warm generator exits before answering a round
/// (`cannot import isaacsim`), allowed `retries`, written to `dir/job.toml` with `root`.
fn cannot_start_job(dir: &Path, root: &Path, retries: u32) -> std::path::PathBuf {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "exp_name = \"cold\"\nobjects = [\"obj\"]\ntarget_count_per_object = 8\n\
             round_batch_size = 4\nnum_iterations = 1\nretries = {retries}\nretry_backoff_ms = 10\n\
             root = {root}\n\n[generator]\nmode = \"warm\"\n\
             argv = [\"python3\", \"-c\", \"import sys; sys.exit('cannot import isaacsim')\"]\n\
             output = \"out/{{name}}/r.npy\"\n",
            root = q(root.to_str().unwrap()),
        ),
    )
    .unwrap();
    job
}

/// A warm generator that dies before answering its first round, three times in a row, takes
/// the agent out of rotation; `coordinator status` shows why.
#[test]
fn a_warm_generator_that_cannot_start_takes_the_agent_out_of_rotation() {
    let home = tempfile::tempdir().unwrap();
    let root = home.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let (_serve, addr) = start_serve(
        &format!("file://{}", home.path().join("state.redb").display()),
        &format!("file://{}", home.path().join("store").display()),
        "10",
        &[],
        &home.path().join("coordinator.log"),
    );
    let job = cannot_start_job(home.path(), &root, 5);
    let _w = spawn_worker(&addr, "0", &[], Some(&home.path().join("worker.log")));
    let out = submit(&job, &addr, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut last = serde_json::Value::Null;
    wait_until(
        "the agent to leave rotation",
        Duration::from_secs(60),
        || {
            let Some(s) = status(&addr, "cold") else {
                return false;
            };
            last = s.clone();
            s["workers"].as_array().is_some_and(|ws| {
                ws.iter().any(|w| {
                    w["state"]
                        .as_str()
                        .is_some_and(|st| st.contains("out of rotation") && st.contains("3 times"))
                })
            })
        },
    );
    let state = last["workers"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(state.contains("cannot import isaacsim"), "{state}");
    // It stays out: no more rounds are started there.
    let failed = |s: &serde_json::Value| s["objects"][0]["failed_attempts"].as_u64().unwrap_or(0);
    let before = failed(&last);
    assert!(before <= 3, "{last}");
    std::thread::sleep(Duration::from_millis(1500));
    let after = status(&addr, "cold").unwrap();
    assert_eq!(failed(&after), before, "{after}");
}

/// `coordinator run`'s agents are the only ones its job has: when their warm generator cannot
/// start, the run ends with the reason rather than waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_run_ends_with_the_reason_when_the_warm_generator_cannot_start() {
    let root = tempfile::tempdir().unwrap();
    let job = cannot_start_job(root.path(), root.path(), 20);
    let job = job.to_str().unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        run(&["--job", job, "--progress", "off", "--gpus", "0,1"]),
    )
    .await
    .expect("the run ended")
    .expect_err("the run fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("out of rotation"), "{msg}");
    assert!(msg.contains("cannot import isaacsim"), "{msg}");
    assert!(msg.contains("gpu 0") && msg.contains("gpu 1"), "{msg}");
}

/// A warm job whose argv names the round is refused before anything runs, naming the
/// placeholders and the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_job_whose_argv_names_the_round_is_refused() {
    let root = legacy_root();
    let pids = root.path().join("pids");
    let job = job(root.path(), &pids, false, &[]);
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("[generator]\n", "[generator]\nmode = \"warm\"\n");
    std::fs::write(&job, text).unwrap();
    let err = run(&["--job", job.to_str().unwrap(), "--progress", "off"])
        .await
        .expect_err("refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("generator.argv"), "{msg}");
    assert!(
        msg.contains("{name}") && msg.contains("{object}") && msg.contains("{seed}"),
        "{msg}"
    );
    assert_eq!(count(&pids), 0, "nothing ran");
}

/// `generator.audit = 1.0` re-runs every warm round cold: a generator whose rounds depend only
/// on their inputs passes, and the finals are those of process mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_of_a_deterministic_warm_generator_passes() {
    let WarmRun {
        root,
        out,
        manifest: m,
        rounds,
        processes,
    } = warm_run_with("audit = 1.0", &[]).await;
    // The outcome is in the status and the manifest: every committed round passed.
    assert_eq!(
        out.status.rounds_audited as usize, rounds,
        "{:?}",
        out.status
    );
    assert_eq!(m["audit"]["fraction"], 1.0, "{}", m["audit"]);
    assert_eq!(m["audit"]["rounds_passed"], rounds, "{}", m["audit"]);
    assert!(m["audit"].get("mismatch").is_none(), "{}", m["audit"]);
    for o in OBJECTS {
        for c in m["objects"][o]["commits"].as_array().unwrap() {
            assert_eq!(c["audited"], true, "{c}");
        }
    }
    // The warm process and one fresh process per audited round.
    assert!(processes > rounds, "{processes} processes, {rounds} rounds");
    let leftovers: Vec<String> = files_under(root.path())
        .into_iter()
        .filter(|f| f.contains(".quarry-audit-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A warm generator that leaks a counter from round to round writes, from its second round
/// on, what a fresh process would not: the audit stops the job naming the round and both
/// hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_catches_a_generator_that_leaks_state_across_rounds() {
    let root = tempfile::tempdir().unwrap();
    let leaky = root.path().join("leaky.py");
    std::fs::write(
        &leaky,
        r#"
import os, struct
from quarry_generator import serve

served = 0  # leaks: the output depends on how many rounds this process ran

def handler(r):
    global served
    served += 1
    values = [float(r.seed * 10 + served + i) for i in range(r.batch_size)]
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % len(values)
    raw = header.encode("latin1")
    pad = 64 - ((10 + len(raw) + 1) % 64)
    data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw) + pad + 1) + raw + b" " * pad + b"\n"
    os.makedirs(os.path.dirname(r.output), exist_ok=True)
    with open(r.output, "wb") as f:
        f.write(data + struct.pack("<%df" % len(values), *values))

serve(handler)
"#,
    )
    .unwrap();
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let job = root.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "exp_name = \"leak\"\nobjects = [\"obj\"]\ntarget_count_per_object = 40\n\
             round_batch_size = 4\nnum_iterations = 1\nroot = {root}\n\n[generator]\n\
             mode = \"warm\"\naudit = 1.0\nargv = [\"python3\", {leaky}]\n\
             output = \"out/{{name}}/r.npy\"\nround_dir = \"out/{{name}}\"\n\
             [generator.env]\nPYTHONPATH = {pythonpath}\n",
            root = q(root.path().to_str().unwrap()),
            leaky = q(leaky.to_str().unwrap()),
            pythonpath = q(repo_root().join("deploy/python").to_str().unwrap()),
        ),
    )
    .unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        run(&[
            "--job",
            job.to_str().unwrap(),
            "--progress",
            "off",
            "--gpu",
            "0",
        ]),
    )
    .await
    .expect("the run ended")
    .unwrap();
    assert_ne!(out.exit_code(), 0, "{:?}", out.status);
    let msg = &out.status.message;
    assert!(msg.contains("determinism audit failed"), "{msg}");
    // Round 0 is the process's first: warm and cold agree. Round 1 is where it leaks.
    assert!(msg.contains("leak__obj__r1_s12346"), "{msg}");
    assert_eq!(msg.matches("sha256 ").count(), 2, "{msg}");
    // The manifest keeps the mismatch beside the rounds that passed.
    let m = manifest(root.path(), "leak");
    let mismatch = m["audit"]["mismatch"]
        .as_str()
        .unwrap_or_else(|| panic!("{m}"));
    assert!(mismatch.starts_with("obj r1: "), "{mismatch}");
    assert!(mismatch.contains("leak__obj__r1_s12346"), "{mismatch}");
    assert_eq!(m["audit"]["fraction"], 1.0, "{}", m["audit"]);
}

/// `recycle_after_rounds = 2`: the warm process is replaced after every second round it
/// served, and the finals do not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycle_after_rounds_restarts_the_warm_generator_between_rounds() {
    let run = warm_run_with("recycle_after_rounds = 2", &[]).await;
    assert_eq!(
        run.processes,
        run.rounds.div_ceil(2),
        "{} rounds",
        run.rounds
    );
}

/// `recycle_above_memory_mib = 100` with a generator that keeps 48 MiB more per round: the
/// process is replaced between rounds once it holds more than the ceiling (so it serves
/// more than one round, but not all of them), and the finals do not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_generator_over_its_memory_ceiling_is_replaced_between_rounds() {
    let run = warm_run_with("recycle_above_memory_mib = 100", &["--hold_mb", "48"]).await;
    assert!(
        run.processes >= run.rounds.div_ceil(3) && run.processes < run.rounds,
        "{} processes for {} rounds",
        run.processes,
        run.rounds
    );
}

/// deploy/python's quarry_generator on its own, for every interpreter of the test matrix:
/// seeding makes `random` and numpy draws depend on the seed only; without the agent one
/// round runs from the `QUARRY_*` variables (exit 1 when the handler raises); a warm loop
/// answers on fd 3, fails a round whose handler raises without dying, and ends with status 0
/// on SIGTERM between rounds.
#[test]
fn the_python_package_seeds_falls_back_to_one_round_and_stops_on_sigterm() {
    const CODE: &str = r#"
import json, os, random, signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import quarry_generator as qg

qg.seed_everything(5)
a = (random.random(), float(np.random.random()))
random.random(); np.random.random()
qg.seed_everything(5)
assert (random.random(), float(np.random.random())) == a

seen = []
assert qg.run_once(lambda r: seen.append((r.seed, r.object, r.round)),
                   environ={"QUARRY_SEED": "7", "QUARRY_OBJECT": "mug", "QUARRY_ROUND": "2"}) == 0
assert seen == [(7, "mug", 2)], seen
def boom(r):
    raise ValueError("no grasp")
assert qg.run_once(boom, environ={"QUARRY_SEED": "1"}) == 1
assert not qg.is_warm()

child = r'''
import sys
sys.path.insert(0, sys.argv[1])
import quarry_generator as qg
def handler(r):
    print("round", r.round_name, flush=True)
    if r.seed == 13:
        raise RuntimeError("bad seed")
sys.exit(qg.serve(handler))
'''
rfd, wfd = os.pipe()
p = subprocess.Popen([sys.executable, "-c", child, sys.argv[1]], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, close_fds=False,
                     env=dict(os.environ, QUARRY_REPLY_FD="3"),
                     preexec_fn=lambda: os.dup2(wfd, 3))
os.close(wfd)
replies = os.fdopen(rfd)
for seed in (12, 13, 14):
    p.stdin.write((json.dumps({"round_name": f"e__o__r0_s{seed}", "seed": seed}) + "\n").encode())
    p.stdin.flush()
    reply = json.loads(replies.readline())
    assert reply["round"] == f"e__o__r0_s{seed}", reply
    if seed == 13:
        assert reply["status"] == "failed" and "bad seed" in reply["reason"], reply
    else:
        assert reply["status"] == "done", reply
p.send_signal(signal.SIGTERM)
assert p.wait(timeout=10) == 0
print("OK")
"#;
    let package = repo_root().join("deploy/python");
    for py in pythons() {
        let out = run_python(&py, CODE, &[package.to_str().unwrap()]);
        assert!(out.contains("OK"), "{py}: {out}");
    }
}

/// A warm generator (on deploy/python's quarry_generator) that writes a round of
/// `batch_size` float32 values from the seed, logs `<round name> <pid>` to `$ROUNDS_LOG`,
/// and then lists itself as the only process of GPU 0 in the inventory file
/// `$INVENTORY`, holding `$HELD_MIB` (JSON text, so a test can put garbage there): the
/// figure a driver would report, written by the process that holds it.
const GPU_HOLDER: &str = r#"
import os, struct
from quarry_generator import serve

def handler(r):
    with open(os.environ["ROUNDS_LOG"], "a") as f:
        f.write("%s %d\n" % (r.round_name, os.getpid()))
    values = [float(r.seed * 10 + i) for i in range(r.batch_size)]
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % len(values)
    raw = header.encode("latin1")
    pad = 64 - ((10 + len(raw) + 1) % 64)
    data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw) + pad + 1) + raw + b" " * pad + b"\n"
    os.makedirs(os.path.dirname(r.output), exist_ok=True)
    with open(r.output, "wb") as f:
        f.write(data + struct.pack("<%df" % len(values), *values))
    inventory = os.environ["INVENTORY"]
    entry = '{"pid": %d, "used_memory_mib": %s}' % (os.getpid(), os.environ["HELD_MIB"])
    with open(inventory + ".tmp", "w") as f:
        f.write('{"gpus": [{"index": 0, "processes": [%s]}]}' % entry)
    os.replace(inventory + ".tmp", inventory)

serve(handler)
"#;

/// The pids the rounds of `exp` ran in, in the order they ran, from [`GPU_HOLDER`]'s log.
fn round_pids(log: &Path, exp: &str) -> Vec<u32> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&format!("{exp}__")))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// `recycle_above_gpu_memory_mib = 500` against a real `worker --gpu-inventory FILE`, the
/// generator itself writing its pid and what it holds into that file (so only the driver is
/// simulated): holding 900 MiB, every round after the first runs in a fresh process, each
/// counted as a `gpu_memory` start and logged with the figures; holding 100 MiB, one
/// process serves them all. Garbage where the figure should be (negative, past any
/// integer, a string) reads as unknown: the process is kept, and the agent goes on.
#[test]
fn a_warm_generator_over_its_gpu_memory_ceiling_is_replaced_between_rounds() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let q = |s: &Path| serde_json::to_string(s.to_str().unwrap()).unwrap();
    let script = h.join("holder.py");
    std::fs::write(&script, GPU_HOLDER).unwrap();
    let inventory = h.join("gpus.json");
    std::fs::write(&inventory, r#"{"gpus": [{"index": 0}]}"#).unwrap();
    let rounds_log = h.join("rounds.log");
    std::fs::create_dir_all(h.join("root")).unwrap();
    let (_serve, addr) = start_serve(
        &format!("file://{}", h.join("state.redb").display()),
        &format!("file://{}", h.join("store").display()),
        "10",
        &[],
        &h.join("coordinator.log"),
    );
    let worker_log = h.join("worker.log");
    let mut worker = spawn_worker_args(
        &[
            "--coordinator",
            &addr,
            "--gpu",
            "0",
            "--gpu-inventory",
            inventory.to_str().unwrap(),
            "--sample-interval-ms",
            "100",
            "--min-scratch-mib",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
        Some(&worker_log),
    );
    let gpu_memory_starts = || {
        let text = scrape(&metrics_addr(&worker_log), "/metrics");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(
                    "quarry_worker_generator_starts_total{gpu=\"0\",reason=\"gpu_memory\"} ",
                )
            })
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    // Four rounds of 4 for the one object.
    let run_job = |exp: &str, held_mib: &str| -> Vec<u32> {
        let job = h.join(format!("{exp}.toml"));
        std::fs::write(
            &job,
            format!(
                "exp_name = \"{exp}\"\nobjects = [\"obj\"]\ntarget_count_per_object = 16\n\
                 round_batch_size = 4\nnum_iterations = 1\nretries = 0\nroot = {root}\n\n\
                 [generator]\nmode = \"warm\"\nrecycle_above_gpu_memory_mib = 500\n\
                 argv = [\"python3\", {script}]\noutput = \"out/{{name}}/r.npy\"\n\
                 round_dir = \"out/{{name}}\"\n[generator.env]\nPYTHONPATH = {pythonpath}\n\
                 INVENTORY = {inventory}\nROUNDS_LOG = {rounds_log}\nHELD_MIB = {held}\n",
                root = q(&h.join("root")),
                script = q(&script),
                pythonpath = q(&repo_root().join("deploy/python")),
                inventory = q(&inventory),
                rounds_log = q(&rounds_log),
                held = serde_json::to_string(held_mib).unwrap(),
            ),
        )
        .unwrap();
        let out = submit(&job, &addr, false);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut last = serde_json::Value::Null;
        wait_until(
            &format!("job {exp} to end"),
            Duration::from_secs(90),
            || {
                last = status(&addr, exp).unwrap_or_default();
                last["state"] != "running" && !last["state"].is_null()
            },
        );
        assert_eq!(
            last["state"],
            "done",
            "{exp}: {last}\n{}",
            log_tail(&worker_log)
        );
        assert_eq!(last["failed_attempts"], 0, "{exp}: {last}");
        let pids = round_pids(&rounds_log, exp);
        assert_eq!(pids.len(), 4, "{exp}: {pids:?}");
        pids
    };

    let over = run_job("over", "900");
    let distinct: std::collections::BTreeSet<u32> = over.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        4,
        "a fresh process for every round: {over:?}"
    );
    assert_eq!(gpu_memory_starts(), 3.0);
    let text = std::fs::read_to_string(&worker_log).unwrap();
    assert!(
        text.contains("over its GPU memory ceiling")
            && text.contains("gpu_memory_mib=900")
            && text.contains("ceiling_mib=500"),
        "{text}"
    );

    let under = run_job("under", "100");
    assert!(under.iter().all(|p| *p == under[0]), "{under:?}");
    assert_eq!(gpu_memory_starts(), 3.0);

    for (exp, garbage) in [
        ("negative", "-900"),
        ("huge", "1e400"),
        ("string", "\"lots\""),
    ] {
        let pids = run_job(exp, garbage);
        assert!(pids.iter().all(|p| *p == pids[0]), "{exp}: {pids:?}");
        assert_eq!(gpu_memory_starts(), 3.0, "{exp}");
        assert!(
            worker.0.try_wait().unwrap().is_none(),
            "{exp}: the worker ended\n{}",
            log_tail(&worker_log)
        );
    }
    let text = std::fs::read_to_string(&worker_log).unwrap();
    assert!(
        text.contains("cannot read the warm generator's GPU memory; keeping it")
            && text.contains("gpus.json"),
        "{text}"
    );
}

/// A warm generator of an `episodes` directory dataset: deploy/examples' episode collector
/// run in-process for each round, then, by `$MODE`: `honest` nothing more; `counter` appends
/// how many rounds this process served to the dataset's `logs/collect.log` (state leaking
/// across rounds into one file of the tree); `fifo` / `symlink` leave a FIFO in `episodes/`
/// or a link to /dev/zero in `metadata/` in round 0's dataset.
const EPISODES_GEN: &str = r#"
import os, sys
sys.path.insert(0, os.environ["EXAMPLES"])
import episode_collector
from quarry_generator import serve

MODE = os.environ["MODE"]
served = 0

def handler(r):
    global served
    served += 1
    code = episode_collector.main(["--seed", str(r.seed), "--object", r.object,
                                   "--batch_size", str(r.batch_size), "--out", r.output,
                                   "--stats", r.stats])
    if code:
        raise RuntimeError("episode_collector ended with %d" % code)
    if MODE == "counter":
        with open(os.path.join(r.output, "logs", "collect.log"), "a") as f:
            f.write("rounds served by this process: %d\n" % served)
    elif MODE == "fifo" and r.round == 0:
        os.mkfifo(os.path.join(r.output, "episodes", "pipe"))
    elif MODE == "symlink" and r.round == 0:
        os.symlink("/dev/zero", os.path.join(r.output, "metadata", "zero"))

serve(handler)
"#;

/// The `episodes` job `exp` (one object, 4 rounds of 6 attempts, `retries = 1`) over
/// [`EPISODES_GEN`] in `mode`, with `setting` added to `[generator]`, under `root`.
fn episodes_job(root: &Path, exp: &str, mode: &str, setting: &str) -> std::path::PathBuf {
    let q = |s: &Path| serde_json::to_string(s.to_str().unwrap()).unwrap();
    let script = root.join("episodes_gen.py");
    std::fs::write(&script, EPISODES_GEN).unwrap();
    let job = root.join(format!("{exp}.toml"));
    std::fs::write(
        &job,
        format!(
            "exp_name = \"{exp}\"\nobjects = [\"obj\"]\ntarget_count_per_object = 16\n\
             round_batch_size = 6\nnum_iterations = 1\nretries = 1\nretry_backoff_ms = 10\n\
             root = {root}\n\n[generator]\nmode = \"warm\"\n{setting}\n\
             argv = [{py}, {script}]\nformat = \"episodes\"\noutput = \"out/{{name}}/dataset\"\n\
             stats = \"out/{{name}}/stats.json\"\nround_dir = \"out/{{name}}\"\n\
             [generator.env]\nPYTHONPATH = {pythonpath}\nEXAMPLES = {examples}\nMODE = \"{mode}\"\n",
            root = q(root),
            py = serde_json::to_string(&python()).unwrap(),
            script = q(&script),
            pythonpath = q(&repo_root().join("deploy/python")),
            examples = q(&repo_root().join("deploy/examples")),
        ),
    )
    .unwrap();
    job
}

/// Runs `job` on one agent, bounded in time.
async fn run_bounded(job: &Path) -> quarry_cli::RunOutcome {
    tokio::time::timeout(
        Duration::from_secs(120),
        run(&[
            "--job",
            job.to_str().unwrap(),
            "--progress",
            "off",
            "--gpu",
            "0",
        ]),
    )
    .await
    .expect("the run ended")
    .unwrap()
}

/// `generator.audit = 1.0` on a directory dataset (`episodes`): every round's tree is
/// re-made cold and its digest compared; an honest generator passes every round, its final
/// is that of the same job without the audit, and no cold copy is left beside the outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_of_a_deterministic_directory_dataset_passes() {
    let plain = tempfile::tempdir().unwrap();
    let out = run_bounded(&episodes_job(plain.path(), "eps", "honest", "")).await;
    assert_eq!(out.exit_code(), 0, "{:?}", out.status);
    let reference = manifest(plain.path(), "eps")["objects"]["obj"]["final_sha256"].clone();
    assert!(reference.is_string(), "{reference}");

    let root = tempfile::tempdir().unwrap();
    let job = episodes_job(
        root.path(),
        "eps",
        "honest",
        "audit = 1.0\nkeep_intermediate = true",
    );
    // keep_intermediate is a job field, not a generator one.
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("\nkeep_intermediate = true", "")
        .replace("retries = 1\n", "retries = 1\nkeep_intermediate = true\n");
    std::fs::write(&job, text).unwrap();
    let out = run_bounded(&job).await;
    assert_eq!(out.exit_code(), 0, "{:?}", out.status);
    let m = manifest(root.path(), "eps");
    let rounds = m["objects"]["obj"]["rounds"].as_array().unwrap().len();
    assert!(rounds > 1, "{m}");
    assert_eq!(
        out.status.rounds_audited as usize, rounds,
        "{:?}",
        out.status
    );
    assert_eq!(m["audit"]["rounds_passed"], rounds, "{}", m["audit"]);
    assert_eq!(m["objects"]["obj"]["final_sha256"], reference);
    // The round directories are kept: the cold trees beside the outputs are gone.
    let kept = files_under(&root.path().join("out"));
    assert!(
        kept.iter().any(|f| f.contains("/dataset/episodes/")),
        "{kept:?}"
    );
    assert!(
        !kept.iter().any(|f| f.contains(".quarry-audit-")),
        "{kept:?}"
    );
}

/// A warm generator whose directory dataset carries state from round to round (a counter
/// in `logs/collect.log`) is caught by the audit at its second round: the job stops naming
/// the round, the first differing path in the tree and both digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_names_the_first_differing_path_of_a_leaking_directory_dataset() {
    let root = tempfile::tempdir().unwrap();
    let out = run_bounded(&episodes_job(
        root.path(),
        "leakdir",
        "counter",
        "audit = 1.0",
    ))
    .await;
    assert_ne!(out.exit_code(), 0, "{:?}", out.status);
    let msg = &out.status.message;
    assert!(msg.contains("determinism audit failed"), "{msg}");
    assert!(msg.contains("leakdir__obj__r1_s12346"), "{msg}");
    assert!(
        msg.contains("(dataset/, first difference: \"logs/collect.log\" (its bytes differ))"),
        "{msg}"
    );
    assert_eq!(msg.matches("sha256 ").count(), 2, "{msg}");
    let m = manifest(root.path(), "leakdir");
    let mismatch = m["audit"]["mismatch"]
        .as_str()
        .unwrap_or_else(|| panic!("{m}"));
    assert!(mismatch.starts_with("obj r1: "), "{mismatch}");
    assert!(mismatch.contains("logs/collect.log"), "{mismatch}");
}

/// A directory dataset holding a FIFO or a symlink fails its audited attempts with the
/// reason (without blocking on the FIFO or following the link); the round is quarantined
/// after its retry and the others fill the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audited_directory_dataset_holding_a_fifo_or_a_symlink_fails_with_the_reason() {
    for (mode, entry, kind) in [
        ("fifo", "episodes/pipe", "a FIFO"),
        ("symlink", "metadata/zero", "a symbolic link"),
    ] {
        let root = tempfile::tempdir().unwrap();
        let out = run_bounded(&episodes_job(root.path(), "odd", mode, "audit = 1.0")).await;
        assert_eq!(out.exit_code(), 0, "{mode}: {:?}", out.status);
        let m = manifest(root.path(), "odd");
        let q = m["objects"]["obj"]["quarantined"].as_array().unwrap();
        assert_eq!(q.len(), 1, "{mode}: {m}");
        assert_eq!(q[0]["round"], 0, "{mode}: {m}");
        let reason = q[0]["reason"].as_str().unwrap();
        assert!(
            reason.contains("audit of round odd__obj__r0_s12345")
                && reason.contains(&format!(
                    "\"{entry}\" is {kind}; only plain files and directories of plain files are audited"
                )),
            "{mode}: {reason}"
        );
    }
}
