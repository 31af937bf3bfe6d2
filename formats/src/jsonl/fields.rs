//! Fields of JSON samples, shared by the formats whose samples are (or are described by) JSON
//! objects: JSON Lines, and episode directories' per-episode metadata.
//!
//! - a *field* is a dotted path (`statistics.num_timesteps`): object keys, or an index into
//!   an array when the value there is an array and the part is a number (`pose.0`);
//! - a field's *number* is a JSON number, or a bool as 0/1 (a success flag filters like one);
//! - the *canonical JSON* of a value has object keys sorted and no whitespace, so two values
//!   are equal exactly when their canonical forms are: de-duplication hashes it;
//! - [`numeric_fields`] lists every numeric field of a sample for `examine`.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The value at dotted path `field` inside `v`, if there is one.
pub(crate) fn lookup<'a>(v: &'a Value, field: &str) -> Option<&'a Value> {
    field.split('.').try_fold(v, |v, part| match v {
        Value::Object(m) => m.get(part),
        Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// [`lookup`] in an object not wrapped in a [`Value`].
pub(crate) fn lookup_in<'a>(m: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    match field.split_once('.') {
        None => m.get(field),
        Some((head, rest)) => lookup(m.get(head)?, rest),
    }
}

/// What a JSON value is, for messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A number or a bool (0/1) as f64.
pub(crate) fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

/// The number a filter compares, `found` being what a lookup of `field` gave, or why there is
/// none (a sentence naming the field).
pub(crate) fn filter_number(found: Option<&Value>, field: &str) -> Result<f64, String> {
    let x = found.ok_or_else(|| format!("no field `{field}` to filter on"))?;
    as_number(x).ok_or_else(|| {
        format!(
            "field `{field}` is {}; a filter compares numbers (or bools as 0/1)",
            kind(x)
        )
    })
}

/// Appends the canonical JSON of `v` to `out`: object keys sorted (by their UTF-8 bytes), no
/// whitespace, strings and numbers as serde_json writes them. Recursion is bounded by
/// serde_json's parse depth limit (128).
pub(crate) fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                canonical(x, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(x, out);
            }
            out.push(b']');
        }
        leaf => out.extend_from_slice(leaf.to_string().as_bytes()),
    }
}

/// Builds the 32-byte de-duplication key of one sample from its listed fields, in order;
/// every part is length-prefixed, so different field lists never collide by concatenation.
pub(crate) struct KeyHasher {
    h: Sha256,
    buf: Vec<u8>,
}

impl KeyHasher {
    pub fn new() -> Self {
        KeyHasher {
            h: Sha256::new(),
            buf: Vec::new(),
        }
    }

    /// Adds the canonical JSON of a field's value.
    pub fn value(&mut self, v: &Value) {
        self.buf.clear();
        canonical(v, &mut self.buf);
        self.h.update(b"v");
        self.h.update((self.buf.len() as u64).to_le_bytes());
        self.h.update(&self.buf);
    }

    /// Adds raw bytes (a digest of something that is not JSON).
    pub fn bytes(&mut self, b: &[u8]) {
        self.h.update(b"b");
        self.h.update((b.len() as u64).to_le_bytes());
        self.h.update(b);
    }

    pub fn finish(self) -> [u8; 32] {
        self.h.finalize().into()
    }
}

/// Adds the value of every de-duplication field, in order, to `key`, `get` looking each one
/// up; the first missing field is the error (a sentence naming it).
pub(crate) fn add_fields<'a>(
    key: &mut KeyHasher,
    fields: &[String],
    mut get: impl FnMut(&str) -> Option<&'a Value>,
) -> Result<(), String> {
    for f in fields {
        let x = get(f).ok_or_else(|| format!("no field `{f}` to de-duplicate on"))?;
        key.value(x);
    }
    Ok(())
}

/// Calls `each(name, values)` for every numeric field of `v` under `prefix` (dotted names):
/// numbers and bools (as 0/1) one value each, arrays whose elements are all numbers (nested
/// arrays flattened) every element. Strings, nulls, empty arrays and arrays holding anything
/// else are left out.
pub(crate) fn numeric_fields(prefix: &str, v: &Value, each: &mut dyn FnMut(&str, &[f64])) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if prefix.is_empty() {
                    numeric_fields(k, x, each);
                } else {
                    numeric_fields(&format!("{prefix}.{k}"), x, each);
                }
            }
        }
        Value::Array(a) => {
            let mut vals = Vec::new();
            if flatten(a, &mut vals) && !vals.is_empty() {
                each(prefix, &vals);
            }
        }
        x => {
            if let Some(n) = as_number(x) {
                each(prefix, &[n]);
            }
        }
    }
}

fn flatten(a: &[Value], out: &mut Vec<f64>) -> bool {
    a.iter().all(|x| match x {
        Value::Array(inner) => flatten(inner, out),
        x => as_number(x).map(|n| out.push(n)).is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn lookup_and_numbers() {
        let v = j(r#"{"a": {"b": [1, 2.5, true]}, "ok": false, "s": "x"}"#);
        assert_eq!(lookup(&v, "a.b.1"), Some(&j("2.5")));
        let num = |f: &str| filter_number(lookup(&v, f), f);
        assert_eq!(num("a.b.2"), Ok(1.0));
        assert_eq!(num("ok"), Ok(0.0));
        assert!(num("a.c").unwrap_err().contains("no field `a.c`"));
        assert!(num("s").unwrap_err().contains("a string"));
        let Value::Object(m) = &v else { panic!() };
        assert_eq!(lookup_in(m, "a.b.1"), lookup(&v, "a.b.1"));
        assert_eq!(lookup_in(m, "ok"), Some(&Value::Bool(false)));
        assert!(lookup(&v, "a.b.9").is_none());
    }

    #[test]
    fn canonical_sorts_keys_and_keys_differ_by_value() {
        let mut a = Vec::new();
        canonical(&j(r#"{"b": [1, {"y": 1, "x": "é"}], "a": 1.0}"#), &mut a);
        assert_eq!(
            String::from_utf8(a).unwrap(),
            r#"{"a":1.0,"b":[1,{"x":"é","y":1}]}"#
        );
        let key = |s: &str, fields: &[&str]| {
            let mut k = KeyHasher::new();
            let fields: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
            let v = j(s);
            add_fields(&mut k, &fields, |f| lookup(&v, f)).unwrap();
            k.finish()
        };
        assert_eq!(
            key(r#"{"a": {"p": 1, "q": 2}, "z": 0}"#, &["a"]),
            key(r#"{"z": 9, "a": {"q": 2, "p": 1}}"#, &["a"])
        );
        assert_ne!(key(r#"{"a": 1}"#, &["a"]), key(r#"{"a": 1.0}"#, &["a"]));
        assert_ne!(
            key(r#"{"a": "x", "b": "y"}"#, &["a", "b"]),
            key(r#"{"a": "xy", "b": ""}"#, &["a", "b"])
        );
    }

    #[test]
    fn numeric_fields_flatten_arrays() {
        let v = j(
            r#"{"e": 1.5, "ok": true, "n": null, "s": "x", "p": [[1, 2], [3, 4]],
                      "m": [1, "x"], "d": {"k": [0.5]}, "z": []}"#,
        );
        let mut got = Vec::new();
        numeric_fields("", &v, &mut |name, vals| {
            got.push((name.to_string(), vals.to_vec()))
        });
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                ("d.k".to_string(), vec![0.5]),
                ("e".to_string(), vec![1.5]),
                ("ok".to_string(), vec![1.0]),
                ("p".to_string(), vec![1.0, 2.0, 3.0, 4.0]),
            ]
        );
    }
}
