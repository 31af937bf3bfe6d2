//! Cross-checks `quarry_formats::npy` against real numpy: rounds written by `np.save`, merged
//! here, loaded back by `np.load(allow_pickle=True)` and compared with numpy's own
//! concatenation.
//!
//! Needs a Python with numpy; fails (never skips) without one. `QUARRY_TEST_PYTHON` names the
//! interpreter (default `python3`); `QUARRY_TEST_PYTHONS`, a `:`-separated list, runs every
//! check on each interpreter listed (say one with numpy 1.26 and one with numpy 2.x), and
//! writes the rounds with each of them in turn so one merge mixes their pickles.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::fs::File;
use std::path::{Path, PathBuf};

use quarry_formats::npy::{self, ArrayKind, FormatError};

mod pyhelp;
use pyhelp::{pythons, run};

const GEN: &str = r#"
import sys, numpy as np

def sample(i, rng):
    d = {
        'id': i,
        'score': float(rng.random()),
        'name': 'obj%d' % (i % 7),
        'ok': bool(i % 2),
        'none': None,
        'f32': np.float32(rng.random()),
        'i64': np.int64(3 * i),
        'arr': np.arange(i % 4, dtype=np.float32) * 0.5,
        'mat': np.ones((2, 2), dtype=np.int16) * (i % 1000),
        'nested': {'a': {'b': i, 'c': [1, 'x', None]}, 't': (i, 'y'), 'f': 1.5},
        'big': 2 ** 70 + i,
        'neg': -i,
        'bytes': b'\x00\x01' * (i % 3),
        'uni': 'caf\u00e9 \u2713',
        # An object array inside: its pickle reuses the outer pickle's dtype('O') object.
        'objarr': np.array([i, 'a', None, {'z': 1}], dtype=object),
    }
    return d

out, kind, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(seed)
for spec in sys.argv[4:]:
    name, n = spec.split('=')
    n = int(n)
    path = '%s/%s.npy' % (out, name)
    if kind == 'obj' or kind == 'badkeys':
        items = [sample(seed * 100000 + i, rng) for i in range(n)]
        # The same dict twice: the pickle refers back to it through the memo.
        if n > 5:
            items[5] = items[0]
        if kind == 'badkeys' and n > 3:
            del items[3]['score']
        a = np.empty(n, dtype=object)
        a[:] = items
        np.save(path, a, allow_pickle=True)
    elif kind == 'struct':
        dt = np.dtype([('a', '<f4'), ('b', '<i8', (2,)), ('c', 'S3'), (('Title', 't'), '<i4'),
                       ('d', [('x', 'u1'), ('y', '>f8')])])
        a = np.zeros(n, dtype=dt)
        a['a'] = rng.random(n)
        a['b'] = rng.integers(0, 100, (n, 2))
        a['c'] = [b'ab%d' % (i % 10) for i in range(n)]
        a['d']['y'] = rng.random(n)
        np.save(path, a)
    elif kind == 'aligned':
        a = np.zeros(n, dtype=np.dtype([('a', 'u1'), ('b', '<f8')], align=True))
        a['b'] = rng.random(n)
        np.save(path, a)
    elif kind == 'unicode':
        np.save(path, np.array(['\u00e9%d' % i for i in range(n)], dtype='<U4'))
    elif kind == 'bool':
        np.save(path, rng.random((n, 2)) > 0.5)
    elif kind == 'datetime':
        np.save(path, (np.arange(n) * 1000).astype('<M8[ns]'))
    elif kind == 'bigendian':
        np.save(path, np.arange(n, dtype='>i2'))
    elif kind == 'complex':
        np.save(path, (rng.random(n) + 1j).astype('<c16'))
    else:
        np.save(path, rng.random((n, 3, 4)).astype(kind))
"#;

const CHECK: &str = r#"
import sys, io, warnings, numpy as np
warnings.simplefilter('error')

def eq(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(eq(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and bool(a == b)
    return a == b

def partition(arr):
    first = {}
    return [first.setdefault(id(x), i) for i, x in enumerate(arr)]

nrounds = int(sys.argv[1])
rounds = sys.argv[2:2 + nrounds]
loaded = [np.load(r, allow_pickle=True) for r in rounds]
concat = np.concatenate(loaded)
if concat.dtype != object:
    # concatenate canonicalises byte order inside structured dtypes; a merge keeps the inputs'.
    concat = concat.astype(loaded[0].dtype)
pairs = sys.argv[2 + nrounds:]
for merged, limit in zip(pairs[::2], pairs[1::2]):
    limit = int(limit)
    want = concat[:limit]
    got = np.load(merged, allow_pickle=True)
    assert got.dtype == want.dtype, (merged, got.dtype, want.dtype)
    assert got.shape == want.shape, (merged, got.shape, want.shape)
    # The header is byte-identical to np.save's for the same array.
    buf = io.BytesIO()
    np.save(buf, want, allow_pickle=True)
    with open(merged, 'rb') as f:
        data = f.read()
    hlen = 10 + int.from_bytes(data[8:10], 'little')
    assert data[:hlen] == buf.getvalue()[:hlen], (data[:hlen], buf.getvalue()[:hlen])
    if want.dtype == object:
        for i, (x, y) in enumerate(zip(got, want)):
            assert eq(x, y), (merged, i, x, y)
        # Elements that were one object within a round still are.
        assert partition(got) == partition(want), merged
    else:
        assert np.array_equal(got, want), merged
        fields = want.dtype.fields or {}
        padded = fields and want.dtype.itemsize != sum(f[0].itemsize for f in fields.values())
        # Padding bytes are whatever memory held; elsewhere the file is exactly np.save's.
        if not padded:
            assert data == buf.getvalue(), merged
print('ok', np.__version__, len(pairs) // 2)
"#;

const LENGTHS: &str = r#"
import sys, numpy as np
print(' '.join(str(len(np.load(p, allow_pickle=True))) for p in sys.argv[1:]))
"#;

fn python() -> String {
    pyhelp::interpreter()
}

struct Scripts {
    dir: tempfile::TempDir,
    gen_py: PathBuf,
    check: PathBuf,
    lengths: PathBuf,
}

fn scripts() -> Scripts {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let gen_py = write("gen.py", GEN);
    let check = write("check.py", CHECK);
    let lengths = write("lengths.py", LENGTHS);
    Scripts {
        dir,
        gen_py,
        check,
        lengths,
    }
}

/// Writes rounds `r0..` of the given sizes, round i by interpreter `i % pythons.len()`.
fn make_rounds(
    s: &Scripts,
    pys: &[String],
    kind: &str,
    prefix: &str,
    sizes: &[u64],
) -> Vec<PathBuf> {
    for (j, py) in pys.iter().enumerate() {
        let specs: Vec<String> = sizes
            .iter()
            .enumerate()
            .filter(|(i, _)| i % pys.len() == j)
            .map(|(i, n)| format!("{prefix}{i}={n}"))
            .collect();
        if specs.is_empty() {
            continue;
        }
        let mut args = vec![
            s.dir.path().display().to_string(),
            kind.into(),
            (j + 1).to_string(),
        ];
        args.extend(specs);
        run(py, &s.gen_py, &args);
    }
    (0..sizes.len())
        .map(|i| s.dir.path().join(format!("{prefix}{i}.npy")))
        .collect()
}

fn merge_files(rounds: &[PathBuf], counts: &[u64], limit: u64, out: &Path) -> npy::MergeSummary {
    let f = File::create(out).unwrap();
    let s = npy::merge(counts, limit, |i| File::open(&rounds[i]), &f).unwrap();
    assert_eq!(s.bytes_written, std::fs::metadata(out).unwrap().len());
    s
}

/// Merges `rounds` at each limit and has every interpreter compare the results to numpy.
fn check_limits(s: &Scripts, pys: &[String], rounds: &[PathBuf], limits: &[u64], tag: &str) {
    let counts: Vec<u64> = rounds
        .iter()
        .map(|r| npy::inspect_path(r).unwrap().count)
        .collect();
    let total: u64 = counts.iter().sum();
    let mut args = vec![rounds.len().to_string()];
    args.extend(rounds.iter().map(|r| r.display().to_string()));
    for &limit in limits {
        let out = s.dir.path().join(format!("{tag}-merged-{limit}.npy"));
        let summary = merge_files(rounds, &counts, limit, &out);
        assert_eq!(summary.samples, limit.min(total));
        let info = npy::inspect_path(&out).unwrap();
        assert_eq!(info.count, limit.min(total));
        args.push(out.display().to_string());
        args.push(limit.to_string());
    }
    for py in pys {
        let said = run(py, &s.check, &args);
        assert!(said.starts_with("ok"), "{said}");
        eprintln!("{tag}: {py}: {}", said.trim());
    }
}

#[test]
fn object_rounds_merge_like_numpy() {
    let pys = pythons();
    let s = scripts();
    // 2345 and 1001 pickle as several 1000-element APPENDS batches; the 1001 one ends in a
    // lone APPEND. Limits cut rounds at their first element, mid-batch, at batch edges.
    let sizes = [5u64, 1, 2345, 0, 1001, 7];
    let rounds = make_rounds(&s, &pys, "obj", "o", &sizes);
    let limits = [
        0,
        1,
        5,
        6,
        7,
        6 + 999,
        6 + 1000,
        6 + 1500,
        6 + 2345,
        6 + 2345 + 1000,
        3359,
        3360,
        5000,
    ];
    check_limits(&s, &pys, &rounds, &limits, "obj");
}

#[test]
fn numeric_rounds_merge_like_numpy() {
    let pys = pythons();
    let s = scripts();
    let rounds = make_rounds(&s, &pys, "float32", "n", &[4, 0, 9, 1]);
    check_limits(&s, &pys, &rounds, &[0, 3, 4, 5, 13, 14, 100], "f4");
}

#[test]
fn other_numeric_dtypes_merge_like_numpy() {
    let pys = pythons();
    let s = scripts();
    for kind in [
        "struct",
        "aligned",
        "unicode",
        "bool",
        "datetime",
        "bigendian",
        "complex",
    ] {
        let rounds = make_rounds(&s, &pys, kind, kind, &[3, 0, 5]);
        check_limits(&s, &pys, &rounds, &[0, 2, 3, 8, 9], kind);
    }
}

#[test]
fn inspect_agrees_with_numpy_and_catches_damage() {
    let pys = pythons();
    let s = scripts();
    let obj = make_rounds(&s, &pys, "obj", "o", &[3, 1200]);
    let f4 = make_rounds(&s, &pys, "float32", "f", &[6]);
    let f8 = make_rounds(&s, &pys, "float64", "d", &[6]);
    let bad = make_rounds(&s, &pys, "badkeys", "b", &[8]);
    let all: Vec<String> = obj
        .iter()
        .chain(&f4)
        .chain(&f8)
        .map(|p| p.display().to_string())
        .collect();
    let lengths = run(&python(), &s.lengths, &all);
    let lengths: Vec<u64> = lengths
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(lengths, [3, 1200, 6, 6]);

    let keys = "npy object dict keys [arr, big, bytes, f32, i64, id, mat, name, neg, nested, none, objarr, ok, score, uni]";
    for (p, n) in obj.iter().zip([3, 1200]) {
        let info = npy::inspect_path(p).unwrap();
        assert_eq!(
            (info.count, info.schema.as_str(), &info.kind),
            (n, keys, &ArrayKind::Object)
        );
    }
    let i4 = npy::inspect_path(&f4[0]).unwrap();
    assert_eq!(i4.schema, "npy <f4 (*, 3, 4)");
    assert_eq!(
        i4.kind,
        ArrayKind::Numeric {
            descr: "<f4".into(),
            tail_shape: vec![3, 4]
        }
    );
    let i8 = npy::inspect_path(&f8[0]).unwrap();
    assert_eq!(i8.schema, "npy <f8 (*, 3, 4)");
    assert_ne!(i4.schema, i8.schema);

    match npy::inspect_path(&bad[0]).unwrap_err() {
        FormatError::InconsistentElements { index, reason } => {
            assert_eq!(index, 3);
            assert!(reason.contains("missing [score]"), "{reason}");
        }
        e => panic!("{e}"),
    }

    // Truncated copies: numeric by one byte, the object pickle in its middle and at its end.
    let cut = |src: &Path, keep: u64, name: &str| {
        let data = std::fs::read(src).unwrap();
        let p = s.dir.path().join(name);
        std::fs::write(&p, &data[..keep as usize]).unwrap();
        (p, data.len() as u64)
    };
    let (p, full) = cut(
        &f4[0],
        std::fs::metadata(&f4[0]).unwrap().len() - 1,
        "f4-cut.npy",
    );
    match npy::inspect_path(&p).unwrap_err() {
        FormatError::Truncated {
            expected, actual, ..
        } => assert_eq!((expected, actual), (full, full - 1)),
        e => panic!("{e}"),
    }
    let big = &obj[1];
    let len = std::fs::metadata(big).unwrap().len();
    for keep in [200, len / 2, len - 1] {
        let (p, _) = cut(big, keep, "obj-cut.npy");
        let e = npy::inspect_path(&p).unwrap_err();
        assert!(matches!(e, FormatError::Truncated { .. }), "{keep}: {e}");
    }

    // A merge refuses a dtype change and names the input.
    let counts = [6u64, 6];
    let pair = [f4[0].clone(), f8[0].clone()];
    let out = File::create(s.dir.path().join("mixed.npy")).unwrap();
    let e = npy::merge(&counts, 12, |i| File::open(&pair[i]), &out).unwrap_err();
    assert!(matches!(e, FormatError::Mismatch { input: 1, .. }), "{e}");
    assert!(e.to_string().contains("<f8"), "{e}");
}
