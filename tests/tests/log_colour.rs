//! Logs written to a pipe carry no terminal colour codes: a real `coordinator run` with info
//! logs, its stderr read through a pipe, holds log lines and no `ESC [`.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quarry_tests::cluster::Killed;
use quarry_tests::*;

/// Runs `cmd` with stderr on a pipe until it exits (at most `limit`); its code and stderr.
fn stderr_through_a_pipe(cmd: &mut Command, limit: Duration) -> (Option<i32>, String) {
    let mut child = Killed(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut pipe = child.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "{cmd:?} ran past {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), reader.join().unwrap())
}

#[test]
fn logs_on_a_pipe_have_no_colour_codes() {
    let root = legacy_root();
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args([
        "run",
        "--root",
        root.path().to_str().unwrap(),
        "--exp_name",
        "c",
    ])
    .args([
        "--object_code_list",
        "mug",
        "--target_count_per_object",
        "4",
    ])
    .args(["--round_batch_size", "4", "--num_iterations", "1"])
    .args(["--progress", "lines"])
    .env("QUARRY_LOG", "info")
    .env("QUARRY_GPU_INVENTORY", "none")
    .env_remove("NO_COLOR");
    let (code, err) = stderr_through_a_pipe(&mut cmd, Duration::from_secs(90));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains(" INFO "), "no info log line in:\n{err}");
    assert!(!err.contains("\x1b["), "colour codes on a pipe:\n{err:?}");
}
