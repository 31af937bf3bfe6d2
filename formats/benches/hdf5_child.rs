//! What running libhdf5 in a child process costs per operation: `inspect` of one round (what
//! an agent does per round) and `merge` of 10 rounds (what the coordinator does per object),
//! in process and through `quarry-hdf5-child`, on the 3-demo robomimic round of
//! `tests/data/robomimic-3demos.hdf5` (30 KB). `QUARRY_BENCH_N` sets the repetitions
//! (default 200). Results: docs/benchmarks.md.
#![allow(clippy::unwrap_used)] // bench code may unwrap

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quarry_formats::MergeOptions;
use quarry_formats::hdf5::{self, child};

fn per_op(n: u32, mut f: impl FnMut(u32)) -> Duration {
    f(u32::MAX); // warm: the library loaded, the page cache filled
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed() / n
}

fn main() {
    let n: u32 = std::env::var("QUARRY_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let round = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/robomimic-3demos.hdf5");
    let iso = child::Isolation {
        program: PathBuf::from(env!("CARGO_BIN_EXE_quarry-hdf5-child")),
        limits: child::Limits::default(),
    };
    let dir = tempfile::tempdir().unwrap();
    let inputs: Vec<PathBuf> = (0..10).map(|_| round.clone()).collect();
    let counts = vec![3u64; 10];
    let options = MergeOptions {
        limit: 30,
        ..Default::default()
    };
    let out = |tag: &str, i: u32| dir.path().join(format!("{tag}{i}.hdf5"));

    let inspect_here = per_op(n, |_| {
        hdf5::inspect(&round, None).unwrap();
    });
    let inspect_child = per_op(n, |_| {
        iso.inspect(&round, None).unwrap();
    });
    let merges = (n / 4).max(1);
    let merge_here = per_op(merges, |i| {
        hdf5::merge(&inputs, &counts, &options, &out("here", i)).unwrap();
    });
    let merge_child = per_op(merges, |i| {
        iso.merge(&inputs, &counts, &options, &out("child", i))
            .unwrap();
    });
    println!("hdf5 in a child process, per operation ({n} inspects, {merges} merges):");
    println!(
        "  inspect 1 round     in process {:>8.2?}   child {:>8.2?}   added {:>8.2?}",
        inspect_here,
        inspect_child,
        inspect_child.saturating_sub(inspect_here)
    );
    println!(
        "  merge 10 rounds     in process {:>8.2?}   child {:>8.2?}   added {:>8.2?}",
        merge_here,
        merge_child,
        merge_child.saturating_sub(merge_here)
    );
}
