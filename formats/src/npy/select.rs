//! Filtered and de-duplicated merges, `inspect` with a filter, and `examine`.
//!
//! A filtered merge runs in two phases, since the output's header (and, for object arrays,
//! the pickle's prologue) states the number of samples before any of them:
//!
//! 1. *Plan*: each input is read once, front to back, and every sample judged: the filter,
//!    then de-duplication (a SHA-256 of a canonical encoding of the listed fields, truncated to
//!    128 bits; first occurrence in input order kept, across all inputs). Planning stops once
//!    `limit` samples are kept; inputs past that point are never opened. The plan is one byte
//!    per judged sample.
//! 2. *Write*: each planned input is read again and its kept samples written: raw rows for
//!    numeric arrays, spliced pickle opcodes for object arrays.
//!
//! ## Leaving elements out of a pickle
//!
//! An object array's elements share pickle memo entries: Python's pickler writes an object
//! once and refers back to it (`BINGET`) whenever the same object appears again. numpy's
//! output relies on it everywhere: the dict key strings, the `scalar` and `_reconstruct`
//! globals, each dtype object are written by the first element that uses them and read by all
//! later ones; a generator that puts one shared value into every dict (an object's scale, say)
//! gets the same. Leaving an element out of the output leaves out its memo writes, so a later
//! element that reads one of them would break the pickle.
//!
//! The plan therefore also records, for every element, which earlier elements wrote memo
//! entries it reads. Walking back from the last kept element, an element is *needed* when it
//! is kept or a needed element reads an entry it wrote. In the written output:
//! - a kept element is copied into the data list as in an unfiltered merge (memo entries
//!   renumbered, see `object.rs`);
//! - a needed element that is not kept is copied too, and then popped off the stack (`POP`)
//!   before it reaches the list. Its objects are built exactly as in the input, so every later
//!   reference resolves to the very object it resolved to before, and objects shared between
//!   kept elements stay shared, as `np.concatenate(...)[keep]` has them;
//! - any other element is not written; its memo writes are marked as dropped in the
//!   translation table, and reading one is reported as an error rather than written.
//!
//! In numpy's pickles only the first elements of a round define shared entries, so the
//! popped elements cost a few hundred bytes per input.
//!
//! ## Memory
//!
//! Planning holds one pickle batch (1,000 elements) decoded, the decoder's memo (four bytes
//! per entry, plus values kept whole until an 8 MiB budget per input is spent: see [`Keeper`]),
//! which element wrote each memo entry (four bytes per entry), the reads of earlier elements
//! (eight bytes per distinct pair, in practice one or two per element), the plan (one byte per
//! sample) and the de-duplication digests (16 bytes per distinct sample). Writing holds one
//! batch of raw opcodes.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use sha2::{Digest, Sha256};

use super::FormatError;
use super::fields::{
    NumType, StructField, as_number, encode, leaf_numbers, lookup, numeric_leaves, struct_fields,
};
use super::header::{Descr, Header, read_header, shape_repr, write_header};
use super::memo::IndexMap32;
use super::object::{
    CORE_MODULE_V1, CORE_MODULE_V2, EPILOGUE, Input, Output, READ_BUF, Translator, element_count,
    ended_early, finish_input, kind_name, open_input, prologue, stack_error, translate, unit_end,
};
use super::pickle::{Depth, op};
use super::value::{Kind, Value, memo_index};
use crate::{DatasetError, Filter, MergeOptions, MergeSummary, Observer};

/// Longest string or bytes value decoded whole while judging or examining elements: numpy
/// arrays up to this size can be filtered on, de-duplicated and examined.
const KEEP_PAYLOAD: usize = 1 << 20;
/// Bytes of memo values [`Keeper`] keeps whole for later elements, per input.
const KEEP_BUDGET: usize = 8 << 20;

/// Plan entries.
const SKIP: u8 = 0;
const KEEP: u8 = 1;
/// Not kept, but a kept element reads a memo entry it writes.
const NEEDED: u8 = 2;

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DatasetError + 'a {
    DatasetError::io(op, path)
}

fn open_file(path: &Path) -> Result<(BufReader<File>, Header, u64), DatasetError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let len = f.metadata().map_err(io_err("stat", path))?.len();
    let mut r = BufReader::with_capacity(READ_BUF, f);
    let h = read_header(&mut r)?;
    Ok((r, h, len))
}

/// Judges samples: the filter first, then de-duplication.
struct Judge<'a> {
    filter: Option<&'a Filter>,
    dedup: &'a [String],
    seen: HashSet<[u8; 16]>,
    filtered: u64,
    duplicates: u64,
    scratch: Vec<u8>,
}

impl<'a> Judge<'a> {
    fn new(filter: Option<&'a Filter>, dedup: &'a [String]) -> Self {
        Judge {
            filter,
            dedup,
            seen: HashSet::new(),
            filtered: 0,
            duplicates: 0,
            scratch: Vec::new(),
        }
    }

    /// Records the digest; whether it is new.
    fn first_time(&mut self, h: Sha256) -> bool {
        let d = h.finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&d[..16]);
        self.seen.insert(key)
    }

    /// Whether element `index` of `file` is kept.
    fn element(&mut self, file: &Path, index: u64, el: &Value) -> Result<bool, DatasetError> {
        let err = |reason: String| DatasetError::Filter {
            path: format!("{}: element {index}", file.display()),
            reason,
        };
        if let Some(f) = self.filter {
            let v = lookup(el, &f.field).map_err(|r| err(format!("filter `{f}`: {r}")))?;
            let x =
                as_number(&v).map_err(|r| err(format!("filter `{f}`: field {}: {r}", f.field)))?;
            if !f.keeps(x) {
                self.filtered += 1;
                return Ok(false);
            }
        }
        if !self.dedup.is_empty() {
            let mut h = Sha256::new();
            for field in self.dedup {
                let v = lookup(el, field)
                    .map_err(|r| err(format!("de-duplication field {field}: {r}")))?;
                self.scratch.clear();
                encode(&v, &mut self.scratch).map_err(|what| {
                    err(format!(
                        "de-duplication field {field}: it holds {what}, which cannot be compared"
                    ))
                })?;
                h.update((self.scratch.len() as u64).to_le_bytes());
                h.update(&self.scratch);
            }
            if !self.first_time(h) {
                self.duplicates += 1;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether a numeric row is kept, by the fields `rules` located.
    fn row(&mut self, rules: &RowRules, row: &[u8]) -> bool {
        if let (Some(f), Some((ty, at))) = (self.filter, rules.filter)
            && !f.keeps(ty.read(&row[at..at + ty.size]))
        {
            self.filtered += 1;
            return false;
        }
        if !rules.dedup.is_empty() {
            let mut h = Sha256::new();
            for &(a, b) in &rules.dedup {
                h.update(&row[a..b]);
            }
            if !self.first_time(h) {
                self.duplicates += 1;
                return false;
            }
        }
        true
    }
}

/// Shrinks memo entries once the element that wrote them is judged: values later elements
/// may read (key strings, dtypes, shared scalars) stay whole while the budget lasts, anything
/// else becomes a summary. Values later read from a summary cannot be filtered on or
/// compared, which [`Judge`] reports as an error rather than guessing; numpy's pickles write
/// their shared values in the first elements of a round, long before the budget runs out.
struct Keeper {
    left: usize,
}

impl Keeper {
    fn new() -> Self {
        Keeper { left: KEEP_BUDGET }
    }

    fn compact(&mut self, v: &Value) -> Value {
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
struct Walked {
    /// `(element, earlier element)`: the element reads a memo entry the earlier one wrote.
    /// Sorted by element; each pair once.
    refs: Vec<(u32, u32)>,
}

/// Walks the data list of `inp` (opened, positioned at the list), handing each element to
/// `on_element(index, value)` until it returns false or the list ends (then the pickle's end
/// is checked: `expected` elements, the array built as numpy builds it, nothing after).
/// With `track`, also records which elements read memo entries earlier elements wrote.
fn walk_elements<R: BufRead>(
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

/// The plan for one input: what happens to each of its first `states.len()` samples.
struct Plan {
    states: Vec<u8>,
    kept: u64,
}

impl Plan {
    /// Samples the write phase goes through: up to the last kept one.
    fn walk_to(&self) -> u64 {
        self.states
            .iter()
            .rposition(|&s| s == KEEP)
            .map_or(0, |i| i as u64 + 1)
    }
}

/// Where a filter's field and the de-duplication fields sit in a numeric row.
#[derive(Debug, Default)]
struct RowRules {
    filter: Option<(NumType, usize)>,
    /// Byte ranges of the de-duplication fields.
    dedup: Vec<(usize, usize)>,
}

fn no_fields(file: &Path, descr: &str, what: &str) -> DatasetError {
    DatasetError::Filter {
        path: file.display().to_string(),
        reason: format!(
            "{what}: this is a plain {descr} array, which has no fields; filters and \
             de-duplication on .npy need a structured dtype (`np.zeros(n, dtype=[('E_pen', \
             'f4'), ...])`) or an object array of dicts"
        ),
    }
}

/// Locates the filter and de-duplication fields in a numeric array's rows.
fn row_rules(
    file: &Path,
    h: &Header,
    filter: Option<&Filter>,
    dedup: &[String],
) -> Result<RowRules, DatasetError> {
    let mut rules = RowRules::default();
    if filter.is_none() && dedup.is_empty() {
        return Ok(rules);
    }
    let Descr::Numeric { lit, .. } = &h.descr else {
        return Ok(rules);
    };
    let what = |name: &str| match filter {
        Some(f) if f.field == name => format!("filter `{f}`"),
        _ => format!("de-duplication field {name}"),
    };
    let first = filter
        .map(|f| f.field.as_str())
        .or(dedup.first().map(String::as_str))
        .unwrap_or_default();
    let Some(fields) = struct_fields(lit) else {
        return Err(no_fields(file, &h.descr.display(), &what(first)));
    };
    let records: u64 = h.shape.iter().skip(1).product();
    let err = |reason: String| DatasetError::Filter {
        path: file.display().to_string(),
        reason,
    };
    if records != 1 {
        return Err(err(format!(
            "{}: each sample of shape {} holds {records} records, so a field has no single \
             value per sample",
            what(first),
            shape_repr(&h.shape)
        )));
    }
    let find = |name: &str| -> Result<&StructField, DatasetError> {
        fields.iter().find(|f| f.path == name).ok_or_else(|| {
            let names: Vec<&str> = fields.iter().map(|f| f.path.as_str()).collect();
            err(format!(
                "{}: the dtype has no field {name} (fields: {})",
                what(name),
                names.join(", ")
            ))
        })
    };
    if let Some(f) = filter {
        let field = find(&f.field)?;
        match field.num {
            Some(ty) if field.count == 1 => rules.filter = Some((ty, field.offset)),
            _ => {
                return Err(err(format!(
                    "filter `{f}`: field {} is {}{}, not a scalar number (bool, int, uint or \
                     float)",
                    f.field,
                    field.descr,
                    if field.count == 1 {
                        String::new()
                    } else {
                        format!(" with {} elements", field.count)
                    }
                )));
            }
        }
    }
    for name in dedup {
        let field = find(name)?;
        rules.dedup.push((field.offset, field.offset + field.size));
    }
    Ok(rules)
}

fn row_bytes(h: &Header) -> Result<u64, FormatError> {
    let Descr::Numeric { itemsize, .. } = &h.descr else {
        return Ok(0);
    };
    h.shape
        .iter()
        .skip(1)
        .try_fold(*itemsize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| FormatError::BadHeader {
            reason: "array size overflows".into(),
        })
}

fn read_row(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<(), DatasetError> {
    r.read_exact(buf).map_err(io_err("read", path))
}

/// Plans a numeric input: reads and judges rows until `room` are kept.
fn plan_numeric(
    path: &Path,
    mut r: BufReader<File>,
    h: &Header,
    len: u64,
    rules: &RowRules,
    judge: &mut Judge,
    room: u64,
) -> Result<Plan, DatasetError> {
    super::numeric::inspect(h, len)?;
    let row = row_bytes(h)? as usize;
    let mut buf = vec![0u8; row];
    let mut plan = Plan {
        states: Vec::new(),
        kept: 0,
    };
    for _ in 0..h.shape[0] {
        if plan.kept == room {
            break;
        }
        read_row(&mut r, &mut buf, path)?;
        if judge.row(rules, &buf) {
            plan.states.push(KEEP);
            plan.kept += 1;
        } else {
            plan.states.push(SKIP);
        }
    }
    Ok(plan)
}

/// Plans an object input: judges elements until `room` are kept, then works out which left
/// out elements must still be written for the memo entries kept ones read.
fn plan_object<R: BufRead>(
    path: &Path,
    inp: &mut Input<R>,
    expected: u64,
    judge: &mut Judge,
    room: u64,
    wrap: &dyn Fn(FormatError) -> DatasetError,
) -> Result<Plan, DatasetError> {
    let mut plan = Plan {
        states: Vec::new(),
        kept: 0,
    };
    if room == 0 {
        return Ok(plan);
    }
    let walked = walk_elements(inp, expected, true, wrap, |i, el| {
        if judge.element(path, i, el)? {
            plan.states.push(KEEP);
            plan.kept += 1;
        } else {
            plan.states.push(SKIP);
        }
        Ok(plan.kept < room)
    })?;
    // Pairs come in element order, so walking them backwards visits an element only after
    // every later element that could make it needed.
    for &(e, w) in walked.refs.iter().rev() {
        let (e, w) = (e as usize, w as usize);
        if plan.states.get(e).is_some_and(|&s| s != SKIP) && plan.states[w] == SKIP {
            plan.states[w] = NEEDED;
        }
    }
    Ok(plan)
}

/// Writes the planned elements of an object input (opened, positioned at its data list).
fn write_object<R: BufRead, W: Write>(
    inp: &mut Input<R>,
    tr: &mut Translator,
    plan: &Plan,
    out: &mut Output<W>,
) -> Result<(), FormatError> {
    let walk_to = plan.walk_to();
    let mut d = Depth::default();
    let mut bytes: Vec<u8> = Vec::new();
    // `last_at[l]`: offset in `bytes` after the last op that left the depth at `l`.
    let mut last_at: Vec<usize> = Vec::new();
    let mut e = 0u64;
    while e < walk_to {
        let Some(op) = inp.rd.next_op()? else {
            return Err(ended_early(&inp.rd));
        };
        if d.depth == 0 {
            match op.code {
                op::FRAME => continue,
                op::PUT | op::BINPUT | op::LONG_BINPUT | op::MEMOIZE => {
                    tr.memoize_list(&op, &inp.rd, &inp.dec)?;
                    continue;
                }
                _ => {
                    bytes.clear();
                    last_at.clear();
                    last_at.push(0);
                }
            }
        }
        let end = unit_end(op.code, &d);
        if !d.apply(op.code).map_err(|r| stack_error(&op, r))? {
            return Err(element_count(walk_to, e));
        }
        bytes.extend_from_slice(inp.rd.head());
        inp.rd.copy_payload(&mut bytes)?;
        if last_at.len() <= d.depth {
            last_at.resize(d.depth + 1, 0);
        }
        last_at[d.depth] = bytes.len();
        let Some(n) = end else { continue };
        let batch = op.code == op::APPENDS;
        let ranges: Vec<(usize, usize)> = if batch {
            (0..n as usize)
                .map(|k| (last_at[1 + k], last_at[2 + k]))
                .collect()
        } else {
            vec![(0, last_at[1])]
        };
        let upto = n.min(walk_to - e) as usize;
        let states = &plan.states[e as usize..e as usize + upto];
        let used = states.iter().any(|&s| s != SKIP);
        // The batch's MARK (and any frame after it).
        let head = &bytes[..ranges[0].0];
        if used {
            translate(head, tr, &inp.dec, out)?;
        } else {
            tr.skip(head, &inp.dec)?;
        }
        for (&(a, b), &state) in ranges.iter().zip(states) {
            match state {
                KEEP => translate(&bytes[a..b], tr, &inp.dec, out)?,
                NEEDED => {
                    translate(&bytes[a..b], tr, &inp.dec, out)?;
                    out.buf.push(op::POP);
                }
                _ => tr.skip(&bytes[a..b], &inp.dec)?,
            }
        }
        if batch && used {
            out.buf.push(op::APPENDS);
        } else if !batch && states == [KEEP] {
            out.buf.push(op::APPEND);
        }
        out.spill()?;
        e += n;
    }
    Ok(())
}

/// The kind of array input 0 holds, which every input must share.
fn check_kind(i: usize, h: &Header, h0: &Header) -> Result<(), FormatError> {
    match (&h0.descr, &h.descr) {
        (Descr::Object, Descr::Object) => {
            if h.shape.len() != 1 {
                return Err(FormatError::in_input(
                    i,
                    FormatError::Unsupported {
                        reason: format!("object array of shape {:?} (only 1-D merges)", h.shape),
                    },
                ));
            }
            Ok(())
        }
        (Descr::Object, _) => Err(FormatError::Mismatch {
            input: i,
            what: format!("input 0 is an object array, this one is {}", kind_name(h)),
        }),
        (_, Descr::Object) => Err(FormatError::Mismatch {
            input: i,
            what: "this one is an object array, input 0 is numeric".into(),
        }),
        (a, b) if a != b => Err(FormatError::Mismatch {
            input: i,
            what: format!(
                "descr {} differs from input 0's {}",
                b.display(),
                a.display()
            ),
        }),
        _ if h.shape.len() != h0.shape.len() || h.shape[1..] != h0.shape[1..] => {
            Err(FormatError::Mismatch {
                input: i,
                what: format!(
                    "shape {} differs from input 0's {} past the first axis",
                    shape_repr(&h.shape),
                    shape_repr(&h0.shape)
                ),
            })
        }
        _ if h.fortran_order && h.shape.len() > 1 => Err(FormatError::in_input(
            i,
            FormatError::Unsupported {
                reason: format!("Fortran-ordered array of shape {}", shape_repr(&h.shape)),
            },
        )),
        _ if h.shape.is_empty() => Err(FormatError::in_input(
            i,
            FormatError::Unsupported {
                reason: "0-d array (no first axis to concatenate along)".into(),
            },
        )),
        _ => Ok(()),
    }
}

/// [`crate::merge`] for `.npy` with a filter or de-duplication: see the module docs.
pub(super) fn merge_selected(
    inputs: &[PathBuf],
    counts: &[u64],
    options: &MergeOptions,
    out_path: &Path,
) -> Result<MergeSummary, DatasetError> {
    let mut judge = Judge::new(options.filter.as_ref(), &options.dedup);
    let limit = options.limit;
    // Phase 1: plan.
    let mut plans: Vec<Plan> = Vec::new();
    let mut first: Option<Header> = None;
    let mut rules = RowRules::default();
    // Input 0's pickle protocol and `_reconstruct` module, for an object output.
    let mut style = (3u8, CORE_MODULE_V2);
    let mut kept = 0u64;
    for (i, path) in inputs.iter().enumerate() {
        if i > 0 && kept == limit {
            break;
        }
        let wrap = move |e: FormatError| DatasetError::from(FormatError::in_input(i, e));
        let (r, h, len) = open_file(path).map_err(|e| match e {
            DatasetError::Npy(e) => wrap(e),
            e => e,
        })?;
        check_kind(i, &h, first.get_or_insert_with(|| h.clone()))?;
        if h.shape[0] != counts[i] {
            return Err(wrap(FormatError::CountMismatch {
                what: "committed sample count vs npy header shape".into(),
                expected: counts[i],
                actual: h.shape[0],
            }));
        }
        if i == 0 {
            rules = row_rules(path, &h, options.filter.as_ref(), &options.dedup)?;
        }
        let room = limit - kept;
        let plan = match h.descr {
            Descr::Object => {
                let mut inp = open_input(r, &h).map_err(wrap)?;
                if i == 0 {
                    style.0 = inp.dec.proto;
                    if inp.module == CORE_MODULE_V1 {
                        style.1 = CORE_MODULE_V1;
                    }
                }
                plan_object(path, &mut inp, counts[i], &mut judge, room, &wrap)?
            }
            Descr::Numeric { .. } => plan_numeric(path, r, &h, len, &rules, &mut judge, room)
                .map_err(|e| match e {
                    DatasetError::Npy(e) => wrap(e),
                    e => e,
                })?,
        };
        kept += plan.kept;
        plans.push(plan);
    }
    let Some(h0) = first else {
        return Err(DatasetError::NoInputs);
    };

    // Phase 2: write.
    let f = File::create_new(out_path).map_err(io_err("create", out_path))?;
    let mut out = Output::new(&f);
    let mut shape = h0.shape.clone();
    shape[0] = kept;
    let werr = io_err("write", out_path);
    let header = write_header(&h0.descr, &shape)?;
    match h0.descr {
        Descr::Object => {
            let mut tr = Translator::new();
            tr.memoize = style.0 >= 4;
            out.write_all(&header)
                .and_then(|_| out.write_all(&prologue(style.0, style.1, kept)))
                .map_err(werr)?;
            for (i, plan) in plans.iter().enumerate() {
                if plan.walk_to() == 0 {
                    continue;
                }
                let wrap = |e: FormatError| DatasetError::from(FormatError::in_input(i, e));
                let (r, h, _) = open_file(&inputs[i])?;
                let mut inp = open_input(r, &h).map_err(wrap)?;
                tr.start_input(&inp.dec);
                write_object(&mut inp, &mut tr, plan, &mut out).map_err(wrap)?;
            }
            out.write_all(&EPILOGUE)
                .and_then(|_| out.flush())
                .map_err(io_err("write", out_path))?;
        }
        Descr::Numeric { .. } => {
            out.write_all(&header).map_err(werr)?;
            let row = row_bytes(&h0)? as usize;
            let mut buf = vec![0u8; row];
            for (i, plan) in plans.iter().enumerate() {
                let walk_to = plan.walk_to() as usize;
                if walk_to == 0 {
                    continue;
                }
                let (mut r, _, _) = open_file(&inputs[i])?;
                for &state in &plan.states[..walk_to] {
                    read_row(&mut r, &mut buf, &inputs[i])?;
                    if state == KEEP {
                        out.write_all(&buf).map_err(io_err("write", out_path))?;
                    }
                }
            }
            out.flush().map_err(io_err("write", out_path))?;
        }
    }
    Ok(MergeSummary {
        samples: kept,
        bytes_written: out.n,
        filtered: judge.filtered,
        duplicates: judge.duplicates,
    })
}

/// How many samples of `path` (already inspected) pass `filter`.
pub(super) fn count_kept(path: &Path, filter: &Filter) -> Result<u64, DatasetError> {
    let (r, h, len) = open_file(path)?;
    let mut judge = Judge::new(Some(filter), &[]);
    let plan = match h.descr {
        Descr::Object => {
            let mut inp = open_input(r, &h)?;
            plan_object_count(path, &mut inp, h.shape[0], &mut judge)?
        }
        Descr::Numeric { .. } => {
            let rules = row_rules(path, &h, Some(filter), &[])?;
            plan_numeric(path, r, &h, len, &rules, &mut judge, u64::MAX)?.kept
        }
    };
    Ok(plan)
}

fn plan_object_count<R: BufRead>(
    path: &Path,
    inp: &mut Input<R>,
    expected: u64,
    judge: &mut Judge,
) -> Result<u64, DatasetError> {
    let mut kept = 0u64;
    walk_elements(inp, expected, false, &|e| e.into(), |i, el| {
        kept += judge.element(path, i, el)? as u64;
        Ok(true)
    })?;
    Ok(kept)
}

/// [`crate::examine`] for `.npy`: see `examine_dataset`.
pub(super) fn examine(path: &Path, observer: &mut dyn Observer) -> Result<u64, DatasetError> {
    let (r, h, len) = open_file(path)?;
    let file = path.display().to_string();
    match &h.descr {
        Descr::Object => {
            if h.shape.len() != 1 {
                return Err(FormatError::Unsupported {
                    reason: format!(
                        "object array of shape {:?} (only 1-D is supported)",
                        h.shape
                    ),
                }
                .into());
            }
            let mut inp = open_input(r, &h)?;
            let mut reference: Option<Option<Rc<super::value::KeySet>>> = None;
            walk_elements(&mut inp, h.shape[0], false, &|e| e.into(), |i, el| {
                observer.sample(i);
                let keys = reference.get_or_insert_with(|| el.dict_keys().map(Rc::new));
                let at = format!("{file}: element {i}");
                match (keys.as_deref(), el) {
                    (Some(k), Value::Dict(_)) => {
                        if el.has_keys(k) != Some(true) {
                            let own = el.dict_keys().unwrap_or_default();
                            let missing: Vec<&str> =
                                k.difference(&own).map(String::as_str).collect();
                            let extra: Vec<&str> = own.difference(k).map(String::as_str).collect();
                            observer.problem(
                                &at,
                                &format!(
                                    "keys differ from element 0's (missing [{}], extra [{}])",
                                    missing.join(", "),
                                    extra.join(", ")
                                ),
                            );
                        }
                        numeric_leaves(el, "", &mut |field, vals, float| {
                            observer.values(field, vals);
                            if float {
                                report_non_finite(observer, &at, field, vals);
                            }
                        });
                    }
                    (Some(_), other) => observer.problem(
                        &at,
                        &format!("it is a {}, element 0 is a dict", other.type_name()),
                    ),
                    (None, Value::Dict(_)) => observer.problem(
                        &at,
                        "it is a dict, element 0 is not (fields are only reported when every \
                         element is a dict)",
                    ),
                    (None, other) => {
                        if let Some((vals, float)) = leaf_numbers(other) {
                            observer.values("value", &vals);
                            if float {
                                report_non_finite(observer, &at, "value", &vals);
                            }
                        }
                    }
                }
                Ok(true)
            })?;
            Ok(h.shape[0])
        }
        Descr::Numeric { lit, .. } => {
            super::numeric::inspect(&h, len)?;
            let mut r = r;
            let row = row_bytes(&h)? as usize;
            let records = h.shape.iter().skip(1).product::<u64>() as usize;
            // (field, type, offset in a record, elements)
            let fields: Vec<(String, NumType, usize, usize)> = match struct_fields(lit) {
                Some(fs) => fs
                    .into_iter()
                    .filter_map(|f| Some((f.path, f.num?, f.offset, f.count)))
                    .collect(),
                None => match lit {
                    super::header::PyLit::Str(s) => NumType::parse(s, "|")
                        .map(|t| vec![("value".to_string(), t, 0, 1)])
                        .unwrap_or_default(),
                    _ => Vec::new(),
                },
            };
            let record = row.checked_div(records).unwrap_or(0);
            let mut buf = vec![0u8; row];
            let mut vals = Vec::new();
            for i in 0..h.shape[0] {
                read_row(&mut r, &mut buf, path)?;
                observer.sample(i);
                for (name, ty, offset, count) in &fields {
                    vals.clear();
                    for rec in 0..records {
                        for c in 0..*count {
                            let at = rec * record + offset + c * ty.size;
                            vals.push(ty.read(&buf[at..at + ty.size]));
                        }
                    }
                    observer.values(name, &vals);
                    if ty.is_float() {
                        report_non_finite(observer, &format!("{file}: element {i}"), name, &vals);
                    }
                }
            }
            Ok(h.shape[0])
        }
    }
}

fn report_non_finite(observer: &mut dyn Observer, at: &str, field: &str, vals: &[f64]) {
    let nan = vals.iter().filter(|v| v.is_nan()).count();
    let inf = vals.iter().filter(|v| v.is_infinite()).count();
    if nan + inf == 0 {
        return;
    }
    let what = match (nan, inf) {
        (_, 0) => "NaN".to_string(),
        (0, _) => "an infinite value".to_string(),
        _ => "NaN and an infinite value".to_string(),
    };
    let of = if vals.len() > 1 {
        format!(" ({} of {} values)", nan + inf, vals.len())
    } else {
        String::new()
    };
    observer.problem(&format!("{at}: {field}"), &format!("{what}{of}"));
}
