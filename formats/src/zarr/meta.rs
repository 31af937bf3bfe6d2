//! One array's metadata, v2 (`.zarray`) or v3 (`zarr.json`): shape, chunking, element type,
//! fill value, chunk keys and the codec chain, with chunk decoding and encoding.

use std::path::PathBuf;

use serde_json::Value;

use super::codec::Codec;
use super::signature::Signature;
use crate::elem::{Elem, Kind};

/// An array of a store.
#[derive(Debug, Clone)]
pub(crate) struct ArrayMeta {
    /// Path inside the store, `/`-separated (`data/action`).
    pub name: String,
    pub dir: PathBuf,
    pub shape: Vec<u64>,
    pub chunks: Vec<u64>,
    pub elem: Elem,
    /// numpy's spelling of the element type (`<f4`), as schemas show it.
    pub dtype: String,
    /// One element holding the fill value, in the stored byte order.
    pub fill: Vec<u8>,
    /// Stored chunks are `transpose(chunk, order)` (v2 `order: "F"`, v3 `transpose`).
    pub order: Option<Vec<usize>>,
    /// Bytes-to-bytes codecs in encoding order.
    pub codecs: Vec<Codec>,
    /// What keeps chunks from being decoded here (`codec "imagecodecs_jpeg2k"`, v2
    /// `filters`, v3 `sharding_indexed`): such an array is merged by copying chunk files
    /// whole, never decoded or encoded (see `align.rs`). `None`: [`Self::codecs`] is the chain.
    pub opaque: Option<String>,
    /// A codec whose chunks' structure Quarry checks without decoding them.
    pub signature: Option<Signature>,
    /// What must be equal for chunk files to be copied from one store's array into
    /// another's: chunk shape, element type, codecs, filters, order, fill value.
    pub encoding: Value,
    /// v3 `default` chunk keys (`c/0/1`) rather than v2's (`0.1`).
    pub key_prefix: bool,
    pub separator: char,
    /// The metadata document as read, rewritten with a new shape for a merge's output.
    pub doc: Value,
}

/// Why an array's metadata cannot be used: malformed, or well formed but unsupported.
pub(crate) enum MetaError {
    Invalid(String),
    Unsupported(String),
}

fn invalid(s: impl Into<String>) -> MetaError {
    MetaError::Invalid(s.into())
}

fn dims(v: Option<&Value>, what: &str) -> Result<Vec<u64>, MetaError> {
    v.and_then(Value::as_array)
        .ok_or_else(|| invalid(format!("{what} is missing or not a list")))?
        .iter()
        .map(|d| {
            d.as_u64()
                .ok_or_else(|| invalid(format!("{what} holds {d}, not a count")))
        })
        .collect()
}

impl ArrayMeta {
    /// Parses a `.zarray` document.
    pub fn from_v2(name: String, dir: PathBuf, doc: Value) -> Result<ArrayMeta, MetaError> {
        let shape = dims(doc.get("shape"), "shape")?;
        let chunks = dims(doc.get("chunks"), "chunks")?;
        let dtype = match doc.get("dtype") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(MetaError::Unsupported(format!("structured dtype {other}")));
            }
            None => return Err(invalid("dtype is missing")),
        };
        let elem = Elem::parse_numpy(&dtype)
            .ok_or_else(|| MetaError::Unsupported(format!("dtype {dtype:?}")))?;
        let order = match doc.get("order").and_then(Value::as_str) {
            Some("C") | None => None,
            Some("F") => Some((0..shape.len()).rev().collect()),
            Some(o) => return Err(invalid(format!("order {o:?} is neither \"C\" nor \"F\""))),
        };
        let mut opaque = match doc.get("filters") {
            None | Some(Value::Null) => None,
            Some(Value::Array(f)) if f.is_empty() => None,
            Some(Value::Array(f)) => Some(format!(
                "filters [{}]",
                f.iter()
                    .map(|c| c.get("id").and_then(Value::as_str).unwrap_or("?"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some(f) => return Err(invalid(format!("filters {f} is not a list"))),
        };
        let mut codecs = Vec::new();
        let mut signature = None;
        match doc.get("compressor") {
            None | Some(Value::Null) => {}
            Some(c) => match Codec::from_v2(c, elem.size) {
                Ok(codec) => codecs.push(codec),
                Err(what) => {
                    signature = c
                        .get("id")
                        .and_then(Value::as_str)
                        .and_then(Signature::from_id);
                    opaque.get_or_insert(what);
                }
            },
        }
        if opaque.is_some() {
            codecs.clear();
        }
        let separator = match doc.get("dimension_separator").and_then(Value::as_str) {
            None | Some(".") => '.',
            Some("/") => '/',
            Some(s) => return Err(invalid(format!("dimension_separator {s:?}"))),
        };
        let fill = fill_bytes(doc.get("fill_value").unwrap_or(&Value::Null), &elem)?;
        let encoding = pick(
            &doc,
            &[
                "chunks",
                "dtype",
                "compressor",
                "filters",
                "order",
                "fill_value",
            ],
        );
        let m = ArrayMeta {
            name,
            dir,
            shape,
            chunks,
            dtype: dtype_str(&elem, &dtype),
            elem,
            fill,
            order,
            codecs,
            opaque,
            signature,
            encoding,
            key_prefix: false,
            separator,
            doc,
        };
        m.check()?;
        Ok(m)
    }

    /// Parses an array's `zarr.json` document.
    pub fn from_v3(name: String, dir: PathBuf, doc: Value) -> Result<ArrayMeta, MetaError> {
        let shape = dims(doc.get("shape"), "shape")?;
        let grid = doc
            .get("chunk_grid")
            .ok_or_else(|| invalid("chunk_grid is missing"))?;
        if grid.get("name").and_then(Value::as_str) != Some("regular") {
            return Err(MetaError::Unsupported(format!("chunk_grid {grid}")));
        }
        let chunks = dims(
            grid.get("configuration").and_then(|c| c.get("chunk_shape")),
            "chunk_grid.configuration.chunk_shape",
        )?;
        let data_type = match doc.get("data_type") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(MetaError::Unsupported(format!("data_type {other}"))),
            None => return Err(invalid("data_type is missing")),
        };
        if let Some(Value::Array(t)) = doc.get("storage_transformers")
            && !t.is_empty()
        {
            return Err(MetaError::Unsupported("storage transformers".into()));
        }
        let (key_prefix, default_sep) = match doc
            .get("chunk_key_encoding")
            .and_then(|k| k.get("name"))
            .and_then(Value::as_str)
        {
            Some("default") | None => (true, "/"),
            Some("v2") => (false, "."),
            Some(n) => return Err(MetaError::Unsupported(format!("chunk_key_encoding {n:?}"))),
        };
        let separator = match doc
            .get("chunk_key_encoding")
            .and_then(|k| k.get("configuration"))
            .and_then(|c| c.get("separator"))
            .and_then(Value::as_str)
            .unwrap_or(default_sep)
        {
            "." => '.',
            "/" => '/',
            s => return Err(invalid(format!("chunk key separator {s:?}"))),
        };
        let codec_list = doc
            .get("codecs")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("codecs is missing or not a list"))?;
        let mut order: Option<Vec<usize>> = None;
        let mut big_endian = None;
        let mut codecs = Vec::new();
        let mut opaque: Option<String> = None;
        let mut stage = 0; // 0: array-to-array, 1: after bytes
        let size = v3_size(&data_type)
            .ok_or_else(|| MetaError::Unsupported(format!("data_type {data_type:?}")))?;
        for c in codec_list {
            let cname = c.get("name").and_then(Value::as_str).unwrap_or("?");
            match (stage, cname) {
                (0, "transpose") => {
                    let o = c
                        .get("configuration")
                        .and_then(|c| c.get("order"))
                        .and_then(Value::as_array)
                        .ok_or_else(|| invalid("transpose codec without an order"))?;
                    let o: Vec<usize> = o
                        .iter()
                        .map(|x| x.as_u64().map(|x| x as usize))
                        .collect::<Option<_>>()
                        .ok_or_else(|| invalid("transpose order is not a list of axes"))?;
                    let mut seen = o.clone();
                    seen.sort_unstable();
                    if seen != (0..shape.len()).collect::<Vec<_>>() {
                        return Err(invalid(format!(
                            "transpose order {o:?} is not a permutation of the axes"
                        )));
                    }
                    // Two transposes: the second permutes the first's output.
                    order = Some(match order {
                        None => o,
                        Some(prev) => o.iter().map(|&i| prev[i]).collect(),
                    });
                }
                (0, "bytes") => {
                    stage = 1;
                    big_endian = match c
                        .get("configuration")
                        .and_then(|c| c.get("endian"))
                        .and_then(Value::as_str)
                    {
                        Some("big") => Some(true),
                        Some("little") | None => Some(false),
                        Some(e) => return Err(invalid(format!("bytes endian {e:?}"))),
                    };
                }
                (0, "sharding_indexed") => {
                    // Shards are the stored objects: copied whole, their inner chunks and
                    // index never read here.
                    stage = 1;
                    big_endian = Some(inner_big_endian(c));
                    opaque.get_or_insert_with(|| "codec \"sharding_indexed\"".into());
                }
                (1, _) => match Codec::from_v3(c, size) {
                    Ok(codec) => codecs.push(codec),
                    Err(what) => {
                        opaque.get_or_insert(what);
                    }
                },
                (_, other) => {
                    opaque.get_or_insert_with(|| format!("codec {other:?}"));
                }
            }
        }
        let big_endian = match (big_endian, &opaque) {
            (Some(b), _) => b,
            (None, Some(_)) => false,
            (None, None) => {
                return Err(invalid("codecs has no array-to-bytes codec (\"bytes\")"));
            }
        };
        if opaque.is_some() {
            codecs.clear();
        }
        let np = v3_numpy(&data_type, big_endian)
            .ok_or_else(|| MetaError::Unsupported(format!("data_type {data_type:?}")))?;
        let elem = Elem::parse_numpy(&np)
            .ok_or_else(|| MetaError::Unsupported(format!("data_type {data_type:?}")))?;
        let fill = fill_bytes(doc.get("fill_value").unwrap_or(&Value::Null), &elem)?;
        let encoding = pick(&doc, &["chunk_grid", "data_type", "codecs", "fill_value"]);
        let m = ArrayMeta {
            name,
            dir,
            shape,
            chunks,
            dtype: dtype_str(&elem, &np),
            elem,
            fill,
            order,
            codecs,
            opaque,
            signature: None,
            encoding,
            key_prefix,
            separator,
            doc,
        };
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), MetaError> {
        if self.chunks.len() != self.shape.len() {
            return Err(invalid(format!(
                "chunks {:?} and shape {:?} differ in rank",
                self.chunks, self.shape
            )));
        }
        if self.chunks.contains(&0) {
            return Err(invalid(format!(
                "chunks {:?} has a zero length",
                self.chunks
            )));
        }
        self.chunk_bytes()
            .ok_or_else(|| invalid("chunk size overflows"))?;
        Ok(())
    }

    /// Bytes of one decoded chunk.
    pub fn chunk_bytes(&self) -> Option<usize> {
        self.chunks
            .iter()
            .try_fold(self.elem.size as u64, |a, &c| a.checked_mul(c))
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n < (1usize << 40))
    }

    /// Bytes of one row (one index of axis 0).
    pub fn row_bytes(&self) -> usize {
        self.shape
            .iter()
            .skip(1)
            .fold(self.elem.size as u64, |a, &c| a.saturating_mul(c)) as usize
    }

    /// Chunks along each axis.
    pub fn grid(&self) -> Vec<u64> {
        self.shape
            .iter()
            .zip(&self.chunks)
            .map(|(s, c)| s.div_ceil(*c))
            .collect()
    }

    /// The key of the chunk at grid position `idx`.
    pub fn chunk_key(&self, idx: &[u64]) -> String {
        let sep = self.separator.to_string();
        let parts: Vec<String> = idx.iter().map(|i| i.to_string()).collect();
        match (self.key_prefix, parts.is_empty()) {
            (true, true) => "c".into(),
            (true, false) => format!("c{sep}{}", parts.join(&sep)),
            (false, true) => "0".into(),
            (false, false) => parts.join(&sep),
        }
    }

    /// Why chunks of this array cannot be decoded or encoded here, as an error reason.
    fn opaque_reason(&self) -> Option<String> {
        self.opaque
            .as_ref()
            .map(|what| format!("stored with {what}, which Quarry copies but does not decode"))
    }

    /// The grid position a stored key names (the inverse of [`Self::chunk_key`]), `None`
    /// when the key is not made of chunk indices in this array's encoding.
    pub fn parse_chunk_key(&self, key: &str) -> Option<Vec<u64>> {
        let rest = if self.key_prefix {
            match key.strip_prefix('c') {
                Some("") => return Some(vec![]),
                Some(r) => r.strip_prefix(self.separator)?,
                None => return None,
            }
        } else {
            key
        };
        rest.split(self.separator)
            .map(|p| {
                (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| p.parse().ok())
                    .flatten()
            })
            .collect()
    }

    /// A chunk's stored bytes decoded to its elements in C order.
    pub fn decode_chunk(&self, raw: &[u8]) -> Result<Vec<u8>, String> {
        if let Some(why) = self.opaque_reason() {
            return Err(why);
        }
        let want = self.chunk_bytes().unwrap_or(0);
        let mut data = std::borrow::Cow::Borrowed(raw);
        for (i, c) in self.codecs.iter().enumerate().rev() {
            let cap = if i == 0 {
                want
            } else {
                want.saturating_mul(2).saturating_add(1 << 16)
            };
            data = std::borrow::Cow::Owned(c.decode(&data, cap)?);
        }
        if data.len() != want {
            return Err(format!(
                "decodes to {} bytes, expected {want} ({} elements of {} bytes)",
                data.len(),
                want / self.elem.size,
                self.elem.size
            ));
        }
        Ok(match &self.order {
            None => data.into_owned(),
            Some(order) => {
                let stored: Vec<u64> = order.iter().map(|&i| self.chunks[i]).collect();
                permute(&data, &stored, self.elem.size, &inverse(order))
            }
        })
    }

    /// A chunk's elements (C order) encoded as stored.
    pub fn encode_chunk(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        if let Some(why) = self.opaque_reason() {
            return Err(why);
        }
        let mut out = match &self.order {
            None => data.to_vec(),
            Some(order) => permute(data, &self.chunks, self.elem.size, order),
        };
        for c in &self.codecs {
            out = c.encode(&out)?;
        }
        Ok(out)
    }

    /// The metadata document with axis 0 of the shape set to `rows`.
    pub fn doc_with_rows(&self, rows: u64) -> Value {
        let mut doc = self.doc.clone();
        if let Some(Value::Array(s)) = doc.get_mut("shape")
            && let Some(first) = s.first_mut()
        {
            *first = Value::from(rows);
        }
        doc
    }
}

/// The members `keys` of a metadata document, for comparing encodings.
fn pick(doc: &Value, keys: &[&str]) -> Value {
    Value::Object(
        keys.iter()
            .map(|k| (k.to_string(), doc.get(*k).cloned().unwrap_or(Value::Null)))
            .collect(),
    )
}

/// The byte order of a `sharding_indexed` codec's inner `bytes` codec (little if none).
fn inner_big_endian(sharding: &Value) -> bool {
    sharding
        .get("configuration")
        .and_then(|c| c.get("codecs"))
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("name").and_then(Value::as_str) == Some("bytes"))
        })
        .and_then(|c| c.get("configuration"))
        .and_then(|c| c.get("endian"))
        .and_then(Value::as_str)
        == Some("big")
}

fn inverse(order: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; order.len()];
    for (i, &o) in order.iter().enumerate() {
        inv[o] = i;
    }
    inv
}

/// `np.transpose(a, perm)` of a C-order array `a` of `shape` with `esize`-byte elements.
fn permute(data: &[u8], shape: &[u64], esize: usize, perm: &[usize]) -> Vec<u8> {
    let n = shape.len();
    if n < 2 || perm.iter().enumerate().all(|(i, &p)| i == p) {
        return data.to_vec();
    }
    let mut strides = vec![esize; n];
    for i in (0..n - 1).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] as usize;
    }
    let out_shape: Vec<u64> = perm.iter().map(|&p| shape[p]).collect();
    let out_strides: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    let mut out = Vec::with_capacity(data.len());
    let mut idx = vec![0u64; n];
    let total: u64 = shape.iter().product();
    for _ in 0..total {
        let off: usize = idx
            .iter()
            .zip(&out_strides)
            .map(|(&i, &s)| i as usize * s)
            .sum();
        out.extend_from_slice(&data[off..off + esize]);
        for ax in (0..n).rev() {
            idx[ax] += 1;
            if idx[ax] < out_shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    out
}

/// numpy's `dtype.str` for the schema (`|b1`, `<f4`); the source spelling when it is not a
/// plain number.
fn dtype_str(elem: &Elem, source: &str) -> String {
    if elem.kind == Kind::Opaque {
        return source.to_string();
    }
    let code = match elem.kind {
        Kind::Bool => 'b',
        Kind::Int => 'i',
        Kind::UInt => 'u',
        Kind::Float => 'f',
        Kind::Complex => 'c',
        Kind::Opaque => 'V',
    };
    let order = if elem.size == 1 {
        '|'
    } else if elem.big_endian {
        '>'
    } else {
        '<'
    };
    format!("{order}{code}{}", elem.size)
}

fn v3_size(name: &str) -> Option<usize> {
    Some(match name {
        "bool" | "int8" | "uint8" => 1,
        "int16" | "uint16" | "float16" => 2,
        "int32" | "uint32" | "float32" => 4,
        "int64" | "uint64" | "float64" | "complex64" => 8,
        "complex128" => 16,
        _ => return None,
    })
}

fn v3_numpy(name: &str, big: bool) -> Option<String> {
    let e = if big { '>' } else { '<' };
    Some(match name {
        "bool" => "|b1".into(),
        "int8" => "|i1".into(),
        "uint8" => "|u1".into(),
        "int16" => format!("{e}i2"),
        "int32" => format!("{e}i4"),
        "int64" => format!("{e}i8"),
        "uint16" => format!("{e}u2"),
        "uint32" => format!("{e}u4"),
        "uint64" => format!("{e}u8"),
        "float16" => format!("{e}f2"),
        "float32" => format!("{e}f4"),
        "float64" => format!("{e}f8"),
        "complex64" => format!("{e}c8"),
        "complex128" => format!("{e}c16"),
        _ => return None,
    })
}

/// The fill value as one element's bytes.
fn fill_bytes(v: &Value, elem: &Elem) -> Result<Vec<u8>, MetaError> {
    let bad = || MetaError::Unsupported(format!("fill_value {v} for this dtype"));
    if v.is_null() {
        return Ok(vec![0; elem.size]);
    }
    match elem.kind {
        Kind::Bool | Kind::Int | Kind::UInt => {
            let n: i128 = match v {
                Value::Bool(b) => *b as i128,
                Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => i as i128,
                    (_, Some(u), _) => u as i128,
                    (_, _, Some(f)) if f.fract() == 0.0 => f as i128,
                    _ => return Err(bad()),
                },
                _ => return Err(bad()),
            };
            elem.encode_int(n).ok_or_else(bad)
        }
        Kind::Float => float_fill(v, elem, elem.size).ok_or_else(bad),
        Kind::Complex => match v {
            Value::Array(p) if p.len() == 2 => {
                let mut b = float_fill(&p[0], elem, elem.size / 2).ok_or_else(bad)?;
                b.extend(float_fill(&p[1], elem, elem.size / 2).ok_or_else(bad)?);
                Ok(b)
            }
            _ => float_fill(v, elem, elem.size / 2)
                .map(|mut b| {
                    b.resize(elem.size, 0);
                    b
                })
                .ok_or_else(bad),
        },
        Kind::Opaque => match v {
            Value::Number(n) if n.as_u64() == Some(0) => Ok(vec![0; elem.size]),
            Value::String(s) if s.is_empty() => Ok(vec![0; elem.size]),
            _ => Err(bad()),
        },
    }
}

/// A float fill value of `width` bytes: a number, `"NaN"`, `"Infinity"`, `"-Infinity"`, or
/// v3's raw bits (`"0x7fc00000"`).
fn float_fill(v: &Value, elem: &Elem, width: usize) -> Option<Vec<u8>> {
    let as_float = Elem {
        kind: Kind::Float,
        size: width,
        big_endian: elem.big_endian,
    };
    let f = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => match s.as_str() {
            "NaN" => f64::NAN,
            "Infinity" => f64::INFINITY,
            "-Infinity" => f64::NEG_INFINITY,
            hex => {
                let bits = u64::from_str_radix(hex.strip_prefix("0x")?, 16).ok()?;
                return Some(as_float.word_to_bytes(bits));
            }
        },
        _ => return None,
    };
    as_float.encode_float(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_is_numpy_transpose() {
        // a = arange(6).reshape(2, 3) as u8; a.T = [[0, 3], [1, 4], [2, 5]].
        let a: Vec<u8> = (0..6).collect();
        assert_eq!(permute(&a, &[2, 3], 1, &[1, 0]), vec![0, 3, 1, 4, 2, 5]);
        let b: Vec<u8> = (0..24).collect();
        let t = permute(&b, &[2, 3, 4], 1, &[2, 0, 1]);
        let back = permute(&t, &[4, 2, 3], 1, &inverse(&[2, 0, 1]));
        assert_eq!(back, b);
        // t[k, i, j] = b[i, j, k]: t[1, 0, 2] = b[0, 2, 1] = 9.
        assert_eq!(t[2 * 3 + 2], 9);
    }

    #[test]
    fn keys_follow_the_encoding() {
        let doc: Value = serde_json::from_str(
            r#"{"shape": [10, 7], "chunks": [4, 7], "dtype": "<f4", "fill_value": "NaN",
                "order": "C", "filters": null, "compressor": null, "zarr_format": 2}"#,
        )
        .expect("json");
        let m = ArrayMeta::from_v2("a".into(), PathBuf::new(), doc)
            .ok()
            .expect("parses");
        assert_eq!(m.chunk_key(&[2, 0]), "2.0");
        assert_eq!(m.parse_chunk_key("2.0"), Some(vec![2, 0]));
        assert_eq!(m.parse_chunk_key("17.3.9"), Some(vec![17, 3, 9]));
        assert_eq!(m.parse_chunk_key("x.0"), None);
        assert_eq!(m.parse_chunk_key("2..0"), None);
        assert!(f32::from_le_bytes([m.fill[0], m.fill[1], m.fill[2], m.fill[3]]).is_nan());
        assert_eq!(m.grid(), vec![3, 1]);
        assert_eq!(m.row_bytes(), 28);
    }
}
