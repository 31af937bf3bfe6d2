//! A real Prometheus for tests (`prometheus` on PATH, or QUARRY_PROMETHEUS), its HTTP API,
//! and the `promtool` lookup: what `tests/tests/prometheus.rs` and `run_metrics.rs` scrape
//! Quarry's endpoints with. A missing tool fails the test; nothing is skipped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Killed;

/// `QUARRY_<VAR>` or `name` on PATH; panics with how to install it.
pub fn tool(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{var}={} does not exist", p.display());
        return p;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "`{name}` not found on PATH (Debian: apt-get install --no-install-recommends \
                 prometheus; .ci/run does it) and {var} is not set"
            )
        })
}

/// `GET path` over HTTP/1.0 (no chunked encoding to undo); the status code and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of the test's own, killed when dropped.
pub struct Prometheus {
    _proc: Killed,
    /// Where its HTTP API listens.
    pub addr: String,
    /// Its log (stderr), for failure messages.
    pub log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with `config` on a free loopback port. Prometheus cannot be handed a
    /// bound listener, so the port is found free and then bound by Prometheus; the rare loss
    /// of that race (the port taken in between) is retried with another port.
    pub fn start(config: &Path, dir: &Path) -> Prometheus {
        let bin = tool("QUARRY_PROMETHEUS", "prometheus");
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("bind a loopback port")
                .port();
            let addr = format!("127.0.0.1:{port}");
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let data = dir.join(format!("tsdb-{attempt}"));
            let mut proc = Killed(
                Command::new(&bin)
                    .arg(format!("--config.file={}", config.display()))
                    .arg(format!("--storage.tsdb.path={}", data.display()))
                    .arg(format!("--web.listen-address={addr}"))
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).expect("create the prometheus log"))
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display())),
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(st) = proc.0.try_wait().expect("poll prometheus") {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(
                        text.contains("address already in use"),
                        "prometheus exited ({st}):\n{text}"
                    );
                    break;
                }
                if matches!(http_get(&addr, "/-/ready"), Ok((200, _))) {
                    return Prometheus {
                        _proc: proc,
                        addr,
                        log,
                    };
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready within 60 s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("prometheus found no free port in 5 attempts");
    }

    /// `GET /api/v1/<path>` as JSON (errors come back as JSON too, with status "error").
    pub fn api(&self, path: &str) -> Value {
        let (code, body) = http_get(&self.addr, &format!("/api/v1/{path}"))
            .unwrap_or_else(|e| panic!("prometheus /api/v1/{path}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| {
            panic!("prometheus /api/v1/{path} answered {code} with no JSON ({e}):\n{body}")
        })
    }

    /// An instant query at the current time.
    pub fn query(&self, expr: &str) -> Value {
        self.api(&format!("query?query={}", url_encode(expr)))
    }

    /// The result of a query that must succeed.
    pub fn results(&self, expr: &str) -> Vec<Value> {
        let v = self.query(expr);
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value of a query, if it has one.
    pub fn scalar(&self, expr: &str) -> Option<f64> {
        let r = self.results(expr);
        r.first()?["value"][1].as_str()?.parse().ok()
    }
}
