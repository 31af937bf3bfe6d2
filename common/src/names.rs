//! Names that reach file paths and object-store keys: `[A-Za-z0-9._-]+`, validated before use.

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 200;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: String },
    #[error("{what} {name:?} is longer than {MAX_NAME_LEN} bytes")]
    TooLong { what: String, name: String },
    #[error("{what} {name:?} contains {bad:?}; only letters, digits, '.', '_' and '-' are allowed")]
    BadChar {
        what: String,
        name: String,
        bad: char,
    },
    #[error("{what} {name:?} may not be '.', contain '..' or start with '-'")]
    Reserved { what: String, name: String },
}

/// Accepts `[A-Za-z0-9._-]+` of bounded length, refusing `.`, anything with `..` (so a name can
/// never climb out of a directory) and a leading `-` (so it is never read as a flag).
pub fn validate(what: &str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what: what.into() });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what: what.into(),
            name: name.into(),
        });
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::BadChar {
            what: what.into(),
            name: name.into(),
            bad,
        });
    }
    if name == "." || name.contains("..") || name.starts_with('-') {
        return Err(NameError::Reserved {
            what: what.into(),
            name: name.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_legacy_object_codes() {
        for ok in [
            "Curver_Storage_Bin_Black_Small",
            "merged_collision_300k_wt",
            "a.b-c_1",
        ] {
            validate("object", ok).unwrap();
        }
    }

    #[test]
    fn refuses_paths_shell_and_flags() {
        assert!(matches!(
            validate("o", "../x"),
            Err(NameError::BadChar { bad: '/', .. })
        ));
        assert!(matches!(
            validate("o", "a b"),
            Err(NameError::BadChar { bad: ' ', .. })
        ));
        assert!(matches!(
            validate("o", "$(id)"),
            Err(NameError::BadChar { bad: '$', .. })
        ));
        assert!(matches!(
            validate("o", ".."),
            Err(NameError::Reserved { .. })
        ));
        assert!(matches!(
            validate("o", "-rf"),
            Err(NameError::Reserved { .. })
        ));
        assert!(matches!(validate("o", ""), Err(NameError::Empty { .. })));
        assert!(matches!(
            validate("o", &"x".repeat(201)),
            Err(NameError::TooLong { .. })
        ));
    }
}
