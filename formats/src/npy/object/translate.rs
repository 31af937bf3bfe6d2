//! Rewriting one object-array input's data-list opcodes for the merged stream: memo writes
//! renumbered densely in output order, memo reads following a per-input table, reads of the
//! input's prologue replaced by a fresh copy of the value, `FRAME` and `PROTO` dropped (see
//! the parent module's docs); objects CPython keeps as one (see [`Shared`]) memoized once for
//! the whole output; and [`Output`], the buffer the merged file goes out through.

use std::collections::HashMap;
use std::io::{BufRead, Write};

use crate::npy::FormatError;
use crate::pickle::{Decoder, IndexMap32, Op, OpReader, Value, complete_len, emit, memo_index, op};

const WRITE_BUF: usize = 1 << 18;

/// Marks, in [`Translator::map`], an input memo index that holds the input's data list, which
/// has no counterpart an element could sensibly refer to. Output indices stay below it.
const DATA_LIST: u32 = u32::MAX - 1;

/// Marks, in [`Translator::map`], an input memo index written by an element a filtered merge
/// leaves out of the output (see `npy/select/`), which no element in the output may read.
const DROPPED: u32 = u32::MAX - 2;

/// A value that is one object however often it is unpickled, so that pickling the merged list
/// writes it once and reads it from the memo after, even across inputs (loaded separately,
/// every other string is a new object per input): globals (module attributes), the empty
/// string and one-character strings below U+0100 (CPython's cached strings; unpickling gives
/// them back), and empty bytes. One-byte bytes are not: the unpickler makes them fresh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(in crate::npy) enum Shared {
    Global(String, String),
    Str(String),
    EmptyBytes,
}

impl Shared {
    fn of_str(p: &[u8]) -> Option<Shared> {
        if p.len() > 2 {
            return None;
        }
        let s = std::str::from_utf8(p).ok()?;
        let mut c = s.chars();
        match (c.next(), c.next()) {
            (None, _) => Some(Shared::Str(String::new())),
            (Some(ch), None) if u32::from(ch) < 0x100 => Some(Shared::Str(s.into())),
            _ => None,
        }
    }

    /// The shared value the whole op `b` pushes, if any, and the op's length.
    fn of_op(b: &[u8]) -> Option<(Shared, usize)> {
        match *b.first()? {
            op::GLOBAL => {
                let nl1 = b.iter().position(|&c| c == b'\n')?;
                let nl2 = nl1 + 1 + b[nl1 + 1..].iter().position(|&c| c == b'\n')?;
                let m = std::str::from_utf8(&b[1..nl1]).ok()?;
                let n = std::str::from_utf8(&b[nl1 + 1..nl2]).ok()?;
                Some((Shared::Global(m.into(), n.into()), nl2 + 1))
            }
            op::BINUNICODE | op::SHORT_BINUNICODE | op::BINUNICODE8 => {
                let len = complete_len(b)?;
                let w = if b[0] == op::SHORT_BINUNICODE {
                    1
                } else if b[0] == op::BINUNICODE {
                    4
                } else {
                    8
                };
                Some((Shared::of_str(&b[1 + w..len])?, len))
            }
            op::SHORT_BINBYTES | op::BINBYTES | op::BINBYTES8 => {
                let len = complete_len(b)?;
                let w = match b[0] {
                    op::SHORT_BINBYTES => 1,
                    op::BINBYTES => 4,
                    _ => 8,
                };
                (len == 1 + w).then_some((Shared::EmptyBytes, len))
            }
            _ => None,
        }
    }

    fn of_value(v: &Value) -> Option<Shared> {
        match v {
            Value::Global(g) => Some(Shared::Global(g.0.clone(), g.1.clone())),
            Value::Str(s) => Shared::of_str(s.as_bytes()),
            Value::Bytes(b) if b.is_empty() => Some(Shared::EmptyBytes),
            _ => None,
        }
    }
}

/// Rewrites one input's data-list opcodes for the output stream.
pub(in crate::npy) struct Translator {
    /// Next free output memo index; shared by all inputs.
    next_out: u64,
    /// Input memo index -> output memo index (or [`DATA_LIST`]).
    map: IndexMap32,
    /// The input's own `len(memo)`, which is what its `MEMOIZE`s write to.
    in_len: u32,
    /// Write memo entries with `MEMOIZE` rather than `BINPUT`/`LONG_BINPUT`; see
    /// [`put`].
    memoize: bool,
    /// Output memo index of each [`Shared`] value written so far.
    shared: HashMap<Shared, u32>,
    scratch: Vec<u8>,
}

impl Translator {
    /// For an output that declares protocol `proto` and opens with
    /// [`super::prologue`]`(proto, module, ..)`.
    pub fn new(proto: u8, module: &str) -> Self {
        Translator {
            next_out: u64::from(super::header_memo(proto)),
            map: IndexMap32::default(),
            in_len: 0,
            memoize: proto >= 4,
            shared: super::header_shared(proto, module).into_iter().collect(),
            scratch: Vec::new(),
        }
    }

    /// Writes a memo entry for the object just written.
    pub fn put_fresh(&mut self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let o = self.fresh()?;
        put(out, o, self.memoize);
        Ok(())
    }

    /// Handles an op pushing a [`Shared`] value (`b` is the op and what follows it in the
    /// element): the first time, copied and memoized; after, a memo read, as the pickler
    /// writes an object it has seen. The memo write after the op, if any, maps the input's
    /// entry. Returns how many bytes of `b` it used, or `None`, having changed nothing, when
    /// `b` does not start with such an op.
    fn shared_op(
        &mut self,
        b: &[u8],
        dec: &Decoder,
        out: &mut Vec<u8>,
    ) -> Result<Option<usize>, FormatError> {
        let Some((key, len)) = Shared::of_op(b) else {
            return Ok(None);
        };
        let rest = &b[len..];
        let input_put = match (rest.first(), complete_len(rest)) {
            (Some(&op::MEMOIZE), _) => Some((self.in_len, 1)),
            (Some(&op::BINPUT), Some(n)) => Some((u32::from(rest[1]), n)),
            (Some(&op::LONG_BINPUT), Some(n)) => {
                Some((u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]), n))
            }
            _ => None,
        };
        let o = match self.shared.get(&key) {
            Some(&o) => {
                emit::get(out, o);
                o
            }
            None => {
                out.extend_from_slice(&b[..len]);
                if input_put.is_none() {
                    return Ok(Some(len));
                }
                let o = self.fresh()?;
                put(out, o, self.memoize);
                self.shared.insert(key, o);
                o
            }
        };
        Ok(Some(match input_put {
            Some((idx, n)) => {
                self.define(dec, idx, o);
                len + n
            }
            None => len,
        }))
    }

    /// [`Translator::copy_op`] for what is common in a data list: a memo write, a memo read of
    /// an entry this input's elements made (or the prologue entry already copied), a `FRAME`.
    /// `bytes` is the whole op; whatever replaces it goes to `out`. Returns false, having
    /// changed nothing, for a read `copy_op` must handle (an entry of the prologue, the data
    /// list itself, one never written) or a `FRAME` whose length is out of range.
    #[inline]
    pub(super) fn rewrite_fast(
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

    pub(super) fn copy_op<R: BufRead, W: Write>(
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
                        let key = Shared::of_value(&v);
                        if let Some(&o) = key.as_ref().and_then(|k| self.shared.get(k)) {
                            emit::get(&mut self.scratch, o);
                            self.map.insert(idx, o);
                            out.write_all(&self.scratch)?;
                            return Ok(());
                        }
                        emit::value(&mut self.scratch, &v, dec.array.as_ref(), 0).map_err(
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
                        if let Some(k) = key {
                            self.shared.insert(k, o);
                        }
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

/// The merged file on its way out. Bytes gather in `buf`, which the fast paths append to
/// directly (a `BufWriter` would cost a call per op), and go to `inner` in large writes; `n`
/// counts the bytes written.
pub(in crate::npy) struct Output<W> {
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

/// Whether the fast paths hand `code` to [`Translator::rewrite_fast`] rather than copy it.
pub(super) fn rewritten(code: u8) -> bool {
    matches!(
        code,
        op::BINGET | op::LONG_BINGET | op::BINPUT | op::LONG_BINPUT | op::MEMOIZE | op::FRAME
    )
}

/// Copies whole buffered ops (payloads included) to `out`, rewritten as
/// [`Translator::copy_op`] would, unchanged stretches as one slice each.
pub(in crate::npy) fn translate<W: Write>(
    s: &[u8],
    tr: &mut Translator,
    dec: &Decoder,
    out: &mut Output<W>,
) -> Result<(), FormatError> {
    // `s[run..i]` is copied but not yet written.
    let (mut i, mut run) = (0, 0);
    while i < s.len() {
        if matches!(
            s[i],
            op::GLOBAL
                | op::BINUNICODE
                | op::SHORT_BINUNICODE
                | op::BINUNICODE8
                | op::SHORT_BINBYTES
                | op::BINBYTES
                | op::BINBYTES8
        ) {
            out.buf.extend_from_slice(&s[run..i]);
            run = i;
            if let Some(n) = tr.shared_op(&s[i..], dec, &mut out.buf)? {
                i += n;
                run = i;
                out.spill()?;
                continue;
            }
        }
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
