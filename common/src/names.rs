//! Names that reach file paths and object-store keys: `[A-Za-z0-9._-]+`, validated before use.

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 200;

/// Why a name was refused. Its message is one sentence: `<what> <name> <problem>; <fix>`;
/// [`NameError::problem`] and [`NameError::fix`] give the two halves to callers that name
/// the field themselves (the job spec's `field: problem; fix`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty; {}", self.fix())]
    Empty { what: String },
    #[error("{what} {}; {}", self.problem(), self.fix())]
    TooLong { what: String, name: String },
    #[error("{what} {}; {}", self.problem(), self.fix())]
    BadChar {
        what: String,
        name: String,
        bad: char,
    },
    #[error("{what} {}; {}", self.problem(), self.fix())]
    Reserved { what: String, name: String },
    #[error("{what} {}; {}", self.problem(), self.fix())]
    RoundSeparator { what: String, name: String },
}

impl NameError {
    /// What is wrong with the name, quoting it, without saying whose it is.
    pub fn problem(&self) -> String {
        match self {
            NameError::Empty { .. } => "is empty".into(),
            NameError::TooLong { name, .. } => {
                format!("{name:?} is longer than {MAX_NAME_LEN} bytes")
            }
            NameError::BadChar { name, bad, .. } => format!("{name:?} contains {bad:?}"),
            NameError::Reserved { name, .. } => {
                format!("{name:?} is '.', contains '..' or starts with '-'")
            }
            NameError::RoundSeparator { name, .. } => format!(
                "{name:?} contains '__' or begins or ends with '_', so it could be read as part of a round directory <exp>__<object>__r<round>_s<seed>"
            ),
        }
    }

    /// How to fix it.
    pub fn fix(&self) -> &'static str {
        match self {
            NameError::Empty { .. } => "give a name of letters, digits, '.', '_' and '-'",
            NameError::TooLong { .. } => "shorten it",
            NameError::BadChar { .. } => "use only letters, digits, '.', '_' and '-'",
            NameError::Reserved { .. } => {
                "use a name that starts with a letter or digit, without '..'"
            }
            NameError::RoundSeparator { .. } => {
                "separate words with single '_' or '-' (e.g. demo_mug or demo-mug)"
            }
        }
    }
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
    fn each_message_is_one_sentence_naming_the_name_and_the_fix() {
        let cases = [
            (
                validate("object code", "a/b"),
                "object code \"a/b\" contains '/'; use only letters, digits, '.', '_' and '-'",
            ),
            (
                validate("--gpu", ""),
                "--gpu is empty; give a name of letters, digits, '.', '_' and '-'",
            ),
            (
                validate("job", "-x"),
                "job \"-x\" is '.', contains '..' or starts with '-'; use a name that starts with a letter or digit, without '..'",
            ),
        ];
        for (r, want) in cases {
            assert_eq!(r.unwrap_err().to_string(), want);
        }
        let e = validate_round_part("exp_name", "a__b")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("exp_name \"a__b\" contains '__'"), "{e}");
        // No message says its rule twice.
        for e in [
            validate("o", "a b").unwrap_err(),
            validate("o", "..").unwrap_err(),
            validate("o", &"x".repeat(201)).unwrap_err(),
            validate_round_part("o", "_a").unwrap_err(),
        ] {
            let text = e.to_string();
            assert_eq!(text.matches("letters, digits").count().max(1), 1, "{text}");
            assert_eq!(text.matches("'__'").count().max(1), 1, "{text}");
        }
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
