//! Removing a round's directory after its outputs were uploaded, with a last check that it is
//! a round's directory: the path comes from the coordinator, and deleting recursively on its
//! word alone could take an experiment's finals, manifest and state with it (an experiment
//! named like another's round directory, a coordinator that is wrong or hostile).

use std::path::Path;

/// Entries whose presence marks a directory as an experiment's, never a round's: the
/// coordinator's state directory and the manifest it writes.
const EXPERIMENT_MARKS: [&str; 2] = [".quarry", "manifest.json"];

/// Why a directory was not removed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Kept {
    /// The directory is the job's root or holds it.
    HoldsRoot,
    /// The directory holds this experiment mark.
    Experiment(&'static str),
}

/// Removes `dir` and everything under it unless it is `root`, holds `root`, or holds an
/// experiment's marks. A directory that is already gone is not an error; a symlink is removed,
/// not followed.
pub(super) fn remove(dir: &Path, root: &Path) -> Result<(), Kept> {
    if root.starts_with(dir) {
        return Err(Kept::HoldsRoot);
    }
    if let Some(mark) = EXPERIMENT_MARKS
        .into_iter()
        .find(|m| dir.join(m).symlink_metadata().is_ok())
    {
        return Err(Kept::Experiment(mark));
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_round_directory_is_removed_whole() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data/experiments/demo__mug__r0_s7");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/out.npy"), b"x").unwrap();
        assert_eq!(remove(&d, t.path()), Ok(()));
        assert!(!d.exists());
        // Gone already: nothing to do.
        assert_eq!(remove(&d, t.path()), Ok(()));
    }

    #[test]
    fn an_experiments_directory_is_kept() {
        let t = tempfile::tempdir().unwrap();
        for mark in EXPERIMENT_MARKS {
            let d = t
                .path()
                .join(format!("data/experiments/other_{}", mark.len()));
            std::fs::create_dir_all(&d).unwrap();
            if mark == ".quarry" {
                std::fs::create_dir(d.join(mark)).unwrap();
            } else {
                std::fs::write(d.join(mark), b"{}").unwrap();
            }
            std::fs::write(d.join("final.npy"), b"x").unwrap();
            assert_eq!(remove(&d, t.path()), Err(Kept::Experiment(mark)));
            assert!(d.join("final.npy").exists());
        }
    }

    #[test]
    fn the_root_and_its_ancestors_are_kept() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("data")).unwrap();
        assert_eq!(remove(&root, &root), Err(Kept::HoldsRoot));
        assert_eq!(remove(t.path(), &root), Err(Kept::HoldsRoot));
        assert!(root.join("data").exists());
    }
}
