//! Filtered and de-duplicated `.npy` merges, `inspect` with a filter and `examine`, checked
//! against real numpy: rounds written by `np.save`, merged here, loaded back by
//! `np.load(allow_pickle=True)` and compared, element by element and field by field, with
//! Python's own `np.concatenate(rounds)[keep][:limit]`.
//!
//! Needs a Python with numpy; fails (never skips) without one. `QUARRY_TEST_PYTHON` names the
//! interpreter (default `python3`); `QUARRY_TEST_PYTHONS`, a `:`-separated list, writes the
//! rounds with each in turn (so one merge mixes numpy 1 and numpy 2 pickles) and checks the
//! output with each.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::path::PathBuf;

use quarry_formats::{DatasetError, Filter, MergeOptions, Observer, npy};

mod pyhelp;
use pyhelp::{pythons, run};

/// Writes rounds. Kinds:
/// - `grasp`: dicts as grasp generators write them. Element 0 of every round fails the filter
///   (it writes the key strings, the dtype objects and the round's shared `scale` scalar and
///   `tags` list, which every later element reads through the memo); `E_pen` is in turn an
///   np.float32, a float, a 0-d array, a 1-element array; `qpos` repeats within and across
///   rounds; some elements are the same dict twice.
/// - `late`: like grasp, but the first float16 value (and its dtype object) appears in a
///   dropped element in the middle of the round and is shared with later kept ones.
/// - `struct`: a structured array with nested fields.
/// - `plain`: a float32 array.
/// - `bad_missing`, `bad_str`, `bad_array`: element 3's `E_pen` is missing, a str, a
///   3-element array.
/// - `examine`: dicts with a NaN, an infinity, and a non-dict element.
const GEN: &str = r#"
import sys, numpy as np

out, kind, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(seed)

def epen(i, x):
    m = i % 4
    if m == 0: return np.float32(x)
    if m == 1: return float(x)
    if m == 2: return np.array(x)
    return np.array([x], dtype=np.float32)

def grasp(i, n, scale, tags, half=None, with_h=False):
    q = int(rng.integers(0, 40))
    d = {
        'qpos': {'WRJTx': q * 0.25, 'WRJTy': -q * 0.5, 'robot0:FFJ3': float(q % 3)},
        'scale': scale,
        'energy': np.float32(rng.random()),
        'E_pen': epen(i, 5.0 if i == 0 else float(rng.random())),
        'E_dis': np.float64(rng.random()),
        'valid': bool(i % 5 != 1),
        'hand_pose': np.arange(3, dtype=np.float32) + q,
        'name': 'grasp',
        'tags': tags,
    }
    if with_h:
        d['h'] = half
    return d

def save(path, items):
    a = np.empty(len(items), dtype=object)
    a[:] = items
    np.save(path, a, allow_pickle=True)

for spec in sys.argv[4:]:
    name, n = spec.split('=')
    n = int(n)
    path = '%s/%s.npy' % (out, name)
    if kind in ('grasp', 'late'):
        scale = np.float32(0.05 + seed * 0.01)
        tags = ['shared', seed]
        half = None
        items = []
        for i in range(n):
            if kind == 'late' and i == n // 2:
                half = np.float16(1.5 + seed)
            d = grasp(i, n, scale, tags, half, kind == 'late')
            if kind == 'late' and i == n // 2:
                d['E_pen'] = epen(i, 9.0)
            items.append(d)
        for j in range(7, n, 97):
            items[j] = items[j - 3]
        save(path, items)
    elif kind == 'struct':
        dt = np.dtype([('E_pen', '<f4'), ('qpos', '<f8', (3,)), ('name', 'S4'),
                       ('meta', [('ok', '?'), ('e', '>f8')]), ('n', '<i2')])
        a = np.zeros(n, dtype=dt)
        a['E_pen'] = rng.random(n)
        a['qpos'] = rng.integers(0, 4, (n, 3)) * 0.5
        a['name'] = [b'g%d' % (i % 10) for i in range(n)]
        a['meta']['ok'] = rng.random(n) > 0.5
        a['meta']['e'] = rng.random(n)
        a['n'] = np.arange(n) - 3
        np.save(path, a)
    elif kind == 'plain':
        np.save(path, rng.random((n, 2)).astype('<f4'))
    elif kind.startswith('bad_'):
        items = [grasp(i, n, np.float32(1), []) for i in range(n)]
        for d in items:
            d['E_pen'] = 0.1
        if kind == 'bad_missing':
            del items[3]['E_pen']
        elif kind == 'bad_str':
            items[3]['E_pen'] = 'low'
        else:
            items[3]['E_pen'] = np.zeros(3)
        save(path, items)
    elif kind == 'examine':
        items = []
        for i in range(n):
            items.append({'a': float(i), 'b': {'c': np.float32(i) / 2, 'd': np.arange(2) + i},
                          'e': 'text', 'f': [1, 2.5]})
        items[1]['a'] = float('nan')
        items[2]['b']['c'] = np.float32('inf')
        items[3] = 7
        save(path, items)
"#;

/// Loads rounds and merged outputs and compares them with numpy's own filtered, de-duplicated
/// concatenation. Args: nrounds, rounds..., filter field, op, value (or `-`), dedup fields
/// (comma-separated, or `-`), then (merged, limit) pairs. Prints `ok`, then
/// `filtered duplicates` for each pair.
const CHECK: &str = r#"
import sys, operator, warnings, numpy as np
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

def partition(xs):
    first = {}
    return [first.setdefault(id(x), i) for i, x in enumerate(xs)]

def get(x, path):
    for p in path.split('.'):
        x = x[p]
    return x

def canon(v):
    if isinstance(v, dict):
        return ('d', tuple(sorted((canon(k), canon(x)) for k, x in v.items())))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(canon(x) for x in v))
    if isinstance(v, np.ndarray):
        return ('a', v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, np.generic):
        return ('g', v.dtype.str, v.tobytes())
    return (type(v).__name__, v)

ops = {'<': operator.lt, '<=': operator.le, '>': operator.gt, '>=': operator.ge,
       '==': operator.eq, '!=': operator.ne}
n = int(sys.argv[1])
rounds = sys.argv[2:2 + n]
field, op, value, dedup = sys.argv[2 + n:6 + n]
pairs = sys.argv[6 + n:]
loaded = [np.load(r, allow_pickle=True) for r in rounds]
concat = np.concatenate(loaded)
structured = concat.dtype.names is not None
if concat.dtype != object:
    concat = concat.astype(loaded[0].dtype)
dedup = [] if dedup == '-' else dedup.split(',')

def select(limit):
    keep, filtered, dups, seen = [], 0, 0, set()
    for i, x in enumerate(concat):
        if len(keep) == limit:
            break
        if field != '-':
            v = get(x, field)
            if not ops[op](float(np.asarray(v).reshape(-1)[0]), float(value)):
                filtered += 1
                continue
        if dedup:
            key = tuple((x[f].tobytes() if structured else canon(get(x, f))) for f in dedup)
            if key in seen:
                dups += 1
                continue
            seen.add(key)
        keep.append(i)
    return np.array(keep, dtype=np.intp), filtered, dups

print('ok', np.__version__)
for merged, limit in zip(pairs[::2], pairs[1::2]):
    keep, filtered, dups = select(int(limit))
    want = concat[keep]
    got = np.load(merged, allow_pickle=True)
    assert got.dtype == want.dtype, (merged, got.dtype, want.dtype)
    assert got.shape == want.shape, (merged, got.shape, want.shape)
    if want.dtype == object:
        for i, (x, y) in enumerate(zip(got, want)):
            assert eq(x, y), (merged, i, x, y)
        # Objects shared between kept elements (whole dicts, the round's `tags` list) still are.
        assert partition(got) == partition(want), merged
        if len(want) and isinstance(want[0], dict) and 'tags' in want[0]:
            assert partition([x['tags'] for x in got]) == partition([x['tags'] for x in want])
            assert partition([x['scale'] for x in got]) == partition([x['scale'] for x in want])
    else:
        assert np.array_equal(got, want), merged
        assert got.tobytes() == want.tobytes(), merged
    print(filtered, dups)
"#;

const KEPT: &str = r#"
import sys, numpy as np
a = np.load(sys.argv[1], allow_pickle=True)
print(sum(1 for x in a if float(np.asarray(x[sys.argv[2]]).reshape(-1)[0]) <= float(sys.argv[3])))
"#;

fn python() -> String {
    pyhelp::interpreter()
}

struct Env {
    dir: tempfile::TempDir,
    pys: Vec<String>,
    gen_py: PathBuf,
    check: PathBuf,
    kept: PathBuf,
    merges: std::cell::Cell<u32>,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Env {
        gen_py: write("gen.py", GEN),
        check: write("check.py", CHECK),
        kept: write("kept.py", KEPT),
        pys: pythons(),
        merges: Default::default(),
        dir,
    }
}

impl Env {
    /// Writes rounds `<prefix>0..` of the given sizes, round i by interpreter i % n.
    fn rounds(&self, kind: &str, prefix: &str, sizes: &[u64]) -> Vec<PathBuf> {
        for (j, py) in self.pys.iter().enumerate() {
            let specs: Vec<String> = sizes
                .iter()
                .enumerate()
                .filter(|(i, _)| i % self.pys.len() == j)
                .map(|(i, n)| format!("{prefix}{i}={n}"))
                .collect();
            if specs.is_empty() {
                continue;
            }
            let mut args = vec![
                self.dir.path().display().to_string(),
                kind.into(),
                (j + 1).to_string(),
            ];
            args.extend(specs);
            run(py, &self.gen_py, &args);
        }
        (0..sizes.len())
            .map(|i| self.dir.path().join(format!("{prefix}{i}.npy")))
            .collect()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Merges `rounds` at each limit (twice, checking the bytes agree), then has every
    /// interpreter compare the outputs with its own selection and the summaries' counts.
    fn check(&self, rounds: &[PathBuf], filter: Option<&str>, dedup: &[&str], limits: &[u64]) {
        let counts: Vec<u64> = rounds
            .iter()
            .map(|r| npy::inspect_path(r).unwrap().count)
            .collect();
        let filter = filter.map(|f| Filter::parse(f).unwrap());
        let mut args = vec![rounds.len().to_string()];
        args.extend(rounds.iter().map(|r| r.display().to_string()));
        match &filter {
            Some(f) => {
                let op = f.to_string();
                let parts: Vec<&str> = op.split(' ').collect();
                args.extend([f.field.clone(), parts[1].into(), f.value.to_string()]);
            }
            None => args.extend(["-".into(), "-".into(), "-".into()]),
        }
        args.push(if dedup.is_empty() {
            "-".into()
        } else {
            dedup.join(",")
        });
        let mut summaries = Vec::new();
        for &limit in limits {
            let options = MergeOptions {
                limit,
                filter: filter.clone(),
                dedup: dedup.iter().map(|s| s.to_string()).collect(),
                video_files_size_in_mb: None,
            };
            self.merges.set(self.merges.get() + 1);
            let tag = format!("merge{}-{limit}", self.merges.get());
            let out = self.path(&format!("{tag}-merged.npy"));
            let again = self.path(&format!("{tag}-again.npy"));
            let s = npy::merge_dataset(rounds, &counts, &options, &out).unwrap();
            let s2 = npy::merge_dataset(rounds, &counts, &options, &again).unwrap();
            assert_eq!(s, s2);
            let bytes = std::fs::read(&out).unwrap();
            assert_eq!(bytes, std::fs::read(&again).unwrap(), "not deterministic");
            assert_eq!(s.bytes_written, bytes.len() as u64);
            let info = npy::inspect_path(&out).unwrap();
            assert_eq!(info.count, s.samples);
            summaries.push(s);
            args.push(out.display().to_string());
            args.push(limit.to_string());
        }
        for py in &self.pys {
            let said = run(py, &self.check, &args);
            let mut lines = said.lines();
            let head = lines.next().unwrap_or_default();
            assert!(head.starts_with("ok"), "{said}");
            for (s, line) in summaries.iter().zip(lines) {
                let want: Vec<u64> = line
                    .split_whitespace()
                    .map(|x| x.parse().unwrap())
                    .collect();
                assert_eq!(vec![s.filtered, s.duplicates], want, "{py}: {s:?}");
            }
            eprintln!("{py}: {head}: {summaries:?}");
        }
    }
}

#[test]
fn grasp_rounds_filter_and_dedup_like_numpy() {
    let e = env();
    // 1500 and 1201 pickle as several 1000-element batches (1201 ends in a lone APPEND).
    let rounds = e.rounds("grasp", "g", &[1500, 7, 0, 1201, 1, 40]);
    let limits = [0, 1, 5, 300, 700, 1000, 100_000];
    e.check(&rounds, Some("E_pen <= 0.5"), &["qpos"], &limits);
    e.check(&rounds, Some("E_pen <= 0.5"), &[], &[3, 100_000]);
    e.check(&rounds, None, &["qpos", "scale"], &[10, 100_000]);
    e.check(&rounds, Some("valid == 1"), &[], &[100_000]);
    e.check(&rounds, Some("qpos.WRJTx > 3"), &["hand_pose"], &[100_000]);
    // Everything filtered out: an empty array numpy loads.
    e.check(&rounds, Some("E_pen < -1"), &[], &[100_000]);

    // The shared objects really come from the element the filter drops.
    let counts: Vec<u64> = rounds
        .iter()
        .map(|r| npy::inspect_path(r).unwrap().count)
        .collect();
    let plain = e.path("unfiltered.npy");
    let opts = MergeOptions {
        limit: 100_000,
        ..Default::default()
    };
    let unfiltered = npy::merge_dataset(&rounds, &counts, &opts, &plain).unwrap();
    assert_eq!((unfiltered.filtered, unfiltered.duplicates), (0, 0));
    let all = npy::inspect_dataset(&plain, Some(&Filter::parse("E_pen < 100").unwrap())).unwrap();
    let low = npy::inspect_dataset(&plain, Some(&Filter::parse("E_pen <= 0.5").unwrap())).unwrap();
    assert_eq!(all.kept, all.count);
    let said = run(
        &python(),
        &e.kept,
        &[plain.display().to_string(), "E_pen".into(), "0.5".into()],
    );
    assert_eq!(low.kept, said.trim().parse::<u64>().unwrap());
    assert!(low.kept < low.count && low.kept > 0);
}

#[test]
fn dropped_elements_that_define_shared_memo_entries() {
    let e = env();
    // Element 0 of each round (dropped) writes every key, dtype and the shared scalar and
    // list; the middle element (dropped) writes the first float16 and its dtype, which later
    // kept elements share.
    let rounds = e.rounds("late", "l", &[9, 30, 1203]);
    e.check(&rounds, Some("E_pen <= 0.9"), &[], &[2, 5, 100_000]);
    e.check(&rounds, Some("E_pen <= 0.9"), &["qpos"], &[100_000]);
    // Dropping them costs little: the output is much smaller than an unfiltered one.
    let counts: Vec<u64> = rounds
        .iter()
        .map(|r| npy::inspect_path(r).unwrap().count)
        .collect();
    let opts = |filter: Option<&str>| MergeOptions {
        limit: 100_000,
        filter: filter.map(|f| Filter::parse(f).unwrap()),
        dedup: Vec::new(),
        video_files_size_in_mb: None,
    };
    let full = npy::merge_dataset(&rounds, &counts, &opts(None), &e.path("full.npy")).unwrap();
    let few = npy::merge_dataset(
        &rounds,
        &counts,
        &opts(Some("E_pen <= 0.05")),
        &e.path("few.npy"),
    )
    .unwrap();
    assert!(
        few.samples > 0 && few.samples * 10 < full.samples,
        "{few:?}"
    );
    assert!(
        few.bytes_written * 5 < full.bytes_written,
        "{few:?} vs {full:?}"
    );
}

#[test]
fn structured_arrays_filter_on_fields_and_dedup_on_bytes() {
    let e = env();
    let rounds = e.rounds("struct", "s", &[50, 0, 33]);
    e.check(&rounds, Some("meta.e > 0.3"), &["qpos"], &[0, 10, 1000]);
    e.check(&rounds, Some("n >= 0"), &[], &[1000]);
    e.check(&rounds, Some("meta.ok == 1"), &["qpos", "meta"], &[1000]);
    e.check(&rounds, None, &["name"], &[1000]);

    let counts = [50u64, 0, 33];
    let fails = |filter: &str, dedup: &[&str]| -> String {
        let options = MergeOptions {
            limit: 100,
            filter: Some(Filter::parse(filter).unwrap()),
            dedup: dedup.iter().map(|s| s.to_string()).collect(),
            video_files_size_in_mb: None,
        };
        let out = e.path("bad.npy");
        let _ = std::fs::remove_file(&out);
        match npy::merge_dataset(&rounds, &counts, &options, &out).unwrap_err() {
            DatasetError::Filter { path, reason } => format!("{path}: {reason}"),
            other => panic!("{other}"),
        }
    };
    let m = fails("name > 1", &[]);
    assert!(
        m.contains("field name is '|S4', not a scalar number"),
        "{m}"
    );
    let m = fails("qpos > 1", &[]);
    assert!(m.contains("with 3 elements"), "{m}");
    let m = fails("nope > 1", &[]);
    assert!(m.contains("no field nope") && m.contains("meta.e"), "{m}");
    let m = fails("n > 1", &["zz"]);
    assert!(m.contains("de-duplication field zz"), "{m}");

    let plain = e.rounds("plain", "p", &[4]);
    let info = npy::inspect_dataset(&plain[0], Some(&Filter::parse("x < 1").unwrap()));
    match info.unwrap_err() {
        DatasetError::Filter { path, reason } => {
            assert!(path.ends_with("p0.npy"), "{path}");
            assert!(
                reason.contains("plain <f4 array, which has no fields"),
                "{reason}"
            );
        }
        other => panic!("{other}"),
    }
    let kept = npy::inspect_dataset(&rounds[0], Some(&Filter::parse("meta.e > 0.3").unwrap()))
        .unwrap()
        .kept;
    let all = npy::inspect_dataset(&rounds[0], None).unwrap();
    assert!(kept > 0 && kept < all.count, "{kept}");
}

#[test]
fn filter_errors_name_the_element_and_field() {
    let e = env();
    for (kind, needle) in [
        (
            "bad_missing",
            "no key 'E_pen' (keys: E_dis, energy, hand_pose",
        ),
        ("bad_str", "the value is a str, not a number"),
        (
            "bad_array",
            "a numpy array of 3 elements of dtype <f8 (only 0-d and 1-element arrays compare)",
        ),
    ] {
        let rounds = e.rounds(kind, kind, &[6]);
        let f = Filter::parse("E_pen < 1").unwrap();
        let inspected = npy::inspect_dataset(&rounds[0], Some(&f)).unwrap_err();
        if kind == "bad_missing" {
            // inspect checks key sets before it filters.
            assert!(
                inspected.to_string().contains("missing [E_pen]"),
                "{inspected}"
            );
        }
        for err in [
            inspected,
            npy::merge_dataset(
                &rounds,
                &[6],
                &MergeOptions {
                    limit: 10,
                    filter: Some(f.clone()),
                    dedup: Vec::new(),
                    video_files_size_in_mb: None,
                },
                &e.path(&format!("{kind}-out.npy")),
            )
            .unwrap_err(),
        ] {
            match err {
                DatasetError::Npy(e) if kind == "bad_missing" => {
                    assert!(e.to_string().contains("missing [E_pen]"), "{e}")
                }
                DatasetError::Filter { path, reason } => {
                    assert!(path.ends_with(&format!("{kind}0.npy: element 3")), "{path}");
                    assert!(reason.contains(needle), "{kind}: {reason}");
                    assert!(reason.contains("E_pen < 1"), "{reason}");
                }
                other => panic!("{kind}: {other}"),
            }
        }
    }
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
        self.values.push((i, field.into(), values.to_vec()));
    }
    fn problem(&mut self, path: &str, reason: &str) {
        self.problems.push((path.into(), reason.into()));
    }
}

#[test]
fn examine_reports_numeric_fields_and_problems() {
    let e = env();
    let obj = e.rounds("examine", "x", &[5]);
    let mut seen = Seen::default();
    assert_eq!(npy::examine_dataset(&obj[0], &mut seen).unwrap(), 5);
    assert_eq!(seen.samples, [0, 1, 2, 3, 4]);
    let of = |i: u64| -> Vec<(String, Vec<f64>)> {
        seen.values
            .iter()
            .filter(|v| v.0 == i)
            .map(|v| (v.1.clone(), v.2.clone()))
            .collect()
    };
    let s = |x: &str| x.to_string();
    assert_eq!(
        of(4),
        [
            (s("a"), vec![4.0]),
            (s("b.c"), vec![2.0]),
            (s("b.d"), vec![4.0, 5.0]),
            (s("f"), vec![1.0, 2.5]),
        ]
    );
    assert!(of(3).is_empty());
    let file = obj[0].display().to_string();
    assert_eq!(
        seen.problems,
        [
            (format!("{file}: element 1: a"), s("NaN")),
            (format!("{file}: element 2: b.c"), s("an infinite value")),
            (
                format!("{file}: element 3"),
                s("it is a int, element 0 is a dict")
            ),
        ]
    );

    let st = e.rounds("struct", "t", &[3]);
    let mut seen = Seen::default();
    assert_eq!(npy::examine_dataset(&st[0], &mut seen).unwrap(), 3);
    let fields: Vec<&str> = seen
        .values
        .iter()
        .filter(|v| v.0 == 2)
        .map(|v| v.1.as_str())
        .collect();
    assert_eq!(fields, ["E_pen", "qpos", "meta.ok", "meta.e", "n"]);
    let n: Vec<f64> = seen
        .values
        .iter()
        .filter(|v| v.1 == "n")
        .map(|v| v.2[0])
        .collect();
    assert_eq!(n, [-3.0, -2.0, -1.0]);
    assert!(seen.problems.is_empty());

    let plain = e.rounds("plain", "q", &[2]);
    let mut seen = Seen::default();
    assert_eq!(npy::examine_dataset(&plain[0], &mut seen).unwrap(), 2);
    assert_eq!(seen.values.len(), 2);
    assert!(seen.values.iter().all(|v| v.1 == "value" && v.2.len() == 2));
}
