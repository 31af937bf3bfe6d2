//! Pickle memo tables sized for files with tens of millions of memo entries: four bytes per
//! entry, since picklers number entries 0, 1, 2, ... and a value only needs to be kept whole
//! while the element that made it is being looked at.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use std::rc::Rc;

use super::value::{KeySet, Kind, Value};

/// Hashes the `u32` memo indices used as keys; they are not attacker-chosen in a way that
/// matters (a bad file can only slow its own check), so no SipHash.
#[derive(Default)]
pub(crate) struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IndexBuild = BuildHasherDefault<IndexHasher>;

/// A `u32 -> u32` map keyed by memo index: dense for the sequential indices picklers write,
/// sparse for anything else. `u32::MAX` is reserved (it means "absent").
#[derive(Debug, Default)]
pub(crate) struct IndexMap32 {
    dense: Vec<u32>,
    sparse: HashMap<u32, u32, IndexBuild>,
    len: u32,
}

const ABSENT: u32 = u32::MAX;

impl IndexMap32 {
    pub fn get(&self, idx: u32) -> Option<u32> {
        let v = match self.dense.get(idx as usize) {
            Some(&v) => v,
            None => *self.sparse.get(&idx)?,
        };
        (v != ABSENT).then_some(v)
    }

    /// Sets an entry (`v` must not be `u32::MAX`); counts it towards `len` if it is new.
    pub fn insert(&mut self, idx: u32, v: u32) {
        debug_assert_ne!(v, ABSENT);
        let i = idx as usize;
        if i >= self.dense.len() && i <= self.dense.len() * 2 + 4096 {
            self.dense.resize(i + 1, ABSENT);
            // Entries stored sparse until now fall inside the dense part: move them there.
            if !self.sparse.is_empty() {
                let n = self.dense.len();
                let inside: Vec<u32> = self
                    .sparse
                    .keys()
                    .filter(|&&k| (k as usize) < n)
                    .copied()
                    .collect();
                for k in inside {
                    if let Some(x) = self.sparse.remove(&k) {
                        self.dense[k as usize] = x;
                    }
                }
            }
        }
        let fresh = if i < self.dense.len() {
            std::mem::replace(&mut self.dense[i], v) == ABSENT
        } else {
            self.sparse.insert(idx, v).is_none()
        };
        if fresh {
            self.len += 1;
        }
    }

    /// Number of distinct indices set: the index pickle's `MEMOIZE` writes next.
    pub fn len(&self) -> u32 {
        self.len
    }
}

/// Slot value for an entry whose value sits in `live`.
const LIVE: u32 = u32::MAX - 1;

/// The decoder's memo. Entries stay whole ("live") until [`ValueMemo::compact`] replaces them
/// by a summary; summaries are interned, as a file has few distinct ones (the same key set,
/// the same "opaque list"), so a compacted entry costs four bytes.
#[derive(Debug, Default)]
pub(crate) struct ValueMemo {
    slots: IndexMap32,
    live: HashMap<u32, Value, IndexBuild>,
    table: Vec<Value>,
    interned: HashMap<String, u32>,
    /// Fast paths around building intern keys for the commonest summaries.
    opaque: HashMap<Kind, u32>,
    key_sets: HashMap<*const KeySet, u32>,
}

impl ValueMemo {
    pub fn get(&self, idx: u32) -> Option<Value> {
        match self.slots.get(idx)? {
            LIVE => self.live.get(&idx).cloned(),
            t => self.table.get(t as usize).cloned(),
        }
    }

    pub fn contains(&self, idx: u32) -> bool {
        self.slots.get(idx).is_some()
    }

    pub fn insert(&mut self, idx: u32, v: Value) {
        self.slots.insert(idx, LIVE);
        self.live.insert(idx, v);
    }

    pub fn len(&self) -> u32 {
        self.slots.len()
    }

    /// Replaces live entry `idx` by `f(value)`, interned when `f` gives a summary that has an
    /// intern key (anything but a whole container or object).
    pub fn compact(&mut self, idx: u32, f: impl FnOnce(&Value) -> Value) {
        let Some(v) = self.live.remove(&idx) else {
            return;
        };
        let small = f(&v);
        let fast = match &small {
            Value::Opaque(k) => self.opaque.get(k).copied(),
            // The table holds a clone of every interned Rc, so its address cannot be reused.
            Value::Keys(k) => self.key_sets.get(&Rc::as_ptr(k)).copied(),
            _ => None,
        };
        if let Some(t) = fast {
            self.slots.insert(idx, t);
            return;
        }
        match small.intern_key() {
            Some(key) if self.table.len() < (LIVE - 1) as usize => {
                let t = match self.interned.get(&key) {
                    Some(&t) => t,
                    None => {
                        let t = self.table.len() as u32;
                        match &small {
                            Value::Opaque(k) => {
                                self.opaque.insert(*k, t);
                            }
                            Value::Keys(k) => {
                                self.key_sets.insert(Rc::as_ptr(k), t);
                            }
                            _ => {}
                        }
                        self.table.push(small);
                        self.interned.insert(key, t);
                        t
                    }
                };
                self.slots.insert(idx, t);
            }
            _ => {
                self.live.insert(idx, small);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len_counts_distinct_indices() {
        let mut m = IndexMap32::default();
        m.insert(0, 1);
        m.insert(0, 2);
        m.insert(1_000_000, 3);
        m.insert(1, 4);
        assert_eq!(m.len(), 3);
        for i in 2..600_000 {
            m.insert(i, 5);
        }
        assert_eq!(m.len(), 600_001);
        m.insert(1_000_000, 6);
        assert_eq!(m.len(), 600_001);
        assert_eq!(m.get(1_000_000), Some(6));
        assert_eq!(m.get(0), Some(2));
        assert_eq!(m.get(600_000), None);
        assert_eq!(m.get(u32::MAX - 3), None);
    }

    #[test]
    fn compaction_interns_summaries() {
        let mut m = ValueMemo::default();
        for i in 0..100 {
            m.insert(i, Value::Int(i as i64));
        }
        for i in 0..100 {
            m.compact(i, |_| Value::Opaque(Kind::List));
        }
        assert_eq!(m.table.len(), 1);
        assert!(m.live.is_empty());
        assert!(matches!(m.get(42), Some(Value::Opaque(Kind::List))));
        assert_eq!(m.len(), 100);
    }
}
