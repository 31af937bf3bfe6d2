//! Rows of an array, read and written one chunk row (the chunks sharing one index of axis 0)
//! at a time, so memory stays at a chunk row per array however long the array is.

use std::path::{Path, PathBuf};

use super::meta::ArrayMeta;
use crate::DatasetError;

/// A chunk that could not be read or decoded: its key and why.
#[derive(Debug)]
pub(crate) struct ChunkError {
    pub key: String,
    pub reason: String,
}

/// A C-order array's shape and a corner inside it.
struct At<'a> {
    shape: &'a [u64],
    corner: &'a [u64],
}

/// Copies the box of `extent` elements at `from.corner` in `src` (shape `from.shape`) into
/// `dst` (shape `to.shape`) at `to.corner`.
fn copy_box(src: &[u8], from: At, dst: &mut [u8], to: At, extent: &[u64], esize: usize) {
    let (src_shape, src_at, dst_shape, dst_at) = (from.shape, from.corner, to.shape, to.corner);
    let n = extent.len();
    if n == 0 || extent.contains(&0) {
        if n == 0 {
            dst[..esize].copy_from_slice(&src[..esize]);
        }
        return;
    }
    let strides = |shape: &[u64]| {
        let mut s = vec![esize; n];
        for i in (0..n - 1).rev() {
            s[i] = s[i + 1] * shape[i + 1] as usize;
        }
        s
    };
    let (ss, ds) = (strides(src_shape), strides(dst_shape));
    let run = extent[n - 1] as usize * esize;
    let mut idx = vec![0u64; n - 1];
    loop {
        let so: usize = (0..n)
            .map(|a| (src_at[a] + if a < n - 1 { idx[a] } else { 0 }) as usize * ss[a])
            .sum();
        let d: usize = (0..n)
            .map(|a| (dst_at[a] + if a < n - 1 { idx[a] } else { 0 }) as usize * ds[a])
            .sum();
        dst[d..d + run].copy_from_slice(&src[so..so + run]);
        let mut ax = n - 1;
        loop {
            if ax == 0 {
                return;
            }
            ax -= 1;
            idx[ax] += 1;
            if idx[ax] < extent[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
}

/// Every grid position of the axes past the first (one empty position for a 1-D array).
fn tail_positions(grid: &[u64]) -> Vec<Vec<u64>> {
    let mut out = vec![vec![]];
    for &g in grid.iter().skip(1) {
        out = out
            .into_iter()
            .flat_map(|p| {
                (0..g).map(move |i| {
                    let mut q = p.clone();
                    q.push(i);
                    q
                })
            })
            .collect();
    }
    out
}

/// Reads one chunk (decoded, C order), or `None` when it is absent (all fill value).
pub(crate) fn read_chunk(meta: &ArrayMeta, idx: &[u64]) -> Result<Option<Vec<u8>>, ChunkError> {
    let key = meta.chunk_key(idx);
    let path = meta.dir.join(&key);
    let raw = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ChunkError {
                key,
                reason: format!("cannot read: {e}"),
            });
        }
    };
    meta.decode_chunk(&raw)
        .map(Some)
        .map_err(|reason| ChunkError { key, reason })
}

/// Reads the rows of an array front to back, a chunk row at a time.
pub(crate) struct Cursor<'a> {
    meta: &'a ArrayMeta,
    block: Vec<u8>,
    /// Index of the chunk row in `block` (`u64::MAX`: none yet).
    loaded: u64,
    /// On a chunk that fails: give fill values and record the error (true) or fail (false).
    lenient: bool,
    /// Chunks that failed (lenient mode), not yet taken.
    pub problems: Vec<ChunkError>,
    /// Whether the loaded chunk row had a failed chunk.
    pub bad: bool,
}

impl<'a> Cursor<'a> {
    pub fn new(meta: &'a ArrayMeta, lenient: bool) -> Cursor<'a> {
        Cursor {
            meta,
            block: Vec::new(),
            loaded: u64::MAX,
            lenient,
            problems: Vec::new(),
            bad: false,
        }
    }

    fn load(&mut self, k: u64) -> Result<(), ChunkError> {
        let m = self.meta;
        let c0 = m.chunks[0];
        let rows = c0.min(m.shape[0] - k * c0);
        let row_bytes = m.row_bytes();
        let mut block_shape = m.shape.clone();
        block_shape[0] = rows;
        self.block.clear();
        self.block.resize(rows as usize * row_bytes, 0);
        self.bad = false;
        let grid = m.grid();
        for tail in tail_positions(&grid) {
            let mut idx = vec![k];
            idx.extend(&tail);
            let chunk = match read_chunk(m, &idx) {
                Ok(c) => c,
                Err(e) if self.lenient => {
                    self.problems.push(e);
                    self.bad = true;
                    None
                }
                Err(e) => return Err(e),
            };
            let chunk =
                chunk.unwrap_or_else(|| m.fill.repeat(m.chunk_bytes().unwrap_or(0) / m.elem.size));
            let mut dst_at = vec![0u64];
            let mut extent = vec![rows];
            for (a, &t) in tail.iter().enumerate() {
                let start = t * m.chunks[a + 1];
                dst_at.push(start);
                extent.push(m.chunks[a + 1].min(m.shape[a + 1] - start));
            }
            copy_box(
                &chunk,
                At {
                    shape: &m.chunks,
                    corner: &vec![0; m.chunks.len()],
                },
                &mut self.block,
                At {
                    shape: &block_shape,
                    corner: &dst_at,
                },
                &extent,
                m.elem.size,
            );
        }
        self.loaded = k;
        Ok(())
    }

    /// Calls `f` with the bytes of rows `start..start + n`, in pieces of whole rows, in order
    /// (with whether the piece's chunk row had a chunk that failed).
    pub fn rows(
        &mut self,
        start: u64,
        n: u64,
        mut f: impl FnMut(&[u8], bool),
    ) -> Result<(), ChunkError> {
        let m = self.meta;
        let c0 = m.chunks[0];
        let rb = m.row_bytes();
        let end = start + n;
        let mut at = start;
        while at < end {
            let k = at / c0;
            if self.loaded != k {
                self.load(k)?;
            }
            let first = k * c0;
            let stop = end.min(first + c0).min(m.shape[0]);
            f(
                &self.block[(at - first) as usize * rb..(stop - first) as usize * rb],
                self.bad,
            );
            at = stop;
        }
        Ok(())
    }
}

/// A chunk row copied from an input of which only the first `rows` rows count: written as
/// it is if the output ends inside it, decoded if rows follow.
struct Held {
    src: ArrayMeta,
    row: u64,
    rows: u64,
}

/// Writes rows into a new array directory laid out as `template` (chunks, codecs, keys),
/// a chunk row at a time: rows pushed are encoded, chunk rows copied are written as stored.
pub(crate) struct Writer {
    meta: ArrayMeta,
    dir: PathBuf,
    block: Vec<u8>,
    rows_in_block: u64,
    held: Option<Held>,
    next: u64,
    pub rows: u64,
    pub bytes_written: u64,
}

impl Writer {
    pub fn new(template: &ArrayMeta, dir: PathBuf) -> Writer {
        Writer {
            meta: template.clone(),
            dir,
            block: Vec::new(),
            rows_in_block: 0,
            held: None,
            next: 0,
            rows: 0,
            bytes_written: 0,
        }
    }

    /// Rows of the output past its last chunk boundary.
    pub fn offset(&self) -> u64 {
        self.held.as_ref().map_or(self.rows_in_block, |h| h.rows)
    }

    /// Copies chunk row `row` of `src` (the output's encoding, at a chunk boundary of the
    /// output: see `align.rs`) as the output's next chunk row, counting its first `rows`
    /// rows. Chunk files `src` lacks (all fill value) stay missing.
    pub fn copy_chunk_row(
        &mut self,
        src: &ArrayMeta,
        row: u64,
        rows: u64,
    ) -> Result<(), DatasetError> {
        self.rows += rows;
        if rows < self.meta.chunks[0] {
            self.held = Some(Held {
                src: src.clone(),
                row,
                rows,
            });
            return Ok(());
        }
        self.write_stored(src, row)
    }

    fn write_stored(&mut self, src: &ArrayMeta, row: u64) -> Result<(), DatasetError> {
        let mut grid = self.meta.grid();
        if let Some(g) = grid.first_mut() {
            *g = 1;
        }
        for tail in tail_positions(&grid) {
            let (mut from, mut to) = (vec![row], vec![self.next]);
            from.extend(&tail);
            to.extend(&tail);
            let from = src.dir.join(src.chunk_key(&from));
            let to = self.dir.join(self.meta.chunk_key(&to));
            if !from.is_file() {
                continue;
            }
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(DatasetError::io("create", parent))?;
            }
            self.bytes_written +=
                std::fs::copy(&from, &to).map_err(DatasetError::io("copy", &from))?;
        }
        self.next += 1;
        Ok(())
    }

    /// Decodes a held chunk row's counted rows into the block, since rows follow it.
    fn settle(&mut self) -> Result<(), DatasetError> {
        let Some(h) = self.held.take() else {
            return Ok(());
        };
        let mut block = Vec::new();
        Cursor::new(&h.src, false)
            .rows(h.row * h.src.chunks[0], h.rows, |b, _| {
                block.extend_from_slice(b)
            })
            .map_err(|e| {
                DatasetError::invalid(format!("{}/{}", h.src.dir.display(), e.key), e.reason)
            })?;
        self.block = block;
        self.rows_in_block = h.rows;
        Ok(())
    }

    /// Appends whole rows.
    pub fn push(&mut self, mut data: &[u8]) -> Result<(), DatasetError> {
        self.settle()?;
        let rb = self.meta.row_bytes();
        let c0 = self.meta.chunks[0];
        if rb == 0 {
            // Rows of zero bytes (a zero-length axis past the first): nothing to store.
            return Ok(());
        }
        while !data.is_empty() {
            let room = (c0 - self.rows_in_block) as usize * rb;
            let take = room.min(data.len());
            self.block.extend_from_slice(&data[..take]);
            let rows = (take / rb) as u64;
            self.rows_in_block += rows;
            self.rows += rows;
            data = &data[take..];
            if self.rows_in_block == c0 {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Counts rows of zero bytes, which `push` cannot see.
    pub fn push_empty_rows(&mut self, n: u64) {
        if self.meta.row_bytes() == 0 && n > 0 {
            self.rows += n;
        }
    }

    fn flush(&mut self) -> Result<(), DatasetError> {
        if self.rows_in_block == 0 {
            return Ok(());
        }
        let m = &self.meta;
        let mut shape = m.shape.clone();
        shape[0] = self.rows_in_block;
        let chunk_elems = m.chunk_bytes().unwrap_or(0) / m.elem.size;
        let mut grid = m.grid();
        grid[0] = 1;
        for tail in tail_positions(&grid) {
            let mut chunk = m.fill.repeat(chunk_elems);
            let mut src_at = vec![0u64];
            let mut extent = vec![self.rows_in_block];
            for (a, &t) in tail.iter().enumerate() {
                let start = t * m.chunks[a + 1];
                src_at.push(start);
                extent.push(m.chunks[a + 1].min(m.shape[a + 1] - start));
            }
            copy_box(
                &self.block,
                At {
                    shape: &shape,
                    corner: &src_at,
                },
                &mut chunk,
                At {
                    shape: &m.chunks,
                    corner: &vec![0; m.chunks.len()],
                },
                &extent,
                m.elem.size,
            );
            let mut idx = vec![self.next];
            idx.extend(&tail);
            let key = m.chunk_key(&idx);
            let bytes = m
                .encode_chunk(&chunk)
                .map_err(|e| DatasetError::Unsupported {
                    reason: format!("encoding chunk {key} of {}: {e}", self.dir.display()),
                })?;
            let path = self.dir.join(&key);
            write_file(&path, &bytes)?;
            self.bytes_written += bytes.len() as u64;
        }
        self.block.clear();
        self.rows_in_block = 0;
        self.next += 1;
        Ok(())
    }

    /// Writes the last, partial chunk row (padded with the fill value); returns the rows.
    pub fn finish(&mut self) -> Result<u64, DatasetError> {
        if let Some(h) = self.held.take() {
            // The output ends inside this chunk row: its rows past the end lie outside the
            // array's shape, where zarr never reads.
            return self.write_stored(&h.src, h.row).map(|()| self.rows);
        }
        self.flush()?;
        Ok(self.rows)
    }
}

/// Writes `bytes` at `path`, creating parent directories (for `/`-separated chunk keys).
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), DatasetError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(DatasetError::io("create", parent))?;
    }
    std::fs::write(path, bytes).map_err(DatasetError::io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_boxes_between_shapes() {
        // src 3x4 = 0..12; copy the 2x2 box at (1, 1) into a 4x4 zero array at (0, 2).
        let src: Vec<u8> = (0..12).collect();
        let mut dst = vec![0u8; 16];
        copy_box(
            &src,
            At {
                shape: &[3, 4],
                corner: &[1, 1],
            },
            &mut dst,
            At {
                shape: &[4, 4],
                corner: &[0, 2],
            },
            &[2, 2],
            1,
        );
        assert_eq!(&dst[..8], &[0, 0, 5, 6, 0, 0, 9, 10]);
        assert_eq!(tail_positions(&[5, 2, 3]).len(), 6);
        assert_eq!(tail_positions(&[5]), vec![Vec::<u64>::new()]);
    }
}
