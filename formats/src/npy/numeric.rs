//! Numeric arrays: fixed-size rows after the header, so merging is a header rewrite and raw
//! copies. The copies go through `std::io::copy` on `Take<&mut R>`, which the standard library
//! turns into `copy_file_range`/`sendfile` when `R` and `W` are files: the data never passes
//! through user space.

use std::io::{Read, Write};

use super::header::{Descr, Header, shape_repr, write_header};
use super::{ArrayKind, FormatError, Inspection, MergeSummary};

/// Bytes per first-axis row, refusing layouts a merge would get wrong.
fn row_bytes(h: &Header) -> Result<u64, FormatError> {
    let Descr::Numeric { itemsize, .. } = &h.descr else {
        return Err(FormatError::Unsupported {
            reason: "object array in numeric path".into(),
        });
    };
    if h.shape.is_empty() {
        return Err(FormatError::Unsupported {
            reason: "0-d array (no first axis to concatenate along)".into(),
        });
    }
    h.shape[1..]
        .iter()
        .try_fold(*itemsize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| FormatError::BadHeader {
            reason: "array size overflows".into(),
        })
}

/// Schema text: `npy <f4 (*, 3, 4)`; the first axis is `*` since rounds differ in length.
pub(crate) fn schema(h: &Header) -> String {
    let tail: Vec<String> = h.shape.iter().skip(1).map(|d| d.to_string()).collect();
    let shape = if tail.is_empty() {
        "(*,)".to_string()
    } else {
        format!("(*, {})", tail.join(", "))
    };
    let order = if h.fortran_order && h.shape.len() > 1 {
        " fortran"
    } else {
        ""
    };
    format!("npy {} {shape}{order}", h.descr.display())
}

/// Checks the file is exactly as long as the header says.
pub(crate) fn inspect(h: &Header, file_len: u64) -> Result<Inspection, FormatError> {
    let row = row_bytes(h)?;
    let count = h.shape[0];
    let expected = (count as u128) * (row as u128) + h.data_offset as u128;
    let expected = u64::try_from(expected).map_err(|_| FormatError::BadHeader {
        reason: "array size overflows".into(),
    })?;
    if file_len < expected {
        return Err(FormatError::Truncated {
            what: format!(
                "npy file ({} rows of {row} bytes after a {}-byte header)",
                count, h.data_offset
            ),
            expected,
            actual: file_len,
        });
    }
    if file_len > expected {
        return Err(FormatError::TrailingData {
            what: format!(
                "npy file ({} rows of {row} bytes after a {}-byte header)",
                count, h.data_offset
            ),
            expected,
            actual: file_len,
        });
    }
    Ok(Inspection {
        count,
        schema: schema(h),
        kind: ArrayKind::Numeric {
            descr: h.descr.display(),
            tail_shape: h.shape.iter().skip(1).copied().collect(),
        },
        data_offset: h.data_offset,
    })
}

fn check_layout(h: &Header) -> Result<(), FormatError> {
    if h.fortran_order && h.shape.len() > 1 {
        return Err(FormatError::Unsupported {
            reason: format!("Fortran-ordered array of shape {}", shape_repr(&h.shape)),
        });
    }
    Ok(())
}

/// Merges numeric inputs; `first` is input 0, already opened and its header read.
pub(crate) fn merge<R: Read, W: Write>(
    counts: &[u64],
    total: u64,
    mut open: impl FnMut(usize) -> std::io::Result<R>,
    first: (R, Header),
    mut out: W,
) -> Result<MergeSummary, FormatError> {
    let h0 = first.1.clone();
    let row = row_bytes(&h0).map_err(|e| FormatError::in_input(0, e))?;
    check_layout(&h0).map_err(|e| FormatError::in_input(0, e))?;
    let mut shape = h0.shape.clone();
    shape[0] = total;
    let header = write_header(&h0.descr, &shape)?;
    out.write_all(&header)?;
    let mut bytes_written = header.len() as u64;
    let mut used = vec![0u64; counts.len()];
    let mut written = 0u64;
    let mut first = Some(first);
    for (i, &count) in counts.iter().enumerate() {
        if i > 0 && written == total {
            break;
        }
        let in_input = |e: FormatError| FormatError::in_input(i, e);
        let (mut r, h) = match first.take() {
            Some(f) => f,
            None => {
                let mut r = open(i).map_err(|e| in_input(e.into()))?;
                let h = super::header::read_header(&mut r).map_err(in_input)?;
                (r, h)
            }
        };
        if h.descr != h0.descr {
            let what = match &h.descr {
                Descr::Object => "this one is an object array, input 0 is numeric".to_string(),
                d => format!(
                    "descr {} differs from input 0's {}",
                    d.display(),
                    h0.descr.display()
                ),
            };
            return Err(FormatError::Mismatch { input: i, what });
        }
        if h.shape.len() != h0.shape.len() || h.shape[1..] != h0.shape[1..] {
            return Err(FormatError::Mismatch {
                input: i,
                what: format!(
                    "shape {} differs from input 0's {} past the first axis",
                    shape_repr(&h.shape),
                    shape_repr(&h0.shape)
                ),
            });
        }
        check_layout(&h).map_err(in_input)?;
        if h.shape[0] != count {
            return Err(in_input(FormatError::CountMismatch {
                what: "committed sample count vs npy header shape".into(),
                expected: count,
                actual: h.shape[0],
            }));
        }
        let take = count.min(total - written);
        let overflow = || {
            in_input(FormatError::BadHeader {
                reason: "array size overflows".into(),
            })
        };
        let want = take.checked_mul(row).ok_or_else(overflow)?;
        let copied =
            std::io::copy(&mut (&mut r).take(want), &mut out).map_err(|e| in_input(e.into()))?;
        if copied < want {
            let full = count
                .checked_mul(row)
                .and_then(|n| n.checked_add(h.data_offset));
            return Err(in_input(FormatError::Truncated {
                what: "npy data".into(),
                expected: full.ok_or_else(overflow)?,
                actual: h.data_offset + copied,
            }));
        }
        if take == count {
            // np.save never writes past the data; anything there means the file is not what
            // its header says.
            let mut probe = [0u8; 1];
            if r.read(&mut probe).map_err(|e| in_input(e.into()))? > 0 {
                return Err(in_input(FormatError::TrailingData {
                    what: "npy file (bytes past the data)".into(),
                    expected: h.data_offset + want,
                    actual: h.data_offset + want + 1,
                }));
            }
        }
        bytes_written += copied;
        used[i] = take;
        written += take;
    }
    out.flush()?;
    Ok(MergeSummary {
        samples: written,
        bytes_written,
        used_per_input: used,
    })
}
