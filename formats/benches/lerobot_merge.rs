//! Quarry's LeRobot merge against lerobot's own `aggregate_datasets`, same input, same run.
//!
//! lerobot's writer (`LeRobotDataset.create` / `add_frame` / `save_episode` / `finalize`)
//! records ROUNDS rounds of 8 episodes of 40 to 80 frames each: a 14-dim state and action and
//! one 96x128 AV1 camera at 30 fps (the input of issue 16). Then each contender merges all of
//! them into one dataset, in a process of its own so its peak RSS is its own:
//!
//! - Quarry: this bench binary re-run as a child (`QUARRY_BENCH_CHILD`), which calls
//!   `quarry_formats::merge` and reports its time and `VmHWM` (peak RSS);
//! - lerobot: `aggregate_datasets` in Python, timed from the call to its return (the import
//!   of lerobot and torch, several seconds, timed apart) and its peak RSS
//!   (`ru_maxrss`, which includes the import).
//!
//! Both outputs are checked to hold every episode and frame. `cargo bench -p quarry-formats
//! --bench lerobot_merge`. Environment: `QUARRY_LEROBOT_PYTHON` (a Python with lerobot and
//! torch; required), `QUARRY_BENCH_DIR` (default: a temporary directory), `QUARRY_BENCH_ROUNDS`
//! (16).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use quarry_formats::{Format, MergeOptions};

const GEN: &str = r#"
import sys, numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset
out, rounds = sys.argv[1], int(sys.argv[2])
features = {
    "observation.state": {"dtype": "float32", "shape": (14,), "names": None},
    "action": {"dtype": "float32", "shape": (14,), "names": None},
    "observation.images.top": {"dtype": "video", "shape": (96, 128, 3),
                               "names": ["height", "width", "channels"]},
}
y, x = np.mgrid[0:96, 0:128]
for r in range(rounds):
    rng = np.random.default_rng(r)
    ds = LeRobotDataset.create(repo_id=f"bench/r{r}", fps=30, features=features,
                               root=f"{out}/r{r:02d}", robot_type="aloha")
    for e in range(8):
        n = int(rng.integers(40, 81))
        for t in range(n):
            # Camera noise over a moving gradient: about the issue's 58 MB for 16 rounds.
            img = (np.stack([(x + 3 * t + 7 * e) % 256, (y + r * 11) % 256,
                             np.full_like(x, (t * 5) % 256)], axis=-1)
                   + rng.integers(0, 64, (96, 128, 3))).astype(np.uint8)
            ds.add_frame({"observation.state": rng.normal(size=14).astype(np.float32),
                          "action": rng.normal(size=14).astype(np.float32),
                          "observation.images.top": img,
                          "task": ["fold the towel", "pick the cup"][e % 2]})
        ds.save_episode()
    ds.finalize()
"#;

const AGGREGATE: &str = r#"
import sys, time, resource, json
t0 = time.perf_counter()
from lerobot.datasets.aggregate import aggregate_datasets
t1 = time.perf_counter()
rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out, inputs = sys.argv[1], sys.argv[2:]
from pathlib import Path
aggregate_datasets(repo_ids=[f"bench/{Path(p).name}" for p in inputs], aggr_repo_id="bench/all",
                   roots=[Path(p) for p in inputs], aggr_root=Path(out))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "merge_s": t2 - t1, "rss_import_mb": rss_import,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"#;

const COUNT: &str = r#"
import sys, json, glob, pyarrow.parquet as pq
root = sys.argv[1]
info = json.load(open(root + "/meta/info.json"))
rows = sum(pq.ParquetFile(f).metadata.num_rows for f in glob.glob(root + "/data/*/*.parquet"))
eps = sum(pq.ParquetFile(f).metadata.num_rows for f in glob.glob(root + "/meta/episodes/*/*.parquet"))
print(info["total_episodes"], info["total_frames"], eps, rows)
"#;

fn py(python: &str, code: &str, args: &[String]) -> String {
    let out = Command::new(python)
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

fn dir_mb(d: &Path) -> f64 {
    let mut total = 0u64;
    let mut stack = vec![d.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                total += e.metadata().unwrap().len();
            }
        }
    }
    total as f64 / 1e6
}

fn main() {
    // The child: one merge, its time and peak RSS as JSON.
    if let Ok(spec) = std::env::var("QUARRY_BENCH_CHILD") {
        let mut parts: Vec<PathBuf> = spec.split('\n').map(PathBuf::from).collect();
        let out = parts.remove(0);
        let o = MergeOptions {
            limit: u64::MAX,
            ..Default::default()
        };
        let t = Instant::now();
        let s = quarry_formats::merge(Format::Lerobot, &parts, &vec![0; parts.len()], &o, &out)
            .expect("quarry merge");
        println!(
            "{{\"merge_s\": {}, \"peak_rss_mb\": {}, \"episodes\": {}}}",
            t.elapsed().as_secs_f64(),
            peak_rss_mb(),
            s.samples
        );
        return;
    }
    let Ok(python) = std::env::var("QUARRY_LEROBOT_PYTHON") else {
        eprintln!(
            "set QUARRY_LEROBOT_PYTHON to a Python with lerobot and torch (e.g. /work/venv-lerobot/bin/python)"
        );
        std::process::exit(2);
    };
    let rounds: usize = std::env::var("QUARRY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let base =
        std::env::var("QUARRY_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), PathBuf::from);
    let tmp = tempfile::tempdir_in(base).unwrap();
    let inputs_dir = tmp.path().join("rounds");
    let t = Instant::now();
    py(
        &python,
        GEN,
        &[inputs_dir.display().to_string(), rounds.to_string()],
    );
    let inputs: Vec<PathBuf> = (0..rounds)
        .map(|r| inputs_dir.join(format!("r{r:02}")))
        .collect();
    println!(
        "lerobot wrote {rounds} rounds ({:.1} MB) in {:.1} s",
        dir_mb(&inputs_dir),
        t.elapsed().as_secs_f64()
    );

    let ours = tmp.path().join("quarry");
    let mut spec = vec![ours.display().to_string()];
    spec.extend(inputs.iter().map(|p| p.display().to_string()));
    let me = std::env::current_exe().unwrap();
    let out = Command::new(me)
        .env("QUARRY_BENCH_CHILD", spec.join("\n"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    let theirs = tmp.path().join("lerobot");
    let mut args = vec![theirs.display().to_string()];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    let l: serde_json::Value =
        serde_json::from_str(py(&python, AGGREGATE, &args).lines().last().unwrap()).unwrap();

    let a = py(&python, COUNT, &[ours.display().to_string()]);
    let b = py(&python, COUNT, &[theirs.display().to_string()]);
    assert_eq!(a, b, "both finals hold the same episodes and frames");
    println!(
        "both finals: total_episodes, total_frames, episode rows, frame rows = {}",
        a.trim()
    );
    let (qs, ls) = (
        q["merge_s"].as_f64().unwrap(),
        l["merge_s"].as_f64().unwrap(),
    );
    println!();
    println!("| merge of {rounds} rounds | time | peak RSS | output |");
    println!("|---|---|---|---|");
    println!(
        "| Quarry (`quarry_formats::merge`, bench profile) | {qs:.3} s | {:.1} MB | {:.1} MB |",
        q["peak_rss_mb"].as_f64().unwrap(),
        dir_mb(&ours)
    );
    println!(
        "| lerobot `aggregate_datasets` (import {:.1} s not counted) | {ls:.3} s | {:.0} MB ({:.0} MB after the import) | {:.1} MB |",
        l["import_s"].as_f64().unwrap(),
        l["peak_rss_mb"].as_f64().unwrap(),
        l["rss_import_mb"].as_f64().unwrap(),
        dir_mb(&theirs)
    );
    println!("| lerobot time / Quarry time | {:.1}x | | |", ls / qs);
}
