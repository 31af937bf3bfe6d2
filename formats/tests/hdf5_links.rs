//! Robomimic HDF5 files whose links are legal HDF5 but hostile to a tree walk, written by the
//! real h5py: a hard link back to an ancestor (a cycle), a demo linking to the root, a demo
//! that is `data` itself, groups nested 10,000 deep, a "diamond" of shared groups whose paths
//! double at every level, soft and external links, and a legal shared dataset. `inspect`,
//! `merge` and `examine` must end with an error naming the place (or, for the shared dataset,
//! merge it), never overflow the stack or run without bound.
//!
//! Needs a Python with numpy and h5py; fails (never skips) without one.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quarry_formats::{DatasetError, MergeOptions, hdf5};

mod pyhelp;

/// `links.py OUT VARIANT`: a two-demo robomimic file, then the variant's links.
const LINKS: &str = r#"
import sys, numpy as np, h5py

out, variant = sys.argv[1], sys.argv[2]
with h5py.File(out, 'w') as f:
    data = f.create_group('data')
    for i in range(2):
        g = data.create_group('demo_%d' % i)
        g.attrs['num_samples'] = 4
        g.create_dataset('actions', data=np.arange(28, dtype='<f4').reshape(4, 7) + i)
        g.create_dataset('obs/eef_pos', data=np.zeros((4, 3)))
    data.attrs['total'] = 8
    demo = data['demo_0']
    if variant == 'cycle':
        demo['obs']['loop'] = demo
    elif variant == 'root':
        f['self'] = f
        demo['up'] = f
    elif variant == 'data_as_demo':
        data['demo_2'] = data
    elif variant == 'deep':
        g = demo.create_group('deep')
        for _ in range(10000):
            g = g.create_group('g')
    elif variant == 'diamond':
        g = demo.create_group('d')
        for level in range(24):
            nxt = g.create_group('a')
            g['b'] = nxt
            g = nxt
    elif variant == 'fanout':
        g = demo.create_group('wide')
        for k in range(20000):
            g['x%d' % k] = demo['actions']
    elif variant == 'soft':
        demo['obs']['soft'] = h5py.SoftLink('/data/demo_1/obs/eef_pos')
    elif variant == 'external':
        demo['obs']['ext'] = h5py.ExternalLink('elsewhere.hdf5', '/x')
    elif variant == 'shared':
        for i in range(2):
            g = data['demo_%d' % i]
            g['obs']['alias'] = g['actions']
    else:
        raise SystemExit('unknown variant ' + variant)
"#;

/// `check_shared.py MERGED`: prints whether the merged demos keep their alias shared.
const CHECK_SHARED: &str = r#"
import sys, numpy as np, h5py
with h5py.File(sys.argv[1], 'r') as f:
    for i in range(2):
        g = f['data/demo_%d' % i]
        a, b = g['actions'], g['obs/alias']
        assert np.array_equal(a[()], b[()]), i
        ta = h5py.h5o.get_info(a.id).token if hasattr(h5py.h5o.get_info(a.id), 'token') else h5py.h5o.get_info(a.id).addr
        tb = h5py.h5o.get_info(b.id).token if hasattr(h5py.h5o.get_info(b.id), 'token') else h5py.h5o.get_info(b.id).addr
        print('shared' if ta == tb else 'copied')
"#;

struct Env {
    py: String,
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let py = pyhelp::python(&["numpy", "h5py"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("links.py"), LINKS).unwrap();
        std::fs::write(dir.path().join("check_shared.py"), CHECK_SHARED).unwrap();
        Env { py, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn file(&self, variant: &str) -> PathBuf {
        let p = self.path(&format!("{variant}.hdf5"));
        pyhelp::run(
            &self.py,
            &self.path("links.py"),
            &[p.display().to_string(), variant.to_string()],
        );
        p
    }
}

/// Runs inspect, merge and examine on `file`, each within a time bound; asserts inspect and
/// merge fail with `Invalid` at `place` (inside `file`) and a reason containing `reason`,
/// and examine reports the same problem. Every file holds two demos but `data_as_demo`
/// (three).
fn refused_everywhere(env: &Env, file: &Path, place: &str, reason: &str) {
    let demos = if file.ends_with("data_as_demo.hdf5") {
        3
    } else {
        2
    };
    let want_path = format!("{}:{place}", file.display());
    let check = |what: &str, e: DatasetError| match e {
        DatasetError::Invalid { path, reason: r } => {
            assert_eq!(path, want_path, "{what}: {r}");
            assert!(r.contains(reason), "{what}: {r:?} lacks {reason:?}");
        }
        e => panic!("{what}: {e}"),
    };
    let t = Instant::now();
    check("inspect", hdf5::inspect(file, None).unwrap_err());
    let out = env.path(&format!(
        "{}-merged.hdf5",
        file.file_stem().unwrap().to_str().unwrap()
    ));
    let e = hdf5::merge(
        &[file.to_path_buf()],
        &[demos],
        &MergeOptions {
            limit: 10,
            ..Default::default()
        },
        &out,
    )
    .unwrap_err();
    check("merge", e);
    let mut rec = pyhelp::Recorder::default();
    hdf5::examine(file, &mut rec).unwrap();
    let (_, r) = rec
        .problems
        .iter()
        .find(|(p, _)| *p == want_path)
        .unwrap_or_else(|| panic!("examine reported no problem at {want_path}: {rec:?}"));
    assert!(r.contains(reason), "examine: {r:?} lacks {reason:?}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_link_cycle_is_an_error_naming_both_places() {
    let env = Env::new();
    let f = env.file("cycle");
    refused_everywhere(
        &env,
        &f,
        "data/demo_0/obs/loop",
        "link cycle at data/demo_0/obs/loop → data/demo_0",
    );
}

#[test]
fn links_to_the_root_and_to_data_are_cycles() {
    let env = Env::new();
    let f = env.file("root");
    refused_everywhere(
        &env,
        &f,
        "data/demo_0/up",
        "link cycle at data/demo_0/up → /",
    );
    let f = env.file("data_as_demo");
    refused_everywhere(&env, &f, "data/demo_2", "link cycle at data/demo_2 → data");
}

#[test]
fn deep_nesting_is_refused_at_the_depth_limit() {
    let env = Env::new();
    let f = env.file("deep");
    let mut place = "data/demo_0/deep".to_string();
    // The demo is depth 0, `deep` 1: the group past MAX_DEPTH is named.
    for _ in 0..32 {
        place.push_str("/g");
    }
    refused_everywhere(&env, &f, &place, "nested more than 32 deep");
}

#[test]
fn a_diamond_of_shared_groups_is_bounded() {
    let env = Env::new();
    let f = env.file("diamond");
    let e = hdf5::inspect(&f, None).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("more than 16384 links in one demo"), "{text}");
    assert!(text.contains("data/demo_0/d/"), "{text}");
}

#[test]
fn a_huge_fan_out_is_bounded() {
    let env = Env::new();
    let f = env.file("fanout");
    let e = hdf5::inspect(&f, None).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("more than 16384 links in one demo"), "{text}");
    assert!(text.contains("data/demo_0/wide/"), "{text}");
}

#[test]
fn soft_and_external_links_are_refused() {
    let env = Env::new();
    let f = env.file("soft");
    refused_everywhere(&env, &f, "data/demo_0/obs/soft", "a soft link");
    let f = env.file("external");
    refused_everywhere(&env, &f, "data/demo_0/obs/ext", "an external link");
}

#[test]
fn a_shared_dataset_is_listed_under_each_path_and_stays_shared() {
    let env = Env::new();
    let f = env.file("shared");
    let i = hdf5::inspect(&f, None).unwrap();
    assert_eq!(i.count, 2);
    assert!(i.schema.contains("obs/alias <f4 (*,7)"), "{}", i.schema);
    assert!(i.schema.contains("actions <f4 (*,7)"), "{}", i.schema);
    let out = env.path("shared-merged.hdf5");
    let s = hdf5::merge(
        &[f.clone(), f.clone()],
        &[2, 2],
        &MergeOptions {
            limit: 2,
            ..Default::default()
        },
        &out,
    )
    .unwrap();
    assert_eq!(s.samples, 2);
    let shown = pyhelp::run(
        &env.py,
        &env.path("check_shared.py"),
        &[out.display().to_string()],
    );
    assert_eq!(
        shown.split_whitespace().collect::<Vec<_>>(),
        ["shared", "shared"]
    );
}
