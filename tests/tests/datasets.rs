//! Generator families end to end: `coordinator run` with the example generators in
//! `deploy/examples/` writing each dataset format, yields reported through sidecars, quality
//! filters and de-duplication at merge. Every final is read back by the format's own Python
//! library and compared with a Python merge of the same rounds, regenerated from their seeds.
//!
//! Needs `QUARRY_TEST_PYTHON` with numpy, h5py and zarr (`.ci/run` installs them); fails
//! loudly without them.

use std::path::Path;

use quarry_proto::v1 as pb;
use quarry_tests::*;

/// Writes a job file into `root` and runs it with `coordinator run`.
async fn run_job(root: &Path, toml: &str, extra: &[&str]) -> quarry_coordinator::cli::RunOutcome {
    let job = root.join("job.toml");
    std::fs::write(&job, toml).expect("write job file");
    let job = job.to_str().expect("utf-8 path").to_string();
    let mut args = vec!["--job", job.as_str(), "--progress", "off"];
    args.extend_from_slice(extra);
    run(&args).await.expect("job runs")
}

fn seeds_of(m: &serde_json::Value, object: &str) -> Vec<i64> {
    m["objects"][object]["seeds"]
        .as_array()
        .unwrap_or_else(|| panic!("no seeds for {object} in {m}"))
        .iter()
        .map(|s| s.as_i64().expect("seed"))
        .collect()
}

/// Loads the final with numpy and compares it with the generator's own rounds (rerun from
/// their seeds), concatenated, filtered and cut in Python.
const GRASP_CHECK: &str = r#"
import json, os, subprocess, sys, tempfile
import numpy as np
final, gen, obj, batch, seeds, limit, threshold = sys.argv[1:8]
seeds, limit, threshold = json.loads(seeds), int(limit), float(threshold)
got = list(np.load(final, allow_pickle=True))
want = []
with tempfile.TemporaryDirectory() as d:
    for s in seeds:
        subprocess.run([sys.executable, gen, "--name", "ref", "--object_code", obj,
                        "--batch_size", batch, "--num_iterations", "1", "--seed", str(s),
                        "--yield_mode", "uneven", "--out_root", d],
                       check=True, capture_output=True)
        want.extend(np.load(os.path.join(d, "ref", "results", obj + ".npy"), allow_pickle=True))
kept = [x for x in want if x["E_pen"] <= threshold]
assert all(x["E_pen"] <= threshold for x in got), "a sample above the threshold survived"
assert len(got) == min(limit, len(kept)), (len(got), limit, len(kept))
assert got == kept[:limit], "final differs from the filtered concatenation"
print(json.dumps({"final": len(got), "written": len(want), "dropped": len(want) - len(kept)}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grasp_finals_are_filtered_and_yields_reported() {
    let root = legacy_root();
    let objects = ["mug", "bowl"];
    let toml = format!(
        r#"
exp_name = "filt"
objects = ["mug", "bowl"]
target_count_per_object = 100
round_batch_size = 40
num_iterations = 3
seed_base = 11
root = "{root}"

[generator]
argv = ["python3", "main.py", "--name", "{{name}}", "--object_code", "{{object}}",
        "--batch_size", "{{batch_size}}", "--num_iterations", "{{num_iterations}}",
        "--seed", "{{seed}}", "--yield_mode", "uneven",
        "--stats_file", "../data/experiments/{{name}}/stats.json"]
cwd = "BimanGrasp-Optimization"
output = "data/experiments/{{name}}/results/{{object}}.npy"
round_dir = "data/experiments/{{name}}"
stats = "data/experiments/{{name}}/stats.json"

[merge]
filter = "E_pen <= 0.02"
"#,
        root = root.path().display()
    );
    let out = run_job(root.path(), &toml, &["--gpus", "0,1"]).await;
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), "filt");
    assert_eq!(m["format"], "npy");
    assert_eq!(m["filter"], "E_pen <= 0.02");
    let (mut attempts, mut successes) = (0, 0);
    for o in objects {
        let entry = &m["objects"][o];
        assert_eq!(entry["collected"], 100, "{entry}");
        // The yield is what the sidecars said: 40 trials a round, the samples written kept.
        let commits = entry["commits"].as_array().expect("commits");
        let written: u64 = commits
            .iter()
            .map(|c| c["count"].as_u64().expect("count"))
            .sum();
        assert_eq!(entry["attempts"], 40 * commits.len() as u64, "{entry}");
        assert_eq!(entry["successes"], written, "{entry}");
        let rate = entry["success_rate"].as_f64().expect("rate");
        assert!((rate - written as f64 / (40.0 * commits.len() as f64)).abs() < 1e-12);
        attempts += 40 * commits.len() as u64;
        successes += written;
        // Only passing samples counted toward the quota, so more rounds ran than the
        // written counts alone would need, and the merge recorded what it dropped.
        assert!(entry["filtered"].as_u64().expect("filtered") > 0, "{entry}");
        let f = finals(root.path(), "filt", o);
        let report = run_python(
            &python(),
            GRASP_CHECK,
            &[
                f[0].to_str().expect("path"),
                example_generator().to_str().expect("path"),
                o,
                "40",
                &serde_json::to_string(&seeds_of(&m, o)).expect("json"),
                "100",
                "0.02",
            ],
        );
        let r: serde_json::Value = serde_json::from_str(report.trim()).expect("report");
        assert_eq!(r["final"], 100, "{r}");
        assert_eq!(
            r["dropped"].as_u64(),
            entry["filtered"].as_u64(),
            "the manifest's filtered count is what Python drops: {r} {entry}"
        );
    }
    assert_eq!(
        (out.status.attempts, out.status.successes),
        (attempts, successes)
    );
    assert_eq!(m["totals"]["attempts"], attempts);
    assert_eq!(m["totals"]["successes"], successes);
    // The sidecars went with the round directories.
    let left: Vec<String> = files_under(&experiments(root.path()))
        .into_iter()
        .filter(|f| f.ends_with("stats.json"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_bad_yield_sidecar_fails_the_round() {
    let root = legacy_root();
    // The generator never writes the sidecar the job names: every attempt fails, the rounds
    // are quarantined and the message says what was missing.
    let toml = format!(
        r#"
exp_name = "nostats"
objects = ["mug"]
target_count_per_object = 10
round_batch_size = 10
num_iterations = 1
max_rounds = 1
retries = 0
root = "{root}"

[generator]
argv = ["python3", "main.py", "--name", "{{name}}", "--object_code", "{{object}}",
        "--batch_size", "{{batch_size}}", "--seed", "{{seed}}"]
cwd = "BimanGrasp-Optimization"
output = "data/experiments/{{name}}/results/{{object}}.npy"
round_dir = "data/experiments/{{name}}"
stats = "data/experiments/{{name}}/stats.json"
"#,
        root = root.path().display()
    );
    let out = run_job(root.path(), &toml, &[]).await;
    assert_eq!(
        out.status.state,
        pb::JobState::Incomplete as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), "nostats");
    let q = &m["objects"]["mug"]["quarantined"][0];
    assert!(
        q["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("yield sidecar"),
        "{q}"
    );
}
