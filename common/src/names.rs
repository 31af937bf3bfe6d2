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
    #[error(
        "{what} {name:?} may not contain '__' or begin or end with '_': round directories are named <exp>__<object>__r<round>_s<seed>, so such a name could be another job's round directory"
    )]
    RoundSeparator { what: String, name: String },
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

/// [`validate`], and the name is one part of a round name `<exp>__<object>__r<round>_s<seed>`
/// (an experiment or object name): it may not contain `__` nor begin or end with `_`. Then an
/// experiment's name is never another job's round name (those always hold `__`), and a round
/// name splits back into its parts in exactly one way, so two jobs' round directories never
/// coincide.
pub fn validate_round_part(what: &str, name: &str) -> Result<(), NameError> {
    validate(what, name)?;
    if name.contains("__") || name.starts_with('_') || name.ends_with('_') {
        return Err(NameError::RoundSeparator {
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

    #[test]
    fn round_name_parts_refuse_the_separator() {
        validate_round_part("exp_name", "demo_2024-01").unwrap();
        validate_round_part("object", "Curver_Storage_Bin_Black_Small").unwrap();
        for bad in ["demo__mug__r0_s12345", "a__b", "_a", "a_", "__"] {
            let e = validate_round_part("exp_name", bad).unwrap_err();
            assert!(matches!(e, NameError::RoundSeparator { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("'__'"), "{e}");
        }
        // The plain rules still come first.
        assert!(matches!(
            validate_round_part("o", "a/b"),
            Err(NameError::BadChar { .. })
        ));
    }
}
