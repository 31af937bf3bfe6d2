//! A warm generator: one long-lived process that serves many rounds, each handed to it as one
//! JSON line on its stdin and answered with one JSON line on a dedicated descriptor (fd
//! [`REPLY_FD`], its number in [`REPLY_FD_VAR`]). Its stdout and stderr stay the round's log:
//! what it prints while a round runs is that round's log, split at the reply.
//!
//! The process lives in its own process group with the run mark in its environment, exactly
//! as a per-round run (see the parent module): a round that times out or is cancelled, a
//! process that dies, or a [`WarmProcess`] that is dropped, kills the whole group and sweeps
//! what escaped it. A warm process that was stopped is never reused: the next round starts a
//! fresh one.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStdin};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::group::ProcessGroup;
use super::leftovers::RunMark;
use super::{
    BoundedLog, DRAIN_AFTER_EXIT, READ_CHUNK, RunError, RunOutcome, RunReport, SweepOnDrop,
    check_cwd, command, confirm_gone, drain, group_of, outcome_of, signal_group, spawn_error, stop,
};

/// The descriptor a warm generator writes its replies to.
pub const REPLY_FD: i32 = 3;
/// The variable that tells a warm generator [`REPLY_FD`].
pub const REPLY_FD_VAR: &str = "QUARRY_REPLY_FD";
/// Longest reply line accepted; a longer one is a broken generator, not a reply.
const MAX_REPLY: usize = 64 * 1024;

/// What starts a warm generator. Two tasks with equal specs can share a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmSpec {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// Time between SIGTERM and SIGKILL when the process is stopped.
    pub kill_grace: Duration,
    /// Bytes of output kept per round.
    pub log_limit: usize,
}

/// A running warm generator. Dropped while running (its agent's task aborted), it SIGKILLs
/// its process group and sweeps what escaped it.
pub struct WarmProcess {
    spec: WarmSpec,
    child: Child,
    group: ProcessGroup,
    mark: RunMark,
    stdin: Option<ChildStdin>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    replies: pipe::Receiver,
    /// Reply bytes read but not yet ending in a newline.
    pending: Vec<u8>,
    /// Rounds this process answered.
    served: u32,
    sweep_on_drop: SweepOnDrop,
}

/// How a round handed to a warm process ended.
#[derive(Debug)]
pub struct WarmRound {
    /// `Exited(0)` for a `done` reply; [`RunOutcome::Failed`] for a `failed` one (its reason in
    /// the report); otherwise how the process ended (it is dead or was stopped).
    pub report: RunReport,
    /// Whether the process is still usable for the next round.
    pub alive: bool,
}

impl WarmProcess {
    /// Starts the generator. It is the leader of a new process group, with `QUARRY_WARM=1`,
    /// [`REPLY_FD_VAR`] and the run mark in its environment.
    pub async fn start(spec: WarmSpec) -> Result<WarmProcess, RunError> {
        let program = spec.argv.first().ok_or(RunError::EmptyArgv)?.clone();
        let spawn_err = |source| spawn_error(&program, &spec.cwd, source);
        check_cwd(&spec.cwd).await?;
        let (reply_read, reply_write) = reply_pipe().map_err(spawn_err)?;
        let mut mark = RunMark::new();
        let mut cmd = command(&spec.argv, &spec.cwd, &spec.env, &mark).map_err(spawn_err)?;
        cmd.env("QUARRY_WARM", "1")
            .env(REPLY_FD_VAR, REPLY_FD.to_string())
            .stdin(Stdio::piped());
        let write_fd = reply_write.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls dup2, which
        // is async-signal-safe; `write_fd` stays open in the parent until after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 clears close-on-exec on the new descriptor, so fd 3 reaches the program.
                if libc::dup2(write_fd, REPLY_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        // The child has its copy: ours must go, or the reply pipe never sees EOF.
        drop(reply_write);
        let group = group_of(&child, &mut mark, &program, &spec.cwd)?;
        debug!(program = %program, pgid = group.id(), "warm generator started");
        let receiver =
            |fd: Option<OwnedFd>| fd.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok());
        let stdout = receiver(child.stdout.take().and_then(|o| o.into_owned_fd().ok()));
        let stderr = receiver(child.stderr.take().and_then(|o| o.into_owned_fd().ok()));
        let replies = pipe::Receiver::from_owned_fd(reply_read).map_err(spawn_err)?;
        let sweep_on_drop = SweepOnDrop(Some(mark.clone()));
        Ok(WarmProcess {
            sweep_on_drop,
            stdin: child.stdin.take(),
            spec,
            child,
            group,
            mark,
            stdout,
            stderr,
            replies,
            pending: Vec::new(),
            served: 0,
        })
    }

    /// What this process was started with.
    pub fn spec(&self) -> &WarmSpec {
        &self.spec
    }

    /// Rounds it answered so far.
    pub fn served(&self) -> u32 {
        self.served
    }

    /// Resident host memory (bytes) of its process group: the generator and what it started.
    pub fn resident_bytes(&self) -> std::io::Result<u64> {
        let pgid = u32::try_from(self.group.id())
            .map_err(|_| std::io::Error::other("the generator has no process group"))?;
        super::memory::group_rss_bytes(pgid)
    }

    /// Its process group's id: the generator's pid (it leads the group).
    pub fn group_id(&self) -> Option<u32> {
        u32::try_from(self.group.id()).ok()
    }

    /// Whether it has exited (between rounds: killed by the OOM killer, crashed in a
    /// background thread). Such a process is replaced before the next round is handed over,
    /// so that the round is not charged with a death it did not cause.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Hands it one round (`line`, one JSON object without a newline) and waits for its
    /// reply, its death, the timeout or `cancel`. A process that did not reply is stopped
    /// (SIGTERM, grace, SIGKILL, leftovers swept) before this returns.
    pub async fn round(
        &mut self,
        line: &str,
        limit: Option<Duration>,
        cancel: &CancellationToken,
    ) -> WarmRound {
        let start = Instant::now();
        let mut log = BoundedLog::new(self.spec.log_limit);
        if cancel.is_cancelled() {
            return WarmRound {
                report: report(RunOutcome::Cancelled, start, log, None),
                alive: true,
            };
        }
        let mut msg = Vec::with_capacity(line.len() + 1);
        msg.extend_from_slice(line.as_bytes());
        msg.push(b'\n');
        let sent = match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(&msg).await.and(stdin.flush().await),
            None => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
        };
        if let Err(e) = sent {
            // It died between rounds: its exit is this round's outcome.
            debug!(error = %e, "warm generator did not take the round");
        }
        let deadline = limit.map(|l| start + l);
        let mut out_buf = vec![0u8; READ_CHUNK];
        let mut err_buf = vec![0u8; READ_CHUNK];
        let mut reply_buf = vec![0u8; 4096];
        enum Ended {
            Reply(Result<Option<String>, String>),
            Exit(io::Result<ExitStatus>),
            Stopped(RunOutcome),
        }
        let ended = loop {
            if let Some(reply) = self.take_reply() {
                break Ended::Reply(reply);
            }
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                r = self.replies.read(&mut reply_buf) => match r {
                    Ok(n) if n > 0 => self.pending.extend_from_slice(&reply_buf[..n]),
                    // The reply descriptor closed: the process is going; its exit tells how.
                    _ => break Ended::Exit(self.child.wait().await),
                },
                r = read_some(&mut self.stdout, &mut out_buf) => if let Some(n) = r {
                    log.push(&out_buf[..n]);
                },
                r = read_some(&mut self.stderr, &mut err_buf) => if let Some(n) = r {
                    log.push(&err_buf[..n]);
                },
                status = self.child.wait() => break Ended::Exit(status),
                () = cancel.cancelled() => break Ended::Stopped(RunOutcome::Cancelled),
                () = expired => break Ended::Stopped(RunOutcome::TimedOut),
            }
        };
        match ended {
            Ended::Reply(Ok(reason)) => {
                // Whatever it printed before replying is in the pipes already: it is this
                // round's, not the next one's.
                drain_ready(&self.stdout, &mut log);
                drain_ready(&self.stderr, &mut log);
                self.served += 1;
                let outcome = if reason.is_some() {
                    RunOutcome::Failed
                } else {
                    RunOutcome::Exited(0)
                };
                WarmRound {
                    report: report(outcome, start, log, reason),
                    alive: true,
                }
            }
            Ended::Reply(Err(bad)) => {
                log.push(format!("\nquarry: {bad}\n").as_bytes());
                self.stop(&mut log).await;
                WarmRound {
                    report: report(RunOutcome::Failed, start, log, Some(bad)),
                    alive: false,
                }
            }
            Ended::Exit(status) => {
                self.drain_to_end(&mut log).await;
                self.sweep().await;
                let outcome = status.map(outcome_of).unwrap_or(RunOutcome::Signaled(0));
                WarmRound {
                    report: report(outcome, start, log, None),
                    alive: false,
                }
            }
            Ended::Stopped(outcome) => {
                self.stop(&mut log).await;
                WarmRound {
                    report: report(outcome, start, log, None),
                    alive: false,
                }
            }
        }
    }

    /// Stops the process between rounds (recycle, another job's generator, shutdown): its
    /// stdin is closed so a well-behaved generator ends by itself, then SIGTERM, grace,
    /// SIGKILL, as for a per-round run.
    pub async fn shut_down(mut self) {
        let mut log = BoundedLog::new(self.spec.log_limit);
        self.stop(&mut log).await;
    }

    async fn stop(&mut self, log: &mut BoundedLog) {
        self.stdin = None;
        stop(&mut self.child, &self.group, self.spec.kill_grace).await;
        self.drain_to_end(log).await;
        self.sweep().await;
    }

    /// After the leader is gone: the group and whatever left it go too.
    async fn sweep(&mut self) {
        self.sweep_on_drop.0 = None;
        signal_group(&self.group, libc::SIGKILL);
        if confirm_gone(&self.group, &self.mark).await {
            self.group.disarm();
        }
    }

    async fn drain_to_end(&mut self, log: &mut BoundedLog) {
        let drained = timeout(
            DRAIN_AFTER_EXIT,
            drain(&mut self.stdout, &mut self.stderr, log),
        )
        .await;
        if drained.is_err() {
            warn!(
                "warm generator's output pipes still open after it exited; log may be incomplete"
            );
        }
    }

    /// The first complete reply line, parsed: `Ok(None)` done, `Ok(Some(reason))` failed,
    /// `Err` not a reply.
    fn take_reply(&mut self) -> Option<Result<Option<String>, String>> {
        let Some(end) = self.pending.iter().position(|&b| b == b'\n') else {
            if self.pending.len() > MAX_REPLY {
                self.pending.clear();
                return Some(Err(format!(
                    "the warm generator wrote more than {MAX_REPLY} bytes on fd {REPLY_FD} without a newline"
                )));
            }
            return None;
        };
        let line: Vec<u8> = self.pending.drain(..=end).collect();
        Some(parse_reply(&line))
    }
}

/// Parses one reply line: `{"status": "done"}` or `{"status": "failed", "reason": "..."}`.
pub fn parse_reply(line: &[u8]) -> Result<Option<String>, String> {
    let text = String::from_utf8_lossy(line);
    let v: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
        format!(
            "the warm generator's reply on fd {REPLY_FD} is not JSON ({e}): {:?}",
            text.trim()
        )
    })?;
    match v.get("status").and_then(|s| s.as_str()) {
        Some("done") => Ok(None),
        Some("failed") => Ok(Some(
            v.get("reason")
                .and_then(|r| r.as_str())
                .unwrap_or("no reason given")
                .to_string(),
        )),
        _ => Err(format!(
            "the warm generator's reply on fd {REPLY_FD} has no \"status\" of \"done\" or \"failed\": {:?}",
            text.trim()
        )),
    }
}

fn report(
    outcome: RunOutcome,
    start: Instant,
    log: BoundedLog,
    reason: Option<String>,
) -> RunReport {
    RunReport {
        outcome,
        duration: start.elapsed(),
        log,
        reason,
        leftovers: Default::default(),
    }
}

/// A pipe for replies: the read end for the agent, the write end for the child; both
/// close-on-exec (the child's copy is dup2'ed to [`REPLY_FD`], which clears it).
fn reply_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given, which has room for two.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One read; `None` at EOF, on error or when the pipe is already closed (pending forever then,
/// so that a closed pipe does not spin a select loop).
async fn read_some(pipe: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> Option<usize> {
    let Some(r) = pipe.as_mut() else {
        return std::future::pending().await;
    };
    match r.read(buf).await {
        Ok(0) => {
            *pipe = None;
            None
        }
        Ok(n) => Some(n),
        Err(e) => {
            warn!(error = %e, "reading warm generator output failed");
            *pipe = None;
            None
        }
    }
}

/// Reads what is in `pipe` right now, without waiting: the output a generator wrote before
/// its reply. Reads the descriptor directly, since the runtime may not have seen it become
/// readable yet.
fn drain_ready(pipe: &Option<pipe::Receiver>, log: &mut BoundedLog) {
    let Some(p) = pipe else {
        return;
    };
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: reads at most `buf.len()` bytes into `buf` from a descriptor the receiver
        // keeps open; the descriptor is non-blocking, so this never waits.
        let n = unsafe { libc::read(p.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        log.push(&buf[..n as usize]);
    }
}
