//! Filtered and de-duplicated merges, `inspect` with a filter, and `examine`.
//!
//! A filtered merge runs in two phases, since the output's header (and, for object arrays,
//! the pickle's prologue) states the number of samples before any of them:
//!
//! 1. *Plan*: each input is read once, front to back, and every sample judged: the filter,
//!    then de-duplication (a SHA-256 of a canonical encoding of the listed fields, truncated to
//!    128 bits; first occurrence in input order kept, across all inputs). Planning stops once
//!    `limit` samples are kept; inputs past that point are never opened. The plan is one byte
//!    per judged sample.
//! 2. *Write*: each planned input is read again and its kept samples written: raw rows for
//!    numeric arrays, spliced pickle opcodes for object arrays.
//!
//! ## Leaving elements out of a pickle
//!
//! An object array's elements share pickle memo entries: Python's pickler writes an object
//! once and refers back to it (`BINGET`) whenever the same object appears again. numpy's
//! output relies on it everywhere: the dict key strings, the `scalar` and `_reconstruct`
//! globals, each dtype object are written by the first element that uses them and read by all
//! later ones; a generator that puts one shared value into every dict (an object's scale, say)
//! gets the same. Leaving an element out of the output leaves out its memo writes, so a later
//! element that reads one of them would break the pickle.
//!
//! The plan therefore also records, for every element, which earlier elements wrote memo
//! entries it reads. Walking back from the last kept element, an element is *needed* when it
//! is kept or a needed element reads an entry it wrote. In the written output:
//! - a kept element is copied into the data list as in an unfiltered merge (memo entries
//!   renumbered, see `object/`);
//! - a needed element that is not kept is copied too, and then popped off the stack (`POP`)
//!   before it reaches the list. Its objects are built exactly as in the input, so every later
//!   reference resolves to the very object it resolved to before, and objects shared between
//!   kept elements stay shared, as `np.concatenate(...)[keep]` has them;
//! - any other element is not written; its memo writes are marked as dropped in the
//!   translation table, and reading one is reported as an error rather than written.
//!
//! In numpy's pickles only the first elements of a round define shared entries, so the
//! popped elements cost a few hundred bytes per input.
//!
//! ## Memory
//!
//! Planning holds one pickle batch (1,000 elements) decoded, the decoder's memo (four bytes
//! per entry, plus dict key strings and values kept whole until a 64 MiB budget per input is spent: see
//! `Keeper` in `walk.rs`),
//! which element wrote each memo entry (four bytes per entry), the reads of earlier elements
//! (eight bytes per distinct pair, in practice one or two per element), the plan (one byte per
//! sample) and the de-duplication digests (16 bytes per distinct sample). Writing holds one
//! batch of raw opcodes.
//!
//! The parts: `judge.rs` decides each sample (filter, then de-duplication) and locates fields
//! in numeric rows; `walk.rs` walks an object array's elements, recording memo reads between
//! them; `plan.rs` plans and writes one input; `examine.rs` is `examine`; this file runs the
//! two phases.

mod examine;
mod judge;
mod plan;
mod walk;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use super::FormatError;
use super::header::{Descr, Header, read_header, shape_repr, write_header};
use super::object::{
    Batches, CORE_MODULE_V1, CORE_MODULE_V2, Output, READ_BUF, Translator, epilogue, kind_name,
    open_input, prologue,
};
use crate::{DatasetError, Filter, MergeOptions, MergeSummary};
use judge::{Judge, RowRules, row_rules};
use plan::{plan_numeric, plan_object, plan_object_count, write_object};

pub(super) use examine::examine;

/// Plan entries.
const SKIP: u8 = 0;
const KEEP: u8 = 1;
/// Not kept, but a kept element reads a memo entry it writes.
const NEEDED: u8 = 2;

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DatasetError + 'a {
    DatasetError::io(op, path)
}

fn open_file(path: &Path) -> Result<(BufReader<File>, Header, u64), DatasetError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let len = f.metadata().map_err(io_err("stat", path))?.len();
    let mut r = BufReader::with_capacity(READ_BUF, f);
    let h = read_header(&mut r)?;
    Ok((r, h, len))
}

/// The plan for one input: what happens to each of its first `states.len()` samples.
struct Plan {
    states: Vec<u8>,
    kept: u64,
}

impl Plan {
    /// Samples the write phase goes through: up to the last kept one.
    fn walk_to(&self) -> u64 {
        self.states
            .iter()
            .rposition(|&s| s == KEEP)
            .map_or(0, |i| i as u64 + 1)
    }
}

fn row_bytes(h: &Header) -> Result<u64, FormatError> {
    let Descr::Numeric { itemsize, .. } = &h.descr else {
        return Ok(0);
    };
    h.shape
        .iter()
        .skip(1)
        .try_fold(*itemsize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| FormatError::BadHeader {
            reason: "array size overflows".into(),
        })
}

fn read_row(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<(), DatasetError> {
    r.read_exact(buf).map_err(io_err("read", path))
}

/// The kind of array input 0 holds, which every input must share.
fn check_kind(i: usize, h: &Header, h0: &Header) -> Result<(), FormatError> {
    match (&h0.descr, &h.descr) {
        (Descr::Object, Descr::Object) => {
            if h.shape.len() != 1 {
                return Err(FormatError::in_input(
                    i,
                    FormatError::Unsupported {
                        reason: format!("object array of shape {:?} (only 1-D merges)", h.shape),
                    },
                ));
            }
            Ok(())
        }
        (Descr::Object, _) => Err(FormatError::Mismatch {
            input: i,
            what: format!("input 0 is an object array, this one is {}", kind_name(h)),
        }),
        (_, Descr::Object) => Err(FormatError::Mismatch {
            input: i,
            what: "this one is an object array, input 0 is numeric".into(),
        }),
        (a, b) if a != b => Err(FormatError::Mismatch {
            input: i,
            what: format!(
                "descr {} differs from input 0's {}",
                b.display(),
                a.display()
            ),
        }),
        _ if h.shape.len() != h0.shape.len() || h.shape[1..] != h0.shape[1..] => {
            Err(FormatError::Mismatch {
                input: i,
                what: format!(
                    "shape {} differs from input 0's {} past the first axis",
                    shape_repr(&h.shape),
                    shape_repr(&h0.shape)
                ),
            })
        }
        _ if h.fortran_order && h.shape.len() > 1 => Err(FormatError::in_input(
            i,
            FormatError::Unsupported {
                reason: format!("Fortran-ordered array of shape {}", shape_repr(&h.shape)),
            },
        )),
        _ if h.shape.is_empty() => Err(FormatError::in_input(
            i,
            FormatError::Unsupported {
                reason: "0-d array (no first axis to concatenate along)".into(),
            },
        )),
        _ => Ok(()),
    }
}

/// [`crate::merge`] for `.npy` with a filter or de-duplication: see the module docs.
pub(super) fn merge_selected(
    inputs: &[PathBuf],
    counts: &[u64],
    options: &MergeOptions,
    out_path: &Path,
) -> Result<MergeSummary, DatasetError> {
    let mut judge = Judge::new(options.filter.as_ref(), &options.dedup);
    let limit = options.limit;
    // Phase 1: plan.
    let mut plans: Vec<Plan> = Vec::new();
    let mut first: Option<Header> = None;
    let mut rules = RowRules::default();
    // Input 0's pickle protocol and `_reconstruct` module, for an object output.
    let mut style = (3u8, CORE_MODULE_V2);
    let mut kept = 0u64;
    for (i, path) in inputs.iter().enumerate() {
        if i > 0 && kept == limit {
            break;
        }
        let wrap = move |e: FormatError| DatasetError::from(FormatError::in_input(i, e));
        let (r, h, len) = open_file(path).map_err(|e| match e {
            DatasetError::Npy(e) => wrap(e),
            e => e,
        })?;
        check_kind(i, &h, first.get_or_insert_with(|| h.clone()))?;
        if h.shape[0] != counts[i] {
            return Err(wrap(FormatError::CountMismatch {
                what: "committed sample count vs npy header shape".into(),
                expected: counts[i],
                actual: h.shape[0],
            }));
        }
        if i == 0 {
            rules = row_rules(path, &h, options.filter.as_ref(), &options.dedup)?;
        }
        let room = limit - kept;
        let plan = match h.descr {
            Descr::Object => {
                let mut inp = open_input(r, &h).map_err(wrap)?;
                if i == 0 {
                    style.0 = inp.dec.proto;
                    if inp.module == CORE_MODULE_V1 {
                        style.1 = CORE_MODULE_V1;
                    }
                }
                plan_object(path, &mut inp, counts[i], &mut judge, room, &wrap)?
            }
            Descr::Numeric { .. } => plan_numeric(path, r, &h, len, &rules, &mut judge, room)
                .map_err(|e| match e {
                    DatasetError::Npy(e) => wrap(e),
                    e => e,
                })?,
        };
        kept += plan.kept;
        plans.push(plan);
    }
    let Some(h0) = first else {
        return Err(DatasetError::NoInputs);
    };

    // Phase 2: write.
    let f = File::create_new(out_path).map_err(io_err("create", out_path))?;
    let mut out = Output::new(&f);
    let mut shape = h0.shape.clone();
    shape[0] = kept;
    let werr = io_err("write", out_path);
    let header = write_header(&h0.descr, &shape)?;
    match h0.descr {
        Descr::Object => {
            let mut tr = Translator::new(style.0, style.1);
            let mut batches = Batches::new(kept);
            out.write_all(&header)
                .and_then(|_| out.write_all(&prologue(style.0, style.1, kept)))
                .map_err(werr)?;
            for (i, plan) in plans.iter().enumerate() {
                if plan.walk_to() == 0 {
                    continue;
                }
                let wrap = |e: FormatError| DatasetError::from(FormatError::in_input(i, e));
                let (r, h, _) = open_file(&inputs[i])?;
                let mut inp = open_input(r, &h).map_err(wrap)?;
                tr.start_input(&inp.dec);
                write_object(&mut inp, &mut tr, &mut batches, plan, &mut out).map_err(wrap)?;
            }
            batches.finish(&mut out.buf);
            let tail = epilogue(&mut tr).map_err(DatasetError::from)?;
            out.write_all(&tail)
                .and_then(|_| out.flush())
                .map_err(io_err("write", out_path))?;
        }
        Descr::Numeric { .. } => {
            out.write_all(&header).map_err(werr)?;
            let row = row_bytes(&h0)? as usize;
            let mut buf = vec![0u8; row];
            for (i, plan) in plans.iter().enumerate() {
                let walk_to = plan.walk_to() as usize;
                if walk_to == 0 {
                    continue;
                }
                let (mut r, _, _) = open_file(&inputs[i])?;
                for &state in &plan.states[..walk_to] {
                    read_row(&mut r, &mut buf, &inputs[i])?;
                    if state == KEEP {
                        out.write_all(&buf).map_err(io_err("write", out_path))?;
                    }
                }
            }
            out.flush().map_err(io_err("write", out_path))?;
        }
    }
    Ok(MergeSummary {
        samples: kept,
        bytes_written: out.n,
        filtered: judge.filtered,
        duplicates: judge.duplicates,
    })
}

/// How many samples of `path` (already inspected) pass `filter`.
pub(super) fn count_kept(path: &Path, filter: &Filter) -> Result<u64, DatasetError> {
    let (r, h, len) = open_file(path)?;
    count_kept_in(path, r, &h, len, filter)
}

/// [`count_kept`] on a file's bytes in memory; `name` stands for the file in messages.
pub(super) fn count_kept_bytes(
    name: &Path,
    bytes: &[u8],
    filter: &Filter,
) -> Result<u64, DatasetError> {
    let mut r = bytes;
    let h = read_header(&mut r)?;
    count_kept_in(name, r, &h, bytes.len() as u64, filter)
}

/// Counts the samples of an input (positioned after its header `h`) that pass `filter`.
fn count_kept_in<R: BufRead>(
    path: &Path,
    r: R,
    h: &Header,
    len: u64,
    filter: &Filter,
) -> Result<u64, DatasetError> {
    let mut judge = Judge::new(Some(filter), &[]);
    let plan = match h.descr {
        Descr::Object => {
            let mut inp = open_input(r, h)?;
            plan_object_count(path, &mut inp, h.shape[0], &mut judge)?
        }
        Descr::Numeric { .. } => {
            let rules = row_rules(path, h, Some(filter), &[])?;
            plan_numeric(path, r, h, len, &rules, &mut judge, u64::MAX)?.kept
        }
    };
    Ok(plan)
}
