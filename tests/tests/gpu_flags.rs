//! `--gpu`/`--gpus` as the user types them, through the real binaries: ids that are not GPU
//! ids, a GPU named twice and an empty list are refused at once with a usage error (exit 2)
//! naming the flag typed; valid indices and UUIDs keep working.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::process::Command;
use std::time::Duration;

use quarry_tests::process::{Ended, run_within};
use quarry_tests::*;

/// Long enough for a refusal or a one-round job; short enough that a run which never ends
/// (what `--gpus 0,0` did) fails the test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(60);

/// `coordinator run` of a one-round job in a fresh legacy root, with `gpu_args`.
fn run_with(gpu_args: &[&str]) -> Ended {
    let root = legacy_root();
    let r = root.path().to_str().unwrap();
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args([
        "run",
        "--root",
        r,
        "--exp_name",
        "g",
        "--object_code_list",
        "mug",
    ])
    .args(["--target_count_per_object", "4", "--round_batch_size", "4"])
    .args(["--num_iterations", "1", "--progress", "off"])
    .args(gpu_args)
    .env("QUARRY_GPU_INVENTORY", "none");
    run_within(&mut cmd, root.path(), LIMIT)
}

fn worker_with(gpu_args: &[&str]) -> Ended {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin("worker"));
    // Nothing listens on port 1: a worker that got past its flags would retry for ever.
    cmd.args(gpu_args)
        .args(["--coordinator", "127.0.0.1:1", "--gpu-inventory", "none"]);
    run_within(&mut cmd, dir.path(), LIMIT)
}

fn assert_usage(e: &Ended, wants: &[&str], what: &str) {
    assert_eq!(e.code, Some(2), "{what}: {e:?}");
    for w in wants {
        assert!(e.stderr.contains(w), "{what}: {w:?} not in:\n{}", e.stderr);
    }
}

#[test]
fn run_refuses_a_gpu_named_twice() {
    let e = run_with(&["--gpus", "0,0"]);
    assert_usage(&e, &["--gpus", "names GPU 0 twice"], "--gpus 0,0");
    let e = run_with(&["--gpus", "1,GPU-ab,gpu-AB"]);
    assert_usage(&e, &["--gpus", "twice"], "a UUID twice, in two cases");
}

#[test]
fn run_refuses_ids_that_are_not_gpu_ids() {
    let e = run_with(&["--gpus", "x"]);
    assert_usage(&e, &["--gpus \"x\" is not a GPU id"], "--gpus x");
    let e = run_with(&["--gpus", "0,1x"]);
    assert_usage(&e, &["--gpus \"1x\" is not a GPU id"], "--gpus 0,1x");
    let e = run_with(&["--gpu", "cuda:0"]);
    assert_usage(&e, &["--gpu \"cuda:0\" is not a GPU id"], "--gpu cuda:0");
    let e = run_with(&["--gpus", "all,0"]);
    assert_usage(&e, &["--gpus all cannot be combined"], "--gpus all,0");
}

#[test]
fn run_refuses_an_empty_list_naming_gpus() {
    let e = run_with(&["--gpus", ""]);
    assert_usage(&e, &["--gpus is empty"], "--gpus ''");
    assert!(!e.stderr.contains("--gpu "), "names --gpu: {}", e.stderr);
    let e = run_with(&["--gpus", "0,"]);
    assert_usage(&e, &["--gpus \"0,\" has an empty id"], "--gpus 0,");
}

#[test]
fn run_still_takes_indices_and_uuids() {
    let e = run_with(&["--gpus", "0,GPU-8f6e1c2a-5a5a-4b4b-8c8c-000000000000"]);
    assert_eq!(e.code, Some(0), "{e:?}");
    let e = run_with(&["--gpu", "MIG-0123abcd"]);
    assert_eq!(e.code, Some(0), "{e:?}");
}

#[test]
fn worker_refuses_bad_and_duplicate_ids_naming_gpu() {
    let e = worker_with(&["--gpu", "x"]);
    assert_usage(&e, &["--gpu \"x\" is not a GPU id"], "worker --gpu x");
    let e = worker_with(&["--gpu", "0,1", "--gpu", "1"]);
    assert_usage(&e, &["--gpu names GPU 1 twice"], "worker --gpu 0,1 --gpu 1");
    let e = worker_with(&["--gpu", ""]);
    assert_usage(&e, &["--gpu is empty"], "worker --gpu ''");
}
