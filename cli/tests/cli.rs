//! The `coordinator` binary's command line: flags spelled as scale_runner spells them, and
//! clear errors for bad input.

use std::process::Command;

fn coordinator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
}

#[test]
fn run_help_lists_every_scale_runner_flag() {
    let out = coordinator().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--exp_name",
        "--object_code_list",
        "--target_count_per_object",
        "--round_batch_size",
        "--num_iterations",
        "--seed_base",
        "--max_rounds",
        "--gpu",
        "--gpus",
        "--resume",
        "--final_dir_mode",
        "--keep_intermediate",
        "--root",
        "--job",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(
        help.contains("seed_only") && help.contains("plain_only"),
        "{help}"
    );
}

#[test]
fn missing_required_flag_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = coordinator()
        .current_dir(dir.path())
        .args([
            "run",
            "--object_code_list",
            "a",
            "--target_count_per_object",
            "5",
        ])
        .output()
        .unwrap();
    // A refused job is a usage error (exit 2), as clap's and argparse's are.
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--exp_name is required"), "{err}");
}

#[test]
fn non_positive_quota_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = coordinator()
        .current_dir(dir.path())
        .args([
            "run",
            "--exp_name",
            "e",
            "--object_code_list",
            "a",
            "--target_count_per_object",
            "0",
        ])
        .output()
        .unwrap();
    // A refused job is a usage error (exit 2), as clap's and argparse's are.
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("target_count_per_object: must be positive"),
        "{err}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "nothing is created for a refused spec"
    );
}

#[test]
fn unknown_final_dir_mode_lists_the_choices() {
    let out = coordinator()
        .args([
            "run",
            "--exp_name",
            "e",
            "--object_code_list",
            "a",
            "--target_count_per_object",
            "5",
            "--final_dir_mode",
            "nope",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("seed_only")
            && err.contains("both")
            && err.contains("plain_only")
            && err.contains("seed_per_object"),
        "{err}"
    );
}

#[test]
fn running_outside_the_legacy_layout_says_where_main_py_should_be() {
    let dir = tempfile::tempdir().unwrap();
    let out = coordinator()
        .current_dir(dir.path())
        .args([
            "run",
            "--exp_name",
            "e",
            "--object_code_list",
            "a",
            "--target_count_per_object",
            "5",
        ])
        .output()
        .unwrap();
    // A refused job is a usage error (exit 2), as clap's and argparse's are.
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BimanGrasp-Optimization") && err.contains("--root"),
        "{err}"
    );
}
