//! The robomimic HDF5 format, as robomimic, MimicGen and IsaacLab (Mimic) write it: a sample
//! is a demo.
//!
//! ```text
//! data                 attrs: total (sum of the demos' num_samples), env_args (JSON string),
//!                             any others (MimicGen: timestamp, readable_timestamp)
//! data/demo_<i>        attrs: num_samples (the rows of actions) and any others (success, seed,
//!                             model_file)
//!     time-indexed, first axis num_samples: actions, rewards, dones, states, obs/<key>,
//!         next_obs/<key>, states/articulation/<name>/joint_position (IsaacLab),
//!         datagen_info/object_poses/<obj> (MimicGen), src_demo_labels (T, 1), ...
//!     per-episode, any other shape: initial_state/... (IsaacLab, first axis 1),
//!         src_demo_inds (MimicGen, one row per subtask), scalars
//!     groups nest to any depth (up to MAX_DEPTH)
//! mask/<filter key>    1-D fixed-length byte strings naming demos (b"demo_3"); optional
//! ```
//!
//! - [`inspect`] opens the file, requires `data`, demo names `demo_<number>`, `actions` (when
//!   the demo has it) with `num_samples` rows (every writer sets `num_samples` from it), the
//!   same datasets (paths, dtypes, shapes after the first axis) in every demo, and masks naming
//!   existing demos. Other datasets may be time-indexed or per-episode: the two cannot be told
//!   apart in general (a one-step demo's `initial_state` looks time-indexed), so both are held
//!   to the same rule, dtype and trailing shape equal in every demo, and copied whole. A
//!   per-episode dataset's first axis may therefore differ between demos (MimicGen's
//!   `src_demo_inds` is as long as the task has subtasks; two tasks would still agree on
//!   everything else). A demo's groups are walked with bounds (`MAX_DEPTH` and its neighbours in
//!   `tree.rs`): a hard link back to a group containing it (a cycle), nesting deeper than 32
//!   groups, more than 16,384 links followed in one demo, more than 2^20 links in one group,
//!   and soft or external links are errors naming the place (`link cycle at
//!   data/demo_0/obs/loop → data/demo_0`). A dataset reached by two hard links inside a demo
//!   is listed under both paths, and the merge's `H5Ocopy` keeps it shared inside the copied
//!   demo. The schema lists one demo's datasets: `hdf5 robomimic [actions <f4 (*,7);
//!   obs/eef_pos <f8 (*,3)]` (`hdf5 robomimic empty` without demos).
//! - [`merge`] takes the inputs in order and each input's demos in numeric order (demo_2 before
//!   demo_10); drops demos failing the filter, then duplicates, then stops at the limit (inputs
//!   after the one that reaches it are not opened, input 0 always is); copies each kept demo
//!   whole (`H5Ocopy`: datasets with their chunking and compression, attributes) to
//!   `data/demo_<k>`, k counting from 0; writes `data.total`; copies the `data` attributes of
//!   the first input holding a demo (input 0 when none does), so attributes that differ from
//!   round to round (MimicGen's `timestamp` and `readable_timestamp`) are the first round's in
//!   merge order, the same whenever the same rounds are merged; requires `env_args` equal in
//!   every input opened that holds a demo (an input without demos is not compared: MimicGen
//!   writes `env_args` "" when a run kept none); rebuilds each
//!   `mask/<key>` (keys of every input opened, in first-seen order) with the kept demos' new
//!   names in merged order.
//! - [`examine`] walks every demo, reporting numeric attributes as `attrs.<name>` and numeric
//!   datasets as their path (those over [`EXAMINE_MAX_ELEMENTS`] elements are checked but not
//!   reported), and problems: `actions` whose first axis is not `num_samples`, NaN or infinite
//!   floats, a missing `num_samples`, a demo laid out unlike the first, a wrong `data.total`.
//!
//! Filter fields are a numeric or boolean demo attribute (`num_samples`, `seed`, `success`:
//! h5py stores a bool as an enum of FALSE = 0 and TRUE = 1) or else a one-element numeric
//! dataset in the demo (`obs.success` for `obs/success`). De-duplication fields are datasets of
//! the demo (`actions`, `obs/eef_pos`): two demos are duplicates when those datasets have the
//! same dtypes, shapes and bytes.
//!
//! The HDF5 library is loaded at run time (see [`ffi`]); without it every operation fails with
//! [`DatasetError::Unsupported`] saying how to install it.

pub mod child;
mod ffi;
mod tree;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::{
    DatasetError, EMPTY_SCHEMA_SUFFIX, Filter, Inspection, MergeOptions, MergeSummary, Observer,
};
use tree::{Entry, Source, at};

pub use ffi::{CANDIDATES, LIB_ENV};

/// Datasets with more elements than this are checked by [`examine`] but their values are not
/// reported.
pub const EXAMINE_MAX_ELEMENTS: u64 = 4 << 20;

fn lock() -> Result<ffi::Hdf5, DatasetError> {
    ffi::lock().map_err(|reason| DatasetError::Unsupported { reason })
}

/// Loads the HDF5 library the way every operation does (`QUARRY_HDF5_LIB`, else
/// [`CANDIDATES`]); the error says how to install it.
pub fn load_library() -> Result<(), DatasetError> {
    lock().map(drop)
}

/// Tries to load the HDF5 library from exactly these names or paths (not cached).
pub fn load_library_from(names: &[String]) -> Result<(), DatasetError> {
    ffi::load_library(names).map_err(|reason| DatasetError::Unsupported { reason })
}

/// [`crate::inspect`] for robomimic HDF5.
pub fn inspect(path: &Path, filter: Option<&Filter>) -> Result<Inspection, DatasetError> {
    let h = lock()?;
    let src = Source::open(&h, path)?;
    let demos = src.demos()?;
    let mut first: Option<(String, Vec<Entry>)> = None;
    let mut kept = 0u64;
    for d in &demos {
        let place = format!("data/{}", d.name);
        let g = src.demo(&d.name)?;
        let layout = src.layout(&g, &place)?;
        let ns = src.num_samples(&g, &place)?;
        tree::check_lengths(&src, &place, &layout, ns)?;
        match &first {
            None => first = Some((d.name.clone(), layout)),
            Some((name0, layout0)) => {
                if let Some(diff) = tree::layout_difference(layout0, &layout) {
                    return Err(src.invalid(
                        &place,
                        format!("{diff}: every demo must hold the datasets {name0} holds"),
                    ));
                }
            }
        }
        match filter {
            Some(f) if !f.keeps(src.filter_value(&g, &place, &f.field)?) => {}
            _ => kept += 1,
        }
    }
    let names: HashSet<&str> = demos.iter().map(|d| d.name.as_str()).collect();
    for (key, list) in src.masks()? {
        if let Some(missing) = list.iter().find(|n| !names.contains(n.as_str())) {
            return Err(src.invalid(
                &format!("mask/{key}"),
                format!("names {missing}, which is not in data"),
            ));
        }
    }
    let schema = match &first {
        Some((_, layout)) => tree::schema(layout),
        None => format!("hdf5 robomimic{EMPTY_SCHEMA_SUFFIX}"),
    };
    Ok(Inspection {
        count: demos.len() as u64,
        kept,
        schema,
    })
}

/// Shortens a long attribute value for a message.
fn excerpt(v: &Option<Vec<u8>>) -> String {
    match v {
        None => "absent".into(),
        Some(b) => {
            let s = String::from_utf8_lossy(b);
            if s.chars().count() > 60 {
                format!("{:?}...", s.chars().take(60).collect::<String>())
            } else {
                format!("{s:?}")
            }
        }
    }
}

/// [`crate::merge`] for robomimic HDF5 (see the module documentation).
pub fn merge(
    inputs: &[PathBuf],
    counts: &[u64],
    options: &MergeOptions,
    out: &Path,
) -> Result<MergeSummary, DatasetError> {
    if inputs.is_empty() {
        return Err(DatasetError::NoInputs);
    }
    if out.exists() {
        return Err(DatasetError::Io {
            op: "create",
            path: out.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        });
    }
    let out_name = out.display().to_string();
    let h = lock()?;
    let dst = h.create_file(out).map_err(at(&out_name, ""))?;
    let dst_data = h
        .create_group(&dst, "data")
        .map_err(at(&out_name, "data"))?;

    let mut summary = MergeSummary::default();
    let mut total = 0u64;
    let mut env_args: Option<Vec<u8>> = None;
    // The input (its file name) whose `data` attributes the final has.
    let mut attrs_from: Option<String> = None;
    let mut layout0: Option<(usize, String, Vec<Entry>)> = None;
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    // Mask keys in first-seen order, with the new names of the kept demos they list.
    let mut masks: Vec<(String, Vec<String>)> = Vec::new();
    let mut any_mask_group = false;

    for (i, input) in inputs.iter().enumerate() {
        if i > 0 && summary.samples >= options.limit {
            break;
        }
        let src = Source::open(&h, input)?;
        let demos = src.demos()?;
        if let Some(&want) = counts.get(i)
            && want != demos.len() as u64
        {
            return Err(src.invalid(
                "data",
                format!("holds {} demos but was committed with {want}", demos.len()),
            ));
        }
        // A round without demos neither sets nor must match the data attributes: MimicGen's
        // merge_all_hdf5 writes env_args "" when a run kept no demo.
        if !demos.is_empty() {
            let args = src.data_string_attr("env_args")?;
            match &attrs_from {
                None => {
                    copy_data_attrs(&h, &src, &dst_data)?;
                    attrs_from = Some(src.file.clone());
                    env_args = args;
                }
                Some(first) if args != env_args => {
                    return Err(DatasetError::Mismatch {
                        input: i,
                        what: format!(
                            "data.env_args differs: {} in {first}, {} in {}",
                            excerpt(&env_args),
                            excerpt(&args),
                            src.file
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        let input_masks = src.masks()?;
        any_mask_group |= h.exists(&src.root, "mask").map_err(at(&src.file, "mask"))?;
        // For each demo of this input: the indices (into `masks`) of the masks listing it.
        let mut listed: HashMap<String, Vec<usize>> = HashMap::new();
        for (key, names) in input_masks {
            let k = match masks.iter().position(|(m, _)| *m == key) {
                Some(k) => k,
                None => {
                    masks.push((key, Vec::new()));
                    masks.len() - 1
                }
            };
            for n in names {
                let ks = listed.entry(n).or_default();
                if !ks.contains(&k) {
                    ks.push(k);
                }
            }
        }

        for d in &demos {
            if summary.samples >= options.limit {
                break;
            }
            let place = format!("data/{}", d.name);
            let g = src.demo(&d.name)?;
            if let Some(f) = &options.filter
                && !f.keeps(src.filter_value(&g, &place, &f.field)?)
            {
                summary.filtered += 1;
                continue;
            }
            let layout = src.layout(&g, &place)?;
            if !options.dedup.is_empty() {
                let key = src.dedup_key(&g, &layout, &place, &options.dedup)?;
                if !seen.insert(key) {
                    summary.duplicates += 1;
                    continue;
                }
            }
            let ns = src.num_samples(&g, &place)?;
            tree::check_lengths(&src, &place, &layout, ns)?;
            match &layout0 {
                None => layout0 = Some((i, src.place(&place), layout.clone())),
                Some((_, where0, want)) => {
                    if let Some(diff) = tree::layout_difference(want, &layout) {
                        return Err(DatasetError::Mismatch {
                            input: i,
                            what: format!("{} {diff} ({where0} does not)", src.place(&place)),
                        });
                    }
                }
            }
            let new_name = format!("demo_{}", summary.samples);
            drop(g);
            h.copy_object(&src.data, &d.name, &dst_data, &new_name)
                .map_err(|e| {
                    DatasetError::invalid(
                        src.place(&place),
                        format!("copying it to {out_name}:data/{new_name}: {e}"),
                    )
                })?;
            for &k in listed.get(&d.name).map(Vec::as_slice).unwrap_or(&[]) {
                masks[k].1.push(new_name.clone());
            }
            total += tree::demo_len(ns, &layout);
            summary.samples += 1;
        }
    }

    if attrs_from.is_none() {
        // No input holds a demo: the final is empty, with input 0's attributes.
        copy_data_attrs(&h, &Source::open(&h, &inputs[0])?, &dst_data)?;
    }
    let total = i64::try_from(total).map_err(|_| DatasetError::Unsupported {
        reason: format!("{total} samples overflow data.total"),
    })?;
    h.write_attr_i64(&dst_data, "total", total)
        .map_err(at(&out_name, "data.total"))?;
    drop(dst_data);
    if any_mask_group {
        let mask = h
            .create_group(&dst, "mask")
            .map_err(at(&out_name, "mask"))?;
        for (key, names) in &masks {
            let values: Vec<Vec<u8>> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
            h.write_fixed_strings(&mask, key, &values)
                .map_err(at(&out_name, &format!("mask/{key}")))?;
        }
    }
    dst.close().map_err(at(&out_name, ""))?;
    drop(h);
    summary.bytes_written = std::fs::metadata(out)
        .map_err(DatasetError::io("stat", out))?
        .len();
    Ok(summary)
}

/// Copies the `data` attributes of `src` but `total` to `dst_data`.
fn copy_data_attrs(
    h: &ffi::Hdf5,
    src: &Source<'_>,
    dst_data: &ffi::Id<'_>,
) -> Result<(), DatasetError> {
    for name in h.attr_names(&src.data).map_err(at(&src.file, "data"))? {
        if name != "total" {
            h.copy_attr(&src.data, &name, dst_data)
                .map_err(at(&src.file, &format!("data.{name}")))?;
        }
    }
    Ok(())
}

/// [`crate::examine`] for robomimic HDF5 (see the module documentation).
pub fn examine(path: &Path, observer: &mut dyn Observer) -> Result<u64, DatasetError> {
    let h = lock()?;
    let src = Source::open(&h, path)?;
    let names = src.links_of(&src.data, "data")?;
    let mut demos: Vec<tree::DemoName> = Vec::new();
    for name in names {
        match tree::demo_number(&name) {
            Some(number) => demos.push(tree::DemoName { number, name }),
            None => observer.problem(
                &src.place(&format!("data/{name}")),
                "not a demo: everything in `data` must be a group named demo_<number>",
            ),
        }
    }
    demos.sort();
    let mut first: Option<(String, Vec<Entry>)> = None;
    let mut total = 0u64;
    for (index, d) in demos.iter().enumerate() {
        observer.sample(index as u64);
        let place = format!("data/{}", d.name);
        match examine_demo(&src, &d.name, &place, &mut first, &mut total, observer) {
            Ok(()) => {}
            // Reported at the place inside the demo the error names.
            Err(DatasetError::Invalid { path, reason }) => observer.problem(&path, &reason),
            Err(e) => observer.problem(&src.place(&place), &e.to_string()),
        }
    }
    match src.numeric_attr_if_present("total") {
        Ok(Some(v)) if v.len() == 1 && v[0] == total as f64 => {}
        Ok(Some(v)) => observer.problem(
            &src.place("data.total"),
            &format!("is {v:?} but the demos' num_samples add up to {total}"),
        ),
        Ok(None) => observer.problem(&src.place("data.total"), "missing"),
        Err(e) => observer.problem(&src.place("data.total"), &e.to_string()),
    }
    match src.masks() {
        Ok(masks) => {
            let names: HashSet<&str> = demos.iter().map(|d| d.name.as_str()).collect();
            for (key, list) in masks {
                for n in list.iter().filter(|n| !names.contains(n.as_str())) {
                    observer.problem(
                        &src.place(&format!("mask/{key}")),
                        &format!("names {n}, which is not in data"),
                    );
                }
            }
        }
        Err(e) => observer.problem(&src.place("mask"), &e.to_string()),
    }
    Ok(demos.len() as u64)
}

fn examine_demo(
    src: &Source<'_>,
    name: &str,
    place: &str,
    first: &mut Option<(String, Vec<Entry>)>,
    total: &mut u64,
    observer: &mut dyn Observer,
) -> Result<(), DatasetError> {
    let h = src.h;
    let g = src.demo(name)?;
    for attr in h.attr_names(&g).map_err(at(&src.file, place))? {
        match src.numeric_attr(&g, &attr, place) {
            Ok(Some(v)) => observer.values(&format!("attrs.{attr}"), &v),
            Ok(None) => {}
            Err(e) => observer.problem(&src.place(&format!("{place}.{attr}")), &e.to_string()),
        }
    }
    let layout = src.layout(&g, place)?;
    let ns = match src.num_samples(&g, place) {
        Ok(Some(n)) => Some(n),
        Ok(None) => {
            observer.problem(&src.place(place), "no num_samples attribute");
            None
        }
        Err(e) => {
            observer.problem(&src.place(&format!("{place}.num_samples")), &e.to_string());
            None
        }
    };
    *total += tree::demo_len(ns, &layout);
    match first {
        None => *first = Some((name.to_string(), layout.clone())),
        Some((name0, layout0)) => {
            if let Some(diff) = tree::layout_difference(layout0, &layout) {
                observer.problem(
                    &src.place(place),
                    &format!("{diff}: every demo must hold the datasets {name0} holds"),
                );
            }
        }
    }
    for e in &layout {
        let here = src.place(&format!("{place}/{}", e.path));
        if let Some(why) = ns.and_then(|n| tree::length_problem(e, n)) {
            observer.problem(&here, &why);
        }
        if !tree::is_numeric(&e.info) {
            continue;
        }
        let elements: u64 = e.dims.iter().product();
        let report = elements <= EXAMINE_MAX_ELEMENTS;
        let is_float = e.info.class == ffi::TypeClass::Float;
        if !report && !is_float {
            continue;
        }
        let mut values = Vec::new();
        let mut scratch = Vec::new();
        let (mut bad, mut first_bad) = (0u64, None);
        let mut seen = 0u64;
        src.for_each_block(&g, e, place, |raw| {
            scratch.clear();
            tree::decode(&e.info, raw, &mut scratch);
            if is_float {
                for (j, v) in scratch.iter().enumerate() {
                    if !v.is_finite() {
                        bad += 1;
                        first_bad.get_or_insert((seen + j as u64, *v));
                    }
                }
            }
            seen += scratch.len() as u64;
            if report {
                values.extend_from_slice(&scratch);
            }
        })
        .or_else(|err| {
            observer.problem(&here, &err.to_string());
            Ok::<(), DatasetError>(())
        })?;
        if let Some((at_index, v)) = first_bad {
            observer.problem(
                &here,
                &format!("{bad} non-finite values (first: {v} at flat index {at_index})"),
            );
        }
        if report && seen == elements {
            observer.values(&e.path, &values);
        }
    }
    Ok(())
}

impl Source<'_> {
    fn numeric_attr_if_present(&self, name: &str) -> Result<Option<Vec<f64>>, DatasetError> {
        if !self
            .h
            .attr_exists(&self.data, name)
            .map_err(at(&self.file, "data"))?
        {
            return Ok(None);
        }
        Ok(Some(
            self.numeric_attr(&self.data, name, "data")?
                .unwrap_or_default(),
        ))
    }
}
