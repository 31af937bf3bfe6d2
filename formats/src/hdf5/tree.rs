//! Reading the robomimic layout: the `data` group, its demos (in numeric order), each demo's
//! datasets and attributes, and the `mask` lists.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::ffi::{
    Extent, H5Error, Hdf5, Id, LinkKind, ObjectAddr, ObjectKind, TypeClass, TypeInfo,
};
use crate::DatasetError;

/// Bytes read from a dataset at a time (hashing, examining).
pub const BLOCK_BYTES: usize = 8 << 20;

/// Deepest nesting of groups inside a demo (robomimic's is 1: `obs/<key>`).
pub const MAX_DEPTH: usize = 32;
/// Most links one walk of a demo follows. A group reached by several paths (a legal hard
/// link to a group that is not an ancestor) is walked once per path, so this also bounds a
/// "diamond" of shared groups, whose paths double at every level.
pub const MAX_DEMO_LINKS: usize = 16_384;
/// Most links any one group may hold (`data`, a demo, a group in a demo, `mask`).
pub const MAX_GROUP_LINKS: u64 = 1 << 20;

/// The error for a failed call at `place` inside `file`.
pub fn at(file: &str, place: &str) -> impl FnOnce(H5Error) -> DatasetError {
    let path = if place.is_empty() {
        file.to_string()
    } else {
        format!("{file}:{place}")
    };
    move |e| DatasetError::invalid(path, e.to_string())
}

/// One open robomimic file.
pub struct Source<'h> {
    pub h: &'h Hdf5,
    /// The file's name as given, for messages.
    pub file: String,
    pub data: Id<'h>,
    /// Where the root and `data` live, the first two ancestors of every demo's walk.
    ancestors: Vec<(Option<ObjectAddr>, String)>,
    // Declared last: dropped (closed) after the groups in it.
    pub root: Id<'h>,
}

/// A demo's name and its number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DemoName {
    pub number: u64,
    pub name: String,
}

/// Parses `demo_<number>`.
pub fn demo_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("demo_")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One dataset of a demo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the demo group (`obs/eef_pos`).
    pub path: String,
    /// numpy-like dtype (`<f4`, `|u1`, `|b1`, `|S8`, `str`, ...).
    pub descr: String,
    /// Full shape; empty for a scalar.
    pub dims: Vec<u64>,
    pub info: TypeInfo,
}

impl Entry {
    /// `actions <f4 (*,7)`: the dtype and the shape after the first axis.
    pub fn schema(&self) -> String {
        let shape = match self.dims.split_first() {
            None => "()".to_string(),
            Some((_, rest)) => {
                let mut parts = vec!["*".to_string()];
                parts.extend(rest.iter().map(u64::to_string));
                format!("({})", parts.join(","))
            }
        };
        format!("{} {} {shape}", self.path, self.descr)
    }
}

/// What one sample (demo) looks like: its datasets in path order.
pub fn schema(entries: &[Entry]) -> String {
    let parts: Vec<String> = entries.iter().map(Entry::schema).collect();
    format!("hdf5 robomimic [{}]", parts.join("; "))
}

/// numpy's spelling of a datatype, near enough to tell any two apart.
pub fn descr(info: &TypeInfo) -> String {
    let order = |size: usize| {
        if size == 1 {
            '|'
        } else if info.big_endian {
            '>'
        } else {
            '<'
        }
    };
    let size = info.size;
    match info.class {
        TypeClass::Integer => {
            format!(
                "{}{}{size}",
                order(size),
                if info.signed { 'i' } else { 'u' }
            )
        }
        TypeClass::Float => format!("{}f{size}", order(size)),
        TypeClass::String => format!("|S{size}"),
        TypeClass::VarString => "str".into(),
        TypeClass::Enum if size == 1 && info.members == ["FALSE", "TRUE"] => "|b1".into(),
        TypeClass::Enum => format!(
            "enum{}{}{size}",
            order(size),
            if info.signed { 'i' } else { 'u' }
        ),
        TypeClass::Other(class) => {
            let name = match class {
                2 => "time",
                4 => "bitfield",
                5 => "|V",
                6 => "compound",
                7 => "reference",
                9 => "vlen",
                10 => "array",
                11 => "complex",
                _ => "class",
            };
            format!("{name}{size}")
        }
    }
}

/// Whether elements of this type decode to numbers.
pub fn is_numeric(info: &TypeInfo) -> bool {
    match info.class {
        TypeClass::Integer | TypeClass::Enum => matches!(info.size, 1 | 2 | 4 | 8),
        TypeClass::Float => matches!(info.size, 2 | 4 | 8),
        _ => false,
    }
}

/// Decodes raw elements of a numeric type (see [`is_numeric`]) to `f64`.
pub fn decode(info: &TypeInfo, raw: &[u8], out: &mut Vec<f64>) {
    let size = info.size;
    out.reserve(raw.len() / size.max(1));
    for e in raw.chunks_exact(size.max(1)) {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(e);
        if info.big_endian {
            b[..size].reverse();
        }
        let v = match info.class {
            TypeClass::Float => match size {
                2 => crate::half::to_f64(u16::from_le_bytes([b[0], b[1]])),
                4 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
                _ => f64::from_le_bytes(b),
            },
            _ if info.signed => {
                let shift = 64 - 8 * size as u32;
                ((i64::from_le_bytes(b) << shift) >> shift) as f64
            }
            _ => u64::from_le_bytes(b) as f64,
        };
        out.push(v);
    }
}

impl<'h> Source<'h> {
    /// Opens `path` read-only and its `data` group.
    pub fn open(h: &'h Hdf5, path: &Path) -> Result<Source<'h>, DatasetError> {
        let file = path.display().to_string();
        let root = h.open_file(path).map_err(at(&file, ""))?;
        if !h.exists(&root, "data").map_err(at(&file, "data"))? {
            return Err(DatasetError::invalid(
                format!("{file}:data"),
                "no `data` group: a robomimic file keeps its demos in data/demo_<i>",
            ));
        }
        hard_link(h, &root, "data", &file, "data")?;
        let data = h.open_group(&root, "data").map_err(at(&file, "data"))?;
        let ancestors = vec![
            (h.object_addr(&root).map_err(at(&file, ""))?, "/".into()),
            (
                h.object_addr(&data).map_err(at(&file, "data"))?,
                "data".into(),
            ),
        ];
        Ok(Source {
            h,
            file,
            data,
            ancestors,
            root,
        })
    }

    /// `<file>:<place>` for messages.
    pub fn place(&self, place: &str) -> String {
        format!("{}:{place}", self.file)
    }

    pub fn invalid(&self, place: &str, reason: impl Into<String>) -> DatasetError {
        DatasetError::invalid(self.place(place), reason)
    }

    /// The demos under `data`, in numeric order (demo_2 before demo_10). Anything else there
    /// is an error.
    pub fn demos(&self) -> Result<Vec<DemoName>, DatasetError> {
        let names = self.links_of(&self.data, "data")?;
        let mut demos = Vec::with_capacity(names.len());
        for name in names {
            match demo_number(&name) {
                Some(number) => demos.push(DemoName { number, name }),
                None => {
                    return Err(self.invalid(
                        &format!("data/{name}"),
                        "not a demo: everything in `data` must be a group named demo_<number>",
                    ));
                }
            }
        }
        demos.sort();
        if let Some(w) = demos.windows(2).find(|w| w[0].number == w[1].number) {
            return Err(self.invalid(
                &format!("data/{}", w[1].name),
                format!("demo number {} is used twice ({})", w[1].number, w[0].name),
            ));
        }
        Ok(demos)
    }

    /// Opens demo `name`, which must be a group.
    pub fn demo(&self, name: &str) -> Result<Id<'h>, DatasetError> {
        let place = format!("data/{name}");
        hard_link(self.h, &self.data, name, &self.file, &place)?;
        let (g, kind) = self
            .h
            .open_object(&self.data, name)
            .map_err(at(&self.file, &place))?;
        if kind != ObjectKind::Group {
            return Err(self.invalid(&place, "a demo must be a group"));
        }
        Ok(g)
    }

    /// The names of the links in `group` (at `place`), refusing more than
    /// [`MAX_GROUP_LINKS`].
    pub fn links_of(&self, group: &Id<'h>, place: &str) -> Result<Vec<String>, DatasetError> {
        let n = self.h.link_count(group).map_err(at(&self.file, place))?;
        if n > MAX_GROUP_LINKS {
            return Err(self.invalid(
                place,
                format!("holds {n} links; Quarry reads at most {MAX_GROUP_LINKS} in one group"),
            ));
        }
        self.h.links(group).map_err(at(&self.file, place))
    }

    /// Every dataset under demo `group` (recursively, following hard links only), sorted by
    /// path; `place` is the demo's.
    ///
    /// The walk is bounded: a link back to a group containing it (a cycle, which h5py writes
    /// with `demo["obs"]["loop"] = demo`) is an error naming both places, as are groups
    /// nested deeper than [`MAX_DEPTH`], more than [`MAX_DEMO_LINKS`] links followed, and
    /// soft or external links. A dataset (or group) reached by two hard-link paths that do
    /// not form a cycle is listed under each path, as h5py shows it; the merge copies the demo
    /// whole with `H5Ocopy`, which keeps such an object shared inside the copied demo.
    pub fn layout(&self, group: &Id<'h>, place: &str) -> Result<Vec<Entry>, DatasetError> {
        let mut walk = Walk {
            ancestors: self.ancestors.clone(),
            links: 0,
            out: Vec::new(),
        };
        let addr = self.h.object_addr(group).map_err(at(&self.file, place))?;
        self.enter(&mut walk, addr, place)?;
        self.walk(group, place, "", &mut walk)?;
        let mut out = walk.out;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Pushes the group at `place` on the walk's ancestors, refusing a cycle or too deep a
    /// nesting.
    fn enter(
        &self,
        walk: &mut Walk,
        addr: Option<ObjectAddr>,
        place: &str,
    ) -> Result<(), DatasetError> {
        if let Some(a) = addr
            && let Some((_, up)) = walk.ancestors.iter().find(|(b, _)| *b == Some(a))
        {
            return Err(self.invalid(
                place,
                format!(
                    "link cycle at {place} → {up}: a hard link back to a group that contains \
                     it (the group's tree would never end)"
                ),
            ));
        }
        // The root and `data` are not counted: depth is nesting inside the demo.
        if walk.ancestors.len() > MAX_DEPTH + 2 {
            return Err(self.invalid(
                place,
                format!("groups nested more than {MAX_DEPTH} deep inside one demo"),
            ));
        }
        walk.ancestors.push((addr, place.to_string()));
        Ok(())
    }

    fn walk(
        &self,
        group: &Id<'h>,
        place: &str,
        prefix: &str,
        walk: &mut Walk,
    ) -> Result<(), DatasetError> {
        let h = self.h;
        let names = self.links_of(group, place)?;
        for name in names {
            let path = format!("{prefix}{name}");
            let here = format!("{place}/{name}");
            walk.links += 1;
            if walk.links > MAX_DEMO_LINKS {
                return Err(self.invalid(
                    &here,
                    format!(
                        "more than {MAX_DEMO_LINKS} links in one demo (a group reached by \
                         several paths counts once per path)"
                    ),
                ));
            }
            hard_link(h, group, &name, &self.file, &here)?;
            let (obj, kind) = h.open_object(group, &name).map_err(at(&self.file, &here))?;
            match kind {
                ObjectKind::Group => {
                    let addr = h.object_addr(&obj).map_err(at(&self.file, &here))?;
                    self.enter(walk, addr, &here)?;
                    self.walk(&obj, &here, &format!("{path}/"), walk)?;
                    walk.ancestors.pop();
                }
                ObjectKind::Dataset => {
                    let t = h.dataset_type(&obj).map_err(at(&self.file, &here))?;
                    let info = h.type_info(&t).map_err(at(&self.file, &here))?;
                    let space = h.dataset_space(&obj).map_err(at(&self.file, &here))?;
                    let dims = match h.extent(&space).map_err(at(&self.file, &here))? {
                        Extent::Simple(d) => d,
                        Extent::Scalar => Vec::new(),
                        Extent::Null => {
                            return Err(
                                self.invalid(&here, "a dataset with a null dataspace (no shape)")
                            );
                        }
                    };
                    walk.out.push(Entry {
                        path,
                        descr: descr(&info),
                        dims,
                        info,
                    });
                }
                ObjectKind::NamedType | ObjectKind::Other => {}
            }
        }
        Ok(())
    }

    /// A numeric attribute's values; `None` when it is not numeric.
    pub fn numeric_attr(
        &self,
        obj: &Id<'h>,
        name: &str,
        place: &str,
    ) -> Result<Option<Vec<f64>>, DatasetError> {
        let h = self.h;
        let here = format!("{place}.{name}");
        let attr = h.open_attr(obj, name).map_err(at(&self.file, &here))?;
        let t = h.attr_type(&attr).map_err(at(&self.file, &here))?;
        let info = h.type_info(&t).map_err(at(&self.file, &here))?;
        if !is_numeric(&info) {
            return Ok(None);
        }
        let raw = h.read_attr_raw(&attr, &t).map_err(at(&self.file, &here))?;
        let mut v = Vec::new();
        decode(&info, &raw, &mut v);
        Ok(Some(v))
    }

    /// A demo's `num_samples` attribute: `None` when absent; an error when it is not one
    /// non-negative integer.
    pub fn num_samples(&self, demo: &Id<'h>, place: &str) -> Result<Option<u64>, DatasetError> {
        if !self
            .h
            .attr_exists(demo, "num_samples")
            .map_err(at(&self.file, place))?
        {
            return Ok(None);
        }
        let here = format!("{place}.num_samples");
        match self.numeric_attr(demo, "num_samples", place)?.as_deref() {
            Some(&[v]) if v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(63) => Ok(Some(v as u64)),
            Some(&[v]) => Err(self.invalid(
                &here,
                format!("{v} is not a sample count (a non-negative integer)"),
            )),
            Some(v) => Err(self.invalid(&here, format!("holds {} values, not one", v.len()))),
            None => Err(self.invalid(&here, "is not a number")),
        }
    }

    /// Opens a dataset by its path relative to `group`, if every part of the path exists.
    pub fn find_dataset(&self, group: &Id<'h>, path: &str) -> Result<Option<Id<'h>>, H5Error> {
        let mut parts = path.split('/').peekable();
        let mut current: Option<Id<'h>> = None;
        while let Some(part) = parts.next() {
            let loc = current.as_ref().unwrap_or(group);
            if part.is_empty() || !self.h.exists(loc, part)? {
                return Ok(None);
            }
            let link = self.h.link_kind(loc, part)?;
            if link != LinkKind::Hard {
                return Err(H5Error {
                    call: "H5Lget_info",
                    detail: format!("{part} is a {} link, not a hard link", link_name(link)),
                });
            }
            let (obj, kind) = self.h.open_object(loc, part)?;
            let last = parts.peek().is_none();
            match (kind, last) {
                (ObjectKind::Dataset, true) => {
                    drop(current);
                    return Ok(Some(obj));
                }
                (ObjectKind::Group, false) => current = Some(obj),
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The value of filter field `field` for a demo: its attribute of that name, or else the
    /// one-element dataset at that path (dots standing for `/`).
    pub fn filter_value(
        &self,
        demo: &Id<'h>,
        place: &str,
        field: &str,
    ) -> Result<f64, DatasetError> {
        let h = self.h;
        let filter_err = |reason: String| DatasetError::Filter {
            path: self.place(place),
            reason,
        };
        if h.attr_exists(demo, field).map_err(at(&self.file, place))? {
            return match self.numeric_attr(demo, field, place)?.as_deref() {
                Some(&[v]) => Ok(v),
                Some(v) => Err(filter_err(format!(
                    "attribute {field} holds {} values; a filter needs one",
                    v.len()
                ))),
                None => Err(filter_err(format!("attribute {field} is not a number"))),
            };
        }
        let path = field.replace('.', "/");
        let here = format!("{place}/{path}");
        let Some(ds) = self
            .find_dataset(demo, &path)
            .map_err(at(&self.file, &here))?
        else {
            return Err(filter_err(format!(
                "no attribute {field} and no dataset {path} to filter on"
            )));
        };
        let t = h.dataset_type(&ds).map_err(at(&self.file, &here))?;
        let info = h.type_info(&t).map_err(at(&self.file, &here))?;
        let space = h.dataset_space(&ds).map_err(at(&self.file, &here))?;
        let extent = h.extent(&space).map_err(at(&self.file, &here))?;
        if !is_numeric(&info) || extent.elements() != 1 {
            return Err(filter_err(format!(
                "dataset {path} is not one number (a filter field must be a numeric attribute \
                 or a one-element dataset)"
            )));
        }
        let dims = match extent {
            Extent::Simple(d) => d,
            _ => Vec::new(),
        };
        let raw = h
            .read_rows(
                &ds,
                &t,
                info.size,
                &dims,
                0,
                dims.first().copied().unwrap_or(1),
            )
            .map_err(at(&self.file, &here))?;
        let mut v = Vec::new();
        decode(&info, &raw, &mut v);
        Ok(v[0])
    }

    /// Feeds dataset `entry` of `group` to `f` in blocks of whole rows of at most about
    /// [`BLOCK_BYTES`], in its own type.
    pub fn for_each_block(
        &self,
        group: &Id<'h>,
        entry: &Entry,
        place: &str,
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), DatasetError> {
        let h = self.h;
        let here = format!("{place}/{}", entry.path);
        if entry.info.has_vlen {
            return Err(self.invalid(&here, "variable-length data cannot be read as raw bytes"));
        }
        let ds = h
            .open_dataset(group, &entry.path)
            .map_err(at(&self.file, &here))?;
        let t = h.dataset_type(&ds).map_err(at(&self.file, &here))?;
        let size = entry.info.size;
        let Some((&rows, rest)) = entry.dims.split_first() else {
            let raw = h
                .read_rows(&ds, &t, size, &[], 0, 1)
                .map_err(at(&self.file, &here))?;
            f(&raw);
            return Ok(());
        };
        let row_bytes = rest
            .iter()
            .product::<u64>()
            .saturating_mul(size as u64)
            .max(1);
        let per_block = (BLOCK_BYTES as u64 / row_bytes).max(1);
        let mut start = 0;
        while start < rows {
            let count = per_block.min(rows - start);
            let raw = h
                .read_rows(&ds, &t, size, &entry.dims, start, count)
                .map_err(at(&self.file, &here))?;
            f(&raw);
            start += count;
        }
        Ok(())
    }

    /// The de-duplication key of a demo: SHA-256 over each listed dataset's path, dtype,
    /// shape and raw bytes.
    pub fn dedup_key(
        &self,
        demo: &Id<'h>,
        layout: &[Entry],
        place: &str,
        fields: &[String],
    ) -> Result<[u8; 32], DatasetError> {
        let mut hasher = Sha256::new();
        for field in fields {
            let entry = layout
                .iter()
                .find(|e| e.path == *field)
                .or_else(|| {
                    let slashed = field.replace('.', "/");
                    layout.iter().find(|e| e.path == slashed)
                })
                .ok_or_else(|| DatasetError::Filter {
                    path: self.place(place),
                    reason: format!("no dataset {field} to de-duplicate on"),
                })?;
            if entry.info.has_vlen {
                return Err(DatasetError::Filter {
                    path: self.place(&format!("{place}/{}", entry.path)),
                    reason: "variable-length data cannot be de-duplicated on".into(),
                });
            }
            hasher.update((entry.path.len() as u64).to_le_bytes());
            hasher.update(entry.path.as_bytes());
            hasher.update((entry.descr.len() as u64).to_le_bytes());
            hasher.update(entry.descr.as_bytes());
            hasher.update((entry.dims.len() as u64).to_le_bytes());
            for d in &entry.dims {
                hasher.update(d.to_le_bytes());
            }
            self.for_each_block(demo, entry, place, |raw| hasher.update(raw))?;
        }
        Ok(hasher.finalize().into())
    }

    /// The `mask/<key>` lists: key and demo names, in key order; empty without a `mask`
    /// group.
    pub fn masks(&self) -> Result<Vec<(String, Vec<String>)>, DatasetError> {
        let h = self.h;
        if !h
            .exists(&self.root, "mask")
            .map_err(at(&self.file, "mask"))?
        {
            return Ok(Vec::new());
        }
        let (mask, kind) = h
            .open_object(&self.root, "mask")
            .map_err(at(&self.file, "mask"))?;
        if kind != ObjectKind::Group {
            return Err(self.invalid("mask", "`mask` must be a group of demo name lists"));
        }
        let mut out = Vec::new();
        for key in self.links_of(&mask, "mask")? {
            let here = format!("mask/{key}");
            hard_link(h, &mask, &key, &self.file, &here)?;
            let (ds, kind) = h.open_object(&mask, &key).map_err(at(&self.file, &here))?;
            if kind != ObjectKind::Dataset {
                return Err(self.invalid(&here, "a mask must be a dataset of demo names"));
            }
            let names = h.read_strings(&ds).map_err(|e| {
                self.invalid(
                    &here,
                    format!("a mask must be a list of demo names (byte strings): {e}"),
                )
            })?;
            let names = names
                .into_iter()
                .map(|n| String::from_utf8_lossy(&n).into_owned())
                .collect();
            out.push((key, names));
        }
        Ok(out)
    }

    /// A string attribute of `data` (such as `env_args`), `None` when absent.
    pub fn data_string_attr(&self, name: &str) -> Result<Option<Vec<u8>>, DatasetError> {
        let h = self.h;
        let here = format!("data.{name}");
        if !h
            .attr_exists(&self.data, name)
            .map_err(at(&self.file, "data"))?
        {
            return Ok(None);
        }
        let attr = h
            .open_attr(&self.data, name)
            .map_err(at(&self.file, &here))?;
        let mut v = h.read_strings(&attr).map_err(at(&self.file, &here))?;
        if v.len() != 1 {
            return Err(self.invalid(&here, format!("holds {} strings, not one", v.len())));
        }
        Ok(v.pop())
    }
}

/// The state of one walk of a demo's groups.
struct Walk {
    /// The groups from the root down to the one being walked, with their places.
    ancestors: Vec<(Option<ObjectAddr>, String)>,
    /// Links followed so far.
    links: usize,
    out: Vec<Entry>,
}

fn link_name(kind: LinkKind) -> &'static str {
    match kind {
        LinkKind::Hard => "hard",
        LinkKind::Soft => "soft",
        LinkKind::External => "external",
        LinkKind::Other(_) => "user-defined",
    }
}

/// Refuses `name` in `loc` (at `place` in `file`) unless it is a hard link: a soft link may
/// point anywhere in the file (and elsewhere once the merge renames its demo), an external one
/// into another file on the machine reading it.
fn hard_link(
    h: &Hdf5,
    loc: &Id<'_>,
    name: &str,
    file: &str,
    place: &str,
) -> Result<(), DatasetError> {
    match h.link_kind(loc, name).map_err(at(file, place))? {
        LinkKind::Hard => Ok(()),
        LinkKind::External => Err(DatasetError::invalid(
            format!("{file}:{place}"),
            "an external link (into another file): a robomimic file must hold its own data",
        )),
        other => Err(DatasetError::invalid(
            format!("{file}:{place}"),
            format!(
                "a {} link: Quarry reads hard links only (a soft link's target path would \
                 point elsewhere once the merge renames the demo)",
                link_name(other)
            ),
        )),
    }
}

/// The dataset whose rows every known writer counts into `num_samples` (robomimic,
/// MimicGen's `write_demo_to_hdf5`, IsaacLab's `HDF5DatasetFileHandler.write_episode`).
pub const STEP_DATASET: &str = "actions";

/// Why `entry` cannot be in a demo of `num_samples` steps, if it cannot: only
/// [`STEP_DATASET`] is held to `num_samples` rows. Every other dataset is either time-indexed
/// (first axis `num_samples`: `obs/…`, `states/…`, `datagen_info/…`) or per-episode (any
/// other shape: IsaacLab's `initial_state/…` with first axis 1, MimicGen's `src_demo_inds`
/// with one row per subtask, scalars); the two cannot be told apart in general (a one-step
/// demo's `initial_state` looks time-indexed), and both are copied whole.
pub fn length_problem(entry: &Entry, num_samples: u64) -> Option<String> {
    match entry.dims.first() {
        Some(&rows) if entry.path == STEP_DATASET && rows != num_samples => Some(format!(
            "first axis is {rows} but the demo's num_samples is {num_samples} (num_samples \
             counts the rows of {STEP_DATASET})"
        )),
        _ => None,
    }
}

/// Checks the demo's [`STEP_DATASET`] against its `num_samples` (when it has one); see
/// [`length_problem`].
pub fn check_lengths(
    src: &Source<'_>,
    place: &str,
    layout: &[Entry],
    num_samples: Option<u64>,
) -> Result<(), DatasetError> {
    let Some(n) = num_samples else {
        return Ok(());
    };
    for e in layout {
        if let Some(why) = length_problem(e, n) {
            return Err(src.invalid(&format!("{place}/{}", e.path), why));
        }
    }
    Ok(())
}

/// A demo's length: `num_samples`, or else the first axis of `actions`, or of its first
/// dataset that has one; 0 for a demo without datasets.
pub fn demo_len(num_samples: Option<u64>, layout: &[Entry]) -> u64 {
    num_samples
        .or_else(|| {
            layout
                .iter()
                .find(|e| e.path == "actions")
                .and_then(|e| e.dims.first().copied())
        })
        .or_else(|| layout.iter().find_map(|e| e.dims.first().copied()))
        .unwrap_or(0)
}

/// How two demo layouts differ, for messages; `None` when they are the same.
pub fn layout_difference(want: &[Entry], got: &[Entry]) -> Option<String> {
    let want_s: Vec<String> = want.iter().map(Entry::schema).collect();
    let got_s: Vec<String> = got.iter().map(Entry::schema).collect();
    if want_s == got_s {
        return None;
    }
    if let Some(e) = want.iter().find(|w| !got.iter().any(|g| g.path == w.path)) {
        return Some(format!("has no dataset {}", e.path));
    }
    if let Some(e) = got.iter().find(|g| !want.iter().any(|w| w.path == g.path)) {
        return Some(format!("has an extra dataset {}", e.path));
    }
    let (w, g) = want_s.iter().zip(&got_s).find(|(w, g)| w != g)?;
    Some(format!("has {g} where {w} was expected"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_names_parse() {
        assert_eq!(demo_number("demo_0"), Some(0));
        assert_eq!(demo_number("demo_10"), Some(10));
        assert_eq!(demo_number("demo_"), None);
        assert_eq!(demo_number("demo_1a"), None);
        assert_eq!(demo_number("demo-1"), None);
        let mut v = ["demo_10", "demo_2", "demo_1"]
            .map(|n| DemoName {
                number: demo_number(n).unwrap(),
                name: n.into(),
            })
            .to_vec();
        v.sort();
        let names: Vec<&str> = v.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["demo_1", "demo_2", "demo_10"]);
    }

    #[test]
    fn numbers_decode() {
        let info = |class, size, signed, big_endian| TypeInfo {
            class,
            size,
            big_endian,
            signed,
            has_vlen: false,
            members: vec![],
        };
        let mut out = Vec::new();
        decode(
            &info(TypeClass::Integer, 2, true, false),
            &(-3i16).to_le_bytes(),
            &mut out,
        );
        decode(
            &info(TypeClass::Integer, 4, false, true),
            &7u32.to_be_bytes(),
            &mut out,
        );
        decode(
            &info(TypeClass::Float, 4, false, false),
            &1.5f32.to_le_bytes(),
            &mut out,
        );
        decode(
            &info(TypeClass::Float, 8, false, true),
            &(-2.25f64).to_be_bytes(),
            &mut out,
        );
        decode(
            &info(TypeClass::Float, 2, false, false),
            &0x3c00u16.to_le_bytes(),
            &mut out,
        );
        decode(
            &info(TypeClass::Float, 2, false, false),
            &0xc000u16.to_le_bytes(),
            &mut out,
        );
        decode(&info(TypeClass::Enum, 1, true, false), &[1u8], &mut out);
        assert_eq!(out, [-3.0, 7.0, 1.5, -2.25, 1.0, -2.0, 1.0]);
    }
}
