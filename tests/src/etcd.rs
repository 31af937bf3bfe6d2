//! A real etcd for tests (Debian package `etcd-server`): started on free loopback ports with
//! its own data directory, killed when its guard is dropped; optionally serving its clients
//! over TLS and requiring client certificates ([`Etcd::start_tls`]). A missing etcd fails the
//! test with what to install; nothing is skipped.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quarry_coordinator::state::etcd::{EtcdAccess, EtcdStore};

use crate::{free_port, log_tail};

/// How long a started etcd may take to answer.
const HEALTHY_WITHIN: Duration = Duration::from_secs(10);
/// Fresh ports are tried this many times when etcd cannot start (a port taken in between).
const START_TRIES: usize = 5;

/// PEM files of an etcd that serves its clients over TLS and requires client certificates
/// (`--cert-file --key-file --client-cert-auth --trusted-ca-file`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the server's certificate and that client certificates must chain to.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate and key the CA signed (for the harness's own probe).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// One etcd server, killed when dropped.
pub struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    tls: Option<TlsFiles>,
}

impl Etcd {
    /// Starts etcd on free loopback ports with a fresh data directory and waits until it
    /// answers.
    pub async fn start() -> Etcd {
        Etcd::start_with(None).await
    }

    /// [`Etcd::start`] serving clients over TLS only, with client certificates required.
    pub async fn start_tls(tls: TlsFiles) -> Etcd {
        Etcd::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<TlsFiles>) -> Etcd {
        let mut etcd = Etcd {
            bin: find_etcd(),
            dir: tempfile::tempdir().expect("temp dir for etcd"),
            client_port: 0,
            peer_port: 0,
            child: None,
            tls,
        };
        let mut errors = Vec::new();
        for _ in 0..START_TRIES {
            (etcd.client_port, etcd.peer_port) = (free_port(), free_port());
            match etcd.spawn_and_wait().await {
                Ok(()) => return etcd,
                Err(e) => {
                    etcd.kill();
                    // A half-initialized data directory would pin the old ports.
                    let _ = std::fs::remove_dir_all(etcd.data_dir());
                    errors.push(e);
                }
            }
        }
        panic!(
            "etcd did not start after {START_TRIES} tries:\n{}",
            errors.join("\n")
        );
    }

    /// `http://127.0.0.1:PORT`, or `https://` with TLS.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        vec![format!("{scheme}://127.0.0.1:{}", self.client_port)]
    }

    /// `127.0.0.1:PORT`, for `--state etcd://...` and `etcd+tls://...`.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// How a client reaches this etcd: with TLS, trusting its CA and presenting the client
    /// certificate.
    pub fn access(&self) -> EtcdAccess {
        let plain = EtcdAccess::plain(&[format!("http://{}", self.host_port())]);
        match &self.tls {
            None => plain,
            Some(t) => {
                let read = |p: &PathBuf| std::fs::read(p).expect("read a test certificate");
                plain.with_tls(
                    read(&t.ca),
                    Some((read(&t.client_cert), read(&t.client_key))),
                )
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let client = self.endpoints().remove(0);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let child = Command::new(&self.bin)
            .arg("--name=quarry-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .args(["--logger=zap", "--log-level=warn"])
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=quarry-test={peer}"))
            .args(self.tls.iter().flat_map(|t| {
                [
                    format!("--cert-file={}", t.server_cert.display()),
                    format!("--key-file={}", t.server_key.display()),
                    format!("--trusted-ca-file={}", t.ca.display()),
                    "--client-cert-auth".to_string(),
                ]
            }))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
        self.child = Some(child);

        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("etcd process status"))
            {
                return Err(format!(
                    "etcd exited with {status} (ports {}/{}); its log:\n{}",
                    self.client_port,
                    self.peer_port,
                    log_tail(&self.log_path())
                ));
            }
            let probe =
                EtcdStore::connect_with(&self.access(), "/probe", Duration::from_secs(1)).await;
            if probe.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd on port {} did not answer within {HEALTHY_WITHIN:?} ({probe:?}); its \
                     log:\n{}",
                    self.client_port,
                    log_tail(&self.log_path())
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: etcd gets no chance to flush anything it has not already made durable.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same data directory and ports.
    pub async fn restart(&mut self) {
        self.kill();
        let mut errors = Vec::new();
        for _ in 0..START_TRIES {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(e) => {
                    self.kill();
                    errors.push(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        panic!("etcd did not restart:\n{}", errors.join("\n"));
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `etcd` from PATH; a missing etcd fails the test with what to install.
fn find_etcd() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "etcd is not on PATH: the etcd state store tests need a real etcd server; \
                 install it (Debian/Ubuntu: apt-get install etcd-server) or run .ci/run"
            )
        })
}
