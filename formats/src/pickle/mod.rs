//! The pickle engine: reading, checking, evaluating and writing Python pickle streams without
//! Python. `.npy` object arrays (`np.save(path, list_of_dicts, allow_pickle=True)`) and the
//! pickled episode files of episode directories are both pickles; what is specific to numpy's
//! object arrays (their header, merging and selecting their elements) lives in `npy`.
//!
//! - `opcodes`: the opcode table (names, argument layouts, stack effects, [`complete_len`]);
//! - `reader`: [`OpReader`], opcodes one at a time off a stream, payloads left in the stream;
//! - `stack`: [`Depth`], the stack shape of a stream tracked without values;
//! - `value`: the decoded [`Value`] model;
//! - `decoder`: [`Decoder`], a small evaluator building [`Value`]s (calls recorded, never
//!   performed);
//! - `memo`: memo tables sized for tens of millions of entries;
//! - `emit`: writing opcodes (memo reads and writes, literals, decoded values);
//! - `check`: [`check_complete`], whether a stream is one complete, well-formed pickle.
//!
//! Errors are the `.npy` module's [`FormatError`] (`BadPickle`, `Truncated`, `Unsupported`,
//! ...), since object arrays are where they surface.

mod check;
mod decoder;
pub(crate) mod emit;
mod memo;
mod opcodes;
mod reader;
mod stack;
mod value;

pub(crate) use crate::npy::FormatError;

pub(crate) use check::check_complete;
pub(crate) use decoder::{Decoder, Step, memo_index};
pub(crate) use memo::IndexMap32;
pub(crate) use opcodes::{complete_len, op};
pub(crate) use reader::{Op, OpReader};
pub(crate) use stack::Depth;
#[cfg(test)]
pub(crate) use value::Map;
pub(crate) use value::{KeySet, Kind, Obj, Value, is_bare};
