//! Checking that a byte stream is one complete pickle, without building any of its values:
//! for formats (episode directories) whose samples are whole pickle files that Quarry copies
//! verbatim and only needs to know are intact.

use std::io::BufRead;

use super::{Depth, FormatError, OpReader, complete_len, op};

/// Walks the pickle stream `r` (of `len` bytes) op by op to its `STOP` and checks that:
/// every opcode is known and its argument complete; large payloads are all there (they are
/// read past, never held in memory); the stack discipline holds (no opcode pops below the
/// stack or its topmost mark, `STOP` finds exactly one value and no open mark); the stream
/// uses no out-of-band buffers (`NEXT_BUFFER`: such a pickle cannot load from the file
/// alone); and nothing follows the `STOP`. Memo references are not resolved, so this is a
/// check of the stream's shape, not a full load.
///
/// Returns the length of the stream. Memory stays bounded by the reader's buffer plus one
/// text argument (protocol 0). Errors are [`FormatError::Truncated`] (the stream ends before
/// its `STOP` or inside an op), [`FormatError::BadPickle`] (an unknown opcode, a stack
/// error), [`FormatError::TrailingData`] (bytes after the `STOP`), [`FormatError::Unsupported`]
/// (out-of-band buffers) or [`FormatError::Io`].
pub(crate) fn check_complete<R: BufRead>(r: R, len: u64) -> Result<u64, FormatError> {
    let mut rd = OpReader::with_base(r, 0);
    let mut d = Depth::default();
    loop {
        // Fast path: complete ops of a common form, straight out of the read buffer.
        let buf = rd.buffered()?;
        if buf.is_empty() {
            let at = rd.position();
            return Err(FormatError::Truncated {
                what: "pickle stream (it ends before its STOP opcode)".into(),
                expected: at + 1,
                actual: at,
            });
        }
        let mut i = 0;
        while let Some(n) = complete_len(&buf[i..]) {
            let code = buf[i];
            if code == op::STOP || code == op::NEXT_BUFFER || !d.apply_fast(code) {
                break;
            }
            i += n;
        }
        if i > 0 {
            rd.consume(i);
            continue;
        }
        // Slow path: one op at a time, which also reads across buffer ends, steps over large
        // payloads and gives the errors.
        let Some(o) = rd.next_op()? else {
            continue; // The next `buffered` reports the truncation.
        };
        match o.code {
            op::STOP => {
                if d.depth != 1 || !d.marks.is_empty() {
                    return Err(FormatError::BadPickle {
                        offset: o.offset,
                        reason: format!(
                            "STOP with {} stack entries ({} open marks); a complete pickle \
                             leaves exactly one value",
                            d.depth,
                            d.marks.len()
                        ),
                    });
                }
                let end = rd.position();
                if !rd.at_eof()? {
                    return Err(FormatError::TrailingData {
                        what: "pickle stream".into(),
                        expected: end,
                        actual: len.max(end + 1),
                    });
                }
                return Ok(end);
            }
            op::NEXT_BUFFER => {
                return Err(FormatError::Unsupported {
                    reason: format!(
                        "pickle at byte {} uses an out-of-band buffer (NEXT_BUFFER), so it \
                         cannot be loaded from the file alone; pickle with buffers in-band",
                        o.offset
                    ),
                });
            }
            code => match d.apply(code) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(FormatError::BadPickle {
                        offset: o.offset,
                        reason: format!("{} pops from an empty stack", super::opcodes::name(code)),
                    });
                }
                Err(reason) => {
                    return Err(FormatError::BadPickle {
                        offset: o.offset,
                        reason,
                    });
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(b: &[u8]) -> Result<u64, FormatError> {
        check_complete(b, b.len() as u64)
    }

    /// `pickle.dumps(({'a': [1, 2]}, {'n': 'x'}), protocol=4)`.
    const P4: &[u8] = b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94]\x94(K\x01K\x02es}\x94\x8c\x01n\x94\x8c\x01x\x94s\x86\x94.";
    /// `pickle.dumps(([1, 2], 'x'), protocol=0)`.
    const P0: &[u8] = b"((lp0\nI1\naI2\naVx\np1\ntp2\n.";

    #[test]
    fn accepts_complete_pickles() {
        assert_eq!(check(P4).unwrap(), P4.len() as u64);
        assert_eq!(check(P0).unwrap(), P0.len() as u64);
        // A large payload split across many reads of a small buffer.
        let mut big = b"\x80\x04\x8e".to_vec();
        big.extend_from_slice(&(300_000u64).to_le_bytes());
        big.extend(std::iter::repeat_n(7u8, 300_000));
        big.push(b'.');
        let r = std::io::BufReader::with_capacity(1000, &big[..]);
        assert_eq!(
            check_complete(r, big.len() as u64).unwrap(),
            big.len() as u64
        );
    }

    #[test]
    fn truncation_anywhere_is_caught() {
        for cut in 0..P4.len() {
            let e = check(&P4[..cut]).unwrap_err();
            assert!(matches!(e, FormatError::Truncated { .. }), "cut {cut}: {e}");
        }
        for cut in 0..P0.len() {
            assert!(check(&P0[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn trailing_bytes_stack_errors_and_buffers_are_caught() {
        let mut t = P4.to_vec();
        t.extend_from_slice(b"xx");
        assert!(matches!(
            check(&t).unwrap_err(),
            FormatError::TrailingData { .. }
        ));
        // Two values left on the stack at STOP.
        assert!(matches!(
            check(b"\x80\x04K\x01K\x02.").unwrap_err(),
            FormatError::BadPickle { .. }
        ));
        // SETITEM on an empty stack; an unknown opcode.
        assert!(matches!(
            check(b"\x80\x04s.").unwrap_err(),
            FormatError::BadPickle { .. }
        ));
        assert!(matches!(
            check(b"\x80\x04\xff.").unwrap_err(),
            FormatError::BadPickle { .. }
        ));
        assert!(matches!(
            check(b"\x80\x05\x97.").unwrap_err(),
            FormatError::Unsupported { .. }
        ));
    }
}
