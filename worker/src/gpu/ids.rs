//! The GPU ids an operator types (`worker --gpu`, `coordinator run --gpu/--gpus`), checked
//! before anything starts: an index (`3`), a UUID as NVML and `CUDA_VISIBLE_DEVICES` spell it
//! (`GPU-8f6e...`, `MIG-...`), or `all` alone. Each id is named once. Every message names the
//! flag the operator typed.
//!
//! Whether the GPU exists is the inventory's question ([`super::resolve`]); this is only the
//! syntax, so a typo (`--gpus x`) is refused even on a host without NVML, where it would
//! otherwise reach the generator as `CUDA_VISIBLE_DEVICES=x` and hide every GPU.

use std::collections::HashSet;

/// Why the ids given to a GPU flag were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuIdError {
    #[error("{flag} is empty; name the GPUs to use, e.g. {flag} 0 or {flag} 0,1")]
    Empty { flag: String },
    #[error(
        "{flag} {given:?} has an empty id; separate the ids with single commas, e.g. {flag} 0,1"
    )]
    EmptyItem { flag: String, given: String },
    #[error(
        "{flag} {id:?} is not a GPU id; give an index (0), a UUID (GPU-... or MIG-..., as `nvidia-smi -L` prints it){all}"
    )]
    Bad {
        flag: String,
        id: String,
        /// `" or all"` where the flag takes `all`.
        all: &'static str,
    },
    #[error("{flag} names GPU {id} twice; name each GPU once")]
    Duplicate { flag: String, id: String },
    #[error("{flag} all cannot be combined with other ids; give all alone or list the ids")]
    AllWithIds { flag: String },
}

/// One checked id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuId {
    Index(u32),
    /// `GPU-...` or `MIG-...`, as given.
    Uuid(String),
    All,
}

/// Checks the values of `flag` (each may hold comma-separated ids; surrounding spaces are
/// ignored) and returns the ids in order. `all` is taken where `allow_all` says so.
pub fn parse(flag: &str, values: &[String], allow_all: bool) -> Result<Vec<GpuId>, GpuIdError> {
    let given = values.join(",");
    if given.trim().is_empty() {
        return Err(GpuIdError::Empty { flag: flag.into() });
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for raw in given.split(',') {
        let id = raw.trim();
        if id.is_empty() {
            return Err(GpuIdError::EmptyItem {
                flag: flag.into(),
                given: given.clone(),
            });
        }
        let parsed = if id == "all" && allow_all {
            GpuId::All
        } else if let Some(i) = index(id) {
            GpuId::Index(i)
        } else if is_uuid(id) {
            GpuId::Uuid(id.to_string())
        } else {
            return Err(GpuIdError::Bad {
                flag: flag.into(),
                id: id.into(),
                all: if allow_all { " or all" } else { "" },
            });
        };
        // 0 and 00 are one GPU; UUIDs compare as NVML does, without regard to case.
        let key = match &parsed {
            GpuId::Index(i) => i.to_string(),
            GpuId::Uuid(u) => u.to_ascii_lowercase(),
            GpuId::All => "all".into(),
        };
        if !seen.insert(key) {
            return Err(GpuIdError::Duplicate {
                flag: flag.into(),
                id: id.into(),
            });
        }
        out.push(parsed);
    }
    if out.len() > 1 && out.contains(&GpuId::All) {
        return Err(GpuIdError::AllWithIds { flag: flag.into() });
    }
    Ok(out)
}

fn index(id: &str) -> Option<u32> {
    if id.bytes().all(|b| b.is_ascii_digit()) {
        id.parse().ok()
    } else {
        None
    }
}

/// `GPU-`/`MIG-` (any case) and letters, digits and `-`: what NVML prints and what
/// `CUDA_VISIBLE_DEVICES` takes (a unique prefix of a UUID included).
fn is_uuid(id: &str) -> bool {
    let Some((prefix, rest)) = id.split_at_checked(4) else {
        return false;
    };
    (prefix.eq_ignore_ascii_case("GPU-") || prefix.eq_ignore_ascii_case("MIG-"))
        && !rest.is_empty()
        && rest.len() <= 100
        && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn p(values: &[&str], allow_all: bool) -> Result<Vec<GpuId>, GpuIdError> {
        let v: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        parse("--gpus", &v, allow_all)
    }

    #[test]
    fn indices_uuids_and_all_are_ids() {
        assert_eq!(
            p(&["0,2", "3"], true).unwrap(),
            [GpuId::Index(0), GpuId::Index(2), GpuId::Index(3)]
        );
        assert_eq!(
            p(
                &[
                    "GPU-8f6e1c2a-5a5a-4b4b-8c8c-000000000000",
                    "MIG-abc",
                    "gpu-a"
                ],
                true
            )
            .unwrap(),
            [
                GpuId::Uuid("GPU-8f6e1c2a-5a5a-4b4b-8c8c-000000000000".into()),
                GpuId::Uuid("MIG-abc".into()),
                GpuId::Uuid("gpu-a".into()),
            ]
        );
        assert_eq!(p(&["all"], true).unwrap(), [GpuId::All]);
        assert_eq!(p(&[" 1 "], true).unwrap(), [GpuId::Index(1)]);
    }

    #[test]
    fn refusals_name_the_flag_and_the_fix() {
        for (values, allow_all, want) in [
            (&[""][..], true, "--gpus is empty"),
            (&[" "][..], true, "--gpus is empty"),
            (&["0,"][..], true, "has an empty id"),
            (&["x"][..], true, "\"x\" is not a GPU id"),
            (&["GPU-"][..], true, "not a GPU id"),
            (&["GPU-a/1"][..], true, "not a GPU id"),
            (&["-1"][..], true, "not a GPU id"),
            (&["all"][..], false, "\"all\" is not a GPU id"),
            (&["0,0"][..], true, "names GPU 0 twice"),
            (&["0", "00"][..], true, "twice"),
            (&["GPU-a,gpu-A"][..], true, "twice"),
            (&["all,0"][..], true, "cannot be combined"),
        ] {
            let e = p(values, allow_all).unwrap_err().to_string();
            assert!(e.starts_with("--gpus"), "{values:?}: {e}");
            assert!(e.contains(want), "{values:?}: {e}");
        }
        let e = p(&["x"], false).unwrap_err().to_string();
        assert!(!e.contains("or all"), "{e}");
    }
}
