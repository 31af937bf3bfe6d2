//! What the array formats (zarr, npz) share about fixed-size elements: numpy's dtype strings
//! (`<f4`, `|b1`, `>i2`), reading elements as numbers for filters and statistics, and the
//! per-sample digest de-duplication compares.

use sha2::{Digest, Sha256};

/// The numeric family of an element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Bool,
    Int,
    UInt,
    Float,
    Complex,
    /// Fixed-size but not a number Quarry reads (bytes, unicode, datetimes, void): merged as
    /// raw bytes, never reported as values.
    Opaque,
}

/// A fixed-size element type in numpy's `dtype.str` spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Elem {
    pub kind: Kind,
    pub size: usize,
    pub big_endian: bool,
}

impl Elem {
    /// Parses numpy's `dtype.str` (`<f4`, `|b1`, `>u2`, `<M8[ns]`, `|S5`, `<U3`). `None` for
    /// anything else (structured or object dtypes).
    pub fn parse_numpy(s: &str) -> Option<Elem> {
        let (big_endian, rest) = match s.as_bytes().first()? {
            b'<' | b'=' | b'|' => (false, &s[1..]),
            b'>' => (true, &s[1..]),
            _ => (false, s),
        };
        let rest = match rest.find('[') {
            Some(i) if rest.ends_with(']') => &rest[..i],
            Some(_) => return None,
            None => rest,
        };
        let mut chars = rest.chars();
        let code = chars.next()?;
        let digits = chars.as_str();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: usize = digits.parse().ok()?;
        let (kind, size) = match code {
            'b' if n == 1 => (Kind::Bool, 1),
            'i' if matches!(n, 1 | 2 | 4 | 8) => (Kind::Int, n),
            'u' if matches!(n, 1 | 2 | 4 | 8) => (Kind::UInt, n),
            'f' if matches!(n, 2 | 4 | 8) => (Kind::Float, n),
            'c' if matches!(n, 8 | 16) => (Kind::Complex, n),
            'S' | 'V' | 'M' | 'm' | 'a' => (Kind::Opaque, n),
            'U' => (Kind::Opaque, n.checked_mul(4)?),
            _ => return None,
        };
        if size == 0 {
            return None;
        }
        Some(Elem {
            kind,
            size,
            big_endian: big_endian && size > 1,
        })
    }

    /// Whether elements are numbers [`Elem::push_values`] reports.
    pub fn is_numeric(&self) -> bool {
        self.kind != Kind::Opaque
    }

    /// Whether elements are integers (booleans excluded).
    pub fn is_integer(&self) -> bool {
        matches!(self.kind, Kind::Int | Kind::UInt)
    }

    fn word(&self, b: &[u8]) -> u64 {
        let mut v = 0u64;
        if self.big_endian {
            for &x in b {
                v = (v << 8) | x as u64;
            }
        } else {
            for &x in b.iter().rev() {
                v = (v << 8) | x as u64;
            }
        }
        v
    }

    fn float(&self, b: &[u8]) -> f64 {
        let w = self.word(b);
        match b.len() {
            2 => crate::half::to_f64(w as u16),
            4 => f32::from_bits(w as u32) as f64,
            _ => f64::from_bits(w),
        }
    }

    /// One element (`b.len() == self.size`) as a number: the real part of a complex, `None`
    /// for opaque elements.
    pub fn value(&self, b: &[u8]) -> Option<f64> {
        Some(match self.kind {
            Kind::Bool => (b[0] != 0) as u8 as f64,
            Kind::UInt => self.word(b) as f64,
            Kind::Int => {
                let bits = 8 * self.size as u32;
                let w = self.word(b);
                (((w << (64 - bits)) as i64) >> (64 - bits)) as f64
            }
            Kind::Float => self.float(b),
            Kind::Complex => self.float(&b[..self.size / 2]),
            Kind::Opaque => return None,
        })
    }

    /// One element as an exact integer (integer and boolean kinds only).
    pub fn int_value(&self, b: &[u8]) -> Option<i128> {
        match self.kind {
            Kind::Bool => Some((b[0] != 0) as i128),
            Kind::UInt => Some(self.word(b) as i128),
            Kind::Int => {
                let bits = 8 * self.size as u32;
                Some((((self.word(b) << (64 - bits)) as i64) >> (64 - bits)) as i128)
            }
            _ => None,
        }
    }

    /// Appends up to `cap - out.len()` numbers read from the elements in `data` (complex ones
    /// give their real and imaginary parts).
    pub fn push_values(&self, data: &[u8], out: &mut Vec<f64>, cap: usize) {
        if !self.is_numeric() {
            return;
        }
        for e in data.chunks_exact(self.size) {
            if out.len() >= cap {
                return;
            }
            match self.kind {
                Kind::Complex => {
                    let h = self.size / 2;
                    out.push(self.float(&e[..h]));
                    out.push(self.float(&e[h..]));
                }
                _ => out.extend(self.value(e)),
            }
        }
    }

    /// The bytes of integer `v` in this (integer) type, `None` when it does not fit.
    pub fn encode_int(&self, v: i128) -> Option<Vec<u8>> {
        let bits = 8 * self.size as u32;
        let ok = match self.kind {
            Kind::Int => v >= -(1i128 << (bits - 1)) && v < (1i128 << (bits - 1)),
            Kind::UInt => v >= 0 && v < (1i128 << bits),
            Kind::Bool => v == 0 || v == 1,
            _ => false,
        };
        ok.then(|| self.word_to_bytes(v as u64))
    }

    /// The bytes of float `v` in this (float) type's width and byte order.
    pub fn encode_float(&self, v: f64) -> Option<Vec<u8>> {
        let w = match (self.kind, self.size) {
            (Kind::Float, 2) => crate::half::from_f64(v) as u64,
            (Kind::Float, 4) | (Kind::Complex, 8) => (v as f32).to_bits() as u64,
            (Kind::Float, 8) | (Kind::Complex, 16) => v.to_bits(),
            _ => return None,
        };
        let width = if self.kind == Kind::Complex {
            self.size / 2
        } else {
            self.size
        };
        Some(self.word_bytes(w, width))
    }

    /// `w`'s low `self.size` bytes in this type's byte order.
    pub fn word_to_bytes(&self, w: u64) -> Vec<u8> {
        self.word_bytes(w, self.size)
    }

    fn word_bytes(&self, w: u64, width: usize) -> Vec<u8> {
        let le = w.to_le_bytes();
        let mut b: Vec<u8> = le[..width.min(8)].to_vec();
        b.resize(width, 0);
        if self.big_endian {
            b.reverse();
        }
        b
    }
}

/// The digest of one sample's de-duplication fields: each field contributes its name, its
/// length and a digest of its bytes (fed in any number of pieces), so samples whose fields
/// differ only in where one field ends and the next begins never collide.
pub(crate) struct SampleDigest {
    outer: Sha256,
}

/// The digest of one field's bytes of one sample.
pub(crate) struct FieldDigest {
    inner: Sha256,
    len: u64,
}

impl FieldDigest {
    pub fn new() -> FieldDigest {
        FieldDigest {
            inner: Sha256::new(),
            len: 0,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
        self.len += bytes.len() as u64;
    }
}

impl SampleDigest {
    pub fn new() -> SampleDigest {
        SampleDigest {
            outer: Sha256::new(),
        }
    }

    /// Adds field `name`'s digest.
    pub fn field(&mut self, name: &str, field: FieldDigest) {
        self.outer.update((name.len() as u64).to_le_bytes());
        self.outer.update(name.as_bytes());
        self.outer.update(field.len.to_le_bytes());
        self.outer.update(field.inner.finalize());
    }

    pub fn finish(self) -> [u8; 32] {
        self.outer.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reads_numpy_types() {
        let f4 = Elem::parse_numpy("<f4").expect("f4");
        assert_eq!((f4.kind, f4.size, f4.big_endian), (Kind::Float, 4, false));
        assert_eq!(f4.value(&1.5f32.to_le_bytes()), Some(1.5));
        let i2 = Elem::parse_numpy(">i2").expect("i2");
        assert_eq!(i2.value(&(-3i16).to_be_bytes()), Some(-3.0));
        assert_eq!(i2.encode_int(-3), Some((-3i16).to_be_bytes().to_vec()));
        assert_eq!(i2.encode_int(40000), None);
        let b = Elem::parse_numpy("|b1").expect("b1");
        assert!(!b.big_endian);
        assert_eq!(b.value(&[1]), Some(1.0));
        let h = Elem::parse_numpy("<f2").expect("f2");
        for v in [0.0, 1.0, -2.5, 65504.0, 0.00006103515625] {
            let bytes = h.encode_float(v).expect("f2 encodes");
            assert_eq!(h.value(&bytes), Some(v), "{v}");
        }
        let c = Elem::parse_numpy("<c8").expect("c8");
        let mut out = vec![];
        let mut bytes = 1.0f32.to_le_bytes().to_vec();
        bytes.extend(2.0f32.to_le_bytes());
        c.push_values(&bytes, &mut out, 10);
        assert_eq!(out, vec![1.0, 2.0]);
        assert_eq!(Elem::parse_numpy("<U3").map(|e| e.size), Some(12));
        assert!(Elem::parse_numpy("|O").is_none());
        assert!(Elem::parse_numpy("<f3").is_none());
    }

    #[test]
    fn digests_separate_fields() {
        let d = |parts: &[(&str, &[&[u8]])]| {
            let mut s = SampleDigest::new();
            for (name, pieces) in parts {
                let mut f = FieldDigest::new();
                for p in *pieces {
                    f.update(p);
                }
                s.field(name, f);
            }
            s.finish()
        };
        assert_eq!(d(&[("a", &[b"xy", b"z"])]), d(&[("a", &[b"xyz"])]));
        assert_ne!(
            d(&[("a", &[b"xy"]), ("b", &[b"z"])]),
            d(&[("a", &[b"x"]), ("b", &[b"yz"])])
        );
    }
}
