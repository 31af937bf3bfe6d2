//! Warm generators against one process per round: `cargo bench -p quarry-tests --bench
//! warm_bench`.
//!
//! Two generators, each run by `coordinator run` with one agent in process mode and in warm
//! mode, in the same bench run:
//!
//! 1. `tests/benches/cold_start_gen.py`: a cold start of `QUARRY_BENCH_COLD_MS` (default 2000)
//!    then `QUARRY_BENCH_WORK_MS` (default 200) of work per round, `QUARRY_BENCH_WARM_ROUNDS`
//!    rounds (default 20). Reported: rounds/s over the whole run, and the busy fraction: time
//!    inside rounds (the generator's own spans) over the wall time from the first round's
//!    start to the last one's end;
//! 2. the legacy stand-in `deploy/examples/grasp_gen.py` (batch 256, 200 iterations),
//!    `QUARRY_BENCH_GRASP_ROUNDS` rounds (default 40): rounds/s.
//!
//! The finals of both modes are compared byte for byte. See docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Measured {
    wall: Duration,
    rounds: u64,
    busy: Option<f64>,
    /// Milliseconds from one round's end to the next one's start, as the generator stamped
    /// them (the cold-start generator only); in process mode they hold the cold start.
    gaps: Vec<f64>,
    final_sha: String,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // Generators start as the `coordinator` and `worker` binaries start them: through a
    // launcher, without fork (quarry_worker::runner::launch).
    quarry_worker::runner::launch::launch_through(std::path::PathBuf::from(env!(
        "CARGO_BIN_EXE_quarry-launch"
    )));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cold = env_u64("QUARRY_BENCH_COLD_MS", 2000);
    let work = env_u64("QUARRY_BENCH_WORK_MS", 200);
    let rounds = env_u64("QUARRY_BENCH_WARM_ROUNDS", 20);
    let grasp_rounds = env_u64("QUARRY_BENCH_GRASP_ROUNDS", 40);
    println!("== Quarry warm-generator benchmark ({} CPUs) ==", cpus());
    let mut rows = Vec::new();
    for (label, generator, n) in [
        (
            format!("cold start {cold} ms + {work} ms/round"),
            Gen::Cold { cold, work },
            rounds,
        ),
        (
            "grasp_gen.py (legacy stand-in)".to_string(),
            Gen::Grasp,
            grasp_rounds,
        ),
    ] {
        let process = measure(&rt, &generator, n, false);
        let warm = measure(&rt, &generator, n, true);
        assert_eq!(
            process.final_sha, warm.final_sha,
            "{label}: warm finals differ from process mode"
        );
        rows.push((label, process, warm));
    }
    println!(
        "{:<40} {:>6} {:>12} {:>12} {:>7} {:>10} {:>10}",
        "generator", "rounds", "process r/s", "warm r/s", "ratio", "busy proc", "busy warm"
    );
    for (label, p, w) in rows {
        let rate = |m: &Measured| m.rounds as f64 / m.wall.as_secs_f64();
        let busy = |m: &Measured| m.busy.map_or("-".into(), |b| format!("{:.1} %", b * 100.0));
        println!(
            "{:<40} {:>6} {:>12.2} {:>12.2} {:>6.1}x {:>10} {:>10}",
            label,
            p.rounds,
            rate(&p),
            rate(&w),
            rate(&w) / rate(&p),
            busy(&p),
            busy(&w)
        );
        if !w.gaps.is_empty() {
            let mut g = w.gaps.clone();
            g.sort_by(f64::total_cmp);
            let at = |q: f64| g[((g.len() - 1) as f64 * q).ceil() as usize];
            println!(
                "  warm: GPU idle between rounds (one round's end to the next one's start, {} gaps): median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                g.len(),
                at(0.5),
                at(0.99),
                g[g.len() - 1]
            );
        }
    }
}

enum Gen {
    Cold { cold: u64, work: u64 },
    Grasp,
}

fn measure(rt: &tokio::runtime::Runtime, generator: &Gen, rounds: u64, warm: bool) -> Measured {
    let dir = tempfile::Builder::new()
        .prefix("quarry-warm-bench")
        .tempdir()
        .expect("tempdir");
    let spans = dir.path().join("spans.txt");
    let batch = match generator {
        Gen::Cold { .. } => 4,
        Gen::Grasp => 256,
    };
    let job = write_job(dir.path(), generator, rounds * batch, batch, warm, &spans);
    let job_s = job.to_str().expect("utf-8 temp path");
    let t = Instant::now();
    let outcome = rt
        .block_on(quarry_cli::run(
            quarry_tests::run_args(&["--job", job_s, "--gpu", "0", "--progress", "off"]),
            CancellationToken::new(),
            false,
        ))
        .expect("coordinator run");
    let wall = t.elapsed();
    assert_eq!(outcome.exit_code(), 0, "run did not finish: {outcome:?}");
    let fin = &quarry_tests::finals(dir.path(), "wbench", "obj")[0];
    let mut spans: Vec<(f64, f64)> = std::fs::read_to_string(&spans)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().map(|x| x.parse::<f64>().ok());
            Some((it.next()??, it.next()??))
        })
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let busy = (!spans.is_empty()).then(|| {
        let inside: f64 = spans.iter().map(|(a, b)| b - a).sum();
        let first = spans.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
        let last = spans.iter().map(|s| s.1).fold(0.0, f64::max);
        inside / (last - first)
    });
    let gaps = spans
        .windows(2)
        .map(|w| (w[1].0 - w[0].1) * 1000.0)
        .collect();
    Measured {
        wall,
        rounds,
        busy,
        gaps,
        final_sha: quarry_tests::sha256_file(fin),
    }
}

fn write_job(
    dir: &Path,
    generator: &Gen,
    quota: u64,
    batch: u64,
    warm: bool,
    spans: &Path,
) -> PathBuf {
    let q = |s: &str| serde_json::to_string(s).expect("json string");
    let repo = quarry_tests::repo_root();
    let (argv, cwd, output) = match generator {
        Gen::Cold { cold, work } => {
            let script = q(repo
                .join("tests/benches/cold_start_gen.py")
                .to_str()
                .expect("utf-8 path"));
            let round = if warm {
                String::new()
            } else {
                ", \"--seed\", \"{seed}\", \"--batch_size\", \"{batch_size}\", \"--output\", \"out/{name}/r.npy\"".into()
            };
            (
                format!(
                    "[\"python3\", {script}, \"--cold_ms\", \"{cold}\", \"--work_ms\", \"{work}\"{round}]"
                ),
                String::new(),
                "out/{name}/r.npy",
            )
        }
        Gen::Grasp => {
            let dest = dir.join("BimanGrasp-Optimization");
            std::fs::create_dir_all(&dest).expect("mkdir");
            std::fs::copy(quarry_tests::example_generator(), dest.join("main.py"))
                .expect("copy generator");
            let round = if warm {
                ""
            } else {
                ", \"--name\", \"{name}\", \"--object_code\", \"{object}\", \"--batch_size\", \"{batch_size}\", \"--seed\", \"{seed}\""
            };
            (
                format!(
                    "[\"python3\", \"main.py\", \"--num_iterations\", \"{{num_iterations}}\"{round}]"
                ),
                "BimanGrasp-Optimization".into(),
                "data/experiments/{name}/results/{object}.npy",
            )
        }
    };
    let mode = if warm { "mode = \"warm\"\n" } else { "" };
    let text = format!(
        "exp_name = \"wbench\"\nobjects = [\"obj\"]\ntarget_count_per_object = {quota}\n\
         round_batch_size = {batch}\nnum_iterations = 200\nseed_base = 1000\nroot = {root}\n\n\
         [generator]\n{mode}argv = {argv}\ncwd = {cwd}\noutput = {output}\n\
         round_dir = {round_dir}\n[generator.env]\nPYTHONPATH = {pythonpath}\nBENCH_SPANS = {spans}\n",
        root = q(dir.to_str().expect("utf-8 temp path")),
        cwd = q(&cwd),
        output = q(output),
        round_dir = q(output.rsplit_once('/').map_or("", |(d, _)| d)),
        pythonpath = q(repo.join("deploy/python").to_str().expect("utf-8 path")),
        spans = q(spans.to_str().expect("utf-8 path")),
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, text).expect("write job file");
    p
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
