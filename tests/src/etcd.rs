//! A real etcd for tests (Debian package `etcd-server`): started on free loopback ports with
//! its own data directory, killed when its guard is dropped. A missing etcd fails the test with
//! what to install; nothing is skipped.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quarry_coordinator::state::etcd::EtcdStore;

use crate::{free_port, log_tail};

/// How long a started etcd may take to answer.
const HEALTHY_WITHIN: Duration = Duration::from_secs(10);
/// Fresh ports are tried this many times when etcd cannot start (a port taken in between).
const START_TRIES: usize = 5;

/// One etcd server, killed when dropped.
pub struct Etcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd on free loopback ports with a fresh data directory and waits until it
    /// answers.
    pub async fn start() -> Etcd {
        let mut etcd = Etcd {
            bin: find_etcd(),
            dir: tempfile::tempdir().expect("temp dir for etcd"),
            client_port: 0,
            peer_port: 0,
            child: None,
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

    pub fn endpoints(&self) -> Vec<String> {
        vec![format!("http://127.0.0.1:{}", self.client_port)]
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
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
            let probe = EtcdStore::connect_with_timeout(
                &self.endpoints(),
                "/probe",
                Duration::from_secs(1),
            )
            .await;
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
