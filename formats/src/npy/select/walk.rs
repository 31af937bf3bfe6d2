//! Walking an object array's elements one by one for planning, counting and examining, with
//! memo entries shrunk once their element is done ([`Keeper`]) and, when asked, which elements
//! read memo entries that earlier elements wrote.

use std::collections::HashSet;
use std::io::BufRead;

use crate::DatasetError;
use crate::npy::FormatError;
use crate::npy::object::{Input, element_count, ended_early, finish_input, stack_error, unit_end};
use crate::pickle::{Depth, IndexMap32, Kind, Value, memo_index, op};

/// Longest string or bytes value decoded whole while judging or examining elements: numpy
/// arrays up to this size can be filtered on, de-duplicated and examined.
const KEEP_PAYLOAD: usize = 1 << 20;
/// Bytes of memo values [`Keeper`] keeps whole for later elements, per input.
const KEEP_BUDGET: usize = 64 << 20;
/// Most distinct dict key strings [`Keeper`] keeps whole regardless of the budget.
const MAX_KEYS: usize = 1 << 20;

/// Shrinks memo entries once the element that wrote them is judged. Strings used as dict keys
/// always stay whole (later elements' dicts read them through the memo, and a path lookup
/// needs them): a dict's entry comes before its keys' in the memo, so compacting the dict
/// learns them. Other values later elements may read (dtypes, shared scalars, a dict saved
/// twice) stay whole while the budget lasts, and then become summaries. A value later read
/// from a summary cannot be filtered on or compared, which [`super::judge::Judge`] reports as an error
/// rather than guessing; numpy's pickles write their shared values in the first elements of
/// a round, long before the budget runs out.
struct Keeper {
    left: usize,
    keys: HashSet<String>,
}

impl Keeper {
    fn new() -> Self {
        Keeper {
            left: KEEP_BUDGET,
            keys: HashSet::new(),
        }
    }

    fn compact(&mut self, v: &Value) -> Value {
        match v {
            Value::Dict(m) if self.keys.len() < MAX_KEYS => {
                for (k, _) in m.borrow().items.iter() {
                    if let Value::Str(s) = k
                        && s.len() <= 256
                        && !self.keys.contains(s.as_str())
                    {
                        self.keys.insert(s.to_string());
                    }
                }
            }
            Value::Str(s) if self.keys.contains(s.as_str()) => return v.clone(),
            _ => {}
        }
        match v {
            Value::None
            | Value::Bool(_)
            | Value::Int(_)
            | Value::Float(_)
            | Value::Global(_)
            | Value::Opaque(_)
            | Value::Keys(_)
            | Value::DataList => return v.clone(),
            _ => {}
        }
        let size = size_of(v, self.left.saturating_add(1), 0);
        if size <= self.left {
            self.left -= size;
            return v.clone();
        }
        Value::Opaque(match v {
            Value::BigInt(_) => Kind::Int,
            Value::Str(_) => Kind::Str,
            Value::Bytes(_) => Kind::Bytes,
            Value::Tuple(_) => Kind::Tuple,
            Value::List(_) => Kind::List,
            Value::Set(_) => Kind::Set,
            Value::FrozenSet(_) => Kind::FrozenSet,
            _ => Kind::Object,
        })
    }
}

/// Rough bytes `v` holds (shared parts counted each time), counted no further than `cap`.
fn size_of(v: &Value, cap: usize, depth: usize) -> usize {
    if depth > 256 {
        return cap;
    }
    let items = |it: &mut dyn Iterator<Item = &Value>| {
        let mut n = 48usize;
        for x in it {
            n = n.saturating_add(size_of(x, cap, depth + 1));
            if n >= cap {
                break;
            }
        }
        n
    };
    match v {
        Value::Str(s) => 48 + s.len(),
        Value::Bytes(b) | Value::BigInt(b) => 48 + b.len(),
        Value::Tuple(t) | Value::FrozenSet(t) => items(&mut t.items.iter()),
        Value::List(l) | Value::Set(l) => items(&mut l.borrow().items.iter()),
        Value::Dict(m) => items(&mut m.borrow().items.iter().flat_map(|(k, v)| [k, v])),
        Value::Object(o) => {
            let o = o.borrow();
            items(&mut [&o.callable, &o.args].into_iter().chain(o.state.as_ref()))
        }
        _ => 16,
    }
}

/// What walking an object array's elements found.
pub(super) struct Walked {
    /// `(element, earlier element)`: the element reads a memo entry the earlier one wrote.
    /// Sorted by element; each pair once.
    pub(super) refs: Vec<(u32, u32)>,
}

/// Walks the data list of `inp` (opened, positioned at the list), handing each element to
/// `on_element(index, value)` until it returns false or the list ends (then the pickle's end
/// is checked: `expected` elements, the array built as numpy builds it, nothing after).
/// With `track`, also records which elements read memo entries earlier elements wrote.
pub(super) fn walk_elements<R: BufRead>(
    inp: &mut Input<R>,
    expected: u64,
    track: bool,
    wrap: &dyn Fn(FormatError) -> DatasetError,
    mut on_element: impl FnMut(u64, &Value) -> Result<bool, DatasetError>,
) -> Result<Walked, DatasetError> {
    inp.dec.keep_payload = Some(KEEP_PAYLOAD);
    let mut d = Depth::default();
    // `last_at[l]`: position after the last op of the unit that left the depth at `l`.
    let mut last_at: Vec<u64> = Vec::new();
    let mut unit_start = 0u64;
    // Memo reads and writes of the unit: (position, index, is a write).
    let mut events: Vec<(u64, u32, bool)> = Vec::new();
    let mut writer_of = IndexMap32::default();
    let mut refs: Vec<(u32, u32)> = Vec::new();
    let mut keeper = Keeper::new();
    let mut done = 0u64;
    loop {
        let op = match inp.rd.next_op().map_err(wrap)? {
            Some(op) => op,
            None => return Err(wrap(ended_early(&inp.rd))),
        };
        if d.depth == 0 {
            if matches!(
                op.code,
                op::FRAME | op::PUT | op::BINPUT | op::LONG_BINPUT | op::MEMOIZE
            ) {
                // A frame, or the data list itself memoized: no element's business.
                inp.dec.apply(&op, &mut inp.rd).map_err(wrap)?;
                continue;
            }
            unit_start = op.offset;
            last_at.clear();
            last_at.push(op.offset);
            events.clear();
        }
        let event = if track {
            match op.code {
                op::GET | op::BINGET | op::LONG_BINGET => {
                    Some((memo_index(&op, &inp.rd).map_err(wrap)?, false))
                }
                op::PUT | op::BINPUT | op::LONG_BINPUT => {
                    Some((memo_index(&op, &inp.rd).map_err(wrap)?, true))
                }
                op::MEMOIZE => Some((inp.dec.memo.len(), true)),
                _ => None,
            }
        } else {
            None
        };
        let end = unit_end(op.code, &d);
        if !d.apply(op.code).map_err(|r| wrap(stack_error(&op, r)))? {
            if done != expected {
                return Err(wrap(element_count(expected, done)));
            }
            finish_input(inp, op).map_err(wrap)?;
            return Ok(Walked { refs });
        }
        inp.dec.apply(&op, &mut inp.rd).map_err(wrap)?;
        inp.rd.skip_payload().map_err(wrap)?;
        if let Some((idx, write)) = event {
            events.push((op.offset, idx, write));
        }
        if last_at.len() <= d.depth {
            last_at.resize(d.depth + 1, 0);
        }
        last_at[d.depth] = inp.rd.position();
        let Some(n) = end else { continue };
        let elements = inp.dec.take_elements();
        if elements.len() as u64 != n || done + n > expected {
            return Err(wrap(element_count(expected, done + elements.len() as u64)));
        }
        if track {
            if done + n >= u64::from(u32::MAX - 1) {
                return Err(wrap(FormatError::Unsupported {
                    reason: "filtering an object array of more than 2^32 - 2 elements".into(),
                }));
            }
            // Element k of the unit spans [start, end) of the stream.
            let bounds: Vec<(u64, u64)> = if op.code == op::APPENDS {
                (0..n as usize)
                    .map(|k| (last_at[1 + k], last_at[2 + k]))
                    .collect()
            } else {
                vec![(unit_start, last_at[1])]
            };
            let (mut k, mut first_of_el) = (0usize, refs.len());
            for &(pos, idx, write) in &events {
                while k < bounds.len() && pos >= bounds[k].1 {
                    k += 1;
                    first_of_el = refs.len();
                }
                if k == bounds.len() || pos < bounds[k].0 {
                    continue;
                }
                let e = (done + k as u64) as u32;
                if write {
                    writer_of.insert(idx, e);
                } else if let Some(w) = writer_of.get(idx)
                    && w != e
                    && !refs[first_of_el..].contains(&(e, w))
                {
                    refs.push((e, w));
                }
            }
        }
        for (k, el) in elements.iter().enumerate() {
            if !on_element(done + k as u64, el)? {
                return Ok(Walked { refs });
            }
        }
        done += n;
        drop(elements);
        inp.dec.compact_memo(|v| keeper.compact(v));
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use crate::pickle::Map;

    #[test]
    fn keeper_keeps_key_strings_past_its_budget() {
        let s = |x: &str| Value::Str(Rc::new(x.to_string()));
        let mut m = Map::default();
        m.items.push((s("E_pen"), Value::Float(0.1)));
        let dict = Value::Dict(Rc::new(RefCell::new(m)));
        let mut k = Keeper::new();
        k.left = 0;
        // The dict comes first in the memo, then its key; both after the budget is spent.
        assert!(matches!(k.compact(&dict), Value::Opaque(Kind::Object)));
        assert!(matches!(k.compact(&s("E_pen")), Value::Str(x) if x.as_str() == "E_pen"));
        assert!(matches!(k.compact(&s("other")), Value::Opaque(Kind::Str)));
        let mut k = Keeper::new();
        assert!(matches!(k.compact(&s("other")), Value::Str(_)));
        assert!(k.left < KEEP_BUDGET);
    }
}
