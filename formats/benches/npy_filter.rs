//! Filtered merge throughput against an unfiltered merge of the same `.npy` rounds.
//!
//! `cargo bench -p quarry-formats --bench npy_filter`. Writes grasp-like object rounds with
//! numpy (`QUARRY_TEST_PYTHON`, default `python3`; `QUARRY_BENCH_ROUNDS` and
//! `QUARRY_BENCH_SIZE` set their number and size), then merges them unfiltered, with a
//! filter, and with a filter and de-duplication, printing MB/s of input read and samples/s.
#![allow(clippy::unwrap_used)] // a bench may unwrap

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use quarry_formats::{Filter, MergeOptions, npy};

const GEN: &str = r#"
import sys, numpy as np
out, rounds, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for r in range(rounds):
    rng = np.random.default_rng(r)
    scale = np.float32(0.1)
    items = []
    for i in range(size):
        q = rng.random(22).astype(np.float32)
        items.append({'qpos': {'j%d' % k: float(q[k]) for k in range(22)}, 'scale': scale,
                      'energy': np.float32(rng.random()), 'E_pen': np.float32(rng.random()),
                      'E_dis': np.float32(rng.random()), 'valid': True})
    a = np.empty(size, dtype=object)
    a[:] = items
    np.save('%s/r%d.npy' % (out, r), a, allow_pickle=True)
"#;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rounds = env_u64("QUARRY_BENCH_ROUNDS", 20);
    let size = env_u64("QUARRY_BENCH_SIZE", 5000);
    let py = std::env::var("QUARRY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(&py)
        .args(["-c", GEN, &dir.path().display().to_string()])
        .args([rounds.to_string(), size.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {py} ({e}); the bench needs Python with numpy"));
    assert!(status.success(), "{py} could not write the rounds");
    let inputs: Vec<PathBuf> = (0..rounds)
        .map(|r| dir.path().join(format!("r{r}.npy")))
        .collect();
    let counts = vec![size; rounds as usize];
    let bytes: u64 = inputs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let filter = Filter::parse("E_pen <= 0.3").unwrap();
    let cases = [
        ("unfiltered", None, vec![]),
        ("filter E_pen <= 0.3", Some(filter.clone()), vec![]),
        (
            "filter + dedup qpos",
            Some(filter),
            vec!["qpos".to_string()],
        ),
    ];
    println!(
        "{rounds} rounds x {size} grasps, {:.1} MB of input",
        bytes as f64 / 1e6
    );
    for (name, filter, dedup) in cases {
        let options = MergeOptions {
            limit: u64::MAX,
            filter,
            dedup,
            video_files_size_in_mb: None,
        };
        let mut best = f64::MAX;
        let mut summary = None;
        for run in 0..3 {
            let out = dir.path().join(format!("out-{run}.npy"));
            let _ = std::fs::remove_file(&out);
            let t = Instant::now();
            summary = Some(npy::merge_dataset(&inputs, &counts, &options, &out).unwrap());
            best = best.min(t.elapsed().as_secs_f64());
        }
        let s = summary.unwrap();
        println!(
            "{name:>22}: {:8.1} MB/s of input, {:10.0} samples/s in; kept {} ({} filtered, {} duplicates), {:.1} MB out",
            bytes as f64 / 1e6 / best,
            (rounds * size) as f64 / best,
            s.samples,
            s.filtered,
            s.duplicates,
            s.bytes_written as f64 / 1e6
        );
    }
}
