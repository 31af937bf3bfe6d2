//! Quarry processes for multi-process tests: `coordinator serve` on a free port, `worker`
//! agents, `coordinator submit --watch`, each killed when its guard is dropped.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::bin;

/// A child process killed (and reaped) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The two-object job the multi-process tests run (exp `served`), in legacy layout under
/// `root`; `extra` is TOML inserted before `[generator]`.
pub fn served_job_file(dir: &Path, root: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"
exp_name = "served"
objects = ["obj_a", "obj_b"]
target_count_per_object = 90
round_batch_size = 25
num_iterations = 2
seed_base = 5
root = "{root}"
{extra}
[generator]
argv = ["python3", "main.py", "--name", "{{name}}", "--object_code", "{{object}}", "--batch_size", "{{batch_size}}",
        "--num_iterations", "{{num_iterations}}", "--seed", "{{seed}}", "--gpu", "0", "--yield_mode", "uneven"]
cwd = "BimanGrasp-Optimization"
output = "data/experiments/{{name}}/results/{{object}}.npy"
round_dir = "data/experiments/{{name}}"
"#,
        root = root.display()
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, text).expect("write job file");
    p
}

/// [`served_job_file`] whose generator sleeps `sleep_ms` per round (0: no sleep), so that a
/// test can act while rounds are running.
pub fn slow_job_file(dir: &Path, root: &Path, sleep_ms: u32) -> PathBuf {
    let job = served_job_file(dir, root, "");
    if sleep_ms > 0 {
        let text = std::fs::read_to_string(&job)
            .expect("read job file")
            .replace(
                "\"uneven\"]",
                &format!("\"uneven\", \"--sleep_ms\", \"{sleep_ms}\"]"),
            );
        std::fs::write(&job, text).expect("write job file");
    }
    job
}

/// The same job run by `coordinator run` (with `args` added) in a fresh legacy root: the
/// finals a cluster run must equal byte for byte.
pub async fn reference_run(sleep_ms: u32, args: &[&str]) -> tempfile::TempDir {
    let reference = crate::legacy_root();
    let job = slow_job_file(reference.path(), reference.path(), sleep_ms);
    crate::run_job_to_end(&job, args).await;
    reference
}

/// Starts `coordinator serve` on a free loopback port with `--state state --store store`,
/// its stderr copied to `log`; returns it and the address it printed once listening.
pub fn start_serve(
    state: &str,
    store: &str,
    ttl: &str,
    env: &[(&str, String)],
    log: &Path,
) -> (Killed, String) {
    start_serve_on("127.0.0.1:0", state, store, ttl, env, log)
}

/// [`start_serve`] listening on `listen` (e.g. the address of a coordinator being restarted).
pub fn start_serve_on(
    listen: &str,
    state: &str,
    store: &str,
    ttl: &str,
    env: &[(&str, String)],
    log: &Path,
) -> (Killed, String) {
    spawn_serve(
        listen,
        &["--lease-ttl", ttl, "--state", state, "--store", store],
        env,
        log,
    )
}

/// `coordinator serve --listen 127.0.0.1:0 ARGS...`, as [`start_serve`] (with
/// `--allow-unauthenticated` unless ARGS authenticate callers).
pub fn start_serve_with(args: &[&str], env: &[(&str, String)], log: &Path) -> (Killed, String) {
    spawn_serve("127.0.0.1:0", args, env, log)
}

/// Whether `args`/`env` say how `serve` treats unauthenticated callers: a token, client
/// certificates, or `--allow-unauthenticated` already.
fn says_who_may_call(args: &[&str], env: &[(&str, String)]) -> bool {
    const FLAGS: [&str; 3] = [
        "--auth-token-file",
        "--tls-client-ca",
        "--allow-unauthenticated",
    ];
    args.iter()
        .any(|a| FLAGS.contains(&a.split('=').next().unwrap_or(a)))
        || env
            .iter()
            .any(|(k, _)| ["QUARRY_AUTH_TOKEN_FILE", "QUARRY_TLS_CLIENT_CA"].contains(k))
}

/// `coordinator serve --listen LISTEN ARGS...`. A test that gives neither a token nor client
/// certificates is one about something else, on loopback: it gets `--allow-unauthenticated`,
/// the flag `serve` requires to start without them.
fn spawn_serve(
    listen: &str,
    args: &[&str],
    env: &[(&str, String)],
    log: &Path,
) -> (Killed, String) {
    let open: &[&str] = if says_who_may_call(args, env) {
        &[]
    } else {
        &["--allow-unauthenticated"]
    };
    let mut serve = Command::new(bin("coordinator"))
        .args(["serve", "--listen", listen])
        .args(args)
        .args(open)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator");
    let stderr = serve.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out = std::fs::File::create(log).expect("coordinator log");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(out, "{line}");
            if let Some(rest) = line.strip_prefix("coordinator listening on ") {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("coordinator printed its address");
    (Killed(serve), addr)
}

/// `coordinator serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 ARGS...` (exactly
/// these flags, nothing added) run to its exit, which must come within 30 s: for tests of how
/// it refuses to start or stops on a bad setting. A process still running then is killed and
/// the test fails.
pub fn serve_exits(args: &[&str], env: &[(&str, String)]) -> Output {
    let child = Command::new(bin("coordinator"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start coordinator");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.expect("wait for coordinator"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped (the thread still
            // waits for it).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("coordinator serve {args:?} was still running after 30 s instead of exiting");
        }
    }
}

/// The line of a process's stderr that starts with `error:` (the binaries' one-sentence
/// failure), or a panic showing all of it.
pub fn error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    err.lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no `error:` line (status {:?}):\n{err}", out.status))
        .to_string()
}

/// Starts `worker --gpu gpus --coordinator addr`, its stderr to `log` (discarded if `None`).
pub fn spawn_worker(addr: &str, gpus: &str, env: &[(&str, String)], log: Option<&Path>) -> Killed {
    spawn_worker_args(&["--gpu", gpus, "--coordinator", addr], env, log)
}

/// Starts `worker ARGS...`, its stderr to `log` (discarded if `None`).
pub fn spawn_worker_args(args: &[&str], env: &[(&str, String)], log: Option<&Path>) -> Killed {
    let stderr = match log {
        Some(p) => Stdio::from(std::fs::File::create(p).expect("worker log")),
        None => Stdio::null(),
    };
    Killed(
        Command::new(bin("worker"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(stderr)
            .spawn()
            .expect("start worker"),
    )
}

/// `coordinator status JOB --json` (the job's object in the array), or `None` when the
/// coordinator does not answer or know the job.
pub fn status(addr: &str, job: &str) -> Option<serde_json::Value> {
    let out = Command::new(bin("coordinator"))
        .args(["status", job, "--json", "--coordinator", addr])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .map(|v| v[0].clone())
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `coordinator submit JOB --coordinator addr [--watch]`, waited for.
pub fn submit(job: &Path, addr: &str, watch: bool) -> Output {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.arg("submit").arg(job).args(["--coordinator", addr]);
    if watch {
        cmd.arg("--watch");
    }
    cmd.output().expect("run coordinator submit")
}

/// The `/metrics` address a process printed to its log (`metrics on http://ADDR/metrics`),
/// waited for up to 10 s.
pub fn metrics_addr(log: &Path) -> String {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(rest) = text
            .lines()
            .find_map(|l| l.strip_prefix("metrics on http://"))
        {
            return rest.trim_end_matches("/metrics").to_string();
        }
        assert!(
            std::time::Instant::now() < until,
            "no metrics address in the log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An HTTP GET of `path` on `addr`: the whole answer, status line and headers included.
pub fn scrape(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send the request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    out
}

/// The value of the sample line `series` (name plus labels, exactly as rendered).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series:?} in:\n{text}"))
}

/// Waits (bounded by `limit`) until `log` contains `needle`; returns the log's text then.
/// Panics with the log when it does not.
pub fn wait_for_log(log: &Path, needle: &str, limit: Duration) -> String {
    let until = std::time::Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            std::time::Instant::now() < until,
            "{needle:?} not in {} within {limit:?}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `served` job ([`slow_job_file`], rounds of `sleep_ms`) submitted to two `coordinator
/// serve` processes on one etcd (`--lease-ttl 8 --election-ttl 3`), `a` elected first and `b`
/// campaigning, and a worker with agents `0,1` knowing both; logs in `home`.
pub struct FailoverPair {
    pub a: Killed,
    pub b: Killed,
    pub worker: Killed,
    pub addr_b: String,
    /// Both addresses, comma-separated.
    pub both: String,
    pub log_b: PathBuf,
    pub worker_log: PathBuf,
}

impl FailoverPair {
    pub fn start(etcd: &str, home: &Path, root: &Path, sleep_ms: u32) -> FailoverPair {
        let job = slow_job_file(home, root, sleep_ms);
        let state = format!(
            "etcd://{}/quarry-failover",
            etcd.trim_start_matches("http://")
        );
        let store_url = format!("file://{}", home.join("store").display());
        let args = [
            "--state",
            &state,
            "--store",
            &store_url,
            "--lease-ttl",
            "8",
            "--election-ttl",
            "3",
        ];
        let env = [("QUARRY_LOG", "info".to_string())];
        let (log_a, log_b) = (home.join("a.log"), home.join("b.log"));
        let (a, addr_a) = start_serve_with(&args, &env, &log_a);
        wait_for_log(&log_a, "elected leader", Duration::from_secs(20));
        let (b, addr_b) = start_serve_with(&args, &env, &log_b);
        wait_for_log(&log_b, "campaigning", Duration::from_secs(20));
        let both = format!("{addr_a},{addr_b}");
        let worker_log = home.join("worker.log");
        let worker = spawn_worker(&both, "0,1", &env, Some(&worker_log));
        let submit = submit(&job, &both, false);
        assert!(
            submit.status.success(),
            "submit: {}",
            String::from_utf8_lossy(&submit.stderr)
        );
        FailoverPair {
            a,
            b,
            worker,
            addr_b,
            both,
            log_b,
            worker_log,
        }
    }

    /// The job's status through both addresses; panics when neither answers.
    pub fn status(&self) -> serde_json::Value {
        status(&self.both, "served").expect("a coordinator answers `status served`")
    }
}
