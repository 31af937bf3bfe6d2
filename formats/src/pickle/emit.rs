//! Writing pickle opcodes: the memo and literal opcodes a merge emits on its own account, and
//! the opcodes that rebuild an already decoded (immutable) value.

use std::cell::RefCell;
use std::rc::Rc;

use super::opcodes::op;
use super::value::{Call, Obj, Value};

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

/// Writes opcodes that rebuild `v`, a decoded value (the merge copies values a pickle's
/// prologue made this way). Only immutable values (and calls on them) qualify: a copy of
/// anything mutable would break sharing. `array`, the object being unpickled, is refused too.
pub fn value(
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
        Value::Int(n) => int(out, *n),
        Value::BigInt(b) => long(out, b),
        Value::Float(f) => {
            out.push(op::BINFLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => unicode(out, s),
        Value::Bytes(b) => bytes(out, b),
        Value::Global(g) => global(out, &g.0, &g.1),
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
                value(out, it, array, depth + 1)?;
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
                value(out, it, array, depth + 1)?;
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
            value(out, &o.callable, array, depth + 1)?;
            value(out, &o.args, array, depth + 1)?;
            out.push(code);
            if let Some(state) = &o.state {
                value(out, state, array, depth + 1)?;
                out.push(op::BUILD);
            }
        }
        other => return Err(format!("a {}", other.type_name())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::opcodes::op;
    use crate::pickle::emit;

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
