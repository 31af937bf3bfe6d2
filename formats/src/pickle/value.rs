//! The value model of the pickle engine: what [`super::Decoder`] builds from opcodes. Calls
//! (`REDUCE`, `NEWOBJ`, `BUILD`) are recorded as [`Obj`]s, never performed; long strings and
//! bytes may be kept as their kind only ([`Value::Opaque`]), and nesting is capped so dropping
//! or printing a value never recurses without bound.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

use crate::npy::header::py_str_repr;

/// Containers nested deeper than this are summarised, so dropping or printing a value never
/// recurses without bound.
pub(super) const MAX_NEST: u16 = 200;
/// Key reprs are cut here so a key that is a huge tuple cannot make a huge schema string.
const MAX_KEY_REPR: usize = 200;

/// Kinds of value whose content was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Int,
    Str,
    Bytes,
    ByteArray,
    Tuple,
    List,
    Set,
    FrozenSet,
    Object,
    /// Nested past [`MAX_NEST`].
    Deep,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Int => "int",
            Kind::Str => "str",
            Kind::Bytes => "bytes",
            Kind::ByteArray => "bytearray",
            Kind::Tuple => "tuple",
            Kind::List => "list",
            Kind::Set => "set",
            Kind::FrozenSet => "frozenset",
            Kind::Object => "object",
            Kind::Deep => "deeply nested value",
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Seq {
    pub items: Vec<Value>,
    pub(super) depth: u16,
    /// Placed inside another value: no longer changed (see [`Value::nest`]).
    pub(super) nested: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Map {
    pub items: Vec<(Value, Value)>,
    pub(super) depth: u16,
    /// Placed inside another value: no longer changed (see [`Value::nest`]).
    pub(super) nested: bool,
}

/// A recorded call: `callable(*args)` (or `cls.__new__(cls, *args)`), then `__setstate__`.
#[derive(Debug)]
pub(crate) struct Obj {
    pub callable: Value,
    pub args: Value,
    pub state: Option<Value>,
    pub call: Call,
    pub(super) depth: u16,
    /// Placed inside another value: no longer changed (see [`Value::nest`]).
    pub(super) nested: bool,
}

/// Which opcode made an [`Obj`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// `REDUCE`: `callable(*args)`.
    Reduce,
    /// `NEWOBJ`: `cls.__new__(cls, *args)`.
    NewObj,
    /// `NEWOBJ_EX`, `INST`, `OBJ`: recorded for structure only.
    Other,
}

/// A decoded pickle value. Mutable containers are shared (`Rc`), as in Python, so a memo
/// entry sees items added after it was memoized.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// Two's-complement little-endian bytes of an int too wide for `i64`.
    BigInt(Rc<Vec<u8>>),
    Float(f64),
    Str(Rc<String>),
    Bytes(Rc<Vec<u8>>),
    /// A value whose content was dropped: too long, or compacted away.
    Opaque(Kind),
    Tuple(Rc<Seq>),
    List(Rc<RefCell<Seq>>),
    Dict(Rc<RefCell<Map>>),
    Set(Rc<RefCell<Seq>>),
    FrozenSet(Rc<Seq>),
    Global(Rc<(String, String)>),
    Object(Rc<RefCell<Obj>>),
    /// A dict reduced to its key set after its element was done.
    Keys(Rc<KeySet>),
    /// The list holding the array's elements, which the decoder hands out instead of keeping.
    DataList,
}

/// A dict's keys as the schema shows them, sorted.
pub(crate) type KeySet = BTreeSet<String>;

impl Value {
    /// Marks a mutable container as placed inside another value. The decoder refuses to
    /// change a nested container: Python's pickler only does so to close a cycle (`d = {};
    /// d["self"] = d`, or two dicts holding each other), and a container grown after it was
    /// nested would make its holders' [`MAX_NEST`] depth stale. So every value the decoder
    /// builds is a finite tree (a DAG where memo entries are shared), and its depth is exact.
    pub(super) fn nest(&self) {
        match self {
            Value::List(s) | Value::Set(s) => s.borrow_mut().nested = true,
            Value::Dict(m) => m.borrow_mut().nested = true,
            Value::Object(o) => o.borrow_mut().nested = true,
            _ => {}
        }
    }

    /// Whether this is a mutable container already placed inside another value.
    pub(super) fn is_nested(&self) -> bool {
        match self {
            Value::List(s) | Value::Set(s) => s.borrow().nested,
            Value::Dict(m) => m.borrow().nested,
            Value::Object(o) => o.borrow().nested,
            _ => false,
        }
    }

    /// Whether `self` and `other` are the same mutable container.
    pub(super) fn same_container(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::List(a), Value::List(b)) | (Value::Set(a), Value::Set(b)) => Rc::ptr_eq(a, b),
            (Value::Dict(a), Value::Dict(b)) => Rc::ptr_eq(a, b),
            (Value::Object(a), Value::Object(b)) => Rc::ptr_eq(a, b),
            _ => false,
        }
    }

    pub(super) fn depth(&self) -> u16 {
        match self {
            Value::Tuple(s) | Value::FrozenSet(s) => s.depth,
            Value::List(s) | Value::Set(s) => s.borrow().depth,
            Value::Dict(m) => m.borrow().depth,
            Value::Object(o) => o.borrow().depth,
            _ => 0,
        }
    }

    /// The Python type name, for messages.
    pub fn type_name(&self) -> String {
        match self {
            Value::None => "NoneType".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Opaque(k) => k.name().into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) | Value::DataList => "list".into(),
            Value::Dict(_) | Value::Keys(_) => "dict".into(),
            Value::Set(_) => "set".into(),
            Value::FrozenSet(_) => "frozenset".into(),
            Value::Global(g) => format!("global {}.{}", g.0, g.1),
            Value::Object(o) => match &o.borrow().callable {
                Value::Global(g) => format!("{}.{}(...)", g.0, g.1),
                _ => "object".into(),
            },
        }
    }

    /// How a dict key appears in a schema: plain identifiers bare, anything else as Python's
    /// `repr` would show it.
    pub fn key_repr(&self) -> String {
        let mut s = String::new();
        self.write_key(&mut s, true);
        if s.len() > MAX_KEY_REPR {
            let mut cut = MAX_KEY_REPR;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push_str("...");
        }
        s
    }

    fn write_key(&self, out: &mut String, top: bool) {
        if out.len() > MAX_KEY_REPR {
            return;
        }
        match self {
            Value::Str(s) => {
                let bare = !s.is_empty()
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b));
                if top && bare {
                    out.push_str(s);
                } else {
                    out.push_str(&py_str_repr(s));
                }
            }
            Value::None => out.push_str("None"),
            Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
            Value::Int(n) => out.push_str(&n.to_string()),
            Value::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 => {
                out.push_str(&format!("{f:.1}"))
            }
            Value::Float(f) => out.push_str(&format!("{f}")),
            Value::Bytes(b) => {
                out.push('b');
                let text: String = b.iter().map(|&c| c as char).collect();
                out.push_str(&py_str_repr(&text));
            }
            Value::Tuple(t) => {
                out.push('(');
                for (i, it) in t.items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    it.write_key(out, false);
                }
                if t.items.len() == 1 {
                    out.push(',');
                }
                out.push(')');
            }
            other => {
                out.push('<');
                out.push_str(&other.type_name());
                out.push('>');
            }
        }
    }

    /// A string identifying a summary value, for interning memo entries; `None` for whole
    /// containers and objects, which are never interned.
    pub fn intern_key(&self) -> Option<String> {
        Some(match self {
            Value::None => "N".into(),
            Value::Bool(b) => format!("B{b}"),
            Value::Int(n) => format!("i{n}"),
            Value::BigInt(b) => format!("I{b:?}"),
            Value::Float(f) => format!("f{}", f.to_bits()),
            Value::Str(s) => format!("s{s}"),
            Value::Bytes(b) => format!("b{b:?}"),
            Value::Opaque(k) => format!("o{k:?}"),
            Value::Global(g) => format!("g{}\n{}", g.0, g.1),
            Value::Keys(k) => {
                let mut s = String::from("k");
                for key in k.iter() {
                    s.push_str(key);
                    s.push('\0');
                }
                s
            }
            Value::Tuple(_) => format!("t{}", self.key_repr()),
            Value::DataList => "L".into(),
            Value::List(_)
            | Value::Dict(_)
            | Value::Set(_)
            | Value::FrozenSet(_)
            | Value::Object(_) => {
                return None;
            }
        })
    }

    /// Whether this value's key repr is in `set`, without building the repr for plain names.
    pub fn key_in(&self, set: &KeySet) -> bool {
        match self {
            Value::Str(s) if is_bare(s) => set.contains(s.as_str()),
            _ => set.contains(&self.key_repr()),
        }
    }

    /// For a dict, whether its key set is exactly `set` (cheaply in the common case of a match);
    /// `None` for anything else.
    pub fn has_keys(&self, set: &KeySet) -> Option<bool> {
        match self {
            Value::Dict(m) => {
                let items = &m.borrow().items;
                if items.len() != set.len() || items.len() > 64 {
                    return Some(self.dict_keys().as_ref() == Some(set));
                }
                if !items.iter().all(|(k, _)| k.key_in(set)) {
                    return Some(false);
                }
                // Same length, all keys known: equal unless a key repeats, which pickled dicts
                // never do but a hand-made stream could.
                let repeats = (1..items.len())
                    .any(|i| items[..i].iter().any(|(k, _)| k.same_key(&items[i].0)));
                Some(!repeats)
            }
            Value::Keys(k) => Some(**k == *set),
            _ => None,
        }
    }

    fn same_key(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Str(a), Value::Str(b)) => a == b,
            _ => self.key_repr() == other.key_repr(),
        }
    }

    /// The key set if this is a dict (whole or compacted).
    pub fn dict_keys(&self) -> Option<KeySet> {
        match self {
            Value::Dict(m) => Some(m.borrow().items.iter().map(|(k, _)| k.key_repr()).collect()),
            Value::Keys(k) => Some((**k).clone()),
            _ => None,
        }
    }
}

/// Keys shown without quotes in a schema: non-empty, letters, digits and `_-./`.
pub(crate) fn is_bare(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b))
}
