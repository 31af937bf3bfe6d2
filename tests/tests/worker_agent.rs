//! The worker agent as a real process against a real `coordinator serve`: GPU binding as the
//! generator sees it, health from a simulated inventory, free-memory waits, bounded logs
//! uploaded beside the outputs, drain, release, cancel and timeout leaving no process behind,
//! and self-fencing when the coordinator stops answering.
//!
//! No GPU is needed: GPUs come from an inventory file (`worker --gpu-inventory FILE`, re-read
//! on every poll) or from explicit ids with no inventory at all, as on a CPU-only host. The
//! generator is `quarry-zero-gen`, which can dump its binding environment, write its pid and
//! process group, sleep and print.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use quarry_tests::cluster::{
    Killed, metrics_addr, sample, scrape, spawn_worker_args, start_serve_on, start_serve_with,
    status, submit, wait_until,
};
use quarry_tests::{bin, files_under, sha256_file};
use serde_json::{Value, json};

const GEN: &str = env!("CARGO_BIN_EXE_quarry-zero-gen");
const BATCH: u64 = 4;

struct Coord {
    home: tempfile::TempDir,
    serve: Killed,
    addr: String,
}

impl Coord {
    fn start(ttl: &str) -> Coord {
        Coord::start_with(ttl, &[])
    }
    /// [`Coord::start`] with `extra` flags for `coordinator serve` (e.g. `--metrics-listen`).
    fn start_with(ttl: &str, extra: &[&str]) -> Coord {
        let home = tempfile::tempdir().expect("test harness");
        for d in ["root/env", "root/pids", "store"] {
            std::fs::create_dir_all(home.path().join(d)).expect("test harness");
        }
        let state = state_url(home.path());
        let store = format!("file://{}", home.path().join("store").display());
        let mut args = vec!["--lease-ttl", ttl, "--state", &state, "--store", &store];
        args.extend_from_slice(extra);
        let (serve, addr) = start_serve_with(&args, &[], &home.path().join("coordinator.log"));
        Coord { home, serve, addr }
    }
    /// The coordinator's Prometheus metrics (it must have been started with
    /// `--metrics-listen`).
    fn metrics(&self) -> String {
        scrape(&metrics_addr(&self.path("coordinator.log")), "/metrics")
    }
    /// sha256 of the object's final, as the manifest names it.
    fn final_sha(&self, exp: &str) -> String {
        let m = self.manifest(exp);
        let key = m["objects"]["obj"]["final"][0]
            .as_str()
            .unwrap_or_else(|| panic!("no final in {m}"));
        sha256_file(&self.store().join(key))
    }
    /// Waits (bounded) until no staging object of `exp` is left.
    fn wait_staging_empty(&self, exp: &str) {
        let rounds = self.store().join(exp).join("rounds");
        wait_until(
            "the job's staging to be empty",
            Duration::from_secs(20),
            || files_under(&rounds).is_empty(),
        );
    }
    fn root(&self) -> PathBuf {
        self.home.path().join("root")
    }
    fn store(&self) -> PathBuf {
        self.home.path().join("store")
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.home.path().join(rel)
    }
    fn manifest(&self, exp: &str) -> Value {
        let p = self.store().join(exp).join("manifest.json");
        serde_json::from_slice(
            &std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        )
        .expect("test harness")
    }
    /// A worker on this coordinator: fast sampling, tiny scratch requirement, `extra` flags.
    fn worker(&self, extra: &[&str], log: &str) -> Killed {
        self.worker_via(&self.addr, extra, log)
    }
    /// A worker reaching this coordinator at `addr` (a proxy in between).
    fn worker_via(&self, addr: &str, extra: &[&str], log: &str) -> Killed {
        let mut args = vec![
            "--coordinator",
            addr,
            "--sample-interval-ms",
            "100",
            "--min-scratch-mib",
            "1",
        ];
        args.extend_from_slice(extra);
        spawn_worker_args(&args, &[], Some(&self.path(log)))
    }
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }
    fn status(&self, job: &str) -> Option<Value> {
        status(&self.addr, job)
    }
    fn submit(&self, job: &Path) {
        let out = submit(job, &self.addr, false);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    /// `coordinator status JOB --watch` until the job ends (bounded); its final status.
    fn watch(&self, job: &str) -> Value {
        let mut child = Killed(
            Command::new(bin("coordinator"))
                .args(["status", job, "--watch", "--coordinator", &self.addr])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("test harness"),
        );
        let code = wait_exit(&mut child, Duration::from_secs(120));
        // 0: done; 1: cancelled; 3: an object exhausted its rounds.
        assert!(
            matches!(code, 0 | 1 | 3),
            "status --watch failed ({code}); coordinator log:\n{}",
            self.log("coordinator.log")
        );
        self.status(job).expect("status after the job ended")
    }
}

fn state_url(home: &Path) -> String {
    format!("file://{}", home.join("state.redb").display())
}

/// A one-object job of `rounds` rounds of `quarry-zero-gen` with `gen_args`; `generator`
/// is TOML added to its `[generator]` table, `top` before it.
fn job(
    c: &Coord,
    exp: &str,
    rounds: u64,
    gen_args: &[&str],
    top: &str,
    generator: &str,
) -> PathBuf {
    let q = |s: &str| serde_json::to_string(s).expect("test harness");
    let mut argv = vec![
        GEN.to_string(),
        "--out".into(),
        "out/{name}/r.npy".into(),
        "--batch_size".into(),
        "{batch_size}".into(),
        "--seed".into(),
        "{seed}".into(),
    ];
    argv.extend(gen_args.iter().map(|s| s.to_string()));
    argv.extend(["--gpu".to_string(), "0".to_string()]);
    let text = format!(
        "exp_name = {exp}\nobjects = [\"obj\"]\ntarget_count_per_object = {quota}\n\
         round_batch_size = {BATCH}\nnum_iterations = 1\nseed_base = 7\nretry_backoff_ms = 10\n\
         root = {root}\n{top}\n[generator]\nargv = [{argv}]\noutput = \"out/{{name}}/r.npy\"\n\
         round_dir = \"out/{{name}}\"\n{generator}\n",
        exp = q(exp),
        quota = rounds * BATCH,
        root = q(c.root().to_str().expect("test harness")),
        argv = argv.iter().map(|a| q(a)).collect::<Vec<_>>().join(", "),
    );
    let p = c.path(&format!("{exp}.toml"));
    std::fs::write(&p, text).expect("test harness");
    p
}

/// A simulated GPU as the inventory file describes it.
fn gpu(index: u32, used_mib: u64, util: u32) -> Value {
    json!({
        "index": index, "uuid": format!("GPU-{index:08}-5a5a-4b4b-8c8c-000000000000"),
        "name": "Simulated H200", "memory_total_mib": 143_771, "memory_used_mib": used_mib,
        "utilization_pct": util, "temperature_c": 41, "power_w": 120, "ecc_uncorrected": 0,
        "xids": []
    })
}

/// Replaces the inventory file atomically: the worker re-reads it on every poll.
fn write_inventory(path: &Path, gpus: &[Value]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        json!({"driver_version": "555.42.06", "gpus": gpus}).to_string(),
    )
    .expect("test harness");
    std::fs::rename(&tmp, path).expect("test harness");
}

fn worker_of(status: &Value, gpu: &str) -> Value {
    status["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["gpu"] == gpu).cloned())
        .unwrap_or(Value::Null)
}

/// `(pid, pgid)` a generator wrote with `--pid_file`.
fn read_pid(path: &Path) -> Option<(i32, i32)> {
    let s = std::fs::read_to_string(path).ok()?;
    if !s.ends_with('\n') {
        return None;
    }
    let mut it = s.split_whitespace().map(|v| v.parse::<i32>().ok());
    Some((it.next()??, it.next()??))
}

/// Submits job `exp`: one round whose generator sleeps 60 s after writing its `(pid, pgid)` to
/// `pids/a.pid`; returns them once that round started.
fn one_long_round(c: &Coord, exp: &str) -> (i32, i32) {
    c.submit(&job(
        c,
        exp,
        1,
        &["--pid_file", "pids/a.pid", "--sleep_ms", "60000"],
        "",
        "",
    ));
    let pid_file = c.root().join("pids/a.pid");
    wait_until("the round started", Duration::from_secs(15), || {
        read_pid(&pid_file).is_some()
    });
    read_pid(&pid_file).expect("the round wrote its pid file")
}

/// Whether any process of group `pgid` is alive (zombies are dead: nothing reaps orphans in
/// some containers, and a zombie holds no GPU or files).
fn group_alive(pgid: i32) -> bool {
    quarry_tests::process::pids()
        .into_iter()
        .filter_map(quarry_tests::process::stat)
        .any(|s| s.pgrp as i32 == pgid && s.live())
}

/// Waits, up to `limit`, until no process of group `pgid` is alive.
fn wait_group_gone(what: &str, pgid: i32, limit: Duration) {
    wait_until(what, limit, || !group_alive(pgid));
}

fn signal(child: &Killed, sig: libc::c_int) {
    let pid = child.0.id() as i32;
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    unsafe { libc::kill(pid, sig) };
}

/// Waits (bounded) for a child process to exit; its exit code.
fn wait_exit(child: &mut Killed, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.0.try_wait().expect("test harness") {
            return st.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn env_dumps(c: &Coord) -> Vec<Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(c.root().join("env"))
        .expect("test harness")
        .flatten()
    {
        out.push(
            serde_json::from_slice(&std::fs::read(e.path()).expect("test harness"))
                .expect("test harness"),
        );
    }
    assert!(!out.is_empty(), "no generator wrote its environment");
    out
}

/// The generator sees exactly its GPU: by UUID when the inventory knows it, with PCI bus
/// order, told `--gpu 0`; thread pools sized by the job. Without any inventory (a CPU-only
/// host) explicit ids still bind, and threads default to the host's CPUs over the agents.
/// The worker also reaches the coordinator past a dead first address.
#[test]
fn the_generator_sees_exactly_its_gpu_and_its_threads() {
    let c = Coord::start("10");
    let inv = c.path("gpus.json");
    write_inventory(&inv, &[gpu(0, 500, 0), gpu(1, 500, 0), gpu(2, 500, 0)]);
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let both = format!("{dead},{}", c.addr);
    let mut w = spawn_worker_args(
        &[
            "--coordinator",
            &both,
            "--gpu",
            "1",
            "--gpu-inventory",
            inv.to_str().unwrap(),
            "--min-scratch-mib",
            "1",
        ],
        &[],
        Some(&c.path("w1.log")),
    );
    let j = job(
        &c,
        "bind",
        3,
        &["--env_out", "env/{name}.json"],
        "",
        "threads_per_gpu = 3",
    );
    c.submit(&j);
    let s = c.watch("bind");
    assert_eq!(s["state"], "done", "{s}");
    for d in env_dumps(&c) {
        let env = &d["env"];
        assert_eq!(
            env["CUDA_VISIBLE_DEVICES"], "GPU-00000001-5a5a-4b4b-8c8c-000000000000",
            "{d}"
        );
        assert_eq!(env["CUDA_DEVICE_ORDER"], "PCI_BUS_ID", "{d}");
        assert_eq!(env["OMP_NUM_THREADS"], "3", "{d}");
        assert_eq!(env["MKL_NUM_THREADS"], "3", "{d}");
        assert_eq!(env["QUARRY_GPU"], "1", "{d}");
        let argv: Vec<&str> = d["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(argv.windows(2).any(|p| p == ["--gpu", "0"]), "{d}");
    }
    let me = worker_of(&s, "1");
    assert_eq!(
        me["gpu_uuid"], "GPU-00000001-5a5a-4b4b-8c8c-000000000000",
        "{s}"
    );
    assert_eq!(me["gpu_name"], "Simulated H200", "{s}");
    signal(&w, libc::SIGTERM);
    assert_eq!(wait_exit(&mut w, Duration::from_secs(20)), 0);

    // No inventory: explicit ids, health unknown, threads = CPUs / 2 agents (at least 1).
    for e in std::fs::read_dir(c.root().join("env")).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    let _w = c.worker(&["--gpu", "3,5", "--gpu-inventory", "none"], "w2.log");
    let j = job(&c, "bind2", 6, &["--env_out", "env/{name}.json"], "", "");
    c.submit(&j);
    let s = c.watch("bind2");
    assert_eq!(s["state"], "done", "{s}");
    let cpus = std::thread::available_parallelism().unwrap().get();
    let threads = (cpus / 2).max(1).to_string();
    for d in env_dumps(&c) {
        let dev = d["env"]["CUDA_VISIBLE_DEVICES"].as_str().unwrap();
        assert!(dev == "3" || dev == "5", "{d}");
        assert_eq!(d["env"]["QUARRY_GPU"], dev, "{d}");
        assert_eq!(d["env"]["OMP_NUM_THREADS"], threads.as_str(), "{d}");
        assert!(d["env"].get("QUARRY_GPU_UUID").is_none(), "{d}");
    }
    for g in ["3", "5"] {
        assert_eq!(worker_of(&s, g)["health"], "unknown", "{s}");
    }
}

/// `worker gpus` lists the inventory; without NVML it fails clearly, as do `--gpu all` and an
/// id the inventory does not have.
#[test]
fn worker_gpus_and_gpu_all() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("gpus.json");
    write_inventory(&inv, &[gpu(0, 1000, 37), gpu(1, 2000, 0)]);
    let run = |args: &[&str]| {
        let out = Command::new(bin("worker")).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&["gpus", "--gpu-inventory", inv.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "GPU-00000000-5a5a-4b4b-8c8c-000000000000",
        "GPU-00000001-5a5a-4b4b-8c8c-000000000000",
        "Simulated H200",
        "1000/143771 MiB",
        "555.42.06",
        "37%",
        "healthy",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    let (code, _, err) = run(&["gpus", "--gpu-inventory", "none"]);
    assert_eq!(code, 1);
    assert!(err.contains("no NVML"), "{err}");
    // The host as it is: NVML loads and lists GPUs, or it does not and that is said, never a
    // crash (here, without a driver, loading libnvidia-ml fails).
    let out = Command::new(bin("worker"))
        .arg("gpus")
        .env_remove("QUARRY_GPU_INVENTORY")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    match out.status.code() {
        Some(0) => assert!(
            stdout.contains("GPU-") || stdout.contains("no GPUs"),
            "{stdout}"
        ),
        Some(1) => assert!(stderr.contains("no NVML"), "{stderr}"),
        other => panic!("worker gpus exited {other:?}: {stderr}"),
    }
    let (code, _, err) = run(&["--gpu", "all", "--gpu-inventory", "none"]);
    assert_eq!(code, 2);
    assert!(err.contains("--gpu all needs NVML"), "{err}");
    let (code, _, err) = run(&["--gpu", "7", "--gpu-inventory", inv.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no such GPU") && err.contains("GPUs 0 (GPU-"),
        "{err}"
    );
}

/// A GPU whose inventory reports a critical XID stops taking rounds and `coordinator status`
/// says why; the other GPU of the same worker process does all the work. Once healthy again
/// it takes rounds again.
#[test]
fn an_unhealthy_gpu_stops_acquiring_and_status_says_why() {
    let c = Coord::start("10");
    let inv = c.path("gpus.json");
    write_inventory(&inv, &[gpu(0, 500, 10), gpu(1, 500, 10)]);
    let _w = c.worker(
        &["--gpu", "0,1", "--gpu-inventory", inv.to_str().unwrap()],
        "w.log",
    );
    // Job A: both agents registered and healthy.
    c.submit(&job(&c, "warmup", 2, &[], "", ""));
    let s = c.watch("warmup");
    assert_eq!(s["state"], "done", "{s}");
    wait_until(
        "both GPUs reported healthy",
        Duration::from_secs(10),
        || {
            c.status("warmup").is_some_and(|s| {
                worker_of(&s, "0")["health"] == "healthy"
                    && worker_of(&s, "1")["health"] == "healthy"
            })
        },
    );

    let mut sick = gpu(1, 500, 10);
    sick["xids"] = json!([13, 79]);
    write_inventory(&inv, &[gpu(0, 500, 10), sick]);
    let mut seen = Value::Null;
    wait_until("GPU 1 reported unhealthy", Duration::from_secs(10), || {
        seen = c.status("warmup").unwrap_or(Value::Null);
        let w = worker_of(&seen, "1");
        w["health"] == "unhealthy" && w["state"].as_str().is_some_and(|s| !s.is_empty())
    });
    let w1 = worker_of(&seen, "1");
    assert_eq!(w1["health_reason"], "critical XID 79", "{seen}");
    assert_eq!(w1["last_xid"], 79, "{seen}");
    assert!(
        w1["state"]
            .as_str()
            .unwrap()
            .starts_with("unhealthy: critical XID 79"),
        "{seen}"
    );
    let text = Command::new(bin("coordinator"))
        .args(["status", "warmup", "--coordinator", &c.addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("UNHEALTHY: critical XID 79"), "{text}");

    // Job B: every round goes to GPU 0, although rounds are slow enough for two GPUs to share.
    c.submit(&job(&c, "sick", 6, &["--sleep_ms", "150"], "", ""));
    let s = c.watch("sick");
    assert_eq!(s["state"], "done", "{s}");
    let m = c.manifest("sick");
    let commits = m["objects"]["obj"]["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 6);
    for cm in commits {
        assert!(
            cm["worker"].as_str().unwrap().contains("-gpu0-"),
            "an unhealthy GPU took a round: {cm}"
        );
    }

    // Healthy again: GPU 1 takes rounds again.
    write_inventory(&inv, &[gpu(0, 500, 10), gpu(1, 500, 10)]);
    wait_until("GPU 1 healthy again", Duration::from_secs(10), || {
        c.status("sick")
            .is_some_and(|s| worker_of(&s, "1")["health"] == "healthy")
    });
    c.submit(&job(&c, "recovered", 8, &["--sleep_ms", "300"], "", ""));
    assert_eq!(c.watch("recovered")["state"], "done");
    let m = c.manifest("recovered");
    let by_gpu1 = m["objects"]["obj"]["commits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|cm| cm["worker"].as_str().unwrap().contains("-gpu1-"))
        .count();
    assert!(by_gpu1 > 0, "GPU 1 never resumed: {m}");
}

/// A job's minimum free GPU memory is not there (another process holds the GPU): the agent
/// waits without starting the generator, says so in status, and runs as soon as it frees.
#[test]
fn missing_free_gpu_memory_makes_the_agent_wait() {
    let c = Coord::start("10");
    let inv = c.path("gpus.json");
    let busy = |used: u64| {
        let mut g = gpu(0, used, 0);
        g["memory_total_mib"] = json!(10_000);
        g
    };
    write_inventory(&inv, &[busy(9_000)]);
    let _w = c.worker(
        &["--gpu", "0", "--gpu-inventory", inv.to_str().unwrap()],
        "w.log",
    );
    let stamps = c.root().join("stamps");
    c.submit(&job(
        &c,
        "mem",
        2,
        &["--stamp", stamps.to_str().unwrap()],
        "",
        "min_free_gpu_memory_mib = 4000",
    ));
    let mut seen = Value::Null;
    wait_until(
        "the agent waiting for memory",
        Duration::from_secs(15),
        || {
            seen = c.status("mem").unwrap_or(Value::Null);
            worker_of(&seen, "0")["state"].as_str().is_some_and(|s| {
                s.starts_with("waiting for GPU memory: 1000 MiB free, 4000 MiB needed")
            })
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let s = c.status("mem").unwrap();
    assert_eq!(s["rounds_committed"], 0, "{s}");
    assert_eq!(s["failed_attempts"], 0, "{s}");
    assert!(!stamps.exists(), "a generator ran without its GPU memory");

    write_inventory(&inv, &[busy(1_000)]);
    let s = c.watch("mem");
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(s["failed_attempts"], 0, "{s}");
    assert_eq!(std::fs::read_to_string(&stamps).unwrap().lines().count(), 2);
}

/// The round's log is bounded (head and tail kept around a marker), uploaded beside its
/// outputs, and named in the commit record with the run's GPU figures.
#[test]
fn bounded_log_beside_the_outputs_and_gpu_figures_in_the_record() {
    let c = Coord::start("10");
    let inv = c.path("gpus.json");
    write_inventory(&inv, &[gpu(0, 1234, 37)]);
    let _w = c.worker(
        &[
            "--gpu",
            "0",
            "--gpu-inventory",
            inv.to_str().unwrap(),
            "--log-limit",
            "10000",
        ],
        "w.log",
    );
    c.submit(&job(
        &c,
        "logs",
        2,
        &["--print_bytes", "300000", "--sleep_ms", "300"],
        "keep_intermediate = true",
        "",
    ));
    assert_eq!(c.watch("logs")["state"], "done");
    let m = c.manifest("logs");
    let commits = m["objects"]["obj"]["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 2);
    for cm in commits {
        let log_key = cm["log"].as_str().expect("log key in the commit record");
        let out_key = cm["key"].as_str().unwrap();
        assert_eq!(
            Path::new(log_key).parent(),
            Path::new(out_key).parent(),
            "the log is beside the outputs: {cm}"
        );
        assert!(log_key.ends_with("/generator.log"), "{cm}");
        let log = std::fs::read_to_string(c.store().join(log_key)).unwrap();
        assert!(
            log.len() <= 10_000 + 64,
            "log not bounded: {} bytes",
            log.len()
        );
        assert!(log.contains("bytes omitted"), "no cut marker");
        assert!(log.starts_with("quarry-zero-gen progress"), "head lost");
        assert!(log.trim_end().ends_with(".........."), "tail lost");
        assert_eq!(cm["gpu_utilization_mean_pct"], 37, "{cm}");
        assert_eq!(cm["gpu_memory_peak_mib"], 1234, "{cm}");
    }
}

/// With prefetch, the next round is leased while the current one runs, shortly before it is
/// expected to end (the previous round's time less a quarter, docs/worker.md "Dispatch"): in
/// the second of 1.6 s rounds the agent holds one lease at first and two before the round can
/// have ended; with `--no-prefetch`, never two while a round runs.
#[test]
fn the_next_round_is_leased_ahead_shortly_before_the_running_one_ends() {
    for prefetch in [true, false] {
        let c = Coord::start("10");
        let mut flags = vec!["--gpu", "0", "--gpu-inventory", "none"];
        if !prefetch {
            flags.push("--no-prefetch");
        }
        let _w = c.worker(&flags, "w.log");
        let pids = c.root().join("pids");
        c.submit(&job(
            &c,
            "ahead",
            4,
            &["--pid_file", "pids/{name}.pid", "--sleep_ms", "1600"],
            "",
            "",
        ));
        wait_until("the second round started", Duration::from_secs(20), || {
            files_under(&pids).len() >= 2
        });
        let started = Instant::now();
        // (ms since the second round started, leases the agent holds), until the third starts.
        let mut seen: Vec<(u128, usize)> = Vec::new();
        while files_under(&pids).len() < 3 && started.elapsed() < Duration::from_secs(20) {
            if let Some(s) = c.status("ahead") {
                // `running` lists the leases held: "obj r1, obj r2".
                let held = worker_of(&s, "0")["running"]
                    .as_str()
                    .map_or(0, |r| r.split(", ").filter(|l| !l.is_empty()).count());
                seen.push((started.elapsed().as_millis(), held));
            }
            std::thread::sleep(Duration::from_millis(40));
        }
        // The round sleeps 1600 ms: a second lease seen before that was acquired ahead.
        let ahead = seen.iter().any(|&(ms, held)| ms < 1550 && held == 2);
        assert_eq!(ahead, prefetch, "prefetch {prefetch}: {seen:?}");
        // Not at the round's start: in its first half the running round is the only lease.
        let early: Vec<_> = seen
            .iter()
            .filter(|&&(ms, _)| (300..800).contains(&ms))
            .collect();
        assert!(
            !early.is_empty(),
            "no status in the round's first half: {seen:?}"
        );
        assert!(early.iter().all(|&&(_, held)| held == 1), "{seen:?}");
        let s = c.watch("ahead");
        assert_eq!(s["rounds_committed"], 4, "{s}");
    }
}

/// SIGTERM drains: the running round finishes and commits, no new round is taken, the
/// worker exits 0.
#[test]
fn drain_finishes_the_running_round_then_exits_0() {
    let c = Coord::start("10");
    let mut w = c.worker(
        &[
            "--gpu",
            "0",
            "--gpu-inventory",
            "none",
            "--drain-grace",
            "30",
        ],
        "w.log",
    );
    let pids = c.root().join("pids");
    let stamps = c.root().join("stamps");
    c.submit(&job(
        &c,
        "drain",
        4,
        &[
            "--pid_file",
            "pids/{name}.pid",
            "--sleep_ms",
            "1500",
            "--stamp",
            stamps.to_str().unwrap(),
        ],
        "",
        "",
    ));
    wait_until("the first round started", Duration::from_secs(15), || {
        files_under(&pids).len() == 1
    });
    signal(&w, libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut w, Duration::from_secs(20)),
        0,
        "{}",
        c.log("w.log")
    );
    let s = c.status("drain").unwrap();
    assert_eq!(s["rounds_committed"], 1, "{s}");
    assert_eq!(s["failed_attempts"], 0, "{s}");
    assert_eq!(s["rounds_in_flight"], 0, "{s}");
    assert_eq!(files_under(&pids).len(), 1, "a round started after SIGTERM");
    assert_eq!(std::fs::read_to_string(&stamps).unwrap().lines().count(), 1);
}

/// A round that cannot finish within `--drain-grace` is stopped (its whole process group
/// gone) and released: another worker gets it at once, long before the lease TTL, and no
/// failure is counted. Cancelling the job then stops that worker's run, again leaving no
/// process behind.
#[test]
fn drain_past_the_grace_releases_at_once_and_cancel_leaves_nothing() {
    let c = Coord::start("120");
    let mut a = c.worker(
        &[
            "--gpu",
            "0",
            "--gpu-inventory",
            "none",
            "--drain-grace",
            "1",
            "--kill-grace",
            "1",
        ],
        "a.log",
    );
    let (_, pgid_a) = one_long_round(&c, "release");
    let pid_a = c.root().join("pids/a.pid");
    assert!(group_alive(pgid_a));
    std::fs::remove_file(&pid_a).unwrap();
    let t = Instant::now();
    signal(&a, libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut a, Duration::from_secs(15)),
        0,
        "{}",
        c.log("a.log")
    );
    assert!(
        !group_alive(pgid_a),
        "the drained generator's group survived"
    );
    let s = c.status("release").unwrap();
    assert_eq!(
        s["rounds_in_flight"], 0,
        "released, not left to expire: {s}"
    );
    assert_eq!(s["failed_attempts"], 0, "{s}");

    let _b = c.worker(&["--gpu", "1", "--gpu-inventory", "none"], "b.log");
    wait_until(
        "worker b got the released round",
        Duration::from_secs(15),
        || read_pid(&pid_a).is_some(),
    );
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "re-leased only after {:?}",
        t.elapsed()
    );
    let (_, pgid_b) = read_pid(&pid_a).unwrap();
    let s = c.status("release").unwrap();
    assert_eq!(s["failed_attempts"], 0, "{s}");
    let out = Command::new(bin("coordinator"))
        .args(["cancel", "release", "--coordinator", &c.addr])
        .output()
        .unwrap();
    assert!(out.status.success());
    wait_group_gone(
        "the cancelled run's process group is gone",
        pgid_b,
        Duration::from_secs(20),
    );
}

/// A generator dies with its agent: SIGKILL of the worker process (the OOM killer, kill -9)
/// reaches the generator through the kernel (`PR_SET_PDEATHSIG`, set by the launcher the worker
/// binary starts it through: `quarry_worker::runner::launch`). The generator is the worker's
/// own child, the launcher having become it in place.
#[test]
fn a_generator_dies_with_its_killed_worker() {
    let c = Coord::start("120");
    let mut w = c.worker(&["--gpu", "0", "--gpu-inventory", "none"], "w.log");
    let (pid, pgid) = one_long_round(&c, "orphan");
    let stat = quarry_tests::process::stat(pid as u32).unwrap();
    assert_eq!(
        stat.ppid,
        w.0.id(),
        "the generator is not the worker's child: {stat:?}"
    );
    assert!(group_alive(pgid));
    signal(&w, libc::SIGKILL);
    let _ = wait_exit(&mut w, Duration::from_secs(10));
    wait_group_gone(
        "the killed worker's generator is gone",
        pgid,
        Duration::from_secs(10),
    );
}

/// The launcher mode of both binaries (`--quarry-launch AGENT_PID PROGRAM ARGS...`, how they
/// start generators) with arguments it cannot use: a usage error (2) when the pid is missing or
/// not a number, 1 without running anything when the caller is not the parent it names, 127
/// with the reason when the program cannot be executed; with good ones it becomes the program.
#[test]
fn the_launcher_mode_refuses_bad_arguments_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let me = std::process::id().to_string();
    for binary in ["worker", "coordinator"] {
        let launch = |args: &[&str]| {
            let mut cmd = Command::new(bin(binary));
            cmd.arg("--quarry-launch").args(args);
            quarry_tests::process::run_within(&mut cmd, dir.path(), Duration::from_secs(30))
        };
        for args in [&[][..], &["not-a-pid", "/bin/echo"][..], &[me.as_str()][..]] {
            let e = launch(args);
            assert_eq!(e.code, Some(2), "{binary} {args:?}: {e:?}");
            assert!(
                e.stderr
                    .contains("usage: --quarry-launch AGENT_PID PROGRAM"),
                "{e:?}"
            );
        }
        let e = launch(&["1", "/bin/echo", "ran"]);
        assert_eq!(e.code, Some(1), "{binary}: another parent: {e:?}");
        assert!(!e.stdout.contains("ran"), "{e:?}");
        let e = launch(&[&me, "/nonexistent/quarry-generator"]);
        assert_eq!(e.code, Some(127), "{binary}: {e:?}");
        assert!(
            e.stderr
                .contains("failed to start `/nonexistent/quarry-generator`: No such file"),
            "{e:?}"
        );
        let e = launch(&[&me, "/bin/echo", "ran"]);
        assert_eq!(
            (e.code, e.stdout.trim()),
            (Some(0), "ran"),
            "{binary}: {e:?}"
        );
    }
}

/// Slurm (scancel, requeue, preemption) signals a step's processes one by one: the generator
/// may die of the SIGTERM, and be reaped, before its worker has handled its own. The round is
/// still given back (the signal that drained the worker stopped it), not counted as failed:
/// here the generator is signalled 300 ms before its worker.
#[test]
fn a_generator_signalled_just_before_its_worker_is_given_back_not_failed() {
    let c = Coord::start("120");
    let mut w = c.worker(
        &[
            "--gpu",
            "0",
            "--gpu-inventory",
            "none",
            "--drain-grace",
            "30",
        ],
        "w.log",
    );
    let (pid, _) = one_long_round(&c, "skew");
    // SAFETY: kill(2) on the generator this test's worker started (it is alive: it sleeps 60 s).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    signal(&w, libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut w, Duration::from_secs(20)),
        0,
        "{}",
        c.log("w.log")
    );
    let s = c.status("skew").unwrap();
    assert_eq!(s["failed_attempts"], 0, "{s}\n{}", c.log("w.log"));
    assert_eq!(
        s["rounds_in_flight"], 0,
        "given back, not left to expire: {s}"
    );
    assert!(
        c.log("w.log").contains("giving the round back"),
        "{}",
        c.log("w.log")
    );
}

/// A run past the job's timeout is killed with its whole process group.
#[test]
fn timeout_leaves_no_process_behind() {
    let c = Coord::start("10");
    let _w = c.worker(
        &["--gpu", "0", "--gpu-inventory", "none", "--kill-grace", "1"],
        "w.log",
    );
    c.submit(&job(
        &c,
        "slow",
        1,
        &["--pid_file", "pids/slow.pid", "--sleep_ms", "60000"],
        "retries = 0\nmax_rounds = 1",
        "timeout_secs = 1",
    ));
    let pid = c.root().join("pids/slow.pid");
    wait_until("the generator started", Duration::from_secs(15), || {
        read_pid(&pid).is_some()
    });
    let (_, pgid) = read_pid(&pid).unwrap();
    let s = c.watch("slow");
    assert_eq!(s["state"], "incomplete", "{s}");
    assert_eq!(s["rounds_quarantined"], 1, "{s}");
    assert!(
        !group_alive(pgid),
        "the timed-out generator's group survived"
    );
    let m = c.manifest("slow");
    let reason = m["objects"]["obj"]["quarantined"][0]["reason"]
        .as_str()
        .unwrap();
    assert!(reason.starts_with("timeout"), "{m}");
}

/// The coordinator stops answering (SIGSTOP): within its lease TTL the worker kills its run
/// (the process group is gone long before the run would have ended) and discards its
/// staging. The coordinator is then killed and restarted on the same address and state: the
/// worker registers again and the job completes.
#[test]
fn a_worker_cut_off_from_the_coordinator_fences_itself_and_comes_back() {
    let c = Coord::start("3");
    let _w = c.worker(&["--gpu", "0", "--gpu-inventory", "none"], "w.log");
    c.submit(&job(
        &c,
        "fence",
        1,
        &["--pid_file", "pids/{name}.pid", "--sleep_ms", "8000"],
        "",
        "",
    ));
    let pids = c.root().join("pids");
    wait_until("the generator started", Duration::from_secs(15), || {
        files_under(&pids)
            .first()
            .is_some_and(|f| read_pid(&pids.join(f)).is_some())
    });
    let started = Instant::now();
    let pid_file = pids.join(&files_under(&pids)[0]);
    let (_, pgid) = read_pid(&pid_file).unwrap();
    std::fs::remove_file(&pid_file).unwrap();

    signal(&c.serve, libc::SIGSTOP);
    wait_group_gone(
        "the fenced run's process group is gone",
        pgid,
        Duration::from_secs(7),
    );
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "the run was not stopped before its natural end"
    );
    wait_until("the worker says it fenced", Duration::from_secs(5), || {
        c.log("w.log").contains("fencing")
    });
    assert!(
        !c.store().join("fence/rounds").exists()
            || files_under(&c.store().join("fence/rounds")).is_empty(),
        "staging left: {:?}",
        files_under(&c.store().join("fence/rounds"))
    );
    assert!(
        files_under(&c.root().join("out")).is_empty(),
        "local round files left: {:?}",
        files_under(&c.root().join("out"))
    );

    // Kill the stopped coordinator and start a new one on the same address and state.
    let Coord {
        home, serve, addr, ..
    } = c;
    drop(serve);
    let (serve, addr2) = start_serve_on(
        &addr,
        &state_url(home.path()),
        &format!("file://{}", home.path().join("store").display()),
        "3",
        &[],
        &home.path().join("coordinator2.log"),
    );
    assert_eq!(addr2, addr);
    let c = Coord { home, serve, addr };
    let s = c.watch("fence");
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(s["samples_collected"], BATCH, "{s}");
    let w = s["workers"].as_array().unwrap();
    assert_eq!(w.len(), 1, "{s}");
    assert!(
        c.log("w.log").matches("agent registered").count() >= 2,
        "{}",
        c.log("w.log")
    );
}

/// Runs a 40-round job on a worker with two agents leasing `--lease-batch n`, reaching the
/// coordinator over a link of `latency` each way; returns the final's sha256 and the
/// coordinator's metrics once the job is done and its staging empty.
fn run_with_lease_batch(n: &str, latency: Duration) -> (String, String) {
    let c = Coord::start_with("10", &["--metrics-listen", "127.0.0.1:0"]);
    let link = quarry_tests::latency::LatencyProxy::start(&c.addr, latency);
    let _w = c.worker_via(
        link.addr(),
        &[
            "--gpu",
            "0,1",
            "--gpu-inventory",
            "none",
            "--lease-batch",
            n,
        ],
        "w.log",
    );
    c.submit(&job(&c, "batch", 40, &[], "", ""));
    let s = c.watch("batch");
    assert_eq!(s["state"], "done", "{s}\n{}", c.log("w.log"));
    assert_eq!(s["failed_attempts"], 0, "{s}");
    c.wait_staging_empty("batch");
    (c.final_sha("batch"), c.metrics())
}

/// `--lease-batch 4`: each Acquire leases several rounds and finished rounds are reported
/// together in CompleteBatch calls, and the final is byte-identical to the one leased and
/// reported a round at a time; nothing is left in staging. The default (1) makes one call
/// per round, as before batching existed. Both run over a link of 25 ms each way (a worker
/// far from its coordinator, where batching pays): completions go together when they are
/// ready while another Complete is in flight, which on loopback, with Completes shorter than
/// the few-millisecond rounds, a whole run could miss.
#[test]
fn lease_batch_leases_and_reports_rounds_together_with_the_same_final() {
    let link = Duration::from_millis(25);
    let (one, m1) = run_with_lease_batch("1", link);
    let batches = |m: &str| sample(m, "quarry_complete_batch_rounds_count");
    let (four, m4) = run_with_lease_batch("4", link);
    assert_eq!(one, four, "the finals differ");

    let calls = |m: &str| sample(m, "quarry_acquire_seconds_count");
    let leased = |m: &str| sample(m, "quarry_rounds_leased_total");
    let batched = |m: &str| sample(m, "quarry_complete_batch_rounds_sum");
    assert_eq!(calls(&m1), leased(&m1), "batch 1: one round per Acquire");
    assert_eq!(batches(&m1), 0.0, "batch 1: no CompleteBatch");

    eprintln!(
        "batch 4: {} rounds leased in {} Acquire calls; {} completions in {} CompleteBatch calls",
        leased(&m4),
        calls(&m4),
        batched(&m4),
        batches(&m4)
    );
    assert!(leased(&m4) >= 40.0, "{m4}");
    assert!(
        calls(&m4) < leased(&m4),
        "batch 4: {} Acquire calls leased {} rounds",
        calls(&m4),
        leased(&m4)
    );
    assert!(
        batches(&m4) >= 1.0,
        "batch 4: no CompleteBatch at all:\n{m4}"
    );
    assert!(
        batched(&m4) >= 2.0 * batches(&m4),
        "a CompleteBatch carries two completions or more (one goes alone as Complete): {} in {}",
        batched(&m4),
        batches(&m4)
    );
}

/// A drained agent gives back the rounds waiting in its queue at once (not left to expire):
/// only the running round finishes and commits; another worker then gets the given-back
/// rounds and the job finishes with its exact quota and no staging left.
#[test]
fn drain_gives_back_the_queued_leases_and_the_job_still_finishes() {
    let c = Coord::start("120");
    let mut a = c.worker(
        &[
            "--gpu",
            "0",
            "--gpu-inventory",
            "none",
            "--lease-batch",
            "4",
            "--drain-grace",
            "30",
        ],
        "a.log",
    );
    let pids = c.root().join("pids");
    c.submit(&job(
        &c,
        "queued",
        6,
        &["--pid_file", "pids/{name}.pid", "--sleep_ms", "1500"],
        "",
        "",
    ));
    wait_until(
        "the first round running with three more queued",
        Duration::from_secs(15),
        || {
            files_under(&pids).len() == 1
                && c.status("queued")
                    .is_some_and(|s| s["rounds_in_flight"] == 4)
        },
    );
    signal(&a, libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut a, Duration::from_secs(20)),
        0,
        "{}",
        c.log("a.log")
    );
    let s = c.status("queued").unwrap();
    assert_eq!(s["rounds_committed"], 1, "{s}");
    assert_eq!(s["failed_attempts"], 0, "{s}");
    assert_eq!(
        s["rounds_in_flight"], 0,
        "queued leases given back, not left to expire: {s}"
    );
    assert_eq!(
        files_under(&pids).len(),
        1,
        "a queued round started after SIGTERM"
    );

    let _b = c.worker(
        &[
            "--gpu",
            "1",
            "--gpu-inventory",
            "none",
            "--lease-batch",
            "4",
        ],
        "b.log",
    );
    let s = c.watch("queued");
    assert_eq!(s["state"], "done", "{s}\n{}", c.log("b.log"));
    assert_eq!(s["failed_attempts"], 0, "{s}");
    let m = c.manifest("queued");
    assert_eq!(m["objects"]["obj"]["collected"], 6 * BATCH, "{m}");
    c.wait_staging_empty("queued");
}
