//! The `.npy` header: magic, version, and the Python dict literal that says descr, order and
//! shape. Read tolerantly (any version numpy ever wrote), written exactly as numpy writes it so
//! a merged file's header is byte-identical to `np.save` of the same array.

use std::io::Read;

use super::FormatError;

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// numpy pads the header so the data starts on a multiple of this.
const ARRAY_ALIGN: usize = 64;
/// numpy leaves room for the first axis to grow to this many digits without moving the data.
const GROWTH_AXIS_MAX_DIGITS: usize = 21;
/// Refuse absurd header lengths instead of allocating them; numpy's own default limit is 10,000.
const MAX_HEADER_LEN: usize = 16 << 20;

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Header {
    pub version: (u8, u8),
    pub descr: Descr,
    pub fortran_order: bool,
    pub shape: Vec<u64>,
    /// Bytes before the array data: magic, version, length field, header text.
    pub data_offset: u64,
}

/// The array's element type as far as merging cares.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Descr {
    /// `|O`: the data is a pickle.
    Object,
    /// Fixed-size elements stored raw. `lit` is the descr as parsed (`'<f4'`,
    /// `[('a', '<f4'), ('b', '<i8', (2,))]`); its repr is what numpy writes back.
    Numeric { lit: PyLit, itemsize: u64 },
}

impl Descr {
    /// The descr as the schema shows it: `<f4` for plain dtypes, the list repr for structured.
    pub fn display(&self) -> String {
        match self {
            Descr::Object => "|O".to_string(),
            Descr::Numeric {
                lit: PyLit::Str(s), ..
            } => s.clone(),
            Descr::Numeric { lit, .. } => lit.repr(),
        }
    }

    fn lit_repr(&self) -> String {
        match self {
            Descr::Object => PyLit::Str("|O".into()).repr(),
            Descr::Numeric { lit, .. } => lit.repr(),
        }
    }
}

fn bad(reason: impl Into<String>) -> FormatError {
    FormatError::BadHeader {
        reason: reason.into(),
    }
}

/// Reads exactly the header bytes, leaving `r` at the first data byte. Reads no further, so a
/// caller can hand `r` on to a raw copy.
pub(crate) fn read_header<R: Read + ?Sized>(r: &mut R) -> Result<Header, FormatError> {
    let mut pre = [0u8; 8];
    read_exact_or_truncated(r, &mut pre, 0, "npy header")?;
    if &pre[..6] != MAGIC {
        return Err(bad("missing \\x93NUMPY magic (not an .npy file)"));
    }
    let version = (pre[6], pre[7]);
    let (len_bytes, utf8) = match version {
        (1, 0) => (2usize, false),
        (2, 0) => (4, false),
        (3, 0) => (4, true),
        (a, b) => return Err(bad(format!("unknown format version {a}.{b}"))),
    };
    let mut lb = [0u8; 4];
    read_exact_or_truncated(r, &mut lb[..len_bytes], 8, "npy header")?;
    let hlen = u32::from_le_bytes(lb) as usize;
    if hlen > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {hlen} exceeds {MAX_HEADER_LEN}"
        )));
    }
    let mut text = vec![0u8; hlen];
    read_exact_or_truncated(r, &mut text, (8 + len_bytes) as u64, "npy header")?;
    let text: String = if utf8 {
        String::from_utf8(text).map_err(|_| bad("version 3.0 header is not UTF-8"))?
    } else {
        // Versions 1 and 2 are latin-1: every byte is the code point of the same value.
        text.iter().map(|&b| b as char).collect()
    };
    let data_offset = (8 + len_bytes + hlen) as u64;
    parse_header_text(&text, version, data_offset)
}

fn read_exact_or_truncated<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    at: u64,
    what: &str,
) -> Result<(), FormatError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(FormatError::Truncated {
                    what: what.into(),
                    expected: at + buf.len() as u64,
                    actual: at + got as u64,
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn parse_header_text(
    text: &str,
    version: (u8, u8),
    data_offset: u64,
) -> Result<Header, FormatError> {
    let lit = PyLit::parse(text).map_err(|e| bad(format!("{e} in {:?}", text.trim_end())))?;
    let PyLit::Dict(items) = lit else {
        return Err(bad("header is not a dict"));
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (k, v) in items {
        match k {
            PyLit::Str(k) if k == "descr" => descr = Some(v),
            PyLit::Str(k) if k == "fortran_order" => match v {
                PyLit::Bool(b) => fortran = Some(b),
                _ => return Err(bad("fortran_order is not a bool")),
            },
            PyLit::Str(k) if k == "shape" => match v {
                PyLit::Tuple(dims) => {
                    let dims = dims
                        .into_iter()
                        .map(|d| match d {
                            PyLit::Int(n) => u64::try_from(n).ok(),
                            _ => None,
                        })
                        .collect::<Option<Vec<u64>>>()
                        .ok_or_else(|| bad("shape is not a tuple of non-negative ints"))?;
                    shape = Some(dims);
                }
                _ => return Err(bad("shape is not a tuple")),
            },
            other => return Err(bad(format!("unexpected key {}", other.repr()))),
        }
    }
    let (Some(descr), Some(fortran_order), Some(shape)) = (descr, fortran, shape) else {
        return Err(bad("header lacks one of 'descr', 'fortran_order', 'shape'"));
    };
    let descr = parse_descr(descr)?;
    Ok(Header {
        version,
        descr,
        fortran_order,
        shape,
        data_offset,
    })
}

fn parse_descr(lit: PyLit) -> Result<Descr, FormatError> {
    if has_object(&lit)? {
        return match &lit {
            PyLit::Str(_) => Ok(Descr::Object),
            _ => Err(FormatError::Unsupported {
                reason: "structured dtype with object fields".into(),
            }),
        };
    }
    let itemsize = itemsize(&lit)?;
    Ok(Descr::Numeric { lit, itemsize })
}

#[cfg(test)]
pub(crate) fn parse_descr_for_tests(s: &str) -> Descr {
    parse_descr(PyLit::Str(s.into())).expect("valid descr")
}

/// Splits `<f4`, `|b1`, `<M8[ns]` into (kind, size). numpy's `dtype.str` always has this form.
fn simple_parts(s: &str) -> Option<(char, Option<u64>)> {
    let s = s.strip_prefix(['<', '>', '|', '=']).unwrap_or(s);
    let s = match s.find('[') {
        Some(i) if s.ends_with(']') => &s[..i],
        Some(_) => return None,
        None => s,
    };
    let mut chars = s.chars();
    let kind = chars.next()?;
    let digits = chars.as_str();
    if digits.is_empty() {
        return Some((kind, None));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((kind, digits.parse().ok()))
}

fn has_object(lit: &PyLit) -> Result<bool, FormatError> {
    match lit {
        PyLit::Str(s) => match simple_parts(s) {
            Some(('O', _)) => Ok(true),
            Some(_) => Ok(false),
            None => Err(bad(format!("unrecognised descr {}", lit.repr()))),
        },
        PyLit::List(fields) => {
            for f in fields {
                match f {
                    PyLit::Tuple(parts) if parts.len() == 2 || parts.len() == 3 => {
                        if has_object(&parts[1])? {
                            return Ok(true);
                        }
                    }
                    _ => return Err(bad(format!("bad structured field {}", f.repr()))),
                }
            }
            Ok(false)
        }
        _ => Err(bad(format!("unrecognised descr {}", lit.repr()))),
    }
}

fn itemsize(lit: &PyLit) -> Result<u64, FormatError> {
    match lit {
        PyLit::Str(s) => match simple_parts(s) {
            Some(('U', Some(n))) => n.checked_mul(4).ok_or_else(|| bad("itemsize overflows")),
            Some((k, Some(n))) if "biufcSVMma".contains(k) => Ok(n),
            _ => Err(bad(format!("unrecognised descr {}", lit.repr()))),
        },
        PyLit::List(fields) => {
            let mut total: u64 = 0;
            for f in fields {
                let PyLit::Tuple(parts) = f else {
                    return Err(bad(format!("bad structured field {}", f.repr())));
                };
                let mut size = itemsize(&parts[1])?;
                if let Some(sub) = parts.get(2) {
                    let dims = match sub {
                        PyLit::Int(n) => vec![*n],
                        PyLit::Tuple(d) => d
                            .iter()
                            .map(|x| match x {
                                PyLit::Int(n) => Ok(*n),
                                _ => Err(bad("subarray shape is not ints")),
                            })
                            .collect::<Result<_, _>>()?,
                        _ => return Err(bad("subarray shape is not ints")),
                    };
                    for d in dims {
                        let d = u64::try_from(d).map_err(|_| bad("negative subarray dim"))?;
                        size = size
                            .checked_mul(d)
                            .ok_or_else(|| bad("itemsize overflows"))?;
                    }
                }
                total = total
                    .checked_add(size)
                    .ok_or_else(|| bad("itemsize overflows"))?;
            }
            Ok(total)
        }
        _ => Err(bad(format!("unrecognised descr {}", lit.repr()))),
    }
}

/// Formats a shape the way Python's `repr(tuple)` does.
pub(crate) fn shape_repr(shape: &[u64]) -> String {
    match shape {
        [] => "()".into(),
        [n] => format!("({n},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    }
}

/// Builds the header bytes numpy's `_write_array_header` would write for this array (C order):
/// sorted keys, growth padding for the first axis, aligned to 64 bytes, ended by `\n`, in the
/// oldest version that can hold it.
pub(crate) fn write_header(descr: &Descr, shape: &[u64]) -> Result<Vec<u8>, FormatError> {
    let mut text = format!(
        "{{'descr': {}, 'fortran_order': False, 'shape': {}, }}",
        descr.lit_repr(),
        shape_repr(shape)
    );
    if let Some(first) = shape.first() {
        let digits = first.to_string().len();
        text.extend(std::iter::repeat_n(
            ' ',
            GROWTH_AXIS_MAX_DIGITS.saturating_sub(digits),
        ));
    }
    let latin1 = text.chars().all(|c| (c as u32) < 256);
    let encoded: Vec<u8> = if latin1 {
        text.chars().map(|c| c as u8).collect()
    } else {
        text.into_bytes()
    };
    let wrap = |len_bytes: usize| -> (usize, usize) {
        let hlen = encoded.len() + 1;
        let pad = ARRAY_ALIGN - (MAGIC.len() + 2 + len_bytes + hlen) % ARRAY_ALIGN;
        (hlen + pad, pad)
    };
    let (version, len_bytes) = if !latin1 {
        ((3u8, 0u8), 4usize)
    } else if wrap(2).0 < 65536 {
        ((1, 0), 2)
    } else {
        ((2, 0), 4)
    };
    let (total, pad) = wrap(len_bytes);
    let total32 = u32::try_from(total).map_err(|_| bad("header too long to write"))?;
    let mut out = Vec::with_capacity(8 + len_bytes + total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[version.0, version.1]);
    out.extend_from_slice(&total32.to_le_bytes()[..len_bytes]);
    out.extend_from_slice(&encoded);
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    Ok(out)
}

/// The subset of Python literals an npy header uses.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PyLit {
    Str(String),
    Int(i128),
    Bool(bool),
    None,
    Tuple(Vec<PyLit>),
    List(Vec<PyLit>),
    Dict(Vec<(PyLit, PyLit)>),
}

impl PyLit {
    /// Parses one literal filling all of `text` (surrounding whitespace allowed).
    pub fn parse(text: &str) -> Result<PyLit, String> {
        let mut p = LitParser {
            s: text.as_bytes(),
            text,
            i: 0,
        };
        let v = p.value(0)?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing text at {}", p.i));
        }
        Ok(v)
    }

    /// Python's `repr` of the literal.
    pub fn repr(&self) -> String {
        let mut s = String::new();
        self.write_repr(&mut s);
        s
    }

    fn write_repr(&self, out: &mut String) {
        match self {
            PyLit::Str(s) => out.push_str(&py_str_repr(s)),
            PyLit::Int(n) => out.push_str(&n.to_string()),
            PyLit::Bool(true) => out.push_str("True"),
            PyLit::Bool(false) => out.push_str("False"),
            PyLit::None => out.push_str("None"),
            PyLit::Tuple(items) => {
                out.push('(');
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    it.write_repr(out);
                }
                if items.len() == 1 {
                    out.push(',');
                }
                out.push(')');
            }
            PyLit::List(items) => {
                out.push('[');
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    it.write_repr(out);
                }
                out.push(']');
            }
            PyLit::Dict(items) => {
                out.push('{');
                for (i, (k, v)) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    k.write_repr(out);
                    out.push_str(": ");
                    v.write_repr(out);
                }
                out.push('}');
            }
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`.
pub(crate) fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..=0xa0).contains(&(c as u32)) || c == '\u{ad}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

struct LitParser<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
}

/// Deeper nesting than any dtype needs; stops a hostile header from exhausting the stack.
const MAX_LIT_DEPTH: usize = 64;

impl LitParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn value(&mut self, depth: usize) -> Result<PyLit, String> {
        if depth > MAX_LIT_DEPTH {
            return Err("literal nested too deeply".into());
        }
        self.ws();
        match self.peek() {
            Some(b'\'') | Some(b'"') => self.string().map(PyLit::Str),
            Some(b'(') => {
                self.i += 1;
                let (items, trailing_comma) = self.seq(b')', depth)?;
                // `(x)` is just x in Python; only `(x,)` is a one-tuple.
                if items.len() == 1 && !trailing_comma {
                    return Ok(items.into_iter().next().unwrap_or(PyLit::None));
                }
                Ok(PyLit::Tuple(items))
            }
            Some(b'[') => {
                self.i += 1;
                Ok(PyLit::List(self.seq(b']', depth)?.0))
            }
            Some(b'{') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                        return Ok(PyLit::Dict(items));
                    }
                    let k = self.value(depth + 1)?;
                    self.ws();
                    if self.peek() != Some(b':') {
                        return Err(format!("expected ':' at {}", self.i));
                    }
                    self.i += 1;
                    let v = self.value(depth + 1)?;
                    items.push((k, v));
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {}
                        _ => return Err(format!("expected ',' or '}}' at {}", self.i)),
                    }
                }
            }
            Some(c) if c == b'-' || c == b'+' || c.is_ascii_digit() => self.int(),
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.i;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
                {
                    self.i += 1;
                }
                match &self.text[start..self.i] {
                    "True" => Ok(PyLit::Bool(true)),
                    "False" => Ok(PyLit::Bool(false)),
                    "None" => Ok(PyLit::None),
                    w => Err(format!("unexpected name {w:?}")),
                }
            }
            Some(_) => Err(format!("unexpected character at {}", self.i)),
            None => Err("unexpected end of header".into()),
        }
    }

    /// Items up to `close`; also says whether a comma preceded it.
    fn seq(&mut self, close: u8, depth: usize) -> Result<(Vec<PyLit>, bool), String> {
        let mut items = Vec::new();
        let mut comma = false;
        loop {
            self.ws();
            if self.peek() == Some(close) {
                self.i += 1;
                return Ok((items, comma));
            }
            items.push(self.value(depth + 1)?);
            self.ws();
            comma = false;
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    comma = true;
                }
                Some(c) if c == close => {}
                _ => return Err(format!("expected ',' or '{}' at {}", close as char, self.i)),
            }
        }
    }

    fn int(&mut self) -> Result<PyLit, String> {
        let start = self.i;
        if matches!(self.peek(), Some(b'-' | b'+')) {
            self.i += 1;
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        let n: i128 = self.text[start..self.i]
            .parse()
            .map_err(|_| format!("bad integer at {start}"))?;
        // Python 2 era headers wrote longs as `3L`; numpy strips the suffix too.
        if matches!(self.peek(), Some(b'L' | b'l')) {
            self.i += 1;
        }
        Ok(PyLit::Int(n))
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = self.s[self.i];
        self.i += 1;
        let mut out = String::new();
        loop {
            let rest = &self.text[self.i..];
            let mut chars = rest.chars();
            let Some(c) = chars.next() else {
                return Err("unterminated string".into());
            };
            self.i += c.len_utf8();
            if c as u32 == quote as u32 {
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some(e) = chars.next() else {
                return Err("unterminated string".into());
            };
            self.i += e.len_utf8();
            let hex = |p: &mut Self, n: usize| -> Result<char, String> {
                let h = p.text.get(p.i..p.i + n).ok_or("short escape")?;
                p.i += n;
                u32::from_str_radix(h, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| format!("bad escape \\{h}"))
            };
            match e {
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                '0' => out.push('\0'),
                '\\' | '\'' | '"' => out.push(e),
                'x' => out.push(hex(self, 2)?),
                'u' => out.push(hex(self, 4)?),
                'U' => out.push(hex(self, 8)?),
                other => return Err(format!("unsupported escape \\{other}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(s: &str) -> Descr {
        parse_descr(PyLit::parse(s).unwrap()).unwrap()
    }

    #[test]
    fn round_trips_through_write_and_read() {
        for (descr, shape) in [
            ("'<f4'", vec![7u64, 3, 4]),
            ("'|u1'", vec![0]),
            ("'<U5'", vec![12345678901]),
            ("[('a', '<f4'), ('b', '<i8', (2,))]", vec![2]),
        ] {
            let d = numeric(descr);
            let bytes = write_header(&d, &shape).unwrap();
            assert_eq!(bytes.len() % ARRAY_ALIGN, 0);
            assert_eq!(*bytes.last().unwrap(), b'\n');
            let h = read_header(&mut &bytes[..]).unwrap();
            assert_eq!(h.descr, d);
            assert_eq!(h.shape, shape);
            assert!(!h.fortran_order);
            assert_eq!(h.data_offset, bytes.len() as u64);
            assert_eq!(h.version, (1, 0));
        }
    }

    #[test]
    fn matches_numpy_bytes() {
        // Bytes of `np.save(f, np.zeros((2, 3), '<f4'))`'s header, numpy 1.26 and 2.x alike.
        let mut want =
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
                .to_vec();
        want.resize(127, b' ');
        want.push(b'\n');
        assert_eq!(write_header(&numeric("'<f4'"), &[2, 3]).unwrap(), want);
    }

    #[test]
    fn itemsizes() {
        let size = |s: &str| match numeric(s) {
            Descr::Numeric { itemsize, .. } => itemsize,
            Descr::Object => panic!(),
        };
        assert_eq!(size("'<f8'"), 8);
        assert_eq!(size("'|b1'"), 1);
        assert_eq!(size("'<U3'"), 12);
        assert_eq!(size("'<M8[ns]'"), 8);
        assert_eq!(
            size("[('x', '<f4', (2, 3)), ('', '|V4'), ('n', [('a', '<i2')])]"),
            30
        );
        assert_eq!(numeric("'|O'"), Descr::Object);
    }

    #[test]
    fn refuses_bad_headers() {
        let full = write_header(&numeric("'<f4'"), &[2]).unwrap();
        for cut in [0, 5, 9, 20, full.len() - 1] {
            let e = read_header(&mut &full[..cut]).unwrap_err();
            assert!(matches!(e, FormatError::Truncated { .. }), "{cut}: {e}");
        }
        let mut wrong = full.clone();
        wrong[0] = b'X';
        assert!(matches!(
            read_header(&mut &wrong[..]),
            Err(FormatError::BadHeader { .. })
        ));
        for text in [
            "{'descr': '<f4', 'shape': (2,), }",
            "{'descr': '<f4', 'fortran_order': 1, 'shape': (2,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }",
            "{'descr': 'zz', 'fortran_order': False, 'shape': (2,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
            "['descr']",
        ] {
            assert!(parse_header_text(text, (1, 0), 0).is_err(), "{text}");
        }
        let obj = "{'descr': [('a', '|O')], 'fortran_order': False, 'shape': (2,), }";
        assert!(matches!(
            parse_header_text(obj, (1, 0), 0),
            Err(FormatError::Unsupported { .. })
        ));
    }

    #[test]
    fn parses_python_literals() {
        let v = PyLit::parse(r#"{"a\"b": (1L,), 'c': [(), (2)], 'd': '\u00e9\x41'}"#).unwrap();
        assert_eq!(
            v,
            PyLit::Dict(vec![
                (PyLit::Str("a\"b".into()), PyLit::Tuple(vec![PyLit::Int(1)])),
                (
                    PyLit::Str("c".into()),
                    PyLit::List(vec![PyLit::Tuple(vec![]), PyLit::Int(2)])
                ),
                (PyLit::Str("d".into()), PyLit::Str("éA".into())),
            ])
        );
        assert_eq!(py_str_repr("it's"), "\"it's\"");
        assert_eq!(py_str_repr("a'\"\n"), "'a\\'\"\\n'");
    }
}
