//! A round's outputs before upload, each checked in its format (its samples counted, those
//! passing the job's filter too) so that what is uploaded is exactly what was checked:
//!
//! - a file of a format inspected from memory (`.npy`, JSON Lines) up to [`IN_MEMORY_MAX`]
//!   is read once through one handle; those bytes are hashed, inspected and uploaded, so
//!   nothing done to the file afterwards reaches the upload (most outputs: no directory is
//!   made or removed, the file is read once);
//! - any other output is moved aside into a private staging directory, opened once and
//!   hashed, inspected, and uploaded from that same handle with its hash checked again (see
//!   `staged`). A directory dataset is archived into one tar file so it travels as one object;
//!   the archive's contents are what is checked.
//!
//! The generator's yield sidecar is read here as well.
//!
//! Nothing is followed or blocked on: an output or sidecar that is a symlink, a FIFO or a
//! device is refused (the round fails as `output_invalid`, naming it), and a sidecar larger
//! than [`SIDECAR_LIMIT`] is refused unread.

use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use quarry_common::storage::{Uploaded, hex};
use quarry_formats::{Filter, Format, archive};
use quarry_proto::v1 as pb;
use sha2::{Digest, Sha256};

use super::staged::{self, Hashed, Staging};

/// MimicGen's names for a run's trials and kept demos in `important_stats.json`
/// (`mimicgen/scripts/generate_dataset.py`, `get_important_stats`).
const MIMICGEN_ATTEMPTS: &str = "num_attempts";
const MIMICGEN_SUCCESSES: &str = "num_success";

/// The most bytes read of a yield sidecar.
pub(super) const SIDECAR_LIMIT: u64 = 64 * 1024;

/// Outputs up to this size, of a format inspected from memory, are read into memory once
/// (the store uploads a file up to this size from one buffer anyway).
pub(super) const IN_MEMORY_MAX: u64 = 8 << 20;

/// An output ready to upload. Dropping it puts a staged output back where the generator wrote
/// it and removes the staging directory.
pub(super) struct Checked {
    /// The output's path, for messages.
    pub path: PathBuf,
    pub upload: Upload,
    pub count: u64,
    pub kept: u64,
    pub schema: String,
}

/// What is uploaded for a checked output.
pub(super) enum Upload {
    /// The output's bytes, read once: hashed, inspected and uploaded from this buffer.
    Memory { data: Bytes, digest: Uploaded },
    /// The file to upload (the output itself, or its archive), open, with the size and sha256
    /// it had when it was inspected.
    Staged {
        hashed: Hashed,
        /// Declared last: dropped after the handle above is closed.
        _staging: Staging,
    },
}

impl Checked {
    /// Checks that `uploaded` (what the upload read from a staged file) is what was
    /// inspected; bytes uploaded from memory are the inspected ones.
    pub fn verify(&self, rel: &str, uploaded: &Uploaded) -> Result<(), Refused> {
        let Upload::Staged { hashed, .. } = &self.upload else {
            return Ok(());
        };
        hashed.verify(uploaded).map_err(|why| {
            refused(
                pb::FailureKind::OutputInvalid,
                format!(
                    "{rel} changed after it was inspected ({why}); a process the generator left \
                     behind may still be writing it"
                ),
            )
        })
    }
}

/// Why an output cannot be uploaded.
pub(super) struct Refused {
    pub kind: pb::FailureKind,
    pub message: String,
}

fn refused(kind: pb::FailureKind, message: String) -> Refused {
    Refused { kind, message }
}

fn invalid(message: String) -> Refused {
    refused(pb::FailureKind::OutputInvalid, message)
}

/// Checks one output at `path` (blocking: run it off the runtime).
pub(super) fn check(spec: &pb::OutputFile, path: &Path) -> Result<Checked, Refused> {
    check_with(spec, path, IN_MEMORY_MAX)
}

/// [`check`], reading outputs of up to `in_memory_max` bytes into memory.
fn check_with(spec: &pb::OutputFile, path: &Path, in_memory_max: u64) -> Result<Checked, Refused> {
    let name = if spec.format.is_empty() {
        "npy"
    } else {
        spec.format.as_str()
    };
    let format = Format::from_name(name).ok_or_else(|| {
        invalid(format!(
            "this worker does not know the format {name:?}; upgrade it to the coordinator's version"
        ))
    })?;
    let filter = match spec.filter.as_str() {
        "" => None,
        f => Some(Filter::parse(f).map_err(|e| invalid(format!("job filter: {e}")))?),
    };
    let rel = &spec.path;
    let what = if format.is_directory() {
        "directory"
    } else {
        "file"
    };
    let missing = |detail: String| {
        refused(
            pb::FailureKind::OutputMissing,
            format!("generator exited 0 but wrote no {what} {rel}{detail}"),
        )
    };
    // Looked at, not followed: a link could point anywhere (another round, /dev/zero).
    let ft = match std::fs::symlink_metadata(path) {
        Ok(m) => m.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing(String::new())),
        Err(e) => return Err(invalid(format!("{rel}: {e}"))),
    };
    let kind = staged::kind_of(ft);
    if ft.is_symlink() {
        return Err(invalid(format!(
            "{rel} is a symbolic link; write the output itself, not a link to it"
        )));
    }
    if !(ft.is_dir() || ft.is_file()) {
        return Err(invalid(format!("{rel} is {kind}, not a {what}")));
    }
    if ft.is_dir() != format.is_directory() {
        return Err(missing(format!(" ({rel} is {kind})")));
    }
    if format.inspects_bytes()
        && let Some(data) =
            read_small(path, in_memory_max).map_err(|e| invalid(format!("{rel}: {e}")))?
    {
        let digest = Uploaded {
            size: data.len() as u64,
            sha256: hex(&Sha256::digest(&data)),
        };
        let info = match quarry_formats::inspect_bytes(format, path, &data, filter.as_ref()) {
            Some(inspected) => inspected.map_err(|e| invalid(format!("{rel}: {e}")))?,
            None => {
                return Err(invalid(format!(
                    "{rel}: {format} is not inspected from memory"
                )));
            }
        };
        return Ok(Checked {
            path: path.to_path_buf(),
            upload: Upload::Memory {
                data: Bytes::from(data),
                digest,
            },
            count: info.count,
            kept: info.kept,
            schema: info.schema,
        });
    }
    let staging = Staging::move_aside(path).map_err(|e| {
        invalid(format!(
            "{rel}: could not move it aside for inspection: {e}"
        ))
    })?;
    let opened = |p: &Path| {
        staged::open_regular(p)
            .and_then(|f| staged::hash(f).map_err(Into::into))
            .map_err(|e| invalid(format!("{rel}: {e}")))
    };
    let (hashed, inspected) = if format.is_directory() {
        // Archived first, then the archive's own contents are inspected: the object uploaded
        // is exactly the tree that was checked, whatever happens to the directory meanwhile.
        let ar = staging.scratch("archive.tar");
        let copy = staging.scratch("inspected");
        let unstaged = |e: String| invalid(staging.unstage(&format!("{rel}: {e}"), &copy));
        archive::pack_dir(staging.staged(), &ar).map_err(|e| unstaged(e.to_string()))?;
        let hashed = opened(&ar)?;
        archive::unpack(&ar, &copy).map_err(|e| unstaged(e.to_string()))?;
        (hashed, copy)
    } else {
        (opened(staging.staged())?, staging.staged().to_path_buf())
    };
    let info = quarry_formats::inspect(format, &inspected, filter.as_ref())
        .map_err(|e| invalid(staging.unstage(&format!("{rel}: {e}"), &inspected)))?;
    if format.is_directory() {
        let _ = std::fs::remove_dir_all(&inspected);
    } else if !std::fs::symlink_metadata(&inspected).is_ok_and(|m| hashed.is_file_of(&m)) {
        return Err(invalid(format!(
            "{rel} was replaced while it was inspected"
        )));
    }
    Ok(Checked {
        path: path.to_path_buf(),
        upload: Upload::Staged {
            hashed,
            _staging: staging,
        },
        count: info.count,
        kept: info.kept,
        schema: info.schema,
    })
}

/// Reads the regular file at `path` whole through one handle (a symlink, FIFO or device is
/// refused unread) when it holds at most `max` bytes; `None` when it is larger, also when it
/// grew past `max` while it was read.
fn read_small(path: &Path, max: u64) -> Result<Option<Vec<u8>>, staged::OpenError> {
    let f = staged::open_regular(path)?;
    let len = f.metadata()?.len();
    if len > max {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(len as usize);
    f.take(max + 1).read_to_end(&mut data)?;
    Ok((data.len() as u64 <= max).then_some(data))
}

/// The staging directory `output` is moved into while it is checked and uploaded.
pub(super) fn staging_dir(output: &Path) -> PathBuf {
    Staging::dir_of(output)
}

/// Removes a previous attempt's output (file or directory) and its staging directory, so they
/// cannot pass for this attempt's.
pub(super) fn remove_stale(path: &Path) {
    staged::remove_any(path);
    staged::remove_any(&Staging::dir_of(path));
}

/// Reads the generator's yield sidecar: `{"attempts": A, "successes": S}`, whole numbers with
/// `successes <= attempts`, or MimicGen's `important_stats.json` as its `generate_dataset.py`
/// writes it (`num_attempts`, `num_success`, used when `attempts` and `successes` are both
/// absent), so a MimicGen run needs no wrapper to report its yield. A sidecar the job names
/// but the generator did not write is an error: the round's yield would be unknown.
pub(super) fn read_yield(path: &Path, rel: &str) -> Result<pb::RoundYield, Refused> {
    let why = |e: String| format!("yield sidecar {rel}: {e} (the job's generator.stats names it)");
    let data = staged::open_regular(path)
        .map_err(|e| {
            let kind = if e.not_found() {
                pb::FailureKind::OutputMissing
            } else {
                pb::FailureKind::OutputInvalid
            };
            refused(kind, why(e.to_string()))
        })
        .and_then(|f| staged::read_limited(f, SIDECAR_LIMIT).map_err(|e| invalid(why(e))))?;
    let text = String::from_utf8(data).map_err(|_| invalid(why("not UTF-8 text".into())))?;
    let bad = |why: &str| {
        refused(
            pb::FailureKind::OutputInvalid,
            format!(
                "yield sidecar {rel}: {why}; write {{\"attempts\": <trials>, \"successes\": <kept>}} \
                 (or name MimicGen's important_stats.json)"
            ),
        )
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad("not JSON"))?;
    let field = |k: &str| -> Result<u64, Refused> {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad(&format!("\"{k}\" is missing or not a whole number")))
    };
    let mimicgen = v.get("attempts").is_none()
        && v.get("successes").is_none()
        && v.get(MIMICGEN_ATTEMPTS).is_some();
    let (attempts, successes) = if mimicgen {
        (field(MIMICGEN_ATTEMPTS)?, field(MIMICGEN_SUCCESSES)?)
    } else {
        (field("attempts")?, field("successes")?)
    };
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
        // MimicGen's important_stats.json, as its generate_dataset.py writes it.
        std::fs::write(
            &p,
            r#"{"generation_path": "/out/square", "success_rate": 70.0, "failure_rate": 30.0,
                "num_success": 7, "num_failures": 3, "num_attempts": 10, "num_problematic": 1,
                "ep_length_mean": 151.2, "time spent (hrs)": "0.02"}"#,
        )
        .unwrap();
        let y = read_yield(&p, "s.json").map_err(|r| r.message).unwrap();
        assert_eq!((y.attempts, y.successes), (10, 7));
        std::fs::write(&p, r#"{"num_attempts": 10, "num_failures": 3}"#).unwrap();
        let e = read_yield(&p, "s.json").err().unwrap();
        assert!(
            e.message.contains("\"num_success\" is missing"),
            "{}",
            e.message
        );
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

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo(3) reads only it.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn hostile_sidecars_are_refused_unread() {
        let t = tempfile::tempdir().unwrap();
        // A link to /dev/zero would fill memory; a FIFO would block forever; a huge file
        // (valid JSON padded with spaces) would be read whole.
        let zero = t.path().join("zero.json");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let fifo = t.path().join("fifo.json");
        mkfifo(&fifo);
        let huge = t.path().join("huge.json");
        let mut text = " ".repeat(1 << 20);
        text.push_str(r#"{"attempts": 1, "successes": 1}"#);
        std::fs::write(&huge, text).unwrap();
        for (p, why) in [
            (&zero, "is a symbolic link"),
            (&fifo, "is a FIFO, not a regular file"),
            (&huge, "is larger than 64 KiB"),
        ] {
            let e = read_yield(p, "s.json").err().unwrap();
            assert_eq!(e.kind, pb::FailureKind::OutputInvalid, "{}", e.message);
            assert!(e.message.contains(why), "{}", e.message);
            assert!(
                e.message.starts_with("yield sidecar s.json: "),
                "{}",
                e.message
            );
        }
    }

    fn jsonl() -> pb::OutputFile {
        pb::OutputFile {
            path: "out.jsonl".into(),
            name: "out.jsonl".into(),
            format: "jsonl".into(),
            filter: String::new(),
        }
    }

    #[test]
    fn hostile_outputs_are_refused_before_they_are_opened() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out.jsonl");
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("secret.jsonl");
        std::fs::write(&target, "{\"a\": 1}\n").unwrap();
        for (make, why) in [
            (
                Box::new(|p: &Path| std::os::unix::fs::symlink("/dev/zero", p).unwrap())
                    as Box<dyn Fn(&Path)>,
                "out.jsonl is a symbolic link",
            ),
            (
                Box::new(|p: &Path| std::os::unix::fs::symlink(&target, p).unwrap()),
                "out.jsonl is a symbolic link",
            ),
            (
                Box::new(|p: &Path| mkfifo(p)),
                "out.jsonl is a FIFO, not a file",
            ),
        ] {
            remove_stale(&out);
            make(&out);
            let e = check(&jsonl(), &out).err().unwrap();
            assert_eq!(e.kind, pb::FailureKind::OutputInvalid, "{}", e.message);
            assert!(e.message.contains(why), "{}", e.message);
        }
    }

    /// The open handle a staged output is uploaded from.
    fn staged_file(c: &Checked) -> std::fs::File {
        match &c.upload {
            Upload::Staged { hashed, .. } => hashed.file.try_clone().unwrap(),
            Upload::Memory { .. } => panic!("read into memory, not staged"),
        }
    }

    #[test]
    fn an_output_is_checked_aside_and_put_back() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out.jsonl");
        std::fs::write(&out, "{\"a\": 1}\n{\"a\": 2}\n").unwrap();
        let c = check_with(&jsonl(), &out, 0)
            .map_err(|r| r.message)
            .unwrap();
        assert_eq!(c.count, 2);
        // While it is checked, nothing is at the generator's path: a leftover writer that
        // re-opens the path by name writes a new file, not the one inspected.
        assert!(!out.exists());
        std::fs::write(&out, "not json\n").unwrap();
        let mut f = staged_file(&c);
        std::io::Seek::rewind(&mut f).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
        assert_eq!(bytes, b"{\"a\": 1}\n{\"a\": 2}\n");
        drop(c);
        assert_eq!(std::fs::read(&out).unwrap(), b"{\"a\": 1}\n{\"a\": 2}\n");
        assert!(!staging_dir(&out).exists());
        // Inspection errors name the output, not the staging copy.
        std::fs::write(&out, "{\"a\": 1}\nnope\n").unwrap();
        let e = check_with(&jsonl(), &out, 0).err().unwrap();
        assert!(!e.message.contains("quarry-staging"), "{}", e.message);
        assert!(e.message.starts_with("out.jsonl: "), "{}", e.message);
        assert!(out.exists());
    }

    #[test]
    fn a_small_output_is_read_once_and_later_writes_do_not_reach_the_upload() {
        use std::io::Write;
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out.jsonl");
        let lines = b"{\"a\": 1}\n{\"a\": 2}\n";
        std::fs::write(&out, lines).unwrap();
        // A process the generator left behind, holding the output open for writing.
        let mut writer = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
        let c = check(&jsonl(), &out).map_err(|r| r.message).unwrap();
        assert_eq!((c.count, c.kept), (2, 2));
        // Read in place: nothing was moved, no staging directory was made.
        assert!(out.exists());
        assert!(!staging_dir(&out).exists());
        writer.write_all(b"CHANGED").unwrap();
        writer.sync_all().unwrap();
        let Upload::Memory { data, digest } = &c.upload else {
            panic!("a small output is read into memory");
        };
        assert_eq!(data.as_ref(), lines);
        assert_eq!(
            *digest,
            quarry_common::storage::hash_reader(&lines[..]).unwrap()
        );
        assert!(c.verify("out.jsonl", digest).is_ok());
        drop(c);
        // Inspection errors name the output.
        std::fs::write(&out, "{\"a\": 1}\nnope\n").unwrap();
        let e = check(&jsonl(), &out).err().unwrap();
        assert!(e.message.starts_with("out.jsonl: "), "{}", e.message);
        assert!(e.message.contains("line 2"), "{}", e.message);
        // A file over the limit, or one that became a link, is not read into memory.
        std::fs::write(&out, lines).unwrap();
        assert!(read_small(&out, 5).unwrap().is_none());
        let link = t.path().join("link.jsonl");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        assert!(matches!(
            read_small(&link, 1 << 20),
            Err(staged::OpenError::Symlink)
        ));
    }

    #[test]
    fn a_directory_output_is_inspected_from_its_own_archive() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("data");
        std::fs::create_dir_all(out.join("episodes")).unwrap();
        std::fs::create_dir_all(out.join("metadata")).unwrap();
        for i in 0..2 {
            std::fs::write(out.join(format!("episodes/episode_{i:05}.bin")), b"x").unwrap();
            std::fs::write(
                out.join(format!("metadata/episode_{i:05}_meta.json")),
                format!("{{\"episode_idx\": {i}, \"statistics\": {{\"n\": 1}}}}"),
            )
            .unwrap();
        }
        std::fs::write(
            out.join("metadata/collection_summary.json"),
            r#"{"total_episodes": 2, "successful_episodes": 2}"#,
        )
        .unwrap();
        let spec = pb::OutputFile {
            path: "data".into(),
            name: "data.tar".into(),
            format: "episodes".into(),
            filter: String::new(),
        };
        let c = check(&spec, &out).map_err(|r| r.message).unwrap();
        assert_eq!(c.count, 2);
        // The handle is the archive, whose contents were inspected.
        let mut f = staged_file(&c);
        std::io::Seek::rewind(&mut f).unwrap();
        let copy = t.path().join("copy.tar");
        std::io::copy(&mut { f }, &mut std::fs::File::create(&copy).unwrap()).unwrap();
        let unpacked = t.path().join("unpacked");
        archive::unpack(&copy, &unpacked).unwrap();
        assert_eq!(
            std::fs::read(unpacked.join("episodes/episode_00001.bin")).unwrap(),
            b"x"
        );
        drop(c);
        assert!(out.join("episodes/episode_00000.bin").is_file());
        assert!(!staging_dir(&out).exists());
        // A symlink inside the tree is refused by the archiver, naming the output's path.
        std::os::unix::fs::symlink("/dev/zero", out.join("episodes/episode_00002.bin")).unwrap();
        let e = check(&spec, &out).err().unwrap();
        assert_eq!(e.kind, pb::FailureKind::OutputInvalid);
        assert!(!e.message.contains("quarry-staging"), "{}", e.message);
        assert!(
            e.message.contains("symlinks are not archived"),
            "{}",
            e.message
        );
    }
}
