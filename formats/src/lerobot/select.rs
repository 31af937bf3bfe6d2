//! Which episodes of a round the job keeps: `merge.filter` on an episode's fields and
//! `merge.dedup` on its fields or frames.
//!
//! - Filter fields: `length`, or a scalar numeric or bool column of the episode table
//!   (`meta/episodes/chunk-*/file-*.parquet`), e.g. a `success` column a generator adds. A
//!   null is NaN and so never kept. The per-episode `stats/<feature>/<stat>` columns are
//!   arrays and their names hold `/`, which a filter cannot spell: they are not filter fields.
//! - De-duplication fields: a column of the episode table (its one row of the episode), or a
//!   frame feature of the data files (`action`, `observation.state`: every row of the
//!   episode, in order). Columns of numbers, bools, strings, bytes and (nested, fixed-size)
//!   lists of them hash; nulls are refused.
//!
//! Everything is read in record batches; memory is a batch plus one running digest per
//! episode.

use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Field};

use super::meta::{self, Episode, data_rel, each_batch, int_column, label, open_parquet};
use crate::elem::{FieldDigest, SampleDigest};
use crate::{DatasetError, Filter};

fn field_error(path: impl Into<String>, reason: String) -> DatasetError {
    DatasetError::Filter {
        path: path.into(),
        reason,
    }
}

/// The file named in a field error: the round's first episode-table file.
fn table_label(root: &Path, files: &[String]) -> String {
    label(
        root,
        files
            .first()
            .map_or("meta/episodes/chunk-000/file-000.parquet", String::as_str),
    )
}

/// Whether a column is a scalar a filter compares.
fn is_scalar_number(t: &DataType) -> bool {
    t.is_numeric() || *t == DataType::Boolean
}

/// Whether a column's values hash (see [`hash_rows`]).
fn hashes(t: &DataType) -> bool {
    match t {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            hashes(f.data_type())
        }
        t => {
            t.is_primitive()
                || matches!(
                    t,
                    DataType::Boolean
                        | DataType::Utf8
                        | DataType::LargeUtf8
                        | DataType::Binary
                        | DataType::LargeBinary
                )
        }
    }
}

fn names(
    fields: impl IntoIterator<Item = impl AsRef<Field>>,
    ok: fn(&DataType) -> bool,
) -> Vec<String> {
    fields
        .into_iter()
        .filter(|f| ok(f.as_ref().data_type()))
        .map(|f| f.as_ref().name().clone())
        .collect()
}

/// Each episode's value of the filter field, in episode order.
pub fn filter_values(root: &Path, eps: &[Episode], f: &Filter) -> Result<Vec<f64>, DatasetError> {
    if f.field == "length" {
        return Ok(eps.iter().map(|e| e.length as f64).collect());
    }
    let files = meta::episode_files(root)?;
    let mut out = Vec::with_capacity(eps.len());
    for rel in &files {
        let at = label(root, rel);
        let b = open_parquet(root, rel)?;
        let schema = b.schema().clone();
        let usable = || {
            let mut n = vec!["length".to_string()];
            n.extend(names(schema.fields().iter(), is_scalar_number));
            n.join(", ")
        };
        let Ok(col_ix) = schema.index_of(&f.field) else {
            return Err(field_error(
                &at,
                format!(
                    "filter field {} is not a column of the episode table; the fields a filter compares are: {}",
                    f.field,
                    usable()
                ),
            ));
        };
        let t = schema.field(col_ix).data_type();
        if !is_scalar_number(t) {
            return Err(field_error(
                &at,
                format!(
                    "filter field {} is a column of {t}, not one number or bool per episode; the fields a filter compares are: {}",
                    f.field,
                    usable()
                ),
            ));
        }
        for batch in meta::projected(b, [col_ix], &at)? {
            let batch = batch?;
            let col = arrow::compute::cast(batch.column(0), &DataType::Float64)
                .map_err(|e| DatasetError::invalid(&at, format!("column {}: {e}", f.field)))?;
            let col = col.as_primitive::<arrow::datatypes::Float64Type>();
            for r in 0..col.len() {
                out.push(if col.is_null(r) {
                    f64::NAN
                } else {
                    col.value(r)
                });
            }
        }
    }
    if out.len() != eps.len() {
        return Err(DatasetError::invalid(
            table_label(root, &files),
            format!(
                "column {} holds {} values for {} episodes",
                f.field,
                out.len(),
                eps.len()
            ),
        ));
    }
    Ok(out)
}

/// Each episode's digest of the de-duplication fields, in episode order.
pub fn digests(
    root: &Path,
    eps: &[Episode],
    fields: &[String],
) -> Result<Vec<[u8; 32]>, DatasetError> {
    let mut out: Vec<SampleDigest> = eps.iter().map(|_| SampleDigest::new()).collect();
    let files = meta::episode_files(root)?;
    let data_files = meta::data_files(eps);
    for field in fields {
        let mut per: Vec<FieldDigest> = eps.iter().map(|_| FieldDigest::new()).collect();
        let table_schema = match files.first() {
            Some(rel) => Some(meta::parquet_schema(root, rel)?),
            None => None,
        };
        let data_schema = match data_files.first() {
            Some(&(c, f)) => Some(meta::parquet_schema(root, &data_rel(c, f))?),
            None => None,
        };
        let in_table = table_schema
            .as_ref()
            .and_then(|s| s.field_with_name(field).ok().cloned());
        let in_data = data_schema
            .as_ref()
            .and_then(|s| s.field_with_name(field).ok().cloned());
        let usable = || {
            let mut n = Vec::new();
            if let Some(s) = &table_schema {
                n.extend(names(s.fields().iter(), hashes));
            }
            if let Some(s) = &data_schema {
                for x in names(s.fields().iter(), hashes) {
                    if !n.contains(&x) {
                        n.push(x);
                    }
                }
            }
            n.join(", ")
        };
        let at = table_label(root, &files);
        let not_usable = |t: &DataType| {
            field_error(
                &at,
                format!(
                    "de-duplication field {field} is a column of {t}, which Quarry does not hash; the fields it hashes are: {}",
                    usable()
                ),
            )
        };
        if let Some(f) = in_table {
            if !hashes(f.data_type()) {
                return Err(not_usable(f.data_type()));
            }
            let mut row = 0usize;
            for rel in &files {
                let at = label(root, rel);
                each_batch(root, rel, &[field.as_str()], |batch| {
                    let col = batch.column(0);
                    for r in 0..col.len() {
                        let fd = per
                            .get_mut(row)
                            .ok_or_else(|| DatasetError::invalid(&at, "more rows than episodes"))?;
                        hash_rows(col.as_ref(), r, 1, fd).map_err(|e| {
                            DatasetError::invalid(&at, format!("column {field}: {e}"))
                        })?;
                        row += 1;
                    }
                    Ok(())
                })?;
            }
        } else if let Some(f) = in_data {
            if !hashes(f.data_type()) {
                return Err(not_usable(f.data_type()));
            }
            for &(c, fi) in &data_files {
                let rel = data_rel(c, fi);
                let at = label(root, &rel);
                each_batch(root, &rel, &["episode_index", field.as_str()], |batch| {
                    let ep = int_column(batch, "episode_index", &at)?;
                    let col = batch.column_by_name(field).ok_or_else(|| {
                        DatasetError::invalid(&at, format!("column {field} is missing"))
                    })?;
                    let mut start = 0;
                    while start < ep.len() {
                        let e = ep.value(start);
                        let mut end = start + 1;
                        while end < ep.len() && ep.value(end) == e {
                            end += 1;
                        }
                        let fd = usize::try_from(e)
                            .ok()
                            .and_then(|e| per.get_mut(e))
                            .ok_or_else(|| {
                                DatasetError::invalid(
                                    &at,
                                    format!(
                                        "a row of episode_index {e} names no episode of meta/episodes"
                                    ),
                                )
                            })?;
                        hash_rows(col.as_ref(), start, end - start, fd).map_err(|e| {
                            DatasetError::invalid(&at, format!("column {field}: {e}"))
                        })?;
                        start = end;
                    }
                    Ok(())
                })?;
            }
        } else {
            return Err(field_error(
                &at,
                format!(
                    "de-duplication field {field} is neither a column of the episode table nor a feature of the data files; the fields it hashes are: {}",
                    usable()
                ),
            ));
        }
        for (d, fd) in out.iter_mut().zip(per) {
            d.field(field, fd);
        }
    }
    Ok(out.into_iter().map(SampleDigest::finish).collect())
}

/// Feeds rows `start..start + len` of `a` into `fd`: a primitive's little-endian bytes, a
/// bool as one byte, a string or bytes as its length and bytes, a list as its rows' lengths
/// then its elements.
fn hash_rows(a: &dyn Array, start: usize, len: usize, fd: &mut FieldDigest) -> Result<(), String> {
    if start.checked_add(len).is_none_or(|e| e > a.len()) {
        return Err("rows out of range".into());
    }
    let nulls = a
        .logical_nulls()
        .map_or(0, |n| n.slice(start, len).null_count());
    if nulls > 0 {
        return Err("holds nulls (a de-duplication field must hold a value in every row)".into());
    }
    let t = a.data_type();
    match t {
        DataType::Boolean => {
            let b = a.as_boolean();
            for r in start..start + len {
                fd.update(&[u8::from(b.value(r))]);
            }
        }
        DataType::Utf8 => {
            for s in a.as_string::<i32>().iter().skip(start).take(len) {
                let s = s.unwrap_or_default();
                fd.update(&(s.len() as u64).to_le_bytes());
                fd.update(s.as_bytes());
            }
        }
        DataType::LargeUtf8 => {
            for s in a.as_string::<i64>().iter().skip(start).take(len) {
                let s = s.unwrap_or_default();
                fd.update(&(s.len() as u64).to_le_bytes());
                fd.update(s.as_bytes());
            }
        }
        DataType::Binary => {
            for s in a.as_binary::<i32>().iter().skip(start).take(len) {
                let s = s.unwrap_or_default();
                fd.update(&(s.len() as u64).to_le_bytes());
                fd.update(s);
            }
        }
        DataType::LargeBinary => {
            for s in a.as_binary::<i64>().iter().skip(start).take(len) {
                let s = s.unwrap_or_default();
                fd.update(&(s.len() as u64).to_le_bytes());
                fd.update(s);
            }
        }
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            let o = l.value_offsets();
            list(l.values().as_ref(), &o[start..=start + len], fd)?;
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>();
            let o = l.value_offsets();
            list(l.values().as_ref(), &o[start..=start + len], fd)?;
        }
        DataType::FixedSizeList(_, n) => {
            let l = a.as_fixed_size_list();
            let n = usize::try_from(*n).map_err(|_| "a negative list size")?;
            let from = l.value_offset_at(start);
            let count = len.checked_mul(n).ok_or("a list too long")?;
            hash_rows(l.values().as_ref(), from, count, fd)?;
        }
        t if t.is_primitive() => {
            let width = t.primitive_width().ok_or("no element width")?;
            let data = a.to_data();
            let buf = data.buffers().first().ok_or("no values")?;
            let from = (data.offset() + start) * width;
            let bytes = buf
                .as_slice()
                .get(from..from + len * width)
                .ok_or("values out of range")?;
            fd.update(bytes);
        }
        t => return Err(format!("{t} does not hash")),
    }
    Ok(())
}

fn list<O: arrow::array::OffsetSizeTrait>(
    values: &dyn Array,
    offsets: &[O],
    fd: &mut FieldDigest,
) -> Result<(), String> {
    for w in offsets.windows(2) {
        fd.update(&((w[1] - w[0]).as_usize() as u64).to_le_bytes());
    }
    let (Some(first), Some(last)) = (offsets.first(), offsets.last()) else {
        return Ok(());
    };
    hash_rows(values, first.as_usize(), (*last - *first).as_usize(), fd)
}
