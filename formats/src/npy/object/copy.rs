//! Copying an input's data list into the merged stream one element at a time: its first
//! elements ([`copy_prefix`]; all of them for an input used whole, after which
//! [`finish_list`] checks nothing follows), complete common ops taken straight out of the read
//! buffer and the rest one op at a time. The input's own `MARK ... APPENDS` batches are
//! dropped and the merged list batched afresh by [`Batches`], as the pickler batches the
//! merged list.

use std::io::{BufRead, Write};

use super::translate::{Output, Translator, translate};
use super::{Input, element_count, ended_early, finish_input, stack_error, unit_end};
use crate::npy::FormatError;
use crate::pickle::{Decoder, Depth, complete_len, op};

/// CPython's `_pickle` appends list items in batches of this many (`BATCHSIZE`).
const BATCH: u64 = 1000;

/// The `MARK ... APPENDS` batches of the merged data list, as CPython's `_pickle`
/// (`batch_list_exact`) writes a list of `total` items: one item is followed by `APPEND`
/// alone; more go in batches of 1000, each opened by `MARK` and closed by `APPENDS`; an empty
/// list gets neither.
pub(in crate::npy) struct Batches {
    total: u64,
    written: u64,
}

impl Batches {
    pub fn new(total: u64) -> Self {
        Batches { total, written: 0 }
    }

    /// Opens or closes batches as needed before the next element.
    pub fn before_element(&mut self, out: &mut Vec<u8>) {
        if self.total >= 2 {
            if self.written == 0 {
                out.push(op::MARK);
            } else if self.written.is_multiple_of(BATCH) {
                out.extend_from_slice(&[op::APPENDS, op::MARK]);
            }
        }
        self.written += 1;
    }

    /// Closes the last batch.
    pub fn finish(&self, out: &mut Vec<u8>) {
        match self.total {
            0 => {}
            1 => out.push(op::APPEND),
            _ => out.push(op::APPENDS),
        }
    }
}

/// After [`copy_prefix`] took all `expected` elements of an input: checks the data list ends
/// there and the epilogue builds the array, counting any further elements for the error.
pub(super) fn finish_list<R: BufRead>(
    inp: &mut Input<R>,
    tr: &mut Translator,
    expected: u64,
) -> Result<(), FormatError> {
    let mut d = Depth::default();
    let mut count = expected;
    loop {
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
            return finish_input(inp, op);
        }
        inp.rd.skip_payload()?;
        count += end.unwrap_or(0);
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

    /// Copies the elements of the unit just closed, which appends `n` elements, or only its
    /// first `room` when fewer, each preceded by what [`Batches`] opens or closes; the unit's
    /// own `MARK` and closing op are left out. Returns the number copied. `at` is the offset
    /// of the closing op, for errors.
    #[allow(clippy::too_many_arguments)]
    fn emit<W: Write>(
        &self,
        n: u64,
        room: u64,
        at: u64,
        tr: &mut Translator,
        batches: &mut Batches,
        dec: &Decoder,
        out: &mut Output<W>,
    ) -> Result<u64, FormatError> {
        let k = n.min(room);
        let bad = || FormatError::BadPickle {
            offset: at,
            reason: "bad batch".into(),
        };
        // A MARK batch: element j lies between the last points the depth was 1 + j and
        // 2 + j. An APPEND unit: its one element is everything before the APPEND.
        let marked = self.bytes.first() == Some(&op::MARK);
        for j in 0..k as usize {
            let (a, b) = if marked {
                let a = *self.last_at.get(1 + j).ok_or_else(bad)?;
                (a, *self.last_at.get(2 + j).ok_or_else(bad)?)
            } else {
                (0, *self.last_at.get(1).ok_or_else(bad)?)
            };
            if a > b || b > self.bytes.len() {
                return Err(bad());
            }
            batches.before_element(&mut out.buf);
            translate(&self.bytes[a..b], tr, dec, out)?;
        }
        Ok(k)
    }
}

/// Copies the first `take` elements of a data list, one buffered unit at a time, and stops
/// reading there. It takes complete common ops straight out of the read buffer and leaves the
/// rest to `next_op`.
pub(super) fn copy_prefix<R: BufRead, W: Write>(
    inp: &mut Input<R>,
    tr: &mut Translator,
    batches: &mut Batches,
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
                taken += u.emit(n, take - taken, base + i as u64, tr, batches, &inp.dec, out)?;
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
            taken += u.emit(n, take - taken, op.offset, tr, batches, &inp.dec, out)?;
        }
    }
    Ok(())
}
