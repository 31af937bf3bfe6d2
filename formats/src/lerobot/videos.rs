//! The videos: `videos/<key>/chunk-*/file-*.mp4`, several episodes per file, each at its
//! `from_timestamp`..`to_timestamp` inside the file. A merge never re-encodes: each file a
//! kept episode lives in is copied under the final's next file index, so the timestamps,
//! relative to their file, stay as they are; a file whose last episodes are dropped has its
//! trailing samples cut ([`mp4_trim`](super::mp4_trim)) where its layout allows, and is
//! copied whole otherwise.

use std::io::Read;
use std::path::Path;

use serde_json::Value;

use super::meta::{Episode, Info, label, video_rel};
use super::mp4_trim::{self, Probe, Trimmed};
use crate::{DatasetError, Observer};

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

/// The sample entry fourccs a codec name of info.json's `video.codec` stands for (`None`
/// for a name Quarry does not know: then it is not compared).
fn fourccs(codec: &str) -> Option<&'static [&'static str]> {
    Some(match codec.to_ascii_lowercase().as_str() {
        "av1" | "libsvtav1" | "libaom-av1" | "librav1e" | "libdav1d" | "av01" => &["av01"],
        "h264" | "libx264" | "avc" | "avc1" => &["avc1", "avc3"],
        "hevc" | "h265" | "libx265" | "hvc1" | "hev1" => &["hvc1", "hev1"],
        "vp9" | "libvpx-vp9" | "vp09" => &["vp09"],
        "vp8" | "libvpx" | "vp08" => &["vp08"],
        "mpeg4" | "mp4v" => &["mp4v"],
        _ => return None,
    })
}

/// What checking a dataset's video files came to.
#[derive(Debug, Default)]
pub struct VideoTally {
    pub checked: u64,
    /// Files not checked, with why (a fragmented MP4...).
    pub not_checked: Vec<(String, String)>,
}

/// Checks the video file of key number `k` (`key`) at (`chunk`, `file`) without decoding it
/// (see [`mp4_trim::probe`]) against what info.json and the episode table say of it: its
/// codec, and enough frames for the latest `to_timestamp` of the episodes it holds (within
/// half a frame). Every failure is a problem naming the file; nothing stops the walk.
pub fn examine_file(
    root: &Path,
    info: &Info,
    eps: &[Episode],
    k: usize,
    (chunk, file): (i64, i64),
    observer: &mut dyn Observer,
    tally: &mut VideoTally,
) {
    let key = &info.video_keys[k];
    let rel = video_rel(key, chunk, file);
    let at = label(root, &rel);
    let path = root.join(&rel);
    if !path.is_file() {
        observer.problem(
            &at,
            "meta/episodes names this video file but it does not exist",
        );
        return;
    }
    let (samples, fourcc, problems) = match mp4_trim::probe(&path, &at) {
        Ok(Probe::Read {
            samples,
            fourcc,
            problems,
        }) => (samples, fourcc, problems),
        Ok(Probe::NotChecked(why)) => {
            tally.not_checked.push((at, why));
            return;
        }
        Err(DatasetError::Invalid { path, reason }) => {
            observer.problem(&path, &reason);
            return;
        }
        Err(e) => {
            observer.problem(&at, &e.to_string());
            return;
        }
    };
    tally.checked += 1;
    for p in &problems {
        observer.problem(&at, p);
    }
    if fourcc.is_empty() {
        return;
    }
    let vinfo = &info.features[key.as_str()]["info"];
    if let Some(codec) = vinfo["video.codec"].as_str()
        && let Some(want) = fourccs(codec)
        && !want.contains(&fourcc.as_str())
    {
        observer.problem(
            &at,
            &format!(
                "its video is {fourcc} but info.json's features.{key}.info says video.codec {codec:?} ({})",
                want.join(" or ")
            ),
        );
    }
    let fps = vinfo["video.fps"]
        .as_f64()
        .filter(|f| *f > 0.0)
        .or_else(|| info.fps.as_f64())
        .unwrap_or(0.0);
    let latest = eps
        .iter()
        .filter_map(|e| e.videos.get(k).map(|v| (e.index, v)))
        .filter(|(_, v)| (v.chunk, v.file) == (chunk, file))
        .max_by(|a, b| a.1.to_ts.total_cmp(&b.1.to_ts));
    if let Some((ep, v)) = latest {
        let need = v.to_ts * fps;
        if samples as f64 + 0.5 < need {
            observer.problem(
                &at,
                &format!(
                    "holds {samples} frames but meta/episodes has episode {ep} end at to_timestamp {} s, {} frames at {fps} fps: the file is shorter than the episodes it should hold",
                    v.to_ts,
                    fmt_frames(need)
                ),
            );
        }
    }
}

/// The video codec facts of info.json for `key`: `av1, yuv420p, 64x48, 10 fps`.
pub fn describe(info: &Info, key: &str) -> String {
    let vi = &info.features[key]["info"];
    let s = |k: &str| match &vi[k] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        v => Some(v.to_string()),
    };
    let mut parts = Vec::new();
    parts.push(s("video.codec").unwrap_or_else(|| "codec not given".into()));
    if let Some(p) = s("video.pix_fmt") {
        parts.push(p);
    }
    if let (Some(w), Some(h)) = (s("video.width"), s("video.height")) {
        parts.push(format!("{w}x{h}"));
    }
    if let Some(f) = s("video.fps") {
        parts.push(format!("{f} fps"));
    }
    if vi["has_audio"].as_bool() == Some(true) {
        parts.push("audio".into());
    }
    parts.join(", ")
}

fn fmt_frames(v: f64) -> String {
    let r = (v * 1000.0).round() / 1000.0;
    format!("{r}")
}
