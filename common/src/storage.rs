//! Object storage: where workers stage round outputs and the coordinator writes finals and the
//! manifest. A local directory (object_store's local filesystem) on one machine; the same
//! `ObjectStore` trait carries S3 in a cluster.
//!
//! Key layout under the store root (see docs/architecture.md):
//! ```text
//! <exp>/manifest.json
//! <exp>/rounds/<object>/r<round>_s<seed>/<attempt>/<file>     staging, deleted after the final
//! <exp>/final_seed_<min>-<max>/<object>/<object>.npy           final (seed_only | both)
//! <exp>/final/<object>/<object>.npy                            final (plain_only | both)
//! <exp>/logs/<object>/r<round>_s<seed>/<attempt>.log           generator logs of failed attempts
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

/// Upload chunk: large enough for S3's 5 MiB part minimum, small enough to bound memory.
const CHUNK: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store URL {url:?}: {problem}; use file:///absolute/dir or an absolute directory path")]
    BadUrl { url: String, problem: String },
    #[error("object store {op} {key}: {source}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    fn store(op: &'static str, key: &str, source: object_store::Error) -> Self {
        StoreError::Store {
            op,
            key: key.to_string(),
            source,
        }
    }
}

/// A handle on the object store, cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: String,
    /// Set for a local directory store: lets merges read and write files directly.
    local_root: Option<PathBuf>,
}

/// Size and content hash of an uploaded object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub size: u64,
    pub sha256: String,
}

impl Store {
    /// Opens `file:///abs/dir` or `/abs/dir` (created if missing).
    pub fn open(url: &str) -> Result<Store, StoreError> {
        let dir = if let Some(rest) = url.strip_prefix("file://") {
            PathBuf::from(rest)
        } else if url.contains("://") {
            return Err(StoreError::BadUrl {
                url: url.into(),
                problem: "only local directories are supported in this build".into(),
            });
        } else {
            PathBuf::from(url)
        };
        if !dir.is_absolute() {
            return Err(StoreError::BadUrl {
                url: url.into(),
                problem: "the path is not absolute".into(),
            });
        }
        Self::open_dir(&dir)
    }

    /// A local directory store rooted at `dir`.
    pub fn open_dir(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            op: "create store directory",
            path: dir.display().to_string(),
            source,
        })?;
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| StoreError::BadUrl {
                url: dir.display().to_string(),
                problem: e.to_string(),
            })?
            .with_automatic_cleanup(true)
            .with_fsync(true);
        let root = std::fs::canonicalize(dir).map_err(|source| StoreError::Io {
            op: "resolve store directory",
            path: dir.display().to_string(),
            source,
        })?;
        Ok(Store {
            inner: Arc::new(fs),
            url: format!("file://{}", root.display()),
            local_root: Some(root),
        })
    }

    /// The URL workers are told to open.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// The local file behind `key`, for a local directory store.
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|r| r.join(key))
    }

    fn key(key: &str) -> Result<Key, StoreError> {
        Key::parse(key).map_err(|e| StoreError::BadUrl {
            url: key.into(),
            problem: e.to_string(),
        })
    }

    /// Streams a local file to `key`, hashing it on the way; memory stays at one chunk.
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<Uploaded, StoreError> {
        let k = Self::key(key)?;
        let upload = self
            .inner
            .put_multipart(&k)
            .await
            .map_err(|e| StoreError::store("upload", key, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, CHUNK);
        let io = |source| StoreError::Io {
            op: "read",
            path: file.display().to_string(),
            source,
        };
        let mut f = std::fs::File::open(file).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        // Sized to the file: most round outputs are far smaller than a chunk, and zeroing
        // 8 MiB per upload costs milliseconds.
        let len = f.metadata().map_or(CHUNK as u64, |m| m.len());
        let mut buf = vec![0u8; (len as usize).clamp(4096, CHUNK)];
        loop {
            // Reads are small and sequential; doing them inline keeps the code simple and the
            // upload pipeline (WriteMultipart) overlaps the network part.
            let n = match f.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(io(e));
                }
            };
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
            writer
                .wait_for_capacity(4)
                .await
                .map_err(|e| StoreError::store("upload", key, e))?;
            writer.write(&buf[..n]);
        }
        writer
            .finish()
            .await
            .map_err(|e| StoreError::store("upload", key, e))?;
        Ok(Uploaded {
            size,
            sha256: hex(&hasher.finalize()),
        })
    }

    /// Writes a small object in one request (atomic: readers see the old or the new bytes).
    pub async fn put_bytes(&self, key: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let k = Self::key(key)?;
        self.inner
            .put(&k, PutPayload::from_bytes(bytes.into()))
            .await
            .map_err(|e| StoreError::store("put", key, e))?;
        Ok(())
    }

    /// Reads a whole object; `None` when it does not exist.
    pub async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let k = Self::key(key)?;
        match self.inner.get(&k).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .map_err(|e| StoreError::store("get", key, e))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::store("get", key, e)),
        }
    }

    /// Keys under `prefix` (a directory-like prefix, no trailing slash).
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let k = Self::key(prefix)?;
        let metas: Vec<_> = self
            .inner
            .list(Some(&k))
            .try_collect()
            .await
            .map_err(|e| StoreError::store("list", prefix, e))?;
        Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
    }

    /// Deletes every object under `prefix`; returns how many were deleted.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, StoreError> {
        let keys = self.list(prefix).await?;
        for key in &keys {
            self.delete(key).await?;
        }
        // A local directory may also hold what listing does not show: the part files of an
        // upload a killed worker never finished. Remove the whole directory.
        if let Some(dir) = self.local_path(prefix) {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(StoreError::Io {
                        op: "remove",
                        path: dir.display().to_string(),
                        source,
                    });
                }
            }
        }
        Ok(keys.len())
    }

    /// Deletes one object; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let k = Self::key(key)?;
        match self.inner.delete(&k).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::store("delete", key, e)),
        }
    }
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Object-store keys, in one place.
pub mod keys {
    pub fn manifest(exp: &str) -> String {
        format!("{exp}/manifest.json")
    }
    pub fn round_dir(exp: &str, object: &str, round: u32, seed: i64) -> String {
        format!("{exp}/rounds/{object}/r{round}_s{seed}")
    }
    pub fn object_rounds(exp: &str, object: &str) -> String {
        format!("{exp}/rounds/{object}")
    }
    pub fn staging(exp: &str, object: &str, round: u32, seed: i64, attempt: &str) -> String {
        format!("{}/{attempt}", round_dir(exp, object, round, seed))
    }
    pub fn final_seed(exp: &str, object: &str, seed_min: i64, seed_max: i64) -> String {
        format!("{exp}/final_seed_{seed_min}-{seed_max}/{object}/{object}.npy")
    }
    pub fn final_plain(exp: &str, object: &str) -> String {
        format!("{exp}/final/{object}/{object}.npy")
    }
    pub fn log(exp: &str, object: &str, round: u32, seed: i64, attempt: &str) -> String {
        format!("{exp}/logs/{object}/r{round}_s{seed}/{attempt}.log")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_file_hashes_and_lists_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("file://{}", dir.path().join("store").display())).unwrap();
        let src = dir.path().join("src.bin");
        let data: Vec<u8> = (0..(CHUNK * 2 + 123)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let up = store
            .put_file("e/rounds/o/r0_s1/e1a0/o.npy", &src)
            .await
            .unwrap();
        assert_eq!(up.size, data.len() as u64);
        assert_eq!(up.sha256, hex(&Sha256::digest(&data)));
        let local = store.local_path("e/rounds/o/r0_s1/e1a0/o.npy").unwrap();
        assert_eq!(std::fs::read(&local).unwrap(), data);
        store
            .put_bytes("e/manifest.json", &b"{}"[..])
            .await
            .unwrap();
        assert_eq!(
            store.list("e/rounds").await.unwrap(),
            vec!["e/rounds/o/r0_s1/e1a0/o.npy".to_string()]
        );
        assert_eq!(store.delete_prefix("e/rounds/o").await.unwrap(), 1);
        assert!(!local.exists());
        assert_eq!(
            store.get_bytes("e/manifest.json").await.unwrap().unwrap(),
            &b"{}"[..]
        );
        assert!(store.get_bytes("e/nothing").await.unwrap().is_none());
    }

    #[test]
    fn relative_or_remote_urls_are_refused() {
        assert!(matches!(
            Store::open("data/x"),
            Err(StoreError::BadUrl { .. })
        ));
        assert!(matches!(
            Store::open("s3://b/p"),
            Err(StoreError::BadUrl { .. })
        ));
    }
}
