//! Failed attempts: a generator that exits non-zero, hangs past its timeout, writes nothing,
//! writes a truncated file or a different dtype. Each gets its reason recorded, is retried,
//! then quarantined; the final is still exact. A flaky round succeeds on retry.

use quarry_proto::v1 as pb;
use quarry_tests::*;

fn job_file(root: &std::path::Path) -> std::path::PathBuf {
    let gen_path = example_generator();
    let text = format!(
        r#"
exp_name = "faults"
objects = ["obj_a", "obj_b"]
target_count_per_object = 100
round_batch_size = 25
num_iterations = 1
seed_base = 1000
retries = 1
retry_backoff_ms = 50

[generator]
argv = ["python3", "{gen}", "--name", "{{name}}", "--object_code", "{{object}}",
        "--batch_size", "{{batch_size}}", "--num_iterations", "{{num_iterations}}",
        "--seed", "{{seed}}", "--gpu", "0", "--out_root", "out",
        "--fail_seeds", "1001", "--hang_seeds", "1002", "--empty_seeds", "1003",
        "--truncate_seeds", "1004", "--dtype_seeds", "1005",
        "--flaky_seeds", "101001", "--state_dir", "flaky"]
output = "out/{{name}}/results/{{object}}.npy"
round_dir = "out/{{name}}"
timeout_secs = 2
"#,
        gen = gen_path.display()
    );
    let p = root.join("job.toml");
    std::fs::write(&p, text).expect("write job file");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_failure_is_recorded_retried_quarantined_and_the_final_stays_exact() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("flaky")).unwrap();
    let job = job_file(root.path());
    // One agent: rounds of an object run in order, so round 0 fixes the object's schema.
    let out = run(&[
        "--job",
        job.to_str().unwrap(),
        "--gpu",
        "0",
        "--progress",
        "off",
    ])
    .await
    .unwrap();
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), "faults");

    let q = m["objects"]["obj_a"]["quarantined"].as_array().unwrap();
    let by_round = |r: u64| {
        q.iter()
            .find(|e| e["round"] == r)
            .unwrap_or_else(|| panic!("round {r} not quarantined: {q:?}"))
    };
    let expect = [
        (1, "exit: generator exited with status 3"),
        (2, "timeout"),
        (3, "output_missing"),
        (4, "output_invalid"),
        (5, "schema_mismatch"),
    ];
    for (round, reason) in expect {
        let e = by_round(round);
        assert!(
            e["reason"].as_str().unwrap().starts_with(reason),
            "round {round}: {e}"
        );
        assert_eq!(e["attempts"], 2, "retried once before quarantine: {e}");
    }
    assert!(
        by_round(1)["log_tail"]
            .as_str()
            .unwrap()
            .contains("injected failure"),
        "{}",
        by_round(1)
    );
    assert_eq!(q.len(), 5);
    assert_eq!(
        m["objects"]["obj_a"]["rounds"],
        serde_json::json!([0, 6, 7, 8])
    );

    // The flaky round failed once and then committed; nothing quarantined.
    assert_eq!(m["objects"]["obj_b"]["quarantined"], serde_json::json!([]));
    assert_eq!(m["objects"]["obj_b"]["failed_attempts"], 1);
    assert_eq!(
        m["objects"]["obj_b"]["rounds"],
        serde_json::json!([0, 1, 2, 3])
    );

    // The final equals numpy's concatenation of the good rounds, regenerated independently.
    let scratch = tempfile::tempdir().unwrap();
    let final_a = finals(root.path(), "faults", "obj_a")[0].clone();
    const CHECK: &str = r#"
import sys, subprocess, numpy as np
gen, scratch, final = sys.argv[1], sys.argv[2], sys.argv[3]
parts = []
for seed in (1000, 1006, 1007, 1008):
    subprocess.run([sys.executable, gen, "--name", f"s{seed}", "--object_code", "obj_a", "--batch_size", "25",
                    "--num_iterations", "1", "--seed", str(seed), "--gpu", "0", "--out_root", scratch], check=True,
                   stdout=subprocess.DEVNULL)
    parts.append(np.load(f"{scratch}/s{seed}/results/obj_a.npy", allow_pickle=True))
want = np.concatenate(parts)[:100]
got = np.load(final, allow_pickle=True)
assert got.shape == (100,), got.shape
assert all(a == b for a, b in zip(got.tolist(), want.tolist()))
print("ok")
"#;
    let printed = run_python(
        &python(),
        CHECK,
        &[
            example_generator().to_str().unwrap(),
            scratch.path().to_str().unwrap(),
            final_a.to_str().unwrap(),
        ],
    );
    assert_eq!(printed.trim(), "ok");
    // Failed attempts left their logs; no staging or generator directories remain.
    let exp = experiments(root.path());
    assert!(!exp.join("faults/rounds").exists());
    assert!(files_under(&root.path().join("out")).is_empty());
    assert!(
        files_under(&exp.join("faults/logs/obj_a"))
            .iter()
            .any(|f| f.starts_with("r1_s1001/"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generator_that_fails_everything_stops_the_job_with_its_reason() {
    let root = tempfile::tempdir().unwrap();
    let text = r#"
exp_name = "broken"
objects = ["obj_a", "obj_b"]
target_count_per_object = 10
round_batch_size = 5
retries = 0
retry_backoff_ms = 10
[generator]
argv = ["python3", "-c", "import sys; print('cannot import torch', file=sys.stderr); sys.exit(7)", "{seed}"]
output = "out/{name}.npy"
"#;
    let job = root.path().join("job.toml");
    std::fs::write(&job, text).unwrap();
    let out = run(&[
        "--job",
        job.to_str().unwrap(),
        "--gpus",
        "0,1",
        "--progress",
        "off",
    ])
    .await
    .unwrap();
    assert_eq!(
        out.status.state,
        pb::JobState::Cancelled as i32,
        "{:?}",
        out.status
    );
    // A stopped job is an error (1); 2 is a usage error, 3 an exhausted object.
    assert_eq!(out.exit_code(), 1);
    assert!(
        out.status.message.contains("generator looks broken"),
        "{}",
        out.status.message
    );
    assert!(
        out.status.message.contains("exited with status 7"),
        "{}",
        out.status.message
    );
    // It stopped early instead of burning rounds up to the cap.
    assert!(out.status.rounds_quarantined <= 5, "{:?}", out.status);
    let m = manifest(root.path(), "broken");
    assert_eq!(m["state"], "cancelled");
    let tails: Vec<String> = m["objects"]["obj_a"]["quarantined"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["log_tail"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        tails.iter().all(|t| t.contains("cannot import torch")),
        "{tails:?}"
    );
}
