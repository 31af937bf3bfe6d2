//! Directory datasets (zarr stores, episode folders) travel through the object store as one
//! tar archive per round, so a round stays one object with one size and one sha256, committed
//! or deleted whole. The archive is deterministic for the same tree (entries sorted, times,
//! owners and modes normalized), so two uploads of the same output hash the same.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::DatasetError;

/// Writes the tree under `dir` (regular files and directories only) into a new tar file at
/// `out`; returns the number of files archived. A symlink or other special file is refused:
/// what it points at is not part of the round's output.
pub fn pack_dir(dir: &Path, out: &Path) -> Result<u64, DatasetError> {
    let meta = std::fs::symlink_metadata(dir).map_err(DatasetError::io("read", dir))?;
    if !meta.is_dir() {
        return Err(DatasetError::invalid(
            dir.display().to_string(),
            "expected a directory (this format's datasets are directories)",
        ));
    }
    let f = File::create_new(out).map_err(DatasetError::io("create", out))?;
    let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, f));
    builder.mode(tar::HeaderMode::Deterministic);
    let mut files = 0u64;
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let mut entries = std::fs::read_dir(&abs)
            .map_err(DatasetError::io("list", &abs))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(DatasetError::io("list", &abs))?;
        entries.sort();
        // Directories are visited after this one's files; pushed in reverse so the walk stays
        // in name order.
        let mut subdirs = Vec::new();
        for name in entries {
            let rel_child = rel.join(&name);
            let abs_child = dir.join(&rel_child);
            let m = std::fs::symlink_metadata(&abs_child)
                .map_err(DatasetError::io("read", &abs_child))?;
            if m.is_dir() {
                builder
                    .append_dir(&rel_child, &abs_child)
                    .map_err(DatasetError::io("archive", &abs_child))?;
                subdirs.push(rel_child);
            } else if m.is_file() {
                let mut src =
                    File::open(&abs_child).map_err(DatasetError::io("open", &abs_child))?;
                builder
                    .append_file(&rel_child, &mut src)
                    .map_err(DatasetError::io("archive", &abs_child))?;
                files += 1;
            } else {
                return Err(DatasetError::invalid(
                    abs_child.display().to_string(),
                    "not a regular file or directory (symlinks are not archived); write plain files",
                ));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    let mut w = builder
        .into_inner()
        .map_err(DatasetError::io("write", out))?;
    w.flush().map_err(DatasetError::io("write", out))?;
    Ok(files)
}

/// Unpacks an archive written by [`pack_dir`] into `dir` (created; must not exist). Entries
/// that would land outside `dir` and anything but files and directories are refused.
pub fn unpack(archive: &Path, dir: &Path) -> Result<(), DatasetError> {
    let f = File::open(archive).map_err(DatasetError::io("open", archive))?;
    std::fs::create_dir(dir).map_err(DatasetError::io("create", dir))?;
    let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
    ar.set_preserve_permissions(false);
    ar.set_preserve_mtime(false);
    for entry in ar.entries().map_err(DatasetError::io("read", archive))? {
        let mut entry = entry.map_err(DatasetError::io("read", archive))?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            let name = entry
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(DatasetError::invalid(
                format!("{}:{name}", archive.display()),
                "archive entry is neither a file nor a directory",
            ));
        }
        // `unpack_in` refuses paths with `..` or a root and reports false for them.
        let inside = entry
            .unpack_in(dir)
            .map_err(DatasetError::io("unpack", archive))?;
        if !inside {
            return Err(DatasetError::invalid(
                archive.display().to_string(),
                "archive entry would land outside the dataset directory",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("data/action")).expect("mkdir");
        std::fs::create_dir_all(root.join("meta")).expect("mkdir");
        std::fs::write(root.join(".zgroup"), b"{\"zarr_format\": 2}").expect("write");
        std::fs::write(root.join("data/action/0.0"), vec![7u8; 5000]).expect("write");
        std::fs::write(root.join("data/action/.zarray"), b"{}").expect("write");
        std::fs::write(root.join("meta/episode_ends"), b"x").expect("write");
    }

    #[test]
    fn round_trips_and_is_deterministic() {
        let t = tempfile::tempdir().expect("tempdir");
        let a = t.path().join("a.zarr");
        tree(&a);
        assert_eq!(pack_dir(&a, &t.path().join("1.tar")).expect("pack"), 4);
        // The same tree written later, in another order, archives to the same bytes.
        let b = t.path().join("b.zarr");
        std::fs::create_dir_all(b.join("meta")).expect("mkdir");
        std::fs::write(b.join("meta/episode_ends"), b"x").expect("write");
        tree(&b);
        pack_dir(&b, &t.path().join("2.tar")).expect("pack");
        let one = std::fs::read(t.path().join("1.tar")).expect("read");
        assert_eq!(one, std::fs::read(t.path().join("2.tar")).expect("read"));
        let out = t.path().join("out");
        unpack(&t.path().join("1.tar"), &out).expect("unpack");
        assert_eq!(
            std::fs::read(out.join("data/action/0.0")).expect("read"),
            vec![7u8; 5000]
        );
        assert_eq!(
            std::fs::read(out.join("meta/episode_ends")).expect("read"),
            b"x"
        );
    }

    #[test]
    fn symlinks_and_files_are_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let a = t.path().join("a");
        tree(&a);
        std::os::unix::fs::symlink("/etc/passwd", a.join("meta/link")).expect("symlink");
        let e = pack_dir(&a, &t.path().join("x.tar")).expect_err("symlink refused");
        assert!(e.to_string().contains("meta/link"), "{e}");
        let f = t.path().join("file");
        std::fs::write(&f, b"x").expect("write");
        let e = pack_dir(&f, &t.path().join("y.tar")).expect_err("file refused");
        assert!(e.to_string().contains("expected a directory"), "{e}");
    }

    #[test]
    fn escaping_entries_are_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let ar = t.path().join("evil.tar");
        {
            let mut b = tar::Builder::new(File::create(&ar).expect("create"));
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_entry_type(tar::EntryType::Regular);
            // Set the raw name: `set_path` itself refuses `..`.
            let name = b"../escape";
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, &b"x"[..]).expect("append");
            b.finish().expect("finish");
        }
        let out = t.path().join("out");
        assert!(unpack(&ar, &out).is_err());
        assert!(!t.path().join("escape").exists());
    }
}
