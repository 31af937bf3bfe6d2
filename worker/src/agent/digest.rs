//! The content digest of one output for the determinism audit (`generator.audit`): a plain
//! file's sha256, or for a directory dataset (`zarr`, `episodes`, `lerobot`) the sha256 of its
//! whole tree. The tree's digest covers every entry in sorted relative-path order, each as
//! its kind, its relative path and, for a file, its size and the sha256 of its bytes; a
//! mismatch between two trees is told by the first relative path where they differ.
//!
//! Blocking (file reads): call it off the async threads. Nothing is followed or blocked on:
//! every entry is looked at with `symlink_metadata` before it is opened, and opened without
//! following a link and without blocking ([`staged::open_regular`]); a symlink, FIFO, device
//! or socket anywhere in the tree is refused with the reason. The walk is bounded
//! ([`MAX_DEPTH`], [`MAX_ENTRIES`]) so that a hostile tree costs the round, not the agent.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use quarry_common::storage::hash_reader;
use sha2::{Digest as _, Sha256};

use super::staged::{self, OpenError};
use quarry_common::storage::hex;

/// Directories nested deeper than this under an output are refused.
pub(super) const MAX_DEPTH: usize = 64;
/// Entries (files and directories) an output's tree may hold.
pub(super) const MAX_ENTRIES: usize = 1 << 19;

/// What one entry of a tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Kind {
    Dir,
    File { size: u64, sha256: String },
}

/// One entry of a tree, by its path relative to the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub path: PathBuf,
    pub kind: Kind,
}

/// The digest of an output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Digest {
    /// A plain file: the sha256 of its bytes.
    File(String),
    /// A directory: the sha256 of its tree, and its entries in order (for the first
    /// difference).
    Tree { sha256: String, entries: Vec<Entry> },
}

impl Digest {
    pub(super) fn sha256(&self) -> &str {
        match self {
            Digest::File(h) | Digest::Tree { sha256: h, .. } => h,
        }
    }
}

/// Why an output cannot be audited. Paths in messages are relative to the output.
#[derive(Debug, thiserror::Error)]
pub(super) enum DigestError {
    #[error(
        "{path} is {kind}; only plain files and directories of plain files are audited, and nothing is followed (write the data itself, as plain files)"
    )]
    Refused { path: String, kind: &'static str },
    #[error(
        "{path} is nested more than {MAX_DEPTH} directories deep; an audited output's tree is bounded"
    )]
    TooDeep { path: String },
    #[error("the tree holds more than {max} entries; an audited output's tree is bounded")]
    TooMany { max: usize },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// How an entry's path reads in messages: `it` for the output itself.
fn shown(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        "it".into()
    } else {
        format!("{:?}", rel.to_string_lossy())
    }
}

/// The digest of the output at `path`: a plain file's sha256, or a directory's tree digest.
pub(super) fn digest(path: &Path) -> Result<Digest, DigestError> {
    digest_bounded(path, MAX_ENTRIES)
}

/// [`digest`] of a tree of at most `max_entries` entries.
fn digest_bounded(path: &Path, max_entries: usize) -> Result<Digest, DigestError> {
    let io = |rel: &Path| {
        let path = shown(rel);
        move |source| DigestError::Io { path, source }
    };
    let top = Path::new("");
    let m = std::fs::symlink_metadata(path).map_err(io(top))?;
    if m.is_file() {
        return Ok(Digest::File(file_sha256(path, top)?.1));
    }
    if !m.is_dir() {
        return Err(DigestError::Refused {
            path: shown(top),
            kind: staged::kind_of(m.file_type()),
        });
    }
    let entries = walk(path, max_entries)?;
    let mut h = Sha256::new();
    for e in &entries {
        // Kind, NUL, path, NUL (a path holds no NUL), then a file's size and sha256.
        match &e.kind {
            Kind::Dir => h.update(b"d\0"),
            Kind::File { .. } => h.update(b"f\0"),
        }
        h.update(e.path.as_os_str().as_bytes());
        h.update(b"\0");
        if let Kind::File { size, sha256 } = &e.kind {
            h.update(format!("{size}\0{sha256}").as_bytes());
        }
        h.update(b"\n");
    }
    Ok(Digest::Tree {
        sha256: hex(&h.finalize()),
        entries,
    })
}

/// Every entry under `dir`, sorted by relative path (bytewise).
fn walk(dir: &Path, max_entries: usize) -> Result<Vec<Entry>, DigestError> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut stack: Vec<(PathBuf, usize)> = vec![(PathBuf::new(), 0)];
    while let Some((rel, depth)) = stack.pop() {
        let abs = dir.join(&rel);
        let io = |source| DigestError::Io {
            path: shown(&rel),
            source,
        };
        for child in std::fs::read_dir(&abs).map_err(io)? {
            let child = child.map_err(io)?;
            if entries.len() >= max_entries {
                return Err(DigestError::TooMany { max: max_entries });
            }
            let rel_child = rel.join(child.file_name());
            let abs_child = dir.join(&rel_child);
            let m = std::fs::symlink_metadata(&abs_child).map_err(|source| DigestError::Io {
                path: shown(&rel_child),
                source,
            })?;
            let kind = if m.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    return Err(DigestError::TooDeep {
                        path: shown(&rel_child),
                    });
                }
                stack.push((rel_child.clone(), depth + 1));
                Kind::Dir
            } else if m.is_file() {
                let (size, sha256) = file_sha256(&abs_child, &rel_child)?;
                Kind::File { size, sha256 }
            } else {
                return Err(DigestError::Refused {
                    path: shown(&rel_child),
                    kind: staged::kind_of(m.file_type()),
                });
            };
            entries.push(Entry {
                path: rel_child,
                kind,
            });
        }
    }
    entries.sort_by(|a, b| {
        a.path
            .as_os_str()
            .as_bytes()
            .cmp(b.path.as_os_str().as_bytes())
    });
    Ok(entries)
}

/// Size and sha256 of the plain file at `abs` (`rel` in messages), by the store's hashing
/// loop, through a handle that refuses links and special files (one swapped in after the
/// look is refused, not followed or blocked on).
fn file_sha256(abs: &Path, rel: &Path) -> Result<(u64, String), DigestError> {
    let f = staged::open_regular(abs).map_err(|e| match e {
        OpenError::Symlink => DigestError::Refused {
            path: shown(rel),
            kind: "a symbolic link",
        },
        OpenError::NotRegular(kind) => DigestError::Refused {
            path: shown(rel),
            kind,
        },
        OpenError::Io(source) => DigestError::Io {
            path: shown(rel),
            source,
        },
    })?;
    let hashed = hash_reader(f).map_err(|source| DigestError::Io {
        path: shown(rel),
        source,
    })?;
    Ok((hashed.size, hashed.sha256))
}

/// Where two digests of the same output first differ, for the audit's message: `None` when
/// they agree, else the first differing relative path (in tree order) and how it differs.
pub(super) fn first_difference(warm: &Digest, cold: &Digest) -> Option<String> {
    let (warm, cold) = match (warm, cold) {
        (Digest::File(a), Digest::File(b)) => return (a != b).then(|| "its bytes differ".into()),
        (Digest::Tree { entries: a, .. }, Digest::Tree { entries: b, .. }) => (a, b),
        (Digest::File(_), Digest::Tree { .. }) => {
            return Some("a file in the warm run, a directory in the cold one".into());
        }
        (Digest::Tree { .. }, Digest::File(_)) => {
            return Some("a directory in the warm run, a file in the cold one".into());
        }
    };
    let key = |e: &Entry| e.path.as_os_str().as_bytes().to_vec();
    let (mut i, mut j) = (0, 0);
    loop {
        match (warm.get(i), cold.get(j)) {
            (None, None) => return None,
            (Some(w), None) => {
                return Some(format!("{} is only in the warm output", shown(&w.path)));
            }
            (None, Some(c)) => {
                return Some(format!(
                    "{} is only in the cold re-run's output",
                    shown(&c.path)
                ));
            }
            (Some(w), Some(c)) => match key(w).cmp(&key(c)) {
                std::cmp::Ordering::Less => {
                    return Some(format!("{} is only in the warm output", shown(&w.path)));
                }
                std::cmp::Ordering::Greater => {
                    return Some(format!(
                        "{} is only in the cold re-run's output",
                        shown(&c.path)
                    ));
                }
                std::cmp::Ordering::Equal if w.kind == c.kind => {
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let why = match (&w.kind, &c.kind) {
                        (Kind::File { size: a, .. }, Kind::File { size: b, .. }) if a != b => {
                            format!("{a} bytes in the warm output, {b} in the cold one")
                        }
                        (Kind::File { .. }, Kind::File { .. }) => "its bytes differ".into(),
                        (Kind::Dir, _) => {
                            "a directory in the warm output, a file in the cold one".into()
                        }
                        (_, Kind::Dir) => {
                            "a file in the warm output, a directory in the cold one".into()
                        }
                    };
                    return Some(format!("{} ({why})", shown(&w.path)));
                }
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tree(root: &Path, files: &[(&str, &[u8])]) {
        for (p, data) in files {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
    }

    /// Two trees written in a different order (so listed differently by the file system)
    /// digest the same; any change of a byte, a name, an empty directory or a file's place
    /// changes the digest, and the first difference names the path.
    #[test]
    fn equal_trees_digest_equal_and_a_difference_names_the_first_path() {
        let t = tempfile::tempdir().unwrap();
        let files: &[(&str, &[u8])] = &[
            ("meta/info.json", b"{}"),
            ("data/chunk-000/episode_000000.parquet", b"a"),
            ("data/chunk-000/episode_000001.parquet", b"b"),
            ("a.txt", b""),
        ];
        let a = t.path().join("a");
        let b = t.path().join("b");
        tree(&a, files);
        let mut reversed = files.to_vec();
        reversed.reverse();
        tree(&b, &reversed);
        let (da, db) = (digest(&a).unwrap(), digest(&b).unwrap());
        assert_eq!(da, db);
        assert_eq!(first_difference(&da, &db), None);
        let Digest::Tree { entries, .. } = &da else {
            panic!("{da:?}")
        };
        // Sorted by relative path, directories included.
        let paths: Vec<_> = entries.iter().map(|e| e.path.to_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "a.txt",
                "data",
                "data/chunk-000",
                "data/chunk-000/episode_000000.parquet",
                "data/chunk-000/episode_000001.parquet",
                "meta",
                "meta/info.json"
            ]
        );

        std::fs::write(b.join("data/chunk-000/episode_000001.parquet"), b"B").unwrap();
        let db = digest(&b).unwrap();
        assert_ne!(da.sha256(), db.sha256());
        assert_eq!(
            first_difference(&da, &db).unwrap(),
            "\"data/chunk-000/episode_000001.parquet\" (its bytes differ)"
        );
        std::fs::write(b.join("data/chunk-000/episode_000001.parquet"), b"bb").unwrap();
        assert!(
            first_difference(&da, &digest(&b).unwrap())
                .unwrap()
                .contains("1 bytes in the warm output, 2 in the cold one")
        );
        std::fs::write(b.join("data/chunk-000/episode_000001.parquet"), b"b").unwrap();
        assert_eq!(digest(&b).unwrap(), da);

        // An extra empty directory, a renamed file.
        std::fs::create_dir(b.join("data/empty")).unwrap();
        let db = digest(&b).unwrap();
        assert_ne!(da.sha256(), db.sha256());
        assert_eq!(
            first_difference(&da, &db).unwrap(),
            "\"data/empty\" is only in the cold re-run's output"
        );
        std::fs::remove_dir(b.join("data/empty")).unwrap();
        std::fs::rename(b.join("a.txt"), b.join("z.txt")).unwrap();
        assert_eq!(
            first_difference(&da, &digest(&b).unwrap()).unwrap(),
            "\"a.txt\" is only in the warm output"
        );
        std::fs::remove_file(b.join("z.txt")).unwrap();
        std::fs::create_dir(b.join("a.txt")).unwrap();
        assert!(
            first_difference(&da, &digest(&b).unwrap())
                .unwrap()
                .contains("a file in the warm output, a directory in the cold one")
        );

        // A file and a directory.
        let f = t.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let df = digest(&f).unwrap();
        assert_eq!(
            df,
            Digest::File(
                quarry_common::storage::hash_reader(&b"x"[..])
                    .unwrap()
                    .sha256
            )
        );
        assert!(
            first_difference(&df, &da)
                .unwrap()
                .contains("a file in the warm run")
        );
    }

    /// A symlink (to a file or a directory), a FIFO or a socket anywhere in the tree is
    /// refused naming its path and kind, without being followed or blocked on; so is an
    /// output that is itself one.
    #[test]
    fn links_and_special_files_are_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        tree(&d, &[("x/ok.bin", b"1")]);
        std::os::unix::fs::symlink("/dev/zero", d.join("x/zero")).unwrap();
        let e = digest(&d).unwrap_err().to_string();
        assert!(e.contains("\"x/zero\" is a symbolic link"), "{e}");
        std::fs::remove_file(d.join("x/zero")).unwrap();
        std::os::unix::fs::symlink("/", d.join("root")).unwrap();
        let e = digest(&d).unwrap_err().to_string();
        assert!(e.contains("\"root\" is a symbolic link"), "{e}");
        std::fs::remove_file(d.join("root")).unwrap();
        let fifo = d.join("x/fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = digest(&d).unwrap_err().to_string();
        assert!(e.contains("\"x/fifo\" is a FIFO"), "{e}");
        assert!(e.contains("only plain files and directories of plain files are audited"));
        // The output itself.
        let e = digest(&fifo).unwrap_err().to_string();
        assert!(e.starts_with("it is a FIFO"), "{e}");
        std::fs::remove_file(&fifo).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(d.join("sock")).unwrap();
        let e = digest(&d).unwrap_err().to_string();
        assert!(e.contains("\"sock\" is a socket"), "{e}");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(
            digest(&link)
                .unwrap_err()
                .to_string()
                .starts_with("it is a symbolic link")
        );
        assert!(matches!(
            digest(&t.path().join("missing")),
            Err(DigestError::Io { .. })
        ));
    }

    /// A tree nested past [`MAX_DEPTH`] is refused naming where, not walked on.
    #[test]
    fn a_tree_deeper_than_the_bound_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let mut deep = t.path().join("d");
        for _ in 0..=MAX_DEPTH {
            deep.push("n");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let e = digest(&t.path().join("d")).unwrap_err();
        assert!(matches!(e, DigestError::TooDeep { .. }), "{e}");
        assert!(e.to_string().contains("more than 64 directories"), "{e}");
        // At the bound it is fine.
        std::fs::remove_dir(&deep).unwrap();
        assert!(digest(&t.path().join("d")).is_ok());
    }

    /// A tree of more entries than the bound is refused, not listed whole.
    #[test]
    fn a_tree_wider_than_the_bound_is_refused() {
        let t = tempfile::tempdir().unwrap();
        for i in 0..10 {
            std::fs::write(t.path().join(format!("f{i}")), b"").unwrap();
        }
        assert!(digest_bounded(t.path(), 10).is_ok());
        let e = digest_bounded(t.path(), 9).unwrap_err();
        assert!(matches!(e, DigestError::TooMany { max: 9 }), "{e}");
        assert!(e.to_string().contains("more than 9 entries"), "{e}");
    }
}
