//! The run's seed-tagged final directory: scale_runner's end-of-run step. In `seed_only` and
//! `both` every object's final is written to `<exp>/final/<object>/` as the object completes;
//! when the run ends, the finals still there are moved (`seed_only`) or copied (`both`) under
//! one `<exp>/final_seed_<min>-<max>/`, whose range covers the seeds of the rounds those
//! finals hold (scale_runner: `final_seed_11-200026/` for three objects of seed base 11).
//!
//! Each object moves as one unit: on a local directory store a rename of its directory, on a
//! remote store a copy of every key under it followed by the deletes. Every step can be redone:
//! a final found at its destination and no longer at its source has moved.

use std::path::Path;

use quarry_common::storage::{Store, StoreError};

use crate::merge::{MergeError, copy_tree, remove_any, sync_path, sync_tree};
use crate::spec::{FinalDirMode, JobSpec};
use crate::state::MergeRecord;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Local(#[from] MergeError),
    /// Neither the source nor the destination holds the final: someone removed it.
    #[error("the final of {object} is neither under {from} nor under {to}")]
    Missing {
        object: String,
        from: String,
        to: String,
    },
}

/// The prefix a final of `object` is written under while the run goes on: `<exp>/final/<object>`.
pub fn plain_prefix(spec: &JobSpec, object: &str) -> String {
    format!("{}/final/{object}", spec.exp_name)
}

/// `<exp>/<dir>/<object>`: where the final of `object` goes in the run's seed-tagged `dir`.
pub fn tagged_prefix(spec: &JobSpec, dir: &str, object: &str) -> String {
    format!("{}/{dir}/{object}", spec.exp_name)
}

/// Whether `record` still waits for the end-of-run step: its final is only under `final/`
/// (or it was already marked for a directory). A record with no final (every round
/// quarantined) has nothing to move.
pub fn awaits_publish(spec: &JobSpec, object: &str, record: &MergeRecord) -> bool {
    if !spec.final_dir_mode.publishes_at_end() {
        return false;
    }
    if record.publish_to.is_some() {
        return true;
    }
    let plain = format!("{}/", plain_prefix(spec, object));
    !record.finals.is_empty() && record.finals.iter().all(|k| k.starts_with(&plain))
}

/// `final_seed_<min>-<max>` over the seeds of the rounds the given finals hold, as scale_runner
/// names it; `None` when no final holds a round.
pub fn run_dir_name<'a>(records: impl IntoIterator<Item = &'a MergeRecord>) -> Option<String> {
    let (min, max) = records
        .into_iter()
        .filter(|r| !r.finals.is_empty() && !r.rounds.is_empty())
        .fold(None, |acc: Option<(i64, i64)>, r| {
            Some(match acc {
                None => (r.seed_min, r.seed_max),
                Some((lo, hi)) => (lo.min(r.seed_min), hi.max(r.seed_max)),
            })
        })?;
    Some(format!("final_seed_{min}-{max}"))
}

/// Whether `dir` is a name [`run_dir_name`] gives (`final_seed_<i64>-<i64>`): a mark read back
/// from the state store is checked before it reaches a key or a path.
pub fn is_run_dir_name(dir: &str) -> bool {
    let Some(range) = dir.strip_prefix("final_seed_") else {
        return false;
    };
    range
        .char_indices()
        .filter(|&(i, c)| c == '-' && i > 0)
        .any(|(i, _)| range[..i].parse::<i64>().is_ok() && range[i + 1..].parse::<i64>().is_ok())
}

/// The final keys of `record` once published into `dir`: the seed-tagged key, and for `both`
/// the plain one too (seed-tagged first, as a merge of `seed_per_object` lists them).
pub fn published_keys(
    spec: &JobSpec,
    object: &str,
    dir: &str,
    record: &MergeRecord,
) -> Vec<String> {
    let plain = plain_prefix(spec, object);
    let tagged = tagged_prefix(spec, dir, object);
    let mut keys: Vec<String> = record
        .finals
        .iter()
        .map(|k| match k.strip_prefix(&plain) {
            Some(rest) => format!("{tagged}{rest}"),
            None => k.clone(),
        })
        .collect();
    if spec.final_dir_mode == FinalDirMode::Both {
        keys.extend(
            record
                .finals
                .iter()
                .filter(|k| k.starts_with(&plain))
                .cloned(),
        );
    }
    keys.dedup();
    keys
}

/// Moves (or for `both` copies) the final of `object` from `final/<object>/` into `dir`.
/// Redone after a crash, it finds the final already there and does nothing more.
pub async fn publish_object(
    store: &Store,
    spec: &JobSpec,
    object: &str,
    dir: &str,
) -> Result<(), LayoutError> {
    let from = plain_prefix(spec, object);
    let to = tagged_prefix(spec, dir, object);
    let copy = spec.final_dir_mode == FinalDirMode::Both;
    match (store.local_path(&from), store.local_path(&to)) {
        (Some(src), Some(dst)) => {
            let object = object.to_string();
            tokio::task::spawn_blocking(move || publish_local(&object, &src, &dst, copy))
                .await
                .map_err(|e| MergeError::Join(e.to_string()))?
        }
        _ => publish_remote(store, object, &from, &to, copy).await,
    }
}

fn publish_local(object: &str, src: &Path, dst: &Path, copy: bool) -> Result<(), LayoutError> {
    let parent = dst.parent().unwrap_or(Path::new("."));
    if !src.exists() {
        return if dst.exists() {
            Ok(())
        } else {
            Err(LayoutError::Missing {
                object: object.into(),
                from: src.display().to_string(),
                to: dst.display().to_string(),
            })
        };
    }
    std::fs::create_dir_all(parent).map_err(|source| MergeError::Io {
        op: "create",
        path: parent.to_path_buf(),
        source,
    })?;
    if copy {
        // Copied aside, made durable, then renamed into place: never a half-copied final.
        let tmp = parent.join(format!(".{object}.quarry-tmp"));
        remove_any(&tmp)?;
        copy_tree(src, &tmp)?;
        sync_tree(&tmp)?;
        remove_any(dst)?;
        rename(&tmp, dst)?;
    } else {
        // A final of an earlier run in the same directory is replaced, as scale_runner does.
        remove_any(dst)?;
        rename(src, dst)?;
        sync_path(src.parent().unwrap_or(Path::new(".")))?;
    }
    sync_path(parent)?;
    Ok(())
}

fn rename(from: &Path, to: &Path) -> Result<(), MergeError> {
    std::fs::rename(from, to).map_err(|source| MergeError::Io {
        op: "rename",
        path: to.to_path_buf(),
        source,
    })
}

async fn publish_remote(
    store: &Store,
    object: &str,
    from: &str,
    to: &str,
    copy: bool,
) -> Result<(), LayoutError> {
    let keys = store.list(from).await?;
    if keys.is_empty() {
        return if store.list(to).await?.is_empty() {
            Err(LayoutError::Missing {
                object: object.into(),
                from: from.into(),
                to: to.into(),
            })
        } else {
            Ok(())
        };
    }
    // Every key copied before the first delete: a crash in between leaves the final whole
    // at its source, and the step is redone.
    for key in &keys {
        let rest = key.strip_prefix(from).unwrap_or(key);
        store.copy(key, &format!("{to}{rest}")).await?;
    }
    if !copy {
        for key in &keys {
            store.delete(key).await?;
        }
    }
    Ok(())
}

/// Removes `<exp>/final/` once the run's finals have moved out of it (a local directory only;
/// a remote store has no directories). Left alone when it still holds anything.
pub fn remove_empty_plain_dir(store: &Store, spec: &JobSpec) {
    if let Some(dir) = store.local_path(&format!("{}/final", spec.exp_name)) {
        let _ = std::fs::remove_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::spec;

    fn record(finals: &[&str], seeds: (i64, i64)) -> MergeRecord {
        MergeRecord {
            finals: finals.iter().map(|s| s.to_string()).collect(),
            count: 10,
            rounds: vec![0, 1],
            seed_min: seeds.0,
            seed_max: seeds.1,
            sha256: String::new(),
            bytes: 1,
            cleaned: true,
            complete: true,
            unix_ms: 0,
            filtered: 0,
            duplicates: 0,
            publish_to: None,
        }
    }

    #[test]
    fn the_directory_covers_every_waiting_final_and_skips_empty_ones() {
        let a = record(&["exp/final/a/a.npy"], (11, 14));
        let b = record(&["exp/final/b/b.npy"], (100_011, 100_019));
        let mut empty = record(&[], (0, 0));
        empty.rounds.clear();
        assert_eq!(
            run_dir_name([&a, &b, &empty]).as_deref(),
            Some("final_seed_11-100019")
        );
        assert_eq!(run_dir_name([&empty]), None);
        for good in [
            "final_seed_11-100019",
            "final_seed_-5-3",
            "final_seed_-9--2",
        ] {
            assert!(is_run_dir_name(good), "{good}");
        }
        for bad in [
            "final",
            "final_seed_1",
            "final_seed_1-",
            "final_seed_../x-1",
            "final_seed_1-2/../..",
            "x/final_seed_1-2",
        ] {
            assert!(!is_run_dir_name(bad), "{bad}");
        }
    }

    #[test]
    fn which_finals_wait_and_where_they_go() {
        let mut s = spec();
        let a = record(&["exp/final/a/a.npy"], (11, 14));
        assert!(awaits_publish(&s, "a", &a));
        // A final elsewhere (published, or written per object) does not move again; a
        // prefix of another object's name is not its directory.
        assert!(!awaits_publish(
            &s,
            "a",
            &record(&["exp/final_seed_1-2/a/a.npy"], (1, 2))
        ));
        assert!(!awaits_publish(
            &s,
            "a",
            &record(&["exp/final/ab/ab.npy"], (1, 2))
        ));
        assert!(!awaits_publish(&s, "a", &record(&[], (0, 0))));
        let mut marked = record(&["exp/final/a/a.npy"], (11, 14));
        marked.publish_to = Some("final_seed_1-9".into());
        assert!(awaits_publish(&s, "a", &marked));
        assert_eq!(
            published_keys(&s, "a", "final_seed_11-99", &a),
            vec!["exp/final_seed_11-99/a/a.npy"]
        );
        s.final_dir_mode = FinalDirMode::Both;
        assert_eq!(
            published_keys(&s, "a", "final_seed_11-99", &a),
            vec!["exp/final_seed_11-99/a/a.npy", "exp/final/a/a.npy"]
        );
        s.final_dir_mode = FinalDirMode::PlainOnly;
        assert!(!awaits_publish(&s, "a", &a));
        s.final_dir_mode = FinalDirMode::SeedPerObject;
        assert!(!awaits_publish(&s, "a", &a));
    }

    fn write(root: &Path, rel: &str, bytes: &[u8]) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }

    #[tokio::test]
    async fn a_local_move_is_one_rename_and_can_be_redone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
        let s = spec();
        write(dir.path(), "exp/final/a/a.npy", b"final a");
        // A final of an earlier run with the same range is replaced, as scale_runner does.
        write(dir.path(), "exp/final_seed_1-9/a/old.npy", b"old");
        publish_object(&store, &s, "a", "final_seed_1-9")
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("exp/final_seed_1-9/a/a.npy")).unwrap(),
            b"final a"
        );
        assert!(!dir.path().join("exp/final_seed_1-9/a/old.npy").exists());
        assert!(!dir.path().join("exp/final/a").exists());
        // Redone (a restart after the move, before the record): nothing to do, no error.
        publish_object(&store, &s, "a", "final_seed_1-9")
            .await
            .unwrap();
        remove_empty_plain_dir(&store, &s);
        assert!(!dir.path().join("exp/final").exists());
        // Gone from both places: an error naming both, not a silent success.
        let e = publish_object(&store, &s, "b", "final_seed_1-9")
            .await
            .unwrap_err();
        assert!(matches!(e, LayoutError::Missing { .. }), "{e}");
        assert!(
            e.to_string().contains("final/b") && e.to_string().contains("final_seed_1-9/b"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_local_copy_keeps_the_plain_final() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
        let mut s = spec();
        s.final_dir_mode = FinalDirMode::Both;
        write(dir.path(), "exp/final/a/a.zarr/.zarray", b"{}");
        write(dir.path(), "exp/final/a/a.zarr/0.0", b"chunk");
        publish_object(&store, &s, "a", "final_seed_1-9")
            .await
            .unwrap();
        for rel in ["exp/final/a/a.zarr/0.0", "exp/final_seed_1-9/a/a.zarr/0.0"] {
            assert_eq!(
                std::fs::read(dir.path().join(rel)).unwrap(),
                b"chunk",
                "{rel}"
            );
        }
        assert!(!dir.path().join("exp/final_seed_1-9/.a.quarry-tmp").exists());
    }

    #[tokio::test]
    async fn a_remote_move_copies_every_key_then_deletes() {
        let store = Store::in_memory();
        let s = spec();
        store
            .put_bytes("exp/final/a/a.zarr/.zarray", "{}")
            .await
            .unwrap();
        store
            .put_bytes("exp/final/a/a.zarr/0.0", "chunk")
            .await
            .unwrap();
        store
            .put_bytes("exp/final/ab/ab.npy", "other")
            .await
            .unwrap();
        publish_object(&store, &s, "a", "final_seed_1-9")
            .await
            .unwrap();
        let mut moved = store.list("exp/final_seed_1-9").await.unwrap();
        moved.sort();
        assert_eq!(
            moved,
            vec![
                "exp/final_seed_1-9/a/a.zarr/.zarray",
                "exp/final_seed_1-9/a/a.zarr/0.0"
            ]
        );
        // Only object a moved; object ab, whose name starts with a, stays.
        assert_eq!(
            store.list("exp/final").await.unwrap(),
            vec!["exp/final/ab/ab.npy"]
        );
        publish_object(&store, &s, "a", "final_seed_1-9")
            .await
            .unwrap();
        assert!(matches!(
            publish_object(&store, &s, "c", "final_seed_1-9").await,
            Err(LayoutError::Missing { .. })
        ));
    }
}
