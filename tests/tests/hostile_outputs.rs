//! Generators that leave something behind: a detached process (`setsid`, double fork) that
//! waits for the worker to open the output and then rewrites it in place. The worker must
//! kill it with the round and commit only the bytes it inspected; hostile files (a sidecar
//! linked to `/dev/zero`) cost one round with a reason, never the process.
//!
//! Everything runs through `coordinator run` in this process: its agents' pid is ours, which
//! is what the leftover watches.

use std::path::Path;
use std::time::{Duration, Instant};

use quarry_proto::v1 as pb;
use quarry_tests::*;

/// Writes `--out` as 5 JSON lines from the seed, leaves a detached rewriter (its pid in
/// `pids/<seed>.pid`) and exits 0. The rewriter watches the agent's (our) open files for the
/// output and, once the agent opens it, overwrites its first line in place for 3 s, then
/// lingers until 20 s have passed.
const GENERATOR: &str = r#"
import os, sys, time
seed, out, pids = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "w") as f:
    for i in range(5):
        f.write('{"seed": %s, "i": %d}\n' % (seed, i))
target = os.path.abspath(out)
agent = os.getppid()
pid_file = os.path.join(pids, seed + ".pid")
child = os.fork()
if child == 0:
    os.setsid()
    if os.fork() == 0:
        with open(pid_file + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.rename(pid_file + ".tmp", pid_file)
        start = time.time()
        seen = False
        while not seen and time.time() - start < 20:
            try:
                fds = os.listdir("/proc/%d/fd" % agent)
            except OSError:
                break
            for fd in fds:
                try:
                    if os.readlink("/proc/%d/fd/%s" % (agent, fd)) == target:
                        seen = True
                        break
                except OSError:
                    pass
        end = time.time() + 3
        while seen and time.time() < end:
            try:
                with open(target, "r+b") as f:
                    f.write(b"X" * 10)
            except OSError:
                pass
            time.sleep(0.001)
        time.sleep(max(0, 20 - (time.time() - start)))
    os._exit(0)
os.waitpid(child, 0)
while not os.path.exists(pid_file):
    time.sleep(0.01)
"#;

fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // A zombie (its parent, init here, not reaping yet) holds nothing.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

fn read_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_dir(dir)
        .expect("pid directory")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pid"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .expect("pid file")
                .trim()
                .parse()
                .expect("a pid")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leftover_that_rewrites_the_output_dies_and_only_inspected_bytes_are_committed() {
    let root = tempfile::tempdir().expect("tempdir");
    let pids = root.path().join("pids");
    std::fs::create_dir_all(&pids).expect("mkdir");
    let script = root.path().join("gen.py");
    std::fs::write(&script, GENERATOR).expect("write generator");
    let toml = format!(
        r#"
exp_name = "leftover"
objects = ["obj"]
target_count_per_object = 10
round_batch_size = 5
seed_base = 100
retries = 0
root = "{root}"

[generator]
argv = ["{py}", "{gen}", "{{seed}}", "out/{{name}}/rows.jsonl", "{pids}"]
output = "out/{{name}}/rows.jsonl"
round_dir = "out/{{name}}"
timeout_secs = 30
"#,
        root = root.path().display(),
        py = python(),
        gen = script.display(),
        pids = pids.display(),
    );
    let job = root.path().join("job.toml");
    std::fs::write(&job, toml).expect("write job");
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        run(&[
            "--job",
            job.to_str().expect("UTF-8"),
            "--gpus",
            "0",
            "--progress",
            "off",
        ]),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the job did not end in 60 s; leftovers alive: {:?}",
            read_pids(&pids)
                .into_iter()
                .filter(|&p| alive(p))
                .collect::<Vec<_>>()
        )
    })
    .expect("coordinator run");

    // Every leftover died with its round (each lingers 20 s otherwise).
    let leftovers = read_pids(&pids);
    assert_eq!(leftovers.len(), 2, "one leftover per round: {leftovers:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while leftovers.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let living: Vec<i32> = leftovers.iter().copied().filter(|&p| alive(p)).collect();
    assert!(
        living.is_empty(),
        "leftovers outlived their rounds ({:?} after the start): {living:?}",
        started.elapsed()
    );

    // The final is exactly the lines the generators wrote and the worker inspected.
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let finals = finals(root.path(), "leftover", "obj");
    let text = std::fs::read_to_string(&finals[0]).expect("final");
    let want: String = [100, 101]
        .iter()
        .flat_map(|s| (0..5).map(move |i| format!("{{\"seed\": {s}, \"i\": {i}}}\n")))
        .collect();
    assert_eq!(text, want);
    assert!(files_under(&root.path().join("out")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_linked_to_dev_zero_fails_the_round_with_its_name() {
    let root = tempfile::tempdir().expect("tempdir");
    let script = root.path().join("gen.sh");
    std::fs::write(
        &script,
        "mkdir -p out/$1\nprintf '{\"a\": 1}\\n{\"a\": 2}\\n' > out/$1/rows.jsonl\n\
         ln -s /dev/zero out/$1/stats.json\n",
    )
    .expect("write generator");
    let toml = format!(
        r#"
exp_name = "zero"
objects = ["obj"]
target_count_per_object = 2
round_batch_size = 2
retries = 0
root = "{root}"

[generator]
argv = ["sh", "{gen}", "{{name}}"]
output = "out/{{name}}/rows.jsonl"
stats = "out/{{name}}/stats.json"
round_dir = "out/{{name}}"
"#,
        root = root.path().display(),
        gen = script.display(),
    );
    let job = root.path().join("job.toml");
    std::fs::write(&job, toml).expect("write job");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        run(&[
            "--job",
            job.to_str().expect("UTF-8"),
            "--gpus",
            "0",
            "--progress",
            "off",
        ]),
    )
    .await
    .expect("the run ended")
    .expect("coordinator run");
    assert_ne!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), "zero");
    let q = m["objects"]["obj"]["quarantined"]
        .as_array()
        .unwrap_or_else(|| panic!("no quarantine in {m}"));
    let reason = q[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("output_invalid"), "{reason}");
    assert!(
        reason.contains("stats.json: is a symbolic link"),
        "{reason}"
    );
}
