//! `examine` for `.npy`: every sample walked, every numeric field reported to the observer,
//! elements unlike element 0 and non-finite floats reported as problems.

use std::path::Path;
use std::rc::Rc;

use super::walk::walk_elements;
use super::{open_file, read_row, row_bytes};
use crate::npy::FormatError;
use crate::npy::fields::{NumType, leaf_numbers, numeric_leaves, struct_fields};
use crate::npy::header::Descr;
use crate::npy::object::open_input;
use crate::pickle::{KeySet, Value};
use crate::{DatasetError, Observer};

/// [`crate::examine`] for `.npy`: see `examine_dataset`.
pub(in crate::npy) fn examine(
    path: &Path,
    observer: &mut dyn Observer,
) -> Result<u64, DatasetError> {
    let (r, h, len) = open_file(path)?;
    let file = path.display().to_string();
    match &h.descr {
        Descr::Object => {
            if h.shape.len() != 1 {
                return Err(FormatError::Unsupported {
                    reason: format!(
                        "object array of shape {:?} (only 1-D is supported)",
                        h.shape
                    ),
                }
                .into());
            }
            let mut inp = open_input(r, &h)?;
            let mut reference: Option<Option<Rc<KeySet>>> = None;
            walk_elements(&mut inp, h.shape[0], false, &|e| e.into(), |i, el| {
                observer.sample(i);
                let keys = reference.get_or_insert_with(|| el.dict_keys().map(Rc::new));
                let at = format!("{file}: element {i}");
                match (keys.as_deref(), el) {
                    (Some(k), Value::Dict(_)) => {
                        if el.has_keys(k) != Some(true) {
                            let own = el.dict_keys().unwrap_or_default();
                            let missing: Vec<&str> =
                                k.difference(&own).map(String::as_str).collect();
                            let extra: Vec<&str> = own.difference(k).map(String::as_str).collect();
                            observer.problem(
                                &at,
                                &format!(
                                    "keys differ from element 0's (missing [{}], extra [{}])",
                                    missing.join(", "),
                                    extra.join(", ")
                                ),
                            );
                        }
                        numeric_leaves(el, "", &mut |field, vals, float| {
                            observer.values(field, vals);
                            if float {
                                report_non_finite(observer, &at, field, vals);
                            }
                        });
                    }
                    (Some(_), other) => observer.problem(
                        &at,
                        &format!("it is a {}, element 0 is a dict", other.type_name()),
                    ),
                    (None, Value::Dict(_)) => observer.problem(
                        &at,
                        "it is a dict, element 0 is not (fields are only reported when every \
                         element is a dict)",
                    ),
                    (None, other) => {
                        if let Some((vals, float)) = leaf_numbers(other) {
                            observer.values("value", &vals);
                            if float {
                                report_non_finite(observer, &at, "value", &vals);
                            }
                        }
                    }
                }
                Ok(true)
            })?;
            Ok(h.shape[0])
        }
        Descr::Numeric { lit, .. } => {
            crate::npy::numeric::inspect(&h, len)?;
            let mut r = r;
            let row = row_bytes(&h)? as usize;
            let records = h.shape.iter().skip(1).product::<u64>() as usize;
            // (field, type, offset in a record, elements)
            let fields: Vec<(String, NumType, usize, usize)> = match struct_fields(lit) {
                Some(fs) => fs
                    .into_iter()
                    .filter_map(|f| Some((f.path, f.num?, f.offset, f.count)))
                    .collect(),
                None => match lit {
                    crate::npy::header::PyLit::Str(s) => NumType::parse(s, "|")
                        .map(|t| vec![("value".to_string(), t, 0, 1)])
                        .unwrap_or_default(),
                    _ => Vec::new(),
                },
            };
            let record = row.checked_div(records).unwrap_or(0);
            let mut buf = vec![0u8; row];
            let mut vals = Vec::new();
            for i in 0..h.shape[0] {
                read_row(&mut r, &mut buf, path)?;
                observer.sample(i);
                for (name, ty, offset, count) in &fields {
                    vals.clear();
                    for rec in 0..records {
                        for c in 0..*count {
                            let at = rec * record + offset + c * ty.size;
                            vals.push(ty.read(&buf[at..at + ty.size]));
                        }
                    }
                    observer.values(name, &vals);
                    if ty.is_float() {
                        report_non_finite(observer, &format!("{file}: element {i}"), name, &vals);
                    }
                }
            }
            Ok(h.shape[0])
        }
    }
}

fn report_non_finite(observer: &mut dyn Observer, at: &str, field: &str, vals: &[f64]) {
    let nan = vals.iter().filter(|v| v.is_nan()).count();
    let inf = vals.iter().filter(|v| v.is_infinite()).count();
    if nan + inf == 0 {
        return;
    }
    let what = match (nan, inf) {
        (_, 0) => "NaN".to_string(),
        (0, _) => "an infinite value".to_string(),
        _ => "NaN and an infinite value".to_string(),
    };
    let of = if vals.len() > 1 {
        format!(" ({} of {} values)", nan + inf, vals.len())
    } else {
        String::new()
    };
    observer.problem(&format!("{at}: {field}"), &format!("{what}{of}"));
}
