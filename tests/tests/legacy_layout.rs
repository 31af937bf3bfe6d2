//! The finals land where scale_runner puts them: the legacy loop (its behaviour mirrored by
//! `tests/legacy/scale_runner_reference.py`, run with real numpy) and `coordinator run` with the
//! same flags give the same directory names and the same final bytes (numpy 1.x; the same
//! samples with numpy 2.x) in every `--final_dir_mode`;
//! `seed_per_object` keeps Quarry's per-object directories; a run that ends with objects out of
//! rounds is published over the rounds its finals hold, as scale_runner does.

#![allow(clippy::unwrap_used)] // tests may unwrap
use std::path::{Path, PathBuf};
use std::process::Command;

use quarry_cli::RunOutcome;
use quarry_tests::*;

const OBJECTS: [&str; 3] = ["obj_a", "Curver_Storage_Bin_Black_Small", "obj.c-1"];

/// The legacy tool's flags for a 3-object job of seed base 11 with uneven yields.
fn flags<'a>(exp: &'a str, mode: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--exp_name",
        exp,
        "--object_code_list",
        OBJECTS[0],
        OBJECTS[1],
        OBJECTS[2],
        "--target_count_per_object",
        "100",
        "--round_batch_size",
        "40",
        "--num_iterations",
        "2",
        "--seed_base",
        "11",
        "--final_dir_mode",
        mode,
    ];
    v.extend_from_slice(extra);
    v.extend_from_slice(&["--", "--yield_mode", "uneven"]);
    v
}

fn reference_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("legacy/scale_runner_reference.py")
}

/// Runs the legacy loop under `root` with `python`.
fn run_legacy(python: &str, root: &Path, flags: &[&str]) {
    let out = Command::new(python)
        .arg(reference_script())
        .arg("--root")
        .arg(root)
        .args(flags)
        .output()
        .expect("start the legacy reference");
    assert!(
        out.status.success(),
        "legacy reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `coordinator run` under `root` with the legacy flags.
async fn run_quarry(root: &Path, flags: &[&str]) -> RunOutcome {
    let r = root.to_str().expect("UTF-8 root");
    let mut args = vec!["--root", r, "--progress", "off"];
    args.extend_from_slice(flags);
    run(&args).await.expect("coordinator run")
}

/// Files of the experiment that a user's scripts see: everything but Quarry's manifest
/// (scale_runner writes its own) and its `.quarry/` state.
fn layout(root: &Path, exp: &str) -> Vec<String> {
    files_under(&experiments(root).join(exp))
        .into_iter()
        .filter(|f| f != "manifest.json" && !f.starts_with(".quarry/"))
        .collect()
}

const SAME_SAMPLES: &str = r#"
import sys, numpy as np
a = np.load(sys.argv[1], allow_pickle=True)
b = np.load(sys.argv[2], allow_pickle=True)
assert a.dtype == b.dtype == object and a.shape == b.shape, (a.shape, b.shape)
assert a.tolist() == b.tolist()
print(len(a))
"#;

/// Every final in `files` holds the same 100 samples in both runs, and with numpy 1.x the
/// same bytes.
fn assert_same_finals(
    python: &str,
    numpy1: bool,
    legacy: &Path,
    quarry: &Path,
    exp: &str,
    files: &[String],
) {
    for f in files {
        let a = experiments(legacy).join(exp).join(f);
        let b = experiments(quarry).join(exp).join(f);
        let n = run_python(
            python,
            SAME_SAMPLES,
            &[a.to_str().unwrap(), b.to_str().unwrap()],
        );
        assert_eq!(n.trim(), "100", "{exp}: {f}");
        if numpy1 {
            assert_eq!(
                sha256_file(&a),
                sha256_file(&b),
                "{exp}: {f}: not the legacy bytes"
            );
        }
    }
}

/// The interpreter the legacy loop runs with, and whether its numpy is 1.x: the numpy the
/// example generator's rounds imitate (protocol-3 pickles), for which Quarry's finals are the
/// legacy tool's bytes. CI has a numpy 1.x interpreter in `QUARRY_TEST_PYTHONS`.
fn legacy_python() -> (String, bool) {
    for py in pythons() {
        let v = run_python(&py, "import numpy; print(numpy.__version__)", &[]);
        if v.trim().starts_with("1.") {
            return (py, true);
        }
    }
    (python(), false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_the_legacy_loop_give_the_same_names_and_bytes_in_every_mode() {
    let (python, numpy1) = legacy_python();
    for mode in ["seed_only", "both", "plain_only"] {
        let legacy = legacy_root();
        let quarry = legacy_root();
        let exp = format!("drop_{mode}");
        let f = flags(&exp, mode, &[]);
        run_legacy(&python, legacy.path(), &f);
        let out = run_quarry(quarry.path(), &f).await;
        assert_eq!(out.exit_code(), 0, "{mode}: {:?}", out.status);

        let want = layout(legacy.path(), &exp);
        assert_eq!(layout(quarry.path(), &exp), want, "{mode}");
        // The layout itself is scale_runner's: one run-wide seed-tagged directory (the seeds
        // of all three objects' rounds) and/or final/.
        let tagged = want
            .iter()
            .filter(|f| f.starts_with("final_seed_11-2000"))
            .count();
        let plain = want.iter().filter(|f| f.starts_with("final/")).count();
        let expected = match mode {
            "seed_only" => (3, 0),
            "both" => (3, 3),
            _ => (0, 3),
        };
        assert_eq!((tagged, plain), expected, "{mode}: {want:?}");
        assert_same_finals(&python, numpy1, legacy.path(), quarry.path(), &exp, &want);
        // The manifest says where every final is.
        let m = manifest(quarry.path(), &exp);
        for o in OBJECTS {
            let keys: Vec<String> = m["objects"][o]["final"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_string())
                .collect();
            for k in &keys {
                let rel = k.strip_prefix(&format!("{exp}/")).unwrap();
                assert!(
                    want.contains(&rel.to_string()),
                    "{mode}: {k} not in {want:?}"
                );
            }
            assert_eq!(
                keys.len(),
                expected.0 / 3 + expected.1 / 3,
                "{mode}: {keys:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_per_object_keeps_one_directory_per_object() {
    let root = legacy_root();
    let out = run_quarry(root.path(), &flags("per", "seed_per_object", &[])).await;
    assert_eq!(out.exit_code(), 0, "{:?}", out.status);
    let m = manifest(root.path(), "per");
    let files = layout(root.path(), "per");
    assert_eq!(files.len(), 3, "{files:?}");
    for (i, o) in OBJECTS.iter().enumerate() {
        let seeds: Vec<i64> = m["objects"][o]["seeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_i64().unwrap())
            .collect();
        let (lo, hi) = (seeds.iter().min().unwrap(), seeds.iter().max().unwrap());
        assert_eq!(*lo, 11 + i as i64 * 100_000);
        let want = format!("final_seed_{lo}-{hi}/{o}/{o}.npy");
        assert!(files.contains(&want), "{want} not in {files:?}");
    }
}

/// With too few rounds allowed, every object runs out of rounds below its quota: scale_runner
/// still renames final/ to the range of the rounds that gave samples, and so does Quarry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_runs_out_of_rounds_is_published_like_the_legacy_one() {
    let python = python();
    let legacy = legacy_root();
    let quarry = legacy_root();
    let f = flags("short", "seed_only", &["--max_rounds", "2"]);
    run_legacy(&python, legacy.path(), &f);
    let out = run_quarry(quarry.path(), &f).await;
    assert_eq!(
        out.exit_code(),
        3,
        "objects ran out of rounds: {:?}",
        out.status
    );
    let want = layout(legacy.path(), "short");
    assert_eq!(layout(quarry.path(), "short"), want);
    assert!(
        want.iter().all(|f| f.starts_with("final_seed_11-200012/")),
        "{want:?}"
    );
}

/// A finished run resumed is a no-op: the published finals stay where they are, no empty
/// final/ appears, and the manifest still lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_published_run_changes_nothing() {
    let root = legacy_root();
    let f = flags("again", "seed_only", &[]);
    assert_eq!(run_quarry(root.path(), &f).await.exit_code(), 0);
    let before = layout(root.path(), "again");
    let hashes: Vec<String> = before
        .iter()
        .map(|p| sha256_file(&experiments(root.path()).join("again").join(p)))
        .collect();
    let mut resumed = f.clone();
    resumed.insert(0, "--resume");
    assert_eq!(run_quarry(root.path(), &resumed).await.exit_code(), 0);
    assert_eq!(layout(root.path(), "again"), before);
    let after: Vec<String> = before
        .iter()
        .map(|p| sha256_file(&experiments(root.path()).join("again").join(p)))
        .collect();
    assert_eq!(after, hashes);
    assert!(!experiments(root.path()).join("again/final").exists());
    let mut listed = final_hashes(root.path(), "again", &OBJECTS);
    listed.sort();
    let mut hashes = hashes;
    hashes.sort();
    assert_eq!(listed, hashes);
}

/// A run resumed with an object appended: the objects done before stay in the directory their
/// run published, and the new object's final gets a directory of its own seeds, as scale_runner
/// does (it publishes only what its session merged). The earlier objects' seeds do not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_resumed_with_an_object_appended_publishes_it_like_the_legacy_loop() {
    let (python, numpy1) = legacy_python();
    let legacy = legacy_root();
    let quarry = legacy_root();
    let two = |extra: &[&'static str]| {
        let mut v = vec![
            "--exp_name",
            "grow",
            "--object_code_list",
            OBJECTS[0],
            OBJECTS[1],
        ];
        v.extend_from_slice(extra);
        v.extend_from_slice(&[
            "--target_count_per_object",
            "100",
            "--round_batch_size",
            "40",
            "--num_iterations",
            "2",
            "--seed_base",
            "11",
            "--",
            "--yield_mode",
            "uneven",
        ]);
        v
    };
    let first = two(&[]);
    let second = two(&[OBJECTS[2], "--resume"]);
    run_legacy(&python, legacy.path(), &first);
    assert_eq!(run_quarry(quarry.path(), &first).await.exit_code(), 0);
    let before = layout(quarry.path(), "grow");
    run_legacy(&python, legacy.path(), &second);
    let out = run_quarry(quarry.path(), &second).await;
    assert_eq!(out.exit_code(), 0, "{:?}", out.status);

    let want = layout(legacy.path(), "grow");
    let got = layout(quarry.path(), "grow");
    assert_eq!(got, want);
    // The first run's finals did not move; the new one's directory starts at object 2's seeds.
    assert!(
        before.iter().all(|f| got.contains(f)),
        "{before:?} / {got:?}"
    );
    let new: Vec<&String> = got.iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(new.len(), 1, "{got:?}");
    assert!(new[0].starts_with("final_seed_200011-"), "{new:?}");
    assert_same_finals(&python, numpy1, legacy.path(), quarry.path(), "grow", &want);
    // The manifest lists all three objects where they are.
    let m = manifest(quarry.path(), "grow");
    for o in OBJECTS {
        let key = m["objects"][o]["final"][0].as_str().unwrap().to_string();
        let rel = key.strip_prefix("grow/").unwrap().to_string();
        assert!(want.contains(&rel), "{key} not in {want:?}");
    }
}
