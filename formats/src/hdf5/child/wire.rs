//! What travels between a parent and its libhdf5 child: one JSON request on the child's
//! stdin, and on its stdout frames `[tag: u8][length: u64 LE][payload]`: examine's events as
//! they happen (`S` a sample index, `V` a field's values as raw f64s, `P` a problem), then
//! one `O` (the answer, JSON) or `E` (a [`DatasetError`], JSON). Values travel as bits so
//! NaN and infinities arrive exactly as the walk saw them.

use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{DatasetError, Filter, Inspection, MergeOptions, MergeSummary};

/// Frame tags.
pub const SAMPLE: u8 = b'S';
pub const VALUES: u8 = b'V';
pub const PROBLEM: u8 = b'P';
pub const OK: u8 = b'O';
pub const ERR: u8 = b'E';

/// The longest frame a parent accepts: examine reports at most
/// [`super::super::EXAMINE_MAX_ELEMENTS`] values of a dataset at once (32 MiB as f64s).
pub const MAX_FRAME: u64 = 64 << 20;

/// A path as its bytes (any Unix path, UTF-8 or not).
pub fn path_bytes(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

pub fn bytes_path(b: Vec<u8>) -> PathBuf {
    PathBuf::from(std::ffi::OsString::from_vec(b))
}

/// One operation for a child, with the limits it puts on itself before touching the file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// RLIMIT_AS in bytes (0: unlimited).
    pub memory_bytes: u64,
    /// RLIMIT_CPU in seconds (0: unlimited).
    pub cpu_seconds: u64,
    pub op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Inspect {
        path: Vec<u8>,
        filter: Option<String>,
    },
    Examine {
        path: Vec<u8>,
    },
    Merge {
        inputs: Vec<Vec<u8>>,
        counts: Vec<u64>,
        limit: u64,
        filter: Option<String>,
        dedup: Vec<String>,
        out: Vec<u8>,
    },
}

/// A filter as it travels: its display form, which [`Filter::parse`] reads back exactly.
pub fn filter_text(f: Option<&Filter>) -> Option<String> {
    f.map(ToString::to_string)
}

pub fn filter_of(text: Option<&str>) -> Result<Option<Filter>, DatasetError> {
    text.map(|t| {
        Filter::parse(t).map_err(|e| DatasetError::Unsupported {
            reason: format!("filter sent to the libhdf5 child: {e}"),
        })
    })
    .transpose()
}

pub fn merge_options(limit: u64, filter: Option<Filter>, dedup: Vec<String>) -> MergeOptions {
    MergeOptions {
        limit,
        filter,
        dedup,
        ..Default::default()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InspectionWire {
    pub count: u64,
    pub kept: u64,
    pub schema: String,
}

impl From<&Inspection> for InspectionWire {
    fn from(i: &Inspection) -> Self {
        InspectionWire {
            count: i.count,
            kept: i.kept,
            schema: i.schema.clone(),
        }
    }
}

impl From<InspectionWire> for Inspection {
    fn from(i: InspectionWire) -> Self {
        Inspection {
            count: i.count,
            kept: i.kept,
            schema: i.schema,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SummaryWire {
    pub samples: u64,
    pub bytes_written: u64,
    pub filtered: u64,
    pub duplicates: u64,
}

impl From<&MergeSummary> for SummaryWire {
    fn from(s: &MergeSummary) -> Self {
        SummaryWire {
            samples: s.samples,
            bytes_written: s.bytes_written,
            filtered: s.filtered,
            duplicates: s.duplicates,
        }
    }
}

impl From<SummaryWire> for MergeSummary {
    fn from(s: SummaryWire) -> Self {
        MergeSummary {
            samples: s.samples,
            bytes_written: s.bytes_written,
            filtered: s.filtered,
            duplicates: s.duplicates,
        }
    }
}

/// A [`DatasetError`] as it travels. Callers branch on the variant (a merge's culprit search,
/// the coordinator's retry-or-quarantine), so the variant and its fields survive the trip;
/// an I/O error keeps its kind where the callers look at it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ErrorWire {
    Io {
        op: String,
        path: Vec<u8>,
        io_kind: String,
        message: String,
    },
    Invalid {
        path: String,
        reason: String,
    },
    Mismatch {
        input: usize,
        what: String,
    },
    Unsupported {
        reason: String,
    },
    Filter {
        path: String,
        reason: String,
    },
    Crashed {
        path: String,
        reason: String,
    },
    NoInputs,
}

const IO_KINDS: [(io::ErrorKind, &str); 6] = [
    (io::ErrorKind::NotFound, "not_found"),
    (io::ErrorKind::UnexpectedEof, "unexpected_eof"),
    (io::ErrorKind::InvalidData, "invalid_data"),
    (io::ErrorKind::AlreadyExists, "already_exists"),
    (io::ErrorKind::PermissionDenied, "permission_denied"),
    (io::ErrorKind::StorageFull, "storage_full"),
];

/// The operation names [`DatasetError::Io`] carries in this module (a `&'static str`).
const OPS: [&str; 6] = ["create", "stat", "open", "read", "write", "remove"];

impl From<&DatasetError> for ErrorWire {
    fn from(e: &DatasetError) -> Self {
        match e {
            DatasetError::Io { op, path, source } => ErrorWire::Io {
                op: (*op).to_string(),
                path: path_bytes(path),
                io_kind: IO_KINDS
                    .iter()
                    .find(|(k, _)| *k == source.kind())
                    .map_or("other", |(_, n)| n)
                    .to_string(),
                message: source.to_string(),
            },
            DatasetError::Invalid { path, reason } => ErrorWire::Invalid {
                path: path.clone(),
                reason: reason.clone(),
            },
            DatasetError::Mismatch { input, what } => ErrorWire::Mismatch {
                input: *input,
                what: what.clone(),
            },
            DatasetError::Unsupported { reason } => ErrorWire::Unsupported {
                reason: reason.clone(),
            },
            DatasetError::Filter { path, reason } => ErrorWire::Filter {
                path: path.clone(),
                reason: reason.clone(),
            },
            DatasetError::Crashed { path, reason } => ErrorWire::Crashed {
                path: path.clone(),
                reason: reason.clone(),
            },
            // Not produced by the HDF5 module; kept as what it says.
            DatasetError::Npy(f) => ErrorWire::Invalid {
                path: String::new(),
                reason: f.to_string(),
            },
            DatasetError::NoInputs => ErrorWire::NoInputs,
        }
    }
}

impl From<ErrorWire> for DatasetError {
    fn from(e: ErrorWire) -> Self {
        match e {
            ErrorWire::Io {
                op,
                path,
                io_kind,
                message,
            } => DatasetError::Io {
                op: OPS.iter().find(|o| **o == op).copied().unwrap_or("access"),
                path: bytes_path(path),
                source: io::Error::new(
                    IO_KINDS
                        .iter()
                        .find(|(_, n)| *n == io_kind)
                        .map_or(io::ErrorKind::Other, |(k, _)| *k),
                    message,
                ),
            },
            ErrorWire::Invalid { path, reason } => DatasetError::Invalid { path, reason },
            ErrorWire::Mismatch { input, what } => DatasetError::Mismatch { input, what },
            ErrorWire::Unsupported { reason } => DatasetError::Unsupported { reason },
            ErrorWire::Filter { path, reason } => DatasetError::Filter { path, reason },
            ErrorWire::Crashed { path, reason } => DatasetError::Crashed { path, reason },
            ErrorWire::NoInputs => DatasetError::NoInputs,
        }
    }
}

pub fn write_frame(w: &mut impl Write, tag: u8, payload: &[u8]) -> io::Result<()> {
    w.write_all(&[tag])?;
    w.write_all(&(payload.len() as u64).to_le_bytes())?;
    w.write_all(payload)
}

/// The next frame, `None` at a clean end of the stream; a frame over [`MAX_FRAME`] or cut
/// short is an [`io::ErrorKind::InvalidData`] error.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut tag = [0u8; 1];
    if r.read(&mut tag)? == 0 {
        return Ok(None);
    }
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut payload = Vec::new();
    r.take(len).read_to_end(&mut payload)?;
    if payload.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("a frame cut short ({} of {len} bytes)", payload.len()),
        ));
    }
    Ok(Some((tag[0], payload)))
}

/// A `V` payload: `[field length: u32 LE][field][f64 LE]*`.
pub fn values_payload(field: &str, values: &[f64]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + field.len() + values.len() * 8);
    p.extend_from_slice(&(field.len() as u32).to_le_bytes());
    p.extend_from_slice(field.as_bytes());
    for v in values {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

pub fn parse_values(p: &[u8]) -> Option<(String, Vec<f64>)> {
    let n = u32::from_le_bytes(p.get(..4)?.try_into().ok()?) as usize;
    let field = String::from_utf8(p.get(4..4 + n)?.to_vec()).ok()?;
    let rest = p.get(4 + n..)?;
    if rest.len() % 8 != 0 {
        return None;
    }
    let values = rest
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Some((field, values))
}
