//! Pickle opcodes: reading them one at a time off a stream (payloads left in the stream until
//! the caller copies, reads or skips them, so a large `BINBYTES8` never has to fit in memory),
//! their stack effects, and writing the few opcodes the merge emits itself.

use std::io::{self, BufRead, Read, Write};

use super::FormatError;

#[allow(dead_code)] // The full table documents the format even where nothing names an opcode.
pub(crate) mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const NEXT_BUFFER: u8 = 0x97;
    pub const READONLY_BUFFER: u8 = 0x98;
}

/// How an opcode's argument is laid out after the opcode byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArgKind {
    None,
    /// Little-endian fixed-width unsigned integer of this many bytes.
    Uint(u8),
    /// Little-endian signed 4-byte integer (`BININT`).
    Int4,
    /// Big-endian IEEE double (`BINFLOAT`).
    Float8,
    /// One `\n`-terminated line (protocol 0 text arguments).
    Line,
    /// Two lines: module and name (`GLOBAL`, `INST`).
    TwoLines,
    /// A length of this many bytes (little-endian, unsigned) followed by that many bytes.
    Counted(u8),
    /// Like `Counted(4)` but the length is signed (`BINSTRING`, `LONG4`).
    CountedSigned4,
}

pub(crate) fn name(code: u8) -> &'static str {
    use op::*;
    match code {
        MARK => "MARK",
        STOP => "STOP",
        POP => "POP",
        POP_MARK => "POP_MARK",
        DUP => "DUP",
        FLOAT => "FLOAT",
        INT => "INT",
        BININT => "BININT",
        BININT1 => "BININT1",
        LONG => "LONG",
        BININT2 => "BININT2",
        NONE => "NONE",
        PERSID => "PERSID",
        BINPERSID => "BINPERSID",
        REDUCE => "REDUCE",
        STRING => "STRING",
        BINSTRING => "BINSTRING",
        SHORT_BINSTRING => "SHORT_BINSTRING",
        UNICODE => "UNICODE",
        BINUNICODE => "BINUNICODE",
        APPEND => "APPEND",
        BUILD => "BUILD",
        GLOBAL => "GLOBAL",
        DICT => "DICT",
        EMPTY_DICT => "EMPTY_DICT",
        APPENDS => "APPENDS",
        GET => "GET",
        BINGET => "BINGET",
        INST => "INST",
        LONG_BINGET => "LONG_BINGET",
        LIST => "LIST",
        EMPTY_LIST => "EMPTY_LIST",
        OBJ => "OBJ",
        PUT => "PUT",
        BINPUT => "BINPUT",
        LONG_BINPUT => "LONG_BINPUT",
        SETITEM => "SETITEM",
        TUPLE => "TUPLE",
        EMPTY_TUPLE => "EMPTY_TUPLE",
        SETITEMS => "SETITEMS",
        BINFLOAT => "BINFLOAT",
        PROTO => "PROTO",
        NEWOBJ => "NEWOBJ",
        EXT1 => "EXT1",
        EXT2 => "EXT2",
        EXT4 => "EXT4",
        TUPLE1 => "TUPLE1",
        TUPLE2 => "TUPLE2",
        TUPLE3 => "TUPLE3",
        NEWTRUE => "NEWTRUE",
        NEWFALSE => "NEWFALSE",
        LONG1 => "LONG1",
        LONG4 => "LONG4",
        BINBYTES => "BINBYTES",
        SHORT_BINBYTES => "SHORT_BINBYTES",
        SHORT_BINUNICODE => "SHORT_BINUNICODE",
        BINUNICODE8 => "BINUNICODE8",
        BINBYTES8 => "BINBYTES8",
        EMPTY_SET => "EMPTY_SET",
        ADDITEMS => "ADDITEMS",
        FROZENSET => "FROZENSET",
        NEWOBJ_EX => "NEWOBJ_EX",
        STACK_GLOBAL => "STACK_GLOBAL",
        MEMOIZE => "MEMOIZE",
        FRAME => "FRAME",
        BYTEARRAY8 => "BYTEARRAY8",
        NEXT_BUFFER => "NEXT_BUFFER",
        READONLY_BUFFER => "READONLY_BUFFER",
        _ => "unknown",
    }
}

/// The argument layout of `code`, or `None` for a byte that is no opcode.
pub(crate) const fn arg_kind(code: u8) -> Option<ArgKind> {
    use op::*;
    Some(match code {
        MARK | STOP | POP | POP_MARK | DUP | NONE | BINPERSID | REDUCE | APPEND | BUILD | DICT
        | EMPTY_DICT | APPENDS | LIST | EMPTY_LIST | OBJ | SETITEM | TUPLE | EMPTY_TUPLE
        | SETITEMS | NEWOBJ | TUPLE1 | TUPLE2 | TUPLE3 | NEWTRUE | NEWFALSE | EMPTY_SET
        | ADDITEMS | FROZENSET | NEWOBJ_EX | STACK_GLOBAL | MEMOIZE | NEXT_BUFFER
        | READONLY_BUFFER => ArgKind::None,
        FLOAT | INT | LONG | PERSID | STRING | UNICODE | GET | PUT => ArgKind::Line,
        GLOBAL | INST => ArgKind::TwoLines,
        BININT1 | BINGET | BINPUT | PROTO | EXT1 => ArgKind::Uint(1),
        BININT2 | EXT2 => ArgKind::Uint(2),
        LONG_BINGET | LONG_BINPUT | EXT4 => ArgKind::Uint(4),
        FRAME => ArgKind::Uint(8),
        BININT => ArgKind::Int4,
        BINFLOAT => ArgKind::Float8,
        SHORT_BINSTRING | SHORT_BINBYTES | SHORT_BINUNICODE | LONG1 => ArgKind::Counted(1),
        BINUNICODE | BINBYTES => ArgKind::Counted(4),
        BINSTRING | LONG4 => ArgKind::CountedSigned4,
        BINUNICODE8 | BINBYTES8 | BYTEARRAY8 => ArgKind::Counted(8),
        _ => return None,
    })
}

/// What an opcode does to the stack, counting marks as entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Pops this many items (never a mark), then pushes this many.
    Items { pop: u8, push: u8 },
    /// Pops everything down to and including the topmost mark, then pushes this many.
    ToMark { push: u8 },
    /// Pushes a mark.
    Mark,
    /// `POP`: one item, or the mark when the topmost entry is a mark.
    Pop,
}

pub(crate) fn effect(code: u8) -> Effect {
    EFFECTS[code as usize]
}

const fn effect_of(code: u8) -> Effect {
    use op::*;
    const fn items(pop: u8, push: u8) -> Effect {
        Effect::Items { pop, push }
    }
    match code {
        MARK => Effect::Mark,
        POP => Effect::Pop,
        STOP | APPEND | BUILD => items(1, 0),
        SETITEM => items(2, 0),
        POP_MARK | APPENDS | SETITEMS | ADDITEMS => Effect::ToMark { push: 0 },
        DICT | INST | LIST | OBJ | TUPLE | FROZENSET => Effect::ToMark { push: 1 },
        BINPERSID | TUPLE1 | READONLY_BUFFER => items(1, 1),
        REDUCE | NEWOBJ | TUPLE2 | STACK_GLOBAL => items(2, 1),
        TUPLE3 | NEWOBJ_EX => items(3, 1),
        PUT | BINPUT | LONG_BINPUT | MEMOIZE | PROTO | FRAME => items(0, 0),
        // Everything else pushes one value.
        _ => items(0, 1),
    }
}

/// [`effect`] of every byte, so the per-opcode cost is one load.
const EFFECTS: [Effect; 256] = {
    let mut t = [Effect::Mark; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = effect_of(i as u8);
        i += 1;
    }
    t
};

/// In [`LAYOUT`]: the opcode's argument is a length of `entry & !COUNTED` bytes, then that many
/// bytes.
const COUNTED: u8 = 0x80;

/// For [`complete_len`], by opcode: the whole op's length when it is fixed, `COUNTED | width`
/// for a counted payload with an unsigned length, or 0 for what the fast path leaves to
/// [`OpReader::next_op`]: text-line arguments (rare from protocol 3 on), signed lengths
/// (`BINSTRING`, `LONG4`: they need a sign check), `PROTO`, and bytes that are no opcode.
const LAYOUT: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = match arg_kind(i as u8) {
            _ if i as u8 == op::PROTO => 0,
            Some(ArgKind::None) => 1,
            Some(ArgKind::Uint(n)) => 1 + n,
            Some(ArgKind::Int4) => 5,
            Some(ArgKind::Float8) => 9,
            Some(ArgKind::Counted(w)) => COUNTED | w,
            _ => 0,
        };
        i += 1;
    }
    t
};

/// Length of the op at the start of `s` (opcode, argument and payload) when all of it is in
/// `s` and it is of a common form; `None` leaves it to [`OpReader::next_op`], which reads
/// across buffer ends, streams large payloads and reports malformed ops.
///
/// This is what lets the merge work straight out of the read buffer: almost every op of a
/// numpy pickle is a few bytes long, so almost every op is complete in a 64 KiB buffer.
#[inline]
pub(crate) fn complete_len(s: &[u8]) -> Option<usize> {
    let layout = LAYOUT[*s.first()? as usize];
    if layout & COUNTED == 0 {
        let n = layout as usize;
        return (n != 0 && s.len() >= n).then_some(n);
    }
    let w = (layout & !COUNTED) as usize;
    let len = match s.get(1..1 + w)? {
        &[b] => b as u64,
        &[a, b, c, d] => u32::from_le_bytes([a, b, c, d]) as u64,
        b => u64::from_le_bytes(b.try_into().ok()?),
    };
    // Compared as u64, so a huge (or malformed) length cannot overflow: it is just not here.
    let have = (s.len() - 1 - w) as u64;
    (len <= have).then_some(1 + w + len as usize)
}

/// The stack shape of a pickle stream, tracked without values: `depth` counts items and
/// marks alike, so no opcode raises it by more than one.
#[derive(Debug, Default, Clone)]
pub(crate) struct Depth {
    pub depth: usize,
    /// Depth before each open mark was pushed (the mark sits at that index).
    pub marks: Vec<usize>,
}

impl Depth {
    /// Applies `code` if it keeps to the stack it belongs to and returns true; otherwise
    /// changes nothing and returns false, leaving [`Depth::apply`] to say what happened (the
    /// end of the stack, or a malformed pickle). `POP` always goes to `apply`, being rare.
    #[inline]
    pub fn apply_fast(&mut self, code: u8) -> bool {
        match effect(code) {
            Effect::Mark => {
                self.marks.push(self.depth);
                self.depth += 1;
            }
            Effect::Items { pop, push } => {
                // `apply` fails exactly when fewer than `pop` items sit above the topmost mark
                // (or above the floor, without one).
                let floor = self.marks.last().map_or(0, |m| m + 1);
                if self.depth < floor + pop as usize {
                    return false;
                }
                self.depth = self.depth - pop as usize + push as usize;
            }
            Effect::ToMark { push } => match self.marks.pop() {
                Some(m) => self.depth = m + push as usize,
                None => return false,
            },
            Effect::Pop => return false,
        }
        true
    }

    /// Applies `code`, or says it would reach below `floor` (entries this tracker does not own).
    /// `Ok(false)` means the opcode would pop below the floor and nothing was changed.
    pub fn apply(&mut self, code: u8) -> Result<bool, String> {
        let above_mark = |s: &Self| s.depth - s.marks.last().map_or(0, |m| m + 1);
        match effect(code) {
            Effect::Mark => {
                self.marks.push(self.depth);
                self.depth += 1;
            }
            Effect::Pop => {
                if self.depth == 0 {
                    return Ok(false);
                }
                if self.marks.last() == Some(&(self.depth - 1)) {
                    self.marks.pop();
                }
                self.depth -= 1;
            }
            Effect::ToMark { push } => {
                let Some(m) = self.marks.pop() else {
                    return if self.depth == 0 {
                        Ok(false)
                    } else {
                        Err(format!("{} without a mark", name(code)))
                    };
                };
                self.depth = m + push as usize;
            }
            Effect::Items { pop, push } => {
                let pop = pop as usize;
                if self.marks.is_empty() && self.depth < pop {
                    if self.depth == 0 {
                        return Ok(false);
                    }
                    return Err(format!("{} pops below the stack it belongs to", name(code)));
                }
                if above_mark(self) < pop {
                    return Err(format!("{} needs {pop} items above the mark", name(code)));
                }
                self.depth = self.depth - pop + push as usize;
            }
        }
        Ok(true)
    }
}

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
    /// for callers that take complete ops straight out of the buffer ([`complete_len`]) and
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

/// Writes the memo and literal opcodes the merge emits on its own account.
pub(crate) mod emit {
    use super::op;

    #[inline]
    pub fn put(out: &mut Vec<u8>, idx: u32) {
        if let Ok(b) = u8::try_from(idx) {
            out.extend_from_slice(&[op::BINPUT, b]);
        } else {
            out.push(op::LONG_BINPUT);
            out.extend_from_slice(&idx.to_le_bytes());
        }
    }

    #[inline]
    pub fn get(out: &mut Vec<u8>, idx: u32) {
        if let Ok(b) = u8::try_from(idx) {
            out.extend_from_slice(&[op::BINGET, b]);
        } else {
            out.push(op::LONG_BINGET);
            out.extend_from_slice(&idx.to_le_bytes());
        }
    }

    /// The shortest encoding pickle itself uses for an int.
    pub fn int(out: &mut Vec<u8>, v: i64) {
        if (0..=0xff).contains(&v) {
            out.extend_from_slice(&[op::BININT1, v as u8]);
        } else if (0..=0xffff).contains(&v) {
            out.push(op::BININT2);
            out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if let Ok(v) = i32::try_from(v) {
            out.push(op::BININT);
            out.extend_from_slice(&v.to_le_bytes());
        } else {
            long(out, &v.to_le_bytes());
        }
    }

    /// `LONG1`/`LONG4` of a little-endian two's-complement integer, trimmed to minimal length.
    pub fn long(out: &mut Vec<u8>, le: &[u8]) {
        let mut n = le.len();
        while n > 1 {
            let (top, next) = (le[n - 1], le[n - 2]);
            // A top byte is redundant when it only repeats the sign of the byte below.
            if (top == 0 && next & 0x80 == 0) || (top == 0xff && next & 0x80 != 0) {
                n -= 1;
            } else {
                break;
            }
        }
        let bytes = if le.iter().all(|&b| b == 0) {
            &[][..]
        } else {
            &le[..n]
        };
        if let Ok(len) = u8::try_from(bytes.len()) {
            out.extend_from_slice(&[op::LONG1, len]);
        } else {
            out.push(op::LONG4);
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(bytes);
    }

    pub fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(op::BINUNICODE);
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    pub fn bytes(out: &mut Vec<u8>, b: &[u8]) {
        if let Ok(len) = u8::try_from(b.len()) {
            out.extend_from_slice(&[op::SHORT_BINBYTES, len]);
        } else {
            out.push(op::BINBYTES);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(b);
    }

    pub fn global(out: &mut Vec<u8>, module: &str, name: &str) {
        out.push(op::GLOBAL);
        out.extend_from_slice(module.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn depth_counts_marks_and_stops_at_floor() {
        let mut d = Depth::default();
        for c in [
            op::MARK,
            op::NONE,
            op::NONE,
            op::TUPLE,
            op::EMPTY_DICT,
            op::MARK,
        ] {
            assert!(d.apply(c).unwrap());
        }
        assert_eq!(d.depth, 3);
        assert!(d.apply(op::SETITEMS).unwrap());
        assert_eq!(d.depth, 2);
        assert!(d.apply(op::MARK).unwrap());
        assert!(d.apply(op::SETITEM).is_err());
        assert!(d.apply(op::POP).unwrap());
        assert!(d.apply(op::SETITEM).unwrap());
        assert!(!d.apply(op::APPEND).unwrap());
        let mut top = Depth::default();
        assert!(!top.apply(op::TUPLE).unwrap());
        assert!(!top.apply(op::BUILD).unwrap());
    }

    #[test]
    fn emits_minimal_longs() {
        let enc = |v: i64| {
            let mut o = Vec::new();
            emit::int(&mut o, v);
            o
        };
        assert_eq!(enc(5), [op::BININT1, 5]);
        assert_eq!(enc(-1), [op::BININT, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(enc(1 << 31), [op::LONG1, 5, 0, 0, 0, 0x80, 0]);
        assert_eq!(enc(-(1 << 40)), [op::LONG1, 6, 0, 0, 0, 0, 0, 0xff]);
    }
}
