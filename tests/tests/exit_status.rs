//! Every exit status of `coordinator` (quarry_common::exit), from the real binary: 0 done,
//! 1 error, 2 usage error (clap's and Quarry's own, as scale_runner's argparse exits), 3 an
//! object exhausted, 130/143 interrupted by SIGINT/SIGTERM; and `--help` lists them.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use quarry_tests::cluster::{Killed, wait_until};
use quarry_tests::process::{Ended, run_within};
use quarry_tests::*;

const LIMIT: Duration = Duration::from_secs(90);

/// `coordinator run` under `root` of experiment `x` (one object, quota 8 in rounds of 4),
/// with `extra` flags.
fn run_cmd(root: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(["run", "--root", root.to_str().unwrap(), "--exp_name", "x"])
        .args([
            "--object_code_list",
            "mug",
            "--target_count_per_object",
            "8",
        ])
        .args(["--round_batch_size", "4", "--num_iterations", "1"])
        .args(["--progress", "off"])
        .args(extra)
        .env("QUARRY_GPU_INVENTORY", "none");
    cmd
}

fn run(root: &Path, extra: &[&str]) -> Ended {
    run_within(&mut run_cmd(root, extra), root, LIMIT)
}

#[test]
fn a_finished_run_exits_0() {
    let root = legacy_root();
    let e = run(root.path(), &[]);
    assert_eq!(e.code, Some(0), "{e:?}");
}

#[test]
fn an_object_out_of_rounds_exits_3_not_2() {
    let root = legacy_root();
    let e = run(root.path(), &["--max_rounds", "1"]);
    assert_eq!(e.code, Some(3), "{e:?}");
    assert!(e.stderr.contains("ran out of rounds"), "{}", e.stderr);
}

#[test]
fn usage_errors_exit_2() {
    let root = legacy_root();
    // clap's own.
    let e = run(root.path(), &["--no_such_flag"]);
    assert_eq!(e.code, Some(2), "{e:?}");
    // A value Quarry refuses: the job's name.
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args([
        "run",
        "--root",
        root.path().to_str().unwrap(),
        "--exp_name",
        "a/b",
    ])
    .args([
        "--object_code_list",
        "mug",
        "--target_count_per_object",
        "8",
    ]);
    let e = run_within(&mut cmd, root.path(), LIMIT);
    assert_eq!(e.code, Some(2), "{e:?}");
    assert!(
        e.stderr
            .contains("exp_name: \"a/b\" contains '/'; use only letters, digits"),
        "{}",
        e.stderr
    );
    // A root without the generator.
    let empty = tempfile::tempdir().unwrap();
    let e = run(empty.path(), &[]);
    assert_eq!(e.code, Some(2), "{e:?}");
    assert!(e.stderr.contains("--root"), "{}", e.stderr);
    // submit with neither a job file nor flags.
    let e = run_within(
        Command::new(bin("coordinator")).arg("submit"),
        root.path(),
        LIMIT,
    );
    assert_eq!(e.code, Some(2), "{e:?}");
}

#[test]
fn other_errors_exit_1() {
    // The experiment's directory cannot be made: `data` is a file.
    let root = legacy_root();
    std::fs::write(root.path().join("data"), "not a directory").unwrap();
    let e = run(root.path(), &[]);
    assert_eq!(e.code, Some(1), "{e:?}");
    assert!(e.stderr.starts_with("error: "), "{}", e.stderr);
}

/// Starts a run whose rounds last 30 s, waits until it serves (its endpoint file is
/// written after the signal handlers are in place), sends `signal`; its exit code and stderr.
fn interrupted_by(signal: i32) -> (Option<i32>, String) {
    let root = legacy_root();
    let err_path = root.path().join("stderr");
    let mut cmd = run_cmd(root.path(), &["--", "--sleep_ms", "30000"]);
    let mut child = Killed(
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr = root
        .path()
        .join("data/experiments/x/.quarry/coordinator.addr");
    wait_until("the run to serve", Duration::from_secs(30), || {
        addr.exists()
    });
    // SAFETY: kill(2) with the pid of our own live child; no memory is involved.
    unsafe { libc::kill(child.0.id() as i32, signal) };
    let mut code = None;
    wait_until(
        "the interrupted run to exit",
        Duration::from_secs(60),
        || match child.0.try_wait().unwrap() {
            Some(st) => {
                code = Some(st.code());
                true
            }
            None => false,
        },
    );
    let err = std::fs::read_to_string(&err_path).unwrap();
    (code.flatten(), err)
}

#[test]
fn sigint_exits_130_and_sigterm_143() {
    for (signal, want) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let (code, err) = interrupted_by(signal);
        assert_eq!(code, Some(want), "signal {signal}: {err}");
        assert!(
            err.contains("run the same command again to resume"),
            "{err}"
        );
    }
}

#[test]
fn help_lists_the_exit_statuses() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["--help"][..], &["run", "--help"], &["submit", "--help"]] {
        let e = run_within(
            Command::new(bin("coordinator")).args(args),
            dir.path(),
            LIMIT,
        );
        assert_eq!(e.code, Some(0), "{args:?}: {e:?}");
        for want in ["Exit status:", "2    usage error", "3    exhausted", "143"] {
            assert!(
                e.stdout.contains(want),
                "{args:?}: {want:?} in:\n{}",
                e.stdout
            );
        }
    }
    let e = run_within(Command::new(bin("worker")).arg("--help"), dir.path(), LIMIT);
    assert!(e.stdout.contains("Exit status:"), "{}", e.stdout);
}
