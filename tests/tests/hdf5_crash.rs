//! HDF5 files that crash libhdf5 cost one round each, never a Quarry process: the real
//! `coordinator serve`, `worker` and `coordinator run` binaries run libhdf5 in child
//! processes (`quarry_formats::hdf5::child`).
//!
//! The generator copies a file by seed: most rounds get a well-formed robomimic file of 3
//! demos; one seed gets `libhdf5-segv.hdf5` (libhdf5 1.10 segfaults on it as soon as it lists
//! `data`: the agent's inspection dies), another `libhdf5-segv-on-copy.hdf5` (it inspects
//! cleanly, so it is uploaded and committed, and libhdf5 segfaults when the merge copies its
//! demos: the coordinator's merge dies). Both are real files from the byte-mutation campaign
//! of docs/fuzzing.md. Before the child processes, the first killed the agent (all of a
//! `coordinator run`) and the second `serve`, again at every restart.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::process::Command;
use std::time::Duration;

use quarry_tests::hdf5_crash::{Served, check_manifest, job_file};
use quarry_tests::process::run_within;
use quarry_tests::*;

#[test]
fn serve_and_worker_survive_files_that_crash_libhdf5_and_the_job_completes() {
    let home = tempfile::tempdir().unwrap();
    let root = home.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut first = Served::start(home.path(), 1);
    first.run(
        &job_file(home.path(), &root, "crashy"),
        "crashy",
        home.path(),
    );
    drop(first);
    // A restarted serve, on the same state and store, meets the same files in a second job
    // and stays up too.
    let mut second = Served::start(home.path(), 2);
    second.run(
        &job_file(home.path(), &root, "crashy2"),
        "crashy2",
        home.path(),
    );
}

#[test]
fn coordinator_run_completes_its_quota_past_files_that_crash_libhdf5_twice() {
    let home = tempfile::tempdir().unwrap();
    let root = home.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let job = job_file(home.path(), &root, "crashy");
    for run in ["first", "rerun"] {
        let dir = home.path().join(run);
        std::fs::create_dir(&dir).unwrap();
        let ended = run_within(
            Command::new(bin("coordinator")).args([
                "run",
                "--job",
                job.to_str().unwrap(),
                "--gpus",
                "0",
                "--progress",
                "off",
            ]),
            &dir,
            Duration::from_secs(180),
        );
        assert_eq!(ended.code, Some(0), "{run}: {ended:?}");
        let m = manifest(&root, "crashy");
        let f = finals(&root, "crashy", "obj");
        check_manifest(&m, &f[0]);
    }
}
