//! Running a real binary to its end within a bound: its exit code and what it printed. A
//! process that outlives the bound is killed and the test fails with its output, so a
//! command that should be refused at once can never hang a test.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::Killed;

/// How a process ended.
#[derive(Debug)]
pub struct Ended {
    /// `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` (stdout and stderr to files under `dir`, so both are pipes-not-terminals and
/// nothing blocks on a full pipe) until it exits; panics with its output after `limit`.
pub fn run_within(cmd: &mut Command, dir: &Path, limit: Duration) -> Ended {
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let out = std::fs::File::create(&out_path).expect("create stdout file");
    let err = std::fs::File::create(&err_path).expect("create stderr file");
    let mut child = Killed(
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.0.try_wait().expect("poll the child") {
            break st;
        }
        if Instant::now() >= deadline {
            drop(child);
            panic!(
                "{cmd:?} still running after {limit:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ended {
        code: status.code(),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// How many processes of this machine run the executable `exe` now (`/proc/PID/exe`, after
/// resolving links): what proves that processes someone else started (Slurm, a batch script)
/// are the binary a test meant them to be.
pub fn running_instances_of(exe: &Path) -> usize {
    let want = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    pids()
        .into_iter()
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == want))
        .count()
}

/// What `/proc/PID/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// The state letter (`R`, `S`, `T` stopped, `Z` zombie, ...).
    pub state: char,
    pub ppid: u32,
    /// Its process group.
    pub pgrp: u32,
}

impl Stat {
    /// Running, sleeping or stopped: not a zombie (nothing reaps orphans in some containers,
    /// and a zombie holds no GPU or files) and not dead.
    pub fn live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }
}

/// `pid`'s state, parent and group; `None` once it is gone. The command name may hold spaces
/// and parentheses: the fields are read after its last `)`.
pub fn stat(pid: u32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut it = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    let pgrp = it.next()?.parse().ok()?;
    Some(Stat { state, ppid, pgrp })
}

/// The ids of the processes of this machine now (`/proc`'s numeric entries).
pub fn pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}
