//! The pickle opcode table: every opcode byte, its name, how its argument is laid out, what
//! it does to the stack, and [`complete_len`], the fast length check that lets callers take
//! whole ops straight out of a read buffer.

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
/// [`super::OpReader::next_op`]: text-line arguments (rare from protocol 3 on), signed lengths
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
/// `s` and it is of a common form; `None` leaves it to [`super::OpReader::next_op`], which reads
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
