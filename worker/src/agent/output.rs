//! A round's outputs before upload: each is checked in its format (and its samples counted,
//! those passing the job's filter too); a directory dataset is archived into one tar file
//! beside it so it travels as one object. The generator's yield sidecar is read here as well.

use std::path::{Path, PathBuf};

use quarry_formats::{Filter, Format, archive};
use quarry_proto::v1 as pb;

/// An output ready to upload.
pub(super) struct Checked {
    /// The file to upload: the output itself, or its archive.
    pub upload: PathBuf,
    /// Set when `upload` is an archive made here (removed after upload).
    pub archive: Option<PathBuf>,
    pub count: u64,
    pub kept: u64,
    pub schema: String,
}

/// Why an output cannot be uploaded.
pub(super) struct Refused {
    pub kind: pb::FailureKind,
    pub message: String,
}

fn refused(kind: pb::FailureKind, message: String) -> Refused {
    Refused { kind, message }
}

/// Checks one output at `path` (blocking: run it off the runtime).
pub(super) fn check(spec: &pb::OutputFile, path: &Path) -> Result<Checked, Refused> {
    let name = if spec.format.is_empty() {
        "npy"
    } else {
        spec.format.as_str()
    };
    let format = Format::from_name(name).ok_or_else(|| {
        refused(
            pb::FailureKind::OutputInvalid,
            format!(
                "this worker does not know the format {name:?}; upgrade it to the coordinator's version"
            ),
        )
    })?;
    let filter = match spec.filter.as_str() {
        "" => None,
        f => Some(
            Filter::parse(f)
                .map_err(|e| refused(pb::FailureKind::OutputInvalid, format!("job filter: {e}")))?,
        ),
    };
    let exists = if format.is_directory() {
        path.is_dir()
    } else {
        path.is_file()
    };
    if !exists {
        let what = if format.is_directory() {
            "directory"
        } else {
            "file"
        };
        return Err(refused(
            pb::FailureKind::OutputMissing,
            format!("generator exited 0 but wrote no {what} {}", spec.path),
        ));
    }
    let info = quarry_formats::inspect(format, path, filter.as_ref()).map_err(|e| {
        refused(
            pb::FailureKind::OutputInvalid,
            format!("{}: {e}", spec.path),
        )
    })?;
    let (upload, archive) = if format.is_directory() {
        let ar = archive_path(path);
        let _ = std::fs::remove_file(&ar);
        archive::pack_dir(path, &ar).map_err(|e| {
            let _ = std::fs::remove_file(&ar);
            refused(
                pb::FailureKind::OutputInvalid,
                format!("{}: {e}", spec.path),
            )
        })?;
        (ar.clone(), Some(ar))
    } else {
        (path.to_path_buf(), None)
    };
    Ok(Checked {
        upload,
        archive,
        count: info.count,
        kept: info.kept,
        schema: info.schema,
    })
}

/// Where a directory output's archive is written: beside it, on the same disk.
pub(super) fn archive_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".quarry.tar");
    output.with_file_name(name)
}

/// Removes a previous attempt's output (file or directory) so it cannot pass for this one's.
pub(super) fn remove_stale(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
    let _ = std::fs::remove_file(archive_path(path));
}

/// Reads the generator's yield sidecar: `{"attempts": A, "successes": S}`, whole numbers with
/// `successes <= attempts`. A sidecar the job names but the generator did not write is an
/// error: the round's yield would be unknown.
pub(super) fn read_yield(path: &Path, rel: &str) -> Result<pb::RoundYield, Refused> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            pb::FailureKind::OutputMissing
        } else {
            pb::FailureKind::OutputInvalid
        };
        refused(
            kind,
            format!("yield sidecar {rel}: {e} (the job's generator.stats names it)"),
        )
    })?;
    let bad = |why: &str| {
        refused(
            pb::FailureKind::OutputInvalid,
            format!(
                "yield sidecar {rel}: {why}; write {{\"attempts\": <trials>, \"successes\": <kept>}}"
            ),
        )
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad("not JSON"))?;
    let field = |k: &str| -> Result<u64, Refused> {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad(&format!("\"{k}\" is missing or not a whole number")))
    };
    let attempts = field("attempts")?;
    let successes = field("successes")?;
    if successes > attempts {
        return Err(bad(&format!(
            "{successes} successes of {attempts} attempts"
        )));
    }
    Ok(pb::RoundYield {
        attempts,
        successes,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn yields_are_read_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("s.json");
        std::fs::write(&p, r#"{"attempts": 10, "successes": 7, "extra": "ok"}"#).unwrap();
        let y = read_yield(&p, "s.json").map_err(|r| r.message).unwrap();
        assert_eq!((y.attempts, y.successes), (10, 7));
        for (text, why) in [
            ("{\"attempts\": 3, \"successes\": 4}", "4 successes of 3"),
            ("{\"attempts\": 3}", "\"successes\" is missing"),
            ("{\"attempts\": -1, \"successes\": 0}", "\"attempts\""),
            ("nope", "not JSON"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = read_yield(&p, "s.json").err().unwrap();
            assert!(e.message.contains(why), "{text}: {}", e.message);
            assert_eq!(e.kind, pb::FailureKind::OutputInvalid);
        }
        let e = read_yield(&t.path().join("none.json"), "none.json")
            .err()
            .unwrap();
        assert_eq!(e.kind, pb::FailureKind::OutputMissing);
    }

    #[test]
    fn unknown_formats_and_missing_outputs_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let spec = |format: &str| pb::OutputFile {
            path: "out".into(),
            name: "out".into(),
            format: format.into(),
            filter: String::new(),
        };
        let e = check(&spec("parquet"), &t.path().join("out"))
            .err()
            .unwrap();
        assert!(e.message.contains("\"parquet\""), "{}", e.message);
        let e = check(&spec("zarr"), &t.path().join("out")).err().unwrap();
        assert_eq!(e.kind, pb::FailureKind::OutputMissing);
        assert!(e.message.contains("no directory"), "{}", e.message);
    }
}
