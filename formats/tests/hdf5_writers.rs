//! `quarry_formats::hdf5` on rounds laid out as the real demo generators write them:
//! IsaacLab Mimic (`HDF5DatasetFileHandler`: nested `states/articulation/...`, per-episode
//! `initial_state/...` with first axis 1, bool `success`, gzip everywhere), MimicGen
//! (`write_demo_to_hdf5` + `merge_all_hdf5`: `datagen_info/...`, `src_demo_inds` with one row
//! per subtask, round-varying `timestamp`), and robomimic with `split_train_val.py` masks. The
//! rounds come from `deploy/examples/mimic_layouts_gen.py`, whose docstring names the source
//! each layout mirrors. Finals are checked with h5py dataset by dataset against the rounds and
//! read back the way robomimic's `SequenceDataset` and IsaacLab's
//! `HDF5DatasetFileHandler.load_episode` read a file.
//!
//! Needs a Python with numpy and h5py (`QUARRY_TEST_PYTHON`); fails, never skips, without.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::path::{Path, PathBuf};

use quarry_formats::{Filter, MergeOptions, hdf5};

mod pyhelp;

/// `check.py FINAL KEPT_JSON ROUND...`: KEPT_JSON lists, for each demo of the final in order,
/// `[round index, source demo name]`. Compares every dataset (values, dtype, shape, chunks,
/// compression) and attribute with its source, `data.total`, the root attributes (the first
/// round's), the masks, then reads the final as SequenceDataset and load_episode do.
const CHECK: &str = r#"
import sys, json, numpy as np, h5py

final, kept, rounds = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
srcs = [h5py.File(p, "r") for p in rounds]
out = h5py.File(final, "r")

def attrs_equal(where, a, b):
    assert sorted(a.keys()) == sorted(b.keys()), (where, sorted(a.keys()), sorted(b.keys()))
    for k in a.keys():
        x, y = a[k], b[k]
        assert type(x) is type(y), (where, k, type(x), type(y))
        assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, (where, k, x, y)

def same_tree(where, a, b):
    assert sorted(a.keys()) == sorted(b.keys()), (where, sorted(a.keys()), sorted(b.keys()))
    attrs_equal(where, a.attrs, b.attrs)
    for k in a.keys():
        x, y = a[k], b[k]
        assert type(x) is type(y), (where, k)
        if isinstance(x, h5py.Group):
            same_tree(where + "/" + k, x, y)
        else:
            assert (x.dtype, x.shape, x.chunks, x.compression) == (y.dtype, y.shape, y.chunks, y.compression), (where, k)
            assert np.array_equal(x[()], y[()]), (where, k)

data = out["data"]
names = sorted(data.keys(), key=lambda n: int(n[5:]))
assert names == ["demo_%d" % i for i in range(len(kept))], names
total = 0
for i, (r, name) in enumerate(kept):
    src = srcs[r]["data"][name]
    same_tree("demo_%d" % i, data["demo_%d" % i], src)
    total += int(src.attrs["num_samples"])
assert int(data.attrs["total"]) == total, (data.attrs["total"], total)
# Root attributes are the first round's holding a demo (MimicGen's timestamps differ from round
# to round; a MimicGen run that kept no demo writes env_args "").
want = dict(next((s for s in srcs if len(s["data"])), srcs[0])["data"].attrs)
want.pop("total")
got = dict(data.attrs)
got.pop("total")
attrs_equal("data", got, want)
# Masks: each kept demo under its new name, in merged order, in the keys its round listed.
if any("mask" in s for s in srcs):
    masks = {}
    for i, (r, name) in enumerate(kept):
        for k in srcs[r].get("mask", {}):
            if name.encode() in list(srcs[r]["mask"][k][()]):
                masks.setdefault(k, []).append(b"demo_%d" % i)
    for k in out["mask"]:
        assert list(out["mask"][k][()]) == masks.get(k, []), (k, list(out["mask"][k][()]), masks.get(k))

# robomimic SequenceDataset.load_demo_info / load_dataset_in_memory: demos from data (or a
# mask), sorted by number, num_samples from attrs, obs and dataset keys sliced by it.
for mask in [None] + list(out.get("mask", {})):
    demos = list(data.keys()) if mask is None else [e.decode("utf-8") for e in np.array(out["mask/" + mask][:])]
    demos = [demos[i] for i in np.argsort([int(e[5:]) for e in demos])]
    for ep in demos:
        n = out["data/{}".format(ep)].attrs["num_samples"]
        assert out["data/{}/actions".format(ep)][()].astype("float32").shape[0] == n, ep
        for k in out["data/{}/obs".format(ep)]:
            assert out["data/{}/obs/{}".format(ep, k)][()].shape[0] == n, (ep, k)

# IsaacLab HDF5DatasetFileHandler.open / load_episode: every group a dict, every dataset an
# array, seed and success from the attributes, env_name from env_args.
def load(group):
    return {k: load(group[k]) if isinstance(group[k], h5py.Group) else np.array(group[k]) for k in group}
# (get_env_name runs per episode loaded: an empty file's env_args may be "".)
env_name = json.loads(data.attrs["env_args"]).get("env_name") if kept else None
assert len(data) == len(kept)
for i, (r, name) in enumerate(kept):
    ep, src = data["demo_%d" % i], srcs[r]["data"][name]
    a, b = load(ep), load(src)
    def cmp(x, y, where):
        assert sorted(x) == sorted(y), where
        for k in x:
            if isinstance(x[k], dict):
                cmp(x[k], y[k], where + "/" + k)
            else:
                assert x[k].shape == y[k].shape and np.array_equal(x[k], y[k]), where + "/" + k
    cmp(a, b, "demo_%d" % i)
    for k in ("seed", "success"):
        assert (k in ep.attrs) == (k in src.attrs), k
        if k in ep.attrs:
            assert ep.attrs[k] == src.attrs[k], k
    assert env_name == json.loads(srcs[r]["data"].attrs["env_args"]).get("env_name")
print("ok", len(kept))
"#;

struct Rounds {
    py: String,
    dir: tempfile::TempDir,
    paths: Vec<PathBuf>,
}

/// Writes one round per `(seed, batch size)` in `layout`, each in a directory of its own
/// (MimicGen writes `demo_failed.hdf5` and `important_stats.json` beside `demo.hdf5`).
fn rounds(layout: &str, object: &str, specs: &[(i64, u64)]) -> Rounds {
    let py = pyhelp::python(&["numpy", "h5py"]);
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (seed, batch) in specs {
        let out = dir.path().join(format!("r{seed}")).join("demo.hdf5");
        pyhelp::run(
            &py,
            &pyhelp::example("mimic_layouts_gen.py"),
            &[
                "--layout".into(),
                layout.into(),
                "--seed".into(),
                seed.to_string(),
                "--object".into(),
                object.into(),
                "--batch_size".into(),
                batch.to_string(),
                "--out".into(),
                out.display().to_string(),
            ],
        );
        paths.push(out);
    }
    Rounds { py, dir, paths }
}

impl Rounds {
    /// The demo names of round `i`, in number order.
    fn demos(&self, i: usize) -> Vec<String> {
        let code = "import sys, h5py; print('\\n'.join(sorted(h5py.File(sys.argv[1], 'r')['data'], key=lambda n: int(n[5:]))))";
        pyhelp::run_code(&self.py, code, &[self.paths[i].display().to_string()])
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    fn merge(&self, tag: &str, limit: u64, filter: Option<&str>) -> (PathBuf, u64) {
        let counts: Vec<u64> = self
            .paths
            .iter()
            .map(|p| hdf5::inspect(p, None).unwrap().count)
            .collect();
        let out = self.dir.path().join(format!("{tag}.hdf5"));
        let summary = hdf5::merge(
            &self.paths,
            &counts,
            &MergeOptions {
                limit,
                filter: filter.map(|f| Filter::parse(f).unwrap()),
                dedup: vec![],
                video_files_size_in_mb: None,
            },
            &out,
        )
        .unwrap();
        (out, summary.samples)
    }

    /// Runs [`CHECK`] on `final` holding `kept` (round index, source demo name).
    fn check(&self, final_: &Path, kept: &[(usize, String)]) {
        let script = self.dir.path().join("check.py");
        std::fs::write(&script, CHECK).unwrap();
        let mut args = vec![
            final_.display().to_string(),
            serde_json::to_string(kept).unwrap(),
        ];
        args.extend(self.paths.iter().map(|p| p.display().to_string()));
        let said = pyhelp::run(&self.py, &script, &args);
        assert_eq!(said.trim(), format!("ok {}", kept.len()));
    }

    /// The first `limit` demos of the rounds, in round order.
    fn first(&self, limit: usize) -> Vec<(usize, String)> {
        (0..self.paths.len())
            .flat_map(|i| self.demos(i).into_iter().map(move |d| (i, d)))
            .take(limit)
            .collect()
    }
}

#[test]
fn isaaclab_mimic_rounds_inspect_merge_and_read_back() {
    let r = rounds("isaaclab", "cube", &[(1, 5), (2, 7), (3, 4)]);
    for (i, p) in r.paths.iter().enumerate() {
        let info = hdf5::inspect(p, None).unwrap();
        assert_eq!(info.count, [5, 7, 4][i]);
        for part in [
            "actions <f4 (*,7)",
            "initial_state/articulation/robot/joint_position <f4 (*,9)",
            "initial_state/rigid_object/cube_1/root_pose <f4 (*,7)",
            "states/articulation/robot/joint_position <f4 (*,9)",
            "obs/eef_pos <f4 (*,3)",
        ] {
            assert!(info.schema.contains(part), "{part} not in {}", info.schema);
        }
        // examine finds nothing wrong with a per-episode dataset.
        let mut seen = pyhelp::Recorder::default();
        assert_eq!(hdf5::examine(p, &mut seen).unwrap(), info.count);
        assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    }
    // Cut inside the second round.
    let (merged, n) = r.merge("cut", 9, None);
    assert_eq!(n, 9);
    r.check(&merged, &r.first(9));
    // Everything.
    let (merged, n) = r.merge("all", 100, None);
    assert_eq!(n, 16);
    r.check(&merged, &r.first(16));
    assert_eq!(hdf5::inspect(&merged, None).unwrap().count, 16);
}

#[test]
fn isaaclab_seed_and_success_attributes_are_filter_fields() {
    let r = rounds("isaaclab", "cube", &[(1, 3), (2, 4), (3, 2)]);
    // success is an h5py bool (an HDF5 enum): every exported IsaacLab episode succeeded.
    let f = Filter::parse("success == 1").unwrap();
    assert_eq!(hdf5::inspect(&r.paths[0], Some(&f)).unwrap().kept, 3);
    let (merged, n) = r.merge("succ", 100, Some("success == 1"));
    assert_eq!(n, 9);
    r.check(&merged, &r.first(9));
    let (_, n) = r.merge("fail", 100, Some("success == 0"));
    assert_eq!(n, 0);
    // seed (an int attribute): only the second round's demos.
    let (merged, n) = r.merge("seed", 100, Some("seed == 2"));
    assert_eq!(n, 4);
    let kept: Vec<(usize, String)> = r.demos(1).into_iter().map(|d| (1, d)).collect();
    r.check(&merged, &kept);
}

#[test]
fn mimicgen_rounds_keep_per_episode_datasets_and_the_first_timestamp() {
    let r = rounds("mimicgen", "nut", &[(4, 6), (5, 8), (6, 5)]);
    for p in &r.paths {
        let info = hdf5::inspect(p, None).unwrap();
        for part in [
            "src_demo_inds <i8 (*)",
            "src_demo_labels <i8 (*,1)",
            "datagen_info/object_poses/square_nut <f8 (*,4,4)",
            "datagen_info/subtask_term_signals/grasp <i8 (*)",
            "states <f8 (*,45)",
        ] {
            assert!(info.schema.contains(part), "{part} not in {}", info.schema);
        }
        let dir = p.parent().unwrap();
        assert!(dir.join("demo_failed.hdf5").exists());
        assert!(dir.join("important_stats.json").exists());
    }
    let total: usize = (0..3).map(|i| r.demos(i).len()).sum();
    let (merged, n) = r.merge("all", 1000, None);
    assert_eq!(n as usize, total);
    // CHECK compares data's attributes with round 0's: its timestamp, not the others'.
    r.check(&merged, &r.first(total));
    let limit = r.demos(0).len() + 2;
    let (merged, n) = r.merge("cut", limit as u64, None);
    assert_eq!(n as usize, limit);
    r.check(&merged, &r.first(limit));
    // The failed demos are a robomimic file of their own as well.
    let failed = r.paths[1].parent().unwrap().join("demo_failed.hdf5");
    hdf5::inspect(&failed, None).unwrap();
}

#[test]
fn robomimic_rounds_with_split_train_val_masks() {
    let r = rounds("robomimic", "cube", &[(7, 12), (8, 11), (9, 10)]);
    let (merged, n) = r.merge("cut", 27, None);
    assert_eq!(n, 27);
    // CHECK rebuilds mask/train and mask/valid from the rounds' and compares.
    r.check(&merged, &r.first(27));
}

/// What MimicGen's `merge_all_hdf5` writes when a run kept no demo: an empty `data` with
/// `total` 0 and `env_args` "".
const EMPTY_MIMICGEN: &str = r#"
import sys, h5py
with h5py.File(sys.argv[1], "w") as f:
    g = f.create_group("data")
    g.attrs["total"] = 0
    g.attrs["env_args"] = ""
"#;

#[test]
fn a_mimicgen_round_without_demos_merges_with_the_others() {
    let mut r = rounds("mimicgen", "nut", &[(4, 3), (5, 4)]);
    let empty = r.dir.path().join("empty.hdf5");
    pyhelp::run_code(&r.py, EMPTY_MIMICGEN, &[empty.display().to_string()]);
    assert_eq!(hdf5::inspect(&empty, None).unwrap().count, 0);
    let (a, b) = (r.paths[0].clone(), r.paths[1].clone());
    for (tag, order) in [
        ("first", vec![empty.clone(), a.clone(), b.clone()]),
        ("middle", vec![a.clone(), empty.clone(), b.clone()]),
    ] {
        r.paths = order;
        let all = r.first(100);
        let (merged, n) = r.merge(tag, 100, None);
        assert_eq!(n as usize, all.len(), "{tag}");
        // CHECK: the final's data attributes are the first round's that holds a demo.
        r.check(&merged, &all);
    }
    // Alone, it merges to an empty final with its own attributes.
    r.paths = vec![empty];
    let (merged, n) = r.merge("alone", 100, None);
    assert_eq!(n, 0);
    r.check(&merged, &[]);
}
