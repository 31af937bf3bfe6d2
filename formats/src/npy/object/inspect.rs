//! Checking an object array without merging it: the whole pickle scanned, every element
//! compared with element 0 (dicts with one key set, or no dicts at all), the schema derived.
//! Memo entries are compacted once their element is done, so memory stays bounded.

use std::collections::HashMap;
use std::io::BufRead;
use std::rc::Rc;

use super::{check_final, element_count, ended_early, open_input};
use crate::npy::header::Header;
use crate::npy::{ArrayKind, FormatError, Inspection};
use crate::pickle::{KeySet, Kind, Step, Value, is_bare};

/// Drops what later elements cannot need from a finished element's memo entries: dicts keep
/// their key sets (a later element may be the same dict again), and strings, bytes and tuples
/// survive only if they are among element 0's keys (later dicts may reuse them as keys).
struct Compactor {
    reference: Option<Rc<KeySet>>,
    interned: HashMap<KeySet, Rc<KeySet>>,
    /// Whether any reference key is shown quoted, as bytes, as a tuple: when not, no value of
    /// that sort can be a key, and its repr need not be built to find out.
    quoted_keys: bool,
    bytes_keys: bool,
    tuple_keys: bool,
}

impl Compactor {
    fn new() -> Self {
        Compactor {
            reference: None,
            interned: HashMap::new(),
            quoted_keys: false,
            bytes_keys: false,
            tuple_keys: false,
        }
    }

    fn set_reference(&mut self, keys: Option<KeySet>) {
        let starts = |p: &[&str]| {
            keys.as_ref()
                .is_some_and(|k| k.iter().any(|key| p.iter().any(|p| key.starts_with(p))))
        };
        self.quoted_keys = starts(&["'", "\""]);
        self.bytes_keys = starts(&["b'", "b\""]);
        self.tuple_keys = starts(&["("]);
        self.reference = keys.map(Rc::new);
    }

    fn compact(&mut self, v: &Value) -> Value {
        let is_key = |v: &Value| self.reference.as_ref().is_some_and(|r| v.key_in(r));
        let maybe_key = match v {
            Value::Str(s) => s.len() <= 256 && (self.quoted_keys || is_bare(s)),
            Value::Bytes(b) => b.len() <= 256 && self.bytes_keys,
            Value::Tuple(_) => self.tuple_keys,
            _ => false,
        };
        match v {
            Value::None
            | Value::Bool(_)
            | Value::Int(_)
            | Value::Float(_)
            | Value::Global(_)
            | Value::Opaque(_)
            | Value::Keys(_)
            | Value::DataList => v.clone(),
            Value::Str(_) | Value::Bytes(_) | Value::Tuple(_) if maybe_key && is_key(v) => {
                v.clone()
            }
            Value::BigInt(_) => Value::Opaque(Kind::Int),
            Value::Str(_) => Value::Opaque(Kind::Str),
            Value::Bytes(_) => Value::Opaque(Kind::Bytes),
            Value::Tuple(_) => Value::Opaque(Kind::Tuple),
            Value::Dict(_) => {
                if let Some(r) = &self.reference
                    && v.has_keys(r) == Some(true)
                {
                    return Value::Keys(r.clone());
                }
                let keys = v.dict_keys().unwrap_or_default();
                let rc = self
                    .interned
                    .entry(keys.clone())
                    .or_insert_with(|| Rc::new(keys));
                Value::Keys(rc.clone())
            }
            Value::List(_) => Value::Opaque(Kind::List),
            Value::Set(_) => Value::Opaque(Kind::Set),
            Value::FrozenSet(_) => Value::Opaque(Kind::FrozenSet),
            Value::Object(_) => Value::Opaque(Kind::Object),
        }
    }
}

fn keys_display(k: &KeySet) -> String {
    let v: Vec<&str> = k.iter().map(String::as_str).collect();
    format!("[{}]", v.join(", "))
}

/// Scans a whole object-array pickle: checks its structure and element count and that all
/// elements are dicts with one key set (or none is a dict), and derives the schema.
pub(crate) fn inspect<R: BufRead>(
    r: R,
    h: &Header,
    file_len: u64,
) -> Result<Inspection, FormatError> {
    if h.shape.len() != 1 {
        return Err(FormatError::Unsupported {
            reason: format!(
                "object array of shape {:?} (only 1-D is supported)",
                h.shape
            ),
        });
    }
    let mut inp = open_input(r, h)?;
    let mut comp = Compactor::new();
    let mut count = 0u64;
    let mut first_kind = String::new();
    loop {
        let Some(op) = inp.rd.next_op()? else {
            return Err(ended_early(&inp.rd));
        };
        match inp.dec.apply(&op, &mut inp.rd)? {
            Step::Elements => {
                for el in inp.dec.take_elements() {
                    if count == 0 {
                        first_kind = el.type_name();
                        comp.set_reference(el.dict_keys());
                    } else {
                        // The cheap test passes for every well-formed element; only a
                        // mismatch pays for building the key set.
                        let reference = comp.reference.as_deref();
                        if reference.and_then(|r| el.has_keys(r)) != Some(true) {
                            check_element(count, &el, el.dict_keys(), reference, &first_kind)?;
                        }
                    }
                    count += 1;
                }
                inp.dec.compact_memo(|v| comp.compact(v));
            }
            Step::Stop(v) => {
                check_final(&v, &inp.dec)?;
                break;
            }
            Step::DataList | Step::Continue => {}
        }
    }
    let expected = h.shape[0];
    if count != expected {
        return Err(element_count(expected, count));
    }
    let end = inp.rd.position();
    if end != file_len {
        return Err(FormatError::TrailingData {
            what: "object array (bytes after the pickle's STOP)".into(),
            expected: end,
            actual: file_len,
        });
    }
    let schema = match (comp.reference.as_deref(), count) {
        (_, 0) => "npy object empty".to_string(),
        (Some(k), _) => format!("npy object dict keys {}", keys_display(k)),
        (None, _) => "npy object values".to_string(),
    };
    Ok(Inspection {
        count,
        schema,
        kind: ArrayKind::Object,
        data_offset: h.data_offset,
    })
}

fn check_element(
    index: u64,
    el: &Value,
    keys: Option<KeySet>,
    reference: Option<&KeySet>,
    first_kind: &str,
) -> Result<(), FormatError> {
    let reason = match (reference, keys) {
        (Some(r), Some(k)) if *r != k => {
            let missing: Vec<&str> = r.difference(&k).map(String::as_str).collect();
            let extra: Vec<&str> = k.difference(r).map(String::as_str).collect();
            format!(
                "keys {} differ from element 0's {} (missing [{}], extra [{}])",
                keys_display(&k),
                keys_display(r),
                missing.join(", "),
                extra.join(", ")
            )
        }
        (Some(_), None) => format!("it is a {}, element 0 is a dict", el.type_name()),
        (None, Some(_)) => format!("it is a dict, element 0 is a {first_kind}"),
        _ => return Ok(()),
    };
    Err(FormatError::InconsistentElements { index, reason })
}
