//! The binaries the tests run, as a user gets them: `coordinator` and `worker` answer `--help`
//! and `--version` (the workspace's version), and `coordinator serve` with one `worker` runs a
//! tiny robomimic HDF5 job to its merged final, libhdf5 in child processes that are the
//! binaries themselves (two rounds crash libhdf5; both processes live on). By default they are
//! the workspace's build; with `QUARRY_BIN_DIR` (see [`quarry_tests::BIN_DIR_ENV`]) they are the
//! ones the pip wheel installed into a venv, and .ci/run runs this test and the Slurm test so.
//! The harness's choice of directory is itself checked here by running this test binary again
//! with `QUARRY_BIN_DIR` set.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use quarry_tests::hdf5_crash::{Served, job_file};
use quarry_tests::{BIN_DIR_ENV, bin};

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn coordinator_and_worker_answer_help_and_version() {
    let coordinator = bin("coordinator");
    let help = ok(
        &Command::new(&coordinator).arg("--help").output().unwrap(),
        "coordinator --help",
    );
    for sub in ["run", "serve", "submit", "status"] {
        assert!(help.contains(sub), "{sub} missing from:\n{help}");
    }
    let worker = bin("worker");
    let help = ok(
        &Command::new(&worker).arg("--help").output().unwrap(),
        "worker --help",
    );
    for flag in ["--gpu", "--coordinator", "--drain-grace"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    for (name, path) in [("coordinator", &coordinator), ("worker", &worker)] {
        let version = ok(
            &Command::new(path).arg("--version").output().unwrap(),
            "--version",
        );
        assert_eq!(
            version.trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION")),
            "{}",
            path.display()
        );
    }
}

/// The installed binaries run libhdf5 in children of themselves (`/proc/self/exe` started again
/// with the child's argument): no third executable ships in the wheel. A round whose file
/// crashes libhdf5 at the worker's inspection and one that crashes the coordinator's merge are
/// quarantined with the child's ending; the job completes from the other rounds and its final
/// holds their demos.
#[test]
fn installed_serve_and_worker_merge_an_hdf5_job_past_libhdf5_crashes() {
    let home = tempfile::tempdir().unwrap();
    let root = home.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut served = Served::start(home.path(), 1);
    served.run(&job_file(home.path(), &root, "tiny"), "tiny", home.path());
}

/// Runs [`coordinator_and_worker_answer_help_and_version`] in a child of this test binary with
/// `QUARRY_BIN_DIR=dir`.
fn help_test_with_bin_dir(dir: &Path) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "coordinator_and_worker_answer_help_and_version",
            "--nocapture",
        ])
        .env(BIN_DIR_ENV, dir)
        .output()
        .unwrap()
}

#[test]
fn quarry_bin_dir_chooses_the_binaries_tests_run() {
    // Stand-ins that note being called, then run the real binary: the child's test passes only
    // if the harness ran these.
    let dir = tempfile::tempdir().unwrap();
    let marks = tempfile::tempdir().unwrap();
    for name in ["coordinator", "worker"] {
        let real = bin(name);
        let script = dir.path().join(name);
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" >> '{}'\nexec '{}' \"$@\"\n",
                marks.path().join(name).display(),
                real.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = help_test_with_bin_dir(dir.path());
    ok(&out, "the help test with QUARRY_BIN_DIR");
    for name in ["coordinator", "worker"] {
        let calls = std::fs::read_to_string(marks.path().join(name))
            .unwrap_or_else(|e| panic!("{name} from {BIN_DIR_ENV} was not run: {e}"));
        assert_eq!(calls, "--help\n--version\n", "{name}");
    }
}

#[test]
fn a_quarry_bin_dir_without_the_binaries_is_named_with_the_fix() {
    let empty = tempfile::tempdir().unwrap();
    let out = help_test_with_bin_dir(empty.path());
    assert!(
        !out.status.success(),
        "the help test passed without binaries"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "{BIN_DIR_ENV}={} has no coordinator",
            empty.path().display()
        )) && text.contains("pip install"),
        "{text}"
    );
}
