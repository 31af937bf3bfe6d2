//! Quarry's benchmark: `cargo bench -p quarry-tests --bench quarry_bench`.
//!
//! Every figure is a ratio against a baseline (or a physical quantity) measured in the same run:
//!
//! 1. per-round dispatch overhead of `coordinator run` vs spawning the generator in a loop;
//! 2. numeric `.npy` merge throughput vs `std::io::copy` of the same bytes;
//! 3. object-array (pickle) merge vs numpy's `concatenate` + `np.save`;
//! 4. peak memory (VmHWM) of a child process merging 2 GiB (and the object arrays);
//! 5. the worker's idle gap between rounds (one generator's exit to the next one's start)
//!    with prefetch of the next lease vs without;
//! 6. a job on real `coordinator serve` + `worker` processes whose OTLP exporter points at a
//!    closed port vs the same job without an exporter (time, and warnings logged about it).
//!
//! See docs/benchmarks.md. Environment: `QUARRY_BENCH_DIR` (where the 2 GiB of inputs go,
//! default the system temp dir), `QUARRY_TEST_PYTHON` (interpreter with numpy, default python3),
//! `QUARRY_BENCH_ROUNDS` (rounds of figure 1, default 300), `QUARRY_BENCH_GAP_ROUNDS` (rounds
//! per run of figure 5, default 40), `QUARRY_BENCH_TRACE_ROUNDS` (rounds per run of figure 6,
//! default 300), `QUARRY_BENCH_ONLY` (figures to run, e.g. `1,3`; figure 4 is measured with 2
//! and 3). Figure 6 runs the built `coordinator` and `worker` binaries of the bench's profile.
//!
//! Hidden mode: `quarry_bench --child-merge <limit> <out> (<count> <input>)...` merges the
//! inputs into `out` and prints `VmHWM_KB=<n>`; the bench re-executes itself with it.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quarry_formats::npy;
use tokio_util::sync::CancellationToken;

const GEN: &str = env!("CARGO_BIN_EXE_quarry-zero-gen");
const MIB: u64 = 1 << 20;

/// Figure 2/4: 16 files of 128 MiB of `<f4` rows of 64 values.
const NUM_FILES: usize = 16;
const FILE_BYTES: u64 = 128 * MIB;
const ROW_BYTES: u64 = 64 * 4;
/// Figure 3: rounds of the grasp generator's object arrays.
const OBJ_ROUNDS: usize = 20;
const OBJ_BATCH: u64 = 5000;
/// Figure 1 batch size (the zero generator writes B rows of 16 bytes).
const DISPATCH_BATCH: u64 = 16;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child-merge") {
        child_merge(&args[2..]);
        return;
    }
    if args.iter().any(|a| a == "--list") {
        // `cargo bench -- --list` and test harness probes: nothing to list.
        return;
    }
    // Generators start as the `coordinator` and `worker` binaries start them: through a
    // launcher, without fork (quarry_worker::runner::launch).
    quarry_worker::runner::launch::launch_through(std::path::PathBuf::from(env!(
        "CARGO_BIN_EXE_quarry-launch"
    )));
    let started = Instant::now();
    let mut table = Table::default();

    println!("== Quarry benchmark ==");
    println!("generator: {GEN}");
    println!("cpus: {}", cpus());

    // QUARRY_BENCH_ONLY=1,3 runs a subset (figure 4 goes with 2 and 3).
    let only: Option<Vec<String>> = std::env::var("QUARRY_BENCH_ONLY")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let wanted = |f: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == f));
    if wanted("1") {
        dispatch(&mut table);
    }
    if wanted("2") {
        let scratch_base = std::env::var_os("QUARRY_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        numeric(&mut table, &scratch_base);
    }
    if wanted("3") {
        object(&mut table);
    }
    if wanted("5") {
        idle_gap(&mut table);
    }
    if wanted("6") {
        dead_exporter(&mut table);
    }

    println!();
    println!(
        "== Results ({:.0} s in all) ==",
        started.elapsed().as_secs_f64()
    );
    println!();
    print!("{}", table.render());
}

// ---------------------------------------------------------------------------------------------
// Figure 1: per-round dispatch overhead.

fn dispatch(table: &mut Table) {
    let n: u64 = std::env::var("QUARRY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    println!();
    println!("-- 1. per-round dispatch overhead: {n} rounds of a zero-work generator --");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    // Baseline: the same binary, the same kind of argv, N times one after another.
    let spawn_dir = tempdir("quarry-bench-spawn");
    let t = Instant::now();
    for r in 0..n {
        let seed = 1000 + r;
        let name = format!("bench__obj__r{r}_s{seed}");
        let st = Command::new(GEN)
            .args(["--out", &format!("out/{name}/r.npy")])
            .args(["--batch_size", &DISPATCH_BATCH.to_string()])
            .args(["--seed", &seed.to_string()])
            .current_dir(spawn_dir.path())
            .status()
            .expect("spawn quarry-zero-gen");
        assert!(st.success(), "quarry-zero-gen failed: {st}");
    }
    let t_spawn = t.elapsed();
    drop(spawn_dir);
    let spawn_ms = ms(t_spawn) / n as f64;
    println!(
        "spawn loop:        {:8.1} ms total, {spawn_ms:6.2} ms/round",
        ms(t_spawn)
    );

    // A short run first: with it, the long run's time splits into a fixed part (start,
    // final merge, stop) and a marginal cost per round.
    let n0 = (n / 10).clamp(5, 20);
    let t_short = quarry_run(&rt, n0, "--gpu=0");
    for (label, gpus) in [("1 agent", "--gpu=0"), ("2 agents", "--gpus=0,1")] {
        let t_run = quarry_run(&rt, n, gpus);
        let per = ms(t_run) / n as f64;
        let over = (ms(t_run) - ms(t_spawn)) / n as f64;
        println!(
            "coordinator run ({label}): {:8.1} ms total, {per:6.2} ms/round, overhead beyond spawn {over:+.2} ms/round",
            ms(t_run)
        );
        let primary = label == "1 agent";
        if primary {
            let marginal = (ms(t_run) - ms(t_short)) / (n - n0) as f64;
            let fixed = ms(t_short) - marginal * n0 as f64;
            println!(
                "  ({n0}-round run: {:.1} ms; marginal cost {marginal:.2} ms/round, fixed cost (start, merge, stop) about {fixed:.0} ms)",
                ms(t_short)
            );
        }
        table.row(Row {
            figure: format!("dispatch per round, {label}"),
            quarry: format!("{per:.2} ms/round"),
            baseline: format!("{spawn_ms:.2} ms/round (spawn+wait)"),
            ratio: format!("{:.1}x", per / spawn_ms),
            measured: format!("{over:+.2} ms/round"),
            target: if primary {
                "overhead < 5 ms/round".into()
            } else {
                "(information)".into()
            },
            pass: if primary { Some(over < 5.0) } else { None },
        });
    }
}

/// One `coordinator run` of `n` rounds of the zero generator in a fresh root; checks the final.
fn quarry_run(rt: &tokio::runtime::Runtime, n: u64, gpus: &str) -> Duration {
    let dir = tempdir("quarry-bench-run");
    let job = write_job(dir.path(), n);
    let job_s = job.to_str().expect("utf-8 temp path");
    let t = Instant::now();
    let outcome = rt
        .block_on(quarry_cli::run(
            quarry_tests::run_args(&["--job", job_s, gpus, "--progress", "off"]),
            CancellationToken::new(),
            false,
        ))
        .expect("coordinator run");
    let elapsed = t.elapsed();
    assert_eq!(outcome.exit_code(), 0, "run did not finish: {outcome:?}");
    let fin = &quarry_tests::finals(dir.path(), "bench", "obj")[0];
    let count = npy::inspect_path(fin).expect("final is valid").count;
    assert_eq!(count, n * DISPATCH_BATCH, "final holds the quota");
    elapsed
}

fn write_job(dir: &Path, n: u64) -> PathBuf {
    let q = |s: &str| serde_json::to_string(s).expect("json string");
    let root = dir.to_str().expect("utf-8 temp path");
    let text = format!(
        "exp_name = \"bench\"\n\
         objects = [\"obj\"]\n\
         target_count_per_object = {quota}\n\
         round_batch_size = {DISPATCH_BATCH}\n\
         num_iterations = 1\n\
         seed_base = 1000\n\
         root = {root}\n\
         \n\
         [generator]\n\
         argv = [{gen}, \"--out\", \"out/{{name}}/r.npy\", \"--batch_size\", \"{{batch_size}}\", \"--seed\", \"{{seed}}\"]\n\
         output = \"out/{{name}}/r.npy\"\n\
         round_dir = \"out/{{name}}\"\n",
        quota = n * DISPATCH_BATCH,
        root = q(root),
        gen = q(GEN),
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, text).expect("write job file");
    p
}

// ---------------------------------------------------------------------------------------------
// Figure 6: an OTLP exporter pointed at a closed port costs the job nothing.

/// The warning each process logs (once) when its exporter cannot reach the collector.
const EXPORT_WARNING: &str = "cannot export traces";

fn dead_exporter(table: &mut Table) {
    let n: u64 = std::env::var("QUARRY_BENCH_TRACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
        .max(5);
    println!();
    println!(
        "-- 6. OTLP exporter at a closed port vs none: {n} rounds, coordinator serve + 1 worker (processes) --"
    );
    // A port that was just free: nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("local addr")
    };
    let endpoint = format!("http://{closed}");
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut warnings_max = 0;
    // Alternating, three each, so neither mode always runs on a colder or warmer machine.
    for rep in 0..6 {
        let exporter = rep % 2 == 1;
        let (t, warnings) = served_run(n, exporter.then_some(endpoint.as_str()));
        println!(
            "exporter {:<6}: {n} rounds in {:.2} s; export warnings per process {warnings:?}",
            if exporter { "closed" } else { "none" },
            t.as_secs_f64()
        );
        if exporter {
            warnings_max = warnings_max.max(warnings.into_iter().max().unwrap_or(0));
            on.push(ms(t));
        } else {
            off.push(ms(t));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |v: &[f64]| v.last().copied().unwrap_or(0.0) - v.first().copied().unwrap_or(0.0);
    let (m_on, m_off) = (median(&mut on), median(&mut off));
    // Noise: the larger spread of either mode's runs.
    let noise = spread(&on).max(spread(&off));
    let diff = m_on - m_off;
    table.row(Row {
        figure: "job with OTLP exporter at a closed port".into(),
        quarry: format!("{:.2} s ({n} rounds)", m_on / 1000.0),
        baseline: format!("{:.2} s (no exporter)", m_off / 1000.0),
        ratio: format!("{:.2}x", m_on / m_off.max(1e-3)),
        measured: format!("{diff:+.0} ms (noise {noise:.0} ms); {warnings_max} warning(s)/process"),
        target: "within noise; <= 1 warning".into(),
        pass: Some(diff <= noise.max(0.05 * m_off) && warnings_max <= 1),
    });
}

/// One job of `n` zero-generator rounds on `coordinator serve` and one `worker` process,
/// exporting to `endpoint` when given; returns the time from submit to the job's end (its final
/// manifest) and, per
/// process, how many export warnings it logged (after a SIGTERM, so shutdown is counted).
fn served_run(n: u64, endpoint: Option<&str>) -> (Duration, Vec<usize>) {
    use quarry_tests::cluster::{spawn_worker_args, start_serve_with, submit};
    let dir = tempdir("quarry-bench-trace");
    let job = write_job(dir.path(), n);
    let state = format!("file://{}", dir.path().join("state.redb").display());
    let store = format!("file://{}", dir.path().join("store").display());
    let env: Vec<(&str, String)> = endpoint
        .map(|e| vec![("OTEL_EXPORTER_OTLP_ENDPOINT", e.to_string())])
        .unwrap_or_default();
    let serve_log = dir.path().join("serve.log");
    let worker_log = dir.path().join("worker.log");
    let (mut serve, addr) = start_serve_with(
        &["--state", &state, "--store", &store, "--lease-ttl", "10"],
        &env,
        &serve_log,
    );
    let mut worker = spawn_worker_args(
        &["--gpu", "0", "--coordinator", &addr],
        &env,
        Some(&worker_log),
    );
    let unix_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let started = unix_ms();
    let out = submit(&job, &addr, true);
    assert!(
        out.status.success(),
        "job failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The job's end as the coordinator saw it: its last manifest write (state done). The
    // watch's end would add its polling (every 200 ms) to the figure.
    let manifest = std::fs::read_to_string(dir.path().join("store/bench/manifest.json"))
        .expect("manifest in the store");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).expect("manifest JSON");
    assert_eq!(manifest["state"], "done", "{manifest}");
    let ended = manifest["updated_unix_ms"]
        .as_u64()
        .expect("updated_unix_ms");
    let elapsed = Duration::from_millis(ended.saturating_sub(started));
    for child in [&mut worker.0, &mut serve.0] {
        // SAFETY: kill(2) on the pid of a child this process owns and has not reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < until, "process did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The coordinator's log is copied by a thread that sees the end of its stderr just after.
    std::thread::sleep(Duration::from_millis(200));
    let warnings = [&serve_log, &worker_log]
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .matches(EXPORT_WARNING)
                .count()
        })
        .collect();
    (elapsed, warnings)
}

// ---------------------------------------------------------------------------------------------
// Figure 5: the worker's idle gap between rounds, with and without prefetch.

/// Rows of `quarry-zero-gen` per round: 16 bytes each, so 32 MiB outputs, whose inspection,
/// sha256 and upload are what prefetch overlaps with the next run.
const GAP_BATCH: u64 = 2 << 20;
/// Simulated GPU work per round.
const GAP_WORK_MS: u64 = 100;

fn idle_gap(table: &mut Table) {
    let n: u64 = std::env::var("QUARRY_BENCH_GAP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
        .max(3);
    println!();
    println!(
        "-- 5. worker idle gap between rounds: {n} rounds of {GAP_WORK_MS} ms, {} MiB outputs, one agent --",
        GAP_BATCH * 16 / MIB
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut with = Vec::new();
    let mut without = Vec::new();
    // Alternating, twice each, so neither mode always runs on a colder or warmer machine.
    for rep in 0..4 {
        let prefetch = rep % 2 == 1;
        let (gaps, wall) = rt.block_on(gap_run(n, prefetch));
        let s = GapStats::of(&gaps);
        println!(
            "prefetch {:<3}: {n} rounds in {:.2} s; gap mean {:.1} ms, median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
            if prefetch { "on" } else { "off" },
            wall.as_secs_f64(),
            s.mean,
            s.median,
            s.p90,
            s.p99
        );
        if prefetch {
            with.extend(gaps);
        } else {
            without.extend(gaps);
        }
    }
    let w = GapStats::of(&with);
    let wo = GapStats::of(&without);
    let ratio = wo.mean / w.mean.max(1e-3);
    println!(
        "idle gap between rounds: prefetch {:.1} ms mean ({:.1} median), without {:.1} ms mean ({:.1} median): {ratio:.1}x shorter",
        w.mean, w.median, wo.mean, wo.median
    );
    table.row(Row {
        figure: "worker idle gap between rounds (prefetch)".into(),
        quarry: format!("{:.1} ms/round", w.mean),
        baseline: format!("{:.1} ms/round (no prefetch)", wo.mean),
        ratio: format!("{ratio:.1}x shorter"),
        measured: format!(
            "median {:.1} vs {:.1} ms, p99 {:.1} ms",
            w.median, wo.median, w.p99
        ),
        target: "gap with prefetch < without".into(),
        pass: Some(w.mean < wo.mean),
    });
}

struct GapStats {
    mean: f64,
    median: f64,
    p90: f64,
    p99: f64,
}

impl GapStats {
    fn of(gaps: &[f64]) -> GapStats {
        let mut g = gaps.to_vec();
        g.sort_by(f64::total_cmp);
        let at = |q: f64| g[((g.len() - 1) as f64 * q).round() as usize];
        GapStats {
            mean: g.iter().sum::<f64>() / g.len() as f64,
            median: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        }
    }
}

/// One job of `n` rounds on one in-process agent against an in-process coordinator (real gRPC
/// on loopback); returns the gaps in ms between one generator's end and the next one's start,
/// as the generators stamped them, and the job's wall time.
async fn gap_run(n: u64, prefetch: bool) -> (Vec<f64>, Duration) {
    use quarry_coordinator::coordinator::{Coordinator, CoordinatorConfig};
    use quarry_coordinator::state::embedded::EmbeddedStore;
    use std::sync::Arc;

    let dir = tempdir("quarry-bench-gap");
    let root = dir.path();
    let stamps = root.join("stamps");
    let q = |s: &str| serde_json::to_string(s).expect("json string");
    let text = format!(
        "exp_name = \"gap\"\nobjects = [\"obj\"]\ntarget_count_per_object = {quota}\n\
         round_batch_size = {GAP_BATCH}\nnum_iterations = 1\nseed_base = 1\nroot = {root}\n\n\
         [generator]\nargv = [{gen}, \"--out\", \"out/{{name}}/r.npy\", \"--batch_size\", \"{{batch_size}}\",\
         \"--seed\", \"{{seed}}\", \"--sleep_ms\", \"{GAP_WORK_MS}\", \"--stamp\", {stamps}]\n\
         output = \"out/{{name}}/r.npy\"\nround_dir = \"out/{{name}}\"\n",
        quota = n * GAP_BATCH,
        root = q(&path_str(root)),
        gen = q(GEN),
        stamps = q(&path_str(&stamps)),
    );
    let job = root.join("job.toml");
    std::fs::write(&job, text).expect("write job");
    let spec = quarry_cli::read_job_file(&job).expect("job file");
    let store_dir = root.join("store");
    std::fs::create_dir_all(&store_dir).expect("mkdir store");
    let state = EmbeddedStore::open(&root.join("state.redb")).expect("state");
    let store = quarry_common::storage::Store::open_dir(&store_dir).expect("store");
    let shutdown = CancellationToken::new();
    let coord = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(state),
        store,
        shutdown.clone(),
    )
    .await
    .expect("coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let server = tokio::spawn(quarry_coordinator::service::serve(
        quarry_coordinator::service::Leadership::leading(Arc::clone(&coord)),
        listener,
        quarry_common::transport::ServerSecurity::default(),
        shutdown.clone(),
    ));
    let mut cfg = quarry_worker::AgentConfig::new(addr, "0");
    cfg.inventory = Some(Arc::new(quarry_worker::gpu::NoInventory {
        reason: "benchmark".into(),
    }));
    cfg.prefetch = prefetch;
    cfg.min_scratch_mib = 0;
    let stop = quarry_worker::Shutdown::new();
    let agents = tokio::spawn(quarry_worker::run_gpus(
        cfg,
        vec![quarry_worker::gpu::GpuInfo::unlisted("0")],
        stop.clone(),
    ));
    let t = Instant::now();
    coord.submit(spec).await.expect("submit");
    while !coord.job_ended("gap") {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "gap run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall = t.elapsed();
    stop.stop.cancel();
    let _ = agents.await;
    shutdown.cancel();
    let _ = server.await;
    coord.close().await;

    let mut runs: Vec<(u128, u128)> = std::fs::read_to_string(&stamps)
        .expect("stamps")
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().map(|v| v.parse::<u128>().ok());
            Some((it.next()??, it.next()??))
        })
        .collect();
    runs.sort();
    assert!(runs.len() as u64 >= n, "{} runs for {n} rounds", runs.len());
    let gaps = runs
        .windows(2)
        .map(|w| (w[1].0.saturating_sub(w[0].1)) as f64 / 1e6)
        .collect();
    (gaps, wall)
}

// ---------------------------------------------------------------------------------------------
// Figures 2 and 4 (numeric): merge throughput vs copy, and the merging process's peak memory.

fn numeric(table: &mut Table, base: &Path) {
    let rows = FILE_BYTES / ROW_BYTES;
    let total_rows = rows * NUM_FILES as u64;
    let limit = total_rows - rows / 2;
    let data_bytes = FILE_BYTES * NUM_FILES as u64;
    println!();
    println!(
        "-- 2. numeric merge vs copy: {NUM_FILES} x {} MiB <f4 (k, 64) in {} --",
        FILE_BYTES / MIB,
        base.display()
    );
    // Inputs, one output at a time, and slack.
    let need = data_bytes * 2 + 256 * MIB;
    match free_bytes(base) {
        Some(free) if free < need => {
            let msg = format!(
                "insufficient space in {}: {} MiB free, {} MiB needed; set QUARRY_BENCH_DIR",
                base.display(),
                free / MIB,
                need / MIB
            );
            println!("SKIPPED: {msg}");
            for f in ["numeric merge vs copy", "peak memory, numeric 2 GiB merge"] {
                table.skip(f, &msg);
            }
            return;
        }
        Some(free) => println!("free space: {} MiB (need {} MiB)", free / MIB, need / MIB),
        None => println!("free space: unknown (df failed); need {} MiB", need / MIB),
    }

    let dir = tempdir_in(base, "quarry-bench-numeric");
    let t = Instant::now();
    let inputs: Vec<PathBuf> = (0..NUM_FILES)
        .map(|i| {
            let p = dir.path().join(format!("in{i:02}.npy"));
            write_numeric(&p, rows, i).expect("write input");
            p
        })
        .collect();
    let counts = vec![rows; NUM_FILES];
    println!(
        "wrote {} MiB of inputs in {:.1} s",
        data_bytes / MIB,
        t.elapsed().as_secs_f64()
    );
    let out = dir.path().join("out.npy");

    let run_merge = || {
        let t = Instant::now();
        let f = File::create(&out).expect("create output");
        let s = npy::merge(&counts, limit, |i| File::open(&inputs[i]), f).expect("merge");
        let dt = t.elapsed();
        assert_eq!(s.samples, limit);
        std::fs::remove_file(&out).expect("remove output");
        (dt, s.bytes_written)
    };
    let run_copy = || {
        let t = Instant::now();
        let mut o = File::create(&out).expect("create output");
        let mut n = 0;
        for p in &inputs {
            let mut f = File::open(p).expect("open input");
            n += io::copy(&mut f, &mut o).expect("copy");
        }
        drop(o);
        let dt = t.elapsed();
        std::fs::remove_file(&out).expect("remove output");
        (dt, n)
    };

    // Warm-up (untimed): checks the merged output, and takes the first-writer effects of a
    // fresh 2 GiB page-cache footprint out of the timed runs.
    {
        let f = File::create(&out).expect("create output");
        let s = npy::merge(&counts, limit, |i| File::open(&inputs[i]), f).expect("merge");
        let ins = npy::inspect_path(&out).expect("merged output is valid");
        assert_eq!(ins.count, limit, "merged output holds the limit");
        assert_eq!(
            std::fs::metadata(&out).expect("stat").len(),
            s.bytes_written
        );
        std::fs::remove_file(&out).expect("remove output");
        run_copy();
    }

    let mut best_merge = Duration::MAX;
    let mut best_copy = Duration::MAX;
    let mut merge_bytes = 0;
    let mut copy_bytes = 0;
    for rep in 0..3 {
        // Alternate which goes first, so neither always follows the other's writeback.
        let (m, c) = if rep % 2 == 0 {
            let m = run_merge();
            (m, run_copy())
        } else {
            let c = run_copy();
            (run_merge(), c)
        };
        merge_bytes = m.1;
        copy_bytes = c.1;
        best_merge = best_merge.min(m.0);
        best_copy = best_copy.min(c.0);
        println!(
            "rep {rep}: merge {:.2} GB/s, copy {:.2} GB/s",
            gbps(m.1, m.0),
            gbps(c.1, c.0)
        );
    }
    let m = gbps(merge_bytes, best_merge);
    let c = gbps(copy_bytes, best_copy);
    println!(
        "best of 3: merge {m:.2} GB/s ({} MiB in {:.0} ms), io::copy {c:.2} GB/s ({} MiB in {:.0} ms), ratio {:.2}",
        merge_bytes / MIB,
        ms(best_merge),
        copy_bytes / MIB,
        ms(best_copy),
        m / c
    );
    table.row(Row {
        figure: "numeric merge vs copy (2 GiB)".into(),
        quarry: format!("{m:.2} GB/s"),
        baseline: format!("{c:.2} GB/s (io::copy)"),
        ratio: format!("{:.2}x", m / c),
        measured: format!("{:.2}x", m / c),
        target: ">= 0.5x copy".into(),
        pass: Some(m / c >= 0.5),
    });

    println!();
    println!("-- 4a. peak memory of a child process merging the 2 GiB --");
    let hwm = child_hwm(limit, &out, &counts, &inputs);
    std::fs::remove_file(&out).ok();
    memory_row(table, "peak memory, numeric 2 GiB merge", hwm, data_bytes);
    drop(dir);
}

fn write_numeric(p: &Path, rows: u64, file: usize) -> io::Result<()> {
    let mut f = io::BufWriter::with_capacity(8 * MIB as usize, File::create(p)?);
    f.write_all(&npy_header("<f4", &format!("({rows}, 64)")))?;
    let chunk_rows = (4 * MIB / ROW_BYTES) as usize;
    let mut buf = Vec::with_capacity(chunk_rows * ROW_BYTES as usize);
    let mut row = 0u64;
    while row < rows {
        buf.clear();
        let take = (rows - row).min(chunk_rows as u64);
        for r in row..row + take {
            let v = (file as u64 * rows + r) as f32;
            for j in 0..64u32 {
                buf.extend_from_slice(&(v + j as f32 * 0.5).to_le_bytes());
            }
        }
        f.write_all(&buf)?;
        row += take;
    }
    // Durable before timing starts, so no writeback of the inputs competes with the runs.
    f.into_inner()
        .map_err(io::IntoInnerError::into_error)?
        .sync_all()
}

fn npy_header(descr: &str, shape: &str) -> Vec<u8> {
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let pad = (64 - (10 + dict.len() + 1) % 64) % 64;
    let hlen = dict.len() + pad + 1;
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend_from_slice(&(hlen as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h.extend(std::iter::repeat_n(b' ', pad));
    h.push(b'\n');
    h
}

// ---------------------------------------------------------------------------------------------
// Figures 3 and 4 (object arrays): pickle merge vs numpy, and peak memory.

const NUMPY_SNIPPET: &str = r#"
import sys, time, resource
try:
    import numpy as np
except ImportError as e:
    sys.exit("numpy is not installed for %s: %s" % (sys.executable, e))
limit = int(sys.argv[1]); out = sys.argv[2]; qout = sys.argv[3]; rounds = sys.argv[4:]
best = None
arr = None
for _ in range(3):
    arr = None
    t = time.perf_counter()
    arr = np.concatenate([np.load(p, allow_pickle=True) for p in rounds])[:limit]
    np.save(out, arr, allow_pickle=True)
    dt = time.perf_counter() - t
    best = dt if best is None else min(best, dt)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
q = np.load(qout, allow_pickle=True)
same = len(q) == limit and q.dtype == arr.dtype and q.tolist() == arr.tolist()
print("numpy_version=%s" % np.__version__)
print("numpy_best_s=%.6f" % best)
print("numpy_maxrss_kb=%d" % rss)
print("same=%d" % int(same))
"#;

fn object(table: &mut Table) {
    println!();
    println!("-- 3. object-array merge vs numpy: {OBJ_ROUNDS} rounds x {OBJ_BATCH} grasp dicts --");
    let py = quarry_tests::python();
    let probe = Command::new(&py)
        .args(["-c", "import numpy; print(numpy.__version__)"])
        .output();
    match probe {
        Ok(o) if o.status.success() => println!(
            "python: {py}, numpy {}",
            String::from_utf8_lossy(&o.stdout).trim()
        ),
        Ok(o) => panic!(
            "numpy is not importable with {py} (set QUARRY_TEST_PYTHON to an interpreter with numpy; .ci/run installs one):\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot start {py}: {e} (set QUARRY_TEST_PYTHON)"),
    }

    let dir = tempdir("quarry-bench-object");
    let gen_py = quarry_tests::example_generator();
    let t = Instant::now();
    let mut paths = Vec::new();
    // Two generators at a time.
    for pair in (0..OBJ_ROUNDS).collect::<Vec<_>>().chunks(2) {
        let kids: Vec<_> = pair
            .iter()
            .map(|&k| {
                Command::new(&py)
                    .arg(&gen_py)
                    .args(["--name", &format!("r{k}"), "--object_code", "obj"])
                    .args(["--batch_size", &OBJ_BATCH.to_string()])
                    .args([
                        "--num_iterations",
                        "0",
                        "--seed",
                        &k.to_string(),
                        "--gpu",
                        "0",
                    ])
                    .arg("--out_root")
                    .arg(dir.path())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn grasp_gen.py")
            })
            .collect();
        for mut c in kids {
            assert!(c.wait().expect("wait").success(), "grasp_gen.py failed");
        }
    }
    for k in 0..OBJ_ROUNDS {
        paths.push(dir.path().join(format!("r{k}/results/obj.npy")));
    }
    let counts: Vec<u64> = paths
        .iter()
        .map(|p| npy::inspect_path(p).expect("round is valid").count)
        .collect();
    let in_bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).expect("stat").len())
        .sum();
    let total: u64 = counts.iter().sum();
    let limit = total - OBJ_BATCH / 2;
    println!(
        "generated {OBJ_ROUNDS} rounds ({} samples, {:.1} MB) in {:.1} s; limit {limit}",
        total,
        in_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let qout = dir.path().join("quarry.npy");
    let mut best = Duration::MAX;
    let mut out_bytes = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let f = File::create(&qout).expect("create output");
        let s = npy::merge(&counts, limit, |i| File::open(&paths[i]), f).expect("object merge");
        best = best.min(t.elapsed());
        assert_eq!(s.samples, limit);
        out_bytes = s.bytes_written;
    }

    let nout = dir.path().join("numpy.npy");
    let mut args = vec![limit.to_string(), path_str(&nout), path_str(&qout)];
    args.extend(paths.iter().map(|p| path_str(p)));
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = quarry_tests::run_python(&py, NUMPY_SNIPPET, &args_ref);
    let field = |k: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("python printed no {k}:\n{text}"))
            .to_string()
    };
    let np_s: f64 = field("numpy_best_s").parse().expect("seconds");
    let np_rss_kb: u64 = field("numpy_maxrss_kb").parse().expect("kB");
    assert_eq!(
        field("same"),
        "1",
        "numpy's result differs from Quarry's merge"
    );
    let q_s = best.as_secs_f64();
    let q_mbps = out_bytes as f64 / 1e6 / q_s;
    let np_mbps = out_bytes as f64 / 1e6 / np_s;
    let speedup = np_s / q_s;
    println!(
        "quarry merge: {:.1} ms ({q_mbps:.0} MB/s of output, {:.1} MB); numpy {}: {:.1} ms ({np_mbps:.0} MB/s); speedup {speedup:.1}x; same samples: yes",
        q_s * 1e3,
        out_bytes as f64 / 1e6,
        field("numpy_version"),
        np_s * 1e3
    );
    table.row(Row {
        figure: "object-array merge vs numpy".into(),
        quarry: format!("{:.0} ms ({q_mbps:.0} MB/s)", q_s * 1e3),
        baseline: format!("{:.0} ms ({np_mbps:.0} MB/s, numpy)", np_s * 1e3),
        ratio: format!("{speedup:.1}x"),
        measured: format!("{speedup:.1}x faster"),
        target: ">= 5x".into(),
        pass: Some(speedup >= 5.0),
    });

    println!();
    println!("-- 4b. peak memory of a child process merging the object arrays --");
    let hwm = child_hwm(limit, &qout, &counts, &paths);
    println!(
        "numpy's peak RSS for the same merge: {:.1} MB",
        np_rss_kb as f64 / 1024.0
    );
    memory_row(table, "peak memory, object-array merge", hwm, in_bytes);
    let last = table.rows.len() - 1;
    table.rows[last].baseline = format!(
        "{:.1} MB data; numpy {:.0} MB",
        in_bytes as f64 / 1e6,
        np_rss_kb as f64 / 1024.0
    );
}

// ---------------------------------------------------------------------------------------------
// Figure 4: the child process.

/// Re-executes this binary to merge in a fresh process; returns its VmHWM in kB.
fn child_hwm(limit: u64, out: &Path, counts: &[u64], inputs: &[PathBuf]) -> u64 {
    let exe = std::env::current_exe().expect("current exe");
    let mut cmd = Command::new(exe);
    cmd.arg("--child-merge").arg(limit.to_string()).arg(out);
    for (c, p) in counts.iter().zip(inputs) {
        cmd.arg(c.to_string()).arg(p);
    }
    let t = Instant::now();
    let o = cmd.output().expect("run child merge");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "child merge failed: {}\n{text}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM_KB="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("child printed no VmHWM_KB:\n{text}"));
    let start_kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM_START_KB="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    println!(
        "child: VmHWM {:.1} MB (at start {:.1} MB), {:.1} s",
        kb as f64 / 1024.0,
        start_kb as f64 / 1024.0,
        t.elapsed().as_secs_f64()
    );
    kb
}

fn memory_row(table: &mut Table, figure: &str, hwm_kb: u64, data: u64) {
    let mb = hwm_kb as f64 / 1024.0;
    let frac = hwm_kb as f64 * 1024.0 / data as f64;
    table.row(Row {
        figure: figure.into(),
        quarry: format!("{mb:.1} MB VmHWM"),
        baseline: format!("{:.0} MB data", data as f64 / 1e6),
        ratio: format!("{:.3}x", frac),
        measured: format!("{mb:.1} MB"),
        target: "< 64 MB".into(),
        pass: Some(mb < 64.0),
    });
}

fn child_merge(args: &[String]) {
    let usage = "--child-merge <limit> <out> (<count> <input>)...";
    assert!(
        args.len() >= 4 && args.len().is_multiple_of(2),
        "usage: {usage}"
    );
    let start = vm_hwm_kb();
    let limit: u64 = args[0].parse().expect("limit");
    let out = PathBuf::from(&args[1]);
    let mut counts = Vec::new();
    let mut inputs = Vec::new();
    for pair in args[2..].chunks(2) {
        counts.push(pair[0].parse::<u64>().expect("count"));
        inputs.push(PathBuf::from(&pair[1]));
    }
    let f = File::create(&out).expect("create output");
    let s = npy::merge(&counts, limit, |i| File::open(&inputs[i]), f).expect("merge");
    println!("samples={} bytes={}", s.samples, s.bytes_written);
    println!("VmHWM_START_KB={start}");
    println!("VmHWM_KB={}", vm_hwm_kb());
}

fn vm_hwm_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

// ---------------------------------------------------------------------------------------------
// Helpers.

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

struct Row {
    figure: String,
    quarry: String,
    baseline: String,
    ratio: String,
    measured: String,
    target: String,
    pass: Option<bool>,
}

impl Table {
    fn row(&mut self, r: Row) {
        self.rows.push(r);
    }

    fn skip(&mut self, figure: &str, why: &str) {
        self.rows.push(Row {
            figure: figure.into(),
            quarry: "-".into(),
            baseline: "-".into(),
            ratio: "-".into(),
            measured: why.into(),
            target: "-".into(),
            pass: None,
        });
    }

    /// A Markdown table, so it can go into docs/benchmarks.md as printed.
    fn render(&self) -> String {
        let head = [
            "figure", "Quarry", "baseline", "ratio", "measured", "target", "result",
        ];
        let cells: Vec<[String; 7]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.figure.clone(),
                    r.quarry.clone(),
                    r.baseline.clone(),
                    r.ratio.clone(),
                    r.measured.clone(),
                    r.target.clone(),
                    match r.pass {
                        Some(true) => "PASS".into(),
                        Some(false) => "MISS".into(),
                        None => "info".into(),
                    },
                ]
            })
            .collect();
        let mut w = head.map(str::len);
        for c in &cells {
            for (i, s) in c.iter().enumerate() {
                w[i] = w[i].max(s.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, c: &[String]| {
            out.push('|');
            for (i, s) in c.iter().enumerate() {
                let pad = w[i] - s.chars().count();
                let _ = write!(out, " {s}{} |", " ".repeat(pad));
            }
            out.push('\n');
        };
        line(&mut out, &head.map(String::from));
        out.push('|');
        for wi in w {
            let _ = write!(out, "{}|", "-".repeat(wi + 2));
        }
        out.push('\n');
        for c in &cells {
            line(&mut out, c);
        }
        out
    }
}

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

fn tempdir_in(base: &Path, prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .unwrap_or_else(|e| panic!("temp dir in {}: {e}", base.display()))
}

/// Free bytes on the filesystem holding `p`, from `df -Pk` (no libc dependency).
fn free_bytes(p: &Path) -> Option<u64> {
    let o = Command::new("df").arg("-Pk").arg(p).output().ok()?;
    if !o.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let line = text.lines().nth(1)?;
    let kb: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kb * 1024)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e9 / d.as_secs_f64()
}
