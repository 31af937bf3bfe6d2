//! A real S3-compatible server for tests: moto's server mode (`pip install 'moto[server]'`),
//! started on a free loopback port, in memory, killed when its guard is dropped. It accepts any
//! credentials. A missing `moto_server` fails the test with what to install; nothing is skipped.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, log_tail};

/// How long a started moto may take to answer (it is usually up in well under a second).
const UP_WITHIN: Duration = Duration::from_secs(20);
/// Fresh ports are tried this many times when moto cannot start (a port taken in between).
const START_TRIES: usize = 5;
/// Dummy credentials: moto accepts any, object_store insists on some.
const ACCESS_KEY: &str = "quarry-test";
const SECRET_KEY: &str = "quarry-test-secret";
const REGION: &str = "us-east-1";

/// One moto server with one bucket, killed when dropped.
pub struct Moto {
    dir: tempfile::TempDir,
    port: u16,
    bucket: String,
    child: Option<Child>,
}

impl Moto {
    /// Starts moto on a free loopback port, waits until it answers, and creates `bucket`.
    pub fn start(bucket: &str) -> Moto {
        let bin = find_moto();
        let mut moto = Moto {
            dir: tempfile::tempdir().expect("temp dir for moto"),
            port: 0,
            bucket: bucket.to_string(),
            child: None,
        };
        let mut errors = Vec::new();
        for _ in 0..START_TRIES {
            moto.port = free_port();
            match moto.spawn_and_wait(&bin) {
                Ok(()) => {
                    let (status, body) = moto.request("PUT", &format!("/{bucket}"));
                    assert!(
                        status == 200,
                        "creating bucket {bucket} on moto: HTTP {status}\n{body}"
                    );
                    return moto;
                }
                Err(e) => {
                    moto.kill();
                    errors.push(e);
                }
            }
        }
        panic!(
            "moto_server did not start after {START_TRIES} tries:\n{}",
            errors.join("\n")
        );
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The standard AWS variables that point a process (coordinator, worker) at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
        ]
    }

    /// The same settings as `Store::open_with_options` keys, for a store in the test process
    /// (whose environment tests must not change).
    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_access_key_id", ACCESS_KEY.into()),
            ("aws_secret_access_key", SECRET_KEY.into()),
            ("aws_region", REGION.into()),
            ("aws_endpoint", self.endpoint()),
        ]
    }

    /// Opens `s3://<bucket>/<prefix>` on this server.
    pub fn store(&self, prefix: &str) -> quarry_common::storage::Store {
        self.store_via(&self.endpoint(), prefix)
    }

    /// Opens `s3://<bucket>/<prefix>` on this server reached at `endpoint` (a proxy in front
    /// of it, such as [`crate::faultproxy::FaultProxy::endpoint`]).
    pub fn store_via(&self, endpoint: &str, prefix: &str) -> quarry_common::storage::Store {
        let mut opts = self.options();
        for (k, v) in &mut opts {
            if *k == "aws_endpoint" {
                *v = endpoint.to_string();
            }
        }
        quarry_common::storage::Store::open_with_options(
            &format!("s3://{}/{prefix}", self.bucket),
            opts.iter().map(|(k, v)| (*k, v.as_str())),
        )
        .expect("open the moto store")
    }

    /// Multipart uploads started and neither completed nor aborted, as S3's
    /// ListMultipartUploads reports them (their keys).
    pub fn open_multipart_uploads(&self) -> Vec<String> {
        let (status, body) = self.request("GET", &format!("/{}?uploads", self.bucket));
        assert_eq!(status, 200, "ListMultipartUploads: {body}");
        body.split("<Upload>")
            .skip(1)
            .map(|u| {
                u.split("<Key>")
                    .nth(1)
                    .and_then(|k| k.split("</Key>").next())
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    /// One unsigned HTTP/1.1 request (moto does not check signatures); status and body.
    fn request(&self, method: &str, path: &str) -> (u16, String) {
        try_request(self.port, method, path)
            .unwrap_or_else(|e| panic!("{method} {path} on moto port {}: {e}", self.port))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    fn spawn_and_wait(&mut self, bin: &Path) -> Result<(), String> {
        let log = File::create(self.log_path()).expect("moto log file");
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("moto log file"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + UP_WITHIN;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("moto process status"))
            {
                return Err(format!(
                    "moto_server exited with {status} (port {}); its log:\n{}",
                    self.port,
                    log_tail(&self.log_path())
                ));
            }
            let probe = try_request(self.port, "GET", "/");
            if matches!(probe, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "moto_server on port {} did not answer within {UP_WITHIN:?} ({probe:?}); its \
                     log:\n{}",
                    self.port,
                    log_tail(&self.log_path())
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn try_request(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

/// `moto_server` from PATH; a missing one fails the test with what to install.
fn find_moto() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "moto_server is not on PATH: the S3 store tests need an S3-compatible server; \
                 install it with `pip install 'moto[server]'` (or run .ci/run, which installs it \
                 into .ci/venv-moto)"
            )
        })
}
