//! Zarr merge by chunk copy against a plain file copy of the same chunk files.
//!
//! zarr-python with imagecodecs writes `QUARRY_BENCH_ZARR_ROUNDS` (32) Diffusion-Policy-style
//! rounds of `QUARRY_BENCH_ZARR_FRAMES` (200) steps: 96×96×3 camera images in `Jpeg2k`,
//! depth in `Qoi`, one chunk per step, low-dim arrays uncompressed. Timed: Quarry's merge of
//! all of them (every image chunk copied, never decoded) against `std::fs::copy` of every
//! chunk file of the rounds into one directory under the final's chunk names, to the same
//! disk, alternating which goes first, best of 3. Prints both and the ratio.
//!
//! `cargo bench -p quarry-formats --bench zarr_copy` (needs `QUARRY_TEST_PYTHON` with numpy,
//! zarr 3 and imagecodecs).
#![allow(clippy::unwrap_used)] // a bench may unwrap

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use quarry_formats::{Format, MergeOptions};

const GEN: &str = r#"
import sys, numpy as np, zarr
from imagecodecs.numcodecs import register_codecs, Jpeg2k, Qoi
register_codecs()
out, rounds, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
# A smooth scene with noise, so Jpeg2k and Qoi sizes look like camera frames.
yy, xx = np.mgrid[0:96, 0:96]
for r in range(rounds):
    g = zarr.open_group("%s/r%03d.zarr" % (out, r), mode="w", zarr_format=2)
    t = np.arange(frames)[:, None, None]
    base = ((xx[None] + yy[None] + 3 * t + 17 * r) % 256).astype(np.uint8)
    img = np.stack([base, base[:, ::-1], base.transpose(0, 2, 1)], axis=-1)
    img = (img + rng.integers(0, 12, img.shape)).astype(np.uint8)
    g.create_array("data/camera0_rgb", shape=img.shape, chunks=(1, 96, 96, 3), dtype=np.uint8,
                   compressors=Jpeg2k(level=50))[...] = img
    g.create_array("data/camera0_depth", shape=img.shape, chunks=(1, 96, 96, 3),
                   dtype=np.uint8, compressors=Qoi())[...] = img[..., ::-1]
    pos = rng.standard_normal((frames, 7)).astype(np.float32)
    g.create_array("data/action", shape=pos.shape, chunks=pos.shape, dtype=np.float32,
                   compressors=None)[...] = pos
    ends = np.arange(20, frames + 1, 20, dtype=np.int64)
    g.create_array("meta/episode_ends", shape=ends.shape, chunks=ends.shape, dtype=np.int64,
                   compressors=None)[...] = ends
"#;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every chunk file of a store's image arrays, as (array, step, path).
fn chunk_files(store: &Path) -> Vec<(String, u64, PathBuf)> {
    let mut out = Vec::new();
    for array in ["camera0_rgb", "camera0_depth"] {
        let dir = store.join("data").join(array);
        for e in std::fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if let Some(step) = name.strip_suffix(".0.0.0") {
                out.push((array.to_string(), step.parse().unwrap(), dir.join(&name)));
            }
        }
    }
    out
}

fn copy_all(inputs: &[PathBuf], out: &Path) -> u64 {
    let mut bytes = 0;
    for array in ["camera0_rgb", "camera0_depth"] {
        std::fs::create_dir_all(out.join(array)).unwrap();
    }
    let mut offset = 0;
    for input in inputs {
        // In step order, as the merge goes.
        let mut files = chunk_files(input);
        files.sort();
        let steps = files.iter().map(|f| f.1 + 1).max().unwrap_or(0);
        for (array, step, path) in files {
            let to = out.join(&array).join(format!("{}.0.0.0", offset + step));
            bytes += std::fs::copy(path, to).unwrap();
        }
        offset += steps;
    }
    bytes
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds = env("QUARRY_BENCH_ZARR_ROUNDS", 32);
    let frames = env("QUARRY_BENCH_ZARR_FRAMES", 200);
    let py = std::env::var("QUARRY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let status = Command::new(&py)
        .args(["-c", GEN, &dir.path().display().to_string()])
        .args([rounds.to_string(), frames.to_string()])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{py} could not write the rounds (numpy, zarr, imagecodecs?)"
    );
    eprintln!(
        "wrote {rounds} rounds x {frames} steps in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut inputs: Vec<PathBuf> = (0..rounds)
        .map(|r| dir.path().join(format!("r{r:03}.zarr")))
        .collect();
    inputs.sort();
    let counts: Vec<u64> = inputs
        .iter()
        .map(|p| {
            quarry_formats::inspect(Format::Zarr, p, None)
                .unwrap()
                .count
        })
        .collect();
    let options = MergeOptions {
        limit: u64::MAX,
        filter: None,
        dedup: vec![],
        video_files_size_in_mb: None,
    };
    let chunk_bytes: u64 = inputs
        .iter()
        .flat_map(|p| chunk_files(p))
        .map(|f| std::fs::metadata(f.2).unwrap().len())
        .sum();
    let (mut merge_best, mut copy_best) = (f64::MAX, f64::MAX);
    let mut merged = 0;
    for run in 0..4 {
        let out = dir.path().join("final.zarr");
        let copy = dir.path().join("copy");
        let mut time_merge = || {
            let t = Instant::now();
            let s = quarry_formats::merge(Format::Zarr, &inputs, &counts, &options, &out).unwrap();
            let secs = t.elapsed().as_secs_f64();
            merged = s.bytes_written;
            secs
        };
        let time_copy = || {
            let t = Instant::now();
            let n = copy_all(&inputs, &copy);
            assert_eq!(n, chunk_bytes);
            t.elapsed().as_secs_f64()
        };
        let (m, c) = if run % 2 == 0 {
            let m = time_merge();
            (m, time_copy())
        } else {
            let c = time_copy();
            (time_merge(), c)
        };
        // Run 0 warms up (and checks: every image chunk is in the final, byte for byte).
        if run == 0 {
            assert_eq!(
                chunk_files(&out).len(),
                inputs.iter().map(|p| chunk_files(p).len()).sum::<usize>()
            );
        } else {
            merge_best = merge_best.min(m);
            copy_best = copy_best.min(c);
        }
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_dir_all(&copy).unwrap();
    }
    let mb = chunk_bytes as f64 / 1e6;
    println!(
        "zarr chunk copy: {rounds} rounds x {frames} steps, {} chunk files, {mb:.1} MB of image chunks ({:.1} MB written by the merge)",
        inputs.iter().map(|p| chunk_files(p).len()).sum::<usize>(),
        merged as f64 / 1e6
    );
    println!(
        "| Quarry merge (chunks copied) | {:.0} MB/s ({:.3} s) | plain copy of the chunk files | {:.0} MB/s ({:.3} s) | merge time / copy time {:.2} |",
        mb / merge_best,
        merge_best,
        mb / copy_best,
        copy_best,
        merge_best / copy_best
    );
}
