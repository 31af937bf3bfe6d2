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
async fn run_job(root: &Path, toml: &str, extra: &[&str]) -> quarry_cli::RunOutcome {
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
# The merge reads samples until the quota is met: it drops (and counts) only those before.
dropped = n = 0
for x in want:
    if n == limit:
        break
    if x["E_pen"] <= threshold:
        n += 1
    else:
        dropped += 1
print(json.dumps({"final": len(got), "written": len(want), "dropped": dropped}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grasp_finals_are_filtered_and_yields_reported() {
    let root = legacy_root();
    let objects = ["mug", "bowl"];
    let toml = grasp_job_with_yields(
        root.path(),
        "filt",
        100,
        40,
        11,
        "[merge]\nfilter = \"E_pen <= 0.02\"",
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

/// A job running example generator `generator` (in `deploy/examples/`) under the test's
/// Python, writing `out/{name}/<file>` and a yield sidecar; 2 objects, quota 25, batch 10.
fn format_job(exp: &str, root: &Path, generator: &str, file: &str, format: Option<&str>) -> String {
    let gen_path = repo_root().join("deploy/examples").join(generator);
    format!(
        r#"
exp_name = "{exp}"
objects = ["mug", "bowl"]
target_count_per_object = 25
round_batch_size = 10
seed_base = 3
root = "{root}"

[generator]
argv = ["{py}", "{gen}", "--seed", "{{seed}}", "--object", "{{object}}",
        "--batch_size", "{{batch_size}}", "--out", "out/{{name}}/{file}",
        "--stats", "out/{{name}}/stats.json"]
output = "out/{{name}}/{file}"
stats = "out/{{name}}/stats.json"
round_dir = "out/{{name}}"
{format}
"#,
        format = format.map_or(String::new(), |f| format!("format = \"{f}\"")),
        root = root.display(),
        py = python(),
        gen = gen_path.display(),
    )
}

/// Runs a format job and checks each object's final with `check`, Python run after [`REGEN`]
/// (so it has the final, the generator, the object, the batch size, the seeds of the rounds
/// the final holds, the quota and `regen`), plus what every format shares: quota met, yields
/// recorded, `final_sha256` right, no staging or round directories left.
async fn run_format_job(exp: &str, generator: &str, file: &str, format: Option<&str>, check: &str) {
    let root = tempfile::tempdir().expect("tempdir");
    let toml = format_job(exp, root.path(), generator, file, format);
    let out = run_job(root.path(), &toml, &["--gpus", "0,1"]).await;
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), exp);
    let gen_path = repo_root().join("deploy/examples").join(generator);
    for o in ["mug", "bowl"] {
        let entry = &m["objects"][o];
        assert_eq!(entry["collected"], 25, "{entry}");
        assert!(
            entry["attempts"].as_u64().expect("attempts") >= 30,
            "{entry}"
        );
        let f = finals(root.path(), exp, o);
        assert!(f[0].exists(), "{}", f[0].display());
        // A file's final_sha256 is its sha256; a directory's is printed last by [`LISTING`],
        // run after the check.
        let directory = f[0].is_dir();
        if !directory {
            assert_eq!(entry["final_sha256"], sha256_file(&f[0]), "{o}");
        }
        let script = format!("{REGEN}{check}{}", if directory { LISTING } else { "" });
        let printed = run_python(
            &python(),
            &script,
            &[
                f[0].to_str().expect("path"),
                gen_path.to_str().expect("path"),
                o,
                "10",
                &serde_json::to_string(&seeds_of(&m, o)).expect("json"),
                "25",
            ],
        );
        if directory {
            assert_eq!(
                entry["final_sha256"].as_str(),
                printed.lines().last(),
                "{o}: the directory's listing hash"
            );
        }
    }
    assert!(
        out.status.attempts > out.status.successes,
        "{:?}",
        out.status
    );
    let exp_dir = experiments(root.path()).join(exp);
    assert!(!exp_dir.join("rounds").exists(), "staging left");
    assert!(
        files_under(&root.path().join("out")).is_empty(),
        "{:?}",
        files_under(&root.path().join("out"))
    );
}

/// Appended to the checks of directory formats: prints the sha256 of the final's
/// sha256sum-style listing, which the manifest's `final_sha256` must equal.
const LISTING: &str = r#"
import hashlib
listing = ""
files = sorted(os.path.relpath(os.path.join(d, f), final) for d, _, fs in os.walk(final) for f in fs)
for rel in files:
    listing += "%s  ./%s\n" % (hashlib.sha256(open(os.path.join(final, rel), "rb").read()).hexdigest(), rel)
print(hashlib.sha256(listing.encode()).hexdigest())
"#;

/// Python shared by the checks: regenerate the rounds of the given seeds into a temp dir.
const REGEN: &str = r#"
import json, os, subprocess, sys, tempfile
final, gen, obj, batch, seeds, limit = sys.argv[1:7]
seeds, limit = json.loads(seeds), int(limit)
tmp = tempfile.mkdtemp()
def regen(name):
    paths = []
    for s in seeds:
        p = os.path.join(tmp, str(s), name)
        subprocess.run([sys.executable, gen, "--seed", str(s), "--object", obj,
                        "--batch_size", batch, "--out", p], check=True, capture_output=True)
        paths.append(p)
    return paths
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robomimic_hdf5_finals_match_a_python_merge() {
    let check = r#"
import h5py, numpy as np
rounds = regen("demo.hdf5")
src = []
for p in rounds:
    f = h5py.File(p, "r")
    names = sorted(f["data"].keys(), key=lambda n: int(n.split("_")[1]))
    src.extend((f, n) for n in names)
src = src[:limit]
out = h5py.File(final, "r")
assert sorted(out["data"].keys(), key=lambda n: int(n.split("_")[1])) == ["demo_%d" % i for i in range(limit)]
total = 0
for i, (f, n) in enumerate(src):
    a, b = out["data"]["demo_%d" % i], f["data"][n]
    def cmp(x, y, path):
        assert set(x.keys()) == set(y.keys()), path
        for k in x.keys():
            if isinstance(x[k], h5py.Group):
                cmp(x[k], y[k], path + "/" + k)
            else:
                assert np.array_equal(x[k][()], y[k][()]), path + "/" + k
    cmp(a, b, n)
    assert dict(a.attrs) == dict(b.attrs) or all(np.array_equal(a.attrs[k], b.attrs[k]) for k in b.attrs)
    total += int(b.attrs["num_samples"])
assert int(out["data"].attrs["total"]) == total, (out["data"].attrs["total"], total)
assert out["data"].attrs["env_args"] == h5py.File(rounds[0], "r")["data"].attrs["env_args"]
"#;
    run_format_job("h5", "robomimic_gen.py", "demo.hdf5", None, check).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zarr_replay_finals_match_a_python_merge() {
    let check = r#"
import zarr, numpy as np
rounds = [zarr.open_group(p, mode="r") for p in regen("replay.zarr")]
out = zarr.open_group(final, mode="r")
ends, data, offset = [], {}, 0
for g in rounds:
    e = np.asarray(g["meta/episode_ends"][:])
    ends.extend((e + offset).tolist())
    offset += int(e[-1]) if len(e) else 0
    for k in g["data"].keys():
        data.setdefault(k, []).append(np.asarray(g["data"][k][:]))
ends = ends[:limit]
got = np.asarray(out["meta/episode_ends"][:])
assert got.tolist() == ends, (got, ends)
rows = ends[-1]
for k, parts in data.items():
    want = np.concatenate(parts)[:rows]
    assert np.array_equal(np.asarray(out["data"][k][:]), want), k
"#;
    run_format_job("zr", "zarr_replay_gen.py", "replay.zarr", None, check).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn episode_directories_keep_files_one_to_one() {
    let check = r#"
import hashlib, pickle
rounds = regen("dataset")
src = []
for r in rounds:
    names = sorted(os.listdir(os.path.join(r, "episodes")))
    src.extend(os.path.join(r, "episodes", n) for n in names)
src = src[:limit]
eps = sorted(os.listdir(os.path.join(final, "episodes")))
metas = sorted(n for n in os.listdir(os.path.join(final, "metadata")) if n.startswith("episode_"))
assert len(eps) == limit == len(metas), (len(eps), len(metas))
for i, (name, s) in enumerate(zip(eps, src)):
    assert name.startswith("episode_%05d." % i), name
    got = open(os.path.join(final, "episodes", name), "rb").read()
    assert got == open(s, "rb").read(), name
    pickle.loads(got)
    meta = json.load(open(os.path.join(final, "metadata", "episode_%05d_meta.json" % i)))
    assert meta["episode_idx"] == i, meta
json.load(open(os.path.join(final, "metadata", "collection_summary.json")))
"#;
    run_format_job(
        "ep",
        "episode_collector.py",
        "dataset",
        Some("episodes"),
        check,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_finals_are_the_rounds_lines_in_order() {
    let check = r#"
lines = []
for p in regen("rows.jsonl"):
    lines.extend(l.rstrip("\n") for l in open(p) if l.strip())
got = [l.rstrip("\n") for l in open(final)]
assert got == lines[:limit], (len(got), len(lines))
"#;
    run_format_job("jl", "jsonl_gen.py", "rows.jsonl", None, check).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npz_finals_concatenate_every_key() {
    let check = r#"
import numpy as np
parts = [np.load(p) for p in regen("batch.npz")]
out = np.load(final)
assert sorted(out.files) == sorted(parts[0].files), (out.files, parts[0].files)
for k in parts[0].files:
    want = np.concatenate([p[k] for p in parts])[:limit]
    assert np.array_equal(out[k], want), k
"#;
    run_format_job("nz", "npz_gen.py", "batch.npz", None, check).await;
}

/// A job running `deploy/examples/mimic_layouts_gen.py --layout LAYOUT` (rounds laid out as
/// IsaacLab Mimic or MimicGen write them); 2 objects, quota 25, batch 10, `extra` appended to
/// `[generator]`.
fn layout_job(exp: &str, root: &Path, layout: &str, extra: &str) -> String {
    format!(
        r#"
exp_name = "{exp}"
objects = ["cube", "nut"]
target_count_per_object = 25
round_batch_size = 10
seed_base = 11
root = "{root}"

[generator]
argv = ["{py}", "{generator}", "--layout", "{layout}", "--seed", "{{seed}}", "--object", "{{object}}",
        "--batch_size", "{{batch_size}}", "--out", "out/{{name}}/demo.hdf5"]
output = "out/{{name}}/demo.hdf5"
round_dir = "out/{{name}}"
{extra}
"#,
        root = root.display(),
        py = python(),
        generator = repo_root()
            .join("deploy/examples/mimic_layouts_gen.py")
            .display(),
    )
}

/// `check FINAL GEN LAYOUT OBJECT BATCH SEEDS LIMIT`: regenerates the rounds of SEEDS, and
/// checks that the final holds their first LIMIT demos renumbered `demo_0...` in round order,
/// every group, dataset (values, dtype, shape, compression) and attribute equal to its source
/// round's, `data.total` their num_samples summed, the other `data` attributes the first
/// round's. Prints the number of demos each round held.
const LAYOUT_CHECK: &str = r#"
import json, os, subprocess, sys, tempfile
import numpy as np, h5py
final, gen, layout, obj, batch, seeds, limit = sys.argv[1:8]
seeds, limit = json.loads(seeds), int(limit)
tmp = tempfile.mkdtemp()
rounds = []
for s in seeds:
    p = os.path.join(tmp, str(s), "demo.hdf5")
    subprocess.run([sys.executable, gen, "--layout", layout, "--seed", str(s), "--object", obj,
                    "--batch_size", batch, "--out", p], check=True, capture_output=True)
    rounds.append(h5py.File(p, "r"))
src = [(f, n) for f in rounds for n in sorted(f["data"], key=lambda n: int(n[5:]))]
out = h5py.File(final, "r")
names = sorted(out["data"], key=lambda n: int(n[5:]))
assert names == ["demo_%d" % i for i in range(limit)], names
def attrs_equal(where, a, b):
    assert sorted(a.keys()) == sorted(b.keys()), where
    for k in a.keys():
        assert type(a[k]) is type(b[k]) and np.array_equal(a[k], b[k]), (where, k)
def same(where, a, b):
    assert sorted(a.keys()) == sorted(b.keys()), where
    attrs_equal(where, a.attrs, b.attrs)
    for k in a.keys():
        if isinstance(a[k], h5py.Group):
            same(where + "/" + k, a[k], b[k])
        else:
            x, y = a[k], b[k]
            assert (x.dtype, x.shape, x.compression) == (y.dtype, y.shape, y.compression), (where, k)
            assert np.array_equal(x[()], y[()]), (where, k)
total = 0
for i, (f, n) in enumerate(src[:limit]):
    same("demo_%d" % i, out["data"]["demo_%d" % i], f["data"][n])
    total += int(f["data"][n].attrs["num_samples"])
assert int(out["data"].attrs["total"]) == total, (out["data"].attrs["total"], total)
want = {k: v for k, v in rounds[0]["data"].attrs.items() if k != "total"}
got = {k: v for k, v in out["data"].attrs.items() if k != "total"}
attrs_equal("data", got, want)
print(json.dumps([len(f["data"]) for f in rounds]))
"#;

/// Runs a [`layout_job`] to the end and checks both finals with [`LAYOUT_CHECK`]; returns the
/// manifest and, per object, the demos each of its rounds held.
async fn run_layout_job(
    exp: &str,
    layout: &str,
    extra: &str,
) -> (serde_json::Value, Vec<Vec<u64>>) {
    let root = tempfile::tempdir().expect("tempdir");
    let toml = layout_job(exp, root.path(), layout, extra);
    let out = run_job(root.path(), &toml, &["--gpus", "0,1"]).await;
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), exp);
    let generator = repo_root().join("deploy/examples/mimic_layouts_gen.py");
    let mut held = Vec::new();
    for o in ["cube", "nut"] {
        let entry = &m["objects"][o];
        assert_eq!(entry["collected"], 25, "{entry}");
        let f = finals(root.path(), exp, o);
        assert_eq!(entry["final_sha256"], sha256_file(&f[0]), "{o}");
        let printed = run_python(
            &python(),
            LAYOUT_CHECK,
            &[
                f[0].to_str().expect("path"),
                generator.to_str().expect("path"),
                layout,
                o,
                "10",
                &serde_json::to_string(&seeds_of(&m, o)).expect("json"),
                "25",
            ],
        );
        held.push(serde_json::from_str(printed.trim()).expect("counts"));
    }
    assert!(
        files_under(&root.path().join("out")).is_empty(),
        "{:?}",
        files_under(&root.path().join("out"))
    );
    (m, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isaaclab_mimic_rounds_merge_demo_for_demo() {
    let (m, held) = run_layout_job("isaac", "isaaclab", "").await;
    for (o, counts) in ["cube", "nut"].iter().zip(held) {
        // Three rounds of 10 demos, the last cut to the quota.
        assert_eq!(counts, [10, 10, 10], "{o}: {}", m["objects"][o]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mimicgen_rounds_merge_and_report_their_important_stats() {
    // The job names MimicGen's own important_stats.json as the yield sidecar: no wrapper.
    let (m, held) = run_layout_job(
        "mimicgen",
        "mimicgen",
        r#"stats = "out/{name}/important_stats.json""#,
    )
    .await;
    for (o, counts) in ["cube", "nut"].iter().zip(held) {
        let entry = &m["objects"][o];
        let commits = entry["commits"].as_array().expect("commits");
        let written: u64 = commits
            .iter()
            .map(|c| c["count"].as_u64().expect("count"))
            .sum();
        // The rounds the final holds (more may have been committed) hold the demos their
        // commits counted.
        let counted: Vec<u64> = seeds_of(&m, o)
            .iter()
            .map(|s| {
                let c = commits.iter().find(|c| c["seed"] == *s).expect("commit");
                c["count"].as_u64().expect("count")
            })
            .collect();
        assert_eq!(counts, counted, "{o}: {entry}");
        // num_attempts is the batch size, num_success the demos in demo.hdf5.
        assert_eq!(entry["attempts"], 10 * commits.len() as u64, "{entry}");
        assert_eq!(entry["successes"], written, "{entry}");
        assert!(written < 10 * commits.len() as u64, "{entry}");
    }
}

/// Stands in for IsaacLab: `isaaclab_mimic.datagen.generation.setup_env_config` returning a
/// config whose datagen seed is the task's fixed 1, and a `generate_dataset.py` that imports it
/// the way the real script does and prints the seeds it would generate with.
const FAKE_ISAACLAB: &str = r#"
import os, subprocess, sys, tempfile
launcher = sys.argv[1]
d = tempfile.mkdtemp()
os.makedirs(os.path.join(d, "isaaclab_mimic", "datagen"))
for p in ("isaaclab_mimic", "isaaclab_mimic/datagen"):
    open(os.path.join(d, p, "__init__.py"), "w").close()
with open(os.path.join(d, "isaaclab_mimic/datagen/generation.py"), "w") as f:
    f.write("""
import types
def setup_env_config(env_name, output_dir, output_file_name, num_envs, device, generation_num_trials=None):
    cfg = types.SimpleNamespace(seed=None, datagen_config=types.SimpleNamespace(seed=1))
    return cfg, "success"
""")
with open(os.path.join(d, "generate_dataset.py"), "w") as f:
    f.write("""
import sys
from isaaclab_mimic.datagen.generation import setup_env_config
cfg, term = setup_env_config("Task", "out", "gen", 1, "cuda")
print(cfg.datagen_config.seed, cfg.seed, term, sys.argv[1:])
""")
env = dict(os.environ, PYTHONPATH=d, QUARRY_SEED="4217")
run = lambda *a: subprocess.run([sys.executable, *a], env=env, check=True, capture_output=True, text=True).stdout.strip()
script = os.path.join(d, "generate_dataset.py")
print(run(script, "--headless"))
print(run(launcher, script, "--headless", "--num_envs", "2"))
print(run(launcher, "--seed", "7", script))
"#;

#[test]
fn isaaclab_mimic_runs_with_the_round_seed_under_the_launcher() {
    let launcher = repo_root().join("deploy/examples/isaaclab_mimic_seed.py");
    let out = run_python(
        &python(),
        FAKE_ISAACLAB,
        &[launcher.to_str().expect("path")],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            // Unwrapped, every round would use the task's fixed seed.
            "1 None success ['--headless']",
            "4217 4217 success ['--headless', '--num_envs', '2']",
            "7 7 success []",
        ],
        "{out}"
    );
}

#[test]
fn the_isaaclab_mimic_mimicgen_lerobot_and_torch_job_examples_are_valid_jobs() {
    for (file, stats) in [
        ("isaaclab_mimic_job.toml", None),
        (
            "mimicgen_job.toml",
            Some("out/{name}/gen/important_stats.json"),
        ),
        ("lerobot_job.toml", None),
        ("torch_grasp_job.toml", None),
    ] {
        let path = repo_root().join("deploy/examples").join(file);
        let spec = quarry_cli::read_job_file(&path).expect("job file");
        spec.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(spec.generator.stats.as_deref(), stats, "{file}");
        // A warm generator gets the batch size in its round lines, not in argv.
        assert!(
            spec.generator.mode == "warm"
                || spec
                    .generator
                    .argv
                    .iter()
                    .any(|a| a.contains("{batch_size}")),
            "{file}"
        );
    }
}

/// Checks a LeRobot final against the fixture rounds its seeds copied (round `r<seed % 3>`):
/// the first `limit` episodes in round order, indices contiguous, tasks by name, every frame's
/// values, and the videos byte for byte (copied whole, never re-encoded), but for the round cut
/// at the quota, whose video keeps exactly its kept episodes' frames (decoded with PyAV when
/// the Python has it).
const LEROBOT_CHECK: &str = r#"
import json, os, sys, glob, hashlib
import pyarrow.parquet as pq
final, fixtures, seeds, limit = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
def rows(root, pattern):
    out = []
    for f in sorted(glob.glob(os.path.join(root, pattern))):
        out += pq.read_table(f).to_pylist()
    return out
def tasks(root):
    t = pq.read_table(os.path.join(root, "meta/tasks.parquet")).to_pydict()
    return dict(zip(t["task_index"], t["__index_level_0__"]))
src = []
for s in seeds:
    r = os.path.join(fixtures, "r%d" % (s % 3))
    data, names = rows(r, "data/*/*.parquet"), tasks(r)
    for e in rows(r, "meta/episodes/*/*.parquet"):
        src.append((e, data[e["dataset_from_index"]:e["dataset_to_index"]], names))
src = src[:limit]
info = json.load(open(os.path.join(final, "meta/info.json")))
eps, data, names = rows(final, "meta/episodes/*/*.parquet"), rows(final, "data/*/*.parquet"), tasks(final)
assert info["total_episodes"] == len(eps) == limit, (info["total_episodes"], len(eps))
assert info["total_frames"] == len(data) == sum(len(d) for _, d, _ in src)
assert [r["index"] for r in data] == list(range(len(data)))
for i, (e, (se, sd, sn)) in enumerate(zip(eps, src)):
    assert e["episode_index"] == i and e["length"] == se["length"] and e["tasks"] == se["tasks"]
    for a, b in zip(data[e["dataset_from_index"]:e["dataset_to_index"]], sd):
        assert a["episode_index"] == i and names[a["task_index"]] == sn[b["task_index"]]
        assert a["observation.state"] == b["observation.state"] and a["action"] == b["action"]
vids = sorted(glob.glob(os.path.join(final, "videos/*/*/*.mp4")))
used = []
for s in seeds:
    if s not in used:
        used.append(s)
assert len(vids) == len(used), (vids, used)
kept_frames = {}
trimmed = 0
n_eps = 0
for s in used:
    r = os.path.join(fixtures, "r%d" % (s % 3))
    for e in rows(r, "meta/episodes/*/*.parquet"):
        if n_eps < limit:
            kept_frames[s] = kept_frames.get(s, 0) + e["length"]
        n_eps += 1
for v, s in zip(vids, used):
    want = glob.glob(os.path.join(fixtures, "r%d" % (s % 3), "videos/*/*/*.mp4"))[0]
    if open(v, "rb").read() == open(want, "rb").read():
        continue
    # The round cut at the quota: its file cut after the kept episodes' frames.
    try:
        import av
    except ImportError:
        continue
    def frames(p):
        with av.open(p) as c:
            return [(f.pts, bytes(f.to_ndarray(format="rgb24").tobytes())) for f in c.decode(video=0)]
    a, b = frames(v), frames(want)
    assert len(a) == kept_frames[s] < len(b) and a == b[:len(a)], (v, len(a), kept_frames[s], len(b))
    trimmed += 1
print("ok", len(eps), len(data), "trimmed", trimmed)
"#;

/// Checks a LeRobot final filtered on `length >= min_len` against the fixture rounds its seeds
/// copied: the first `limit` passing episodes in round order, their frames, indices
/// contiguous; prints `ok <episodes> <frames>`.
const LEROBOT_FILTER_CHECK: &str = r#"
import json, os, sys, glob
import pyarrow.parquet as pq
final, fixtures, seeds, limit, min_len = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def rows(root, pattern):
    out = []
    for f in sorted(glob.glob(os.path.join(root, pattern))):
        out += pq.read_table(f).to_pylist()
    return out
src = []
for s in seeds:
    r = os.path.join(fixtures, "r%d" % (s % 3))
    data = rows(r, "data/*/*.parquet")
    for e in rows(r, "meta/episodes/*/*.parquet"):
        if e["length"] >= min_len:
            src.append((e, data[e["dataset_from_index"]:e["dataset_to_index"]]))
src = src[:limit]
info = json.load(open(os.path.join(final, "meta/info.json")))
eps, data = rows(final, "meta/episodes/*/*.parquet"), rows(final, "data/*/*.parquet")
assert info["total_episodes"] == len(eps) == limit, (info["total_episodes"], len(eps))
assert info["total_frames"] == len(data) == sum(len(d) for _, d in src)
assert [r["index"] for r in data] == list(range(len(data)))
pos = 0
for i, (e, (se, sd)) in enumerate(zip(eps, src)):
    assert e["episode_index"] == i and e["length"] == se["length"] >= min_len
    assert e["dataset_from_index"] == pos and e["dataset_to_index"] == pos + e["length"]
    for a, b in zip(data[pos:pos + e["length"]], sd):
        assert a["episode_index"] == i and a["action"] == b["action"]
    pos += e["length"]
print("ok", len(eps), len(data))
"#;

/// `merge.filter` on a LeRobot episode field: workers count the passing episodes, the final
/// holds exactly the first `target` of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lerobot_finals_are_filtered_on_episode_length() {
    let root = tempfile::tempdir().expect("tempdir");
    let fixtures = repo_root().join("tests/fixtures/lerobot");
    let toml = format!(
        r#"
exp_name = "lrf"
objects = ["cube"]
target_count_per_object = 4
round_batch_size = 2
seed_base = 0
root = "{root}"

[generator]
argv = ["{py}", "{gen}", "--seed", "{{seed}}", "--out", "out/{{name}}/dataset"]
output = "out/{{name}}/dataset"
round_dir = "out/{{name}}"
format = "lerobot"

[merge]
filter = "length >= 5"
"#,
        root = root.path().display(),
        py = python(),
        gen = fixtures.join("copy_round.py").display(),
    );
    let out = run_job(root.path(), &toml, &["--gpus", "0"]).await;
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), "lrf");
    assert_eq!(m["objects"]["cube"]["collected"], 4, "{m}");
    assert!(
        m["objects"]["cube"]["filtered"].as_u64().expect("filtered") > 0,
        "{m}"
    );
    let f = finals(root.path(), "lrf", "cube");
    let said = run_python(
        &python(),
        LEROBOT_FILTER_CHECK,
        &[
            f[0].to_str().expect("path"),
            fixtures.join("rounds").to_str().expect("path"),
            &serde_json::to_string(&seeds_of(&m, "cube")).expect("json"),
            "4",
            "5",
        ],
    );
    assert!(said.starts_with("ok 4 "), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lerobot_rounds_merge_into_one_lerobot_dataset() {
    let root = tempfile::tempdir().expect("tempdir");
    let fixtures = repo_root().join("tests/fixtures/lerobot");
    let toml = format!(
        r#"
exp_name = "lr"
objects = ["cube"]
target_count_per_object = 6
round_batch_size = 2
seed_base = 0
root = "{root}"

[generator]
argv = ["{py}", "{gen}", "--seed", "{{seed}}", "--out", "out/{{name}}/dataset"]
output = "out/{{name}}/dataset"
round_dir = "out/{{name}}"
format = "lerobot"
"#,
        root = root.path().display(),
        py = python(),
        gen = fixtures.join("copy_round.py").display(),
    );
    let out = run_job(root.path(), &toml, &["--gpus", "0"]).await;
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), "lr");
    assert_eq!(m["objects"]["cube"]["collected"], 6, "{m}");
    let f = finals(root.path(), "lr", "cube");
    assert!(f[0].join("meta/info.json").is_file(), "{}", f[0].display());
    let said = run_python(
        &python(),
        LEROBOT_CHECK,
        &[
            f[0].to_str().expect("path"),
            fixtures.join("rounds").to_str().expect("path"),
            &serde_json::to_string(&seeds_of(&m, "cube")).expect("json"),
            "6",
        ],
    );
    assert!(said.starts_with("ok 6 "), "{said}");
    // The final is itself a dataset Quarry accepts as a round.
    let i = quarry_formats::inspect(quarry_formats::Format::Lerobot, &f[0], None)
        .expect("the final inspects");
    assert_eq!(i.count, 6);
    assert!(
        files_under(&root.path().join("out")).is_empty(),
        "round directories left"
    );
}

/// A LeRobot final whose rounds' video files were appended into one: argv the final, the
/// fixture rounds, the seeds (round order) and the quota. Every frame of the final's one
/// video file, decoded, equals the kept episodes' frames of the rounds in order, and every
/// episode's frames, found by its (shifted) timestamps, equal its round's.
const LEROBOT_APPEND_CHECK: &str = r#"
import json, os, sys, glob
import pyarrow.parquet as pq
import av, numpy as np
final, fixtures, seeds, limit = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
def rows(root, pattern):
    out = []
    for f in sorted(glob.glob(os.path.join(root, pattern))):
        out += pq.read_table(f).to_pylist()
    return out
def frames(path, t0=None, t1=None):
    with av.open(path) as c:
        out = []
        for fr in c.decode(video=0):
            t = float(fr.pts * fr.time_base)
            if t0 is None or t0 - 1e-4 <= t < t1 - 1e-4:
                out.append(fr.to_ndarray(format="rgb24"))
        return out
key = "observation.images.cam"
p = "videos/%s/" % key
def video(root, e):
    return os.path.join(root, "videos/%s/chunk-%03d/file-%03d.mp4" % (key, e[p + "chunk_index"], e[p + "file_index"]))
src = []
for s in seeds:
    r = os.path.join(fixtures, "r%d" % (s % 3))
    for e in rows(r, "meta/episodes/*/*.parquet"):
        src.append((r, e))
src = src[:limit]
info = json.load(open(os.path.join(final, "meta/info.json")))
assert info["video_files_size_in_mb"] == 1, info
vids = sorted(glob.glob(os.path.join(final, "videos/*/*/*.mp4")))
assert len(vids) == 1, vids
eps = rows(final, "meta/episodes/*/*.parquet")
assert len(eps) == len(src) == limit
want_all = []
for e, (r, s) in zip(eps, src):
    want = frames(video(r, s), s[p + "from_timestamp"], s[p + "to_timestamp"])
    got = frames(video(final, e), e[p + "from_timestamp"], e[p + "to_timestamp"])
    assert len(got) == len(want) == e["length"], (len(got), len(want), e["length"])
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    want_all += want
got_all = frames(vids[0])
assert len(got_all) == len(want_all) and all(np.array_equal(a, b) for a, b in zip(got_all, want_all))
print("ok", len(eps), len(got_all))
"#;

/// `merge.video_files_size_in_mb`: the rounds' video files are appended into one (no
/// re-encoding), the round cut at the quota cut first; every episode's frames are where its
/// shifted timestamps say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lerobot_video_files_are_appended_under_the_size() {
    let root = tempfile::tempdir().expect("tempdir");
    let fixtures = repo_root().join("tests/fixtures/lerobot");
    let toml = format!(
        r#"
exp_name = "lra"
objects = ["cube"]
target_count_per_object = 6
round_batch_size = 2
seed_base = 0
root = "{root}"

[generator]
argv = ["{py}", "{gen}", "--seed", "{{seed}}", "--out", "out/{{name}}/dataset"]
output = "out/{{name}}/dataset"
round_dir = "out/{{name}}"
format = "lerobot"

[merge]
video_files_size_in_mb = 1
"#,
        root = root.path().display(),
        py = python(),
        gen = fixtures.join("copy_round.py").display(),
    );
    let out = run_job(root.path(), &toml, &["--gpus", "0"]).await;
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), "lra");
    assert_eq!(m["objects"]["cube"]["collected"], 6, "{m}");
    let f = finals(root.path(), "lra", "cube");
    let said = run_python(
        &python(),
        LEROBOT_APPEND_CHECK,
        &[
            f[0].to_str().expect("path"),
            fixtures.join("rounds").to_str().expect("path"),
            &serde_json::to_string(&seeds_of(&m, "cube")).expect("json"),
            "6",
        ],
    );
    assert_eq!(said.trim(), "ok 6 31", "{said}");
    // The final is itself a dataset Quarry accepts as a round.
    let i = quarry_formats::inspect(quarry_formats::Format::Lerobot, &f[0], None)
        .expect("the final inspects");
    assert_eq!(i.count, 6);
}

/// A stand-in generator: copies fixture round `r<seed % 3>` to `--out`, and for seed 1
/// makes its video file's `stsz` claim 2^32 - 1 samples (its tables lie; the file still
/// starts with `ftyp`, so the worker's inspection passes).
const LEROBOT_BAD_VIDEO_GEN: &str = r#"
import argparse, glob, os, shutil, struct
p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, required=True)
p.add_argument("--out", required=True)
p.add_argument("--fixtures", required=True)
a = p.parse_args()
shutil.copytree(os.path.join(a.fixtures, "r%d" % (a.seed % 3)), a.out)
if a.seed == 1:
    v = glob.glob(os.path.join(a.out, "videos/*/*/*.mp4"))[0]
    b = bytearray(open(v, "rb").read())
    at = b.find(b"stsz") - 4
    b[at + 16:at + 20] = struct.pack(">I", 0xFFFFFFFF)
    open(v, "wb").write(bytes(b))
"#;

/// With `merge.video_files_size_in_mb` every round's video file is read at the merge: a
/// round whose file's tables lie costs that round (quarantined, the file named), and the job
/// completes from the next ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lerobot_round_with_a_lying_video_file_is_quarantined_at_the_merge() {
    let root = tempfile::tempdir().expect("tempdir");
    let fixtures = repo_root().join("tests/fixtures/lerobot/rounds");
    let gen_path = root.path().join("bad_video.py");
    std::fs::write(&gen_path, LEROBOT_BAD_VIDEO_GEN).expect("write generator");
    let toml = format!(
        r#"
exp_name = "lrq"
objects = ["cube"]
target_count_per_object = 6
round_batch_size = 2
seed_base = 0
root = "{root}"

[generator]
argv = ["{py}", "{gen}", "--seed", "{{seed}}", "--out", "out/{{name}}/dataset", "--fixtures", "{fixtures}"]
output = "out/{{name}}/dataset"
round_dir = "out/{{name}}"
format = "lerobot"

[merge]
video_files_size_in_mb = 1
"#,
        root = root.path().display(),
        py = python(),
        gen = gen_path.display(),
        fixtures = fixtures.display(),
    );
    // Bounded: a merge failure blamed on no round is retried without end.
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        run_job(root.path(), &toml, &["--gpus", "0"]),
    )
    .await
    .expect("the job ends: the lying round is quarantined, not its merge retried");
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), "lrq");
    let cube = &m["objects"]["cube"];
    assert_eq!(cube["collected"], 6, "{m}");
    let q = &cube["quarantined"][0];
    let reason = q["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("file-000.mp4") && reason.contains("stsz"),
        "{q}"
    );
    let seeds = seeds_of(&m, "cube");
    assert!(!seeds.contains(&1), "{seeds:?}");
    let f = finals(root.path(), "lrq", "cube");
    let vids = files_under(&f[0].join("videos"));
    assert_eq!(vids.len(), 1, "{vids:?}");
}
