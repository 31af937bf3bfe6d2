//! Merging object arrays (`np.save(path, list_of_dicts, allow_pickle=True)`) without Python.
//!
//! numpy pickles such an array as
//! `_reconstruct(ndarray, (0,), b'b')` BUILT with the state `(1, (n,), dtype('O8'), False, [..])`.
//! Everything before the data list (the prologue) and after it (the epilogue) is evaluated by
//! [`Decoder`]; the opcodes that append elements to the list are copied verbatim into one
//! output list, with three rewrites that keep them meaningful in the new stream:
//! - memo writes get fresh output indices 0, 1, 2, ... in output order (explicit
//!   `BINPUT`/`LONG_BINPUT`, or `MEMOIZE` when the output declares protocol 4: the output memo
//!   is dense, so its length is the next index) and memo reads follow a per-input table;
//! - reads of memo entries the input's prologue made (numpy 2 reuses its module-name string,
//!   numpy 1 its `numpy dtype` global) are replaced by a fresh copy of that value;
//! - `FRAME` and `PROTO` are dropped, since frame lengths no longer hold.
//!
//! Almost every op of a numpy pickle is a few bytes and needs no rewriting, so the copy works
//! straight out of the read buffer: complete ops of a common form are scanned there (argument
//! lengths and stack effects are table lookups) and unchanged stretches are copied as one
//! slice; anything else (an op cut by the buffer's end, a large payload, a read of the
//! prologue's memo, a malformed op) goes one at a time through [`OpReader::next_op`], which
//! also gives the errors. Both paths write the same bytes.
//!
//! Cutting an input short needs element boundaries. Inside one `MARK ... APPENDS` batch the
//! elements are the stack entries above the mark; counting marks and items alike, no opcode
//! raises the depth by more than one, so the last point at which the depth was `1 + k` is
//! exactly where element `k` begins. Only the input that gets cut is buffered, one batch at a
//! time (pickle batches 1000 elements).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::rc::Rc;

use super::header::{Descr, Header, write_header};
use super::memo::IndexMap32;
use super::pickle::{Depth, Op, OpReader, complete_len, emit, op};
use super::value::{Call, Decoder, KeySet, Kind, Obj, Step, Value, is_bare, memo_index};
use super::{ArrayKind, FormatError, Inspection, MergeSummary};

pub(super) const READ_BUF: usize = 1 << 16;
const WRITE_BUF: usize = 1 << 18;

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

/// Marks, in [`Translator::map`], an input memo index that holds the input's data list, which
/// has no counterpart an element could sensibly refer to. Output indices stay below it.
const DATA_LIST: u32 = u32::MAX - 1;

/// Marks, in [`Translator::map`], an input memo index written by an element a filtered merge
/// leaves out of the output (see `select.rs`), which no element in the output may read.
pub(super) const DROPPED: u32 = u32::MAX - 2;

/// Rewrites one input's data-list opcodes for the output stream.
pub(super) struct Translator {
    /// Next free output memo index; shared by all inputs.
    next_out: u64,
    /// Input memo index -> output memo index (or [`DATA_LIST`]).
    map: IndexMap32,
    /// The input's own `len(memo)`, which is what its `MEMOIZE`s write to.
    in_len: u32,
    /// Write memo entries with `MEMOIZE` rather than `BINPUT`/`LONG_BINPUT`; see
    /// [`put`].
    pub memoize: bool,
    scratch: Vec<u8>,
}

impl Translator {
    pub fn new() -> Self {
        Translator {
            next_out: 0,
            map: IndexMap32::default(),
            in_len: 0,
            memoize: false,
            scratch: Vec::new(),
        }
    }

    /// [`Translator::copy_op`] for what is common in a data list: a memo write, a memo read of
    /// an entry this input's elements made (or the prologue entry already copied), a `FRAME`.
    /// `bytes` is the whole op; whatever replaces it goes to `out`. Returns false, having
    /// changed nothing, for a read `copy_op` must handle (an entry of the prologue, the data
    /// list itself, one never written) or a `FRAME` whose length is out of range.
    #[inline]
    fn rewrite_fast(
        &mut self,
        bytes: &[u8],
        dec: &Decoder,
        out: &mut Vec<u8>,
    ) -> Result<bool, FormatError> {
        let arg = |b: &[u8]| match *b {
            [_, i] => u32::from(i),
            [_, a, b, c, d, ..] => u32::from_le_bytes([a, b, c, d]),
            _ => 0,
        };
        match bytes[0] {
            op::BINGET | op::LONG_BINGET => match self.map.get(arg(bytes)) {
                Some(o) if o < DROPPED => {
                    emit::get(out, o);
                    Ok(true)
                }
                _ => Ok(false),
            },
            code @ (op::BINPUT | op::LONG_BINPUT | op::MEMOIZE) => {
                let idx = if code == op::MEMOIZE {
                    self.in_len
                } else {
                    arg(bytes)
                };
                let o = self.fresh()?;
                self.define(dec, idx, o);
                put(out, o, self.memoize);
                Ok(true)
            }
            // Dropped: frame lengths no longer hold. One past i64::MAX is an error `next_op`
            // reports.
            op::FRAME => Ok(bytes.get(8).is_some_and(|&b| b < 0x80)),
            _ => Ok(false),
        }
    }

    pub fn start_input(&mut self, dec: &Decoder) {
        self.map = IndexMap32::default();
        self.in_len = dec.memo.len();
    }

    fn fresh(&mut self) -> Result<u32, FormatError> {
        let idx = u32::try_from(self.next_out)
            .ok()
            .filter(|&i| i < DROPPED)
            .ok_or_else(|| FormatError::Unsupported {
                reason: "merged pickle needs more than 2^32 - 2 memo entries".into(),
            })?;
        self.next_out += 1;
        Ok(idx)
    }

    fn define(&mut self, dec: &Decoder, idx: u32, slot: u32) {
        if self.map.get(idx).is_none() && !dec.memo.contains(idx) {
            self.in_len += 1;
        }
        self.map.insert(idx, slot);
    }

    /// A memo write at the data list's own level memoizes the list itself.
    pub fn memoize_list<R: BufRead>(
        &mut self,
        op: &Op,
        rd: &OpReader<R>,
        dec: &Decoder,
    ) -> Result<(), FormatError> {
        let idx = if op.code == op::MEMOIZE {
            self.in_len
        } else {
            memo_index(op, rd)?
        };
        self.define(dec, idx, DATA_LIST);
        Ok(())
    }

    /// Accounts for the ops of an element left out of the output (`s`, whole ops): its memo
    /// writes take no output index and are marked [`DROPPED`]; everything else is ignored.
    pub fn skip(&mut self, s: &[u8], dec: &Decoder) -> Result<(), FormatError> {
        let mut rd = OpReader::with_base(s, 0);
        while let Some(op) = rd.next_op()? {
            if matches!(
                op.code,
                op::PUT | op::BINPUT | op::LONG_BINPUT | op::MEMOIZE
            ) {
                let idx = if op.code == op::MEMOIZE {
                    self.in_len
                } else {
                    memo_index(&op, &rd)?
                };
                self.define(dec, idx, DROPPED);
            }
        }
        Ok(())
    }

    fn copy_op<R: BufRead, W: Write>(
        &mut self,
        op: &Op,
        rd: &mut OpReader<R>,
        dec: &Decoder,
        out: &mut W,
    ) -> Result<(), FormatError> {
        match op.code {
            op::FRAME | op::PROTO => Ok(()),
            op::PUT | op::BINPUT | op::LONG_BINPUT | op::MEMOIZE => {
                let idx = if op.code == op::MEMOIZE {
                    self.in_len
                } else {
                    memo_index(op, rd)?
                };
                let o = self.fresh()?;
                self.define(dec, idx, o);
                self.scratch.clear();
                put(&mut self.scratch, o, self.memoize);
                out.write_all(&self.scratch)?;
                Ok(())
            }
            op::GET | op::BINGET | op::LONG_BINGET => {
                let idx = memo_index(op, rd)?;
                self.scratch.clear();
                match self.map.get(idx) {
                    Some(DATA_LIST) => {
                        return Err(FormatError::Unsupported {
                            reason: format!(
                                "element at byte {} refers to the array's own data list",
                                op.offset
                            ),
                        });
                    }
                    Some(DROPPED) => {
                        return Err(FormatError::BadPickle {
                            offset: op.offset,
                            reason: format!(
                                "memo entry {idx} is read here but was written by an element \
                                 the filter left out"
                            ),
                        });
                    }
                    None => {
                        let v = dec.memo.get(idx).ok_or_else(|| FormatError::BadPickle {
                            offset: op.offset,
                            reason: format!("memo entry {idx} read before it is written"),
                        })?;
                        emit_value(&mut self.scratch, &v, dec.array.as_ref(), 0).map_err(
                            |what| FormatError::Unsupported {
                                reason: format!(
                                    "element at byte {} reuses memo entry {idx} from the pickle's \
                                     prologue, {what}, which cannot be copied",
                                    op.offset
                                ),
                            },
                        )?;
                        // Later reads of the same entry in this input share the copy.
                        let o = self.fresh()?;
                        put(&mut self.scratch, o, self.memoize);
                        self.map.insert(idx, o);
                    }
                    Some(o) => emit::get(&mut self.scratch, o),
                }
                out.write_all(&self.scratch)?;
                Ok(())
            }
            _ => {
                out.write_all(rd.head())?;
                rd.copy_payload(out)
            }
        }
    }
}

/// Writes output memo entry `o`, just taken from [`Translator::fresh`]. Output indices are
/// handed out 0, 1, 2, ... in the order their writes appear in the output, and the prologue
/// writes none, so `o` is always the output's `len(memo)`: exactly the entry `MEMOIZE` writes.
/// With `memoize` (the output declares protocol 4 or later) that takes 1 byte where
/// `LONG_BINPUT` takes 5; older protocols predate `MEMOIZE`, so they get the explicit index.
fn put(out: &mut Vec<u8>, o: u32, memoize: bool) {
    if memoize {
        out.push(op::MEMOIZE);
    } else {
        emit::put(out, o);
    }
}

/// Writes opcodes that rebuild `v`, a value the prologue made. Only immutable values (and
/// calls on them) qualify: a copy of anything mutable would break sharing.
fn emit_value(
    out: &mut Vec<u8>,
    v: &Value,
    array: Option<&Rc<RefCell<Obj>>>,
    depth: u32,
) -> Result<(), String> {
    if depth > 32 {
        return Err("a value nested too deeply".into());
    }
    match v {
        Value::None => out.push(op::NONE),
        Value::Bool(true) => out.push(op::NEWTRUE),
        Value::Bool(false) => out.push(op::NEWFALSE),
        Value::Int(n) => emit::int(out, *n),
        Value::BigInt(b) => emit::long(out, b),
        Value::Float(f) => {
            out.push(op::BINFLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => emit::unicode(out, s),
        Value::Bytes(b) => emit::bytes(out, b),
        Value::Global(g) => emit::global(out, &g.0, &g.1),
        Value::Tuple(t) => {
            let n = t.items.len();
            if n == 0 {
                out.push(op::EMPTY_TUPLE);
                return Ok(());
            }
            if n > 3 {
                out.push(op::MARK);
            }
            for it in &t.items {
                emit_value(out, it, array, depth + 1)?;
            }
            out.push(match n {
                1 => op::TUPLE1,
                2 => op::TUPLE2,
                3 => op::TUPLE3,
                _ => op::TUPLE,
            });
        }
        Value::FrozenSet(s) => {
            out.push(op::MARK);
            for it in &s.items {
                emit_value(out, it, array, depth + 1)?;
            }
            out.push(op::FROZENSET);
        }
        Value::Object(o) => {
            if array.is_some_and(|a| Rc::ptr_eq(a, o)) {
                return Err("the array being unpickled".into());
            }
            let o = o.borrow();
            let code = match o.call {
                Call::Reduce => op::REDUCE,
                Call::NewObj => op::NEWOBJ,
                Call::Other => return Err("an object built by INST/OBJ/NEWOBJ_EX".into()),
            };
            emit_value(out, &o.callable, array, depth + 1)?;
            emit_value(out, &o.args, array, depth + 1)?;
            out.push(code);
            if let Some(state) = &o.state {
                emit_value(out, state, array, depth + 1)?;
                out.push(op::BUILD);
            }
        }
        other => return Err(format!("a {}", other.type_name())),
    }
    Ok(())
}

/// The merged file on its way out. Bytes gather in `buf`, which the fast paths append to
/// directly (a `BufWriter` would cost a call per op), and go to `inner` in large writes; `n`
/// counts the bytes written.
pub(super) struct Output<W> {
    inner: W,
    pub buf: Vec<u8>,
    pub n: u64,
}

impl<W: Write> Output<W> {
    pub fn new(inner: W) -> Self {
        Output {
            inner,
            buf: Vec::with_capacity(2 * WRITE_BUF),
            n: 0,
        }
    }

    /// Writes `buf` out once it holds enough for one large write.
    pub fn spill(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= WRITE_BUF {
            self.drain()?;
        }
        Ok(())
    }

    fn drain(&mut self) -> std::io::Result<()> {
        self.inner.write_all(&self.buf)?;
        self.n += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

/// For the general path ([`Translator::copy_op`], payloads streamed by `io::copy`): what it
/// writes lands in order with what the fast paths append.
impl<W: Write> Write for Output<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        self.spill()?;
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.drain()?;
        self.inner.flush()
    }
}

/// The opening of the merged pickle, as numpy writes it for a fresh `(total,)` object array:
/// `_reconstruct(ndarray, (0,), b'b')`, then the state tuple up to its empty data list.
pub(super) fn prologue(proto: u8, module: &str, total: u64) -> Vec<u8> {
    let mut p = vec![op::PROTO, proto];
    emit::global(&mut p, module, "_reconstruct");
    emit::global(&mut p, "numpy", "ndarray");
    emit::int(&mut p, 0);
    p.push(op::TUPLE1);
    emit::bytes(&mut p, b"b");
    p.extend_from_slice(&[op::TUPLE3, op::REDUCE, op::MARK]);
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
    emit::global(&mut p, "numpy", "dtype");
    emit::unicode(&mut p, "O8");
    p.extend_from_slice(&[op::NEWFALSE, op::NEWTRUE, op::TUPLE3, op::REDUCE, op::MARK]);
    // dtype('O').__reduce__()[2]: (version, byteorder, subarray, names, fields, elsize,
    // alignment, flags).
    emit::int(&mut p, 3);
    emit::unicode(&mut p, "|");
    p.extend_from_slice(&[op::NONE, op::NONE, op::NONE]);
    emit::int(&mut p, -1);
    emit::int(&mut p, -1);
    emit::int(&mut p, 63);
    p.extend_from_slice(&[op::TUPLE, op::BUILD, op::NEWFALSE, op::EMPTY_LIST]);
    p
}

/// Closes the state tuple, builds the array, ends the pickle.
pub(super) const EPILOGUE: [u8; 3] = [op::TUPLE, op::BUILD, op::STOP];

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

/// Whether the fast paths hand `code` to [`Translator::rewrite_fast`] rather than copy it.
fn rewritten(code: u8) -> bool {
    matches!(
        code,
        op::BINGET | op::LONG_BINGET | op::BINPUT | op::LONG_BINPUT | op::MEMOIZE | op::FRAME
    )
}

/// Copies a whole data list, checking it holds `expected` elements; returns the opcode that
/// ended it (the first of the epilogue).
///
/// [`copy_run`] takes ops straight out of the read buffer for as long as it can; the op it
/// stops at (cut by the buffer's end, or not a plain element op) goes the general way, one
/// [`OpReader::next_op`] at a time, and then the fast path resumes.
fn copy_whole<R: BufRead, W: Write>(
    inp: &mut Input<R>,
    tr: &mut Translator,
    expected: u64,
    out: &mut Output<W>,
) -> Result<Op, FormatError> {
    let mut d = Depth::default();
    let mut count = 0u64;
    loop {
        let buf = inp.rd.buffered()?;
        let done = copy_run(buf, &mut d, &mut count, tr, &inp.dec, &mut out.buf)?;
        inp.rd.consume(done);
        out.spill()?;

        let Some(op) = inp.rd.next_op()? else {
            return Err(ended_early(&inp.rd));
        };
        if d.depth == 0 {
            match op.code {
                op::FRAME => continue,
                op::PUT | op::BINPUT | op::LONG_BINPUT | op::MEMOIZE => {
                    tr.memoize_list(&op, &inp.rd, &inp.dec)?;
                    continue;
                }
                _ => {}
            }
        }
        let end = unit_end(op.code, &d);
        if !d.apply(op.code).map_err(|r| stack_error(&op, r))? {
            if count != expected {
                return Err(element_count(expected, count));
            }
            return Ok(op);
        }
        tr.copy_op(&op, &mut inp.rd, &inp.dec, out)?;
        count += end.unwrap_or(0);
    }
}

/// The fast path of [`copy_whole`]: copies the ops at the start of `s` (the read buffer) to
/// `out`, each unchanged stretch as one slice, and returns how many bytes it used. It stops
/// before, and changes nothing for, the first op it cannot take on its own: one cut by the
/// end of `s` or that [`complete_len`] leaves to `next_op`, a read [`Translator::rewrite_fast`]
/// leaves to `copy_op`, a memo write or `FRAME` at the list's own level (which the caller
/// drops), and one [`Depth::apply_fast`] refuses (the end of the list, or a stack error).
fn copy_run(
    s: &[u8],
    d: &mut Depth,
    count: &mut u64,
    tr: &mut Translator,
    dec: &Decoder,
    out: &mut Vec<u8>,
) -> Result<usize, FormatError> {
    // `s[run..i]` is copied but not yet written.
    let (mut i, mut run) = (0, 0);
    while let Some(len) = complete_len(&s[i..]) {
        let code = s[i];
        if rewritten(code) {
            if d.depth == 0 && !matches!(code, op::BINGET | op::LONG_BINGET) {
                break;
            }
            out.extend_from_slice(&s[run..i]);
            run = i;
            if !tr.rewrite_fast(&s[i..i + len], dec, out)? {
                break;
            }
            run = i + len;
            // What `apply` would do: reads push an item; writes and frames leave the stack be.
            if matches!(code, op::BINGET | op::LONG_BINGET) {
                d.depth += 1;
            }
        } else {
            let end = unit_end(code, d);
            if !d.apply_fast(code) {
                break;
            }
            *count += end.unwrap_or(0);
        }
        i += len;
    }
    out.extend_from_slice(&s[run..i]);
    Ok(i)
}

pub(super) fn element_count(expected: u64, actual: u64) -> FormatError {
    FormatError::CountMismatch {
        what: "elements in the pickled data list vs npy header shape".into(),
        expected,
        actual,
    }
}

/// The unit of the data list (one `MARK ... APPENDS` batch, or one item and its `APPEND`)
/// that [`copy_prefix`] is reading, with its ops' bytes.
#[derive(Default)]
struct Unit {
    d: Depth,
    bytes: Vec<u8>,
    /// `last_at[l]`: offset in `bytes` after the last opcode that left the depth at `l`.
    last_at: Vec<usize>,
}

impl Unit {
    /// Starts a unit: called on each op at the list's own level that is not dropped.
    fn begin(&mut self) {
        self.bytes.clear();
        self.last_at.clear();
        self.last_at.push(0);
    }

    /// Records the op just appended to `bytes` and applied to `d`.
    fn op_done(&mut self) {
        if self.last_at.len() <= self.d.depth {
            self.last_at.resize(self.d.depth + 1, 0);
        }
        self.last_at[self.d.depth] = self.bytes.len();
    }

    /// Copies the unit just closed, which appends `n` elements, or only its first `room` when
    /// fewer, cutting the batch there and closing it with `APPENDS`. Returns the number copied.
    /// `at` is the offset of the closing op, for errors.
    fn emit<W: Write>(
        &self,
        n: u64,
        room: u64,
        at: u64,
        tr: &mut Translator,
        dec: &Decoder,
        out: &mut Output<W>,
    ) -> Result<u64, FormatError> {
        let k = n.min(room);
        let cut = if k == n {
            self.bytes.len()
        } else {
            // k < n only happens for a MARK batch, where the depth passed every 1 + k.
            self.last_at
                .get(1 + k as usize)
                .copied()
                .ok_or_else(|| FormatError::BadPickle {
                    offset: at,
                    reason: "bad batch".into(),
                })?
        };
        translate(&self.bytes[..cut], tr, dec, out)?;
        if k < n {
            out.buf.push(op::APPENDS);
        }
        Ok(k)
    }
}

/// Copies the first `take` elements of a data list, one buffered unit at a time, and stops
/// reading there. Like [`copy_whole`], it takes complete common ops straight out of the read
/// buffer and leaves the rest to `next_op`.
fn copy_prefix<R: BufRead, W: Write>(
    inp: &mut Input<R>,
    tr: &mut Translator,
    take: u64,
    out: &mut Output<W>,
) -> Result<(), FormatError> {
    let mut u = Unit::default();
    let mut taken = 0u64;
    while taken < take {
        // No payload is left unread here, so this is where `buffered` starts.
        let base = inp.rd.position();
        let s = inp.rd.buffered()?;
        let mut i = 0;
        while taken < take
            && let Some(len) = complete_len(&s[i..])
        {
            let code = s[i];
            if u.d.depth == 0 {
                if matches!(code, op::FRAME | op::BINPUT | op::LONG_BINPUT | op::MEMOIZE) {
                    break;
                }
                u.begin();
            }
            let end = unit_end(code, &u.d);
            if !u.d.apply_fast(code) {
                break;
            }
            u.bytes.extend_from_slice(&s[i..i + len]);
            u.op_done();
            if let Some(n) = end {
                taken += u.emit(n, take - taken, base + i as u64, tr, &inp.dec, out)?;
            }
            i += len;
        }
        inp.rd.consume(i);
        if taken == take {
            break;
        }

        let Some(op) = inp.rd.next_op()? else {
            return Err(ended_early(&inp.rd));
        };
        if u.d.depth == 0 {
            match op.code {
                op::FRAME => continue,
                op::PUT | op::BINPUT | op::LONG_BINPUT | op::MEMOIZE => {
                    tr.memoize_list(&op, &inp.rd, &inp.dec)?;
                    continue;
                }
                _ => u.begin(),
            }
        }
        let end = unit_end(op.code, &u.d);
        if !u.d.apply(op.code).map_err(|r| stack_error(&op, r))? {
            return Err(element_count(take, taken));
        }
        u.bytes.extend_from_slice(inp.rd.head());
        inp.rd.copy_payload(&mut u.bytes)?;
        u.op_done();
        if let Some(n) = end {
            taken += u.emit(n, take - taken, op.offset, tr, &inp.dec, out)?;
        }
    }
    Ok(())
}

/// Copies whole buffered ops (payloads included) to `out`, rewritten as
/// [`Translator::copy_op`] would, unchanged stretches as one slice each.
pub(super) fn translate<W: Write>(
    s: &[u8],
    tr: &mut Translator,
    dec: &Decoder,
    out: &mut Output<W>,
) -> Result<(), FormatError> {
    // `s[run..i]` is copied but not yet written.
    let (mut i, mut run) = (0, 0);
    while i < s.len() {
        if let Some(len) = complete_len(&s[i..]) {
            if !rewritten(s[i]) {
                i += len;
                continue;
            }
            out.buf.extend_from_slice(&s[run..i]);
            run = i;
            if tr.rewrite_fast(&s[i..i + len], dec, &mut out.buf)? {
                i += len;
                run = i;
                out.spill()?;
                continue;
            }
        }
        out.buf.extend_from_slice(&s[run..i]);
        let mut rd = OpReader::with_base(&s[i..], i as u64);
        let Some(op) = rd.next_op()? else { break };
        tr.copy_op(&op, &mut rd, dec, out)?;
        i = rd.position() as usize;
        run = i;
        out.spill()?;
    }
    out.buf.extend_from_slice(&s[run..]);
    out.spill()?;
    Ok(())
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
    let mut tr = Translator::new();
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
            tr.memoize = inp.dec.proto >= 4;
        }
        tr.start_input(&inp.dec);
        let take = count.min(total - written);
        if take == count {
            let end = copy_whole(&mut inp, &mut tr, count, &mut out).map_err(in_input)?;
            finish_input(&mut inp, end).map_err(in_input)?;
        } else {
            copy_prefix(&mut inp, &mut tr, take, &mut out).map_err(in_input)?;
        }
        used[i] = take;
        written += take;
    }
    out.write_all(&EPILOGUE)?;
    out.flush()?;
    let bytes_written = out.n;
    Ok(MergeSummary {
        samples: written,
        bytes_written,
        used_per_input: used,
    })
}

/// Drops what later elements cannot need from a finished element's memo entries: dicts keep
/// their key sets (a later element may be the same dict again), and strings, bytes and tuples
/// survive only if they are among element 0's keys (later dicts may reuse them as keys).
struct Compactor {
    reference: Option<Rc<KeySet>>,
    interned: HashMap<KeySet, Rc<KeySet>>,
    /// Whether any reference key is shown quoted, as bytes, as a tuple: when not, no value of
    /// that sort can be a key, and its repr need not be built to find out.
    quoted_keys: bool,
    bytes_keys: bool,
    tuple_keys: bool,
}

impl Compactor {
    fn new() -> Self {
        Compactor {
            reference: None,
            interned: HashMap::new(),
            quoted_keys: false,
            bytes_keys: false,
            tuple_keys: false,
        }
    }

    fn set_reference(&mut self, keys: Option<KeySet>) {
        let starts = |p: &[&str]| {
            keys.as_ref()
                .is_some_and(|k| k.iter().any(|key| p.iter().any(|p| key.starts_with(p))))
        };
        self.quoted_keys = starts(&["'", "\""]);
        self.bytes_keys = starts(&["b'", "b\""]);
        self.tuple_keys = starts(&["("]);
        self.reference = keys.map(Rc::new);
    }

    fn compact(&mut self, v: &Value) -> Value {
        let is_key = |v: &Value| self.reference.as_ref().is_some_and(|r| v.key_in(r));
        let maybe_key = match v {
            Value::Str(s) => s.len() <= 256 && (self.quoted_keys || is_bare(s)),
            Value::Bytes(b) => b.len() <= 256 && self.bytes_keys,
            Value::Tuple(_) => self.tuple_keys,
            _ => false,
        };
        match v {
            Value::None
            | Value::Bool(_)
            | Value::Int(_)
            | Value::Float(_)
            | Value::Global(_)
            | Value::Opaque(_)
            | Value::Keys(_)
            | Value::DataList => v.clone(),
            Value::Str(_) | Value::Bytes(_) | Value::Tuple(_) if maybe_key && is_key(v) => {
                v.clone()
            }
            Value::BigInt(_) => Value::Opaque(Kind::Int),
            Value::Str(_) => Value::Opaque(Kind::Str),
            Value::Bytes(_) => Value::Opaque(Kind::Bytes),
            Value::Tuple(_) => Value::Opaque(Kind::Tuple),
            Value::Dict(_) => {
                if let Some(r) = &self.reference
                    && v.has_keys(r) == Some(true)
                {
                    return Value::Keys(r.clone());
                }
                let keys = v.dict_keys().unwrap_or_default();
                let rc = self
                    .interned
                    .entry(keys.clone())
                    .or_insert_with(|| Rc::new(keys));
                Value::Keys(rc.clone())
            }
            Value::List(_) => Value::Opaque(Kind::List),
            Value::Set(_) => Value::Opaque(Kind::Set),
            Value::FrozenSet(_) => Value::Opaque(Kind::FrozenSet),
            Value::Object(_) => Value::Opaque(Kind::Object),
        }
    }
}

fn keys_display(k: &KeySet) -> String {
    let v: Vec<&str> = k.iter().map(String::as_str).collect();
    format!("[{}]", v.join(", "))
}

/// Scans a whole object-array pickle: checks its structure and element count and that all
/// elements are dicts with one key set (or none is a dict), and derives the schema.
pub(crate) fn inspect<R: BufRead>(
    r: R,
    h: &Header,
    file_len: u64,
) -> Result<Inspection, FormatError> {
    if h.shape.len() != 1 {
        return Err(FormatError::Unsupported {
            reason: format!(
                "object array of shape {:?} (only 1-D is supported)",
                h.shape
            ),
        });
    }
    let mut inp = open_input(r, h)?;
    let mut comp = Compactor::new();
    let mut count = 0u64;
    let mut first_kind = String::new();
    loop {
        let Some(op) = inp.rd.next_op()? else {
            return Err(ended_early(&inp.rd));
        };
        match inp.dec.apply(&op, &mut inp.rd)? {
            Step::Elements => {
                for el in inp.dec.take_elements() {
                    if count == 0 {
                        first_kind = el.type_name();
                        comp.set_reference(el.dict_keys());
                    } else {
                        // The cheap test passes for every well-formed element; only a
                        // mismatch pays for building the key set.
                        let reference = comp.reference.as_deref();
                        if reference.and_then(|r| el.has_keys(r)) != Some(true) {
                            check_element(count, &el, el.dict_keys(), reference, &first_kind)?;
                        }
                    }
                    count += 1;
                }
                inp.dec.compact_memo(|v| comp.compact(v));
            }
            Step::Stop(v) => {
                check_final(&v, &inp.dec)?;
                break;
            }
            Step::DataList | Step::Continue => {}
        }
    }
    let expected = h.shape[0];
    if count != expected {
        return Err(element_count(expected, count));
    }
    let end = inp.rd.position();
    if end != file_len {
        return Err(FormatError::TrailingData {
            what: "object array (bytes after the pickle's STOP)".into(),
            expected: end,
            actual: file_len,
        });
    }
    let schema = match (comp.reference.as_deref(), count) {
        (_, 0) => "npy object empty".to_string(),
        (Some(k), _) => format!("npy object dict keys {}", keys_display(k)),
        (None, _) => "npy object values".to_string(),
    };
    Ok(Inspection {
        count,
        schema,
        kind: ArrayKind::Object,
        data_offset: h.data_offset,
    })
}

fn check_element(
    index: u64,
    el: &Value,
    keys: Option<KeySet>,
    reference: Option<&KeySet>,
    first_kind: &str,
) -> Result<(), FormatError> {
    let reason = match (reference, keys) {
        (Some(r), Some(k)) if *r != k => {
            let missing: Vec<&str> = r.difference(&k).map(String::as_str).collect();
            let extra: Vec<&str> = k.difference(r).map(String::as_str).collect();
            format!(
                "keys {} differ from element 0's {} (missing [{}], extra [{}])",
                keys_display(&k),
                keys_display(r),
                missing.join(", "),
                extra.join(", ")
            )
        }
        (Some(_), None) => format!("it is a {}, element 0 is a dict", el.type_name()),
        (None, Some(_)) => format!("it is a dict, element 0 is a {first_kind}"),
        _ => return Ok(()),
    };
    Err(FormatError::InconsistentElements { index, reason })
}
