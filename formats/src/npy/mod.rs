//! The `.npy` format: checking one file and merging many along the first axis.
//!
//! Two kinds of file are understood:
//! - numeric arrays (any fixed-size descr, structured ones included): the data is raw rows, so
//!   a merge rewrites the header and copies bytes (`copy_file_range` between files on Linux);
//! - 1-D object arrays as `np.save(path, list_of_dicts, allow_pickle=True)` writes them: the
//!   data is a pickle, merged natively by splicing the opcodes that build each input's list
//!   into one list (see `object/`), so no Python runs and memory stays bounded however big
//!   the inputs are.
//!
//! The merged file loads with `np.load(path, allow_pickle=True)` on numpy 1.26 and 2.x and
//! equals `np.concatenate([np.load(f, allow_pickle=True) for f in inputs])[:limit]`.

mod fields;
pub(crate) mod header;
mod numeric;
mod object;
mod select;

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// Why a file could not be inspected or a merge could not be done.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading an input or writing the output failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The npy header is malformed or unreadable.
    #[error("bad npy header: {reason}")]
    BadHeader { reason: String },
    /// The file ends before the data its header (or its pickle) promises.
    #[error("{what} is truncated: expected at least {expected} bytes, found {actual}")]
    Truncated {
        what: String,
        expected: u64,
        actual: u64,
    },
    /// The file goes on past the data its header (or its pickle) accounts for.
    #[error("{what} is longer than expected: {expected} bytes expected, {actual} found")]
    TrailingData {
        what: String,
        expected: u64,
        actual: u64,
    },
    /// The pickle stream is malformed (unknown opcode, stack misuse, bad memo reference).
    #[error("bad pickle at byte {offset}: {reason}")]
    BadPickle { offset: u64, reason: String },
    /// Input `input` cannot be merged with input 0: `what` says how they differ.
    #[error("input {input} does not match input 0: {what}")]
    Mismatch { input: usize, what: String },
    /// Valid npy, but a layout this module does not handle.
    #[error("unsupported: {reason}")]
    Unsupported { reason: String },
    /// Two sample counts that must agree do not (`what` names which).
    #[error("{what}: expected {expected} samples, found {actual}")]
    CountMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    /// An element of an object array does not look like element 0.
    #[error("element {index} does not match element 0: {reason}")]
    InconsistentElements { index: u64, reason: String },
    /// `merge` was given no inputs.
    #[error("nothing to merge: no inputs")]
    NoInputs,
    /// The error arose in merge input `index` (its `Io` may also come from writing the output,
    /// which happens while that input is being copied).
    #[error("input {index}: {source}")]
    Input {
        index: usize,
        #[source]
        source: Box<FormatError>,
    },
}

impl FormatError {
    fn in_input(index: usize, e: FormatError) -> FormatError {
        match e {
            e @ (FormatError::Input { .. } | FormatError::Mismatch { .. }) => e,
            e => FormatError::Input {
                index,
                source: Box::new(e),
            },
        }
    }

    /// The error without its [`FormatError::Input`] wrapper.
    pub fn root(&self) -> &FormatError {
        match self {
            FormatError::Input { source, .. } => source.root(),
            e => e,
        }
    }

    /// The merge input the error is about, if it is about one.
    pub fn input_index(&self) -> Option<usize> {
        match self {
            FormatError::Input { index, .. } | FormatError::Mismatch { input: index, .. } => {
                Some(*index)
            }
            _ => None,
        }
    }
}

/// What kind of array a file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArrayKind {
    /// Raw fixed-size rows. `descr` is numpy's descr (`<f4`, or a structured dtype's list
    /// repr); `tail_shape` is the shape after the first axis.
    Numeric { descr: String, tail_shape: Vec<u64> },
    /// A 1-D array of Python objects, stored as a pickle.
    Object,
}

/// The result of checking one `.npy` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// Length of the first axis: the number of samples.
    pub count: u64,
    /// Canonical description of what one sample looks like, equal for two files exactly when
    /// they can be merged: `npy <f4 (*, 3, 4)` for numeric arrays, `npy object dict keys
    /// [a, b, c]` for object arrays of dicts (keys sorted), `npy object values` when the
    /// elements are not dicts, `npy object empty` for an empty object array (whose element
    /// shape is unknown; callers comparing rounds should let it match any object schema).
    pub schema: String,
    /// Numeric (with its descr and shape past the first axis) or object.
    pub kind: ArrayKind,
    /// Where the array data (raw rows, or the pickle) starts.
    pub data_offset: u64,
}

/// Checks one `.npy` file of `file_len` bytes read from `r`: the header parses; a numeric
/// file is exactly as long as its header says; an object file's pickle is complete, is laid
/// out as numpy writes it, holds as many elements as the header says, and (when element 0 is
/// a dict) holds only dicts with element 0's key set. Memory stays bounded by one pickle batch
/// plus a compact memo. Reads no further than `file_len`.
pub fn inspect<R: Read>(r: R, file_len: u64) -> Result<Inspection, FormatError> {
    let mut r = r.take(file_len);
    let h = header::read_header(&mut r)?;
    match h.descr {
        header::Descr::Object => {
            object::inspect(BufReader::with_capacity(1 << 16, r), &h, file_len)
        }
        header::Descr::Numeric { .. } => numeric::inspect(&h, file_len),
    }
}

/// [`inspect`] on a file.
pub fn inspect_path(path: &Path) -> Result<Inspection, FormatError> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    inspect(f, len)
}

/// What a merge wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeSummary {
    /// Samples in the output: `min(limit, counts.iter().sum())`.
    pub samples: u64,
    /// Bytes written to the output, header included.
    pub bytes_written: u64,
    /// Samples taken from each input, in input order (0 for inputs past the limit, which are
    /// never opened).
    pub used_per_input: Vec<u64>,
}

/// Concatenates `.npy` inputs along the first axis into `out`, keeping the first `limit`
/// samples: whole inputs in order, the last one cut.
///
/// `counts[i]` is the sample count of input i as committed (checked against its header); inputs
/// are opened lazily in order (there may be thousands), each read once, front to back, and
/// inputs past the limit are not opened (input 0 always is: its header sets the output's).
/// All inputs must be the same kind: numeric with equal descr and shape past the first axis
/// (C order), or 1-D object arrays. The output is deterministic for the same inputs.
///
/// On error, `out` holds a partial file and must be discarded. When `R` and `W` are
/// [`std::fs::File`] (or `&File`), numeric data moves by `copy_file_range`.
pub fn merge<R: Read, W: std::io::Write>(
    counts: &[u64],
    limit: u64,
    mut open: impl FnMut(usize) -> std::io::Result<R>,
    out: W,
) -> Result<MergeSummary, FormatError> {
    if counts.is_empty() {
        return Err(FormatError::NoInputs);
    }
    let sum = counts
        .iter()
        .try_fold(0u64, |a, c| a.checked_add(*c))
        .ok_or_else(|| FormatError::Unsupported {
            reason: "sample counts overflow u64".into(),
        })?;
    let total = limit.min(sum);
    let mut r0 = open(0).map_err(|e| FormatError::in_input(0, e.into()))?;
    let h0 = header::read_header(&mut r0).map_err(|e| FormatError::in_input(0, e))?;
    match h0.descr {
        header::Descr::Object => object::merge(counts, total, open, (r0, h0), out),
        header::Descr::Numeric { .. } => numeric::merge(counts, total, open, (r0, h0), out),
    }
}

#[cfg(test)]
mod tests;

/// [`crate::inspect`] for `.npy`: [`inspect_path`], then, with a filter, a second read that
/// counts the samples passing it. The filter's field is a dotted path: into the dicts of an
/// object array (the value must be a Python int/float/bool, a numpy scalar or a 0-d or
/// 1-element numeric array), or into a structured dtype's fields (a scalar bool, int, uint or
/// float field). A plain numeric array has no fields. A field that is missing or not a number
/// is a [`crate::DatasetError::Filter`] naming the file and element.
pub fn inspect_dataset(
    path: &Path,
    filter: Option<&crate::Filter>,
) -> Result<crate::Inspection, crate::DatasetError> {
    let i = inspect_path(path)?;
    let kept = match filter {
        Some(f) => select::count_kept(path, f)?,
        None => i.count,
    };
    Ok(crate::Inspection {
        count: i.count,
        kept,
        schema: i.schema,
    })
}

/// [`inspect_dataset`] on a file's bytes in memory; `name` stands for the file in messages.
pub fn inspect_dataset_bytes(
    name: &Path,
    bytes: &[u8],
    filter: Option<&crate::Filter>,
) -> Result<crate::Inspection, crate::DatasetError> {
    let i = inspect(bytes, bytes.len() as u64)?;
    let kept = match filter {
        Some(f) => select::count_kept_bytes(name, bytes, f)?,
        None => i.count,
    };
    Ok(crate::Inspection {
        count: i.count,
        kept,
        schema: i.schema,
    })
}

/// [`crate::merge`] for `.npy`: without a filter or de-duplication, [`merge`] into a new file
/// at `out`; with them, a two-phase merge (plan, then write) that keeps the pickle of object
/// arrays valid however the left-out elements shared memo entries with kept ones (see
/// `select/`). The result equals
/// `np.concatenate([np.load(f, allow_pickle=True) for f in inputs])[keep][:limit]`, where
/// `keep` passes the filter and is the first occurrence (in input order) of its
/// de-duplication fields' values; the same inputs and options give the same bytes.
pub fn merge_dataset(
    inputs: &[std::path::PathBuf],
    counts: &[u64],
    options: &crate::MergeOptions,
    out: &Path,
) -> Result<crate::MergeSummary, crate::DatasetError> {
    if options.filter.is_some() || !options.dedup.is_empty() {
        return select::merge_selected(inputs, counts, options, out);
    }
    let f = File::create_new(out).map_err(crate::DatasetError::io("create", out))?;
    let s = merge(counts, options.limit, |i| File::open(&inputs[i]), &f)?;
    Ok(crate::MergeSummary {
        samples: s.samples,
        bytes_written: s.bytes_written,
        filtered: 0,
        duplicates: 0,
    })
}

/// [`crate::examine`] for `.npy`: every sample, in order. An object array of dicts reports
/// each numeric leaf (dicts walked by dotted path; a numpy array's elements, or a list of
/// numbers, are that field's values); a structured array each numeric field; a plain numeric
/// array one field `value` with the row's elements. Problems, at `<file>: element <i>` (and
/// `: <field>`): an element that is not a dict like element 0 or has other keys, NaN or an
/// infinite value in a float field. Returns the sample count.
pub fn examine_dataset(
    path: &Path,
    observer: &mut dyn crate::Observer,
) -> Result<u64, crate::DatasetError> {
    select::examine(path, observer)
}
