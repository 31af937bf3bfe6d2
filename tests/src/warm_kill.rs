//! `kill -9` of a warm generator in the middle of a round, from outside the generator (no
//! cooperation from its code): [`MidRoundKill`] watches `/proc` for the warm process a job
//! under `root` runs, steps it with SIGSTOP/SIGCONT, and SIGKILLs it once it has answered a
//! round and is working on the next one.
//!
//! Where a stopped process stands is read without racing it:
//! - a round handed and not yet read: bytes wait in its stdin pipe (`FIONREAD` on
//!   `/proc/PID/fd/0`, opened as a second reader that never reads);
//! - between rounds: nothing waits there and it is blocked in `read(0, ...)`
//!   (`/proc/PID/syscall`);
//! - in a round: nothing waits and it is elsewhere (it read the line and has not come back).
//!
//! Observations are made while the process is stopped, and it runs between them in short
//! steps; stopping changes when it runs, not what it writes. The kill lands in the handler:
//! once a file appears in a round directory that held none before the round (a partial output
//! the retry must replace) when a step catches that moment within a few rounds, else as soon as
//! a handler runs; should the steps keep overshooting whole rounds, once a round is handed and
//! unread (the agent is waiting for its answer either way).
//!
//! Needs `/proc/PID/syscall` (Linux) and the rights to signal the generator (the test's own
//! child, as with `coordinator run` in-process).

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::process::pids;
use crate::prometheus::http_get;

/// Where the process stood when the kill landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KilledAt {
    /// In the handler, after the round's output appeared.
    PartialOutput,
    /// In the handler, before any output of the round appeared.
    InHandler,
    /// The round handed (its line in the pipe), not yet read.
    Handed,
}

/// What [`MidRoundKill`] did.
#[derive(Debug)]
pub struct KillReport {
    /// The process killed and where it stood, `None` when no kill happened (the reason in
    /// `trace`).
    pub killed: Option<(u32, KilledAt)>,
    /// Rounds the killed process was seen to answer before the kill.
    pub answered_before: u32,
    /// The directory (under the watched one) of the round killed, for a kill after its output
    /// appeared: the round's name.
    pub round: Option<String>,
    /// The warm process started after the kill (the restart), when one was seen.
    pub restarted_as: Option<u32>,
    /// `quarry_worker_generator_starts_total{gpu=GPU,reason="died"}` scraped once the restart
    /// was seen, when a metrics endpoint was given.
    pub died_starts: Option<f64>,
    /// What the watcher saw, for failure messages.
    pub trace: Vec<String>,
}

/// A watcher thread that kills, once, the warm generator of the job under `root` mid-round.
pub struct MidRoundKill {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<KillReport>>,
}

impl MidRoundKill {
    /// Starts watching for the warm generator of the agent on `gpu` whose working directory
    /// is `root` (the job's default `cwd`), whose rounds write under `rounds` (the parent of
    /// the job's `round_dir`; a new directory there is taken for its round's, so that agent
    /// should be the job's only one). `metrics`: the run's metrics endpoint, scraped for the
    /// `died` start once the restart is seen. Gives up after `limit`.
    pub fn start(
        root: &Path,
        rounds: &Path,
        gpu: &str,
        metrics: Option<String>,
        limit: Duration,
    ) -> MidRoundKill {
        let root = std::fs::canonicalize(root).expect("canonical root");
        let rounds = rounds.to_path_buf();
        let gpu = gpu.to_string();
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let at = Instant::now() + limit;
                watch(&root, &rounds, &gpu, metrics, &done, at)
            })
        };
        MidRoundKill {
            done,
            thread: Some(thread),
        }
    }

    /// Stops watching (a stopped process is let go) and says what happened.
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

/// Warm generators (the reply descriptor's variable in their environment) of the agent on
/// `gpu` (`QUARRY_GPU`), leading their own process group, working in `root`.
fn warm_generators(root: &Path, gpu: &str) -> Vec<u32> {
    let gpu_entry = format!("QUARRY_GPU={gpu}");
    pids()
        .into_iter()
        .filter(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == root)
                && stat_fields(pid).is_some_and(|(_, pgrp)| pgrp == pid)
                && std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                    env.split(|&b| b == 0)
                        .any(|v| v.starts_with(b"QUARRY_REPLY_FD="))
                        && env.split(|&b| b == 0).any(|v| v == gpu_entry.as_bytes())
                })
        })
        .collect()
}

/// The state letter and process group of `pid`, `None` once it is gone.
fn stat_fields(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut it = rest.split(' ');
    let state = it.next()?.chars().next()?;
    let _ppid = it.next()?;
    let pgrp = it.next()?.parse().ok()?;
    Some((state, pgrp))
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
        match stat_fields(pid) {
            Some(('T' | 't', _)) => return true,
            Some(('Z' | 'X', _)) | None => return false,
            _ => std::thread::sleep(Duration::from_micros(50)),
        }
    }
    false
}

/// Bytes waiting unread in the stdin pipe of `pid`.
fn stdin_pending(pid: u32) -> Option<usize> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/{pid}/fd/0"))
        .ok()?;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer; the descriptor is open.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut n) };
    (rc == 0).then_some(n.max(0) as usize)
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

fn observe(pid: u32) -> Option<Seen> {
    if stdin_pending(pid)? > 0 {
        return Some(Seen::Handed);
    }
    Some(if reading_stdin(pid)? {
        Seen::Idle
    } else {
        Seen::Busy
    })
}

/// Files under `rounds`, relative.
fn outputs(rounds: &Path) -> Vec<String> {
    crate::files_under(rounds)
}

/// The round directories (first components) that hold files under `rounds`. The agent's
/// own work on earlier rounds (inspection, staging) stays in theirs.
fn round_dirs(rounds: &Path) -> BTreeSet<String> {
    outputs(rounds)
        .into_iter()
        .filter_map(|f| Some(f.split('/').next()?.to_string()))
        .collect()
}

/// Rounds whose handler ran past the appearance of their output can be aimed at this many
/// times before the kill takes the first moment in a handler.
const AIM_FOR_OUTPUT: u32 = 2;
/// Rounds stepped over whole (answered between two looks) before the kill takes a handed round.
const MISSES_BEFORE_HANDED: u32 = 6;

fn watch(
    root: &Path,
    rounds: &Path,
    gpu: &str,
    metrics: Option<String>,
    done: &AtomicBool,
    deadline: Instant,
) -> KillReport {
    let mut report = KillReport {
        killed: None,
        answered_before: 0,
        round: None,
        restarted_as: None,
        died_starts: None,
        trace: Vec::new(),
    };
    // The first warm process.
    let pid = loop {
        if done.load(Ordering::SeqCst) || Instant::now() > deadline {
            report.trace.push("no warm generator appeared".into());
            return report;
        }
        if let Some(&p) = warm_generators(root, gpu).first() {
            break p;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    signal(pid, libc::SIGSTOP);
    let mut prev = None;
    let mut in_round = false;
    let mut answered = 0u32;
    let mut missed = 0u32;
    let mut aimed = 0u32;
    let mut before_round = round_dirs(rounds);
    let mut slice = Duration::from_millis(2);
    let killed_at = loop {
        if done.load(Ordering::SeqCst) || Instant::now() > deadline {
            report.trace.push("gave up before a kill".into());
            signal(pid, libc::SIGCONT);
            return report;
        }
        if !wait_stopped(pid) {
            report
                .trace
                .push("the generator ended before a kill".into());
            return report;
        }
        let Some(now) = observe(pid) else {
            report
                .trace
                .push("cannot read the generator's /proc entries".into());
            signal(pid, libc::SIGCONT);
            return report;
        };
        if prev != Some(now) {
            report.trace.push(format!("{now:?} (answered {answered})"));
        }
        let mut started = false;
        match (prev, now) {
            (Some(Seen::Handed), Seen::Idle) => {
                // A whole round between two looks.
                answered += 1;
                if answered > 1 {
                    missed += 1;
                    slice = (slice / 2).max(Duration::from_micros(100));
                }
            }
            (Some(Seen::Idle), Seen::Idle) if !round_dirs(rounds).is_subset(&before_round) => {
                // A whole round (handed, read, written, answered) between two looks.
                report
                    .trace
                    .push(format!("a round passed unseen (answered {answered})"));
                answered += 1;
                if answered > 1 {
                    missed += 1;
                    slice = (slice / 2).max(Duration::from_micros(100));
                }
            }
            (Some(Seen::Busy), Seen::Idle | Seen::Handed) if in_round => {
                if answered >= 1 {
                    // An aimed round ended before a look saw its output: look more often.
                    slice = (slice / 2).max(Duration::from_micros(100));
                }
                answered += 1;
                in_round = false;
            }
            (Some(Seen::Handed | Seen::Idle), Seen::Busy) => {
                in_round = true;
                started = true;
            }
            _ => {}
        }
        if !in_round {
            // The coming round writes in a directory not among these.
            before_round = round_dirs(rounds);
        }
        if answered >= 1 {
            if in_round {
                let fresh: Vec<String> = outputs(rounds)
                    .into_iter()
                    .filter(|f| {
                        f.split('/')
                            .next()
                            .is_some_and(|d| !before_round.contains(d))
                    })
                    .collect();
                if !fresh.is_empty() {
                    report
                        .trace
                        .push(format!("the round's output so far: {fresh:?}"));
                    report.round = fresh[0].split('/').next().map(str::to_string);
                    break KilledAt::PartialOutput;
                }
                if aimed >= AIM_FOR_OUTPUT {
                    break KilledAt::InHandler;
                }
                if started {
                    aimed += 1;
                }
            } else if now == Seen::Handed && missed >= MISSES_BEFORE_HANDED {
                break KilledAt::Handed;
            }
        }
        prev = Some(now);
        signal(pid, libc::SIGCONT);
        std::thread::sleep(slice);
        signal(pid, libc::SIGSTOP);
    };
    signal(pid, libc::SIGKILL);
    report.killed = Some((pid, killed_at));
    report.answered_before = answered;
    report.trace.push(format!(
        "killed {pid} {killed_at:?} after {answered} answered rounds"
    ));
    // The restart.
    while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
        if let Some(&p) = warm_generators(root, gpu).iter().find(|&&p| p != pid) {
            report.restarted_as = Some(p);
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if let (Some(_), Some(addr)) = (report.restarted_as, metrics) {
        // The run may end at any time now: a failed scrape is noted, not a panic here.
        let series =
            format!("quarry_worker_generator_starts_total{{gpu=\"{gpu}\",reason=\"died\"}} ");
        match http_get(&addr, "/metrics") {
            Ok((200, text)) => {
                report.died_starts = text
                    .lines()
                    .find_map(|l| l.strip_prefix(&series)?.parse().ok());
            }
            other => report.trace.push(format!("scraping {addr}: {other:?}")),
        }
    }
    report
}
