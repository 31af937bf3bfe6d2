//! Reading fields out of samples: a dotted path into a decoded object-array element (a dict of
//! dicts), numbers out of Python and numpy values, numeric leaves for `examine`, and the
//! canonical byte encoding that de-duplication hashes.
//!
//! numpy values arrive as the calls that rebuild them (never performed, see
//! `crate::pickle`):
//! - a scalar (`np.float32(x)`, `np.bool_`, ...) is `multiarray.scalar(dtype, raw_bytes)`;
//! - an array is `multiarray._reconstruct(ndarray, (0,), b'b')` BUILT with the state
//!   `(1, shape, dtype, fortran, raw_bytes)`;
//! - a dtype is `numpy.dtype('f4', False, True)` BUILT with `(3, '<', ...)`: its kind and size
//!   come from the first argument, its byte order from the state.
//!
//! numpy 1.x and 2.x pickle these alike except for the module (`numpy.core.multiarray` vs
//! `numpy._core.multiarray`), which the canonical encoding treats as one.

use super::header::PyLit;
use crate::pickle::Value;

/// A fixed-size numeric element type: bool, signed or unsigned integer, or float.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NumType {
    /// `b`, `i`, `u` or `f`.
    pub kind: u8,
    pub size: usize,
    pub big_endian: bool,
}

impl NumType {
    /// From numpy's type string (`f4`, `<f4`, `|b1`, `>i2`) and, when the string has none, a
    /// byte-order character (`<`, `>`, `|`, `=`). `None` for anything that is not a plain
    /// number (complex, datetime, strings, structured, `f16` long double).
    pub fn parse(s: &str, order: &str) -> Option<NumType> {
        let (order, s) = match s.as_bytes().first() {
            Some(b'<' | b'>' | b'|' | b'=') => s.split_at(1),
            _ => (order, s),
        };
        let kind = *s.as_bytes().first()?;
        let size: usize = s.get(1..)?.parse().ok()?;
        let ok = match kind {
            b'b' => size == 1,
            b'i' | b'u' => matches!(size, 1 | 2 | 4 | 8),
            b'f' => matches!(size, 2 | 4 | 8),
            _ => false,
        };
        ok.then_some(NumType {
            kind,
            size,
            big_endian: order == ">",
        })
    }

    /// Whether values of this type can be NaN or infinite.
    pub fn is_float(self) -> bool {
        self.kind == b'f'
    }

    /// The value in `b` (exactly `size` bytes).
    pub fn read(self, b: &[u8]) -> f64 {
        let mut le = [0u8; 8];
        le[..self.size].copy_from_slice(&b[..self.size]);
        if self.big_endian {
            le[..self.size].reverse();
        }
        let u = u64::from_le_bytes(le);
        match (self.kind, self.size) {
            (b'b', _) => (u != 0) as u8 as f64,
            (b'u', _) => u as f64,
            (b'i', n) => {
                let shift = 64 - 8 * n as u32;
                ((u << shift) as i64 >> shift) as f64
            }
            (b'f', 2) => crate::half::to_f64(u as u16),
            (b'f', 4) => f32::from_bits(u as u32) as f64,
            (_, _) => f64::from_bits(u),
        }
    }

    /// `type_str` as numpy shows it (`<f4`), for messages.
    pub fn display(self) -> String {
        let order = match (self.size, self.big_endian) {
            (1, _) => '|',
            (_, true) => '>',
            (_, false) => '<',
        };
        format!("{order}{}{}", self.kind as char, self.size)
    }
}

fn is_numpy_module(m: &str) -> bool {
    m == "numpy" || m.starts_with("numpy.")
}

/// The global a recorded call calls, if it is one.
fn callee(o: &crate::pickle::Obj) -> Option<(&str, &str)> {
    match &o.callable {
        Value::Global(g) => Some((g.0.as_str(), g.1.as_str())),
        _ => None,
    }
}

/// The element type of a pickled `numpy.dtype`, when it is a plain number.
fn dtype_of(v: &Value) -> Option<NumType> {
    let Value::Object(o) = v else { return None };
    let o = o.borrow();
    if callee(&o) != Some(("numpy", "dtype")) {
        return None;
    }
    let Value::Tuple(args) = &o.args else {
        return None;
    };
    let Some(Value::Str(s)) = args.items.first() else {
        return None;
    };
    let order = match &o.state {
        Some(Value::Tuple(t)) => match t.items.get(1) {
            Some(Value::Str(c)) => c.as_str().to_string(),
            _ => "|".into(),
        },
        _ => "|".into(),
    };
    NumType::parse(s, &order)
}

/// A numpy scalar or numeric array: its type, element count and raw bytes (`None` when the
/// bytes were too long to keep).
pub(crate) struct NumpyNumbers {
    pub ty: NumType,
    pub count: u64,
    pub data: Option<std::rc::Rc<Vec<u8>>>,
}

impl NumpyNumbers {
    /// Every value, when the bytes were kept and are as long as the shape says.
    pub fn values(&self) -> Option<Vec<f64>> {
        let data = self.data.as_ref()?;
        if data.len() as u64 != self.count.checked_mul(self.ty.size as u64)? {
            return None;
        }
        Some(
            data.chunks_exact(self.ty.size)
                .map(|c| self.ty.read(c))
                .collect(),
        )
    }
}

/// `v` as a numpy scalar or numeric ndarray.
fn numpy_numbers(v: &Value) -> Option<NumpyNumbers> {
    let Value::Object(o) = v else { return None };
    let o = o.borrow();
    let (module, name) = callee(&o)?;
    if !is_numpy_module(module) {
        return None;
    }
    let bytes = |v: Option<&Value>| match v {
        Some(Value::Bytes(b)) => Some(Some(b.clone())),
        Some(Value::Opaque(crate::pickle::Kind::Bytes)) => Some(None),
        _ => None,
    };
    match name {
        "scalar" => {
            let Value::Tuple(args) = &o.args else {
                return None;
            };
            let ty = dtype_of(args.items.first()?)?;
            Some(NumpyNumbers {
                ty,
                count: 1,
                data: bytes(args.items.get(1))?,
            })
        }
        "_reconstruct" => {
            let Some(Value::Tuple(state)) = &o.state else {
                return None;
            };
            let [_, Value::Tuple(shape), dtype, _, data] = state.items.as_slice() else {
                return None;
            };
            let mut count = 1u64;
            for d in &shape.items {
                let Value::Int(n) = d else { return None };
                count = count.checked_mul(u64::try_from(*n).ok()?)?;
            }
            Some(NumpyNumbers {
                ty: dtype_of(dtype)?,
                count,
                data: bytes(Some(data))?,
            })
        }
        _ => None,
    }
}

/// A plain Python number.
fn python_number(v: &Value) -> Option<f64> {
    match v {
        Value::Bool(b) => Some(*b as u8 as f64),
        Value::Int(n) => Some(*n as f64),
        Value::Float(f) => Some(*f),
        Value::BigInt(b) => {
            // Two's complement, little-endian.
            let neg = b.last().is_some_and(|x| x & 0x80 != 0);
            let mag = b.iter().rev().fold(0f64, |acc, &x| {
                acc * 256.0 + if neg { (!x) as f64 } else { x as f64 }
            });
            Some(if neg { -(mag + 1.0) } else { mag })
        }
        _ => None,
    }
}

/// What a value at a field path is, for the filter's messages.
pub(crate) fn describe(v: &Value) -> String {
    if let Some(n) = numpy_numbers(v) {
        return match n.count {
            1 => format!("a numpy value of dtype {}", n.ty.display()),
            c => format!(
                "a numpy array of {c} elements of dtype {} (only 0-d and 1-element arrays compare)",
                n.ty.display()
            ),
        };
    }
    match v {
        Value::Opaque(k) => format!(
            "a {} Quarry did not keep in full (longer than the decoder keeps, or nested too deeply)",
            Value::Opaque(*k).type_name()
        ),
        v => format!("a {}", v.type_name()),
    }
}

/// The filter's number: a Python int/float/bool, a numpy scalar, or a 0-d or 1-element
/// numeric array. `Err` says what the value is instead.
pub(crate) fn as_number(v: &Value) -> Result<f64, String> {
    if let Some(x) = python_number(v) {
        return Ok(x);
    }
    if let Some(n) = numpy_numbers(v)
        && n.count == 1
        && let Some(vals) = n.values()
    {
        return Ok(vals[0]);
    }
    Err(format!("the value is {}, not a number", describe(v)))
}

/// The numbers of a numeric leaf, for `examine`: a Python number, a numpy scalar or numeric
/// array, a non-empty list or tuple of Python numbers. `None` for anything else. The flag
/// says whether the values are floats (so NaN and infinity are problems).
pub(crate) fn leaf_numbers(v: &Value) -> Option<(Vec<f64>, bool)> {
    if let Some(x) = python_number(v) {
        return Some((vec![x], matches!(v, Value::Float(_))));
    }
    if let Some(n) = numpy_numbers(v) {
        return Some((n.values()?, n.ty.is_float()));
    }
    let items = match v {
        Value::Tuple(t) => &t.items,
        Value::List(l) => return leaf_list(&l.borrow().items),
        _ => return None,
    };
    leaf_list(items)
}

fn leaf_list(items: &[Value]) -> Option<(Vec<f64>, bool)> {
    if items.is_empty() {
        return None;
    }
    let vals: Option<Vec<f64>> = items.iter().map(python_number).collect();
    Some((vals?, items.iter().any(|x| matches!(x, Value::Float(_)))))
}

/// The value at key `key` of dict `v` (the last one, as Python keeps).
fn dict_get(v: &Value, key: &str) -> Option<Value> {
    let Value::Dict(m) = v else { return None };
    m.borrow()
        .items
        .iter()
        .rev()
        .find(|(k, _)| matches!(k, Value::Str(s) if s.as_str() == key))
        .map(|(_, v)| v.clone())
}

/// The value at dotted `path` in element `el` (a dict; nested dicts by dots). `Err` says
/// which part is missing or which value is no dict.
pub(crate) fn lookup(el: &Value, path: &str) -> Result<Value, String> {
    let mut cur = el.clone();
    let mut walked = String::new();
    for part in path.split('.') {
        if !matches!(cur, Value::Dict(_)) {
            return Err(if walked.is_empty() {
                format!("the element is a {}, not a dict", cur.type_name())
            } else {
                format!("{walked} is a {}, not a dict", cur.type_name())
            });
        }
        let next = dict_get(&cur, part).ok_or_else(|| {
            let keys = cur
                .dict_keys()
                .map(|k| k.into_iter().collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            if walked.is_empty() {
                format!("no key '{part}' (keys: {keys})")
            } else {
                format!("{walked} has no key '{part}' (keys: {keys})")
            }
        })?;
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
        cur = next;
    }
    Ok(cur)
}

/// Calls `f(path, values, is_float)` for every numeric leaf of `v`, dicts walked by key with
/// dotted paths (`prefix` is the path so far). Keys that are not strings are shown as
/// their repr.
pub(crate) fn numeric_leaves(v: &Value, prefix: &str, f: &mut dyn FnMut(&str, &[f64], bool)) {
    numeric_leaves_at(v, prefix, f, 0);
}

fn numeric_leaves_at(v: &Value, prefix: &str, f: &mut dyn FnMut(&str, &[f64], bool), depth: usize) {
    if depth > 64 {
        return;
    }
    if let Value::Dict(m) = v {
        for (k, item) in m.borrow().items.iter() {
            let key = match k {
                Value::Str(s) => s.to_string(),
                k => k.key_repr(),
            };
            let path = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            numeric_leaves_at(item, &path, f, depth + 1);
        }
    } else if let Some((vals, float)) = leaf_numbers(v) {
        f(prefix, &vals, float);
    }
}

/// Appends a canonical encoding of `v`: equal for values Python sees as the same (dicts in
/// any key order, numpy 1 or 2 module paths), type-tagged so `1` and `1.0` and `True`
/// differ. `Err` names a value whose content was not kept.
pub(crate) fn encode(v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    encode_at(v, out, 0)
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u64).to_le_bytes());
}

fn encode_at(v: &Value, out: &mut Vec<u8>, depth: usize) -> Result<(), String> {
    if depth > 200 {
        return Err("a value nested more than 200 levels deep".into());
    }
    let sorted = |items: &mut dyn Iterator<Item = Result<Vec<u8>, String>>,
                  out: &mut Vec<u8>|
     -> Result<(), String> {
        let mut parts = items.collect::<Result<Vec<_>, _>>()?;
        parts.sort();
        put_len(out, parts.len());
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(())
    };
    let one = |v: &Value| -> Result<Vec<u8>, String> {
        let mut b = Vec::new();
        encode_at(v, &mut b, depth + 1)?;
        Ok(b)
    };
    match v {
        Value::None => out.push(0),
        Value::Bool(b) => out.extend_from_slice(&[1, *b as u8]),
        Value::Int(n) => {
            out.push(2);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Value::BigInt(b) => {
            out.push(3);
            put_len(out, b.len());
            out.extend_from_slice(b);
        }
        Value::Float(f) => {
            out.push(4);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Str(s) => {
            out.push(5);
            put_len(out, s.len());
            out.extend_from_slice(s.as_bytes());
        }
        Value::Bytes(b) => {
            out.push(6);
            put_len(out, b.len());
            out.extend_from_slice(b);
        }
        Value::Tuple(t) => {
            out.push(7);
            put_len(out, t.items.len());
            for it in &t.items {
                encode_at(it, out, depth + 1)?;
            }
        }
        Value::List(l) => {
            out.push(8);
            let l = l.borrow();
            put_len(out, l.items.len());
            for it in &l.items {
                encode_at(it, out, depth + 1)?;
            }
        }
        Value::Dict(m) => {
            out.push(9);
            let m = m.borrow();
            sorted(
                &mut m.items.iter().map(|(k, v)| {
                    let mut b = one(k)?;
                    b.extend_from_slice(&one(v)?);
                    Ok(b)
                }),
                out,
            )?;
        }
        Value::Set(s) => {
            out.push(10);
            sorted(&mut s.borrow().items.iter().map(one), out)?;
        }
        Value::FrozenSet(s) => {
            out.push(11);
            sorted(&mut s.items.iter().map(one), out)?;
        }
        Value::Global(g) => {
            out.push(12);
            let module = match g.0.strip_prefix("numpy.core") {
                Some(rest) if rest.is_empty() || rest.starts_with('.') => {
                    format!("numpy._core{rest}")
                }
                _ => g.0.clone(),
            };
            put_len(out, module.len());
            out.extend_from_slice(module.as_bytes());
            put_len(out, g.1.len());
            out.extend_from_slice(g.1.as_bytes());
        }
        Value::Object(o) => {
            out.push(13);
            let o = o.borrow();
            out.push(o.call as u8);
            encode_at(&o.callable, out, depth + 1)?;
            encode_at(&o.args, out, depth + 1)?;
            match &o.state {
                Some(s) => {
                    out.push(1);
                    encode_at(s, out, depth + 1)?;
                }
                None => out.push(0),
            }
        }
        Value::Opaque(_) | Value::Keys(_) | Value::DataList => {
            return Err(describe(v));
        }
    }
    Ok(())
}

/// One field of a structured dtype, nested fields named by dotted paths.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StructField {
    pub path: String,
    /// Byte offset inside a row.
    pub offset: usize,
    /// Bytes of the whole field (subarray included).
    pub size: usize,
    /// The element type when it is a plain number (`None` for strings, nested structs, ...).
    pub num: Option<NumType>,
    /// Elements in the field: the product of its subarray shape (1 without one).
    pub count: usize,
    /// The field's dtype as the header writes it, for messages.
    pub descr: String,
}

/// Every field of a structured descr (nested ones too, after their parent), or `None` for a
/// plain dtype. Unnamed (`''`) fields are numpy's padding and are left out.
pub(crate) fn struct_fields(lit: &PyLit) -> Option<Vec<StructField>> {
    let PyLit::List(_) = lit else { return None };
    let mut out = Vec::new();
    walk_struct(lit, "", 0, &mut out)?;
    Some(out)
}

fn lit_size(lit: &PyLit) -> Option<usize> {
    match lit {
        PyLit::Str(s) => {
            let s = s.trim_start_matches(['<', '>', '|', '=']);
            let end = s.find('[').unwrap_or(s.len());
            let (kind, n) = s[..end].split_at(s[..end].char_indices().nth(1)?.0);
            let n: usize = n.parse().ok()?;
            Some(if kind == "U" { n.checked_mul(4)? } else { n })
        }
        PyLit::List(fields) => fields.iter().try_fold(0usize, |acc, f| {
            let PyLit::Tuple(parts) = f else { return None };
            acc.checked_add(lit_size(parts.get(1)?)?.checked_mul(sub_count(parts.get(2))?)?)
        }),
        _ => None,
    }
}

fn sub_count(sub: Option<&PyLit>) -> Option<usize> {
    match sub {
        None => Some(1),
        Some(PyLit::Int(n)) => usize::try_from(*n).ok(),
        Some(PyLit::Tuple(d)) => d.iter().try_fold(1usize, |acc, x| match x {
            PyLit::Int(n) => acc.checked_mul(usize::try_from(*n).ok()?),
            _ => None,
        }),
        _ => None,
    }
}

fn walk_struct(lit: &PyLit, prefix: &str, base: usize, out: &mut Vec<StructField>) -> Option<()> {
    let PyLit::List(fields) = lit else {
        return Some(());
    };
    let mut offset = base;
    for f in fields {
        let PyLit::Tuple(parts) = f else { return None };
        let name = match parts.first()? {
            PyLit::Str(s) => s.clone(),
            // (title, name)
            PyLit::Tuple(t) => match t.get(1)? {
                PyLit::Str(s) => s.clone(),
                _ => return None,
            },
            _ => return None,
        };
        let ty = parts.get(1)?;
        let count = sub_count(parts.get(2))?;
        let size = lit_size(ty)?.checked_mul(count)?;
        if !name.is_empty() {
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}.{name}")
            };
            let num = match ty {
                PyLit::Str(s) => NumType::parse(s, "|"),
                _ => None,
            };
            out.push(StructField {
                path: path.clone(),
                offset,
                size,
                num,
                count,
                descr: ty.repr(),
            });
            if count == 1 {
                walk_struct(ty, &path, offset, out)?;
            }
        }
        offset = offset.checked_add(size)?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbers_of_every_width_and_order() {
        let t = |s| NumType::parse(s, "<").unwrap();
        assert_eq!(t("<f4").read(&1.5f32.to_le_bytes()), 1.5);
        assert_eq!(t(">f8").read(&(-2.25f64).to_be_bytes()), -2.25);
        assert_eq!(t("<i2").read(&(-3i16).to_le_bytes()), -3.0);
        assert_eq!(t(">i4").read(&(-7i32).to_be_bytes()), -7.0);
        assert_eq!(t("u1").read(&[200]), 200.0);
        assert_eq!(t("|b1").read(&[1]), 1.0);
        assert_eq!(t("f2").read(&0x3c00u16.to_le_bytes()), 1.0);
        assert_eq!(t("f2").read(&0xc000u16.to_le_bytes()), -2.0);
        assert!(t("f2").read(&0x7e00u16.to_le_bytes()).is_nan());
        for bad in ["c8", "S3", "f16", "M8", "O8", "i3"] {
            assert_eq!(NumType::parse(bad, "<"), None, "{bad}");
        }
    }

    #[test]
    fn struct_fields_have_offsets() {
        let lit = PyLit::parse(
            "[('a', '<f4'), ('b', '<i8', (2,)), ('c', '|S3'), (('Title', 't'), '<i4'), \
             ('d', [('x', '|u1'), ('y', '>f8')]), ('', '|V3'), ('e', '<u2')]",
        )
        .unwrap();
        let f = struct_fields(&lit).unwrap();
        let brief: Vec<(&str, usize, usize, usize)> = f
            .iter()
            .map(|f| (f.path.as_str(), f.offset, f.size, f.count))
            .collect();
        assert_eq!(
            brief,
            [
                ("a", 0, 4, 1),
                ("b", 4, 16, 2),
                ("c", 20, 3, 1),
                ("t", 23, 4, 1),
                ("d", 27, 9, 1),
                ("d.x", 27, 1, 1),
                ("d.y", 28, 8, 1),
                ("e", 39, 2, 1),
            ]
        );
        assert!(f[0].num.is_some() && f[2].num.is_none() && f[4].num.is_none());
        assert!(struct_fields(&PyLit::Str("<f4".into())).is_none());
    }
}
