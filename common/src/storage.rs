//! Object storage: where workers stage round outputs and the coordinator writes finals and the
//! manifest. A local directory (object_store's local filesystem) on one machine, or an
//! S3-compatible bucket (`s3://bucket/prefix`, configured from the standard `AWS_*` variables)
//! shared by a cluster. Keys below are relative to the directory or to the bucket prefix.
//!
//! Key layout under the store root (see docs/architecture.md):
//! ```text
//! <exp>/manifest.json
//! <exp>/rounds/<object>/r<round>_s<seed>/<attempt>/<file>     staging, deleted after the final
//! <exp>/final/<object>/<object>.npy                            final as the object completes
//!                                                             (the extension is the format's)
//! <exp>/final_seed_<min>-<max>/<object>/<object>.npy           the run's finals once it ends
//!                                                             (seed_only: moved, both: copied;
//!                                                             seed_per_object: per object)
//! <exp>/logs/<object>/r<round>_s<seed>/<attempt>.log           generator logs of failed attempts
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::prefix::PrefixStore;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

/// Upload chunk: large enough for S3's 5 MiB part minimum, small enough to bound memory.
const CHUNK: usize = 8 << 20;
/// Objects up to this size are downloaded into one buffer and written in one call; larger
/// ones are streamed chunk by chunk.
const SMALL_DOWNLOAD: u64 = 1 << 20;
/// Parts of one multipart upload sent at once.
const PARTS_IN_FLIGHT: usize = 4;

/// What [`Store::download_hashed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Download {
    /// No object at the key.
    Missing,
    /// The object holds more than the limit (its size); nothing was copied.
    TooLarge(u64),
    /// Copied; the size and sha256 of the bytes written.
    Copied(Uploaded),
}

/// What [`Store::get_hashed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// No object at the key.
    Missing,
    /// The object holds more than the limit (its size); nothing was read.
    TooLarge(u64),
    /// The object's bytes, with their size and sha256.
    Read { data: Bytes, digest: Uploaded },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "store URL {url:?}: {problem}; use file:///absolute/dir, an absolute directory path or \
         s3://bucket/prefix"
    )]
    BadUrl { url: String, problem: String },
    #[error(
        "{key} already exists with different bytes ({existing_size} bytes, sha256 \
         {existing_sha256}; this upload: {size} bytes, sha256 {sha256}); remove it or use a new \
         experiment name"
    )]
    Conflict {
        key: String,
        existing_size: u64,
        existing_sha256: String,
        size: u64,
        sha256: String,
    },
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
    /// Opens `file:///abs/dir` or `/abs/dir` (created if missing), or `s3://bucket/prefix`
    /// (see [`Store::open_s3`]).
    pub fn open(url: &str) -> Result<Store, StoreError> {
        Self::open_with_options(url, std::iter::empty::<(&str, &str)>())
    }

    /// [`Store::open`] with S3 settings given here rather than in the environment (they win over
    /// it): object_store's `AmazonS3ConfigKey` names such as `aws_endpoint`, `aws_region`,
    /// `aws_access_key_id`. Ignored for directory stores. Lets one process (a test) use several
    /// servers without touching its environment.
    pub fn open_with_options<'a>(
        url: &str,
        options: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Store, StoreError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let mut parsed = Vec::new();
            for (k, v) in options {
                let key: AmazonS3ConfigKey = k.parse().map_err(|e| StoreError::BadUrl {
                    url: url.into(),
                    problem: format!("S3 option {k:?}: {e}"),
                })?;
                parsed.push((key, v.to_string()));
            }
            return Self::open_s3(url, rest, parsed);
        }
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

    /// An S3-compatible bucket, configured from the environment like the AWS tools:
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
    /// `AWS_ENDPOINT_URL` for a non-AWS server (plain `http://` endpoints are allowed),
    /// `AWS_VIRTUAL_HOSTED_STYLE_REQUEST` (default: path-style requests). Every key is stored
    /// under `prefix`. Nothing is contacted until the first request.
    fn open_s3(
        url: &str,
        rest: &str,
        options: Vec<(AmazonS3ConfigKey, String)>,
    ) -> Result<Store, StoreError> {
        let bad = |problem: &str| StoreError::BadUrl {
            url: url.into(),
            problem: problem.into(),
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        let mut builder = AmazonS3Builder::from_env();
        let allow_http_given = std::env::var_os("AWS_ALLOW_HTTP").is_some()
            || options.iter().any(|(k, _)| {
                matches!(
                    k,
                    AmazonS3ConfigKey::Client(object_store::ClientConfigKey::AllowHttp)
                )
            });
        for (k, v) in options {
            builder = builder.with_config(k, v);
        }
        builder = builder.with_bucket_name(bucket);
        let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
        if let Some(warning) = endpoint.as_deref().and_then(plaintext_endpoint_warning) {
            tracing::warn!("{warning}");
        }
        if endpoint.is_some_and(|e| e.starts_with("http://")) && !allow_http_given {
            // The operator asked for this endpoint by name; refusing it would only push them to
            // set a second variable.
            builder = builder.with_allow_http(true);
        }
        let s3 = builder.build().map_err(|e| bad(&e.to_string()))?;
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            let p = Key::parse(prefix).map_err(|e| bad(&e.to_string()))?;
            Arc::new(PrefixStore::new(s3, p))
        };
        let url = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        Ok(Store {
            inner,
            url,
            local_root: None,
        })
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

    /// A store in this process's memory, for benchmarks that measure the control plane
    /// without a disk's fsyncs. Other processes cannot open it (its URL is `memory://`).
    pub fn in_memory() -> Store {
        Store {
            inner: Arc::new(object_store::memory::InMemory::new()),
            url: "memory://".into(),
            local_root: None,
        }
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

    /// Streams a local file to `key`, hashing it on the way. A file of up to one chunk (most
    /// round outputs) is one PUT; a larger one a multipart upload in chunk-sized parts, at most
    /// [`PARTS_IN_FLIGHT`] at once (memory: that many chunks plus the one being read).
    ///
    /// A multipart upload that does not complete is aborted, so no upload is left open on the
    /// server: on a read, part or completion error (before the error is returned), and when this
    /// future is dropped midway (the abort then runs in a task spawned on the current tokio
    /// runtime). Only a killed process leaves one open, for the bucket's lifecycle rule.
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<Uploaded, StoreError> {
        let f = std::fs::File::open(file).map_err(|source| StoreError::Io {
            op: "read",
            path: file.display().to_string(),
            source,
        })?;
        self.put_open_file(key, f, file).await
    }

    /// [`Store::put_file`] from a file already open, read from its start: the bytes uploaded
    /// are those of this handle's file, whatever `file` (named in errors) points at now.
    pub async fn put_open_file(
        &self,
        key: &str,
        mut f: std::fs::File,
        file: &Path,
    ) -> Result<Uploaded, StoreError> {
        use std::io::Seek;
        let k = Self::key(key)?;
        let io = |source| StoreError::Io {
            op: "read",
            path: file.display().to_string(),
            source,
        };
        f.rewind().map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        if len <= CHUNK as u64 {
            let mut data = Vec::with_capacity(len as usize);
            f.read_to_end(&mut data).map_err(io)?;
            let up = Uploaded {
                size: data.len() as u64,
                sha256: hex(&Sha256::digest(&data)),
            };
            self.inner
                .put(&k, PutPayload::from_bytes(Bytes::from(data)))
                .await
                .map_err(|e| StoreError::store("upload", key, e))?;
            return Ok(up);
        }
        let upload = self
            .inner
            .put_multipart(&k)
            .await
            .map_err(|e| StoreError::store("upload", key, e))?;
        let mut upload = OpenUpload::new(key, upload);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut file = Some(f);
        loop {
            if let Err(e) = upload.wait_for_capacity().await {
                upload.abort().await;
                return Err(StoreError::store("upload", key, e));
            }
            // Reads are sequential and one chunk each, read and hashed on a blocking thread
            // (a chunk is milliseconds of work that would stall this runtime's other tasks:
            // its RPCs, the next round's start) while the parts in flight overlap the network.
            let Some(mut f) = file.take() else { break };
            let read = blocking(move || {
                let mut buf = vec![0u8; CHUNK];
                let n = read_full(&mut f, &mut buf)?;
                buf.truncate(n);
                hasher.update(&buf);
                Ok::<_, std::io::Error>((f, hasher, buf))
            })
            .await;
            let buf = match read {
                Ok((f, h, buf)) => {
                    file = Some(f);
                    hasher = h;
                    buf
                }
                Err(e) => {
                    upload.abort().await;
                    return Err(io(e));
                }
            };
            let n = buf.len();
            if n == 0 {
                break;
            }
            size += n as u64;
            upload.put_part(Bytes::from(buf));
            if n < CHUNK {
                break;
            }
        }
        upload
            .complete()
            .await
            .map_err(|e| StoreError::store("upload", key, e))?;
        Ok(Uploaded {
            size,
            sha256: hex(&hasher.finalize()),
        })
    }

    /// Uploads a local file to `key` unless `key` already exists, for finals: an object appears
    /// whole or not at all, and an existing object is never replaced by different bytes.
    ///
    /// An existing object with the same size and sha256 counts as this upload (a merge redone
    /// after a crash between upload and record writes the same deterministic bytes); different
    /// bytes are [`StoreError::Conflict`].
    ///
    /// A file up to one chunk is one conditional PUT (`PutMode::Create`, atomic on every
    /// backend). A larger one is a multipart upload straight to `key`, after checking that `key`
    /// is absent: object_store 0.14 offers no conditional mode for multipart uploads
    /// (`PutMultipartOptions` has none), and the alternative, an upload to a temporary key then
    /// `copy_if_not_exists`, doubles the bytes written, is capped at 5 GiB by S3's copy
    /// operations and needs per-provider configuration (`AWS_COPY_IF_NOT_EXISTS`). The window
    /// between check and completion only matters for two coordinators merging the same plan,
    /// and those write identical bytes; the state store's merge record is the commit point.
    pub async fn put_file_create(&self, key: &str, file: &Path) -> Result<Uploaded, StoreError> {
        let io = |source| StoreError::Io {
            op: "read",
            path: file.display().to_string(),
            source,
        };
        let len = std::fs::metadata(file).map_err(io)?.len();
        if len > CHUNK as u64 {
            if let Some(existing) = self.hash_object(key).await? {
                let path = file.to_path_buf();
                let local = blocking(move || hash_file(&path)).await.map_err(io)?;
                return same_or_conflict(key, existing, local);
            }
            return self.put_file(key, file).await;
        }
        let data = std::fs::read(file).map_err(io)?;
        let local = Uploaded {
            size: data.len() as u64,
            sha256: hex(&Sha256::digest(&data)),
        };
        let k = Self::key(key)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&k, PutPayload::from_bytes(Bytes::from(data)), opts)
            .await
        {
            Ok(_) => Ok(local),
            Err(object_store::Error::AlreadyExists { .. }) => {
                match self.hash_object(key).await? {
                    Some(existing) => same_or_conflict(key, existing, local),
                    // Deleted in between: whoever did that owns the key now.
                    None => Err(StoreError::Conflict {
                        key: key.into(),
                        existing_size: 0,
                        existing_sha256: "(deleted during the upload)".into(),
                        size: local.size,
                        sha256: local.sha256,
                    }),
                }
            }
            Err(e) => Err(StoreError::store("put", key, e)),
        }
    }

    /// The object at `key`, opened for reading; `None` when it does not exist. The one place
    /// a read's missing object and errors are told apart.
    async fn open_object(&self, key: &str) -> Result<Option<object_store::GetResult>, StoreError> {
        let k = Self::key(key)?;
        match self.inner.get(&k).await {
            Ok(got) => Ok(Some(got)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::store("get", key, e)),
        }
    }

    /// Size and sha256 of the object at `key`, streamed; `None` when it does not exist.
    ///
    /// A local directory store's file is hashed in place on one blocking thread, in
    /// [`HASH_BUF`] reads: object_store streams a local file in 8 KiB chunks, each read on a
    /// blocking thread of its own, which cost a commit's read-back of a 32 MiB round about
    /// 0.1 s and kept the runtime's threads busy handing the chunks over.
    pub async fn hash_object(&self, key: &str) -> Result<Option<Uploaded>, StoreError> {
        if let Some(path) = self.local_path(key) {
            Self::key(key)?;
            let shown = path.display().to_string();
            let hashed = blocking(move || match hash_file(&path) {
                Ok(up) => Ok(Some(up)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            })
            .await;
            return hashed.map_err(|source| StoreError::Io {
                op: "read",
                path: shown,
                source,
            });
        }
        let Some(got) = self.open_object(key).await? else {
            return Ok(None);
        };
        let mut stream = got.into_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| StoreError::store("get", key, e))?
        {
            hasher.update(&chunk);
            size += chunk.len() as u64;
        }
        Ok(Some(Uploaded {
            size,
            sha256: hex(&hasher.finalize()),
        }))
    }

    /// Reads the object at `key` into memory and hashes it, when it holds at most `max_bytes`
    /// (meant for small limits: the whole object is held at once). Nothing touches a disk.
    pub async fn get_hashed(&self, key: &str, max_bytes: u64) -> Result<Got, StoreError> {
        let Some(got) = self.open_object(key).await? else {
            return Ok(Got::Missing);
        };
        if got.meta.size > max_bytes {
            return Ok(Got::TooLarge(got.meta.size));
        }
        let data = got
            .bytes()
            .await
            .map_err(|e| StoreError::store("get", key, e))?;
        if data.len() as u64 > max_bytes {
            return Ok(Got::TooLarge(data.len() as u64));
        }
        let digest = Uploaded {
            size: data.len() as u64,
            sha256: hex(&Sha256::digest(&data)),
        };
        Ok(Got::Read { data, digest })
    }

    /// Streams the object at `key` into the local file `dest`, hashing it on the way, when it
    /// holds at most `max_bytes`: one read of the store gives both the copy and its hash.
    pub async fn download_hashed(
        &self,
        key: &str,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<Download, StoreError> {
        let Some(got) = self.open_object(key).await? else {
            return Ok(Download::Missing);
        };
        if got.meta.size > max_bytes {
            return Ok(Download::TooLarge(got.meta.size));
        }
        let io = |op| {
            move |source| StoreError::Io {
                op,
                path: dest.display().to_string(),
                source,
            }
        };
        let mut stream = got.into_stream();
        let mut out = tokio::fs::File::create(dest).await.map_err(io("create"))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| StoreError::store("get", key, e))?
        {
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io("write"))?;
            size += chunk.len() as u64;
        }
        out.flush().await.map_err(io("write"))?;
        Ok(Download::Copied(Uploaded {
            size,
            sha256: hex(&hasher.finalize()),
        }))
    }

    /// Streams the object at `key` into the local file `dest` (created or truncated, parent
    /// directories created); memory stays at one network chunk (the whole object when it is at
    /// most 1 MiB). Returns the bytes written.
    pub async fn download_to(&self, key: &str, dest: &Path) -> Result<u64, StoreError> {
        let k = Self::key(key)?;
        let io = |op| {
            move |source| StoreError::Io {
                op,
                path: dest.display().to_string(),
                source,
            }
        };
        let got = self
            .inner
            .get(&k)
            .await
            .map_err(|e| StoreError::store("get", key, e))?;
        if got.meta.size <= SMALL_DOWNLOAD {
            // Most round files: one buffer and one blocking write, not a thread hop per step.
            // (Bounded small: a merge runs many downloads at once.)
            let bytes = got
                .bytes()
                .await
                .map_err(|e| StoreError::store("get", key, e))?;
            let size = bytes.len() as u64;
            let path = dest.to_path_buf();
            blocking(move || {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&path, &bytes)
            })
            .await
            .map_err(io("write"))?;
            return Ok(size);
        }
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io("create directory for"))?;
        }
        let mut stream = got.into_stream();
        let mut out = tokio::fs::File::create(dest).await.map_err(io("create"))?;
        let mut size = 0u64;
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| StoreError::store("get", key, e))?
        {
            out.write_all(&chunk).await.map_err(io("write"))?;
            size += chunk.len() as u64;
        }
        out.flush().await.map_err(io("write"))?;
        Ok(size)
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
        match self.open_object(key).await? {
            Some(got) => Ok(Some(
                got.bytes()
                    .await
                    .map_err(|e| StoreError::store("get", key, e))?,
            )),
            None => Ok(None),
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

    /// Copies the object at `from` to `to` inside the store (server-side on S3), replacing
    /// what `to` held.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let (f, t) = (Self::key(from)?, Self::key(to)?);
        self.inner
            .copy(&f, &t)
            .await
            .map_err(|e| StoreError::store("copy", from, e))
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

/// A multipart upload in progress that is aborted unless it completes: by [`OpenUpload::abort`]
/// on an error path, or, when dropped before [`OpenUpload::complete`] succeeded (its future
/// cancelled), from a task spawned on the current tokio runtime. The parts still in flight are
/// stopped first, so that none lands after the abort.
struct OpenUpload {
    key: String,
    /// `None` once completed or aborted: nothing left to clean up.
    upload: Option<Box<dyn MultipartUpload>>,
    parts: JoinSet<object_store::Result<()>>,
}

impl OpenUpload {
    fn new(key: &str, upload: Box<dyn MultipartUpload>) -> OpenUpload {
        OpenUpload {
            key: key.to_string(),
            upload: Some(upload),
            parts: JoinSet::new(),
        }
    }

    /// Waits until fewer than [`PARTS_IN_FLIGHT`] parts are in flight; the first failed part's
    /// error.
    async fn wait_for_capacity(&mut self) -> object_store::Result<()> {
        while self.parts.len() >= PARTS_IN_FLIGHT {
            self.join_one().await?;
        }
        Ok(())
    }

    /// Starts uploading the next part in a task of its own.
    fn put_part(&mut self, part: Bytes) {
        if let Some(upload) = self.upload.as_mut() {
            self.parts
                .spawn(upload.put_part(PutPayload::from_bytes(part)));
        }
    }

    /// Waits for one part in flight (none: returns at once).
    async fn join_one(&mut self) -> object_store::Result<()> {
        match self.parts.join_next().await {
            None => Ok(()),
            Some(joined) => joined?,
        }
    }

    /// Waits for every part, then completes the upload; on any error aborts it first.
    async fn complete(mut self) -> object_store::Result<()> {
        while !self.parts.is_empty() {
            if let Err(e) = self.join_one().await {
                self.abort().await;
                return Err(e);
            }
        }
        let Some(upload) = self.upload.as_mut() else {
            return Err(object_store::Error::Generic {
                store: "quarry",
                source: format!("multipart upload of {} already ended", self.key).into(),
            });
        };
        match upload.complete().await {
            Ok(_) => {
                self.upload = None;
                Ok(())
            }
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Stops the parts in flight and aborts the upload. A failed abort is logged, not returned:
    /// the caller reports the error that made it abort.
    async fn abort(&mut self) {
        self.parts.shutdown().await;
        if let Some(upload) = self.upload.as_mut() {
            // The upload stays owned until the abort answered: were this future dropped in
            // between, `drop` would abort again (a repeated abort is harmless).
            let result = upload.abort().await;
            self.upload = None;
            if let Err(e) = result {
                warn_abort_failed(&self.key, &e);
            }
        }
    }
}

impl Drop for OpenUpload {
    fn drop(&mut self) {
        let Some(mut upload) = self.upload.take() else {
            return;
        };
        let mut parts = std::mem::take(&mut self.parts);
        let key = std::mem::take(&mut self.key);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    parts.shutdown().await;
                    if let Err(e) = upload.abort().await {
                        warn_abort_failed(&key, &e);
                    }
                });
            }
            Err(_) => tracing::warn!(
                key = %key,
                "multipart upload abandoned outside a tokio runtime cannot be aborted; it stays \
                 open until the bucket's AbortIncompleteMultipartUpload lifecycle rule removes it"
            ),
        }
    }
}

fn warn_abort_failed(key: &str, e: &object_store::Error) {
    tracing::warn!(
        key = %key,
        error = %e,
        "aborting an unfinished multipart upload failed; its parts stay until the bucket's \
         AbortIncompleteMultipartUpload lifecycle rule removes them"
    );
}

/// Reads until `buf` is full or the file ends; the bytes read.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// `Ok(local)` when `existing` holds the same bytes, else the conflict.
fn same_or_conflict(
    key: &str,
    existing: Uploaded,
    local: Uploaded,
) -> Result<Uploaded, StoreError> {
    if existing == local {
        Ok(local)
    } else {
        Err(StoreError::Conflict {
            key: key.into(),
            existing_size: existing.size,
            existing_sha256: existing.sha256,
            size: local.size,
            sha256: local.sha256,
        })
    }
}

/// Runs `f` on a blocking thread: file work that would stall the runtime's threads. A panic
/// or cancellation of that thread is an I/O error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r)
}

/// Size and sha256 of a local file, read a chunk at a time.
pub fn hash_file(file: &Path) -> std::io::Result<Uploaded> {
    hash_reader(std::fs::File::open(file)?)
}

/// Size and sha256 of everything `r` yields, read [`HASH_BUF`] bytes at a time.
pub fn hash_reader(mut r: impl Read) -> std::io::Result<Uploaded> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    // On the stack: no allocation (a 1 MiB heap buffer is mapped, zeroed and unmapped anew on
    // every call, which cost a small file's hash more than the hashing).
    let mut buf = [0u8; HASH_BUF];
    loop {
        let n = match r.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Uploaded {
        size,
        sha256: hex(&hasher.finalize()),
    })
}

/// Bytes read per step by [`hash_reader`]: past this, larger reads do not hash faster.
pub const HASH_BUF: usize = 64 << 10;

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
    /// `name` is the final's file (or directory) name, `<object>.<ext>`.
    pub fn final_seed(exp: &str, object: &str, seed_min: i64, seed_max: i64, name: &str) -> String {
        format!("{exp}/final_seed_{seed_min}-{seed_max}/{object}/{name}")
    }
    pub fn final_plain(exp: &str, object: &str, name: &str) -> String {
        format!("{exp}/final/{object}/{name}")
    }
    pub fn log(exp: &str, object: &str, round: u32, seed: i64, attempt: &str) -> String {
        format!("{exp}/logs/{object}/r{round}_s{seed}/{attempt}.log")
    }
}

/// The warning an S3 endpoint deserves when it is plain HTTP on a host other than this one:
/// requests are signed, so the credentials do not travel, but the datasets do, unencrypted,
/// and anyone on the path can read them. `None` for `https://` and for loopback endpoints.
pub fn plaintext_endpoint_warning(endpoint: &str) -> Option<String> {
    let rest = endpoint.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| {
        format!(
            "the S3 endpoint {endpoint} is plain HTTP: every dataset byte crosses the network \
             unencrypted (requests are signed, so the keys do not); use an https:// endpoint \
             unless this network is trusted"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_http_endpoint_off_this_host_is_warned_about() {
        for warned in [
            "http://s3.lab.internal:9000",
            "http://10.0.0.5:9000/",
            "http://user@minio:9000",
            "http://[2001:db8::1]:9000",
        ] {
            let w = plaintext_endpoint_warning(warned);
            assert!(
                w.as_deref()
                    .is_some_and(|w| w.contains(warned) && w.contains("https://")),
                "{warned}: {w:?}"
            );
        }
        for quiet in [
            "https://s3.amazonaws.com",
            "http://127.0.0.1:9000",
            "http://localhost:9000",
            "http://[::1]:9000",
        ] {
            assert_eq!(plaintext_endpoint_warning(quiet), None, "{quiet}");
        }
    }

    /// A directory store's object is hashed in place: the hash of its bytes, `None` when it
    /// is missing, and a key that would leave the store refused; an upload of several chunks
    /// (read and hashed off the runtime's threads) lands whole with the same hash.
    #[tokio::test]
    async fn a_directory_store_hashes_its_files_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(&dir.path().join("store")).unwrap();
        let src = dir.path().join("big.bin");
        let data: Vec<u8> = (0..(2 * CHUNK + 12_345)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let up = store.put_file("e/rounds/o/r0/big.bin", &src).await.unwrap();
        let want = hash_reader(data.as_slice()).unwrap();
        assert_eq!(up, want);
        assert_eq!(
            std::fs::read(store.local_path("e/rounds/o/r0/big.bin").unwrap()).unwrap(),
            data
        );
        assert_eq!(
            store.hash_object("e/rounds/o/r0/big.bin").await.unwrap(),
            Some(want)
        );
        assert_eq!(store.hash_object("e/rounds/o/r0/none").await.unwrap(), None);
        assert!(store.hash_object("e/../../etc/passwd").await.is_err());
    }

    /// A small object is read into memory and hashed; a missing one and one over the limit
    /// are told apart.
    #[tokio::test]
    async fn a_hashed_get_reads_small_objects_into_memory() {
        let store = Store::in_memory();
        let data: Vec<u8> = (0..100_000).map(|i| (i % 251) as u8).collect();
        store.put_bytes("a/b.npy", data.clone()).await.unwrap();
        let got = store.get_hashed("a/b.npy", 100_000).await.unwrap();
        let want = hash_reader(data.as_slice()).unwrap();
        assert_eq!(
            got,
            Got::Read {
                data: Bytes::from(data),
                digest: want
            }
        );
        assert_eq!(
            store.get_hashed("a/b.npy", 99_999).await.unwrap(),
            Got::TooLarge(100_000)
        );
        assert_eq!(
            store.get_hashed("a/none", 1 << 20).await.unwrap(),
            Got::Missing
        );
    }

    /// One read gives the copy and its hash; a missing object and one over the limit copy
    /// nothing.
    #[tokio::test]
    async fn a_hashed_download_copies_and_hashes_in_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::in_memory();
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        store.put_bytes("a/b.npy", data.clone()).await.unwrap();
        let dest = dir.path().join("copy");
        let got = store
            .download_hashed("a/b.npy", &dest, 4 << 20)
            .await
            .unwrap();
        let expected = hash_reader(data.as_slice()).unwrap();
        assert_eq!(got, Download::Copied(expected.clone()));
        assert_eq!(hash_file(&dest).unwrap(), expected);
        let small = dir.path().join("small");
        assert_eq!(
            store
                .download_hashed("a/b.npy", &small, 1 << 20)
                .await
                .unwrap(),
            Download::TooLarge(3 << 20)
        );
        assert!(!small.exists(), "nothing is copied over the limit");
        assert_eq!(
            store
                .download_hashed("a/none", &small, 1 << 20)
                .await
                .unwrap(),
            Download::Missing
        );
    }

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
    fn relative_or_unknown_urls_are_refused() {
        assert!(matches!(
            Store::open("data/x"),
            Err(StoreError::BadUrl { .. })
        ));
        assert!(matches!(
            Store::open("gs://b/p"),
            Err(StoreError::BadUrl { .. })
        ));
        assert!(matches!(
            Store::open("s3:///p"),
            Err(StoreError::BadUrl { .. })
        ));
    }

    #[test]
    fn s3_urls_open_without_contacting_the_server() {
        let s = Store::open("s3://bucket/some/prefix/").unwrap();
        assert_eq!(s.url(), "s3://bucket/some/prefix");
        assert!(s.local_path("e/manifest.json").is_none());
        assert_eq!(Store::open("s3://bucket").unwrap().url(), "s3://bucket");
    }

    #[tokio::test]
    async fn put_file_create_is_idempotent_and_refuses_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(&dir.path().join("store")).unwrap();
        for len in [1000, CHUNK + 10] {
            let a = dir.path().join("a.bin");
            let b = dir.path().join("b.bin");
            std::fs::write(&a, vec![1u8; len]).unwrap();
            std::fs::write(&b, vec![2u8; len]).unwrap();
            let key = format!("e/final/o{len}/o.npy");
            let first = store.put_file_create(&key, &a).await.unwrap();
            assert_eq!(first.size, len as u64);
            assert_eq!(store.put_file_create(&key, &a).await.unwrap(), first);
            assert!(matches!(
                store.put_file_create(&key, &b).await,
                Err(StoreError::Conflict { .. })
            ));
            let back = dir.path().join("back/x.bin");
            assert_eq!(store.download_to(&key, &back).await.unwrap(), len as u64);
            assert_eq!(std::fs::read(&back).unwrap(), vec![1u8; len]);
        }
    }
}
