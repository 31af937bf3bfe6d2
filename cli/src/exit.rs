//! The `coordinator` binary's exit statuses: which errors are the user's to fix on the command
//! line (2, as clap exits for a bad flag), and what a job's end state exits with. The codes
//! themselves are [`quarry_common::exit::ExitStatus`], shared with the `worker` binary.

use quarry_proto::v1 as pb;

pub use quarry_common::exit::{ExitStatus, HELP, StopSignal};

/// An error in what the user typed (a flag's value, the job file, a GPU id, where the
/// generator is): nothing ran, and the process exits [`ExitStatus::Usage`].
#[derive(Debug)]
pub struct UsageError(anyhow::Error);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for UsageError {}

/// Marks `e` as a usage error.
pub fn usage(e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(UsageError(e.into()))
}

/// The exit status of a command that failed with `e`.
pub fn of_error(e: &anyhow::Error) -> ExitStatus {
    if e.chain().any(|c| c.is::<UsageError>()) {
        ExitStatus::Usage
    } else {
        ExitStatus::Error
    }
}

/// The exit status of a job that ended in `state`: done, exhausted (an object ran out of
/// rounds), or an error (cancelled, or stopped because its generator looks broken; the
/// summary says which).
pub fn of_job(state: i32) -> ExitStatus {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Done) => ExitStatus::Done,
        Ok(pb::JobState::Incomplete) => ExitStatus::Exhausted,
        _ => ExitStatus::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_are_told_apart_through_context() {
        let e = usage(anyhow::anyhow!("--gpus \"x\" is not a GPU id"));
        assert_eq!(of_error(&e), ExitStatus::Usage);
        assert_eq!(of_error(&e.context("starting the run")), ExitStatus::Usage);
        assert_eq!(of_error(&anyhow::anyhow!("store down")), ExitStatus::Error);
        assert_eq!(of_job(pb::JobState::Incomplete as i32).code(), 3);
        assert_eq!(of_job(pb::JobState::Cancelled as i32).code(), 1);
    }
}
