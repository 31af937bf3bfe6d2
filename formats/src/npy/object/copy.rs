//! Copying an input's data list into the merged stream: whole ([`copy_whole`], checking its
//! element count), or only its first elements ([`copy_prefix`], for the input the limit cuts),
//! complete common ops taken straight out of the read buffer and the rest one op at a time.

use std::io::{BufRead, Write};

use super::translate::{Output, Translator, rewritten, translate};
use super::{Input, element_count, ended_early, stack_error, unit_end};
use crate::npy::FormatError;
use crate::pickle::{Decoder, Depth, Op, complete_len, op};

/// Copies a whole data list, checking it holds `expected` elements; returns the opcode that
/// ended it (the first of the epilogue).
///
/// [`copy_run`] takes ops straight out of the read buffer for as long as it can; the op it
/// stops at (cut by the buffer's end, or not a plain element op) goes the general way, one
/// [`crate::pickle::OpReader::next_op`] at a time, and then the fast path resumes.
pub(super) fn copy_whole<R: BufRead, W: Write>(
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
pub(super) fn copy_prefix<R: BufRead, W: Write>(
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
