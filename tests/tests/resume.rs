//! kill -9 of `coordinator run` at several points, then the same command again: the job
//! continues where it stopped and the finals are byte-identical to an uninterrupted run.

use std::process::{Command, Stdio};
use std::time::Duration;

use quarry_tests::*;

const OBJECTS: [&str; 3] = ["obj_a", "obj_b", "obj_c"];

fn argv(root: &str) -> Vec<String> {
    [
        "--root",
        root,
        "--exp_name",
        "rs",
        "--object_code_list",
        OBJECTS[0],
        OBJECTS[1],
        OBJECTS[2],
        "--target_count_per_object",
        "120",
        "--round_batch_size",
        "30",
        "--num_iterations",
        "2",
        "--seed_base",
        "99",
        "--gpus",
        "0,1",
        "--resume",
        "--progress",
        "lines",
        "--",
        "--yield_mode",
        "uneven",
        "--sleep_ms",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_resume_at_several_points_gives_the_same_bytes() {
    let reference = legacy_root();
    let ra = argv(reference.path().to_str().unwrap());
    let ra: Vec<&str> = ra.iter().map(String::as_str).collect();
    assert_eq!(run(&ra).await.unwrap().exit_code(), 0);
    let want = final_hashes(reference.path(), "rs", &OBJECTS);

    let root = legacy_root();
    let a = argv(root.path().to_str().unwrap());
    let coordinator = bin("coordinator");
    let mut progressed = 0;
    for delay_ms in [400u64, 900, 1500, 2200] {
        let mut child = Command::new(&coordinator)
            .arg("run")
            .args(&a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        match child.try_wait().unwrap() {
            // It may finish before the kill on a fast machine; then the resume is a no-op.
            Some(status) => assert!(status.success(), "{status}"),
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                progressed += 1;
            }
        }
    }
    assert!(
        progressed > 0,
        "the job was never interrupted; make it longer"
    );
    let aa: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = run(&aa).await.unwrap();
    assert_eq!(out.exit_code(), 0, "{:?}", out.status);
    assert_eq!(final_hashes(root.path(), "rs", &OBJECTS), want);
    let m = manifest(root.path(), "rs");
    for o in OBJECTS {
        assert_eq!(m["objects"][o]["collected"], 120);
        assert_eq!(m["objects"][o]["done"], true);
    }
    assert!(
        !experiments(root.path()).join("rs/rounds").exists(),
        "staging left behind"
    );
}

/// Ctrl-C stops the run cleanly (generators stopped, leases released, exit 130); the same
/// command then finishes the job with the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_cleanly_and_the_same_command_resumes() {
    let root = legacy_root();
    let a = argv(root.path().to_str().unwrap());
    let child = Command::new(bin("coordinator"))
        .arg("run")
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    // SAFETY: kill(2) with the pid of our own live child; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    // No generator of this root is left running (its cwd is under the root).
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(root.path()))
        })
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        left.is_empty(),
        "processes left running in the root: {left:?}"
    );

    let aa: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = run(&aa).await.unwrap();
    assert_eq!(out.exit_code(), 0, "{:?}", out.status);
    let reference = legacy_root();
    let ra = argv(reference.path().to_str().unwrap());
    let ra: Vec<&str> = ra.iter().map(String::as_str).collect();
    assert_eq!(run(&ra).await.unwrap().exit_code(), 0);
    assert_eq!(
        final_hashes(root.path(), "rs", &OBJECTS),
        final_hashes(reference.path(), "rs", &OBJECTS)
    );
}
