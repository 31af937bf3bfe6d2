//! The stack shape of a pickle stream, tracked without values ([`Depth`]): enough to find
//! element boundaries in a data list and to check a stream's stack discipline.

use super::opcodes::{Effect, effect, name};

/// The stack shape of a pickle stream, tracked without values: `depth` counts items and
/// marks alike, so no opcode raises it by more than one.
#[derive(Debug, Default, Clone)]
pub(crate) struct Depth {
    pub depth: usize,
    /// Depth before each open mark was pushed (the mark sits at that index).
    pub marks: Vec<usize>,
}

impl Depth {
    /// Applies `code` if it keeps to the stack it belongs to and returns true; otherwise
    /// changes nothing and returns false, leaving [`Depth::apply`] to say what happened (the
    /// end of the stack, or a malformed pickle). `POP` always goes to `apply`, being rare.
    #[inline]
    pub fn apply_fast(&mut self, code: u8) -> bool {
        match effect(code) {
            Effect::Mark => {
                self.marks.push(self.depth);
                self.depth += 1;
            }
            Effect::Items { pop, push } => {
                // `apply` fails exactly when fewer than `pop` items sit above the topmost mark
                // (or above the floor, without one).
                let floor = self.marks.last().map_or(0, |m| m + 1);
                if self.depth < floor + pop as usize {
                    return false;
                }
                self.depth = self.depth - pop as usize + push as usize;
            }
            Effect::ToMark { push } => match self.marks.pop() {
                Some(m) => self.depth = m + push as usize,
                None => return false,
            },
            Effect::Pop => return false,
        }
        true
    }

    /// Applies `code`, or says it would reach below `floor` (entries this tracker does not own).
    /// `Ok(false)` means the opcode would pop below the floor and nothing was changed.
    pub fn apply(&mut self, code: u8) -> Result<bool, String> {
        let above_mark = |s: &Self| s.depth - s.marks.last().map_or(0, |m| m + 1);
        match effect(code) {
            Effect::Mark => {
                self.marks.push(self.depth);
                self.depth += 1;
            }
            Effect::Pop => {
                if self.depth == 0 {
                    return Ok(false);
                }
                if self.marks.last() == Some(&(self.depth - 1)) {
                    self.marks.pop();
                }
                self.depth -= 1;
            }
            Effect::ToMark { push } => {
                let Some(m) = self.marks.pop() else {
                    return if self.depth == 0 {
                        Ok(false)
                    } else {
                        Err(format!("{} without a mark", name(code)))
                    };
                };
                self.depth = m + push as usize;
            }
            Effect::Items { pop, push } => {
                let pop = pop as usize;
                if self.marks.is_empty() && self.depth < pop {
                    if self.depth == 0 {
                        return Ok(false);
                    }
                    return Err(format!("{} pops below the stack it belongs to", name(code)));
                }
                if above_mark(self) < pop {
                    return Err(format!("{} needs {pop} items above the mark", name(code)));
                }
                self.depth = self.depth - pop + push as usize;
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::opcodes::op;
    use super::*;

    #[test]
    fn depth_counts_marks_and_stops_at_floor() {
        let mut d = Depth::default();
        for c in [
            op::MARK,
            op::NONE,
            op::NONE,
            op::TUPLE,
            op::EMPTY_DICT,
            op::MARK,
        ] {
            assert!(d.apply(c).unwrap());
        }
        assert_eq!(d.depth, 3);
        assert!(d.apply(op::SETITEMS).unwrap());
        assert_eq!(d.depth, 2);
        assert!(d.apply(op::MARK).unwrap());
        assert!(d.apply(op::SETITEM).is_err());
        assert!(d.apply(op::POP).unwrap());
        assert!(d.apply(op::SETITEM).unwrap());
        assert!(!d.apply(op::APPEND).unwrap());
        let mut top = Depth::default();
        assert!(!top.apply(op::TUPLE).unwrap());
        assert!(!top.apply(op::BUILD).unwrap());
    }
}
