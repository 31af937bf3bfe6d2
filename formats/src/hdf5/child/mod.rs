//! libhdf5 in a child process. libhdf5 is C, and a hostile or corrupt file can make it write
//! out of bounds, abort or loop; in the process of `serve` or of an agent that is the whole
//! coordinator or every GPU's agent gone, at every restart that meets the file again. With
//! isolation on, every HDF5 [`inspect`], [`merge`] and [`examine`] runs in a child: the
//! running binary re-executed with [`CHILD_ARG`] (its `main` calls [`answer_if_asked`] first
//! thing), one child per operation, under limits ([`Limits`]: address space, CPU time, a
//! wall-clock deadline), stdio its only descriptors, its stderr's tail kept for the message.
//! A child that dies is a [`DatasetError::Crashed`] naming the file and how it ended (`libhdf5
//! crashed (signal 11 SIGSEGV) while reading round.hdf5`): one round fails with that reason,
//! the process goes on.
//!
//! Isolation is process-wide and opt-in ([`isolate_in_child`]), so library callers and unit
//! tests keep the in-process path. The answer is the in-process operation's answer, the same
//! error variants included (see `wire.rs`); a merge's child writes the output file itself,
//! so finals are byte-identical either way.

mod answer;
mod parent;
mod wire;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::{DatasetError, Filter, Inspection, MergeOptions, MergeSummary, Observer};
use wire::Op;

/// The first argument that makes a binary answer as a libhdf5 child.
pub const CHILD_ARG: &str = "__quarry-hdf5";

/// Environment variables that override [`Limits::default`].
pub const MEMORY_ENV: &str = "QUARRY_HDF5_CHILD_MEMORY_MB";
pub const CPU_ENV: &str = "QUARRY_HDF5_CHILD_CPU_S";
pub const TIMEOUT_ENV: &str = "QUARRY_HDF5_CHILD_TIMEOUT_S";

/// What one child may use before it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Address space (RLIMIT_AS), bytes; 0 for none.
    pub memory_bytes: u64,
    /// CPU time (RLIMIT_CPU), seconds; 0 for none. Past it the child gets SIGXCPU.
    pub cpu_seconds: u64,
    /// Wall-clock time before the parent kills it.
    pub wall: Duration,
}

impl Default for Limits {
    /// 16 GiB, 1 h of CPU, 2 h of wall time: far above what a round's inspection or an
    /// object's merge needs (libhdf5 copies chunk by chunk), far below what stops a machine.
    fn default() -> Self {
        Limits {
            memory_bytes: 16 << 30,
            cpu_seconds: 3600,
            wall: Duration::from_secs(7200),
        }
    }
}

impl Limits {
    /// The defaults, overridden by [`MEMORY_ENV`], [`CPU_ENV`] and [`TIMEOUT_ENV`] where
    /// set; the error is one sentence naming the variable and the fix.
    pub fn from_env() -> Result<Limits, String> {
        Limits::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Limits::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Limits, String> {
        let mut l = Limits::default();
        let read = |name: &str, unit: &str| -> Result<Option<u64>, String> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                    format!(
                        "{name}={v:?} is not a whole number of {unit}: set it to one \
                         (0 for no limit) or unset it for the default"
                    )
                }),
            }
        };
        if let Some(mb) = read(MEMORY_ENV, "MiB")? {
            l.memory_bytes = mb.saturating_mul(1 << 20);
        }
        if let Some(s) = read(CPU_ENV, "seconds")? {
            l.cpu_seconds = s;
        }
        if let Some(s) = read(TIMEOUT_ENV, "seconds")? {
            l.wall = if s == 0 {
                Duration::from_secs(u64::MAX / 4)
            } else {
                Duration::from_secs(s)
            };
        }
        Ok(l)
    }
}

/// A program that answers as a libhdf5 child, and the limits its children get.
#[derive(Debug, Clone)]
pub struct Isolation {
    pub program: PathBuf,
    pub limits: Limits,
}

static ISOLATION: OnceLock<Isolation> = OnceLock::new();

/// Runs every HDF5 operation of this process in a child of `program` from now on (the
/// binary's own path: `std::env::current_exe()`). The first call wins; `false` when
/// isolation was already on.
pub fn isolate_in_child(program: PathBuf, limits: Limits) -> bool {
    ISOLATION.set(Isolation { program, limits }).is_ok()
}

/// What `main` of the `coordinator` and `worker` binaries calls after [`answer_if_asked`]:
/// isolation on, children being this very binary (`/proc/self/exe`, which stays this
/// version's file even when an upgrade replaces it on disk) under [`Limits::from_env`].
pub fn isolate_this_binary() -> Result<(), String> {
    let limits = Limits::from_env()?;
    let program = match Path::new("/proc/self/exe") {
        p if p.exists() => p.to_path_buf(),
        _ => std::env::current_exe()
            .map_err(|e| format!("cannot find this binary to run libhdf5 in a child: {e}"))?,
    };
    isolate_in_child(program, limits);
    Ok(())
}

/// The process-wide isolation, if on.
pub fn isolation() -> Option<&'static Isolation> {
    ISOLATION.get()
}

/// When this process was started as a libhdf5 child (its first argument is [`CHILD_ARG`]):
/// answers the request on stdin and exits. Otherwise returns at once. `main` calls it before
/// anything else (before a runtime starts threads).
pub fn answer_if_asked() {
    if std::env::args_os().nth(1).is_some_and(|a| a == CHILD_ARG) {
        std::process::exit(answer::answer());
    }
}

/// [`crate::inspect`] for HDF5: in a child when isolation is on.
pub fn inspect(path: &Path, filter: Option<&Filter>) -> Result<Inspection, DatasetError> {
    match isolation() {
        Some(iso) => iso.inspect(path, filter),
        None => super::inspect(path, filter),
    }
}

/// [`crate::merge`] for HDF5: in a child when isolation is on.
pub fn merge(
    inputs: &[PathBuf],
    counts: &[u64],
    options: &MergeOptions,
    out: &Path,
) -> Result<MergeSummary, DatasetError> {
    match isolation() {
        Some(iso) => iso.merge(inputs, counts, options, out),
        None => super::merge(inputs, counts, options, out),
    }
}

/// [`crate::examine`] for HDF5: in a child when isolation is on.
pub fn examine(path: &Path, observer: &mut dyn Observer) -> Result<u64, DatasetError> {
    match isolation() {
        Some(iso) => iso.examine(path, observer),
        None => super::examine(path, observer),
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    payload: &[u8],
    subject: &str,
) -> Result<T, DatasetError> {
    serde_json::from_slice(payload).map_err(|e| DatasetError::Crashed {
        path: subject.to_string(),
        reason: format!("libhdf5 answered garbage (an answer that does not decode: {e})"),
    })
}

impl Isolation {
    /// [`super::inspect`] in a child of this program.
    pub fn inspect(
        &self,
        path: &Path,
        filter: Option<&Filter>,
    ) -> Result<Inspection, DatasetError> {
        let subject = path.display().to_string();
        let op = Op::Inspect {
            path: wire::path_bytes(path),
            filter: wire::filter_text(filter),
        };
        let payload = parent::call(self, op, &subject, "reading", None)?;
        decode::<wire::InspectionWire>(&payload, &subject).map(Into::into)
    }

    /// [`super::merge`] in a child of this program; the child writes `out`.
    pub fn merge(
        &self,
        inputs: &[PathBuf],
        counts: &[u64],
        options: &MergeOptions,
        out: &Path,
    ) -> Result<MergeSummary, DatasetError> {
        let subject = out.display().to_string();
        let doing = match inputs.len() {
            1 => "merging 1 round into".to_string(),
            n => format!("merging {n} rounds into"),
        };
        let op = Op::Merge {
            inputs: inputs.iter().map(|p| wire::path_bytes(p)).collect(),
            counts: counts.to_vec(),
            limit: options.limit,
            filter: wire::filter_text(options.filter.as_ref()),
            dedup: options.dedup.clone(),
            out: wire::path_bytes(out),
        };
        let payload = parent::call(self, op, &subject, &doing, None)?;
        decode::<wire::SummaryWire>(&payload, &subject).map(Into::into)
    }

    /// [`super::examine`] in a child of this program; `observer` gets every event as the
    /// child walks.
    pub fn examine(&self, path: &Path, observer: &mut dyn Observer) -> Result<u64, DatasetError> {
        let subject = path.display().to_string();
        let op = Op::Examine {
            path: wire::path_bytes(path),
        };
        let payload = parent::call(self, op, &subject, "reading", Some(observer))?;
        decode::<u64>(&payload, &subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_from_variables_name_the_variable_and_the_fix() {
        assert_eq!(Limits::from_vars(|_| None), Ok(Limits::default()));
        let l = Limits::from_vars(|n| match n {
            MEMORY_ENV => Some("512".into()),
            CPU_ENV => Some(" 30 ".into()),
            TIMEOUT_ENV => Some("90".into()),
            _ => None,
        })
        .expect("parses");
        assert_eq!(l.memory_bytes, 512 << 20);
        assert_eq!(l.cpu_seconds, 30);
        assert_eq!(l.wall, Duration::from_secs(90));
        let e = Limits::from_vars(|n| (n == TIMEOUT_ENV).then(|| "10m".into())).unwrap_err();
        assert_eq!(
            e,
            "QUARRY_HDF5_CHILD_TIMEOUT_S=\"10m\" is not a whole number of seconds: set it to one \
             (0 for no limit) or unset it for the default"
        );
    }
}
