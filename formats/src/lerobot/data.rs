//! The frames: `data/chunk-*/file-*.parquet`, one row per frame with `episode_index`, `index`
//! (the frame's place in the dataset), `task_index` and the features. Read and rewritten in
//! record batches of [`BATCH_ROWS`](super::meta::BATCH_ROWS), so memory is a batch and a row
//! group in flight however large the files.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::meta::{Episode, each_batch, int_column, label, open_parquet};
use crate::DatasetError;

/// A row group is cut once this many bytes are buffered.
const ROW_GROUP_BYTES: usize = 8 << 20;

/// Checks that every row of data files belongs where the episode table says: its episode
/// exists and names this file, its `index` lies in the episode's range, indices rise within
/// a file, and in the end each episode has exactly `length` rows.
pub struct RowCheck<'a> {
    eps: &'a [Episode],
    seen: Vec<i64>,
}

impl<'a> RowCheck<'a> {
    pub fn new(eps: &'a [Episode]) -> Self {
        RowCheck {
            eps,
            seen: vec![0; eps.len()],
        }
    }

    /// Checks one batch of file (`chunk`, `file`); `last` is the previous row's index in
    /// that file.
    fn batch(
        &mut self,
        at: &str,
        (chunk, file): (i64, i64),
        ep: &Int64Array,
        index: &Int64Array,
        last: &mut Option<i64>,
    ) -> Result<(), DatasetError> {
        for (e, i) in ep.values().iter().zip(index.values()) {
            let episode = usize::try_from(*e)
                .ok()
                .and_then(|n| self.eps.get(n))
                .ok_or_else(|| {
                    DatasetError::invalid(
                        at,
                        format!("a row of episode_index {e} names no episode of meta/episodes"),
                    )
                })?;
            if (episode.data_chunk, episode.data_file) != (chunk, file) {
                return Err(DatasetError::invalid(
                    at,
                    format!(
                        "a row of episode {e} is here but meta/episodes puts the episode in {}",
                        super::meta::data_rel(episode.data_chunk, episode.data_file)
                    ),
                ));
            }
            if !(episode.from..episode.to).contains(i) || last.is_some_and(|l| l >= *i) {
                return Err(DatasetError::invalid(
                    at,
                    format!(
                        "row index {i} of episode {e} lies outside its dataset_from_index..dataset_to_index {}..{} or does not rise",
                        episode.from, episode.to
                    ),
                ));
            }
            *last = Some(*i);
            self.seen[*e as usize] += 1;
        }
        Ok(())
    }

    /// After every file: each episode has all its rows.
    pub fn finish(&self, root: &Path, only: impl Fn(&Episode) -> bool) -> Result<(), DatasetError> {
        for (e, n) in self.eps.iter().zip(&self.seen) {
            if only(e) && *n != e.length {
                return Err(DatasetError::invalid(
                    label(root, &super::meta::data_rel(e.data_chunk, e.data_file)),
                    format!(
                        "episode {} has {n} rows but meta/episodes says length {} (rows {}..{})",
                        e.index, e.length, e.from, e.to
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Reads the `episode_index` and `index` columns of one data file through `check`.
pub fn scan(
    root: &Path,
    (chunk, file): (i64, i64),
    check: &mut RowCheck,
) -> Result<(), DatasetError> {
    let rel = super::meta::data_rel(chunk, file);
    let at = label(root, &rel);
    let mut last = None;
    each_batch(root, &rel, &["episode_index", "index"], |batch| {
        let ep = int_column(batch, "episode_index", &at)?;
        let ix = int_column(batch, "index", &at)?;
        check.batch(&at, (chunk, file), ep, ix, &mut last)
    })
}

/// How a merge renumbers the rows of one round: per source episode, its new number and
/// how far its indices move (`None` for an episode cut); per source task, its new index.
pub struct Renumber<'a> {
    pub episodes: &'a [Option<(i64, i64)>],
    pub tasks: &'a [Option<i64>],
}

/// Writes one data file of the final.
pub struct DataWriter {
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    pub rows: u64,
}

impl DataWriter {
    /// A new data file at `path` with `schema` (the first round's, its metadata kept: the
    /// `huggingface` features lerobot reads back).
    pub fn create(path: &Path, schema: SchemaRef) -> Result<DataWriter, DatasetError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(DatasetError::io("create", dir))?;
        }
        let f = File::create_new(path).map_err(DatasetError::io("create", path))?;
        let writer = ArrowWriter::try_new(f, schema.clone(), Some(props(&schema)))
            .map_err(|e| DatasetError::invalid(path.display().to_string(), e.to_string()))?;
        Ok(DataWriter {
            writer,
            schema,
            rows: 0,
        })
    }

    /// Writes `batch`, cutting a row group when enough is buffered.
    pub fn write(&mut self, batch: &RecordBatch, at: &str) -> Result<(), DatasetError> {
        let err = |e: parquet::errors::ParquetError| DatasetError::invalid(at, e.to_string());
        let batch = batch
            .clone()
            .with_schema(self.schema.clone())
            .map_err(|e| DatasetError::invalid(at, e.to_string()))?;
        self.writer.write(&batch).map_err(err)?;
        if self.writer.in_progress_size() >= ROW_GROUP_BYTES {
            self.writer.flush().map_err(err)?;
        }
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    pub fn close(self, at: &str) -> Result<(), DatasetError> {
        self.writer
            .close()
            .map(|_| ())
            .map_err(|e| DatasetError::invalid(at, e.to_string()))
    }
}

/// Snappy, as lerobot (pandas/pyarrow) writes, with `schema`'s metadata as the file's
/// key-value metadata: pyarrow reads a schema's metadata (the `huggingface` features, the
/// `pandas` index) from there, not from the encoded arrow schema.
pub fn props(schema: &SchemaRef) -> WriterProperties {
    let kv: Vec<KeyValue> = schema
        .metadata()
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata((!kv.is_empty()).then_some(kv))
        .build()
}

/// Whether two schemas have the same columns (metadata aside).
pub fn same_fields(a: &SchemaRef, b: &SchemaRef) -> bool {
    a.fields() == b.fields()
}

/// Copies the kept rows of data file (`chunk`, `file`) of a round into `out`, renumbered,
/// checking each row against the episode table as [`scan`] does.
pub fn copy_rows(
    root: &Path,
    (chunk, file): (i64, i64),
    check: &mut RowCheck,
    renumber: &Renumber,
    out: &mut DataWriter,
) -> Result<(), DatasetError> {
    let rel = super::meta::data_rel(chunk, file);
    let at = label(root, &rel);
    let b = open_parquet(root, &rel)?;
    if !same_fields(b.schema(), &out.schema) {
        return Err(DatasetError::invalid(
            &at,
            format!(
                "its columns differ from the first round's data files ({:?} vs {:?})",
                b.schema().fields(),
                out.schema.fields()
            ),
        ));
    }
    let reader = b
        .build()
        .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
    let mut last = None;
    for batch in reader {
        let batch = batch.map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
        let ep = int_column(&batch, "episode_index", &at)?;
        let ix = int_column(&batch, "index", &at)?;
        let task = int_column(&batch, "task_index", &at)?;
        check.batch(&at, (chunk, file), ep, ix, &mut last)?;
        let n = batch.num_rows();
        let mut keep = Vec::with_capacity(n);
        let (mut new_ep, mut new_ix, mut new_task) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for r in 0..n {
            // RowCheck has bounded episode_index to the episode table.
            let Some((e, shift)) = renumber.episodes[ep.value(r) as usize] else {
                keep.push(false);
                continue;
            };
            let t = task.value(r);
            let nt = usize::try_from(t)
                .ok()
                .and_then(|t| renumber.tasks.get(t).copied().flatten())
                .ok_or_else(|| {
                    DatasetError::invalid(
                        &at,
                        format!(
                            "task_index {t} of a row of episode {} is not in meta/tasks.parquet or the episode's tasks",
                            ep.value(r)
                        ),
                    )
                })?;
            keep.push(true);
            new_ep.push(e);
            new_ix.push(ix.value(r) + shift);
            new_task.push(nt);
        }
        let kept = filter_record_batch(&batch, &BooleanArray::from(keep))
            .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
        if kept.num_rows() == 0 {
            continue;
        }
        let mut cols: Vec<ArrayRef> = kept.columns().to_vec();
        for (name, values) in [
            ("episode_index", new_ep),
            ("index", new_ix),
            ("task_index", new_task),
        ] {
            let i = kept
                .schema()
                .index_of(name)
                .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
            cols[i] = Arc::new(Int64Array::from(values));
        }
        let rewritten = RecordBatch::try_new(kept.schema(), cols)
            .map_err(|e| DatasetError::invalid(&at, e.to_string()))?;
        out.write(&rewritten, &at)?;
    }
    Ok(())
}
