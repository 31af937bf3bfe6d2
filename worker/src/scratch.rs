//! Free space where a round writes, checked before a round is accepted: a full disk would
//! otherwise fail the round after it spent its GPU time.

use std::io;
use std::path::Path;

/// MiB available to unprivileged writers on the filesystem holding `path` (or its nearest
/// existing ancestor: a round's directories may not exist yet).
pub fn free_mib(path: &Path) -> io::Result<u64> {
    let mut p = path;
    while !p.exists() {
        p = p
            .parent()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no existing ancestor"))?;
    }
    statvfs_free(p).map(|b| b >> 20)
}

#[cfg(unix)]
fn statvfs_free(p: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid, writable statvfs for the
    // duration of the call; statvfs(3) writes only into `st`.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(not(unix))]
fn statvfs_free(_p: &Path) -> io::Result<u64> {
    Ok(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_the_nearest_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let a = free_mib(dir.path()).unwrap();
        let b = free_mib(&dir.path().join("not/yet/there")).unwrap();
        assert!(a > 0);
        // Same filesystem, moments apart.
        assert!(a.abs_diff(b) < 1024, "{a} vs {b}");
    }
}
