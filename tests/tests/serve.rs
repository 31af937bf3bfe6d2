//! `coordinator serve`, `worker`, `coordinator submit --watch` and `coordinator status` as
//! separate processes on one machine, sharing a directory store: the finals are byte-identical
//! to `coordinator run` of the same job.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quarry_tests::*;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn job_file(dir: &std::path::Path, root: &std::path::Path) -> std::path::PathBuf {
    let text = format!(
        r#"
exp_name = "served"
objects = ["obj_a", "obj_b"]
target_count_per_object = 90
round_batch_size = 25
num_iterations = 2
seed_base = 5
root = "{root}"
[generator]
argv = ["python3", "main.py", "--name", "{{name}}", "--object_code", "{{object}}", "--batch_size", "{{batch_size}}",
        "--num_iterations", "{{num_iterations}}", "--seed", "{{seed}}", "--gpu", "0", "--yield_mode", "uneven"]
cwd = "BimanGrasp-Optimization"
output = "data/experiments/{{name}}/results/{{object}}.npy"
round_dir = "data/experiments/{{name}}"
"#,
        root = root.display()
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_worker_submit_status_as_processes() {
    let root = legacy_root();
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("store");
    let job = job_file(home.path(), root.path());

    let mut serve = Command::new(bin("coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--lease-ttl", "5"])
        .arg("--state")
        .arg(format!("file://{}", home.path().join("state.redb").display()))
        .arg("--store")
        .arg(format!("file://{}", store.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = serve.stderr.take().unwrap();
    let serve = Killed(serve);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("coordinator listening on ") {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(20)).expect("coordinator printed its address");

    let _worker = Killed(
        Command::new(bin("worker"))
            .args(["--gpu", "0,1", "--coordinator", &addr])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let submit = Command::new(bin("coordinator"))
        .args(["submit", job.to_str().unwrap(), "--coordinator", &addr, "--watch"])
        .output()
        .unwrap();
    let submit_err = String::from_utf8_lossy(&submit.stderr);
    assert!(submit.status.success(), "{submit_err}");
    assert_eq!(String::from_utf8_lossy(&submit.stdout).trim(), "served");
    assert!(submit_err.contains("job served: done"), "{submit_err}");

    let status = Command::new(bin("coordinator"))
        .args(["status", "served", "--json", "--coordinator", &addr])
        .output()
        .unwrap();
    assert!(status.status.success());
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v[0]["state"], "done", "{v}");
    assert_eq!(v[0]["samples_collected"], 180);
    assert_eq!(v[0]["workers"].as_array().unwrap().len(), 2, "{v}");

    // The same job through `coordinator run` gives the same bytes.
    let reference = legacy_root();
    let reference_job = job_file(reference.path(), reference.path());
    let out = run(&["--job", reference_job.to_str().unwrap(), "--progress", "off"]).await.unwrap();
    assert_eq!(out.exit_code(), 0);
    let served_manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("served/manifest.json")).unwrap()).unwrap();
    for o in ["obj_a", "obj_b"] {
        let key = served_manifest["objects"][o]["final"][0].as_str().unwrap();
        assert_eq!(sha256_file(&store.join(key)), sha256_file(&finals(reference.path(), "served", o)[0]));
    }

    // SIGTERM stops the coordinator cleanly.
    let mut serve = serve;
    let pid = serve.0.id() as i32;
    // SAFETY: kill(2) with a pid of our own live child; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = serve.0.try_wait().unwrap() {
            assert!(st.success(), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "coordinator did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
