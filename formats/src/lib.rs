//! The dataset formats Quarry understands. Each is a module with the same three operations:
//!
//! - `inspect(path, filter)`: the cheap check a worker runs on a round's output before uploading
//!   it: is it well formed, how many samples does it hold (and how many pass the job's filter),
//!   and what does one sample look like (`schema`: equal for two rounds exactly when they can
//!   be merged);
//! - `merge(inputs, counts, options, out)`: the committed rounds of one object, in round order,
//!   into one final at `out`: filtered, de-duplicated, then cut to the quota; deterministic for
//!   the same inputs and options;
//! - `examine(path, observer)`: the full walk `coordinator inspect` runs: every sample checked,
//!   every numeric field reported to an [`Observer`] for statistics, every problem with its
//!   path inside the dataset.
//!
//! A *sample* is the unit the quota counts: a row of a `.npy`/`.npz`, a line of JSONL, a demo of
//! a robomimic HDF5 file, an episode of a zarr replay buffer, of an episode directory or of a LeRobot dataset.

pub mod archive;
pub mod episodes;
pub mod hdf5;
pub mod jsonl;
pub mod lerobot;
pub mod npy;
pub mod npz;
pub mod zarr;

mod elem;
mod filter;
mod half;
mod pickle;

use std::fmt;
use std::path::{Path, PathBuf};

pub use filter::{Cmp, Filter, FilterError};

/// A dataset format a generator may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// One `.npy` file: numeric rows or a 1-D object array (a list of dicts).
    Npy,
    /// A robomimic-style HDF5 file: `data/demo_<i>` groups, `data` attributes `total` and
    /// `env_args`, optional `mask/<filter key>` lists of demo names.
    Hdf5,
    /// A zarr store (a directory): arrays concatenated along their first axis; a replay
    /// buffer's `meta/episode_ends` is offset so episodes stay whole.
    Zarr,
    /// A directory of episode files (`episodes/episode_%05d.<ext>`) with per-episode metadata
    /// (`metadata/episode_%05d_meta.json`) and a `metadata/collection_summary.json`.
    Episodes,
    /// One `.npz` archive: every key concatenated along its first axis.
    Npz,
    /// One JSON Lines file: one sample per line.
    Jsonl,
    /// A LeRobot v3.0 dataset (a directory: `meta/`, `data/`, `videos/`); a sample is an
    /// episode.
    Lerobot,
}

impl Format {
    pub const ALL: [Format; 7] = [
        Format::Npy,
        Format::Hdf5,
        Format::Zarr,
        Format::Episodes,
        Format::Npz,
        Format::Jsonl,
        Format::Lerobot,
    ];

    /// The name used in job files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Npy => "npy",
            Format::Hdf5 => "hdf5",
            Format::Zarr => "zarr",
            Format::Episodes => "episodes",
            Format::Npz => "npz",
            Format::Jsonl => "jsonl",
            Format::Lerobot => "lerobot",
        }
    }

    /// The format named `name` (as [`Format::name`] spells it).
    pub fn from_name(name: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The format an output path's name implies: `.npy`, `.hdf5`/`.h5`, `.zarr`, `.npz`,
    /// `.jsonl`; `None` for anything else (an episode directory has no telling suffix and is
    /// named in the job spec).
    pub fn from_extension(path: &str) -> Option<Format> {
        let name = path.rsplit('/').next().unwrap_or(path);
        let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())?;
        match ext.as_str() {
            "npy" => Some(Format::Npy),
            "hdf5" | "h5" => Some(Format::Hdf5),
            "zarr" => Some(Format::Zarr),
            "npz" => Some(Format::Npz),
            "jsonl" => Some(Format::Jsonl),
            _ => None,
        }
    }

    /// The format of an existing dataset on disk, from its name and, failing that, its
    /// contents (a directory with `.zarray`/`.zgroup`/`zarr.json` is zarr; one with
    /// `episodes/` is an episode directory; a file starting with the HDF5 signature is HDF5).
    pub fn detect(path: &Path) -> Option<Format> {
        if let Some(f) = path.to_str().and_then(Format::from_extension) {
            return Some(f);
        }
        if path.is_dir() {
            if [".zgroup", ".zarray", "zarr.json"]
                .iter()
                .any(|m| path.join(m).is_file())
            {
                return Some(Format::Zarr);
            }
            if path.join("meta/info.json").is_file() {
                return Some(Format::Lerobot);
            }
            if path.join("episodes").is_dir() {
                return Some(Format::Episodes);
            }
            return None;
        }
        let mut head = [0u8; 8];
        let n = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .ok()?;
        match &head[..n] {
            h if h.starts_with(b"\x93NUMPY") => Some(Format::Npy),
            h if h.starts_with(b"\x89HDF\r\n\x1a\n") => Some(Format::Hdf5),
            h if h.starts_with(b"PK\x03\x04") => Some(Format::Npz),
            h if h.starts_with(b"{") => Some(Format::Jsonl),
            _ => None,
        }
    }

    /// Whether a dataset of this format is a directory (uploaded as one archive) rather than
    /// one file.
    pub fn is_directory(self) -> bool {
        matches!(self, Format::Zarr | Format::Episodes | Format::Lerobot)
    }

    /// Whether [`inspect_bytes`] inspects this format from bytes in memory (`.npy` and JSON
    /// Lines; the others are read with seeks, through libhdf5 or as directories).
    pub fn inspects_bytes(self) -> bool {
        matches!(self, Format::Npy | Format::Jsonl)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a dataset could not be inspected, merged or examined.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// Reading an input or writing the output failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The dataset is malformed: `path` is the file and the place inside it
    /// (`round.hdf5:data/demo_3/actions`), `reason` what is wrong there.
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    /// Input `input` cannot be merged with input 0: `what` says how they differ.
    #[error("input {input} does not match input 0: {what}")]
    Mismatch { input: usize, what: String },
    /// Well formed, but a layout or encoding Quarry does not handle.
    #[error("unsupported: {reason}")]
    Unsupported { reason: String },
    /// The library reading the dataset died on it: libhdf5, run in a child process (see
    /// [`hdf5::child`]), was killed by a signal, passed its limits or ended without a
    /// readable answer. `path` is the file (a merge's output for a merge), `reason` how the
    /// child ended. Like [`DatasetError::Invalid`] the data is at fault (the library does
    /// not die on well-formed files); a merge's culprit is the input whose merge alone dies.
    #[error("{path}: {reason}")]
    Crashed { path: String, reason: String },
    /// The job's filter or de-duplication fields do not fit a sample.
    #[error("{path}: {reason}")]
    Filter { path: String, reason: String },
    /// An `.npy` file (or an `.npz` member) is malformed.
    #[error(transparent)]
    Npy(#[from] npy::FormatError),
    /// `merge` was given no inputs.
    #[error("nothing to merge: no inputs")]
    NoInputs,
}

impl DatasetError {
    /// An [`DatasetError::Io`] maker for `map_err`.
    pub fn io<'a>(
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> DatasetError + 'a {
        move |source| DatasetError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// An [`DatasetError::Invalid`] at `path` (file and place inside it).
    pub fn invalid(path: impl Into<String>, reason: impl Into<String>) -> DatasetError {
        DatasetError::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// What [`inspect`] found in one round's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Samples in the dataset.
    pub count: u64,
    /// Samples that pass the filter given to `inspect` (`count` without one).
    pub kept: u64,
    /// What one sample looks like; two rounds merge only when their schemas are equal (or one
    /// of them is empty: see [`schemas_compatible`]).
    pub schema: String,
}

/// Whether rounds with these schemas can be merged: equal, or either holds no samples.
pub fn schemas_compatible(a: &str, b: &str) -> bool {
    a == b || a.ends_with(EMPTY_SCHEMA_SUFFIX) || b.ends_with(EMPTY_SCHEMA_SUFFIX)
}

/// Ends the schema of a dataset with no samples (whose sample layout is unknown).
pub const EMPTY_SCHEMA_SUFFIX: &str = " empty";

/// How to merge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeOptions {
    /// Most samples the final keeps (the quota): whole inputs in order, the last one cut.
    pub limit: u64,
    /// Samples that fail it are dropped before the cut.
    pub filter: Option<Filter>,
    /// When not empty: a sample whose listed fields hash the same as an earlier sample's (in
    /// round order) is dropped before the cut.
    pub dedup: Vec<String>,
    /// `lerobot` only: consecutive video files of a key are appended into one (packets
    /// remuxed, never re-encoded) while it stays under this many MiB; `None` gives each
    /// round's video file its own file in the final.
    pub video_files_size_in_mb: Option<f64>,
}

/// What a merge wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeSummary {
    /// Samples in the final.
    pub samples: u64,
    /// Bytes written (for a directory: all its files).
    pub bytes_written: u64,
    /// Samples dropped by the filter.
    pub filtered: u64,
    /// Samples dropped as duplicates.
    pub duplicates: u64,
}

/// Receives what [`examine`] finds, sample by sample.
pub trait Observer {
    /// Sample `index` begins; the values up to the next call belong to it.
    fn sample(&mut self, index: u64);
    /// The numeric values of one field of the current sample: one value for a scalar field
    /// (an energy, a success flag, a step count), every element for an array field.
    fn values(&mut self, field: &str, values: &[f64]);
    /// Something wrong at `path` (file and place inside it). Examining goes on where it can.
    fn problem(&mut self, path: &str, reason: &str);
    /// A fact about the whole dataset, not about one sample (its frame rate, its task list,
    /// a check that was not made), `key` short and stable, `value` one line of text. Formats
    /// that know nothing beyond their samples never call it; observers may ignore it.
    fn fact(&mut self, key: &str, value: &str) {
        let _ = (key, value);
    }
}

/// Checks one round's output of `format` and counts its samples (and those passing `filter`).
pub fn inspect(
    format: Format,
    path: &Path,
    filter: Option<&Filter>,
) -> Result<Inspection, DatasetError> {
    match format {
        Format::Npy => npy::inspect_dataset(path, filter),
        Format::Hdf5 => hdf5::child::inspect(path, filter),
        Format::Zarr => zarr::inspect(path, filter),
        Format::Episodes => episodes::inspect(path, filter),
        Format::Npz => npz::inspect(path, filter),
        Format::Jsonl => jsonl::inspect(path, filter),
        Format::Lerobot => lerobot::inspect(path, filter),
    }
}

/// [`inspect`] on a file's bytes already in memory (`name` stands for the file in messages),
/// for callers that read a small file once and must inspect exactly those bytes (a worker's
/// output before upload, a round read back at commit): the same checks and the same result
/// as [`inspect`] on a file holding them. `None` for formats inspected only from a file (see
/// [`Format::inspects_bytes`]).
pub fn inspect_bytes(
    format: Format,
    name: &Path,
    bytes: &[u8],
    filter: Option<&Filter>,
) -> Option<Result<Inspection, DatasetError>> {
    match format {
        Format::Npy => Some(npy::inspect_dataset_bytes(name, bytes, filter)),
        Format::Jsonl => Some(jsonl::inspect_bytes(name, bytes, filter)),
        Format::Hdf5 | Format::Zarr | Format::Episodes | Format::Npz | Format::Lerobot => None,
    }
}

/// Merges `inputs` (committed rounds in round order, `counts[i]` samples each as committed)
/// into `out`, which must not exist: a file, or a directory for directory formats. On error
/// `out` may hold a partial result and must be removed by the caller.
pub fn merge(
    format: Format,
    inputs: &[PathBuf],
    counts: &[u64],
    options: &MergeOptions,
    out: &Path,
) -> Result<MergeSummary, DatasetError> {
    if inputs.is_empty() {
        return Err(DatasetError::NoInputs);
    }
    if inputs.len() != counts.len() {
        return Err(DatasetError::Unsupported {
            reason: format!("{} inputs but {} counts", inputs.len(), counts.len()),
        });
    }
    match format {
        Format::Npy => npy::merge_dataset(inputs, counts, options, out),
        Format::Hdf5 => hdf5::child::merge(inputs, counts, options, out),
        Format::Zarr => zarr::merge(inputs, counts, options, out),
        Format::Episodes => episodes::merge(inputs, counts, options, out),
        Format::Npz => npz::merge(inputs, counts, options, out),
        Format::Jsonl => jsonl::merge(inputs, counts, options, out),
        Format::Lerobot => lerobot::merge(inputs, counts, options, out),
    }
}

/// Walks a whole dataset, reporting every sample's numeric fields and every problem to
/// `observer`; returns the number of samples. An error is a dataset that cannot be walked at
/// all (unreadable, not this format).
pub fn examine(
    format: Format,
    path: &Path,
    observer: &mut dyn Observer,
) -> Result<u64, DatasetError> {
    match format {
        Format::Npy => npy::examine_dataset(path, observer),
        Format::Hdf5 => hdf5::child::examine(path, observer),
        Format::Zarr => zarr::examine(path, observer),
        Format::Episodes => episodes::examine(path, observer),
        Format::Npz => npz::examine(path, observer),
        Format::Jsonl => jsonl::examine(path, observer),
        Format::Lerobot => lerobot::examine(path, observer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_extensions_round_trip() {
        for f in Format::ALL {
            assert_eq!(Format::from_name(f.name()), Some(f));
        }
        assert_eq!(Format::from_extension("out/demo.hdf5"), Some(Format::Hdf5));
        assert_eq!(Format::from_extension("out/demo.H5"), Some(Format::Hdf5));
        assert_eq!(
            Format::from_extension("r/{object}.zarr"),
            Some(Format::Zarr)
        );
        assert_eq!(Format::from_extension("r/x.npz"), Some(Format::Npz));
        assert_eq!(Format::from_extension("r/x.jsonl"), Some(Format::Jsonl));
        assert_eq!(Format::from_extension("r/dataset"), None);
        assert_eq!(Format::from_extension("r.d/dataset"), None);
    }

    #[test]
    fn detect_reads_signatures_and_layouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let h5 = dir.path().join("noext");
        std::fs::write(&h5, b"\x89HDF\r\n\x1a\n....").expect("write");
        assert_eq!(Format::detect(&h5), Some(Format::Hdf5));
        let z = dir.path().join("store");
        std::fs::create_dir_all(&z).expect("mkdir");
        std::fs::write(z.join(".zgroup"), b"{\"zarr_format\": 2}").expect("write");
        assert_eq!(Format::detect(&z), Some(Format::Zarr));
        let e = dir.path().join("dataset");
        std::fs::create_dir_all(e.join("episodes")).expect("mkdir");
        assert_eq!(Format::detect(&e), Some(Format::Episodes));
        let j = dir.path().join("lines");
        std::fs::write(&j, b"{\"a\": 1}\n").expect("write");
        assert_eq!(Format::detect(&j), Some(Format::Jsonl));
    }

    #[test]
    fn empty_schemas_match_anything() {
        assert!(schemas_compatible("jsonl keys [a]", "jsonl keys [a]"));
        assert!(schemas_compatible("jsonl keys [a]", "jsonl empty"));
        assert!(!schemas_compatible("jsonl keys [a]", "jsonl keys [b]"));
    }
}
