//! Where a running `coordinator run` can be reached, and the proof it asks for: its gRPC
//! listener is on a loopback port and requires a random bearer token, generated at start.
//! Both are written owner-only into the experiment's state directory,
//! `<root>/data/experiments/<exp>/.quarry/` (mode 0700):
//!
//! - `coordinator.addr` — `127.0.0.1:<port>`;
//! - `coordinator.token` — the token (mode 0600).
//!
//! Other users of the machine cannot read the token, so they cannot call the listener; the
//! same user finds both with `coordinator status <exp> --root <root>` (or from `<root>` as the
//! current directory). The files are removed when the run ends.

use std::fs::{self, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use quarry_common::secret;

const ADDR_FILE: &str = "coordinator.addr";
const TOKEN_FILE: &str = "coordinator.token";

/// The state directory of experiment `exp` under `root`.
pub fn state_dir(root: &Path, exp: &str) -> PathBuf {
    root.join("data")
        .join("experiments")
        .join(exp)
        .join(".quarry")
}

/// A fresh random token: 32 bytes from the kernel's generator, as hex.
pub fn new_token() -> anyhow::Result<String> {
    secret::random_hex(32).context("reading /dev/urandom for the coordinator's token")
}

/// Writes `contents` to `dir/name` readable by the owner only, replacing it atomically.
fn write_private(dir: &Path, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(path)
}

/// The endpoint files of one running `coordinator run`, removed when dropped.
#[derive(Debug)]
pub struct Published {
    files: Vec<PathBuf>,
}

impl Drop for Published {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = fs::remove_file(f);
        }
    }
}

/// Makes `dir` (the experiment's state directory, which must exist) private to this user and
/// writes the address and token into it. Refuses a directory another user owns: its owner
/// could read the token.
pub fn publish(dir: &Path, addr: &str, token: &str) -> anyhow::Result<Published> {
    let token_path = write_private(dir, TOKEN_FILE, &format!("{token}\n"))?;
    let mut published = Published {
        files: vec![token_path.clone()],
    };
    let mine = fs::metadata(&token_path)?.uid();
    let meta = fs::metadata(dir)?;
    if meta.uid() != mine {
        bail!(
            "{} belongs to another user (uid {}), who could read this run's token; use a root \
             directory of your own (--root)",
            dir.display(),
            meta.uid()
        );
    }
    fs::set_permissions(dir, Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (mode 0700)", dir.display()))?;
    published
        .files
        .push(write_private(dir, ADDR_FILE, &format!("{addr}\n"))?);
    Ok(published)
}

/// What a client needs to reach the `coordinator run` of `exp` under `root`, if one has
/// published its endpoint there: its address and the path of its token file.
pub fn find(root: &Path, exp: &str) -> anyhow::Result<Option<(String, PathBuf)>> {
    quarry_common::names::validate("job", exp).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = state_dir(root, exp);
    let addr = match fs::read_to_string(dir.join(ADDR_FILE)) {
        Ok(a) => a.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("reading {}", dir.join(ADDR_FILE).display()));
        }
    };
    if addr.is_empty() {
        bail!("{} is empty", dir.join(ADDR_FILE).display());
    }
    Ok(Some((addr, dir.join(TOKEN_FILE))))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn published_files_are_private_and_removed_at_the_end() {
        let root = tempfile::tempdir().unwrap();
        let dir = state_dir(root.path(), "e");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        let token = new_token().unwrap();
        assert_eq!(token.len(), 64);
        assert_ne!(token, new_token().unwrap());
        let p = publish(&dir, "127.0.0.1:5", &token).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(TOKEN_FILE)), 0o600);
        assert_eq!(mode(&dir.join(ADDR_FILE)), 0o600);
        let (addr, token_file) = find(root.path(), "e").unwrap().unwrap();
        assert_eq!(addr, "127.0.0.1:5");
        assert_eq!(
            quarry_common::transport::read_token("--auth-token-file", &token_file).unwrap(),
            token
        );
        drop(p);
        assert!(find(root.path(), "e").unwrap().is_none());
        assert!(find(root.path(), "../x").is_err());
    }
}
