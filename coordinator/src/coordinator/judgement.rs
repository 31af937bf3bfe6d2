//! Commit judgement: the pure checks a completion must pass before its round commits, and the
//! commit record it becomes. No lock, no I/O: `commit.rs` gathers the facts (the lease, what
//! the store holds, the object's schema) and applies the verdict.

use quarry_common::storage::Uploaded;

use super::commit::rederive::Derived;
use super::{CompleteExtras, FailureKind, ReportedFile};
use crate::state::CommitRecord;

/// Why a completion is refused: the attempt counts as failed with this kind and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: FailureKind,
    pub message: String,
}

impl Rejection {
    fn new(kind: FailureKind, message: String) -> Rejection {
        Rejection { kind, message }
    }
}

/// Whether `key` lies inside the attempt's staging prefix (`prefix/...`).
pub fn inside_staging(key: &str, staging_prefix: &str) -> bool {
    key.len() > staging_prefix.len() + 1
        && key.starts_with(staging_prefix)
        && key.as_bytes()[staging_prefix.len()] == b'/'
}

/// A completion must name at least one file.
pub fn check_present(files: &[ReportedFile]) -> Result<(), Rejection> {
    if files.is_empty() {
        return Err(Rejection::new(
            FailureKind::OutputMissing,
            "worker reported no files".into(),
        ));
    }
    Ok(())
}

/// A completion must name at least one file, every one inside the attempt's staging prefix.
pub fn check_report(files: &[ReportedFile], staging_prefix: &str) -> Result<(), Rejection> {
    check_present(files)?;
    for f in files {
        if !inside_staging(&f.key, staging_prefix) {
            return Err(Rejection::new(
                FailureKind::OutputInvalid,
                format!(
                    "file key {:?} is outside the attempt's staging prefix",
                    f.key
                ),
            ));
        }
    }
    Ok(())
}

/// What the worker reported must be what the store holds (`held`: its size and sha256, `None`
/// when the key is absent): a file cut short or changed between the worker's hash and the
/// store is a failed attempt, not a commit.
pub fn check_stored(reported: &ReportedFile, held: Option<&Uploaded>) -> Result<(), Rejection> {
    match held {
        Some(got) if got.size == reported.size && got.sha256 == reported.sha256 => Ok(()),
        Some(got) => Err(Rejection::new(
            FailureKind::OutputInvalid,
            format!(
                "file {:?} in the store has {} bytes, sha256 {}; the worker reported {} bytes, sha256 {}",
                reported.key, got.size, got.sha256, reported.size, reported.sha256
            ),
        )),
        None => Err(Rejection::new(
            FailureKind::OutputInvalid,
            format!("file {:?} is not in the store", reported.key),
        )),
    }
}

/// A round's schema must agree with the object's earlier rounds (`expected`; `None` before
/// the first commit).
pub fn check_schema(expected: Option<&str>, got: &str) -> Result<(), Rejection> {
    match expected {
        Some(expected) if !crate::job::schema_compatible(expected, got) => Err(Rejection::new(
            FailureKind::SchemaMismatch,
            format!(
                "output schema `{got}` disagrees with the object's earlier rounds (`{expected}`)"
            ),
        )),
        _ => Ok(()),
    }
}

/// What the coordinator derived from the stored sample file must agree with the worker's
/// report: its sample count, its schema and, when the job has a filter (`filtered`), the
/// samples passing it. Fields it could not derive (see `commit/rederive.rs`) are not compared.
pub fn check_derived(
    reported: &ReportedFile,
    derived: &Derived,
    filtered: bool,
) -> Result<(), Rejection> {
    let (count, schema, kept) = match derived {
        Derived::Full(i) => (i.count, i.schema.as_str(), filtered.then_some(i.kept)),
        Derived::Header { count, schema } => (*count, schema.as_str(), None),
        Derived::Unverified => return Ok(()),
    };
    let lie = |field: &str, said: String, holds: String| {
        Rejection::new(
            FailureKind::OutputInvalid,
            format!(
                "file {:?}: the worker reported {field} {said}, but the stored file holds {holds}",
                reported.key
            ),
        )
    };
    if reported.count != count {
        return Err(lie("count", reported.count.to_string(), count.to_string()));
    }
    if reported.schema != schema {
        return Err(lie(
            "schema",
            format!("`{}`", reported.schema),
            format!("`{schema}`"),
        ));
    }
    if let Some(kept) = kept
        && reported.kept != Some(kept)
    {
        let said = reported.kept.map_or("nothing".into(), |k| k.to_string());
        return Err(lie("kept", said, kept.to_string()));
    }
    Ok(())
}

/// The attempt being committed, as the lease names it.
pub struct Attempt<'a> {
    pub round: u32,
    pub seed: i64,
    pub attempt: &'a str,
    pub staging_prefix: &'a str,
    pub worker: &'a str,
}

/// The commit record of a judged completion (`files` passed [`check_report`], so it is not
/// empty). The first file carries the round's sample count; `filtered` says whether the job
/// has a merge filter (without one every sample counts, and a worker's `kept` is ignored).
pub fn commit_record(
    attempt: &Attempt<'_>,
    files: Vec<ReportedFile>,
    generator_ms: u64,
    extras: CompleteExtras,
    filtered: bool,
    now_unix_ms: u64,
) -> CommitRecord {
    let (count, kept) = files.first().map_or((0, None), |f| (f.count, f.kept));
    CommitRecord {
        round: attempt.round,
        seed: attempt.seed,
        attempt: attempt.attempt.to_string(),
        count,
        files,
        worker: attempt.worker.to_string(),
        generator_ms,
        committed_unix_ms: now_unix_ms,
        gpu: extras.gpu_stats,
        // Only a key inside the attempt's staging is recorded (and later deleted with it).
        log_key: Some(extras.log_key).filter(|k| inside_staging(k, attempt.staging_prefix)),
        kept: kept.filter(|_| filtered),
        yield_stats: extras.yield_stats,
    }
}

/// The parts of a staging key, `<job>/rounds/<object>/r<round>_s<seed>/<attempt>[/...]`:
/// (job, object, round, attempt); `None` for any other key.
pub fn parse_staging_key(key: &str) -> Option<(&str, &str, u32, &str)> {
    let mut parts = key.split('/');
    let (job, rounds, object, round_dir, attempt) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if rounds != "rounds" {
        return None;
    }
    let round = round_dir
        .strip_prefix('r')?
        .split('_')
        .next()?
        .parse::<u32>()
        .ok()?;
    Some((job, object, round, attempt))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::{RoundGpuStats, RoundYield};

    const PREFIX: &str = "exp/rounds/mug/r3_s12348/e1a4";

    fn file(key: &str) -> ReportedFile {
        ReportedFile {
            name: "mug.npy".into(),
            key: key.into(),
            size: 10,
            sha256: "ab".into(),
            count: 7,
            schema: "npy <f4 (*, 3)".into(),
            kept: Some(5),
        }
    }

    #[test]
    fn keys_must_lie_strictly_inside_the_staging_prefix() {
        assert!(inside_staging(&format!("{PREFIX}/mug.npy"), PREFIX));
        assert!(inside_staging(&format!("{PREFIX}/sub/x"), PREFIX));
        // A sibling attempt whose name extends this one's, the prefix itself, its directory.
        assert!(!inside_staging(&format!("{PREFIX}5/mug.npy"), PREFIX));
        assert!(!inside_staging(PREFIX, PREFIX));
        assert!(!inside_staging(&format!("{PREFIX}/"), PREFIX));
        assert!(!inside_staging("exp/final/mug.npy", PREFIX));
    }

    #[test]
    fn a_report_without_files_or_with_a_foreign_key_is_rejected() {
        let none = check_report(&[], PREFIX).unwrap_err();
        assert_eq!(none.kind, FailureKind::OutputMissing);
        let good = file(&format!("{PREFIX}/mug.npy"));
        assert!(check_report(std::slice::from_ref(&good), PREFIX).is_ok());
        let bad = file("exp/rounds/mug/r3_s12348/e1a9/mug.npy");
        let err = check_report(&[good, bad], PREFIX).unwrap_err();
        assert_eq!(err.kind, FailureKind::OutputInvalid);
        assert!(
            err.message.contains("outside the attempt's staging prefix"),
            "{err:?}"
        );
    }

    #[test]
    fn stored_bytes_must_match_the_report() {
        let f = file(&format!("{PREFIX}/mug.npy"));
        let same = Uploaded {
            size: 10,
            sha256: "ab".into(),
        };
        assert!(check_stored(&f, Some(&same)).is_ok());
        let short = Uploaded {
            size: 9,
            sha256: "ab".into(),
        };
        let err = check_stored(&f, Some(&short)).unwrap_err();
        assert_eq!(err.kind, FailureKind::OutputInvalid);
        assert!(err.message.contains("9 bytes") && err.message.contains("reported 10 bytes"));
        let other = Uploaded {
            size: 10,
            sha256: "cd".into(),
        };
        assert!(
            check_stored(&f, Some(&other))
                .unwrap_err()
                .message
                .contains("sha256 cd")
        );
        let missing = check_stored(&f, None).unwrap_err();
        assert!(missing.message.contains("not in the store"), "{missing:?}");
    }

    #[test]
    fn a_schema_must_agree_with_earlier_rounds() {
        assert!(check_schema(None, "npy <f4 (*, 3)").is_ok());
        assert!(check_schema(Some("npy <f4 (*, 3)"), "npy <f4 (*, 3)").is_ok());
        let err = check_schema(Some("npy <f4 (*, 3)"), "npy <f8 (*, 3)").unwrap_err();
        assert_eq!(err.kind, FailureKind::SchemaMismatch);
        assert!(err.message.contains("`npy <f8 (*, 3)`"), "{err:?}");
        // An empty round of the same format fits.
        let empty = format!("npy{}", quarry_formats::EMPTY_SCHEMA_SUFFIX);
        assert!(check_schema(Some("npy <f4 (*, 3)"), &empty).is_ok());
    }

    #[test]
    fn what_the_coordinator_derives_must_match_the_report() {
        let f = file(&format!("{PREFIX}/mug.npy"));
        let full = |count, kept, schema: &str| {
            Derived::Full(quarry_formats::Inspection {
                count,
                kept,
                schema: schema.into(),
            })
        };
        assert!(check_derived(&f, &full(7, 5, "npy <f4 (*, 3)"), true).is_ok());
        let err = check_derived(&f, &full(2, 2, "npy <f4 (*, 3)"), true).unwrap_err();
        assert_eq!(err.kind, FailureKind::OutputInvalid);
        assert!(
            err.message.contains("reported count 7") && err.message.contains("holds 2"),
            "{err:?}"
        );
        let err = check_derived(&f, &full(7, 5, "npy <f8 (*, 3)"), true).unwrap_err();
        assert!(err.message.contains("schema"), "{err:?}");
        let err = check_derived(&f, &full(7, 6, "npy <f4 (*, 3)"), true).unwrap_err();
        assert!(err.message.contains("kept 5"), "{err:?}");
        // Without a filter `kept` is not compared; a header check compares count and schema.
        assert!(check_derived(&f, &full(7, 6, "npy <f4 (*, 3)"), false).is_ok());
        let header = Derived::Header {
            count: 8,
            schema: "npy <f4 (*, 3)".into(),
        };
        assert!(check_derived(&f, &header, true).is_err());
        assert!(check_derived(&f, &Derived::Unverified, true).is_ok());
    }

    #[test]
    fn the_commit_record_keeps_what_counts() {
        let attempt = Attempt {
            round: 3,
            seed: 12348,
            attempt: "e1a4",
            staging_prefix: PREFIX,
            worker: "w-1.1",
        };
        let extras = CompleteExtras {
            gpu_stats: Some(RoundGpuStats {
                utilization_mean_pct: 80,
                memory_peak_mib: 1024,
                samples: 4,
            }),
            log_key: format!("{PREFIX}/generator.log"),
            yield_stats: Some(RoundYield {
                attempts: 10,
                successes: 7,
            }),
        };
        let files = vec![file(&format!("{PREFIX}/mug.npy"))];
        let r = commit_record(&attempt, files.clone(), 42, extras.clone(), true, 99);
        assert_eq!((r.round, r.seed, r.attempt.as_str()), (3, 12348, "e1a4"));
        assert_eq!((r.count, r.kept, r.quota_count()), (7, Some(5), 5));
        assert_eq!(r.log_key.as_deref(), Some(extras.log_key.as_str()));
        assert_eq!((r.generator_ms, r.committed_unix_ms), (42, 99));
        assert_eq!(r.worker, "w-1.1");
        // Without a filter the worker's `kept` is ignored; a log outside staging is dropped.
        let foreign = CompleteExtras {
            log_key: "exp/final/log".into(),
            ..extras
        };
        let r = commit_record(&attempt, files, 42, foreign, false, 99);
        assert_eq!((r.kept, r.quota_count(), r.log_key), (None, 7, None));
    }

    #[test]
    fn staging_keys_parse_and_other_keys_do_not() {
        assert_eq!(
            parse_staging_key("exp/rounds/mug/r3_s12348/e1a4/mug.npy"),
            Some(("exp", "mug", 3, "e1a4"))
        );
        for key in [
            "exp/final/mug/mug.npy",
            "exp/rounds/mug/x3_s1/e1a4/f",
            "exp/rounds/mug/r3_s1",
            "exp/rounds/mug/rX_s1/e1a4/f",
            "",
        ] {
            assert_eq!(parse_staging_key(key), None, "{key}");
        }
    }
}
