//! The alignment rule of a zarr merge: which rows of an input array are merged by copying
//! its chunk files byte for byte under new chunk indices, and which must be decoded and
//! encoded again.
//!
//! A chunk row (the chunks sharing one index of axis 0) is copied when the input's array
//! has the output's encoding (chunk shape, element type, codecs, filters, order, fill
//! value), the output stands at a chunk boundary, and the rows taken start at the chunk
//! row's start and run to its end. Taking only its first rows (the array's last, partial
//! chunk, or a cut at the quota inside a chunk) copies it too, held back by the writer
//! until it is known that nothing follows it in the output; if rows do follow, it is decoded
//! after all. Everything else is decoded: misaligned chunks, rows dropped inside a chunk by
//! a filter or de-duplication, another encoding.

/// How one piece of an input array reaches the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Chunk row `row` copied as the output's next chunk row, of which `rows` rows count
    /// (fewer than a chunk's only where the output may end inside it).
    Copy { row: u64, rows: u64 },
    /// Rows `start..start + n` decoded and pushed.
    Decode { start: u64, n: u64 },
}

/// Plans the rows `runs` ((start, count), in order) of an array of `len` rows in chunks of
/// `c0` rows, for an output standing `offset` rows past its last chunk boundary; `same`:
/// the input's encoding is the output's.
pub(crate) fn plan(c0: u64, len: u64, runs: &[(u64, u64)], offset: u64, same: bool) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    let mut offset = offset % c0.max(1);
    for &(start, n) in runs {
        let end = (start + n).min(len);
        let mut at = start;
        while at < end {
            let row = at / c0;
            let first = row * c0;
            let stop = end.min(first + c0);
            let rows = stop - at;
            if same && offset == 0 && at == first {
                out.push(Piece::Copy { row, rows });
                offset = rows % c0;
            } else {
                match out.last_mut() {
                    Some(Piece::Decode { start, n }) if *start + *n == at => *n += rows,
                    _ => out.push(Piece::Decode { start: at, n: rows }),
                }
                offset = (offset + rows) % c0;
            }
            at = stop;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Piece::{Copy, Decode};
    use super::*;

    #[test]
    fn one_step_chunks_are_always_copied() {
        // Chunks of one row: any set of rows, any output position, is whole chunks.
        let p = plan(1, 10, &[(0, 3), (5, 2)], 0, true);
        assert_eq!(
            p,
            vec![
                Copy { row: 0, rows: 1 },
                Copy { row: 1, rows: 1 },
                Copy { row: 2, rows: 1 },
                Copy { row: 5, rows: 1 },
                Copy { row: 6, rows: 1 }
            ]
        );
    }

    #[test]
    fn whole_chunk_rows_are_copied_and_the_last_partial_one_held() {
        // 10 rows in chunks of 4: two whole chunk rows, then the partial one (2 rows).
        assert_eq!(
            plan(4, 10, &[(0, 10)], 0, true),
            vec![
                Copy { row: 0, rows: 4 },
                Copy { row: 1, rows: 4 },
                Copy { row: 2, rows: 2 }
            ]
        );
        // A cut at the quota inside chunk row 1 keeps its first 3 rows.
        assert_eq!(
            plan(4, 10, &[(0, 7)], 0, true),
            vec![Copy { row: 0, rows: 4 }, Copy { row: 1, rows: 3 }]
        );
    }

    #[test]
    fn misalignment_is_decoded() {
        // Output 2 rows past a boundary: nothing lines up.
        assert_eq!(
            plan(4, 8, &[(0, 8)], 2, true),
            vec![Decode { start: 0, n: 8 }]
        );
        // Another encoding: decoded whatever the alignment.
        assert_eq!(
            plan(4, 8, &[(0, 8)], 0, false),
            vec![Decode { start: 0, n: 8 }]
        );
        // An episode dropped inside chunk row 0 (rows 1..3): row 0 is held as a partial
        // copy, then rows 3.. follow, misaligned, until chunk row 1 is reached at offset 2.
        assert_eq!(
            plan(4, 8, &[(0, 1), (3, 5)], 0, true),
            vec![Copy { row: 0, rows: 1 }, Decode { start: 3, n: 5 }]
        );
        // Dropping a whole chunk row keeps the alignment.
        assert_eq!(
            plan(4, 12, &[(0, 4), (8, 4)], 0, true),
            vec![Copy { row: 0, rows: 4 }, Copy { row: 2, rows: 4 }]
        );
    }
}
