//! The videos: `videos/<key>/chunk-*/file-*.mp4`, several episodes per file, each at its
//! `from_timestamp`..`to_timestamp` inside the file. A merge never re-encodes: each file a
//! kept episode lives in is copied under the final's next file index, so the timestamps,
//! relative to their file, stay as they are; a file whose last episodes are dropped has its
//! trailing samples cut ([`mp4_trim`](super::mp4_trim)) where its layout allows, and is
//! copied whole otherwise.

use std::io::Read;
use std::path::Path;

use super::meta::{label, video_rel};
use super::mp4_trim::{self, Trimmed};
use crate::DatasetError;

/// Checks that the video file of `key` at (`chunk`, `file`) exists and starts as an MP4
/// (an `ftyp` box) does. Decoding is left to the readers: Quarry carries no video decoder.
pub fn check(root: &Path, key: &str, (chunk, file): (i64, i64)) -> Result<(), DatasetError> {
    let rel = video_rel(key, chunk, file);
    let path = root.join(&rel);
    let mut head = [0u8; 8];
    let mut f = std::fs::File::open(&path).map_err(|e| {
        DatasetError::invalid(
            label(root, &rel),
            format!("meta/episodes names this video file but it cannot be opened: {e}"),
        )
    })?;
    let n = f.read(&mut head).map_err(DatasetError::io("read", &path))?;
    if n < 8 || &head[4..8] != b"ftyp" {
        return Err(DatasetError::invalid(
            label(root, &rel),
            "not an MP4 file (no ftyp box at its start)",
        ));
    }
    Ok(())
}

/// Copies the video file of `key` at `from` in `root` to `to` in `out`; returns its size.
/// With `cut` (seconds), the samples presented from then on are cut where the file's layout
/// allows (see [`mp4_trim`]); otherwise, or without `cut`, the file is copied whole.
pub fn copy(
    root: &Path,
    out: &Path,
    key: &str,
    from: (i64, i64),
    to: (i64, i64),
    cut: Option<f64>,
) -> Result<u64, DatasetError> {
    check(root, key, from)?;
    let rel = video_rel(key, from.0, from.1);
    let src = root.join(&rel);
    let dst = out.join(video_rel(key, to.0, to.1));
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir).map_err(DatasetError::io("create", dir))?;
    }
    if let Some(cut) = cut {
        match mp4_trim::trim(&src, &dst, cut, &label(root, &rel)) {
            Ok(Trimmed::Done { bytes, .. }) => return Ok(bytes),
            Ok(Trimmed::Whole | Trimmed::Unsupported(_)) => {}
            Err(e) => {
                let _ = std::fs::remove_file(&dst);
                return Err(e);
            }
        }
    }
    std::fs::copy(&src, &dst).map_err(DatasetError::io("copy", &src))
}
