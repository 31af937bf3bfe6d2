//! The exit statuses of Quarry's binaries (`coordinator`, `worker`), defined once so that
//! scripts can tell a typo from an exhausted run from an interrupted one. Both binaries use
//! these values; `--help` prints [`HELP`] and the README has the same table.
//!
//! 2 stays the usage error because it is what clap and scale_runner's argparse both exit
//! with: a drop-in script that checks for 2 after a bad flag keeps working. A run that ends
//! with an object short of its quota therefore moves to 3. Interrupted runs follow the
//! shell's convention of 128 + the signal's number.

/// How a process ended, as its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: the command did what was asked (a run: every object has its quota).
    Done,
    /// 1: anything else that went wrong, with a message saying what (an unreachable
    /// coordinator, a job cancelled or stopped because its generator looks broken).
    Error,
    /// 2: the command line or the job file is wrong (a bad flag or value); nothing ran.
    Usage,
    /// 3: the run ended but some object ran out of rounds (`--max_rounds`) below its quota;
    /// its final holds what was collected.
    Exhausted,
    /// 130 (SIGINT, Ctrl-C) or 143 (SIGTERM): stopped by a signal before the end; running
    /// rounds were released and the same command resumes.
    Interrupted(StopSignal),
}

/// The signal that stopped a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    /// The signal's number (SIGINT 2, SIGTERM 15).
    pub fn number(self) -> i32 {
        match self {
            StopSignal::Interrupt => 2,
            StopSignal::Terminate => 15,
        }
    }
}

impl ExitStatus {
    /// The process exit status.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Done => 0,
            ExitStatus::Error => 1,
            ExitStatus::Usage => 2,
            ExitStatus::Exhausted => 3,
            ExitStatus::Interrupted(s) => 128 + s.number(),
        }
    }
}

/// The table `--help` prints after the flags.
pub const HELP: &str = "\
Exit status:
  0    done: every object has its quota (other commands: success)
  1    error: the message says what went wrong (also a cancelled job)
  2    usage error: a bad flag or value, or an invalid job file; nothing ran
  3    exhausted: some object ran out of rounds (--max_rounds) below its quota
  130  interrupted by SIGINT (Ctrl-C); run the same command again to resume
  143  interrupted by SIGTERM; run the same command again to resume";

/// The table the `worker` binary's `--help` prints: a worker runs until it is stopped.
pub const WORKER_HELP: &str = "\
Exit status:
  0    stopped by SIGTERM or SIGINT after draining its rounds
  1    error: an agent failed; the message says why
  2    usage error: a bad flag or value (a bad or duplicate --gpu id, --gpu all without
       NVML, an unreadable inventory, a malformed address)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_the_table_lists_each() {
        let all = [
            ExitStatus::Done,
            ExitStatus::Error,
            ExitStatus::Usage,
            ExitStatus::Exhausted,
            ExitStatus::Interrupted(StopSignal::Interrupt),
            ExitStatus::Interrupted(StopSignal::Terminate),
        ];
        let codes: std::collections::BTreeSet<i32> = all.iter().map(|s| s.code()).collect();
        assert_eq!(codes.len(), all.len());
        for c in codes {
            assert!(HELP.contains(&format!("\n  {c} ")), "{c} missing from HELP");
        }
    }
}
