//! Merging object arrays (`np.save(path, list_of_dicts, allow_pickle=True)`) without Python.
//!
//! numpy pickles such an array as
//! `_reconstruct(ndarray, (0,), b'b')` BUILT with the state `(1, (n,), dtype('O8'), False, [..])`.
//! Everything before the data list (the prologue) and after it (the epilogue) is evaluated by
//! [`Decoder`]; the elements' opcodes are copied into one output list, laid out as Python's
//! pickler writes the concatenation of the rounds once `np.load` has read them (what the legacy
//! tool saves), so rounds written by numpy 1.x merge into numpy 1.x's own bytes:
//! - the prologue memoizes as numpy 1.x's does (`BINPUT 0..13` below protocol 4), the
//!   epilogue memoizes the state tuple;
//! - memo writes get fresh output indices in output order (explicit `BINPUT`/`LONG_BINPUT`,
//!   or `MEMOIZE` when the output declares protocol 4) and memo reads follow a per-input
//!   table: loaded rounds are separate objects, so sharing stays within a round;
//! - except for objects CPython keeps as one ([`Shared`]: globals, empty and one-character
//!   strings, empty bytes), memoized once for the whole output and read after, the header's
//!   `'|'` and globals included;
//! - reads of other memo entries the input's prologue made are replaced by a fresh copy;
//! - the inputs' `MARK ... APPENDS` batches are dropped and the list batched afresh
//!   ([`Batches`]: 1000 per batch, a lone `APPEND` for a one-element list);
//! - `FRAME` and `PROTO` are dropped, since frame lengths no longer hold.
//!
//! Elements are found one append batch at a time: inside one `MARK ... APPENDS` batch the
//! elements are the stack entries above the mark; counting marks and items alike, no opcode
//! raises the depth by more than one, so the last point at which the depth was `1 + k` is
//! exactly where element `k` begins. Only one batch (pickle batches 1000 elements) is buffered.
//! Complete ops of a common form are scanned straight out of the read buffer; anything else
//! (an op cut by the buffer's end, a large payload, a malformed op) goes through
//! [`OpReader::next_op`], which also gives the errors.
//!
//! The parts: `translate.rs` rewrites one input's data-list opcodes for the output stream
//! ([`Translator`], [`Output`]); `copy.rs` copies a data list's first (or all) elements;
//! `inspect.rs` checks an object array and derives its schema; this file opens inputs, writes
//! the merged pickle's prologue and epilogue, and runs the merge.

mod copy;
mod inspect;
mod translate;

use std::io::{BufRead, BufReader, Read, Write};
use std::rc::Rc;

use super::header::{Descr, Header, write_header};
use super::{FormatError, MergeSummary};
use crate::pickle::{Decoder, Depth, Op, OpReader, Step, Value, emit, op};
pub(super) use copy::Batches;
use copy::{copy_prefix, finish_list};

pub(crate) use inspect::inspect;
pub(super) use translate::{Output, Shared, Translator, translate};

pub(super) const READ_BUF: usize = 1 << 16;

/// numpy 1.x writes `numpy.core.multiarray`; numpy 2 writes `numpy._core.multiarray`, which
/// numpy 1.26 also provides (as a stub for loading numpy 2 pickles).
pub(super) const CORE_MODULE_V1: &str = "numpy.core.multiarray";
pub(super) const CORE_MODULE_V2: &str = "numpy._core.multiarray";

/// One object-array input, positioned just after its data list was pushed.
pub(super) struct Input<R> {
    pub rd: OpReader<R>,
    pub dec: Decoder,
    /// Module of the input's `_reconstruct` global.
    pub module: String,
}

pub(super) fn open_input<R: BufRead>(r: R, h: &Header) -> Result<Input<R>, FormatError> {
    let mut rd = OpReader::with_base(r, h.data_offset);
    let mut dec = Decoder::default();
    loop {
        let Some(op) = rd.next_op()? else {
            return Err(ended_early(&rd));
        };
        match dec.apply(&op, &mut rd)? {
            Step::DataList => break,
            Step::Stop(_) => return Err(not_numpy_layout()),
            Step::Continue | Step::Elements => {}
        }
    }
    let (shape, module) = dec.array_layout().ok_or_else(not_numpy_layout)?;
    if shape != h.shape {
        return Err(FormatError::CountMismatch {
            what: format!(
                "pickled array shape {:?} vs npy header shape {:?}",
                shape, h.shape
            ),
            expected: h.shape.first().copied().unwrap_or(0),
            actual: shape.first().copied().unwrap_or(0),
        });
    }
    if dec.proto < 3 {
        return Err(FormatError::Unsupported {
            reason: format!(
                "pickle protocol {} (Python 2 era; names may need Python 2 mapping)",
                dec.proto
            ),
        });
    }
    Ok(Input { rd, dec, module })
}

pub(super) fn ended_early<R: BufRead>(rd: &OpReader<R>) -> FormatError {
    FormatError::Truncated {
        what: "pickle stream (ends before STOP)".into(),
        expected: rd.position() + 1,
        actual: rd.position(),
    }
}

pub(super) fn not_numpy_layout() -> FormatError {
    FormatError::Unsupported {
        reason: "object array pickle is not laid out the way numpy's ndarray.__reduce__ writes it"
            .into(),
    }
}

/// Checks the pickle's result is the array `_reconstruct` made, built from the data list.
pub(super) fn check_final(v: &Value, dec: &Decoder) -> Result<(), FormatError> {
    let ok = match (v, &dec.array) {
        (Value::Object(o), Some(arr)) if Rc::ptr_eq(o, arr) => matches!(
            &o.borrow().state,
            Some(Value::Tuple(t)) if t.items.len() == 5 && matches!(t.items[4], Value::DataList)
        ),
        _ => false,
    };
    if ok { Ok(()) } else { Err(not_numpy_layout()) }
}

/// Evaluates the epilogue (the opcode that ended the data list onwards), checks it builds the
/// array as numpy's does and that nothing follows it.
pub(super) fn finish_input<R: BufRead>(inp: &mut Input<R>, first: Op) -> Result<(), FormatError> {
    let mut next = Some(first);
    loop {
        let Some(op) = next else {
            return Err(ended_early(&inp.rd));
        };
        if let Step::Stop(v) = inp.dec.apply(&op, &mut inp.rd)? {
            check_final(&v, &inp.dec)?;
            if !inp.rd.at_eof()? {
                return Err(FormatError::TrailingData {
                    what: "object array (bytes after the pickle's STOP)".into(),
                    expected: inp.rd.position(),
                    actual: inp.rd.position() + 1,
                });
            }
            return Ok(());
        }
        next = inp.rd.next_op()?;
    }
}

/// The opening of the merged pickle, as numpy writes it for a fresh `(total,)` object array:
/// `_reconstruct(ndarray, (0,), b'b')`, then the state tuple up to its empty data list.
///
/// Below protocol 4 (numpy 1.x) the pickler memoizes as it goes: `BINPUT 0` to `12` after the
/// header's globals, strings, bytes, tuples and objects, `BINPUT 13` after the data list, so
/// elements start at [`header_memo`]`(proto)`. At protocol 4 the header carries no memo writes.
pub(super) fn prologue(proto: u8, module: &str, total: u64) -> Vec<u8> {
    let memo = proto < 4;
    let mut next = 0u32;
    let mut p = vec![op::PROTO, proto];
    let mut put = |p: &mut Vec<u8>| {
        if memo {
            emit::put(p, next);
            next += 1;
        }
    };
    emit::global(&mut p, module, "_reconstruct");
    put(&mut p);
    emit::global(&mut p, "numpy", "ndarray");
    put(&mut p);
    emit::int(&mut p, 0);
    p.push(op::TUPLE1);
    put(&mut p);
    emit::bytes(&mut p, b"b");
    put(&mut p);
    p.push(op::TUPLE3);
    put(&mut p);
    p.push(op::REDUCE);
    put(&mut p);
    p.push(op::MARK);
    emit::int(&mut p, 1);
    match i64::try_from(total) {
        Ok(t) => emit::int(&mut p, t),
        Err(_) => {
            let mut le = total.to_le_bytes().to_vec();
            le.push(0);
            emit::long(&mut p, &le);
        }
    }
    p.push(op::TUPLE1);
    put(&mut p);
    emit::global(&mut p, "numpy", "dtype");
    put(&mut p);
    emit::unicode(&mut p, "O8");
    put(&mut p);
    p.extend_from_slice(&[op::NEWFALSE, op::NEWTRUE, op::TUPLE3]);
    put(&mut p);
    p.push(op::REDUCE);
    put(&mut p);
    p.push(op::MARK);
    // dtype('O').__reduce__()[2]: (version, byteorder, subarray, names, fields, elsize,
    // alignment, flags).
    emit::int(&mut p, 3);
    emit::unicode(&mut p, "|");
    put(&mut p);
    p.extend_from_slice(&[op::NONE, op::NONE, op::NONE]);
    emit::int(&mut p, -1);
    emit::int(&mut p, -1);
    emit::int(&mut p, 63);
    p.push(op::TUPLE);
    put(&mut p);
    p.extend_from_slice(&[op::BUILD, op::NEWFALSE, op::EMPTY_LIST]);
    put(&mut p);
    p
}

/// The first memo index the elements get after [`prologue`]`(proto, ..)`.
pub(super) fn header_memo(proto: u8) -> u32 {
    if proto < 4 { 14 } else { 0 }
}

/// The objects of [`prologue`]`(proto, module, ..)` that elements may share, by memo index:
/// the pickler writes a read of these wherever an element holds the same object (the globals,
/// and `'|'`, a one-character string, which CPython keeps as one object).
pub(super) fn header_shared(proto: u8, module: &str) -> Vec<(Shared, u32)> {
    if proto >= 4 {
        return Vec::new();
    }
    let g = |m: &str, n: &str| Shared::Global(m.into(), n.into());
    vec![
        (g(module, "_reconstruct"), 0),
        (g("numpy", "ndarray"), 1),
        (g("numpy", "dtype"), 7),
        (Shared::Str("|".into()), 11),
    ]
}

/// Closes the state tuple (memoized, as the pickler does every tuple), builds the array, ends
/// the pickle.
pub(super) fn epilogue(tr: &mut Translator) -> Result<Vec<u8>, FormatError> {
    let mut e = vec![op::TUPLE];
    tr.put_fresh(&mut e)?;
    e.extend_from_slice(&[op::BUILD, op::STOP]);
    Ok(e)
}

/// Which entry of the body's stack an `APPEND`/`APPENDS` closes a unit of the data list with,
/// and how many elements it appends.
pub(super) fn unit_end(code: u8, d: &Depth) -> Option<u64> {
    match code {
        op::APPENDS if d.marks.last() == Some(&0) => Some(d.depth as u64 - 1),
        op::APPEND if d.depth == 1 && d.marks.is_empty() => Some(1),
        _ => None,
    }
}

pub(super) fn stack_error(op: &Op, reason: String) -> FormatError {
    FormatError::BadPickle {
        offset: op.offset,
        reason,
    }
}

pub(super) fn element_count(expected: u64, actual: u64) -> FormatError {
    FormatError::CountMismatch {
        what: "elements in the pickled data list vs npy header shape".into(),
        expected,
        actual,
    }
}

pub(super) fn kind_name(h: &Header) -> String {
    match &h.descr {
        Descr::Object => "an object array".into(),
        d => format!("a numeric array of {}", d.display()),
    }
}

/// Merges object-array inputs; `first` is input 0, already opened and its header read.
pub(crate) fn merge<R: Read, W: Write>(
    counts: &[u64],
    total: u64,
    mut open: impl FnMut(usize) -> std::io::Result<R>,
    first: (R, Header),
    out: W,
) -> Result<MergeSummary, FormatError> {
    let mut out = Output::new(out);
    let mut used = vec![0u64; counts.len()];
    let mut written = 0u64;
    let mut tr = None;
    let mut batches = Batches::new(total);
    let mut first = Some(first);
    for (i, &count) in counts.iter().enumerate() {
        if i > 0 && written == total {
            break;
        }
        let in_input = |e: FormatError| FormatError::in_input(i, e);
        let (r, h) = match first.take() {
            Some(f) => f,
            None => {
                let mut r = open(i).map_err(|e| in_input(e.into()))?;
                let h = super::header::read_header(&mut r).map_err(in_input)?;
                (r, h)
            }
        };
        if h.descr != Descr::Object {
            return Err(FormatError::Mismatch {
                input: i,
                what: format!("input 0 is an object array, this one is {}", kind_name(&h)),
            });
        }
        if h.shape.len() != 1 {
            return Err(in_input(FormatError::Unsupported {
                reason: format!("object array of shape {:?} (only 1-D merges)", h.shape),
            }));
        }
        if h.shape[0] != count {
            return Err(in_input(FormatError::CountMismatch {
                what: "committed sample count vs npy header shape".into(),
                expected: count,
                actual: h.shape[0],
            }));
        }
        let mut inp = open_input(BufReader::with_capacity(READ_BUF, r), &h).map_err(in_input)?;
        if i == 0 {
            // The output must start before later inputs are read, so input 0 decides:
            // - the `_reconstruct` module: numpy 1's path when input 0 came from numpy 1 (then
            //   the file loads wherever input 0 did, numpy < 1.26 included; numpy 2 imports
            //   `numpy.core.multiarray._reconstruct` without a warning for old pickles), else
            //   numpy 2's, which numpy 1.26 also loads without a warning;
            // - the declared protocol. Unpicklers accept any opcode whatever PROTO says; the
            //   number only switches Python 2 name mapping (below 3), refused above.
            let module = if inp.module == CORE_MODULE_V1 {
                CORE_MODULE_V1
            } else {
                CORE_MODULE_V2
            };
            out.write_all(&write_header(&Descr::Object, &[total])?)?;
            out.write_all(&prologue(inp.dec.proto, module, total))?;
            tr = Some(Translator::new(inp.dec.proto, module));
        }
        let Some(tr) = tr.as_mut() else {
            return Err(not_numpy_layout());
        };
        tr.start_input(&inp.dec);
        let take = count.min(total - written);
        copy_prefix(&mut inp, tr, &mut batches, take, &mut out).map_err(in_input)?;
        if take == count {
            finish_list(&mut inp, tr, count).map_err(in_input)?;
        }
        used[i] = take;
        written += take;
    }
    let Some(tr) = tr.as_mut() else {
        return Err(not_numpy_layout());
    };
    batches.finish(&mut out.buf);
    let tail = epilogue(tr)?;
    out.write_all(&tail)?;
    out.flush()?;
    let bytes_written = out.n;
    Ok(MergeSummary {
        samples: written,
        bytes_written,
        used_per_input: used,
    })
}
