//! Judging samples for a filtered or de-duplicated merge: the filter first, then
//! de-duplication by a digest of the listed fields; for numeric arrays, where those fields sit
//! in a row of a structured dtype.

use std::collections::HashSet;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::npy::fields::{NumType, StructField, as_number, encode, lookup, struct_fields};
use crate::npy::header::{Descr, Header, shape_repr};
use crate::pickle::Value;
use crate::{DatasetError, Filter};

/// Judges samples: the filter first, then de-duplication.
pub(super) struct Judge<'a> {
    filter: Option<&'a Filter>,
    dedup: &'a [String],
    seen: HashSet<[u8; 16]>,
    pub(super) filtered: u64,
    pub(super) duplicates: u64,
    scratch: Vec<u8>,
}

impl<'a> Judge<'a> {
    pub(super) fn new(filter: Option<&'a Filter>, dedup: &'a [String]) -> Self {
        Judge {
            filter,
            dedup,
            seen: HashSet::new(),
            filtered: 0,
            duplicates: 0,
            scratch: Vec::new(),
        }
    }

    /// Records the digest; whether it is new.
    fn first_time(&mut self, h: Sha256) -> bool {
        let d = h.finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&d[..16]);
        self.seen.insert(key)
    }

    /// Whether element `index` of `file` is kept.
    pub(super) fn element(
        &mut self,
        file: &Path,
        index: u64,
        el: &Value,
    ) -> Result<bool, DatasetError> {
        let err = |reason: String| DatasetError::Filter {
            path: format!("{}: element {index}", file.display()),
            reason,
        };
        if let Some(f) = self.filter {
            let v = lookup(el, &f.field).map_err(|r| err(format!("filter `{f}`: {r}")))?;
            let x =
                as_number(&v).map_err(|r| err(format!("filter `{f}`: field {}: {r}", f.field)))?;
            if !f.keeps(x) {
                self.filtered += 1;
                return Ok(false);
            }
        }
        if !self.dedup.is_empty() {
            let mut h = Sha256::new();
            for field in self.dedup {
                let v = lookup(el, field)
                    .map_err(|r| err(format!("de-duplication field {field}: {r}")))?;
                self.scratch.clear();
                encode(&v, &mut self.scratch).map_err(|what| {
                    err(format!(
                        "de-duplication field {field}: it holds {what}, which cannot be compared"
                    ))
                })?;
                h.update((self.scratch.len() as u64).to_le_bytes());
                h.update(&self.scratch);
            }
            if !self.first_time(h) {
                self.duplicates += 1;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether a numeric row is kept, by the fields `rules` located.
    pub(super) fn row(&mut self, rules: &RowRules, row: &[u8]) -> bool {
        if let (Some(f), Some((ty, at))) = (self.filter, rules.filter)
            && !f.keeps(ty.read(&row[at..at + ty.size]))
        {
            self.filtered += 1;
            return false;
        }
        if !rules.dedup.is_empty() {
            let mut h = Sha256::new();
            for &(a, b) in &rules.dedup {
                h.update(&row[a..b]);
            }
            if !self.first_time(h) {
                self.duplicates += 1;
                return false;
            }
        }
        true
    }
}

/// Where a filter's field and the de-duplication fields sit in a numeric row.
#[derive(Debug, Default)]
pub(super) struct RowRules {
    filter: Option<(NumType, usize)>,
    /// Byte ranges of the de-duplication fields.
    dedup: Vec<(usize, usize)>,
}

fn no_fields(file: &Path, descr: &str, what: &str) -> DatasetError {
    DatasetError::Filter {
        path: file.display().to_string(),
        reason: format!(
            "{what}: this is a plain {descr} array, which has no fields; filters and \
             de-duplication on .npy need a structured dtype (`np.zeros(n, dtype=[('E_pen', \
             'f4'), ...])`) or an object array of dicts"
        ),
    }
}

/// Locates the filter and de-duplication fields in a numeric array's rows.
pub(super) fn row_rules(
    file: &Path,
    h: &Header,
    filter: Option<&Filter>,
    dedup: &[String],
) -> Result<RowRules, DatasetError> {
    let mut rules = RowRules::default();
    if filter.is_none() && dedup.is_empty() {
        return Ok(rules);
    }
    let Descr::Numeric { lit, .. } = &h.descr else {
        return Ok(rules);
    };
    let what = |name: &str| match filter {
        Some(f) if f.field == name => format!("filter `{f}`"),
        _ => format!("de-duplication field {name}"),
    };
    let first = filter
        .map(|f| f.field.as_str())
        .or(dedup.first().map(String::as_str))
        .unwrap_or_default();
    let Some(fields) = struct_fields(lit) else {
        return Err(no_fields(file, &h.descr.display(), &what(first)));
    };
    let records: u64 = h.shape.iter().skip(1).product();
    let err = |reason: String| DatasetError::Filter {
        path: file.display().to_string(),
        reason,
    };
    if records != 1 {
        return Err(err(format!(
            "{}: each sample of shape {} holds {records} records, so a field has no single \
             value per sample",
            what(first),
            shape_repr(&h.shape)
        )));
    }
    let find = |name: &str| -> Result<&StructField, DatasetError> {
        fields.iter().find(|f| f.path == name).ok_or_else(|| {
            let names: Vec<&str> = fields.iter().map(|f| f.path.as_str()).collect();
            err(format!(
                "{}: the dtype has no field {name} (fields: {})",
                what(name),
                names.join(", ")
            ))
        })
    };
    if let Some(f) = filter {
        let field = find(&f.field)?;
        match field.num {
            Some(ty) if field.count == 1 => rules.filter = Some((ty, field.offset)),
            _ => {
                return Err(err(format!(
                    "filter `{f}`: field {} is {}{}, not a scalar number (bool, int, uint or \
                     float)",
                    f.field,
                    field.descr,
                    if field.count == 1 {
                        String::new()
                    } else {
                        format!(" with {} elements", field.count)
                    }
                )));
            }
        }
    }
    for name in dedup {
        let field = find(name)?;
        rules.dedup.push((field.offset, field.offset + field.size));
    }
    Ok(rules)
}
