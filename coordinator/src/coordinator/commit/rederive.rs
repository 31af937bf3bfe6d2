//! What the coordinator reads back from a round's sample file before it commits the round:
//! the sample count, the count passing the job's filter and the schema, derived from the
//! stored bytes rather than taken from the worker's report. A worker that lies (a 2-row file
//! reported as 10 rows, a truncated `.npy` with its real sha256) is caught here, at commit,
//! instead of failing the object's merge later.
//!
//! The check is bounded: a file up to [`FULL_CHECK_MAX_BYTES`] is inspected whole with the
//! same `quarry_formats::inspect` the worker ran. A remote store's file up to
//! [`IN_MEMORY_MAX_BYTES`] is read into memory and `.npy` and JSON Lines are inspected from
//! those bytes (no scratch file: creating and deleting one per commit cost more than the rest
//! of the commit on ext4); a larger one, or one of a format read only from a file, is copied
//! into a scratch directory first, a directory dataset's archive unpacked. A larger local `.npy`
//! of numbers has its header read and its size checked against shape × item size (exact,
//! whatever the size); other large files get a signature check. HDF5 is never opened with
//! libhdf5 here (a hostile file could take the coordinator down): it gets the signature check.
//! What is not derived here is caught at the merge, which quarantines a round whose own bytes
//! cannot be merged (`merging.rs`).

use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use quarry_common::storage::{Download, Got, Store, StoreError, Uploaded};
use quarry_formats::{Filter, Format, Inspection, archive, npy};

/// Round files up to this size are inspected whole at commit.
pub const FULL_CHECK_MAX_BYTES: u64 = 16 << 20;

/// A remote store's round files up to this size are read into memory for the commit's
/// checks; larger ones (up to [`FULL_CHECK_MAX_BYTES`]) go through a scratch file, so that
/// commits running together hold little memory.
pub const IN_MEMORY_MAX_BYTES: u64 = 1 << 20;

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

/// A remote store's round file read once for the commit's checks: read into memory, or
/// copied into scratch, and hashed on the way, so the hash compared with the report and the
/// inspection read the same bytes, and the store is read once.
pub struct Fetched {
    /// Size and sha256 of the stored object; `None` when it is not in the store.
    pub held: Option<Uploaded>,
    copy: Copy,
}

/// Where the bytes of a round file are for its inspection.
enum Copy {
    /// Not in the store.
    Gone,
    /// Read into memory.
    Memory(Bytes),
    /// A local file: the store's own, or a scratch copy (removed when dropped).
    File {
        path: PathBuf,
        _scratch: Option<tempfile::TempDir>,
    },
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
    if reported <= IN_MEMORY_MAX_BYTES {
        match store.get_hashed(key, IN_MEMORY_MAX_BYTES).await? {
            Got::Missing => {
                return Ok(Some(Fetched {
                    held: None,
                    copy: Copy::Gone,
                }));
            }
            Got::Read { data, digest } => {
                return Ok(Some(Fetched {
                    held: Some(digest),
                    copy: Copy::Memory(data),
                }));
            }
            // Bigger than the worker said: read again below, within the full-check limit.
            Got::TooLarge(_) => {}
        }
    }
    let scratch = scratch_dir()?;
    let path = scratch.path().join("round");
    let (held, copy) = match store
        .download_hashed(key, &path, FULL_CHECK_MAX_BYTES)
        .await?
    {
        Download::Missing => (None, Copy::Gone),
        Download::Copied(held) => (
            Some(held),
            Copy::File {
                path,
                _scratch: Some(scratch),
            },
        ),
        // Bigger than the worker said: hashed as it streams, and refused for its size.
        Download::TooLarge(_) => return Ok(None),
    };
    Ok(Some(Fetched { held, copy }))
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
    let copy = match (fetched, store.local_path(key)) {
        (Some(f), _) => f.copy,
        (None, Some(path)) => Copy::File {
            path,
            _scratch: None,
        },
        // A remote file above the size limit.
        (None, None) => return Ok(Derived::Unverified),
    };
    let name = PathBuf::from(key);
    tokio::task::spawn_blocking(move || match &copy {
        Copy::Gone => Err(DeriveError::Invalid("the file is gone".into())),
        Copy::Memory(data) => derive_bytes(format, filter.as_ref(), &name, data),
        Copy::File { path, .. } => derive_file(format, filter.as_ref(), path, size),
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

/// [`derive`] on a file's bytes in memory (at most [`IN_MEMORY_MAX_BYTES`]); `name` stands
/// for it in messages.
fn derive_bytes(
    format: Format,
    filter: Option<&Filter>,
    name: &Path,
    data: &[u8],
) -> Result<Derived, DeriveError> {
    if format == Format::Hdf5 {
        let head = &data[..data.len().min(HEAD_BYTES as usize)];
        return signature(format, head).map(|()| Derived::Unverified);
    }
    if let Some(inspected) = quarry_formats::inspect_bytes(format, name, data, filter) {
        return inspected
            .map(Derived::Full)
            .map_err(|e| DeriveError::Invalid(e.to_string()));
    }
    // A format read only from a file (npz, a directory dataset's archive).
    let scratch = scratch_dir()?;
    let path = scratch.path().join("round");
    std::fs::write(&path, data)
        .map_err(|e| DeriveError::Infrastructure(format!("writing {}: {e}", path.display())))?;
    derive_file(format, filter, &path, data.len() as u64)
}

/// [`derive`] on a local file.
fn derive_file(
    format: Format,
    filter: Option<&Filter>,
    path: &Path,
    size: u64,
) -> Result<Derived, DeriveError> {
    if format == Format::Hdf5 {
        return signature(format, &head(path)?).map(|()| Derived::Unverified);
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
    signature(format, &head(path)?).map(|()| Derived::Unverified)
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

/// A file whose first bytes are `head` starts as a dataset of `format` must (JSON Lines has
/// no signature).
fn signature(format: Format, head: &[u8]) -> Result<(), DeriveError> {
    const HDF5: &[u8] = b"\x89HDF\r\n\x1a\n";
    let ok = match format {
        Format::Npy => head.starts_with(b"\x93NUMPY"),
        // The superblock is at 0 or, after a user block, at 512, 1024, 2048, ...
        Format::Hdf5 => std::iter::once(0)
            .chain((9..16).map(|p| 1usize << p))
            .any(|at| head.get(at..).is_some_and(|h| h.starts_with(HDF5))),
        Format::Npz => head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06"),
        // A round's directory dataset travels as a ustar archive.
        Format::Zarr | Format::Episodes | Format::Lerobot => {
            head.get(257..262) == Some(b"ustar".as_slice())
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A `<f4` `.npy` of `rows` × 3 as numpy writes it.
    fn npy_rows(rows: u64) -> Vec<u8> {
        let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, 3), }}");
        let mut header = dict.into_bytes();
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(b' ');
        }
        header.push(b'\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend((0..rows * 12).map(|i| i as u8));
        out
    }

    async fn derived(store: &Store, format: Format, key: &str, data: Vec<u8>) -> Derived {
        let size = data.len() as u64;
        store.put_bytes(key, data).await.unwrap();
        let fetched = fetch(store, key, size).await.unwrap();
        derive(store, format, None, key, size, fetched)
            .await
            .unwrap()
    }

    /// A remote store's small round file is read into memory, hashed and inspected from
    /// there, with the result a file gives; one above the in-memory limit is copied into
    /// scratch; a missing one is gone.
    #[tokio::test]
    async fn a_small_remote_file_is_checked_in_memory_as_a_file_would_be() {
        let store = Store::in_memory();
        let small = npy_rows(4);
        store.put_bytes("e/small.npy", small.clone()).await.unwrap();
        let f = fetch(&store, "e/small.npy", small.len() as u64)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(&f.copy, Copy::Memory(b) if b.as_ref() == small.as_slice()));
        assert_eq!(
            f.held,
            Some(quarry_common::storage::hash_reader(small.as_slice()).unwrap())
        );
        let want = quarry_formats::inspect_bytes(Format::Npy, Path::new("x"), &small, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            derived(&store, Format::Npy, "e/small.npy", small).await,
            Derived::Full(want)
        );
        let rows = IN_MEMORY_MAX_BYTES / 12 + 10;
        let big = npy_rows(rows);
        store.put_bytes("e/big.npy", big.clone()).await.unwrap();
        let f = fetch(&store, "e/big.npy", big.len() as u64)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(&f.copy, Copy::File { .. }));
        let Derived::Full(i) = derived(&store, Format::Npy, "e/big.npy", big).await else {
            panic!("not inspected whole");
        };
        assert_eq!(i.count, rows);
        let gone = fetch(&store, "e/none.npy", 10).await.unwrap().unwrap();
        assert_eq!(gone.held, None);
        // Lines in memory, and a truncated file is still caught.
        let lines = b"{\"a\": 1}\n{\"a\": 2}\n".to_vec();
        let Derived::Full(i) = derived(&store, Format::Jsonl, "e/x.jsonl", lines).await else {
            panic!("not inspected whole");
        };
        assert_eq!(i.count, 2);
        let mut cut = npy_rows(4);
        cut.truncate(cut.len() - 5);
        let size = cut.len() as u64;
        store.put_bytes("e/cut.npy", cut).await.unwrap();
        let fetched = fetch(&store, "e/cut.npy", size).await.unwrap();
        let e = derive(&store, Format::Npy, None, "e/cut.npy", size, fetched)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, DeriveError::Invalid(why) if why.contains("truncated")),
            "{e:?}"
        );
    }
}
