//! The runner against real child processes: `/bin/sh` scripts and `python3`.
//!
//! Every run is wrapped in an outer timeout, so a runner that fails to kill something fails
//! the test instead of hanging it. Liveness checks treat zombies as dead: in some containers
//! PID 1 never reaps orphans, and a zombie holds no resources.

use std::path::{Path, PathBuf};
use std::time::Duration;

use quarry_worker::runner::{RunError, RunOutcome, RunReport, RunSpec, run};
use tokio_util::sync::CancellationToken;

/// Upper bound on any single run in these tests.
const OUTER: Duration = Duration::from_secs(15);

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn spec(dir: &Path, argv: Vec<String>) -> RunSpec {
    RunSpec {
        argv,
        cwd: dir.to_path_buf(),
        env: Vec::new(),
        timeout: Some(Duration::from_secs(10)),
        kill_grace: Duration::from_millis(500),
        log_limit: 1 << 20,
        spawned: None,
        defer_sweep: false,
    }
}

async fn run_ok(spec: &RunSpec, cancel: CancellationToken) -> RunReport {
    tokio::time::timeout(OUTER, run(spec, cancel))
        .await
        .expect("runner did not return in time")
        .expect("run failed to start")
}

fn log_text(report: &RunReport) -> String {
    String::from_utf8_lossy(&report.log.to_bytes()).into_owned()
}

/// Waits for a pid written by a child script.
async fn read_pid(path: &Path) -> i32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        // The trailing newline tells a complete write from a partial one.
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
            && let Ok(pid) = s.trim().parse()
        {
            return pid;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn kill0(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks for existence; it touches no memory.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// `(state, pgrp)` from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(String, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_string();
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// True if `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    kill0(pid) && proc_stat(pid).is_some_and(|(state, _)| state != "Z" && state != "X")
}

/// True if no running process is left in group `pgid`.
fn group_empty(pgid: i32) -> bool {
    assert!(pgid > 1);
    if !kill0(-pgid) {
        return true;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    !entries.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            return false;
        };
        proc_stat(pid).is_some_and(|(state, pgrp)| pgrp == pgid && state != "Z" && state != "X")
    })
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A script that leads a group with a sleeping grandchild and records both pids.
const LEADER_AND_GRANDCHILD: &str = "sleep 30 & echo $! > gc.pid; echo $$ > leader.pid; wait";

#[tokio::test]
async fn env_is_added_to_the_inherited_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(dir.path(), sh("env > env.txt"));
    s.env = vec![
        ("QUARRY_TEST_VAR".into(), "hello world".into()),
        ("CUDA_VISIBLE_DEVICES".into(), "3".into()),
    ];
    let report = run_ok(&s, CancellationToken::new()).await;
    assert!(
        report.success(),
        "{:?}: {}",
        report.outcome,
        log_text(&report)
    );
    let env = std::fs::read_to_string(dir.path().join("env.txt")).expect("env.txt");
    let lines: Vec<&str> = env.lines().collect();
    assert!(lines.contains(&"QUARRY_TEST_VAR=hello world"), "{env}");
    assert!(lines.contains(&"CUDA_VISIBLE_DEVICES=3"), "{env}");
    assert!(
        lines.iter().any(|l| l.starts_with("PATH=")),
        "inherited env lost: {env}"
    );
}

#[tokio::test]
async fn cwd_is_honoured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_ok(
        &spec(dir.path(), sh("pwd -P > here.txt")),
        CancellationToken::new(),
    )
    .await;
    assert!(report.success());
    let here = std::fs::read_to_string(dir.path().join("here.txt")).expect("here.txt");
    let want = dir.path().canonicalize().expect("canonicalize");
    assert_eq!(PathBuf::from(here.trim_end()), want);
}

#[tokio::test]
async fn argv_is_not_interpreted_by_a_shell() {
    let dir = tempfile::tempdir().expect("tempdir");
    let argv = vec!["echo".into(), "$HOME; touch pwned".into()];
    let report = run_ok(&spec(dir.path(), argv), CancellationToken::new()).await;
    assert!(report.success());
    assert_eq!(log_text(&report), "$HOME; touch pwned\n");
    assert!(!dir.path().join("pwned").exists());
}

#[tokio::test]
async fn exit_code_and_signal_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = run_ok(&spec(dir.path(), sh("exit 7")), CancellationToken::new()).await;
    assert_eq!(report.outcome, RunOutcome::Exited(7));
    assert!(!report.success());

    let report = run_ok(&spec(dir.path(), sh("exit 0")), CancellationToken::new()).await;
    assert_eq!(report.outcome, RunOutcome::Exited(0));
    assert!(report.success());

    let report = run_ok(
        &spec(dir.path(), sh("kill -KILL $$")),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(report.outcome, RunOutcome::Signaled(libc::SIGKILL));
    assert!(!report.success());
}

#[tokio::test]
async fn stdout_and_stderr_are_both_captured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = "echo to-stdout; sleep 0.05; echo to-stderr >&2";
    let report = run_ok(&spec(dir.path(), sh(script)), CancellationToken::new()).await;
    assert!(report.success());
    assert_eq!(log_text(&report), "to-stdout\nto-stderr\n");
    assert_eq!(report.log.tail_lines(1), "to-stderr");
}

#[tokio::test]
async fn timeout_kills_child_and_grandchild() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(dir.path(), sh(LEADER_AND_GRANDCHILD));
    s.timeout = Some(Duration::from_secs(1));
    let report = run_ok(&s, CancellationToken::new()).await;
    assert_eq!(report.outcome, RunOutcome::TimedOut);
    assert!(report.duration >= Duration::from_secs(1));
    let leader = read_pid(&dir.path().join("leader.pid")).await;
    let gc = read_pid(&dir.path().join("gc.pid")).await;
    // No polling: when `run` returns, the group must already be dead.
    assert!(!alive(gc), "grandchild {gc} survived the timeout");
    assert!(!alive(leader), "leader {leader} survived the timeout");
    assert!(group_empty(leader), "process group {leader} not empty");
}

#[tokio::test]
async fn sigterm_is_sent_first_and_a_graceful_exit_is_not_waited_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = "trap 'echo bye > term.txt; exit 0' TERM; echo $$ > leader.pid; \
                  while :; do sleep 0.05; done";
    let mut s = spec(dir.path(), sh(script));
    s.timeout = Some(Duration::from_secs(1));
    s.kill_grace = Duration::from_secs(5);
    let report = run_ok(&s, CancellationToken::new()).await;
    assert_eq!(report.outcome, RunOutcome::TimedOut);
    assert!(
        dir.path().join("term.txt").exists(),
        "child never saw SIGTERM"
    );
    assert!(
        report.duration < Duration::from_secs(4),
        "waited out the grace period: {:?}",
        report.duration
    );
    let leader = read_pid(&dir.path().join("leader.pid")).await;
    assert!(group_empty(leader));
}

#[tokio::test]
async fn sigterm_ignoring_group_is_killed_after_grace() {
    let dir = tempfile::tempdir().expect("tempdir");
    // `trap '' TERM` makes the shell and, by inheritance, its background sleep ignore SIGTERM.
    let script = format!("trap '' TERM; {LEADER_AND_GRANDCHILD}");
    let mut s = spec(dir.path(), sh(&script));
    s.timeout = Some(Duration::from_secs(1));
    s.kill_grace = Duration::from_millis(400);
    let report = run_ok(&s, CancellationToken::new()).await;
    assert_eq!(report.outcome, RunOutcome::TimedOut);
    assert!(
        report.duration >= Duration::from_millis(1400),
        "SIGKILL before the grace period ended: {:?}",
        report.duration
    );
    let leader = read_pid(&dir.path().join("leader.pid")).await;
    let gc = read_pid(&dir.path().join("gc.pid")).await;
    assert!(!alive(gc), "SIGTERM-ignoring grandchild {gc} survived");
    assert!(!alive(leader), "SIGTERM-ignoring leader {leader} survived");
    assert!(group_empty(leader));
}

#[tokio::test]
async fn grandchild_ignoring_sigterm_is_killed_after_the_leader_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The leader exits on SIGTERM; its background child ignores it and keeps running.
    let script = "(trap '' TERM; exec sleep 30) >/dev/null 2>&1 & echo $! > gc.pid; \
                  echo $$ > leader.pid; wait";
    let mut s = spec(dir.path(), sh(script));
    s.timeout = Some(Duration::from_secs(1));
    s.kill_grace = Duration::from_millis(300);
    let report = run_ok(&s, CancellationToken::new()).await;
    assert_eq!(report.outcome, RunOutcome::TimedOut);
    let leader = read_pid(&dir.path().join("leader.pid")).await;
    let gc = read_pid(&dir.path().join("gc.pid")).await;
    assert!(!alive(gc), "grandchild {gc} survived its leader");
    assert!(group_empty(leader));
}

#[tokio::test]
async fn grace_period_covers_the_whole_group_not_just_the_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The leader dies on SIGTERM at once; its worker needs a moment to clean up.
    let script = r#"sh -c 'trap "sleep 0.3; echo cleaned > cleaned.txt; exit 0" TERM;
                           echo $$ > ready.pid; while :; do sleep 0.05; done' &
                    echo $$ > leader.pid; wait"#;
    let mut s = spec(dir.path(), sh(script));
    s.timeout = None;
    s.kill_grace = Duration::from_secs(5);
    let cancel = CancellationToken::new();
    let ready = dir.path().join("ready.pid");
    let trigger = cancel.clone();
    let canceller = tokio::spawn(async move {
        read_pid(&ready).await;
        trigger.cancel();
    });
    let report = run_ok(&s, cancel).await;
    canceller.await.expect("canceller");
    assert_eq!(report.outcome, RunOutcome::Cancelled);
    assert!(
        dir.path().join("cleaned.txt").exists(),
        "grandchild was killed before its SIGTERM cleanup finished"
    );
    let leader = read_pid(&dir.path().join("leader.pid")).await;
    assert!(group_empty(leader));
}

#[tokio::test]
async fn cancel_kills_child_and_grandchild() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(dir.path(), sh(LEADER_AND_GRANDCHILD));
    s.timeout = None;
    let cancel = CancellationToken::new();
    let gc_file = dir.path().join("gc.pid");
    let trigger = cancel.clone();
    let canceller = tokio::spawn(async move {
        read_pid(&gc_file).await;
        trigger.cancel();
    });
    let report = run_ok(&s, cancel).await;
    canceller.await.expect("canceller");
    assert_eq!(report.outcome, RunOutcome::Cancelled);
    let leader = read_pid(&dir.path().join("leader.pid")).await;
    let gc = read_pid(&dir.path().join("gc.pid")).await;
    assert!(!alive(gc), "grandchild {gc} survived cancel");
    assert!(!alive(leader), "leader {leader} survived cancel");
    assert!(group_empty(leader));
}

#[tokio::test]
async fn cancelled_before_start_spawns_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cancel = CancellationToken::new();
    cancel.cancel();
    let report = run_ok(&spec(dir.path(), sh("touch started")), cancel).await;
    assert_eq!(report.outcome, RunOutcome::Cancelled);
    assert!(!dir.path().join("started").exists());
}

#[tokio::test]
async fn dropping_the_future_kills_the_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(dir.path(), sh(LEADER_AND_GRANDCHILD));
    s.timeout = None;
    let gc_file = dir.path().join("gc.pid");
    tokio::select! {
        r = run(&s, CancellationToken::new()) => panic!("run returned early: {r:?}"),
        _ = read_pid(&gc_file) => {}
    }
    // The run future is dropped here.
    let leader = read_pid(&dir.path().join("leader.pid")).await;
    let gc = read_pid(&gc_file).await;
    eventually("grandchild killed", || !alive(gc)).await;
    eventually("leader killed", || !alive(leader)).await;
    eventually("group empty", || group_empty(leader)).await;
}

#[tokio::test]
async fn background_process_left_after_normal_exit_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Detached from the pipes: only the group kill can catch it.
    let script = "sleep 30 >/dev/null 2>&1 & echo $! > gc.pid; echo $$ > leader.pid; echo done";
    let report = run_ok(&spec(dir.path(), sh(script)), CancellationToken::new()).await;
    assert_eq!(report.outcome, RunOutcome::Exited(0));
    assert_eq!(log_text(&report), "done\n");
    let leader = read_pid(&dir.path().join("leader.pid")).await;
    let gc = read_pid(&dir.path().join("gc.pid")).await;
    assert!(!alive(gc), "background process {gc} leaked");
    assert!(group_empty(leader));
}

#[tokio::test]
async fn background_process_holding_the_pipes_does_not_stall_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = "sleep 30 & echo $! > gc.pid; echo $$ > leader.pid; echo done";
    let report = run_ok(&spec(dir.path(), sh(script)), CancellationToken::new()).await;
    assert_eq!(report.outcome, RunOutcome::Exited(0));
    assert_eq!(log_text(&report), "done\n");
    assert!(
        report.duration < Duration::from_secs(2),
        "run waited on pipes held by a leftover process: {:?}",
        report.duration
    );
    let gc = read_pid(&dir.path().join("gc.pid")).await;
    assert!(!alive(gc), "background process {gc} leaked");
}

#[tokio::test]
async fn huge_output_is_bounded_with_head_tail_and_marker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"
import sys
out = sys.stdout
out.write("BEGIN\n")
line = "x" * 99 + "\n"
for _ in range(100_000):
    out.write(line)
out.write("END\n")
"#;
    let argv = vec!["python3".into(), "-c".into(), script.into()];
    let mut s = spec(dir.path(), argv);
    s.log_limit = 64 * 1024;
    let report = run_ok(&s, CancellationToken::new()).await;
    assert!(report.success(), "{:?}", report.outcome);

    let total: u64 = 6 + 100 * 100_000 + 4;
    assert_eq!(report.log.total_bytes(), total);
    let omitted = total - 64 * 1024;
    let marker = format!("... [{omitted} bytes omitted] ...\n");
    let bytes = report.log.to_bytes();
    let text = String::from_utf8(bytes).expect("ascii output");
    assert!(text.starts_with("BEGIN\nxxx"), "head lost");
    assert!(text.ends_with("x\nEND\n"), "tail lost");
    assert!(text.contains(&marker), "no marker {marker:?}");
    assert_eq!(
        text.len(),
        64 * 1024 + marker.len() + 1,
        "marker gets its own line"
    );
    assert_eq!(report.log.tail_lines(1), "END");
}

#[tokio::test]
async fn chatty_stderr_does_not_block_while_stdout_is_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Fills stderr far beyond a pipe buffer before writing anything to stdout: a runner that
    // read the streams one after the other would deadlock here and time out.
    let script = r#"
import sys
chunk = "e" * 1023 + "\n"
for _ in range(4096):
    sys.stderr.write(chunk)
sys.stderr.flush()
chunk = "o" * 1023 + "\n"
for _ in range(4096):
    sys.stdout.write(chunk)
"#;
    let argv = vec!["python3".into(), "-c".into(), script.into()];
    let mut s = spec(dir.path(), argv);
    s.log_limit = 4096;
    s.timeout = Some(Duration::from_secs(5));
    let report = run_ok(&s, CancellationToken::new()).await;
    assert_eq!(report.outcome, RunOutcome::Exited(0));
    assert_eq!(report.log.total_bytes(), 2 * 4096 * 1024);
    let text = log_text(&report);
    assert!(text.starts_with("eee"));
    assert!(text.ends_with("ooo\n"));
}

#[tokio::test]
async fn missing_program_is_a_spawn_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let argv = vec![
        "quarry-no-such-generator".into(),
        "--seed".into(),
        "1".into(),
    ];
    let err = run(&spec(dir.path(), argv), CancellationToken::new())
        .await
        .expect_err("spawn must fail");
    let msg = err.to_string();
    match err {
        RunError::Spawn {
            program, source, ..
        } => {
            assert_eq!(program, "quarry-no-such-generator");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Spawn, got {other:?}"),
    }
    assert!(msg.contains("quarry-no-such-generator"), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
}

#[tokio::test]
async fn empty_argv_and_bad_cwd_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = run(&spec(dir.path(), Vec::new()), CancellationToken::new()).await;
    assert!(matches!(err, Err(RunError::EmptyArgv)), "{err:?}");

    let missing = dir.path().join("missing");
    let err = run(&spec(&missing, sh("true")), CancellationToken::new()).await;
    match err {
        Err(RunError::BadCwd { cwd, .. }) => assert_eq!(cwd, missing),
        other => panic!("expected BadCwd, got {other:?}"),
    }

    let file = dir.path().join("file");
    std::fs::write(&file, b"").expect("write");
    let err = run(&spec(&file, sh("true")), CancellationToken::new()).await;
    assert!(matches!(err, Err(RunError::BadCwd { .. })), "{err:?}");
}

fn grasp_gen(flags: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/grasp_gen.py");
    let mut argv = vec!["python3".to_string(), path.display().to_string()];
    argv.extend(flags.split_whitespace().map(String::from));
    argv
}

#[tokio::test]
async fn example_generator_writes_the_legacy_layout() {
    let root = tempfile::tempdir().expect("tempdir");
    let cwd = root.path().join("BimanGrasp-Optimization");
    std::fs::create_dir(&cwd).expect("mkdir");
    let flags = "--name exp --object_code core-mug-1 --batch_size 4 --num_iterations 10 \
                 --seed 3 --gpu 0";
    let mut s = spec(&cwd, grasp_gen(flags));
    s.env = vec![("CUDA_VISIBLE_DEVICES".into(), "0".into())];
    let report = run_ok(&s, CancellationToken::new()).await;
    let log = log_text(&report);
    assert!(report.success(), "{:?}: {log}", report.outcome);
    assert!(log.contains("CUDA_VISIBLE_DEVICES=0"), "{log}");
    let out = root
        .path()
        .join("data/experiments/exp/results/core-mug-1.npy");
    let bytes = std::fs::read(&out).expect("generator output");
    assert!(bytes.starts_with(b"\x93NUMPY\x01\x00"));
    assert!(
        report.log.tail_lines(1).contains("saved 4 samples"),
        "{log}"
    );
}

#[tokio::test]
async fn hanging_example_generator_is_killed_on_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = "--name exp --object_code o --seed 5 --hang_seeds 1,5 --out_root .";
    let mut s = spec(dir.path(), grasp_gen(flags));
    s.timeout = Some(Duration::from_secs(2));
    let report = run_ok(&s, CancellationToken::new()).await;
    let log = log_text(&report);
    assert_eq!(report.outcome, RunOutcome::TimedOut);
    assert!(log.contains("hanging"), "{log}");
    assert!(!dir.path().join("exp/results/o.npy").exists());
}

/// A generator that detaches a sleeper from its process group and session (`setsid` in a
/// double fork, as a daemon does), records the sleeper's pid in `name`, and exits 0 at once
/// (or after `linger` seconds). The sleeper keeps the run's stdin, stdout and stderr, the
/// output pipes among them, unless `close_stdio` (then they are /dev/null, as a daemon's).
fn detaching_generator(name: &str, linger: f64, close_stdio: bool) -> Vec<String> {
    let close = if close_stdio { "True" } else { "False" };
    let code = format!(
        r#"
import os, sys, time
pid = os.fork()
if pid == 0:
    os.setsid()
    if {close}:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
    if os.fork() == 0:
        with open("{name}.tmp", "w") as f:
            f.write(f"{{os.getpid()}}\n")
        os.rename("{name}.tmp", "{name}")
        time.sleep(60)
    os._exit(0)
os.waitpid(pid, 0)
while not os.path.exists("{name}"):
    time.sleep(0.01)
time.sleep({linger})
"#
    );
    vec!["python3".into(), "-c".into(), code]
}

/// Runs a [`detaching_generator`] that exits at once, in `dir`: its report (exit 0) and the
/// sleeper's pid.
async fn detached_run(dir: &Path, spec: &RunSpec) -> (RunReport, i32) {
    let report = run_ok(spec, CancellationToken::new()).await;
    assert_eq!(
        report.outcome,
        RunOutcome::Exited(0),
        "{}",
        log_text(&report)
    );
    (report, read_pid(&dir.join("sleeper.pid")).await)
}

#[tokio::test]
async fn a_setsid_detached_child_dies_with_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = spec(dir.path(), detaching_generator("sleeper.pid", 0.0, false));
    let (_, sleeper) = detached_run(dir.path(), &spec).await;
    // It left the group: only the run's own sweep can have killed it.
    eventually("the detached sleeper to be gone", || !alive(sleeper)).await;
}

/// With `defer_sweep` the run returns once its group is gone and the detached sleeper is swept
/// by the task the report holds: gone once `leftovers.swept()` returns. The sleeper either
/// keeps the run's output pipes open (swept before `run` returns, so that they close) or
/// closes them (swept by the task).
#[tokio::test]
async fn a_deferred_sweep_is_done_when_the_report_says_so() {
    for holds_pipes in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let argv = detaching_generator("sleeper.pid", 0.0, !holds_pipes);
        let mut spec = spec(dir.path(), argv);
        spec.defer_sweep = true;
        let (mut report, sleeper) = detached_run(dir.path(), &spec).await;
        report.leftovers.swept().await;
        assert!(
            !alive(sleeper),
            "holds the pipes: {holds_pipes}: the sleeper outlived the sweep"
        );
    }
}

#[tokio::test]
async fn a_setsid_detached_child_dies_with_a_cancelled_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cancel = CancellationToken::new();
    let spec = spec(dir.path(), detaching_generator("sleeper.pid", 60.0, false));
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { run_ok(&spec, cancel).await }
    });
    let sleeper = read_pid(&dir.path().join("sleeper.pid")).await;
    cancel.cancel();
    let report = run.await.expect("run task");
    assert_eq!(report.outcome, RunOutcome::Cancelled);
    eventually("the detached sleeper to be gone", || !alive(sleeper)).await;
}

#[tokio::test]
async fn one_runs_sweep_leaves_another_runs_processes_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).expect("mkdir");
    std::fs::create_dir_all(&b).expect("mkdir");
    // Run A keeps running with a detached sleeper of its own while run B ends and sweeps.
    let cancel_a = CancellationToken::new();
    let spec_a = spec(&a, detaching_generator("sleeper.pid", 60.0, false));
    let run_a = tokio::spawn({
        let cancel = cancel_a.clone();
        async move { run_ok(&spec_a, cancel).await }
    });
    let sleeper_a = read_pid(&a.join("sleeper.pid")).await;
    let report_b = run_ok(
        &spec(&b, detaching_generator("sleeper.pid", 0.0, false)),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(report_b.outcome, RunOutcome::Exited(0));
    let sleeper_b = read_pid(&b.join("sleeper.pid")).await;
    eventually("run B's sleeper to be gone", || !alive(sleeper_b)).await;
    assert!(
        alive(sleeper_a),
        "run B's sweep killed run A's process {sleeper_a}"
    );
    cancel_a.cancel();
    let report_a = run_a.await.expect("run task");
    assert_eq!(report_a.outcome, RunOutcome::Cancelled);
    eventually("run A's sleeper to be gone", || !alive(sleeper_a)).await;
}

/// `spawned` is cancelled once the process is started, while it still runs (the agent holds
/// the previous round's upload back until then), and on a run that could not start.
#[tokio::test]
async fn spawned_is_signalled_at_the_start_and_on_a_failed_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(dir.path(), vec!["sleep".into(), "3".into()]);
    let started = CancellationToken::new();
    s.spawned = Some(started.clone());
    let running = tokio::spawn(async move { run(&s, CancellationToken::new()).await });
    tokio::time::timeout(Duration::from_secs(2), started.cancelled())
        .await
        .expect("spawned not signalled while the process runs");
    assert!(
        !running.is_finished(),
        "the run ended before its process did"
    );
    let r = running.await.expect("join").expect("run");
    assert_eq!(r.outcome, RunOutcome::Exited(0));

    let mut s = spec(dir.path(), vec!["/nonexistent/quarry-generator".into()]);
    let failed = CancellationToken::new();
    s.spawned = Some(failed.clone());
    assert!(run(&s, CancellationToken::new()).await.is_err());
    assert!(
        failed.is_cancelled(),
        "a failed start must not hold anyone back"
    );
}
