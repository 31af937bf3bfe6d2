//! A size-bounded capture of a child's output.

use std::collections::VecDeque;
use std::fmt;

/// The output of a run, bounded to `limit` bytes: the first `limit / 2` bytes and the last
/// `limit - limit / 2` bytes are kept, everything in between is counted and dropped.
///
/// A generator that prints gigabytes of progress cannot exhaust the worker's memory, and the
/// two ends that matter for a post-mortem (the command line echo and the final traceback)
/// survive. [`BoundedLog::to_bytes`] renders the kept bytes with a
/// `... [N bytes omitted] ...` line where the cut was.
#[derive(Clone, PartialEq, Eq)]
pub struct BoundedLog {
    head: Vec<u8>,
    head_cap: usize,
    tail: VecDeque<u8>,
    tail_cap: usize,
    total: u64,
}

impl BoundedLog {
    /// An empty log that keeps at most `limit` bytes of output.
    pub fn new(limit: usize) -> Self {
        let head_cap = limit / 2;
        Self {
            head: Vec::new(),
            head_cap,
            tail: VecDeque::new(),
            tail_cap: limit - head_cap,
            total: 0,
        }
    }

    /// Appends a chunk of output.
    pub fn push(&mut self, mut chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let head_room = self.head_cap - self.head.len();
        if head_room > 0 {
            let n = head_room.min(chunk.len());
            self.head.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
        }
        if chunk.is_empty() || self.tail_cap == 0 {
            return;
        }
        if chunk.len() >= self.tail_cap {
            self.tail.clear();
            self.tail.extend(&chunk[chunk.len() - self.tail_cap..]);
        } else {
            let overflow = (self.tail.len() + chunk.len()).saturating_sub(self.tail_cap);
            self.tail.drain(..overflow);
            self.tail.extend(chunk);
        }
    }

    /// The number of bytes the child wrote, kept or not.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// The number of bytes dropped between the kept head and tail.
    pub fn omitted_bytes(&self) -> u64 {
        self.total - (self.head.len() + self.tail.len()) as u64
    }

    /// The kept output, with a marker line where bytes were omitted.
    pub fn to_bytes(&self) -> Vec<u8> {
        let omitted = self.omitted_bytes();
        let mut out = Vec::with_capacity(self.head.len() + self.tail.len() + 48);
        out.extend_from_slice(&self.head);
        if omitted > 0 {
            // The cut usually falls mid-line; put the marker on a line of its own so it is
            // never mistaken for the child's output.
            if !self.head.is_empty() && !self.head.ends_with(b"\n") {
                out.push(b'\n');
            }
            out.extend_from_slice(format!("... [{omitted} bytes omitted] ...\n").as_bytes());
        }
        let (a, b) = self.tail.as_slices();
        out.extend_from_slice(a);
        out.extend_from_slice(b);
        out
    }

    /// The last `n` lines of [`BoundedLog::to_bytes`], lossily decoded as UTF-8, without a
    /// trailing newline. Meant for error messages and status reports.
    pub fn tail_lines(&self, n: usize) -> String {
        if n == 0 {
            return String::new();
        }
        let bytes = self.to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let mut lines: Vec<&str> = text.rsplit('\n').take(n).collect();
        lines.reverse();
        lines.join("\n")
    }
}

impl fmt::Debug for BoundedLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedLog")
            .field("limit", &(self.head_cap + self.tail_cap))
            .field("total_bytes", &self.total)
            .field("omitted_bytes", &self.omitted_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_everything_under_the_limit() {
        let mut log = BoundedLog::new(100);
        log.push(b"hello\n");
        log.push(b"world\n");
        assert_eq!(log.to_bytes(), b"hello\nworld\n");
        assert_eq!(log.total_bytes(), 12);
        assert_eq!(log.omitted_bytes(), 0);
    }

    #[test]
    fn keeps_head_and_tail_and_marks_the_cut() {
        let mut log = BoundedLog::new(10);
        // Pushed in odd-sized chunks so the head/tail split crosses chunk boundaries.
        for chunk in b"0123456789abcdefghijklmnopqrstuvwxyz".chunks(3) {
            log.push(chunk);
        }
        assert_eq!(log.total_bytes(), 36);
        assert_eq!(log.omitted_bytes(), 26);
        assert_eq!(
            String::from_utf8(log.to_bytes()).expect("ascii"),
            "01234\n... [26 bytes omitted] ...\nvwxyz"
        );
    }

    #[test]
    fn one_huge_chunk() {
        let mut log = BoundedLog::new(7);
        log.push(&[b'x'; 1000]);
        assert_eq!(log.total_bytes(), 1000);
        assert_eq!(log.omitted_bytes(), 993);
        let text = String::from_utf8(log.to_bytes()).expect("ascii");
        assert_eq!(text, "xxx\n... [993 bytes omitted] ...\nxxxx");
    }

    #[test]
    fn zero_limit_counts_only() {
        let mut log = BoundedLog::new(0);
        log.push(b"abc");
        assert_eq!(log.to_bytes(), b"... [3 bytes omitted] ...\n");
        assert_eq!(log.total_bytes(), 3);
    }

    #[test]
    fn tail_lines() {
        let mut log = BoundedLog::new(1 << 10);
        log.push(b"a\nb\nc\nd\n");
        assert_eq!(log.tail_lines(2), "c\nd");
        assert_eq!(log.tail_lines(10), "a\nb\nc\nd");
        assert_eq!(log.tail_lines(0), "");
        log.push(b"partial");
        assert_eq!(log.tail_lines(2), "d\npartial");
    }
}
