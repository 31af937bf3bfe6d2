//! What the coordinator reads back from a round's sample file before it commits the round:
//! the sample count, the count passing the job's filter and the schema, derived from the
//! stored bytes rather than taken from the worker's report. A worker that lies (a 2-row file
//! reported as 10 rows, a truncated `.npy` with its real sha256) is caught here, at commit,
//! instead of failing the object's merge later.
//!
//! The check is bounded: a file up to [`FULL_CHECK_MAX_BYTES`] is inspected whole with the
//! same `quarry_formats::inspect` the worker ran (a remote store's file is downloaded into a
//! scratch directory first, a directory dataset's archive unpacked). A larger local `.npy`
//! of numbers has its header read and its size checked against shape × item size (exact,
//! whatever the size); other large files get a signature check. HDF5 is never opened with
//! libhdf5 here (a hostile file could take the coordinator down): it gets the signature check.
//! What is not derived here is caught at the merge, which quarantines a round whose own bytes
//! cannot be merged (`merging.rs`).

use std::io::Read;
use std::path::{Path, PathBuf};

use quarry_common::storage::{Download, Store, StoreError, Uploaded};
use quarry_formats::{Filter, Format, Inspection, archive, npy};

/// Round files up to this size are inspected whole at commit.
pub const FULL_CHECK_MAX_BYTES: u64 = 16 << 20;

/// Bytes read from the head of a larger file for its header or signature.
const HEAD_BYTES: u64 = 64 << 10;

/// What the coordinator derived from a stored sample file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Derived {
    /// Inspected whole: count, kept (with the job's filter) and schema.
    Full(Inspection),
    /// A numeric `.npy` above the size limit: header read, size checked; count and schema.
    Header { count: u64, schema: String },
    /// Only its signature was checked (HDF5, large files of other formats), or nothing could
    /// be read at commit (a remote file above the size limit): nothing to compare.
    Unverified,
}

/// Why nothing could be derived.
#[derive(Debug)]
pub enum DeriveError {
    /// The stored bytes are not a valid dataset of the job's format: the attempt is invalid.
    Invalid(String),
    /// The store did not answer, or scratch space failed: not the attempt's fault.
    Infrastructure(String),
}

impl From<StoreError> for DeriveError {
    fn from(e: StoreError) -> Self {
        DeriveError::Infrastructure(e.to_string())
    }
}

/// A remote store's round file read once for the commit's checks: copied into scratch and
/// hashed on the way, so the hash compared with the report and the inspection read the same
/// bytes, and the store is read once.
pub struct Fetched {
    /// Size and sha256 of the stored object; `None` when it is not in the store.
    pub held: Option<Uploaded>,
    path: PathBuf,
    _scratch: tempfile::TempDir,
}

/// Fetches `key` when the store is remote and the file (`reported` bytes, by the worker's
/// word) is small enough to inspect whole; `None` otherwise (a local store's file is read in
/// place; a larger one is hashed as it streams, see `Store::hash_object`).
pub async fn fetch(
    store: &Store,
    key: &str,
    reported: u64,
) -> Result<Option<Fetched>, DeriveError> {
    if store.local_path(key).is_some() || reported > FULL_CHECK_MAX_BYTES {
        return Ok(None);
    }
    let scratch = scratch_dir()?;
    let path = scratch.path().join("round");
    let held = match store
        .download_hashed(key, &path, FULL_CHECK_MAX_BYTES)
        .await?
    {
        Download::Missing => None,
        Download::Copied(held) => Some(held),
        // Bigger than the worker said: hashed as it streams, and refused for its size.
        Download::TooLarge(_) => return Ok(None),
    };
    Ok(Some(Fetched {
        held,
        path,
        _scratch: scratch,
    }))
}

/// Derives what `key` (`size` bytes, already checked against the report) holds; `fetched`
/// is its copy from [`fetch`], if one was made.
pub async fn derive(
    store: &Store,
    format: Format,
    filter: Option<Filter>,
    key: &str,
    size: u64,
    fetched: Option<Fetched>,
) -> Result<Derived, DeriveError> {
    let (path, scratch) = match (fetched, store.local_path(key)) {
        (Some(f), _) => (f.path, Some(f._scratch)),
        (None, Some(p)) => (p, None),
        // A remote file above the size limit.
        (None, None) => return Ok(Derived::Unverified),
    };
    tokio::task::spawn_blocking(move || {
        let derived = derive_file(format, filter.as_ref(), &path, size);
        drop(scratch);
        derived
    })
    .await
    .map_err(|e| DeriveError::Invalid(format!("inspecting it failed: {e}")))?
}

fn scratch_dir() -> Result<tempfile::TempDir, DeriveError> {
    tempfile::Builder::new()
        .prefix("quarry-commit-")
        .tempdir()
        .map_err(|e| DeriveError::Infrastructure(format!("scratch directory: {e}")))
}

/// [`derive`] on a local file.
fn derive_file(
    format: Format,
    filter: Option<&Filter>,
    path: &Path,
    size: u64,
) -> Result<Derived, DeriveError> {
    if format == Format::Hdf5 {
        return signature(format, path).map(|()| Derived::Unverified);
    }
    if size > FULL_CHECK_MAX_BYTES {
        return large(format, path, size);
    }
    let inspected = if format.is_directory() {
        let dir = scratch_dir()?;
        let to = dir.path().join("dataset");
        archive::unpack(path, &to).map_err(|e| DeriveError::Invalid(e.to_string()))?;
        quarry_formats::inspect(format, &to, filter)
    } else {
        quarry_formats::inspect(format, path, filter)
    };
    inspected
        .map(Derived::Full)
        .map_err(|e| DeriveError::Invalid(e.to_string()))
}

/// A file above the full-check limit: a numeric `.npy`'s header and size, else a signature.
fn large(format: Format, path: &Path, size: u64) -> Result<Derived, DeriveError> {
    if format == Format::Npy {
        let head = head(path)?;
        // An object array's count needs its whole pickle: left to the merge.
        if head.windows(4).any(|w| w == b"'|O'") {
            return Ok(Derived::Unverified);
        }
        // A numeric file's inspection reads only the header and compares the length.
        let i =
            npy::inspect(head.as_slice(), size).map_err(|e| DeriveError::Invalid(e.to_string()))?;
        return Ok(Derived::Header {
            count: i.count,
            schema: i.schema,
        });
    }
    signature(format, path).map(|()| Derived::Unverified)
}

/// The first [`HEAD_BYTES`] of a file.
fn head(path: &Path) -> Result<Vec<u8>, DeriveError> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(HEAD_BYTES).read_to_end(&mut buf))
        .map_err(|e| read_error(path, e))?;
    Ok(buf)
}

fn read_error(path: &Path, e: std::io::Error) -> DeriveError {
    match e.kind() {
        std::io::ErrorKind::NotFound => DeriveError::Invalid("the file is gone".into()),
        _ => DeriveError::Infrastructure(format!("reading {}: {e}", path.display())),
    }
}

/// The file starts as a dataset of `format` must (JSON Lines has no signature).
fn signature(format: Format, path: &Path) -> Result<(), DeriveError> {
    const HDF5: &[u8] = b"\x89HDF\r\n\x1a\n";
    let head = head(path)?;
    let ok = match format {
        Format::Npy => head.starts_with(b"\x93NUMPY"),
        // The superblock is at 0 or, after a user block, at 512, 1024, 2048, ...
        Format::Hdf5 => std::iter::once(0)
            .chain((9..16).map(|p| 1usize << p))
            .any(|at| head.get(at..).is_some_and(|h| h.starts_with(HDF5))),
        Format::Npz => head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06"),
        // A round's directory dataset travels as a ustar archive.
        Format::Zarr | Format::Episodes => head.get(257..262) == Some(b"ustar".as_slice()),
        Format::Jsonl => true,
    };
    if ok {
        Ok(())
    } else {
        Err(DeriveError::Invalid(format!(
            "it does not start as a {format} file does"
        )))
    }
}
