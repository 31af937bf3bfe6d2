//! Reading pickle opcodes one at a time off a stream ([`OpReader`]), payloads left in the
//! stream until the caller copies, reads or skips them, so a large `BINBYTES8` never has to
//! fit in memory.

use std::io::{self, BufRead, Read, Write};

use super::FormatError;
use super::opcodes::{ArgKind, arg_kind, name};

/// One opcode as read; its raw bytes (opcode and argument, payload excepted) are in the
/// reader's `head()` until the next call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Op {
    pub code: u8,
    /// Offset of the opcode byte from the start of the pickle stream.
    pub offset: u64,
    pub kind: ArgKind,
    /// The argument for `Uint`/`Int4`; the payload length for counted arguments.
    pub int: i64,
}

/// Longest protocol-0 text argument accepted; numpy pickles only use these for short names.
const MAX_LINE: usize = 1 << 20;

/// Reads opcodes off a buffered stream, leaving counted payloads in the stream until asked.
pub(crate) struct OpReader<R> {
    r: R,
    pos: u64,
    head: Vec<u8>,
    pending: u64,
}

impl<R: BufRead> OpReader<R> {
    #[cfg(test)]
    pub fn new(r: R) -> Self {
        Self::with_base(r, 0)
    }

    /// A reader whose offsets (in errors and [`OpReader::position`]) start at `base`, so they
    /// can name file offsets when the pickle follows an npy header.
    pub fn with_base(r: R, base: u64) -> Self {
        OpReader {
            r,
            pos: base,
            head: Vec::with_capacity(64),
            pending: 0,
        }
    }

    /// Offset of the next unread byte.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Whether the stream has nothing left after the last op and its payload.
    pub fn at_eof(&mut self) -> Result<bool, FormatError> {
        self.skip_payload()?;
        loop {
            match self.r.fill_buf() {
                Ok(b) => return Ok(b.is_empty()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The bytes buffered from the next op on (any unread payload of the last op skipped),
    /// for callers that take complete ops straight out of the buffer ([`super::complete_len`]) and
    /// then [`OpReader::consume`] them; empty only at the end of the stream. Invalidates
    /// [`OpReader::head`].
    pub fn buffered(&mut self) -> Result<&[u8], FormatError> {
        self.skip_payload()?;
        self.head.clear();
        // Retry interrupted reads first: returning the buffer from inside the retry loop
        // would keep `self.r` borrowed across iterations.
        loop {
            match self.r.fill_buf() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Filled just now, so this returns the same bytes without reading.
        Ok(self.r.fill_buf()?)
    }

    /// Marks the first `n` bytes of [`OpReader::buffered`] as read.
    pub fn consume(&mut self, n: usize) {
        self.r.consume(n);
        self.pos += n as u64;
    }

    /// The opcode byte and argument bytes of the last op (not its counted payload).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Text argument of a `Line` op, without the opcode and `\n`.
    pub fn line(&self) -> &[u8] {
        let h = &self.head[1..];
        h.strip_suffix(b"\n").unwrap_or(h)
    }

    /// Both lines of a `TwoLines` op.
    pub fn two_lines(&self) -> (&[u8], &[u8]) {
        let body = self.line();
        match body.iter().position(|&b| b == b'\n') {
            Some(i) => (&body[..i], &body[i + 1..]),
            None => (body, &[]),
        }
    }

    fn truncated(&self, op: &str, need: u64, got: u64) -> FormatError {
        FormatError::Truncated {
            what: format!("pickle stream (inside {op} at byte {})", self.pos - got),
            expected: self.pos - got + need,
            actual: self.pos,
        }
    }

    fn fill(&mut self, n: usize, code: u8) -> Result<(), FormatError> {
        let start = self.head.len();
        self.head.resize(start + n, 0);
        let mut got = 0;
        while got < n {
            match self.r.read(&mut self.head[start + got..]) {
                Ok(0) => {
                    return Err(self.truncated(name(code), (n + 1) as u64, (got + 1) as u64));
                }
                Ok(k) => {
                    got += k;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_line(&mut self, code: u8) -> Result<(), FormatError> {
        let start = self.head.len();
        loop {
            let buf = match self.r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if buf.is_empty() {
                let got = (self.head.len() - start + 1) as u64;
                return Err(self.truncated(name(code), got + 1, got));
            }
            let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            };
            self.head.extend_from_slice(&buf[..take]);
            self.r.consume(take);
            self.pos += take as u64;
            if done {
                return Ok(());
            }
            if self.head.len() - start > MAX_LINE {
                return Err(FormatError::Unsupported {
                    reason: format!("{} argument longer than {MAX_LINE} bytes", name(code)),
                });
            }
        }
    }

    /// The next opcode, or `None` at a clean end of stream. Skips any payload of the previous
    /// op that the caller left unread.
    pub fn next_op(&mut self) -> Result<Option<Op>, FormatError> {
        self.skip_payload()?;
        self.head.clear();
        let offset = self.pos;
        let buf = loop {
            match self.r.fill_buf() {
                Ok(b) => break b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        };
        let Some(&code) = buf.first() else {
            return Ok(None);
        };
        let Some(kind) = arg_kind(code) else {
            return Err(FormatError::BadPickle {
                offset,
                reason: format!("unknown opcode 0x{code:02x}"),
            });
        };
        // Bytes of fixed-width argument after the opcode (a length, for counted payloads).
        let width = match kind {
            ArgKind::None => Some(0),
            ArgKind::Uint(n) | ArgKind::Counted(n) => Some(n as usize),
            ArgKind::Int4 | ArgKind::CountedSigned4 => Some(4),
            ArgKind::Float8 => Some(8),
            ArgKind::Line | ArgKind::TwoLines => None,
        };
        match width {
            // The usual case: the whole head is buffered; take it in one go.
            Some(n) if buf.len() > n => {
                self.head.extend_from_slice(&buf[..=n]);
                self.r.consume(n + 1);
                self.pos += n as u64 + 1;
            }
            _ => {
                self.head.push(code);
                self.r.consume(1);
                self.pos += 1;
                if let Some(n) = width {
                    self.fill(n, code)?;
                }
            }
        }
        let le = |b: &[u8]| b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64);
        let mut int = 0i64;
        match kind {
            ArgKind::None => {}
            ArgKind::Uint(_) => {
                let v = le(&self.head[1..]);
                int = i64::try_from(v).map_err(|_| FormatError::BadPickle {
                    offset,
                    reason: format!("{} argument {v} out of range", name(code)),
                })?;
            }
            ArgKind::Int4 => int = le(&self.head[1..]) as u32 as i32 as i64,
            ArgKind::Float8 => {}
            ArgKind::Line => self.read_line(code)?,
            ArgKind::TwoLines => {
                self.read_line(code)?;
                self.read_line(code)?;
            }
            ArgKind::Counted(_) => {
                let len = le(&self.head[1..]);
                int = i64::try_from(len).map_err(|_| FormatError::BadPickle {
                    offset,
                    reason: format!("{} length {len} out of range", name(code)),
                })?;
                self.pending = len;
            }
            ArgKind::CountedSigned4 => {
                let len = le(&self.head[1..]) as u32 as i32;
                if len < 0 {
                    return Err(FormatError::BadPickle {
                        offset,
                        reason: format!("{} has negative length", name(code)),
                    });
                }
                int = len as i64;
                self.pending = len as u64;
            }
        }
        Ok(Some(Op {
            code,
            offset,
            kind,
            int,
        }))
    }

    /// The `BINFLOAT` argument of the last op.
    pub fn float8(&self) -> f64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.head[1..9]);
        f64::from_be_bytes(b)
    }

    fn payload_truncated(&self, done: u64) -> FormatError {
        FormatError::Truncated {
            what: format!(
                "pickle stream (inside a {}-byte payload)",
                self.pending + done
            ),
            expected: self.pos + self.pending,
            actual: self.pos,
        }
    }

    /// Copies the last op's payload to `w` without holding it in memory.
    pub fn copy_payload<W: Write + ?Sized>(&mut self, w: &mut W) -> Result<(), FormatError> {
        let want = self.pending;
        let n = io::copy(&mut (&mut self.r).take(want), w)?;
        self.pos += n;
        self.pending = want - n;
        if n < want {
            return Err(self.payload_truncated(n));
        }
        Ok(())
    }

    /// Reads the last op's payload into `buf` if it has at most `cap` bytes; otherwise skips it
    /// and returns false.
    pub fn read_payload(&mut self, buf: &mut Vec<u8>, cap: usize) -> Result<bool, FormatError> {
        buf.clear();
        if self.pending > cap as u64 {
            self.skip_payload()?;
            return Ok(false);
        }
        self.copy_payload(buf)?;
        Ok(true)
    }

    pub fn skip_payload(&mut self) -> Result<(), FormatError> {
        if self.pending > 0 {
            self.copy_payload(&mut io::sink())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::opcodes::op;
    use super::*;

    #[test]
    fn reads_ops_and_payloads() {
        let data = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00\x8c\x03abc\x94cnumpy\ndtype\nJ\xff\xff\xff\xff.";
        let mut r = OpReader::new(&data[..]);
        let codes: Vec<u8> = std::iter::from_fn(|| r.next_op().unwrap().map(|o| o.code)).collect();
        assert_eq!(
            codes,
            [
                op::PROTO,
                op::FRAME,
                op::SHORT_BINUNICODE,
                op::MEMOIZE,
                op::GLOBAL,
                op::BININT,
                op::STOP
            ]
        );
        let mut r = OpReader::new(&data[..]);
        for _ in 0..3 {
            r.next_op().unwrap();
        }
        let mut buf = Vec::new();
        assert!(r.read_payload(&mut buf, 10).unwrap());
        assert_eq!(buf, b"abc");
        r.next_op().unwrap();
        let g = r.next_op().unwrap().unwrap();
        assert_eq!(g.code, op::GLOBAL);
        assert_eq!(r.two_lines(), (&b"numpy"[..], &b"dtype"[..]));
        assert_eq!(r.next_op().unwrap().unwrap().int, -1);
    }

    #[test]
    fn truncation_and_unknown_opcodes_are_errors() {
        let data = b"\x8c\x05ab";
        let mut r = OpReader::new(&data[..]);
        r.next_op().unwrap();
        assert!(matches!(
            r.skip_payload(),
            Err(FormatError::Truncated { .. })
        ));
        let mut r = OpReader::new(&b"J\x01\x02"[..]);
        assert!(matches!(r.next_op(), Err(FormatError::Truncated { .. })));
        let mut r = OpReader::new(&b"\xff"[..]);
        assert!(matches!(r.next_op(), Err(FormatError::BadPickle { .. })));
    }
}
