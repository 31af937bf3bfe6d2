//! Runs one generator process to completion, timeout or cancellation, and leaves nothing
//! behind.
//!
//! The generator is started directly from its argv (never through a shell) as the leader of a
//! new process group, so that everything it starts (a Python wrapper's CUDA workers, a
//! background logger) can be signalled at once. Whatever the way a run ends (normal exit,
//! timeout, cancel, or the future being dropped), the whole group is killed and the leader is
//! reaped.
//!
//! Stopping a run: SIGTERM to the group, up to `kill_grace` for it to exit, then SIGKILL.
//! After the leader is gone, leftover members are SIGKILLed and the runner waits, bounded,
//! until the group is empty. Processes that left the group (`setsid`) are found by the mark
//! in their environment and killed too (see `leftovers`): nothing of a run outlives it.

mod group;
pub mod launch;
mod leftovers;
mod log;
pub mod memory;
pub mod warm;

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use self::group::ProcessGroup;
pub use self::leftovers::MARK_VAR;
use self::leftovers::RunMark;
pub use self::log::BoundedLog;

/// How long to wait for SIGKILLed processes to disappear before giving up on them. SIGKILL is
/// only delayed by uninterruptible sleep (a wedged driver, a dead NFS mount); such a process
/// is reported and left to the kernel rather than blocking the worker forever.
const KILL_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to keep reading output after the process group is gone. The pipes normally hit
/// EOF at once; only a process that escaped the group (`setsid`) can keep them open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// How long, after the process group is gone, the output pipes may take to report EOF before
/// a process that left the group is taken to hold them.
const PIPES_AT_EXIT: Duration = Duration::from_millis(5);

/// Read buffer per output stream.
const READ_CHUNK: usize = 64 * 1024;

/// What to run and how long to let it run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no slash.
    pub argv: Vec<String>,
    /// Working directory of the child; must exist.
    pub cwd: PathBuf,
    /// Variables set on top of the worker's own environment.
    pub env: Vec<(String, String)>,
    /// Wall-clock limit from spawn; `None` runs until exit or cancel.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when a run is stopped.
    pub kill_grace: Duration,
    /// Bytes of combined stdout/stderr kept in the report (see [`BoundedLog`]).
    pub log_limit: usize,
    /// Cancelled as soon as the process is started (or could not be): for a caller holding
    /// back other work until then (the agent's previous round's upload, which would slow the
    /// start down on a small host).
    pub spawned: Option<CancellationToken>,
    /// Once the generator exited, return as soon as its process group is gone, leaving the
    /// sweep for processes that left the group (`setsid`, a daemon's double fork) to a task
    /// the report holds ([`RunReport::leftovers`]): a caller that starts its next run at once
    /// awaits it before reading this run's outputs, which such a process could still write.
    /// A run stopped (timeout, cancel), or whose output pipes stay open after its group is
    /// gone, is swept before `run` returns either way.
    pub defer_sweep: bool,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The process exited with this code.
    Exited(i32),
    /// The process was killed by this signal, not by the runner.
    Signaled(i32),
    /// The run exceeded [`RunSpec::timeout`] and was killed.
    TimedOut,
    /// The cancellation token fired and the run was killed.
    Cancelled,
    /// A warm generator answered the round with `failed` (its reason in
    /// [`RunReport::reason`]).
    Failed,
    /// The round's output differs from its cold re-run (`generator.audit`; both hashes in
    /// [`RunReport::reason`]).
    AuditMismatch,
}

/// The result of a run that was started (or cancelled before it started).
#[derive(Debug)]
pub struct RunReport {
    pub outcome: RunOutcome,
    /// From spawn until the process group was gone and its output read.
    pub duration: Duration,
    /// Interleaved stdout and stderr.
    pub log: BoundedLog,
    /// Why a warm generator failed the round, in its own words.
    pub reason: Option<String>,
    /// The sweep of processes that left the run's group, when it was left running
    /// ([`RunSpec::defer_sweep`]).
    pub leftovers: Leftovers,
}

/// A run's sweep of its escaped processes, possibly still under way.
#[derive(Debug, Default)]
pub struct Leftovers(Option<tokio::task::JoinHandle<()>>);

impl Leftovers {
    /// Returns once no process of the run is left (or the sweep's bound passed).
    pub async fn swept(&mut self) {
        if let Some(task) = self.0.take() {
            let _ = task.await;
        }
    }
}

impl RunReport {
    /// True only for exit code 0.
    pub fn success(&self) -> bool {
        self.outcome == RunOutcome::Exited(0)
    }
}

/// Why a run could not be started or watched.
#[derive(thiserror::Error, Debug)]
pub enum RunError {
    #[error("empty argv: no program to run")]
    EmptyArgv,
    #[error("working directory {cwd} is unusable: {source}")]
    BadCwd { cwd: PathBuf, source: io::Error },
    #[error("failed to start `{program}` (cwd {cwd}): {source}")]
    Spawn {
        program: String,
        cwd: PathBuf,
        source: io::Error,
    },
    #[error("failed to wait for `{program}`: {source}")]
    Wait { program: String, source: io::Error },
}

/// Runs `spec` until it exits, times out or `cancel` fires, and returns how it ended with its
/// bounded output. When this returns, the child is reaped and its process group has been
/// killed. Dropping the returned future SIGKILLs the group.
pub async fn run(spec: &RunSpec, cancel: CancellationToken) -> Result<RunReport, RunError> {
    // Dropped (cancelling `spawned`) once the process is started, or on any return before.
    let spawned = spec.spawned.clone().map(CancellationToken::drop_guard);
    let program = spec.argv.first().ok_or(RunError::EmptyArgv)?;
    check_cwd(&spec.cwd).await?;
    if cancel.is_cancelled() {
        return Ok(RunReport {
            outcome: RunOutcome::Cancelled,
            duration: Duration::ZERO,
            log: BoundedLog::new(spec.log_limit),
            reason: None,
            leftovers: Leftovers::default(),
        });
    }

    let mut mark = RunMark::new();
    let mut cmd = command(&spec.argv, &spec.cwd, &spec.env, &mark)
        .map_err(|source| spawn_error(program, &spec.cwd, source))?;
    cmd.stdin(Stdio::null());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|source| spawn_error(program, &spec.cwd, source))?;
    drop(spawned);
    let mut group = group_of(&child, &mut mark, program, &spec.cwd)?;
    debug!(program = %program, pgid = group.id(), "generator started");
    // Like the group guard: a dropped run's escaped processes are swept from a thread.
    let mut sweep_on_drop = SweepOnDrop(Some(mark.clone()));

    let mut log = BoundedLog::new(spec.log_limit);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let deadline = spec.timeout.map(|t| start + t);

    let (result, swept) = {
        let (mut stdout, mut stderr) = (stdout, stderr);
        let mut drain = std::pin::pin!(drain(&mut stdout, &mut stderr, &mut log));
        let mut supervise = std::pin::pin!(supervise(
            &mut child,
            &group,
            &mark,
            deadline,
            spec.kill_grace,
            &cancel,
            spec.defer_sweep,
        ));
        // Output is read while the child runs: a child blocked on a full pipe would never exit.
        let mut drained = false;
        let (result, mut swept) = loop {
            tokio::select! {
                result = &mut supervise => break result,
                () = &mut drain, if !drained => drained = true,
            }
        };
        if !drained && !swept {
            // The pipes normally hit EOF with the group's exit; open ones are held by a
            // process that left the group: swept now, so that they close.
            drained = timeout(PIPES_AT_EXIT, &mut drain).await.is_ok();
            if !drained {
                sweep_escaped(group.id(), &mark).await;
                swept = true;
            }
        }
        if !drained && timeout(DRAIN_AFTER_EXIT, &mut drain).await.is_err() {
            warn!(
                program = %program,
                "output pipes still open after the process group exited; log may be incomplete"
            );
        }
        (result, swept)
    };
    // The leader is reaped and the group was SIGKILLed and waited for: from here the group id
    // may be reused, so the guard must not fire.
    let pgid = group.id();
    group.disarm();
    let leftovers = match sweep_on_drop.0.take() {
        Some(mark) if !swept => Leftovers(Some(tokio::spawn(async move {
            sweep_escaped(pgid, &mark).await;
        }))),
        _ => Leftovers::default(),
    };

    let outcome = result.map_err(|source| RunError::Wait {
        program: program.clone(),
        source,
    })?;
    Ok(RunReport {
        outcome,
        duration: start.elapsed(),
        log,
        reason: None,
        leftovers,
    })
}

/// The generator's process, set up as every run's is: `argv` run directly (no shell) in
/// `cwd` with `env` and the run mark, the leader of a new process group, stdout and stderr
/// piped, killed if this process dies: through the registered launcher when there is one
/// (no `fork`, see `launch.rs`), else with a `pre_exec` hook. Stdin is the caller's to set.
/// A program the launcher could not start is refused here with the error a direct start
/// would give.
fn command(
    argv: &[String],
    cwd: &Path,
    env: &[(String, String)],
    mark: &RunMark,
) -> io::Result<Command> {
    let mut cmd = match launch::launcher() {
        Some(launcher) => {
            launch::check_program(&argv[0], cwd, env)?;
            let mut cmd = Command::new(launcher);
            cmd.arg(launch::LAUNCH_ARG)
                .arg(std::process::id().to_string())
                .args(argv);
            cmd
        }
        None => {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            die_with_parent(&mut cmd);
            cmd
        }
    };
    cmd.current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(MARK_VAR, mark.value())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // Backstop for the leader; the group guard covers the rest. Tokio also reaps a
        // dropped child in the background, so dropping never leaves a zombie leader.
        .kill_on_drop(true);
    Ok(cmd)
}

fn spawn_error(program: &str, cwd: &Path, source: io::Error) -> RunError {
    RunError::Spawn {
        program: program.to_string(),
        cwd: cwd.to_path_buf(),
        source,
    }
}

/// The process group a freshly spawned `child` leads, with `mark` told its pid.
fn group_of(
    child: &Child,
    mark: &mut RunMark,
    program: &str,
    cwd: &Path,
) -> Result<ProcessGroup, RunError> {
    // Unreachable for a freshly spawned child; refuse rather than signal a bogus group.
    let Some((pid, group)) = child
        .id()
        .and_then(|pid| Some((pid, ProcessGroup::new(pid)?)))
    else {
        return Err(spawn_error(
            program,
            cwd,
            io::Error::other("spawned child has no usable pid"),
        ));
    };
    mark.started(pid);
    Ok(group)
}

async fn check_cwd(cwd: &Path) -> Result<(), RunError> {
    let bad = |source| RunError::BadCwd {
        cwd: cwd.to_path_buf(),
        source,
    };
    let meta = tokio::fs::metadata(cwd).await.map_err(bad)?;
    if !meta.is_dir() {
        return Err(bad(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    Ok(())
}

/// Waits for the leader to exit, or stops the group on timeout or cancel; then makes sure no
/// member of the group survives, and none of the run's processes that left it unless
/// `defer_sweep` and the leader exited by itself. Returns the outcome and whether that sweep
/// was made.
async fn supervise(
    child: &mut Child,
    group: &ProcessGroup,
    mark: &RunMark,
    deadline: Option<Instant>,
    kill_grace: Duration,
    cancel: &CancellationToken,
    defer_sweep: bool,
) -> (io::Result<RunOutcome>, bool) {
    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let stopped = tokio::select! {
        // An exit that races the deadline counts as an exit.
        biased;
        status = child.wait() => Ok(status),
        () = cancel.cancelled() => Err(RunOutcome::Cancelled),
        () = expired => Err(RunOutcome::TimedOut),
    };
    let sweep = !defer_sweep || stopped.is_err();
    let outcome = match stopped {
        Ok(status) => {
            // The leader is done (or can no longer be waited for): anything it left running in
            // the background goes too.
            signal_group(group, libc::SIGKILL);
            status.map(outcome_of)
        }
        Err(outcome) => {
            debug!(pgid = group.id(), ?outcome, "stopping generator");
            stop(child, group, kill_grace).await;
            Ok(outcome)
        }
    };
    if sweep {
        confirm_gone(group, mark).await;
    } else {
        group_gone(group).await;
    }
    (outcome, sweep)
}

/// After the leader is gone: whatever left the group is killed too (its processes may hold
/// the GPU or still write the outputs about to be inspected), and the group is waited for,
/// bounded. True when the group is empty; what survives SIGKILL is reported.
async fn confirm_gone(group: &ProcessGroup, mark: &RunMark) -> bool {
    sweep_escaped(group.id(), mark).await;
    group_gone(group).await
}

/// SIGKILLs the run's processes that left its group `pgid`, again until none is left
/// (bounded).
async fn sweep_escaped(pgid: i32, mark: &RunMark) {
    if !mark.kill_all(Instant::now() + KILL_CONFIRM_TIMEOUT).await {
        warn!(
            pgid,
            "processes the generator left outside its group are still alive after SIGKILL"
        );
    }
}

/// Waits (bounded) until the group has no live member; true when it has none.
async fn group_gone(group: &ProcessGroup) -> bool {
    let empty = group
        .wait_empty(Instant::now() + KILL_CONFIRM_TIMEOUT)
        .await;
    if !empty {
        warn!(
            pgid = group.id(),
            "process group still has live members after SIGKILL"
        );
    }
    empty
}

/// SIGTERM, up to `grace` for the whole group to exit, then SIGKILL. Reaps the leader unless
/// it ignores SIGKILL for longer than [`KILL_CONFIRM_TIMEOUT`].
async fn stop(child: &mut Child, group: &ProcessGroup, grace: Duration) {
    signal_group(group, libc::SIGTERM);
    // Grace covers the whole group, not just the leader: a wrapper script that exits on
    // SIGTERM at once must not cut short its worker's own cleanup.
    let grace_end = Instant::now() + grace;
    let mut reaped = timeout_at(grace_end, child.wait()).await.is_ok();
    if reaped {
        group.wait_empty(grace_end).await;
    }
    signal_group(group, libc::SIGKILL);
    if !reaped {
        // `Child::wait` is cancel safe, so a wait cut short by the grace deadline can be
        // resumed here.
        reaped = timeout(KILL_CONFIRM_TIMEOUT, child.wait()).await.is_ok();
    }
    if !reaped {
        warn!(
            pgid = group.id(),
            "generator did not exit after SIGKILL; leaving it to be reaped in the background"
        );
    }
}

/// Sweeps a run's escaped processes when the run's future is dropped before its own sweep.
struct SweepOnDrop(Option<RunMark>);

impl Drop for SweepOnDrop {
    fn drop(&mut self) {
        if let Some(mark) = self.0.take() {
            mark.kill_all_detached(KILL_CONFIRM_TIMEOUT);
        }
    }
}

fn signal_group(group: &ProcessGroup, sig: libc::c_int) {
    if let Err(e) = group.signal(sig) {
        warn!(pgid = group.id(), sig, error = %e, "failed to signal process group");
    }
}

fn outcome_of(status: ExitStatus) -> RunOutcome {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => RunOutcome::Exited(code),
        (None, Some(sig)) => RunOutcome::Signaled(sig),
        // Stopped/continued statuses are never returned by wait(); treat as abnormal.
        (None, None) => RunOutcome::Signaled(0),
    }
}

/// Reads both pipes into `log` as data arrives until both reach EOF (each is `None` then).
async fn drain<O, E>(stdout: &mut Option<O>, stderr: &mut Option<E>, log: &mut BoundedLog)
where
    O: AsyncReadExt + Unpin,
    E: AsyncReadExt + Unpin,
{
    let mut out_buf = vec![0u8; READ_CHUNK];
    let mut err_buf = vec![0u8; READ_CHUNK];
    loop {
        // `read` is cancel safe: the branch that loses a select has consumed nothing.
        tokio::select! {
            r = read_some(stdout, &mut out_buf), if stdout.is_some() => match r {
                Some(n) => log.push(&out_buf[..n]),
                None => *stdout = None,
            },
            r = read_some(stderr, &mut err_buf), if stderr.is_some() => match r {
                Some(n) => log.push(&err_buf[..n]),
                None => *stderr = None,
            },
            else => break,
        }
    }
}

/// One read from `pipe`; `None` at EOF, on error, or when the pipe is already closed.
async fn read_some<R: AsyncReadExt + Unpin>(pipe: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    let r = pipe.as_mut()?;
    match r.read(buf).await {
        Ok(0) => None,
        Ok(n) => Some(n),
        Err(e) => {
            warn!(error = %e, "reading generator output failed");
            None
        }
    }
}

/// Makes the generator receive SIGKILL if the agent process dies (kill -9, OOM), so that a
/// dead agent's run cannot keep writing outputs nobody will collect. Linux only; the process
/// group handling covers every other way an agent stops.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid() is async-signal-safe and read before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid, _exit); it touches no shared state.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would signal us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}
