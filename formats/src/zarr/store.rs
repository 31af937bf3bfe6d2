//! A zarr store on disk: its format version, groups and arrays, and how its arrays make
//! samples (the replay-buffer layout or plain rows).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::array::Cursor;
use super::meta::{ArrayMeta, MetaError};
use crate::DatasetError;

/// The per-episode cumulative end rows of a replay buffer.
pub(crate) const EPISODE_ENDS: &str = "meta/episode_ends";

/// What an array is to the samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Rows are time steps (replay buffer) or samples (plain rows).
    Data,
    /// `meta/episode_ends`.
    Ends,
    /// Under `meta/`, one row per episode.
    Episode,
    /// Under `meta/` with no row per episode: copied from the first input as it is.
    Const,
}

/// An opened store.
#[derive(Debug)]
pub(crate) struct Store {
    pub root: PathBuf,
    /// `root` as error paths show it.
    pub label: String,
    pub version: u8,
    /// Groups with their own metadata, relative paths (`""` is the root).
    pub groups: Vec<String>,
    /// Arrays sorted by name, with their roles.
    pub arrays: Vec<(ArrayMeta, Role)>,
    /// `Some` for a replay buffer: each episode's end row (cumulative).
    pub ends: Option<Vec<u64>>,
    /// Samples: episodes, or rows.
    pub count: u64,
    /// Rows of every data array.
    pub rows: u64,
}

fn read_json(path: &Path, label: &str) -> Result<Value, DatasetError> {
    let text = std::fs::read(path).map_err(DatasetError::io("read", path))?;
    serde_json::from_slice(&text).map_err(|e| DatasetError::invalid(label, format!("not JSON: {e}")))
}

impl Store {
    /// Reads a store's metadata and checks its layout (every data array the same length, the
    /// episode ends rising to it); does not read chunks of data arrays.
    pub fn open(root: &Path) -> Result<Store, DatasetError> {
        let label = root.display().to_string();
        let version = if root.join(".zgroup").is_file() {
            2
        } else if root.join("zarr.json").is_file() {
            let doc = read_json(&root.join("zarr.json"), &format!("{label}/zarr.json"))?;
            match doc.get("node_type").and_then(Value::as_str) {
                Some("group") => 3,
                Some("array") => {
                    return Err(DatasetError::Unsupported {
                        reason: format!(
                            "{label} is a single zarr array; Quarry merges groups (a replay buffer with data/ and meta/)"
                        ),
                    });
                }
                _ => {
                    return Err(DatasetError::invalid(
                        format!("{label}/zarr.json"),
                        "node_type is neither \"group\" nor \"array\"",
                    ));
                }
            }
        } else if root.join(".zarray").is_file() {
            return Err(DatasetError::Unsupported {
                reason: format!(
                    "{label} is a single zarr array; Quarry merges groups (a replay buffer with data/ and meta/)"
                ),
            });
        } else {
            return Err(DatasetError::invalid(
                &label,
                "not a zarr store: no .zgroup (v2) or zarr.json (v3) at its root",
            ));
        };
        let mut store = Store {
            root: root.to_path_buf(),
            label,
            version,
            groups: Vec::new(),
            arrays: Vec::new(),
            ends: None,
            count: 0,
            rows: 0,
        };
        let mut found = Vec::new();
        store.walk(root, "", &mut found)?;
        found.sort_by(|a: &ArrayMeta, b| a.name.cmp(&b.name));
        store.groups.sort();
        store.layout(found)?;
        Ok(store)
    }

    fn walk(&mut self, dir: &Path, rel: &str, found: &mut Vec<ArrayMeta>) -> Result<(), DatasetError> {
        let join = |name: &str| {
            if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            }
        };
        let mut entries: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
            .map_err(DatasetError::io("list", dir))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
            .collect();
        entries.sort();
        let here = if rel.is_empty() {
            self.label.clone()
        } else {
            format!("{}/{rel}", self.label)
        };
        if self.version == 2 {
            if dir.join(".zarray").is_file() {
                let doc = read_json(&dir.join(".zarray"), &format!("{here}/.zarray"))?;
                found.push(self.parse_array(rel, dir, doc, true)?);
                return Ok(());
            }
            if dir.join(".zgroup").is_file() {
                self.groups.push(rel.to_string());
            }
        } else {
            let meta = dir.join("zarr.json");
            if meta.is_file() {
                let doc = read_json(&meta, &format!("{here}/zarr.json"))?;
                match doc.get("node_type").and_then(Value::as_str) {
                    Some("array") => {
                        found.push(self.parse_array(rel, dir, doc, false)?);
                        return Ok(());
                    }
                    Some("group") => self.groups.push(rel.to_string()),
                    _ => {
                        return Err(DatasetError::invalid(
                            format!("{here}/zarr.json"),
                            "node_type is neither \"group\" nor \"array\"",
                        ));
                    }
                }
            }
        }
        for (name, path) in entries {
            self.walk(&path, &join(&name), found)?;
        }
        Ok(())
    }

    fn parse_array(&self, rel: &str, dir: &Path, doc: Value, v2: bool) -> Result<ArrayMeta, DatasetError> {
        let parsed = if v2 {
            ArrayMeta::from_v2(rel.to_string(), dir.to_path_buf(), doc)
        } else {
            ArrayMeta::from_v3(rel.to_string(), dir.to_path_buf(), doc)
        };
        parsed.map_err(|e| match e {
            MetaError::Invalid(reason) => DatasetError::invalid(format!("{}/{rel}", self.label), reason),
            MetaError::Unsupported(what) => DatasetError::Unsupported {
                reason: format!("{what} in zarr array {}/{rel}", self.label),
            },
        })
    }

    fn layout(&mut self, found: Vec<ArrayMeta>) -> Result<(), DatasetError> {
        let replay = found.iter().any(|e| e.name == EPISODE_ENDS);
        let holds_samples = |a: &ArrayMeta| !replay || !a.name.starts_with("meta/");
        if let Some(a) = found.iter().find(|a| a.shape.is_empty() && holds_samples(a)) {
            return Err(DatasetError::invalid(
                format!("{}/{}", self.label, a.name),
                "a 0-d array has no first axis to hold samples (put constants under meta/ of a replay buffer)",
            ));
        }
        let data_rows: Vec<(String, u64)> = found
            .iter()
            .filter(|a| holds_samples(a))
            .map(|a| (a.name.clone(), a.shape[0]))
            .collect();
        if let Some((first, rows)) = data_rows.first()
            && let Some((other, r)) = data_rows.iter().find(|(_, r)| r != rows)
        {
            return Err(DatasetError::invalid(
                format!("{}/{other}", self.label),
                format!("{r} rows along axis 0, but {first} has {rows}: every array holding samples must have the same length"),
            ));
        }
        let mut rows = data_rows.first().map(|d| d.1);
        let ends_meta = found.iter().find(|a| a.name == EPISODE_ENDS);
        if let Some(e) = ends_meta {
            let path = format!("{}/{EPISODE_ENDS}", self.label);
            if e.shape.len() != 1 || !e.elem.is_integer() {
                return Err(DatasetError::invalid(
                    path,
                    format!("episode ends must be a 1-D integer array, not {} of shape {:?}", e.dtype, e.shape),
                ));
            }
            let mut ends = Vec::with_capacity(e.shape[0] as usize);
            let mut cursor = Cursor::new(e, false);
            let mut bad = None;
            cursor
                .rows(0, e.shape[0], |b, _| {
                    for x in b.chunks_exact(e.elem.size) {
                        match e.elem.int_value(x).and_then(|v| u64::try_from(v).ok()) {
                            Some(v) => ends.push(v),
                            None => {
                                bad.get_or_insert(ends.len());
                                ends.push(0);
                            }
                        }
                    }
                })
                .map_err(|c| DatasetError::invalid(format!("{path}/{}", c.key), c.reason))?;
            if let Some(i) = bad {
                return Err(DatasetError::invalid(path, format!("episode {i} ends at a negative row")));
            }
            if let Some(i) = (1..ends.len()).find(|&i| ends[i] < ends[i - 1]) {
                return Err(DatasetError::invalid(
                    path,
                    format!("not increasing: episode {i} ends at row {} before episode {} ends at {}", ends[i], i - 1, ends[i - 1]),
                ));
            }
            let last = ends.last().copied().unwrap_or(0);
            match rows {
                Some(r) if r != last => {
                    return Err(DatasetError::invalid(
                        path,
                        format!("the last episode ends at row {last}, but the data arrays hold {r} rows"),
                    ));
                }
                _ => rows = Some(last),
            }
            self.count = ends.len() as u64;
            self.ends = Some(ends);
        } else {
            self.count = rows.unwrap_or(0);
        }
        self.rows = rows.unwrap_or(0);
        let replay = self.ends.is_some();
        let episodes = self.count;
        self.arrays = found
            .into_iter()
            .map(|a| {
                let role = if !replay {
                    Role::Data
                } else if a.name == EPISODE_ENDS {
                    Role::Ends
                } else if !a.name.starts_with("meta/") {
                    Role::Data
                } else if a.shape.first() == Some(&episodes) {
                    Role::Episode
                } else {
                    Role::Const
                };
                (a, role)
            })
            .collect();
        Ok(())
    }

    /// The array a filter or de-duplication field names: `meta.success` is `meta/success`.
    pub fn field(&self, field: &str) -> Option<&(ArrayMeta, Role)> {
        let slashed = field.replace('.', "/");
        self.arrays
            .iter()
            .find(|(a, _)| a.name == slashed)
            .or_else(|| self.arrays.iter().find(|(a, _)| a.name == field))
    }

    /// `zarr v3 replay [data/action <f4 (*,7); ...]`, ending in ` empty` without samples.
    pub fn schema(&self) -> String {
        let layout = if self.ends.is_some() { "replay" } else { "rows" };
        let parts: Vec<String> = self
            .arrays
            .iter()
            .map(|(a, role)| {
                let dims: Vec<String> = a.shape.iter().map(|d| d.to_string()).collect();
                let shape = match role {
                    Role::Const => format!("({})", dims.join(",")),
                    _ if dims.len() == 1 => "(*,)".to_string(),
                    _ => format!("(*,{})", dims[1..].join(",")),
                };
                let shape = if dims.len() == 1 && *role == Role::Const {
                    format!("({},)", dims[0])
                } else {
                    shape
                };
                format!("{} {} {shape}", a.name, a.dtype)
            })
            .collect();
        let mut s = format!("zarr v{} {layout} [{}]", self.version, parts.join("; "));
        if self.count == 0 {
            s.push_str(crate::EMPTY_SCHEMA_SUFFIX);
        }
        s
    }

    /// Rows of sample `s` in a data array.
    pub fn sample_rows(&self, s: u64) -> (u64, u64) {
        match &self.ends {
            Some(ends) => {
                let start = if s == 0 { 0 } else { ends[s as usize - 1] };
                (start, ends[s as usize])
            }
            None => (s, s + 1),
        }
    }
}
