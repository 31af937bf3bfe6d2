//! The `zarr` format: a directory store, v2 (`.zgroup`/`.zarray`/`.zattrs`) or v3
//! (`zarr.json`), as zarr-python writes it.
//!
//! Samples follow the replay-buffer convention (diffusion-policy style, what MimicGen-like
//! generators write): arrays under `data/` (and anywhere outside `meta/`) have the time axis
//! first, `meta/episode_ends` (integers) holds each episode's cumulative end row, and a sample
//! is an episode. Arrays under `meta/` with one row per episode (`meta/success`) are
//! per-episode fields; other `meta/` arrays are constants. Without `meta/episode_ends` a
//! sample is a row of axis 0, and every array must have the same length.
//!
//! A merge copies chunk files byte for byte where they line up with the output's chunks
//! (`align.rs`: the same encoding in every round, rows taken in whole chunks), so any codec
//! merges there. Elsewhere chunks are decoded and encoded here: no codec (v2
//! `compressor: null`, v3 `bytes` alone), zstd, gzip, zlib, numcodecs lz4, blosc (LZ4, Zstd or
//! Zlib inside, byte or bit shuffle), v3 `crc32c`, little- or big-endian elements and C/F
//! order or v3 `transpose`. Arrays with another codec (imagecodecs' `Jpeg2k`, `Qoi`, ...),
//! v2 `filters` or v3 `sharding_indexed` are copied whole and never decoded: inspection
//! checks their chunks' structure where it knows the codec (`signature.rs`) and that their
//! rows fill whole chunks (`chunks.rs`); a merge that would have to decode them is refused,
//! naming the array, the codec and the fix. String dtypes are [`DatasetError::Unsupported`].
//!
//! A merge streams each array a chunk row (the chunks sharing one index of axis 0) at a time:
//! memory is a chunk row per array in flight, however large the inputs.

mod align;
mod array;
mod blosc;
mod chunks;
mod codec;
mod meta;
mod signature;
mod store;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::elem::{FieldDigest, SampleDigest};
use crate::{DatasetError, Filter, Inspection, MergeOptions, MergeSummary, Observer};
use align::Piece;
use array::{ChunkError, Cursor, Writer, read_chunk, write_file};
use meta::ArrayMeta;
use store::{Role, Store};

/// Most values [`examine`] reports for one field of one sample.
const VALUE_CAP: usize = 1 << 16;

fn chunk_error(store: &Store, array: &str, e: ChunkError) -> DatasetError {
    DatasetError::invalid(format!("{}/{array}/{}", store.label, e.key), e.reason)
}

/// Every grid position of an array (one empty position for a 0-d array).
fn grid_positions(meta: &ArrayMeta) -> impl Iterator<Item = Vec<u64>> {
    let grid = meta.grid();
    let total: u64 = grid.iter().product();
    (0..total).map(move |mut n| {
        let mut idx = vec![0u64; grid.len()];
        for a in (0..grid.len()).rev() {
            idx[a] = n % grid[a];
            n /= grid[a];
        }
        idx
    })
}

/// Checks a store: metadata parses, the layout holds, every chunk present decodes to its
/// full size; counts episodes (or rows) and those passing `filter`.
pub fn inspect(path: &Path, filter: Option<&Filter>) -> Result<Inspection, DatasetError> {
    let store = Store::open(path)?;
    for (a, role) in &store.arrays {
        let fail = |e| chunk_error(&store, &a.name, e);
        chunks::check_keys(a).map_err(fail)?;
        if a.opaque.is_none() {
            for idx in grid_positions(a) {
                read_chunk(a, &idx).map_err(fail)?;
            }
            continue;
        }
        if matches!(role, Role::Data | Role::Episode) {
            chunks::check_rows_fill_chunks(a).map_err(fail)?;
        }
        for idx in grid_positions(a) {
            chunks::check_stored(a, &idx).map_err(fail)?;
        }
    }
    let kept = match filter {
        None => store.count,
        Some(f) => filter_values(&store, f)?
            .iter()
            .filter(|v| f.keeps(**v))
            .count() as u64,
    };
    Ok(Inspection {
        count: store.count,
        kept,
        schema: store.schema(),
    })
}

fn field_error(store: &Store, reason: String) -> DatasetError {
    DatasetError::Filter {
        path: store.label.clone(),
        reason,
    }
}

/// Each sample's value of the filter field: a per-episode array (replay buffer) or a 1-D
/// array (rows).
fn filter_values(store: &Store, f: &Filter) -> Result<Vec<f64>, DatasetError> {
    let (a, role) = store.field(&f.field).ok_or_else(|| {
        field_error(
            store,
            format!(
                "filter field {} names no array (looked for {})",
                f.field,
                f.field.replace('.', "/")
            ),
        )
    })?;
    let ok_role = match store.ends {
        Some(_) => *role == Role::Episode,
        None => *role == Role::Data,
    };
    if let Some(what) = &a.opaque {
        return Err(field_error(
            store,
            format!(
                "filter field {} is {}, stored with {what}, which Quarry does not decode: filter on an array stored without it (blosc, zstd, gzip, zlib, lz4 or none)",
                f.field, a.name
            ),
        ));
    }
    if !ok_role || a.shape.len() != 1 || !a.elem.is_numeric() {
        let want = if store.ends.is_some() {
            "a 1-D numeric array under meta/ with one value per episode"
        } else {
            "a 1-D numeric array"
        };
        return Err(field_error(
            store,
            format!(
                "filter field {} is {} {} of shape {:?}, not {want}",
                f.field, a.name, a.dtype, a.shape
            ),
        ));
    }
    let mut values = Vec::with_capacity(store.count as usize);
    Cursor::new(a, false)
        .rows(0, store.count, |b, _| {
            values.extend(b.chunks_exact(a.elem.size).filter_map(|e| a.elem.value(e)))
        })
        .map_err(|e| chunk_error(store, &a.name, e))?;
    Ok(values)
}

/// Each sample's digest of the de-duplication fields: all rows of its episode of a data
/// array, its row of a per-episode array.
fn sample_digests(store: &Store, fields: &[String]) -> Result<Vec<[u8; 32]>, DatasetError> {
    let mut digests: Vec<SampleDigest> = (0..store.count).map(|_| SampleDigest::new()).collect();
    for field in fields {
        let (a, role) = store.field(field).ok_or_else(|| {
            field_error(
                store,
                format!(
                    "de-duplication field {field} names no array (looked for {})",
                    field.replace('.', "/")
                ),
            )
        })?;
        if let Some(what) = &a.opaque {
            return Err(field_error(
                store,
                format!(
                    "de-duplication field {field} is {}, stored with {what}, which Quarry does not decode: de-duplicate on arrays stored without it (blosc, zstd, gzip, zlib, lz4 or none)",
                    a.name
                ),
            ));
        }
        if !matches!(role, Role::Data | Role::Episode) {
            return Err(field_error(
                store,
                format!(
                    "de-duplication field {field} is {}, which holds no row per sample",
                    a.name
                ),
            ));
        }
        let mut cursor = Cursor::new(a, false);
        for (s, d) in digests.iter_mut().enumerate() {
            let (r0, r1) = match role {
                Role::Data => store.sample_rows(s as u64),
                _ => (s as u64, s as u64 + 1),
            };
            let mut fd = FieldDigest::new();
            cursor
                .rows(r0, r1 - r0, |b, _| fd.update(b))
                .map_err(|e| chunk_error(store, &a.name, e))?;
            d.field(field, fd);
        }
    }
    Ok(digests.into_iter().map(SampleDigest::finish).collect())
}

/// Input `i` against the template: same version, arrays, dtypes, roles and shapes past
/// axis 0.
fn check_match(t: &Store, s: &Store, i: usize) -> Result<(), DatasetError> {
    let mismatch = |what: String| DatasetError::Mismatch { input: i, what };
    if t.version != s.version {
        return Err(mismatch(format!(
            "zarr v{} store, input 0 is zarr v{}",
            s.version, t.version
        )));
    }
    if t.ends.is_some() != s.ends.is_some() {
        return Err(mismatch(
            "one is a replay buffer (meta/episode_ends) and the other is not".into(),
        ));
    }
    let names = |st: &Store| {
        st.arrays
            .iter()
            .map(|(a, _)| a.name.clone())
            .collect::<Vec<_>>()
    };
    if names(t) != names(s) {
        return Err(mismatch(format!(
            "arrays [{}] differ from input 0's [{}]",
            names(s).join(", "),
            names(t).join(", ")
        )));
    }
    for ((ta, tr), (sa, sr)) in t.arrays.iter().zip(&s.arrays) {
        if ta.dtype != sa.dtype {
            return Err(mismatch(format!(
                "{} has dtype {}, input 0's has {}",
                sa.name, sa.dtype, ta.dtype
            )));
        }
        let past0 = |a: &ArrayMeta| a.shape.iter().skip(1).copied().collect::<Vec<_>>();
        if tr != sr
            || (*tr != Role::Const && past0(ta) != past0(sa))
            || ta.shape.len() != sa.shape.len()
        {
            return Err(mismatch(format!(
                "{} has shape {:?} ({:?}), input 0's has {:?} ({:?})",
                sa.name, sa.shape, sr, ta.shape, tr
            )));
        }
    }
    Ok(())
}

/// Contiguous runs of `items` (sorted, distinct) as (start, length).
fn runs(items: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in items {
        match out.last_mut() {
            Some((s, n)) if *s + *n == start => *n += end - start,
            _ => out.push((start, end - start)),
        }
    }
    out
}

/// Merges stores: every array concatenated along axis 0 in input order, episode ends offset,
/// samples filtered, de-duplicated (first occurrence wins) and cut to `options.limit`. The
/// output at `out` (a new directory) has the format version, dtypes, codecs, chunk shapes
/// and attributes of the template: input 0, or the first input holding samples when input 0
/// holds none.
pub fn merge(
    inputs: &[PathBuf],
    counts: &[u64],
    options: &MergeOptions,
    out: &Path,
) -> Result<MergeSummary, DatasetError> {
    let t_idx = counts.iter().position(|&c| c > 0).unwrap_or(0);
    let template = Store::open(&inputs[t_idx])?;
    std::fs::create_dir(out).map_err(DatasetError::io("create", out))?;
    let mut writers: Vec<Option<Writer>> = template
        .arrays
        .iter()
        .map(|(a, role)| (*role != Role::Const).then(|| Writer::new(a, out.join(&a.name))))
        .collect();
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    let mut summary = MergeSummary::default();
    let mut rows_out = 0u64;
    for (i, input) in inputs.iter().enumerate() {
        if summary.samples >= options.limit {
            break;
        }
        let opened;
        let store = if i == t_idx {
            &template
        } else {
            opened = Store::open(input)?;
            &opened
        };
        if store.count != counts[i] {
            return Err(DatasetError::invalid(
                &store.label,
                format!(
                    "holds {} samples, but the round was committed with {}",
                    store.count, counts[i]
                ),
            ));
        }
        if store.count == 0 {
            continue;
        }
        check_match(&template, store, i)?;
        let mut keep: Vec<bool> = vec![true; store.count as usize];
        if let Some(f) = &options.filter {
            for (k, v) in keep.iter_mut().zip(filter_values(store, f)?) {
                if !f.keeps(v) {
                    *k = false;
                    summary.filtered += 1;
                }
            }
        }
        if !options.dedup.is_empty() {
            let digests = sample_digests(store, &options.dedup)?;
            for (k, d) in keep.iter_mut().zip(digests) {
                if *k && !seen.insert(d) {
                    *k = false;
                    summary.duplicates += 1;
                }
            }
        }
        let room = options.limit - summary.samples;
        let kept: Vec<u64> = (0..store.count)
            .filter(|&s| keep[s as usize])
            .take(usize::try_from(room).unwrap_or(usize::MAX))
            .collect();
        let row_runs = runs(kept.iter().map(|&s| store.sample_rows(s)));
        let sample_runs = runs(kept.iter().map(|&s| (s, s + 1)));
        for ((ta, role), w) in template.arrays.iter().zip(writers.iter_mut()) {
            let Some(w) = w else { continue };
            let Some((sa, _)) = store.arrays.iter().find(|(a, _)| a.name == ta.name) else {
                continue;
            };
            match role {
                Role::Ends => {
                    for &s in &kept {
                        let (r0, r1) = store.sample_rows(s);
                        rows_out += r1 - r0;
                        let bytes = ta.elem.encode_int(rows_out as i128).ok_or_else(|| {
                            DatasetError::Unsupported {
                                reason: format!(
                                    "row {rows_out} does not fit {}'s dtype {}",
                                    ta.name, ta.dtype
                                ),
                            }
                        })?;
                        w.push(&bytes)?;
                    }
                }
                Role::Data | Role::Episode => {
                    let list = if *role == Role::Data {
                        &row_runs
                    } else {
                        &sample_runs
                    };
                    let same = sa.encoding == ta.encoding;
                    let c0 = ta.chunks[0];
                    let pieces = align::plan(c0, sa.shape[0], list, w.offset(), same);
                    let mut cursor = Cursor::new(sa, false);
                    for piece in pieces {
                        let (start, n) = match piece {
                            Piece::Copy { row, rows } => {
                                w.copy_chunk_row(sa, row, rows)?;
                                continue;
                            }
                            Piece::Decode { start, n } => (start, n),
                        };
                        if let Some(what) = sa.opaque.as_ref().or(ta.opaque.as_ref()) {
                            return Err(DatasetError::Mismatch {
                                input: i,
                                what: misaligned(&sa.name, what, start, n, c0, same),
                            });
                        }
                        let mut pushed = Ok(());
                        cursor
                            .rows(start, n, |b, _| {
                                if pushed.is_ok() {
                                    pushed = w.push(b);
                                }
                            })
                            .map_err(|e| chunk_error(store, &sa.name, e))?;
                        pushed?;
                        w.push_empty_rows(n);
                    }
                }
                Role::Const => {}
            }
        }
        summary.samples += kept.len() as u64;
    }
    let mut rows_of = std::collections::HashMap::new();
    for w in writers.iter_mut().flatten() {
        w.finish()?;
    }
    for ((a, _), w) in template.arrays.iter().zip(&writers) {
        if let Some(w) = w {
            summary.bytes_written += w.bytes_written;
            rows_of.insert(a.name.clone(), w.rows);
        }
    }
    summary.bytes_written += write_metadata(&template, &rows_of, out)?;
    Ok(summary)
}

/// Why rows of an array Quarry does not decode cannot be merged, with the fix.
fn misaligned(array: &str, what: &str, start: u64, n: u64, c0: u64, same: bool) -> String {
    let why = if same {
        format!(
            "its rows {start}..{} do not fall on whole chunks of {c0} rows at a chunk boundary of the final (a filter or de-duplication dropped rows inside a chunk, or an earlier round ended inside one)",
            start + n
        )
    } else {
        "its chunk shape, dtype, codecs, filters or fill value differ from input 0's".to_string()
    };
    format!(
        "{array} is stored with {what}, which Quarry merges only by copying chunks whole, never decoding them, but {why}: write chunks that line up with episodes or rounds (chunks of one step, (1, ...)) with the same chunk shape and codec in every round, filter and de-duplicate on whole chunks, or use a codec Quarry decodes (blosc, zstd, gzip, zlib, lz4)"
    )
}

fn copy_file(from: &Path, to: &Path) -> Result<u64, DatasetError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(DatasetError::io("create", parent))?;
    }
    std::fs::copy(from, to).map_err(DatasetError::io("copy", from))
}

fn copy_dir(from: &Path, to: &Path) -> Result<u64, DatasetError> {
    std::fs::create_dir_all(to).map_err(DatasetError::io("create", to))?;
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .map_err(DatasetError::io("list", from))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            n += copy_dir(&p, &to.join(e.file_name()))?;
        } else {
            n += copy_file(&p, &to.join(e.file_name()))?;
        }
    }
    Ok(n)
}

fn write_json(path: &Path, doc: &Value) -> Result<u64, DatasetError> {
    let mut text = serde_json::to_vec_pretty(doc).map_err(|e| DatasetError::Unsupported {
        reason: format!("cannot write {}: {e}", path.display()),
    })?;
    text.push(b'\n');
    write_file(path, &text)?;
    Ok(text.len() as u64)
}

/// Writes the groups' and arrays' metadata (arrays with their new lengths), copies constant
/// arrays whole, and updates consolidated metadata if the template has it.
fn write_metadata(
    t: &Store,
    rows_of: &std::collections::HashMap<String, u64>,
    out: &Path,
) -> Result<u64, DatasetError> {
    let mut n = 0;
    let docs: Vec<(String, Option<Value>)> = t
        .arrays
        .iter()
        .map(|(a, role)| {
            let doc = (*role != Role::Const)
                .then(|| a.doc_with_rows(rows_of.get(&a.name).copied().unwrap_or(0)));
            (a.name.clone(), doc)
        })
        .collect();
    for ((a, _), (_, doc)) in t.arrays.iter().zip(&docs) {
        let dir = out.join(&a.name);
        match doc {
            None => n += copy_dir(&a.dir, &dir)?,
            Some(doc) => {
                let file = if t.version == 2 {
                    ".zarray"
                } else {
                    "zarr.json"
                };
                n += write_json(&dir.join(file), doc)?;
                let attrs = a.dir.join(".zattrs");
                if t.version == 2 && attrs.is_file() {
                    n += copy_file(&attrs, &dir.join(".zattrs"))?;
                }
            }
        }
    }
    for g in &t.groups {
        let (src, dst) = (t.root.join(g), out.join(g));
        std::fs::create_dir_all(&dst).map_err(DatasetError::io("create", &dst))?;
        let files: &[&str] = if t.version == 2 {
            &[".zgroup", ".zattrs"]
        } else {
            &["zarr.json"]
        };
        for f in files {
            let from = src.join(f);
            if !from.is_file() {
                continue;
            }
            if g.is_empty() && *f == "zarr.json" {
                // v3 consolidated metadata lives in the root group's document.
                let mut doc: Value = serde_json::from_slice(
                    &std::fs::read(&from).map_err(DatasetError::io("read", &from))?,
                )
                .map_err(|e| {
                    DatasetError::invalid(format!("{}/zarr.json", t.label), e.to_string())
                })?;
                if let Some(Value::Object(m)) = doc
                    .get_mut("consolidated_metadata")
                    .and_then(|c| c.get_mut("metadata"))
                {
                    for (name, d) in &docs {
                        if let (Some(d), Some(entry)) = (d, m.get_mut(name)) {
                            *entry = d.clone();
                        }
                    }
                }
                n += write_json(&dst.join(f), &doc)?;
            } else {
                n += copy_file(&from, &dst.join(f))?;
            }
        }
    }
    // v2 consolidated metadata (`.zmetadata`).
    let zmeta = t.root.join(".zmetadata");
    if t.version == 2 && zmeta.is_file() {
        let mut doc: Value = serde_json::from_slice(
            &std::fs::read(&zmeta).map_err(DatasetError::io("read", &zmeta))?,
        )
        .map_err(|e| DatasetError::invalid(format!("{}/.zmetadata", t.label), e.to_string()))?;
        if let Some(Value::Object(m)) = doc.get_mut("metadata") {
            for (name, d) in &docs {
                if let (Some(d), Some(entry)) = (d, m.get_mut(&format!("{name}/.zarray"))) {
                    *entry = d.clone();
                }
            }
        }
        n += write_json(&out.join(".zmetadata"), &doc)?;
    }
    Ok(n)
}

/// Walks every sample: per-episode arrays as their values, data arrays' elements of the
/// episode (at most [`VALUE_CAP`] per field), named by dotted paths (`meta.success`,
/// `data.action`); chunks that fail are problems at `<store>/<array>/<chunk key>`.
pub fn examine(path: &Path, observer: &mut dyn Observer) -> Result<u64, DatasetError> {
    let store = Store::open(path)?;
    for (a, role) in &store.arrays {
        // Arrays Quarry does not decode give no values, only their chunks' checks.
        if a.opaque.is_some() {
            for idx in grid_positions(a) {
                if let Err(e) = chunks::check_stored(a, &idx) {
                    observer.problem(&format!("{}/{}/{}", store.label, a.name, e.key), &e.reason);
                }
            }
            continue;
        }
        if *role == Role::Const {
            for idx in grid_positions(a) {
                if let Err(e) = read_chunk(a, &idx) {
                    observer.problem(&format!("{}/{}/{}", store.label, a.name, e.key), &e.reason);
                }
            }
        }
    }
    let mut fields: Vec<(&ArrayMeta, Role, String, Cursor)> = store
        .arrays
        .iter()
        .filter(|(a, r)| matches!(r, Role::Data | Role::Episode) && a.opaque.is_none())
        .map(|(a, r)| (a, *r, a.name.replace('/', "."), Cursor::new(a, true)))
        .collect();
    let mut values = Vec::new();
    for s in 0..store.count {
        observer.sample(s);
        for (a, role, field, cursor) in fields.iter_mut() {
            let (r0, r1) = match role {
                Role::Data => store.sample_rows(s),
                _ => (s, s + 1),
            };
            values.clear();
            let mut bad = false;
            // Lenient cursors report failed chunks in `problems` instead of failing.
            let _ = cursor.rows(r0, r1 - r0, |b, failed| {
                bad |= failed;
                if !failed {
                    a.elem.push_values(b, &mut values, VALUE_CAP);
                }
            });
            for e in cursor.problems.drain(..) {
                observer.problem(&format!("{}/{}/{}", store.label, a.name, e.key), &e.reason);
            }
            if !values.is_empty() && !bad {
                observer.values(field, &values);
            }
        }
    }
    Ok(store.count)
}
