//! What the worker reads from the generator's directory, read so that nothing else can change
//! it in between: an output is moved aside into a private directory, opened once (never
//! through a symlink, never a FIFO or device), hashed before it is inspected, and uploaded
//! from the same handle; the upload's hash must equal the inspected one. A directory output is
//! archived first and the archive's own contents are what is inspected, so the archive counts
//! exactly what was checked.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use quarry_common::storage::{Uploaded, hash_reader};

/// Why a file from the generator's directory cannot be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    #[error("is a symbolic link; write the file itself")]
    Symlink,
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl OpenError {
    pub(super) fn not_found(&self) -> bool {
        matches!(self, OpenError::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// What a non-regular file is, for messages.
pub(super) fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Opens `path` for reading only if it is a regular file itself: a symlink (to `/dev/zero`,
/// to a file outside the round) is refused without being followed, and a FIFO or device is
/// refused without blocking on it.
pub(super) fn open_regular(path: &Path) -> Result<File, OpenError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                OpenError::Symlink
            } else {
                OpenError::Io(e)
            }
        })?;
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        return Err(OpenError::NotRegular(kind_of(ft)));
    }
    Ok(f)
}

/// Reads `f` whole, refusing it if it holds more than `limit` bytes.
pub(super) fn read_limited(f: File, limit: u64) -> Result<Vec<u8>, String> {
    let mut data = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| e.to_string())?;
    if data.len() as u64 > limit {
        return Err(format!("is larger than {} KiB", limit / 1024));
    }
    Ok(data)
}

/// The metadata that changes whenever a file's contents do (ctime cannot be set back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
}

impl Stamp {
    pub(super) fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
}

/// A file opened once, with its size and sha256 at the time it was hashed.
pub(super) struct Hashed {
    pub file: File,
    pub digest: Uploaded,
    pub stamp: Stamp,
}

/// Hashes `file` from its start; the stamp is taken before the first byte is read.
pub(super) fn hash(mut file: File) -> io::Result<Hashed> {
    let stamp = Stamp::of(&file.metadata()?);
    file.rewind()?;
    let digest = hash_reader(&mut file)?;
    Ok(Hashed {
        file,
        digest,
        stamp,
    })
}

impl Hashed {
    /// Whether `m` (a path's metadata) is of the file hashed here.
    pub(super) fn is_file_of(&self, m: &std::fs::Metadata) -> bool {
        (m.dev(), m.ino()) == (self.stamp.dev, self.stamp.ino)
    }

    /// Checks that what was uploaded from this file is what was hashed, and that the file was
    /// not written since. `Err` says what differs.
    pub(super) fn verify(&self, uploaded: &Uploaded) -> Result<(), String> {
        if *uploaded != self.digest {
            return Err(format!(
                "{} bytes with sha256 {} were inspected but {} bytes with sha256 {} were read \
                 for the upload",
                self.digest.size, self.digest.sha256, uploaded.size, uploaded.sha256
            ));
        }
        let now = self.file.metadata().map_err(|e| e.to_string())?;
        if Stamp::of(&now) != self.stamp {
            return Err("the file was written between its inspection and its upload".into());
        }
        Ok(())
    }
}

/// The private directory an output is moved into while it is checked and uploaded, beside
/// the output (same filesystem: a rename, no copy). Dropping it moves the output back to where
/// the generator wrote it (for `keep_intermediate` and the round's own clean-up) and removes
/// the directory with what else is in it (the archive, the inspected copy).
pub(super) struct Staging {
    dir: PathBuf,
    original: PathBuf,
    staged: PathBuf,
}

impl Staging {
    /// Where the staging directory of `output` is.
    pub(super) fn dir_of(output: &Path) -> PathBuf {
        let mut name = output.file_name().unwrap_or_default().to_os_string();
        name.push(".quarry-staging");
        output.with_file_name(name)
    }

    /// Moves `output` (a file or directory, not followed if a symlink) into a new private
    /// staging directory.
    pub(super) fn move_aside(output: &Path) -> io::Result<Staging> {
        let dir = Self::dir_of(output);
        remove_any(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let staged = dir.join(output.file_name().unwrap_or_default());
        if let Err(e) = std::fs::rename(output, &staged) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(Staging {
            dir,
            original: output.to_path_buf(),
            staged,
        })
    }

    /// The output, moved aside.
    pub(super) fn staged(&self) -> &Path {
        &self.staged
    }

    /// A path inside the staging directory for a file made here.
    pub(super) fn scratch(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Puts `staged` paths in a message back as the output's own path.
    pub(super) fn unstage(&self, message: &str, scratch: &Path) -> String {
        let original = self.original.display().to_string();
        message
            .replace(&self.staged.display().to_string(), &original)
            .replace(&scratch.display().to_string(), &original)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Whatever now sits at the original path was written after the output was moved
        // aside: the output checked here wins.
        if std::fs::symlink_metadata(&self.original).is_ok() {
            remove_any(&self.original);
        }
        if let Err(e) = std::fs::rename(&self.staged, &self.original) {
            tracing::debug!(path = %self.original.display(), error = %e, "could not move an output back");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes a file or directory (not following a symlink), ignoring errors.
pub(super) fn remove_any(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn symlinks_fifos_and_devices_are_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let link = t.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(open_regular(&link), Err(OpenError::Symlink)));
        let fifo = t.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo(3) reads only it.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = open_regular(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("a device"), "{e}");
        assert!(
            open_regular(&t.path().join("none"))
                .unwrap_err()
                .not_found()
        );
    }

    #[test]
    fn a_write_between_hashing_and_upload_is_caught() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("out.npy");
        std::fs::write(&p, b"inspected bytes").unwrap();
        // A process the generator left behind, holding the output open for writing: moving
        // the output aside does not take its handle away.
        let mut writer = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let staging = Staging::move_aside(&p).unwrap();
        let hashed = hash(open_regular(staging.staged()).unwrap()).unwrap();
        assert!(hashed.verify(&hashed.digest.clone()).is_ok());
        writer.write_all(b"CHANGED").unwrap();
        writer.sync_all().unwrap();
        let reread = hash(hashed.file.try_clone().unwrap()).unwrap();
        let e = hashed.verify(&reread.digest).unwrap_err();
        assert!(e.contains("were inspected but"), "{e}");
        // Even the same bytes written back are a write (past the filesystem clock's tick).
        std::thread::sleep(std::time::Duration::from_millis(30));
        std::fs::write(staging.staged(), b"inspected bytes").unwrap();
        let e = hashed.verify(&hashed.digest.clone()).unwrap_err();
        assert!(e.contains("written between"), "{e}");
        drop(staging);
        assert_eq!(std::fs::read(&p).unwrap(), b"inspected bytes");
        assert!(!Staging::dir_of(&p).exists());
    }
}
