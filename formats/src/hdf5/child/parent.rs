//! The parent's side: starts a child for one operation, feeds it the request, reads its
//! frames, and turns a child that did not answer (killed by a signal, out of memory or CPU,
//! past its deadline, a non-zero exit, garbage on stdout) into one [`DatasetError::Crashed`]
//! naming the file and how the child ended.

use std::io::{BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::wire::{self, ErrorWire, Request};
use super::{CHILD_ARG, Isolation};
use crate::{DatasetError, Observer};

/// How much of a child's stderr is kept for the message (its last bytes: an assertion or
/// a library's last complaint comes last).
const STDERR_TAIL: usize = 2048;

/// What a child answered: the `O` payload, after `events` got every examine event.
pub fn call(
    iso: &Isolation,
    op: wire::Op,
    subject: &str,
    doing: &str,
    events: Option<&mut dyn Observer>,
) -> Result<Vec<u8>, DatasetError> {
    let request = Request {
        memory_bytes: iso.limits.memory_bytes,
        cpu_seconds: iso.limits.cpu_seconds,
        op,
    };
    let body = serde_json::to_vec(&request).map_err(|e| DatasetError::Unsupported {
        reason: format!("encoding a request for the libhdf5 child: {e}"),
    })?;
    let died = |how: String, tail: &str| DatasetError::Crashed {
        path: subject.to_string(),
        reason: format!("libhdf5 {how} while {doing} it{tail}"),
    };
    // Its own process group, so a kill reaches anything it started too.
    let mut child = Command::new(&iso.program)
        .arg(CHILD_ARG)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DatasetError::Unsupported {
            reason: format!(
                "could not start the libhdf5 child {}: {e}",
                iso.program.display()
            ),
        })?;
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(died("could not be given its pipes".into(), ""));
    };
    // The reaper owns the child: it waits for its exit, and kills its group at the deadline
    // or when asked (an answer that is garbage). Only it signals and only before it reaps,
    // so the group it kills is always this child's.
    let (kill_now, kill_asked) = mpsc::channel::<()>();
    let wall = iso.limits.wall;
    let reaper = std::thread::spawn(move || -> (std::io::Result<ExitStatus>, bool) {
        let deadline = Instant::now() + wall;
        // Polled: a child is done in milliseconds, so the first polls are close together.
        let mut pause = Duration::from_micros(200);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return (Ok(status), false),
                Ok(None) => {}
                Err(e) => return (Err(e), false),
            }
            let now = Instant::now();
            if now >= deadline {
                kill_group(child.id());
                return (child.wait(), true);
            }
            match kill_asked.recv_timeout(pause.min(deadline - now)) {
                Ok(()) => {
                    kill_group(child.id());
                    return (child.wait(), false);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // The parent has all it needs; the child is reaped as it ends.
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(pause),
            }
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    });
    let writer = std::thread::spawn(move || {
        // A child that dies before reading all of it shows as a broken pipe here; its exit
        // status tells why.
        let _ = stdin.write_all(&body);
    });
    let err_reader = std::thread::spawn(move || {
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 2 * STDERR_TAIL {
                tail.drain(..tail.len() - STDERR_TAIL);
            }
        }
        let start = tail.len().saturating_sub(STDERR_TAIL);
        String::from_utf8_lossy(&tail[start..]).trim().to_string()
    });
    let answer = read_answer(BufReader::new(stdout), events);
    // A child that answered garbage and goes on is killed; one that answered waits for its
    // exit, still under the deadline.
    if answer.is_err() {
        let _ = kill_now.send(());
    }
    drop(kill_now);
    let (status, timed_out) = reaper.join().unwrap_or_else(|_| {
        (
            Err(std::io::Error::other("the reaper thread panicked")),
            false,
        )
    });
    let _ = writer.join();
    let stderr = err_reader.join().unwrap_or_default();
    let ended = match status {
        Ok(s) => s,
        Err(e) => return Err(died(format!("could not be waited for ({e})"), "")),
    };
    let last_words = if stderr.is_empty() {
        String::new()
    } else {
        format!(" (its stderr ends: {})", one_line(&stderr))
    };
    if timed_out {
        return Err(died(
            format!("was killed at its time limit of {} s", wall.as_secs()),
            &last_words,
        ));
    }
    match answer {
        Ok(Answer::Ok(payload)) if ended.success() => Ok(payload),
        Ok(Answer::Err(e)) if ended.success() => Err(e),
        // A child that answered and still ended badly: the ending is what matters.
        Ok(_) => Err(died(ending(ended), &last_words)),
        Err(garbage) if ended.success() => {
            Err(died(format!("answered garbage ({garbage})"), &last_words))
        }
        Err(_) => Err(died(ending(ended), &last_words)),
    }
}

/// SIGKILL to the child's process group (its pid is the group's id); called only by the
/// thread that reaps it, before it does.
fn kill_group(pid: u32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
    }
}

enum Answer {
    Ok(Vec<u8>),
    Err(DatasetError),
}

/// Reads frames up to the answer; an `Err` is what made the stream garbage.
fn read_answer(mut r: impl Read, mut events: Option<&mut dyn Observer>) -> Result<Answer, String> {
    loop {
        let frame = wire::read_frame(&mut r).map_err(|e| e.to_string())?;
        let Some((tag, payload)) = frame else {
            return Err("no answer before its stdout closed".into());
        };
        match (tag, events.as_deref_mut()) {
            (wire::OK, _) => return Ok(Answer::Ok(payload)),
            (wire::ERR, _) => {
                let e: ErrorWire = serde_json::from_slice(&payload)
                    .map_err(|e| format!("an error frame that does not decode: {e}"))?;
                return Ok(Answer::Err(e.into()));
            }
            (wire::SAMPLE, Some(o)) => {
                let b: [u8; 8] = payload
                    .as_slice()
                    .try_into()
                    .map_err(|_| "a sample frame that is not 8 bytes".to_string())?;
                o.sample(u64::from_le_bytes(b));
            }
            (wire::VALUES, Some(o)) => {
                let (field, values) = wire::parse_values(&payload)
                    .ok_or_else(|| "a values frame that does not decode".to_string())?;
                o.values(&field, &values);
            }
            (wire::PROBLEM, Some(o)) => {
                let (path, reason): (String, String) = serde_json::from_slice(&payload)
                    .map_err(|e| format!("a problem frame that does not decode: {e}"))?;
                o.problem(&path, &reason);
            }
            (t, _) => return Err(format!("an unexpected frame tag {t:#04x}")),
        }
    }
}

/// How a child that did not answer ended: `signal 11 SIGSEGV`, `exit status 3`.
pub fn ending(s: ExitStatus) -> String {
    if let Some(sig) = s.signal() {
        let what = match sig {
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT, an assertion or abort in the library",
            libc::SIGBUS => "SIGBUS",
            libc::SIGFPE => "SIGFPE",
            libc::SIGILL => "SIGILL",
            libc::SIGKILL => "SIGKILL, killed (out of memory, or by someone)",
            libc::SIGXCPU => "SIGXCPU, past its CPU time limit",
            libc::SIGTERM => "SIGTERM",
            _ => "",
        };
        if what.is_empty() {
            format!("crashed (signal {sig})")
        } else {
            format!("crashed (signal {sig} {what})")
        }
    } else {
        match s.code() {
            Some(c) => format!("exited with status {c} before answering"),
            None => "ended before answering".into(),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
