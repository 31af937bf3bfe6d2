//! Processes a run leaves outside its process group: a child the generator detached with
//! `setsid` (a daemon, a double fork) escapes the group kill, and would otherwise outlive the
//! round, holding GPU memory and free to change the outputs after they were inspected.
//!
//! Every run is started with a mark of its own in its environment ([`MARK_VAR`]), which its
//! descendants inherit across fork, exec and `setsid`. When the run ends, every live process
//! carrying the mark, or descending from one that does, is SIGKILLed, again until none is
//! left (bounded). Only processes started since the run's leader are looked at, and only this
//! run's mark counts: the agents of one process (`coordinator run`, one per GPU) never touch
//! each other's generators, and nothing else of the process (the coordinator) is affected.
//!
//! The agent is deliberately not made a child subreaper: orphans then go to init, which reaps
//! them, instead of piling up as zombies of a process whose runtime only waits for the
//! children it spawned (and whose other children's exit statuses must not be stolen).
//!
//! Limit: a descendant that both clears its environment and leaves the tree of every marked
//! process (its marked parent exits) is not found. That takes intent, not accident.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The environment variable that marks a run's processes.
pub const MARK_VAR: &str = "QUARRY_RUN_MARK";

/// How often the sweep looks again for processes that escaped the previous kill.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Environments larger than this are read only this far (the mark is set at spawn, so it is
/// near the end of a child's environment only when the environment is huge).
const ENVIRON_LIMIT: u64 = 1 << 20;

/// Ancestors followed from one process when looking for a marked one.
const MAX_DEPTH: usize = 256;

/// The mark of one run and where to look for its processes.
#[derive(Clone, Debug)]
pub(super) struct RunMark {
    /// `QUARRY_RUN_MARK=<value>`, as it appears in `/proc/<pid>/environ`.
    entry: Vec<u8>,
    value: String,
    /// The leader's start time (clock ticks since boot); its descendants start no earlier.
    since: u64,
}

impl RunMark {
    /// A mark no other run of any process has: this process's id, a counter and the time.
    pub(super) fn new() -> RunMark {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let value = format!("{}-{n}-{nanos}", std::process::id());
        RunMark {
            entry: format!("{MARK_VAR}={value}").into_bytes(),
            value,
            since: 0,
        }
    }

    /// The value to set in the run's environment.
    pub(super) fn value(&self) -> &str {
        &self.value
    }

    /// Records the leader's start time, which bounds the processes the sweep reads.
    pub(super) fn started(&mut self, leader: u32) {
        if let Some(p) = read_stat(&format!("/proc/{leader}/stat")) {
            self.since = p.start;
        }
    }

    /// SIGKILLs every live process of the run, again until none is left or `deadline` passes.
    /// Returns whether none is left.
    pub(super) async fn kill_all(&self, deadline: Instant) -> bool {
        loop {
            let mark = self.clone();
            let found = tokio::task::spawn_blocking(move || mark.find())
                .await
                .unwrap_or_default();
            if found.is_empty() {
                return true;
            }
            tracing::debug!(pids = ?found, "killing processes the generator left outside its group");
            for pid in &found {
                sigkill(*pid);
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep_until(deadline.min(Instant::now() + POLL_INTERVAL)).await;
        }
    }

    /// [`RunMark::kill_all`] from a thread of its own, for a run whose future was dropped.
    pub(super) fn kill_all_detached(self, limit: Duration) {
        let spawned = std::thread::Builder::new()
            .name("quarry-leftovers".into())
            .spawn(move || {
                let deadline = std::time::Instant::now() + limit;
                loop {
                    let found = self.find();
                    if found.is_empty() || std::time::Instant::now() >= deadline {
                        return;
                    }
                    for pid in &found {
                        sigkill(*pid);
                    }
                    std::thread::sleep(POLL_INTERVAL);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the sweep of a dropped run's processes");
        }
    }

    /// Live processes carrying the mark or descending from one that does; not this process.
    #[cfg(target_os = "linux")]
    fn find(&self) -> Vec<libc::pid_t> {
        let me = std::process::id() as libc::pid_t;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut procs: HashMap<libc::pid_t, Stat> = HashMap::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            if let Some(s) = read_stat(&format!("/proc/{pid}/stat")) {
                procs.insert(pid, s);
            }
        }
        let candidates: Vec<libc::pid_t> = procs
            .iter()
            .filter(|&(&pid, s)| pid != me && s.live && s.start >= self.since)
            .map(|(&pid, _)| pid)
            .collect();
        let marked: HashSet<libc::pid_t> = candidates
            .iter()
            .copied()
            .filter(|&pid| self.carried_by(pid))
            .collect();
        candidates
            .into_iter()
            .filter(|&pid| {
                let mut p = pid;
                for _ in 0..MAX_DEPTH {
                    if marked.contains(&p) {
                        return true;
                    }
                    match procs.get(&p) {
                        Some(s) if s.ppid > 1 && s.ppid != me => p = s.ppid,
                        _ => return false,
                    }
                }
                false
            })
            .collect()
    }

    #[cfg(not(target_os = "linux"))]
    fn find(&self) -> Vec<libc::pid_t> {
        Vec::new()
    }

    /// Whether `pid`'s environment holds this mark (an environment that cannot be read, of
    /// another user's process, does not).
    fn carried_by(&self, pid: libc::pid_t) -> bool {
        let Ok(f) = std::fs::File::open(format!("/proc/{pid}/environ")) else {
            return false;
        };
        let mut env = Vec::new();
        if f.take(ENVIRON_LIMIT).read_to_end(&mut env).is_err() {
            return false;
        }
        env.split(|&b| b == 0).any(|e| e == self.entry.as_slice())
    }
}

/// What the sweep needs of `/proc/<pid>/stat`.
struct Stat {
    ppid: libc::pid_t,
    /// Not a zombie: a zombie holds no memory, files or GPU context.
    live: bool,
    start: u64,
}

fn read_stat(path: &str) -> Option<Stat> {
    // One read of a stack buffer: the sweep reads every process's stat after every round, and
    // `read_to_string` on procfs (no size hint) costs a stat and several probing reads each.
    let mut buf = [0u8; 1024];
    let mut f = std::fs::File::open(path).ok()?;
    let n = f.read(&mut buf).ok()?;
    let mut long = Vec::new();
    let bytes = if n < buf.len() {
        &buf[..n]
    } else {
        long.extend_from_slice(&buf);
        f.read_to_end(&mut long).ok()?;
        long.as_slice()
    };
    let stat = std::str::from_utf8(bytes).ok()?;
    // `pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
    // utime stime cutime cstime priority nice num_threads itrealvalue starttime ...`; comm may
    // itself hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = *fields.first()?;
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        live: !matches!(state, "Z" | "X"),
        start: fields.get(19)?.parse().ok()?,
    })
}

fn sigkill(pid: libc::pid_t) {
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) takes two integers and touches no memory of this process. `pid` is a
    // single process (> 1) that carries this run's mark or descends from one that does.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_past_a_comm_with_spaces_and_parentheses() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("stat");
        std::fs::write(
            &p,
            "42 (a (b) c) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10",
        )
        .unwrap();
        let s = read_stat(p.to_str().unwrap()).unwrap();
        assert_eq!((s.ppid, s.live, s.start), (7, true, 98765));
    }

    #[test]
    fn marks_are_unique() {
        assert_ne!(RunMark::new().value(), RunMark::new().value());
    }
}
