//! Planning one input of a filtered merge (which samples are kept, which left-out elements
//! must still be written for the memo entries kept ones read) and writing its planned
//! elements.

use std::io::{BufRead, Read, Write};
use std::path::Path;

use super::judge::{Judge, RowRules};
use super::walk::walk_elements;
use super::{KEEP, NEEDED, Plan, SKIP, read_row, row_bytes};
use crate::DatasetError;
use crate::npy::FormatError;
use crate::npy::header::Header;
use crate::npy::object::{
    Batches, Input, Output, Translator, element_count, ended_early, stack_error, translate,
    unit_end,
};
use crate::pickle::{Depth, op};

/// Plans a numeric input: reads and judges rows until `room` are kept.
pub(super) fn plan_numeric(
    path: &Path,
    mut r: impl Read,
    h: &Header,
    len: u64,
    rules: &RowRules,
    judge: &mut Judge,
    room: u64,
) -> Result<Plan, DatasetError> {
    crate::npy::numeric::inspect(h, len)?;
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
pub(super) fn plan_object<R: BufRead>(
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
pub(super) fn write_object<R: BufRead, W: Write>(
    inp: &mut Input<R>,
    tr: &mut Translator,
    batches: &mut Batches,
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
        // The batch's MARK (and any frame after it): the output is batched afresh.
        tr.skip(&bytes[..ranges[0].0], &inp.dec)?;
        for (&(a, b), &state) in ranges.iter().zip(states) {
            match state {
                KEEP => {
                    batches.before_element(&mut out.buf);
                    translate(&bytes[a..b], tr, &inp.dec, out)?;
                }
                NEEDED => {
                    translate(&bytes[a..b], tr, &inp.dec, out)?;
                    out.buf.push(op::POP);
                }
                _ => tr.skip(&bytes[a..b], &inp.dec)?,
            }
        }
        out.spill()?;
        e += n;
    }
    Ok(())
}

pub(super) fn plan_object_count<R: BufRead>(
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
