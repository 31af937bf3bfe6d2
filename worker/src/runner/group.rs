//! Signalling and watching the process group a run lives in.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`ProcessGroup::wait_empty`] looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// What is left of a process group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GroupState {
    /// No process has this group id any more.
    Gone,
    /// Only zombies are left: dead processes whose parent (typically an init that does not reap,
    /// as in some containers) has not collected them. They hold no memory, files or GPU
    /// context, so for the runner's purposes the group is dead.
    ZombiesOnly,
    /// At least one member is running (or could not be inspected).
    Live,
}

/// The process group of one run, whose id is the leader's pid. While armed, dropping it
/// SIGKILLs the whole group, so a run whose future is dropped (or that panics) leaves nothing
/// behind.
#[derive(Debug)]
pub(super) struct ProcessGroup {
    pgid: libc::pid_t,
    armed: bool,
}

impl ProcessGroup {
    /// The group led by `pid`, or `None` for ids that `kill(-pgid)` must never be sent to
    /// (`kill(0)` is our own group, `kill(-1)` is every process we may signal).
    pub(super) fn new(pid: u32) -> Option<Self> {
        let pgid = libc::pid_t::try_from(pid).ok().filter(|&p| p > 1)?;
        Some(Self { pgid, armed: true })
    }

    pub(super) fn id(&self) -> libc::pid_t {
        self.pgid
    }

    /// Sends `sig` to every member. A group that is already gone is not an error.
    pub(super) fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        match kill(-self.pgid, sig) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    pub(super) async fn state(&self) -> GroupState {
        match kill(-self.pgid, 0) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => GroupState::Gone,
            // EPERM means a member exists that we may not signal: count it as alive.
            Err(_) => GroupState::Live,
            Ok(()) => {
                let pgid = self.pgid;
                match tokio::task::spawn_blocking(move || has_live_member(pgid)).await {
                    Ok(Some(false)) => GroupState::ZombiesOnly,
                    _ => GroupState::Live,
                }
            }
        }
    }

    /// Waits until no live member is left, or `deadline` passes. Returns whether the group
    /// emptied.
    pub(super) async fn wait_empty(&self, deadline: Instant) -> bool {
        loop {
            if self.state().await != GroupState::Live {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep_until(deadline.min(Instant::now() + POLL_INTERVAL)).await;
        }
    }

    /// Stops the drop guard. Called once the runner has done its own cleanup: after the leader
    /// is reaped and the group is empty, its id may be reused by an unrelated process.
    pub(super) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = self.signal(libc::SIGKILL)
        {
            tracing::warn!(pgid = self.pgid, error = %e, "failed to kill process group on drop");
        }
    }
}

fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes two integers and reads or writes no memory of this process, so it
    // has no memory-safety preconditions. Which processes it reaches is a correctness matter,
    // handled by `ProcessGroup::new` refusing the ids 0 and 1.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether some process in group `pgid` is not a zombie; `None` when `/proc` cannot be read.
#[cfg(target_os = "linux")]
fn has_live_member(pgid: libc::pid_t) -> Option<bool> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // The process may have been reaped since the directory was listed.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp ...`; comm may itself contain spaces and parentheses.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next().unwrap_or("");
        let pgrp = fields.nth(1).and_then(|s| s.parse::<libc::pid_t>().ok());
        if pgrp != Some(pgid) {
            continue;
        }
        let dead = matches!(state, "Z" | "X");
        // A zombie leader whose other threads still run shows `Z` too.
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0);
        if !dead || threads > 1 {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(not(target_os = "linux"))]
fn has_live_member(_pgid: libc::pid_t) -> Option<bool> {
    None
}
