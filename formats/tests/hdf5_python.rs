//! Cross-checks `quarry_formats::hdf5` against h5py: rounds written by h5py in the robomimic
//! layout, merged here, read back by h5py and compared object by object (every dataset's
//! values, dtype, shape, chunking and compression, every attribute, the masks, `total`) with
//! a merge h5py does itself (`Group.copy` of each kept demo into a new file).
//!
//! Needs a Python with numpy and h5py; fails (never skips) without one. `QUARRY_TEST_PYTHON`
//! names the interpreter (default `python3`).
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::path::{Path, PathBuf};
use std::process::Command;

use quarry_formats::{DatasetError, Filter, MergeOptions, Observer, hdf5};

mod pyhelp;

/// Writes one round: `gen.py OUT SPEC_JSON`.
const GEN: &str = r#"
import sys, json, numpy as np, h5py

out, spec = sys.argv[1], json.loads(sys.argv[2])
env_args = spec.get('env_args', {'env_name': 'Lift', 'type': 1, 'env_kwargs': {'control_freq': 20}})
# Each demo's content comes from its content id, so rounds can share demos (duplicates).
contents = spec['contents']
with h5py.File(out, 'w') as f:
    data = f.create_group('data')
    total = 0
    numbers = spec.get('numbers', list(range(len(contents))))
    # Written in a scrambled order: the merge must sort demos by number, not by creation.
    order = sorted(range(len(contents)), key=lambda i: (i * 7) % max(1, len(contents)))
    for i in order:
        cid, n = contents[i], numbers[i]
        rng = np.random.default_rng(cid)
        L = int(rng.integers(3, 21))
        g = data.create_group('demo_%d' % n)
        g.attrs['num_samples'] = L
        g.attrs['success'] = bool(cid % 3 != 0)
        g.attrs['model_file'] = '<mujoco model="m%d"/>' % cid
        g.attrs['seed'] = np.int32(cid)
        g.create_dataset('actions', data=rng.standard_normal((L, 7)).astype('<f4'))
        g.create_dataset('rewards', data=rng.random(L))
        g.create_dataset('dones', data=(np.arange(L) == L - 1).astype('<i8'))
        g.create_dataset('states', data=rng.standard_normal((L, 10)))
        g.create_dataset('quality', data=float(rng.random()))
        g.create_dataset('obs/eef_pos', data=rng.standard_normal((L, 3)))
        g.create_dataset('obs/gripper', data=rng.random((L, 2)).astype('<f4'))
        g.create_dataset('obs/image', data=rng.integers(0, 255, (L, 8, 8, 3), dtype='u1'),
                         chunks=(1, 8, 8, 3), compression='gzip', compression_opts=4)
        g.create_dataset('next_obs/eef_pos', data=rng.standard_normal((L, 3)))
        if spec.get('bad_axis') == n:
            del g['actions']
            g.create_dataset('actions', data=np.zeros((L + 1, 7), dtype='<f4'))
        if spec.get('nan') == n:
            a = g['actions'][()]
            a[1, 2] = np.nan
            g['actions'][...] = a
        if spec.get('no_num_samples') == n:
            del g.attrs['num_samples']
        total += L
    data.attrs['total'] = total
    if env_args is not None:
        data.attrs['env_args'] = json.dumps(env_args)
    data.attrs['repository_version'] = '0.3.%d' % spec.get('version', 0)
    masks = spec.get('masks', {})
    if masks:
        m = f.create_group('mask')
        for key, idx in masks.items():
            m.create_dataset(key, data=np.array(['demo_%d' % numbers[i] for i in idx], dtype='S'))
    if 'stray' in spec:
        data.create_group(spec['stray'])
"#;

/// Merges like Quarry must, with h5py: `ref.py OUT LIMIT FILTER DEDUP IN...` (FILTER `-` or
/// `field op value`, DEDUP `-` or comma separated); prints the summary as JSON.
const REFERENCE: &str = r#"
import sys, json, operator, numpy as np, h5py

out, limit, filt, dedup, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
ops = {'<': operator.lt, '<=': operator.le, '>': operator.gt, '>=': operator.ge,
       '==': operator.eq, '!=': operator.ne}
if filt != '-':
    field, op, value = filt.split()
    op, value = ops[op], float(value)
dedup = [] if dedup == '-' else [k.replace('.', '/') for k in dedup.split(',')]
kept = filtered = dups = total = 0
seen, keys, masks, any_mask = set(), [], {}, False
with h5py.File(out, 'w') as dst:
    dd = dst.create_group('data')
    for i, path in enumerate(inputs):
        if i > 0 and kept >= limit:
            break
        with h5py.File(path, 'r') as src:
            data = src['data']
            if i == 0:
                for k, v in data.attrs.items():
                    if k != 'total':
                        dd.attrs[k] = v
            listed = {}
            if 'mask' in src:
                any_mask = True
                for k in src['mask']:
                    if k not in masks:
                        keys.append(k)
                        masks[k] = []
                    for name in src['mask'][k][()]:
                        listed.setdefault(name.decode(), []).append(k)
            for d in sorted(data, key=lambda n: int(n[5:])):
                if kept >= limit:
                    break
                g = data[d]
                if filt != '-':
                    v = g.attrs[field] if field in g.attrs else g[field.replace('.', '/')][()]
                    if not op(float(np.asarray(v).item()), value):
                        filtered += 1
                        continue
                if dedup:
                    key = tuple((k, g[k].dtype.str, g[k].shape, g[k][()].tobytes()) for k in dedup)
                    if key in seen:
                        dups += 1
                        continue
                    seen.add(key)
                new = 'demo_%d' % kept
                src.copy(g, dd, name=new)
                for k in listed.get(d, []):
                    masks[k].append(new)
                total += int(g.attrs['num_samples'])
                kept += 1
    dd.attrs['total'] = total
    if any_mask:
        m = dst.create_group('mask')
        for k in keys:
            m.create_dataset(k, data=np.array(masks[k], dtype='S'))
print(json.dumps({'samples': kept, 'filtered': filtered, 'duplicates': dups, 'total': total}))
"#;

/// Compares two files object by object: `compare.py A B`; prints `ok <demos>`.
const COMPARE: &str = r#"
import sys, numpy as np, h5py

def attrs_equal(where, a, b):
    assert sorted(a.keys()) == sorted(b.keys()), (where, sorted(a.keys()), sorted(b.keys()))
    for k in a.keys():
        x, y = a[k], b[k]
        assert type(x) is type(y), (where, k, type(x), type(y))
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), (where, k, x, y)
        else:
            assert x == y, (where, k, x, y)

def walk(f):
    out = {}
    f.visititems(lambda name, obj: out.__setitem__(name, obj))
    return out

a, b = h5py.File(sys.argv[1], 'r'), h5py.File(sys.argv[2], 'r')
oa, ob = walk(a), walk(b)
assert sorted(oa) == sorted(ob), (sorted(set(oa) ^ set(ob)))
attrs_equal('/', a.attrs, b.attrs)
for name in sorted(oa):
    x, y = oa[name], ob[name]
    assert type(x) is type(y), name
    attrs_equal(name, x.attrs, y.attrs)
    if isinstance(x, h5py.Dataset):
        assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
        assert x.shape == y.shape, (name, x.shape, y.shape)
        assert x.chunks == y.chunks, (name, x.chunks, y.chunks)
        assert x.compression == y.compression, (name, x.compression, y.compression)
        assert np.array_equal(x[()], y[()], equal_nan=x.dtype.kind == 'f'), name
# The merged file is a valid robomimic file: total adds up, masks name existing demos.
demos = list(a['data'])
assert a['data'].attrs['total'] == sum(int(a['data'][d].attrs['num_samples']) for d in demos)
assert sorted(demos, key=lambda n: int(n[5:])) == ['demo_%d' % i for i in range(len(demos))]
for k in a.get('mask', {}):
    assert a['mask'][k].dtype.kind == 'S', (k, a['mask'][k].dtype)
    assert all(n.decode() in a['data'] for n in a['mask'][k][()]), k
print('ok', len(demos))
"#;

/// Per-demo facts for the examine check: `facts.py FILE` prints JSON.
const FACTS: &str = r#"
import sys, json, numpy as np, h5py
with h5py.File(sys.argv[1], 'r') as f:
    data = f['data']
    out = []
    for d in sorted(data, key=lambda n: int(n[5:])):
        g = data[d]
        out.append({'num_samples': int(g.attrs['num_samples']),
                    'actions': [float(x) for x in g['actions'][()].ravel()],
                    'image_sum': int(g['obs/image'][()].astype(np.int64).sum()),
                    'quality': float(g['quality'][()]),
                    'success': float(g.attrs['success'])})
    print(json.dumps(out))
"#;

fn python() -> String {
    pyhelp::python(&["numpy", "h5py"])
}

struct Env {
    py: String,
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let py = python();
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("gen.py", GEN),
            ("ref.py", REFERENCE),
            ("compare.py", COMPARE),
            ("facts.py", FACTS),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Env { py, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn py(&self, script: &str, args: &[String]) -> String {
        let out = Command::new(&self.py)
            .arg(self.path(script))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script} {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes round `name` from a JSON spec (see GEN).
    fn round(&self, name: &str, spec: serde_json::Value) -> PathBuf {
        let p = self.path(name);
        self.py("gen.py", &[p.display().to_string(), spec.to_string()]);
        p
    }

    /// Merges with Quarry and with h5py, compares the two files, and returns Quarry's summary.
    fn check_merge(
        &self,
        tag: &str,
        inputs: &[PathBuf],
        limit: u64,
        filter: Option<&str>,
        dedup: &[&str],
    ) -> quarry_formats::MergeSummary {
        let counts: Vec<u64> = inputs
            .iter()
            .map(|p| hdf5::inspect(p, None).unwrap().count)
            .collect();
        let options = MergeOptions {
            limit,
            filter: filter.map(|f| Filter::parse(f).unwrap()),
            dedup: dedup.iter().map(|s| s.to_string()).collect(),
            video_files_size_in_mb: None,
        };
        let ours = self.path(&format!("{tag}-quarry.hdf5"));
        let summary = hdf5::merge(inputs, &counts, &options, &ours).unwrap();
        assert_eq!(
            summary.bytes_written,
            std::fs::metadata(&ours).unwrap().len()
        );
        let theirs = self.path(&format!("{tag}-h5py.hdf5"));
        let mut args = vec![
            theirs.display().to_string(),
            limit.to_string(),
            filter.unwrap_or("-").to_string(),
            if dedup.is_empty() {
                "-".into()
            } else {
                dedup.join(",")
            },
        ];
        args.extend(inputs.iter().map(|p| p.display().to_string()));
        let want: serde_json::Value =
            serde_json::from_str(self.py("ref.py", &args).trim()).unwrap();
        assert_eq!(summary.samples, want["samples"].as_u64().unwrap(), "{tag}");
        assert_eq!(
            summary.filtered,
            want["filtered"].as_u64().unwrap(),
            "{tag}"
        );
        assert_eq!(
            summary.duplicates,
            want["duplicates"].as_u64().unwrap(),
            "{tag}"
        );
        let said = self.py(
            "compare.py",
            &[ours.display().to_string(), theirs.display().to_string()],
        );
        assert_eq!(said.trim(), format!("ok {}", summary.samples), "{tag}");
        // Quarry reads its own output back.
        let info = hdf5::inspect(&ours, None).unwrap();
        assert_eq!(info.count, summary.samples);
        summary
    }
}

fn json(v: &str) -> serde_json::Value {
    serde_json::from_str(v).unwrap()
}

const SCHEMA: &str = "hdf5 robomimic [actions <f4 (*,7); dones <i8 (*); next_obs/eef_pos <f8 (*,3); obs/eef_pos <f8 (*,3); obs/gripper <f4 (*,2); obs/image |u1 (*,8,8,3); quality <f8 (); rewards <f8 (*); states <f8 (*,10)]";

/// Rounds of 3, 0, 12 and 5 demos, with masks (one round adds a key), and a round whose
/// demo numbers are sparse.
fn standard_rounds(env: &Env) -> Vec<PathBuf> {
    vec![
        env.round(
            "r0.hdf5",
            json(r#"{"contents": [1, 2, 3], "masks": {"train": [0, 1], "valid": [2]}}"#),
        ),
        env.round(
            "r1.hdf5",
            json(r#"{"contents": [], "masks": {"train": [], "valid": []}}"#),
        ),
        env.round(
            "r2.hdf5",
            json(
                r#"{"contents": [10,11,12,13,14,15,16,17,18,19,20,21], "version": 2,
                    "masks": {"train": [0,1,2,3,4,5,6,7,8], "valid": [9,10,11], "hard": [2, 10]}}"#,
            ),
        ),
        env.round(
            "r3.hdf5",
            json(
                r#"{"contents": [30, 31, 32, 33, 34], "numbers": [4, 0, 17, 2, 9],
                    "masks": {"valid": [0, 3], "train": [1, 2, 4]}}"#,
            ),
        ),
    ]
}

#[test]
fn merges_like_h5py_at_every_cut() {
    let env = Env::new();
    let rounds = standard_rounds(&env);
    let info: Vec<_> = rounds
        .iter()
        .map(|r| hdf5::inspect(r, None).unwrap())
        .collect();
    assert_eq!(
        info.iter().map(|i| i.count).collect::<Vec<_>>(),
        [3, 0, 12, 5]
    );
    assert_eq!(info[0].schema, SCHEMA);
    assert_eq!(info[1].schema, "hdf5 robomimic empty");
    assert!(
        info.iter()
            .all(|i| quarry_formats::schemas_compatible(&i.schema, SCHEMA))
    );
    for limit in [0, 1, 3, 4, 9, 15, 16, 18, 20, 100] {
        let s = env.check_merge(&format!("cut{limit}"), &rounds, limit, None, &[]);
        assert_eq!(s.samples, limit.min(20));
        assert_eq!((s.filtered, s.duplicates), (0, 0));
    }
    // A merge through the crate's entry point, of the merged output with a round.
    let merged = env.path("cut100-quarry.hdf5");
    let again = env.path("again.hdf5");
    let s = quarry_formats::merge(
        quarry_formats::Format::Hdf5,
        &[merged.clone(), rounds[0].clone()],
        &[20, 3],
        &MergeOptions {
            limit: 22,
            ..Default::default()
        },
        &again,
    )
    .unwrap();
    assert_eq!(s.samples, 22);
    // The output must not exist already.
    let e = hdf5::merge(&rounds, &[3, 0, 12, 5], &MergeOptions::default(), &merged).unwrap_err();
    assert!(matches!(e, DatasetError::Io { .. }), "{e}");
    // Counts must match the inputs.
    let e = hdf5::merge(
        &rounds,
        &[3, 0, 11, 5],
        &MergeOptions {
            limit: 100,
            ..Default::default()
        },
        &env.path("counts.hdf5"),
    )
    .unwrap_err();
    assert!(e.to_string().contains("r2.hdf5:data"), "{e}");
    assert!(e.to_string().contains("committed with 11"), "{e}");
}

#[test]
fn filters_and_dedup_like_h5py_deterministically() {
    let env = Env::new();
    let mut rounds = standard_rounds(&env);
    // Rounds repeating earlier demos' content (and one demo twice within itself).
    rounds.push(env.round(
        "r4.hdf5",
        json(
            r#"{"contents": [2, 40, 12, 40, 33], "masks": {"train": [0, 1, 2], "valid": [3, 4]}}"#,
        ),
    ));
    rounds.push(env.round("r5.hdf5", json(r#"{"contents": [1, 2, 3, 41]}"#)));

    let total = 29;
    for (tag, filter) in [
        ("succ", "success == 1"),
        ("long", "num_samples >= 10"),
        ("qual", "quality < 0.5"),
    ] {
        for limit in [0, 2, 7, 100] {
            let s = env.check_merge(&format!("{tag}{limit}"), &rounds, limit, Some(filter), &[]);
            if limit == 100 {
                assert!(s.filtered > 0 && s.samples > 0, "{tag}: {s:?}");
                assert_eq!(s.samples + s.filtered, total);
            }
        }
    }
    for limit in [3, 17, 100] {
        let s = env.check_merge(&format!("dedup{limit}"), &rounds, limit, None, &["actions"]);
        if limit == 100 {
            assert_eq!(s.duplicates, 7, "{s:?}");
        }
        env.check_merge(
            &format!("both{limit}"),
            &rounds,
            limit,
            Some("success != 0"),
            &["obs/eef_pos", "rewards"],
        );
    }
    // Dotted names reach datasets in subgroups.
    env.check_merge(
        "dotted",
        &rounds,
        100,
        Some("quality >= 0.25"),
        &["obs.eef_pos"],
    );

    // The same merge twice makes the same bytes.
    let options = MergeOptions {
        limit: 15,
        filter: Some(Filter::parse("success == 1").unwrap()),
        dedup: vec!["actions".into(), "obs/image".into()],
        video_files_size_in_mb: None,
    };
    let counts: Vec<u64> = rounds
        .iter()
        .map(|p| hdf5::inspect(p, None).unwrap().count)
        .collect();
    let a = env.path("det-a.hdf5");
    let b = env.path("det-b.hdf5");
    hdf5::merge(&rounds, &counts, &options, &a).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    hdf5::merge(&rounds, &counts, &options, &b).unwrap();
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "two identical merges wrote different bytes"
    );

    // inspect counts what the filter keeps.
    let f = Filter::parse("success == 1").unwrap();
    let i = hdf5::inspect(&rounds[2], Some(&f)).unwrap();
    assert_eq!((i.count, i.kept), (12, 8));

    // A filter or dedup field a demo lacks is named.
    let e = hdf5::inspect(&rounds[0], Some(&Filter::parse("E_pen < 1").unwrap())).unwrap_err();
    match &e {
        DatasetError::Filter { path, reason } => {
            assert!(path.ends_with("r0.hdf5:data/demo_0"), "{path}");
            assert!(reason.contains("E_pen"), "{reason}");
        }
        e => panic!("{e}"),
    }
    let e = hdf5::merge(
        &rounds,
        &counts,
        &MergeOptions {
            limit: 100,
            filter: None,
            dedup: vec!["obs/nope".into()],
            video_files_size_in_mb: None,
        },
        &env.path("nodedup.hdf5"),
    )
    .unwrap_err();
    assert!(matches!(e, DatasetError::Filter { .. }), "{e}");
    assert!(e.to_string().contains("obs/nope"), "{e}");
}

#[test]
fn refuses_mismatched_env_args_and_layouts() {
    let env = Env::new();
    let a = env.round("a.hdf5", json(r#"{"contents": [1, 2]}"#));
    let b = env.round(
        "b.hdf5",
        json(r#"{"contents": [3], "env_args": {"env_name": "Stack"}}"#),
    );
    let c = env.round("c.hdf5", json(r#"{"contents": [4], "env_args": null}"#));
    let opts = MergeOptions {
        limit: 10,
        ..Default::default()
    };
    for (tag, other) in [("b", &b), ("c", &c)] {
        let e = hdf5::merge(
            &[a.clone(), a.clone(), other.clone()],
            &[2, 2, 1],
            &opts,
            &env.path(&format!("env-{tag}.hdf5")),
        )
        .unwrap_err();
        match &e {
            DatasetError::Mismatch { input, what } => {
                assert_eq!(*input, 2);
                assert!(what.contains("env_args"), "{what}");
            }
            e => panic!("{e}"),
        }
    }
    // A round past the limit is not opened, so it cannot spoil the merge.
    let s = hdf5::merge(
        &[a.clone(), b.clone()],
        &[2, 1],
        &MergeOptions {
            limit: 2,
            ..Default::default()
        },
        &env.path("env-cut.hdf5"),
    )
    .unwrap();
    assert_eq!(s.samples, 2);
}

#[test]
fn rejects_damaged_files_with_the_place_and_reason() {
    let env = Env::new();
    let good = env.round("good.hdf5", json(r#"{"contents": [1, 2, 3, 4]}"#));
    let axis = env.round(
        "axis.hdf5",
        json(r#"{"contents": [1, 2, 3], "bad_axis": 1}"#),
    );
    let e = hdf5::inspect(&axis, None).unwrap_err();
    match &e {
        DatasetError::Invalid { path, reason } => {
            assert_eq!(path, &format!("{}:data/demo_1/actions", axis.display()));
            assert!(reason.contains("first axis"), "{reason}");
        }
        e => panic!("{e}"),
    }
    let e = hdf5::merge(
        &[good.clone(), axis.clone()],
        &[4, 3],
        &MergeOptions {
            limit: 10,
            ..Default::default()
        },
        &env.path("axis-merged.hdf5"),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("axis.hdf5:data/demo_1/actions"),
        "{e}"
    );

    let stray = env.round(
        "stray.hdf5",
        json(r#"{"contents": [1], "stray": "episode_0"}"#),
    );
    let e = hdf5::inspect(&stray, None).unwrap_err();
    assert!(e.to_string().contains("stray.hdf5:data/episode_0"), "{e}");

    let dangling = env.round(
        "dangling.hdf5",
        json(r#"{"contents": [1, 2], "numbers": [0, 1], "masks": {"train": [0, 1]}}"#),
    );
    // Point the mask at a demo that is not there.
    let fix = env.path("fix.py");
    std::fs::write(
        &fix,
        "import sys, h5py, numpy as np\nwith h5py.File(sys.argv[1], 'a') as f:\n    del f['mask/train']\n    f['mask/train'] = np.array([b'demo_0', b'demo_7'])\n",
    )
    .unwrap();
    Command::new(&env.py)
        .arg(&fix)
        .arg(&dangling)
        .status()
        .unwrap();
    let e = hdf5::inspect(&dangling, None).unwrap_err();
    assert!(e.to_string().contains("mask/train"), "{e}");
    assert!(e.to_string().contains("demo_7"), "{e}");

    let no_data = env.path("nodata.hdf5");
    let mk = env.path("nodata.py");
    std::fs::write(
        &mk,
        "import sys, h5py\nwith h5py.File(sys.argv[1], 'w') as f:\n    f.create_group('episodes')\n",
    )
    .unwrap();
    Command::new(&env.py)
        .arg(&mk)
        .arg(&no_data)
        .status()
        .unwrap();
    let e = hdf5::inspect(&no_data, None).unwrap_err();
    assert!(e.to_string().contains("nodata.hdf5:data"), "{e}");

    // Truncated copies of a good file, and one that is not HDF5 at all.
    let bytes = std::fs::read(&good).unwrap();
    for (name, keep) in [
        ("cut-half.hdf5", bytes.len() / 2),
        ("cut-end.hdf5", bytes.len() - 100),
        ("cut-head.hdf5", 600),
    ] {
        let p = env.path(name);
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let e = hdf5::inspect(&p, None).unwrap_err();
        match &e {
            DatasetError::Invalid { path, reason } => {
                assert!(path.starts_with(&p.display().to_string()), "{path}");
                assert!(reason.contains("truncated file"), "{reason}");
                eprintln!("{name}: {e}");
            }
            e => panic!("{name}: {e}"),
        }
    }
    let junk = env.path("junk.hdf5");
    std::fs::write(&junk, b"not an hdf5 file at all").unwrap();
    let e = hdf5::inspect(&junk, None).unwrap_err();
    assert!(e.to_string().contains("junk.hdf5"), "{e}");
    assert!(e.to_string().contains("signature not found"), "{e}");
    eprintln!("junk: {e}");
}

#[derive(Default)]
struct Seen {
    samples: Vec<u64>,
    values: Vec<(u64, String, Vec<f64>)>,
    problems: Vec<(String, String)>,
}

impl Observer for Seen {
    fn sample(&mut self, index: u64) {
        self.samples.push(index);
    }
    fn values(&mut self, field: &str, values: &[f64]) {
        let i = *self.samples.last().unwrap();
        self.values.push((i, field.to_string(), values.to_vec()));
    }
    fn problem(&mut self, path: &str, reason: &str) {
        self.problems.push((path.to_string(), reason.to_string()));
    }
}

impl Seen {
    fn get(&self, sample: u64, field: &str) -> &[f64] {
        &self
            .values
            .iter()
            .find(|(i, f, _)| *i == sample && f == field)
            .unwrap_or_else(|| panic!("no {field} for sample {sample}"))
            .2
    }
}

#[test]
fn examine_reports_values_and_problems() {
    let env = Env::new();
    let good = env.round(
        "good.hdf5",
        json(r#"{"contents": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], "masks": {"train": [0]}}"#),
    );
    let mut seen = Seen::default();
    let n = hdf5::examine(&good, &mut seen).unwrap();
    assert_eq!(n, 11);
    assert_eq!(seen.samples, (0..11).collect::<Vec<_>>());
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    let facts: serde_json::Value =
        serde_json::from_str(env.py("facts.py", &[good.display().to_string()]).trim()).unwrap();
    for (i, f) in facts.as_array().unwrap().iter().enumerate() {
        let i = i as u64;
        assert_eq!(
            seen.get(i, "attrs.num_samples"),
            [f["num_samples"].as_f64().unwrap()]
        );
        assert_eq!(
            seen.get(i, "attrs.success"),
            [f["success"].as_f64().unwrap()]
        );
        // The actions are float32: compared as such (JSON parsing may round the last bit
        // of a double).
        let actions: Vec<f32> = f["actions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got: Vec<f32> = seen.get(i, "actions").iter().map(|&v| v as f32).collect();
        assert_eq!(got, actions);
        let image: f64 = seen.get(i, "obs/image").iter().sum();
        assert_eq!(image, f["image_sum"].as_f64().unwrap());
        let quality = seen.get(i, "quality");
        assert_eq!(quality.len(), 1);
        assert!((quality[0] - f["quality"].as_f64().unwrap()).abs() < 1e-15);
        assert_eq!(
            seen.get(i, "dones").len() as f64,
            f["num_samples"].as_f64().unwrap()
        );
    }
    // The model_file string attribute is not a number and is not reported.
    assert!(!seen.values.iter().any(|(_, f, _)| f == "attrs.model_file"));

    let bad = env.round(
        "bad.hdf5",
        json(r#"{"contents": [1, 2, 3, 4], "bad_axis": 1, "nan": 2, "no_num_samples": 3}"#),
    );
    let mut seen = Seen::default();
    assert_eq!(hdf5::examine(&bad, &mut seen).unwrap(), 4);
    let file = bad.display().to_string();
    let has = |path: &str, what: &str| {
        seen.problems
            .iter()
            .any(|(p, r)| p == &format!("{file}:{path}") && r.contains(what))
    };
    assert!(
        has("data/demo_1/actions", "first axis"),
        "{:?}",
        seen.problems
    );
    assert!(
        has("data/demo_2/actions", "non-finite"),
        "{:?}",
        seen.problems
    );
    assert!(has("data/demo_3", "num_samples"), "{:?}", seen.problems);
    // Values are still reported where the demo is readable.
    assert!(seen.get(2, "actions").iter().any(|v| v.is_nan()));
}

/// Run in a child process with `QUARRY_HDF5_LIB` pointing nowhere (see the next test).
#[test]
fn missing_library_child() {
    if std::env::var_os("QUARRY_HDF5_CHILD").is_none() {
        return;
    }
    let e = hdf5::inspect(Path::new("/nonexistent.hdf5"), None).unwrap_err();
    match e {
        DatasetError::Unsupported { reason } => {
            assert!(reason.contains("apt install libhdf5-103-1"), "{reason}");
            assert!(reason.contains("QUARRY_HDF5_LIB"), "{reason}");
            assert!(reason.contains("/nowhere/libhdf5.so"), "{reason}");
        }
        e => panic!("{e}"),
    }
    let e = hdf5::merge(
        &[PathBuf::from("/nonexistent.hdf5")],
        &[1],
        &MergeOptions::default(),
        Path::new("/nonexistent-out.hdf5"),
    )
    .unwrap_err();
    assert!(matches!(e, DatasetError::Unsupported { .. }), "{e}");
}

#[test]
fn a_missing_library_says_how_to_install_it() {
    let e = hdf5::load_library_from(&["/nowhere/libhdf5.so".into()]).unwrap_err();
    assert!(e.to_string().contains("apt install libhdf5-103-1"), "{e}");
    hdf5::load_library().expect("libhdf5 is installed where the tests run");

    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "missing_library_child", "--nocapture"])
        .env("QUARRY_HDF5_CHILD", "1")
        .env("QUARRY_HDF5_LIB", "/nowhere/libhdf5.so")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn example_generator_rounds_merge() {
    let env = Env::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/robomimic_gen.py");
    let mut rounds = Vec::new();
    let mut successes = 0;
    for seed in 0..4 {
        let out = env.path(&format!("gen{seed}.hdf5"));
        let stats = env.path(&format!("gen{seed}.json"));
        let status = Command::new(&env.py)
            .arg(&script)
            .args([
                "--seed",
                &seed.to_string(),
                "--object",
                "mug",
                "--batch_size",
                "10",
            ])
            .args(["--min_len", "5", "--max_len", "30", "--out"])
            .arg(&out)
            .arg("--stats")
            .arg(&stats)
            .status()
            .unwrap();
        assert!(status.success());
        let st: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        assert_eq!(st["attempts"], 10);
        let info = hdf5::inspect(&out, None).unwrap();
        assert_eq!(info.count, st["successes"].as_u64().unwrap());
        assert!(
            info.schema.starts_with(
                "hdf5 robomimic [actions <f4 (*,7); dones <i8 (*); next_obs/object <f8 (*,10);"
            ),
            "{}",
            info.schema
        );
        successes += info.count;
        rounds.push(out);
    }
    assert!(successes > 10 && successes < 40, "{successes}");
    let s = env.check_merge("gen", &rounds, successes - 3, None, &[]);
    assert_eq!(s.samples, successes - 3);
    env.check_merge(
        "gen-long",
        &rounds,
        100,
        Some("num_samples >= 15"),
        &["actions"],
    );
}

/// Processes spawned (by other threads) while Quarry has a file open may inherit its
/// descriptor (the library opens files without close-on-exec; Quarry sets it right after, but
/// a spawn can fall in between), but never a lock on it: h5py opens the outputs while those
/// processes still run.
#[test]
fn spawned_processes_do_not_hold_quarry_files() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::new();
    let rounds = standard_rounds(&env);
    let done = AtomicBool::new(false);
    let outs: Vec<PathBuf> = (0..8)
        .map(|i| env.path(&format!("spawn{i}.hdf5")))
        .collect();
    // Stops the spawner however the merges end.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let (children, merged) = std::thread::scope(|scope| {
        let spawner = scope.spawn(|| {
            let mut children = Vec::new();
            while !done.load(Ordering::Relaxed) && children.len() < 400 {
                match Command::new("sleep").arg("30").spawn() {
                    Ok(c) => children.push(c),
                    Err(_) => break,
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            children
        });
        let merged = {
            let _stop = Stop(&done);
            outs.iter()
                .map(|out| {
                    hdf5::merge(
                        &rounds,
                        &[3, 0, 12, 5],
                        &MergeOptions {
                            limit: 100,
                            ..Default::default()
                        },
                        out,
                    )?;
                    hdf5::inspect(out, None)
                })
                .collect::<Result<Vec<_>, DatasetError>>()
        };
        (spawner.join().unwrap(), merged)
    });
    let reap = |children: Vec<std::process::Child>| {
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
    };
    let merged = match merged {
        Ok(m) => m,
        Err(e) => {
            reap(children);
            panic!("{e}");
        }
    };
    assert!(merged.iter().all(|i| i.count == 20));
    assert!(!children.is_empty());
    let check = env.path("open.py");
    std::fs::write(
        &check,
        "import sys, h5py\nfor p in sys.argv[1:]:\n    with h5py.File(p, 'r') as f:\n        assert len(f['data']) == 20\nprint('ok')\n",
    )
    .unwrap();
    let args: Vec<String> = outs.iter().map(|p| p.display().to_string()).collect();
    let said = Command::new(&env.py)
        .arg(&check)
        .args(&args)
        .output()
        .unwrap();
    reap(children);
    assert!(
        said.status.success(),
        "h5py cannot open Quarry's outputs: {}",
        String::from_utf8_lossy(&said.stderr)
    );
}
