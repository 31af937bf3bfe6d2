//! Helpers both state backends share: name checks and the JSON encoding of records.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StateError;

/// Refuses names that would break the key layout. Callers validate names long before they
/// reach the store; this keeps a bug elsewhere from mixing up two jobs' keys.
pub(super) fn check_name(what: &str, name: &str) -> Result<(), StateError> {
    if name.is_empty() || name.contains('/') {
        return Err(StateError::Backend(format!(
            "invalid {what} name {name:?} for the state store"
        )));
    }
    Ok(())
}

pub(super) fn check_names(job: &str, object: &str) -> Result<(), StateError> {
    check_name("job", job)?;
    check_name("object", object)
}

pub(super) fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StateError> {
    serde_json::to_vec(value).map_err(|e| StateError::Backend(format!("encoding {what}: {e}")))
}

pub(super) fn decode<T: DeserializeOwned>(
    what: impl FnOnce() -> String,
    bytes: &[u8],
) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        what: what(),
        detail: e.to_string(),
    })
}

/// A zero-padded number taken from a key.
pub(super) fn parse_num(what: &str, k: &str, part: &str) -> Result<u32, StateError> {
    part.parse::<u32>().map_err(|e| StateError::Corrupt {
        what: what.to_string(),
        detail: format!("key {k:?}: bad number {part:?}: {e}"),
    })
}
