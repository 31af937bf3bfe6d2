//! Checks of an array's stored chunk files at inspection, beyond decoding them: every file
//! named like a chunk lies inside the array's grid, and an array whose chunks Quarry copies
//! whole but does not decode (`ArrayMeta::opaque`) has sound chunks (image codecs, see
//! `signature.rs`) and rows that fill whole chunks, so that its merges copy it (`align.rs`).

use std::path::Path;

use super::array::ChunkError;
use super::meta::ArrayMeta;

/// Files under an array's directory, as `/`-separated paths relative to it, metadata
/// (`.zarray`, `.zattrs`, `zarr.json`) left out.
fn stored_keys(dir: &Path, rel: &str, out: &mut Vec<String>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        let key = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if e.file_type()?.is_dir() {
            stored_keys(&e.path(), &key, out)?;
        } else if !name.starts_with('.') && name != "zarr.json" {
            out.push(key);
        }
    }
    Ok(())
}

/// The first stored chunk key outside the array's grid, as an error.
pub(crate) fn check_keys(meta: &ArrayMeta) -> Result<(), ChunkError> {
    if meta.shape.is_empty() {
        // A 0-d array has one chunk, whatever its key.
        return Ok(());
    }
    let mut keys = Vec::new();
    stored_keys(&meta.dir, "", &mut keys).map_err(|e| ChunkError {
        key: String::new(),
        reason: format!("cannot list chunks: {e}"),
    })?;
    keys.sort();
    let grid = meta.grid();
    for key in keys {
        let Some(idx) = meta.parse_chunk_key(&key) else {
            continue;
        };
        if idx.len() != grid.len() || idx.iter().zip(&grid).any(|(i, g)| i >= g) {
            return Err(ChunkError {
                reason: format!(
                    "chunk key outside the array's grid of {grid:?} chunks (shape {:?}, chunks {:?}): the metadata does not describe the chunks written",
                    meta.shape, meta.chunks
                ),
                key,
            });
        }
    }
    Ok(())
}

/// For an array Quarry copies whole: its rows fill whole chunks along axis 0.
pub(crate) fn check_rows_fill_chunks(meta: &ArrayMeta) -> Result<(), ChunkError> {
    let (Some(what), Some(&rows), Some(&c0)) =
        (&meta.opaque, meta.shape.first(), meta.chunks.first())
    else {
        return Ok(());
    };
    if rows % c0 == 0 {
        return Ok(());
    }
    Err(ChunkError {
        key: ".".into(),
        reason: format!(
            "{rows} rows do not fill whole chunks of {c0} rows; the array is stored with {what}, which Quarry merges by copying chunks whole without decoding them, so every round's rows must fill whole chunks: write chunks of one step or episode (chunks=(1, ...)) or of a divisor of every round's rows, or use a codec Quarry decodes (blosc, zstd, gzip, zlib, lz4)"
        ),
    })
}

/// For an array Quarry copies whole: the chunk at `idx`, if stored, passes its codec's
/// structural check.
pub(crate) fn check_stored(meta: &ArrayMeta, idx: &[u64]) -> Result<(), ChunkError> {
    let key = meta.chunk_key(idx);
    let raw = match std::fs::read(meta.dir.join(&key)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ChunkError {
                key,
                reason: format!("cannot read: {e}"),
            });
        }
    };
    let Some(sig) = meta.signature else {
        return Ok(());
    };
    let elements: u64 = meta.chunks.iter().product();
    sig.check(&raw, elements)
        .map_err(|reason| ChunkError { key, reason })
}
