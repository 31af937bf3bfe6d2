//! `kill -9` of a warm generator in the middle of a round, from outside the generator (no
//! cooperation from its code): [`MidRoundKill`] watches `/proc` for the warm processes a job
//! under `root` runs (one per agent, any number of agents), steps them with SIGSTOP/SIGCONT,
//! and SIGKILLs one of them once it has answered a round and is working on the next one.
//!
//! Where a stopped process stands is read without racing it:
//! - a round handed and not yet read: bytes wait in its stdin pipe (`FIONREAD` on
//!   `/proc/PID/fd/0`, opened as a second reader that never reads); the line itself is copied
//!   out with `tee(2)`, which duplicates a pipe's bytes without consuming them, so the watcher
//!   knows which round (and which round directory) the process is about to work on;
//! - between rounds: nothing waits there, it is blocked in `read(0, ...)`
//!   (`/proc/PID/syscall`) and has read nothing since the previous look (`rchar` in
//!   `/proc/PID/io`: one stopped on its way out of the `read` that took its line looks
//!   blocked in it too);
//! - in a round: nothing waits and it is elsewhere (it read the line and has not come back).
//!
//! Observations are made while the processes are stopped, and they run between them in short
//! steps; stopping changes when a process runs, not what it writes. A process waiting between
//! rounds is kept stopped until its next line arrives (it would only wait in `read` anyway), so
//! every line is seen before it is read; one with a signal pending (the agent ending it) is let
//! go. The kill lands in a handler, of a target round: one the final is sure to hold (numbered
//! below a bound the caller gives, so it is retried, and of objects it names), handed to a
//! process that answered a round before (so its restart counts as `died`). It waits, over the
//! first target rounds of a job that declares two outputs (output and stats), for a look
//! that finds a file in the round's directory that was not there when the line was handed
//! while the round's declared outputs are not all there yet (a partial output the retry must
//! replace; once all are there the handler may have answered already); from the next target
//! round on it takes the first look inside the handler before any output, and when rounds
//! outrun the steps it lets the process run just until its stdin is empty (it read the line)
//! and looks then.
//!
//! Which round the kill cost is not taken from the watcher's view (a process could in principle
//! answer one round and read the next within one step): it is the round whose failed attempt's
//! log appears under the experiment's `logs/` after the kill, which the agent uploads when it
//! reports the attempt failed.
//!
//! Needs `/proc/PID/syscall` (Linux) and the rights to signal the generators (the test's own
//! children, as with `coordinator run` in-process).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::process::{pids, stat};
use crate::prometheus::http_get;

/// Where the process stood when the kill landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KilledAt {
    /// In the handler, after the round's output appeared.
    PartialOutput,
    /// In the handler, before any output of the round appeared.
    InHandler,
}

/// The round a kill cost, from the failed attempt's log (`logs/<object>/<tail>/<attempt>.log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KilledRound {
    pub object: String,
    /// `r<round>_s<seed>`.
    pub tail: String,
    pub round: u64,
    /// The attempt killed (`e<epoch>a<n>`).
    pub attempt: String,
    /// The log's path.
    pub log: PathBuf,
}

/// What [`MidRoundKill`] did.
#[derive(Debug)]
pub struct KillReport {
    /// The process killed and where it stood, `None` when no kill happened (the reason in
    /// `trace`).
    pub killed: Option<(u32, KilledAt)>,
    /// The killed process's agent's GPU (its `QUARRY_GPU`).
    pub gpu: Option<String>,
    /// Rounds the killed process was seen to answer before the kill.
    pub answered_before: u32,
    /// The round the watcher saw handed to the killed process last (its `round_name`).
    pub aimed_at: Option<String>,
    /// The round the kill cost, once its failed attempt's log appeared.
    pub round: Option<KilledRound>,
    /// The warm process started after the kill on the killed one's GPU (the restart), when
    /// one was seen.
    pub restarted_as: Option<u32>,
    /// `quarry_worker_generator_starts_total{reason="died"}` summed over every GPU, scraped
    /// once the restart was seen, when a metrics endpoint was given.
    pub died_starts: Option<f64>,
    /// What the watcher saw, for failure messages.
    pub trace: Vec<String>,
}

/// A watcher thread that kills, once, one warm generator of the job under `root` mid-round.
pub struct MidRoundKill {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<KillReport>>,
}

/// Which rounds a kill may land in.
#[derive(Debug, Clone)]
pub struct Targets {
    /// Only rounds numbered below this: give the number of rounds every object needs
    /// whatever its yield (the quota over the batch size, rounded up), so that the killed
    /// round is one the final holds and is retried (a round past the quota, leased ahead by an
    /// idle agent, may not be).
    pub rounds_below: u64,
    /// Only rounds of these objects: with several agents, name objects handed out early, so
    /// that the killed agent has rounds left to start its generator again on (a kill in the
    /// job's last rounds may see its round retried elsewhere and the job end first).
    pub objects: Vec<String>,
}

impl Targets {
    fn hold(&self, l: &Line) -> bool {
        l.round < self.rounds_below && self.objects.contains(&l.object)
    }
}

impl MidRoundKill {
    /// Starts watching the warm generators whose working directory is `root` (the job's
    /// default `cwd`), one per agent. `logs`: the experiment's `logs/` directory in the store,
    /// where the killed attempt's log appears. Only rounds that `targets` holds are killed.
    /// `metrics`: the run's metrics endpoint, scraped for the `died` starts once the restart
    /// is seen. Gives up after `limit`.
    pub fn start(
        root: &Path,
        logs: &Path,
        targets: Targets,
        metrics: Option<String>,
        limit: Duration,
    ) -> MidRoundKill {
        let root = std::fs::canonicalize(root).expect("canonical root");
        let logs = logs.to_path_buf();
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let at = Instant::now() + limit;
                watch(&root, &logs, &targets, metrics, &done, at)
            })
        };
        MidRoundKill {
            done,
            thread: Some(thread),
        }
    }

    /// Stops watching (stopped processes are let go) and says what happened.
    pub fn finish(mut self) -> KillReport {
        self.done.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("not finished yet")
            .join()
            .expect("the watcher thread panicked")
    }
}

impl Drop for MidRoundKill {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Warm generators (the reply descriptor's variable in their environment), leading their own
/// process group, working in `root`, with their agent's GPU (`QUARRY_GPU`).
fn warm_generators(root: &Path) -> Vec<(u32, String)> {
    pids()
        .into_iter()
        .filter_map(|pid| {
            let leader = stat(pid).is_some_and(|s| s.pgrp == pid);
            if !leader || !std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == root) {
                return None;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let mut vars = env.split(|&b| b == 0);
            if !vars.clone().any(|v| v.starts_with(b"QUARRY_REPLY_FD=")) {
                return None;
            }
            let gpu = vars.find_map(|v| v.strip_prefix(b"QUARRY_GPU="))?;
            Some((pid, String::from_utf8_lossy(gpu).into_owned()))
        })
        .collect()
}

/// Whether a signal waits for `pid` (its agent ending it: SIGTERM, to be let through).
fn signal_pending(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status.lines().any(|l| {
        (l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
            && l.split_whitespace()
                .nth(1)
                .is_some_and(|m| !m.trim_start_matches('0').is_empty())
    })
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid this watcher found running the job's generator.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits until `pid` is stopped; false when it is gone (exited, or a zombie).
fn wait_stopped(pid: u32) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match stat(pid).map(|s| s.state) {
            Some('T' | 't') => return true,
            Some('Z' | 'X') | None => return false,
            _ => std::thread::sleep(Duration::from_micros(50)),
        }
    }
    false
}

/// The read end of the stdin pipe of `pid`, opened as a second reader that never reads.
fn open_stdin(pid: u32) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/{pid}/fd/0"))
        .ok()
}

/// Bytes waiting unread in the stdin pipe of `pid`.
fn stdin_pending(pid: u32) -> Option<usize> {
    let f = open_stdin(pid)?;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer; the descriptor is open.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut n) };
    (rc == 0).then_some(n.max(0) as usize)
}

/// A copy of the bytes waiting in the stdin pipe of `pid`, left where they are: `tee(2)`
/// duplicates them into a pipe of ours.
fn stdin_peek(pid: u32) -> Option<Vec<u8>> {
    let f = open_stdin(pid)?;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return None;
    }
    // SAFETY: both descriptors were just created and are owned here alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: tee(2) between two open pipe descriptors; it consumes nothing from `f`.
    let n = unsafe {
        libc::tee(
            f.as_raw_fd(),
            w.as_raw_fd(),
            1 << 16,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    drop(w);
    if n <= 0 {
        return None;
    }
    let mut out = Vec::new();
    std::fs::File::from(r).read_to_end(&mut out).ok()?;
    Some(out)
}

/// Whether the stopped `pid` is blocked reading its stdin (waiting for a round).
fn reading_stdin(pid: u32) -> Option<bool> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    let mut it = s.split_whitespace();
    let nr: i64 = it.next()?.parse().ok()?;
    let fd = it.next()?;
    Some(nr == libc::SYS_read && fd == "0x0")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A round line waits unread.
    Handed,
    /// Blocked reading stdin, nothing waiting.
    Idle,
    /// Elsewhere: starting up, or in a round.
    Busy,
}

/// Bytes `pid` has read so far, by any `read` (`rchar` in `/proc/PID/io`).
fn rchar(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))?
        .trim()
        .parse()
        .ok()
}

/// Where the stopped `pid` stands. `last_rchar`: its `rchar` at the previous look, updated.
///
/// A process stopped on its way out of the `read` that took its line looks like one blocked
/// in it (`/proc/PID/syscall` names the `read` either way, and the pipe is empty): it is idle
/// only when it has read nothing since the previous look, as a process blocked in `read`
/// cannot have. Otherwise it is taken for busy (it read the line, or read files in its round
/// and came back to `read`: the next look says).
fn observe(pid: u32, last_rchar: &mut Option<u64>) -> Option<Seen> {
    let read = rchar(pid)?;
    let unchanged = last_rchar.replace(read) == Some(read);
    if stdin_pending(pid)? > 0 {
        return Some(Seen::Handed);
    }
    Some(if reading_stdin(pid)? && unchanged {
        Seen::Idle
    } else {
        Seen::Busy
    })
}

/// A round line seen waiting in a process's stdin.
struct Line {
    raw: Vec<u8>,
    name: String,
    object: String,
    round: u64,
    /// Where the round writes: its `round_dir`, else its `output`.
    dir: PathBuf,
    /// The files there when the line was seen, before the process read it.
    before: BTreeSet<String>,
    /// The round's declared outputs (`output`, `stats`): once all exist the handler may have
    /// finished and answered, so the round is no longer a target.
    outputs: Vec<PathBuf>,
}

impl Line {
    /// Files that appeared where the round writes since the line was handed.
    fn fresh(&self) -> Vec<String> {
        files_at(&self.dir)
            .into_iter()
            .filter(|f| !self.before.contains(f))
            .collect()
    }

    fn outputs_complete(&self) -> bool {
        self.outputs.iter().all(|o| o.exists())
    }

    /// Whether the agent has taken the round's outputs to check and upload them (into
    /// `<output>.quarry-staging/`, moved back once uploaded): the round was answered, and the
    /// process may be in another round already.
    fn taken_by_agent(&self) -> bool {
        self.outputs.iter().any(|o| {
            let mut name = o.file_name().unwrap_or_default().to_os_string();
            name.push(".quarry-staging");
            o.with_file_name(name).exists()
        })
    }
}

/// Files under `path` (itself when it is a file), relative.
fn files_at(path: &Path) -> BTreeSet<String> {
    if path.is_file() {
        return BTreeSet::from([String::new()]);
    }
    crate::files_under(path).into_iter().collect()
}

/// The first complete line waiting in the stdin of `pid`, parsed; `Err(())` while the agent is
/// still writing it (no newline yet), `Ok(None)` when it cannot be read.
fn handed_line(pid: u32) -> Result<Option<Line>, ()> {
    let Some(bytes) = stdin_peek(pid) else {
        return Ok(None);
    };
    let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
        return Err(());
    };
    let raw = bytes[..end].to_vec();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
        return Ok(None);
    };
    let name = v["round_name"].as_str().unwrap_or_default().to_string();
    let object = v["object"].as_str().unwrap_or_default().to_string();
    let Some(round) = v["round"].as_u64() else {
        return Ok(None);
    };
    let Some(dir) = v["round_dir"].as_str().or(v["output"].as_str()) else {
        return Ok(None);
    };
    let dir = PathBuf::from(dir);
    let before = files_at(&dir);
    let outputs = [&v["output"], &v["stats"]]
        .into_iter()
        .filter_map(|o| o.as_str().map(PathBuf::from))
        .collect();
    Ok(Some(Line {
        raw,
        name,
        object,
        round,
        dir,
        before,
        outputs,
    }))
}

/// One watched warm process.
struct Proc {
    gpu: String,
    prev: Option<Seen>,
    /// The line of the round it works on (or was handed), when it was seen.
    line: Option<Line>,
    in_round: bool,
    answered: u32,
    /// SIGCONTed for the current step.
    running: bool,
    /// Kept stopped between rounds since then.
    held_since: Option<Instant>,
    /// Its `rchar` at the last look (see [`observe`]).
    rchar: Option<u64>,
}

/// Target rounds (see [`watch`]) in which the kill waits for a partial output; from the next
/// one on it takes the first moment in a handler (from the first one for rounds that declare
/// one output only: they have no partial state).
const AIM_FOR_OUTPUT: u32 = 2;
/// How often `/proc` is scanned for warm processes that started since.
const SCAN_EVERY: Duration = Duration::from_millis(5);
/// Longest time between the last look that found a line waiting and the stop that catches its
/// reader (see [`catch_reading`]); a watcher that was not running longer than this may have
/// let a whole round pass.
const CATCH_GAP: Duration = Duration::from_millis(50);
/// Longest a process is kept stopped between rounds at a stretch; then it runs one step (a
/// bound, should its next line never come: the watcher then may miss a line, never hang a run).
const HOLD_AT_MOST: Duration = Duration::from_secs(2);

fn halve(slice: Duration) -> Duration {
    (slice / 2).max(Duration::from_micros(100))
}

/// Lets the stopped `pid`, whose line `l` waits in its stdin, run until it has read it, then
/// stops it again: where it stands then, when that is at the start of the round (the line read,
/// no output yet) or in its handler before its outputs are complete (so before its answer).
/// It is stopped in the return from the `read` that took the line, so `/proc/PID/syscall`
/// still names that `read`: the empty pipe, and no more than [`CATCH_GAP`] between the last
/// look that found the line there and the stop, say it is that read and not the next one.
fn catch_reading(pid: u32, l: &Line) -> Option<KilledAt> {
    let until = Instant::now() + Duration::from_secs(5);
    signal(pid, libc::SIGCONT);
    let mut last_seen = Instant::now();
    while stdin_pending(pid).is_some_and(|n| n > 0) && Instant::now() < until {
        last_seen = Instant::now();
    }
    signal(pid, libc::SIGSTOP);
    let gap = last_seen.elapsed();
    if !wait_stopped(pid) || gap > CATCH_GAP || stdin_pending(pid) != Some(0) {
        return None;
    }
    let fresh = l.fresh();
    if l.taken_by_agent() {
        None
    } else if fresh.is_empty() {
        Some(KilledAt::InHandler)
    } else if !l.outputs_complete() {
        Some(KilledAt::PartialOutput)
    } else {
        None
    }
}

fn let_go(procs: &BTreeMap<u32, Proc>) {
    for &pid in procs.keys() {
        signal(pid, libc::SIGCONT);
    }
}

fn watch(
    root: &Path,
    logs: &Path,
    targets: &Targets,
    metrics: Option<String>,
    done: &AtomicBool,
    deadline: Instant,
) -> KillReport {
    let mut report = KillReport {
        killed: None,
        gpu: None,
        answered_before: 0,
        aimed_at: None,
        round: None,
        restarted_as: None,
        died_starts: None,
        trace: Vec::new(),
    };
    let mut procs: BTreeMap<u32, Proc> = BTreeMap::new();
    let mut next_scan = Instant::now();
    // Target rounds seen so far.
    let mut seen_targets = 0u32;
    let mut slice = Duration::from_millis(2);
    let (pid, killed_at) = 'steps: loop {
        if done.load(Ordering::SeqCst) || Instant::now() > deadline {
            report.trace.push(if procs.is_empty() {
                "no warm generator appeared".into()
            } else {
                "gave up before a kill".into()
            });
            let_go(&procs);
            return report;
        }
        if Instant::now() >= next_scan {
            next_scan = Instant::now() + SCAN_EVERY;
            for (pid, gpu) in warm_generators(root) {
                if let std::collections::btree_map::Entry::Vacant(e) = procs.entry(pid) {
                    signal(pid, libc::SIGSTOP);
                    report.trace.push(format!("watching {pid} (gpu {gpu})"));
                    e.insert(Proc {
                        gpu,
                        prev: None,
                        line: None,
                        in_round: false,
                        answered: 0,
                        running: true,
                        held_since: None,
                        rchar: None,
                    });
                }
            }
        }
        for (&pid, p) in procs.iter_mut() {
            if p.running {
                signal(pid, libc::SIGSTOP);
                p.running = false;
            }
        }
        let mut gone = Vec::new();
        let mut hold = BTreeSet::new();
        for (&pid, p) in procs.iter_mut() {
            if !wait_stopped(pid) {
                report.trace.push(format!("{pid} ended"));
                gone.push(pid);
                continue;
            }
            let Some(now) = observe(pid, &mut p.rchar) else {
                report
                    .trace
                    .push(format!("cannot read the /proc entries of {pid}"));
                gone.push(pid);
                continue;
            };
            if p.prev != Some(now) {
                report
                    .trace
                    .push(format!("{pid} {now:?} (answered {})", p.answered));
            }
            let mut next_line = None;
            if now == Seen::Handed {
                match handed_line(pid) {
                    // Half written: look again once the agent has written the rest.
                    Err(()) => {
                        hold.insert(pid);
                        continue;
                    }
                    Ok(l) => next_line = l,
                }
            }
            let new_line = match (&next_line, &p.line) {
                (Some(n), Some(o)) => n.raw != o.raw,
                (Some(_), None) => true,
                (None, _) => false,
            };
            match (p.prev, now) {
                (Some(Seen::Handed), Seen::Idle) => {
                    // A whole round between two looks.
                    p.answered += 1;
                    if p.answered > 1 {
                        slice = halve(slice);
                    }
                }
                (Some(Seen::Handed), Seen::Handed) if new_line && p.line.is_some() => {
                    // A whole round between two looks, and the next one handed already.
                    p.answered += 1;
                    if p.answered > 1 {
                        slice = halve(slice);
                    }
                }
                (Some(Seen::Busy), Seen::Idle | Seen::Handed) if p.in_round => {
                    if p.answered >= 1 {
                        // A round ended before a look saw its output: look more often.
                        slice = halve(slice);
                    }
                    p.answered += 1;
                    p.in_round = false;
                }
                (Some(Seen::Handed | Seen::Idle), Seen::Busy) => {
                    if p.prev == Some(Seen::Idle) {
                        // Let go between rounds (a signal pending, or held too long): the
                        // line it read was not seen.
                        p.line = None;
                    }
                    p.in_round = true;
                }
                _ => {}
            }
            if new_line {
                p.line = next_line;
            }
            p.prev = Some(now);
            if p.in_round && p.line.as_ref().is_some_and(Line::taken_by_agent) {
                // It answered that round and read another between two looks.
                report.trace.push(format!("{pid} answered a round unseen"));
                p.line = None;
            }
            // A target: a round `targets` holds (one the final is sure to hold), handed to a
            // process that answered one before (its restart counts as `died`).
            let target = p.answered >= 1 && p.line.as_ref().is_some_and(|l| targets.hold(l));
            if new_line && let Some(l) = &p.line {
                report.trace.push(format!(
                    "{pid} handed {}{}",
                    l.name,
                    if target { " (a target)" } else { "" }
                ));
            }
            if target && new_line {
                seen_targets += 1;
            }
            if let (true, Some(l)) = (target, &p.line) {
                // A partial output needs two declared outputs (output and stats): with one,
                // the round is complete once its file exists.
                let first_moment = seen_targets > AIM_FOR_OUTPUT || l.outputs.len() < 2;
                if p.in_round {
                    let fresh = l.fresh();
                    if !fresh.is_empty() && !l.outputs_complete() {
                        report
                            .trace
                            .push(format!("the round's output so far: {fresh:?}"));
                        break 'steps (pid, KilledAt::PartialOutput);
                    }
                    // No output yet: the handler has not answered (outputs come first).
                    if fresh.is_empty() && first_moment {
                        break 'steps (pid, KilledAt::InHandler);
                    }
                } else if now == Seen::Handed && first_moment {
                    // Rounds may outrun the steps: let it run just until it has read the line.
                    if let Some(at) = catch_reading(pid, l) {
                        break 'steps (pid, at);
                    }
                    report
                        .trace
                        .push(format!("{pid} ran past {} before a look", l.name));
                    p.prev = None;
                    p.in_round = false;
                    continue;
                }
            }
            if now == Seen::Idle && !signal_pending(pid) {
                // Between rounds it would wait in read(2) anyway: kept stopped, its next line
                // is seen before it is read.
                let since = *p.held_since.get_or_insert_with(Instant::now);
                if since.elapsed() < HOLD_AT_MOST {
                    hold.insert(pid);
                } else {
                    report.trace.push(format!(
                        "{pid} held {HOLD_AT_MOST:?} without a line (pending {:?}): let go a step",
                        stdin_pending(pid)
                    ));
                    p.held_since = None;
                }
            } else {
                p.held_since = None;
            }
        }
        for pid in gone {
            procs.remove(&pid);
        }
        for (&pid, p) in procs.iter_mut() {
            if !hold.contains(&pid) {
                signal(pid, libc::SIGCONT);
                p.running = true;
            }
        }
        std::thread::sleep(slice);
    };
    signal(pid, libc::SIGKILL);
    let killed = procs.remove(&pid).expect("the killed process was watched");
    let_go(&procs);
    report.killed = Some((pid, killed_at));
    report.gpu = Some(killed.gpu.clone());
    report.answered_before = killed.answered;
    report.aimed_at = killed.line.map(|l| l.name);
    report.trace.push(format!(
        "killed {pid} (gpu {}) {killed_at:?} after {} answered rounds",
        killed.gpu, killed.answered
    ));
    // The restart, and the killed attempt's log.
    let logs_before: BTreeSet<String> = crate::files_under(logs).into_iter().collect();
    loop {
        let last = done.load(Ordering::SeqCst) || Instant::now() > deadline;
        if report.restarted_as.is_none()
            && let Some((p, _)) = warm_generators(root)
                .into_iter()
                .find(|(p, g)| *p != pid && *g == killed.gpu)
        {
            report.restarted_as = Some(p);
            if let Some(addr) = &metrics {
                report.died_starts = scrape_died(addr, &mut report.trace);
            }
        }
        if report.round.is_none() {
            report.round = crate::files_under(logs)
                .into_iter()
                .filter(|f| !logs_before.contains(f))
                .find_map(|f| killed_round(logs, &f));
        }
        if last || (report.restarted_as.is_some() && report.round.is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    report
}

/// The sum of `quarry_worker_generator_starts_total{reason="died"}` over every GPU. The run may
/// end at any time now: a failed scrape is noted, not a panic here.
fn scrape_died(addr: &str, trace: &mut Vec<String>) -> Option<f64> {
    match http_get(addr, "/metrics") {
        Ok((200, text)) => Some(
            text.lines()
                .filter(|l| {
                    l.starts_with("quarry_worker_generator_starts_total{")
                        && l.contains("reason=\"died\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        ),
        other => {
            trace.push(format!("scraping {addr}: {other:?}"));
            None
        }
    }
}

/// The round of a failed attempt's log at `rel` (`<object>/r<round>_s<seed>/<attempt>.log`)
/// under `logs`.
fn killed_round(logs: &Path, rel: &str) -> Option<KilledRound> {
    let mut parts = rel.split('/');
    let (object, tail, file) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let attempt = file.strip_suffix(".log")?;
    let round = tail.strip_prefix('r')?.split('_').next()?.parse().ok()?;
    Some(KilledRound {
        object: object.to_string(),
        tail: tail.to_string(),
        round,
        attempt: attempt.to_string(),
        log: logs.join(rel),
    })
}
