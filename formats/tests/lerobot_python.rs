//! Cross-checks `quarry_formats::lerobot` against rounds written by LeRobot's own writer
//! (`tests/fixtures/lerobot`, made by `make_fixtures.py` with lerobot 0.4.4): finals merged
//! here are read back by pyarrow (row counts, contiguous indices, task indices, every frame's
//! values equal to its round's) and PyAV (every video frame of every kept episode decodes
//! equal to its round's), and their `stats.json` is compared with lerobot's own
//! `aggregate_stats` of the same rounds. Hostile rounds get errors, never panics.
//!
//! Needs a Python with pyarrow and av (`QUARRY_TEST_PYTHON`); fails, never skips, without.
#![allow(clippy::unwrap_used)] // test code may unwrap

mod pyhelp;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use pyhelp::{copy_tree, python, run_code};
use quarry_formats::{DatasetError, Format, MergeOptions};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lerobot")
}

fn rounds() -> Vec<PathBuf> {
    (0..3)
        .map(|r| fixtures().join(format!("rounds/r{r}")))
        .collect()
}

fn merge(inputs: &[PathBuf], limit: u64, out: &Path) -> Result<u64, DatasetError> {
    let counts = vec![0; inputs.len()];
    let o = MergeOptions {
        limit,
        ..Default::default()
    };
    quarry_formats::merge(Format::Lerobot, inputs, &counts, &o, out).map(|s| s.samples)
}

/// argv: final root, optionally `--src=I,J,...` (the final's episodes are the rounds'
/// episodes number I, J, ... counted across the rounds in order; without it, their first
/// ones), then the round roots in order. Checks the final against the rounds and prints
/// `ok <episodes> <frames> <video frames compared>`.
const CHECK: &str = r#"
import sys, json, glob, os
import pyarrow.parquet as pq
import av, numpy as np

final, rounds = sys.argv[1], sys.argv[2:]
pick = None
if rounds and rounds[0].startswith('--src='):
    pick = [int(x) for x in rounds[0][6:].split(',') if x]
    rounds = rounds[1:]

def table(root, pattern):
    files = sorted(glob.glob(os.path.join(root, pattern)))
    rows = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
    return rows

def tasks(root):
    t = pq.read_table(os.path.join(root, 'meta/tasks.parquet')).to_pydict()
    return {int(i): name for name, i in zip(t['__index_level_0__'], t['task_index'])}

def frames(root, key, chunk, file, t0, t1):
    path = os.path.join(root, f'videos/{key}/chunk-{chunk:03d}/file-{file:03d}.mp4')
    out = []
    with av.open(path) as c:
        for fr in c.decode(video=0):
            t = float(fr.pts * fr.time_base)
            if t0 - 1e-4 <= t < t1 - 1e-4:
                out.append(fr.to_ndarray(format='rgb24'))
    return out

info = json.load(open(os.path.join(final, 'meta/info.json')))
eps = table(final, 'meta/episodes/chunk-*/file-*.parquet')
data = table(final, 'data/chunk-*/file-*.parquet')
ftasks = tasks(final)
assert info['total_episodes'] == len(eps), (info['total_episodes'], len(eps))
assert info['total_frames'] == len(data), (info['total_frames'], len(data))
assert info['total_tasks'] == len(ftasks)
assert info['splits'] == {'train': f'0:{len(eps)}'}, info['splits']
assert [r['index'] for r in data] == list(range(len(data))), 'index not contiguous'
assert sorted(ftasks) == list(range(len(ftasks)))
assert b'huggingface' in (pq.read_schema(glob.glob(os.path.join(final, 'data/*/*.parquet'))[0]).metadata or {}), 'huggingface metadata lost'

# Source episodes in round order, the final's episodes must be their prefix.
src = []
for r in rounds:
    for e in table(r, 'meta/episodes/chunk-*/file-*.parquet'):
        src.append((r, e))
if pick is not None:
    assert len(pick) == len(eps), (pick, len(eps))
    src = [src[i] for i in pick]
assert len(eps) <= len(src)
video_keys = [k for k, f in info['features'].items() if f['dtype'] == 'video']
compared = 0
pos = 0
for i, e in enumerate(eps):
    r, s = src[i]
    assert e['episode_index'] == i, (e['episode_index'], i)
    assert e['dataset_from_index'] == pos and e['dataset_to_index'] == pos + e['length']
    assert e['length'] == s['length'] and e['tasks'] == s['tasks']
    for k, v in s.items():
        if k.startswith('stats/'):
            assert e[k] == v, k
    rows = data[e['dataset_from_index']:e['dataset_to_index']]
    stasks = tasks(r)
    sdata = table(r, 'data/chunk-*/file-*.parquet')[s['dataset_from_index']:s['dataset_to_index']]
    for a, b in zip(rows, sdata):
        assert a['episode_index'] == i
        assert ftasks[a['task_index']] == stasks[b['task_index']]
        for k in a:
            if k not in ('episode_index', 'index', 'task_index'):
                assert a[k] == b[k], (k, a[k], b[k])
    df = f"data/chunk-{e['data/chunk_index']:03d}/file-{e['data/file_index']:03d}.parquet"
    assert os.path.exists(os.path.join(final, df)), df
    for key in video_keys:
        p = f'videos/{key}/'
        got = frames(final, key, e[p + 'chunk_index'], e[p + 'file_index'], e[p + 'from_timestamp'], e[p + 'to_timestamp'])
        want = frames(r, key, s[p + 'chunk_index'], s[p + 'file_index'], s[p + 'from_timestamp'], s[p + 'to_timestamp'])
        assert len(got) == len(want) == e['length'], (len(got), len(want), e['length'])
        for a, b in zip(got, want):
            assert np.array_equal(a, b)
            compared += 1
    pos += e['length']
print('ok', len(eps), len(data), compared)
"#;

fn check_with_python(out: &Path, inputs: &[PathBuf]) -> String {
    let py = python(&["pyarrow", "av", "numpy"]);
    let mut args = vec![out.display().to_string()];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    run_code(&py, CHECK, &args)
}

#[test]
fn merged_fixtures_read_back_with_pyarrow_and_pyav() {
    let t = tempfile::tempdir().unwrap();
    let all = t.path().join("all");
    assert_eq!(merge(&rounds(), 100, &all).unwrap(), 7);
    let said = check_with_python(&all, &rounds());
    assert_eq!(said.trim(), "ok 7 35 35", "{said}");
    // Cut at the quota inside round 1: its first two episodes only (its video cut after
    // their frames: see video_files_lose_the_frames_of_their_trailing_dropped_episodes).
    let cut = t.path().join("cut");
    assert_eq!(merge(&rounds(), 4, &cut).unwrap(), 4);
    let said = check_with_python(&cut, &rounds());
    assert_eq!(said.trim(), "ok 4 22 22", "{said}");
    // Each round's files land under their own file index, in round order.
    for f in ["000", "001", "002"] {
        assert!(
            all.join(format!("data/chunk-000/file-{f}.parquet"))
                .is_file()
        );
        assert!(
            all.join(format!(
                "videos/observation.images.cam/chunk-000/file-{f}.mp4"
            ))
            .is_file()
        );
    }
    assert_eq!(
        std::fs::read(all.join("videos/observation.images.cam/chunk-000/file-001.mp4")).unwrap(),
        std::fs::read(rounds()[1].join("videos/observation.images.cam/chunk-000/file-000.mp4"))
            .unwrap(),
        "videos are copied, never re-encoded"
    );
    // A final is itself a round Quarry accepts, with the episodes counted.
    let i = quarry_formats::inspect(Format::Lerobot, &all, None).unwrap();
    assert_eq!(i.count, 7);
    assert_eq!(
        i.schema,
        quarry_formats::inspect(Format::Lerobot, &rounds()[0], None)
            .unwrap()
            .schema
    );
    assert_eq!(Format::detect(&all), Some(Format::Lerobot));
}

/// Numbers equal to float precision, integers exactly, the same keys.
fn assert_close(got: &Value, want: &Value, at: &str) {
    match (got, want) {
        (Value::Object(a), Value::Object(b)) => {
            let mut ka: Vec<_> = a.keys().collect();
            let mut kb: Vec<_> = b.keys().collect();
            ka.sort();
            kb.sort();
            assert_eq!(ka, kb, "keys at {at}");
            for (k, v) in b {
                assert_close(&a[k], v, &format!("{at}.{k}"));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "length at {at}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_close(x, y, &format!("{at}[{i}]"));
            }
        }
        (Value::Number(x), Value::Number(y)) => {
            if y.is_i64() {
                assert_eq!(x.as_i64(), y.as_i64(), "integer at {at}");
            }
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                "{at}: {x} vs lerobot's {y}"
            );
        }
        _ => panic!("{at}: {got} vs lerobot's {want}"),
    }
}

fn json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn merged_stats_equal_lerobots_aggregate_stats() {
    let t = tempfile::tempdir().unwrap();
    let all = t.path().join("all");
    merge(&rounds(), 100, &all).unwrap();
    assert_close(
        &json(&all.join("meta/stats.json")),
        &json(&fixtures().join("expected/stats_all.json")),
        "stats",
    );
    let cut = t.path().join("cut");
    merge(&rounds(), 4, &cut).unwrap();
    assert_close(
        &json(&cut.join("meta/stats.json")),
        &json(&fixtures().join("expected/stats_cut4.json")),
        "stats",
    );
}

/// A copy of round `r` to spoil.
fn copy_round(t: &Path, r: usize) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let to = t.join(format!("bad{r}_{n}"));
    copy_tree(&rounds()[r], &to);
    to
}

fn edit_info(root: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let p = root.join("meta/info.json");
    let mut v: serde_json::Map<String, Value> =
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// Rewrites an int64 column of the round's episode table.
fn edit_episodes(root: &Path, column: &str, f: impl Fn(usize, i64) -> i64) {
    let p = root.join("meta/episodes/chunk-000/file-000.parquet");
    let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
    let schema = batches[0].schema();
    let i = schema.index_of(column).unwrap();
    let mut w = ArrowWriter::try_new(File::create(&p).unwrap(), schema.clone(), None).unwrap();
    let mut row = 0;
    for b in batches {
        let col = b
            .column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .clone();
        let v: Vec<i64> = col
            .values()
            .iter()
            .map(|x| {
                row += 1;
                f(row - 1, *x)
            })
            .collect();
        let mut cols: Vec<ArrayRef> = b.columns().to_vec();
        cols[i] = Arc::new(Int64Array::from(v));
        w.write(&RecordBatch::try_new(schema.clone(), cols).unwrap())
            .unwrap();
    }
    w.close().unwrap();
}

fn inspect_err(root: &Path) -> String {
    quarry_formats::inspect(Format::Lerobot, root, None)
        .unwrap_err()
        .to_string()
}

#[test]
fn rounds_lying_in_info_json_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let r = copy_round(t.path(), 0);
    edit_info(&r, |v| {
        v.insert("total_episodes".into(), 3.into());
    });
    let e = inspect_err(&r);
    assert!(
        e.contains("meta/info.json") && e.contains("total_episodes is 3 but meta/episodes lists 2"),
        "{e}"
    );
    let out = t.path().join("out");
    let e = merge(&[rounds()[1].clone(), r.clone()], 100, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("total_episodes is 3"), "{e}");

    // A huge count is refused before anything is sized by it.
    let r = copy_round(t.path(), 1);
    edit_info(&r, |v| {
        v.insert("total_frames".into(), 1_000_000_000_000_000i64.into());
    });
    let e = inspect_err(&r);
    assert!(
        e.contains("total_frames is 1000000000000000, outside"),
        "{e}"
    );

    // Another version, or no version.
    let r = copy_round(t.path(), 2);
    edit_info(&r, |v| {
        v.insert("codebase_version".into(), "v2.1".into());
    });
    let e = inspect_err(&r);
    assert!(e.contains("codebase_version is \"v2.1\""), "{e}");
    edit_info(&r, |v| {
        v.remove("codebase_version");
    });
    assert!(inspect_err(&r).contains("codebase_version is missing"));
    // Not a dataset root at all.
    let e = inspect_err(&r.join("meta"));
    assert!(
        e.contains("no meta/info.json") && e.contains("generator.output"),
        "{e}"
    );
}

#[test]
fn episode_tables_pointing_at_missing_files_or_rows_are_refused() {
    let t = tempfile::tempdir().unwrap();
    // An episode in a data file that is not there.
    let r = copy_round(t.path(), 0);
    edit_episodes(&r, "data/file_index", |row, v| if row == 1 { 7 } else { v });
    let e = inspect_err(&r);
    assert!(e.contains("data/chunk-000/file-007.parquet"), "{e}");
    let out = t.path().join("o1");
    assert!(merge(&[r], 100, &out).is_err());

    // An episode whose video file is not there.
    let r = copy_round(t.path(), 1);
    edit_episodes(&r, "videos/observation.images.cam/file_index", |row, v| {
        if row == 2 { 3 } else { v }
    });
    let e = inspect_err(&r);
    assert!(
        e.contains("videos/observation.images.cam/chunk-000/file-003.mp4")
            && e.contains("cannot be opened"),
        "{e}"
    );

    // An episode claiming rows past the end of its data file (length and range agree, the
    // totals too: only the data file tells).
    let r = copy_round(t.path(), 2);
    edit_episodes(&r, "length", |row, v| if row == 1 { v + 3 } else { v });
    edit_episodes(
        &r,
        "dataset_to_index",
        |row, v| if row == 1 { v + 3 } else { v },
    );
    edit_info(&r, |v| {
        let n = v["total_frames"].as_i64().unwrap();
        v.insert("total_frames".into(), (n + 3).into());
    });
    let e = inspect_err(&r);
    assert!(
        e.contains("data/chunk-000/file-000.parquet")
            && e.contains("episode 1 has 4 rows but meta/episodes says length 7"),
        "{e}"
    );
    let out = t.path().join("o2");
    let e = merge(&[rounds()[0].clone(), r], 100, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("episode 1 has 4 rows"), "{e}");

    // Ranges that disagree with the length, or overlap the previous episode's.
    let r = copy_round(t.path(), 1);
    edit_episodes(
        &r,
        "dataset_from_index",
        |row, v| if row == 1 { v - 1 } else { v },
    );
    let e = inspect_err(&r);
    assert!(e.contains("episode 1") && e.contains("do not agree"), "{e}");
    // Huge indices.
    let r = copy_round(t.path(), 0);
    edit_episodes(&r, "length", |_, _| i64::MAX);
    let e = inspect_err(&r);
    assert!(e.contains("episode 0") && e.contains("do not agree"), "{e}");
}

#[test]
fn rounds_that_record_differently_do_not_merge() {
    let t = tempfile::tempdir().unwrap();
    let r = copy_round(t.path(), 1);
    edit_info(&r, |v| {
        v.insert("fps".into(), 30.into());
    });
    let out = t.path().join("out");
    let e = merge(&[rounds()[0].clone(), r], 100, &out).unwrap_err();
    match &e {
        DatasetError::Mismatch { input, what } => {
            assert_eq!(*input, 1);
            assert!(
                what.contains("meta/info.json fps is 30 in this round but 10 in round 0"),
                "{what}"
            );
        }
        other => panic!("{other}"),
    }
    let r = copy_round(t.path(), 2);
    edit_info(&r, |v| {
        v.insert("robot_type".into(), "otherarm".into());
    });
    let out = t.path().join("out2");
    let e = merge(&[rounds()[0].clone(), rounds()[1].clone(), r], 100, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("input 2") && e.contains("robot_type"), "{e}");
}

fn merge_with(
    inputs: &[PathBuf],
    limit: u64,
    filter: Option<&str>,
    dedup: &[&str],
    out: &Path,
) -> Result<quarry_formats::MergeSummary, DatasetError> {
    let o = MergeOptions {
        limit,
        filter: filter.map(|f| quarry_formats::Filter::parse(f).unwrap()),
        dedup: dedup.iter().map(|d| d.to_string()).collect(),
        video_files_size_in_mb: None,
    };
    quarry_formats::merge(Format::Lerobot, inputs, &vec![0; inputs.len()], &o, out)
}

fn check_picked(out: &Path, picked: &[usize], inputs: &[PathBuf]) -> String {
    let py = python(&["pyarrow", "av", "numpy"]);
    let mut args = vec![out.display().to_string()];
    let list: Vec<String> = picked.iter().map(usize::to_string).collect();
    args.push(format!("--src={}", list.join(",")));
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    run_code(&py, CHECK, &args)
}

/// argv: the rounds in order, then `--src=I,J,...` as for CHECK, where `rN` stands for round
/// N whole. Prints, as JSON, the statistics of those parts combined (an episode's from its
/// per-episode `stats/...` columns, a whole round's from its `meta/stats.json`) with lerobot
/// 0.4.4's `aggregate_stats` formulas (compute_stats.py, transcribed).
const AGGREGATE: &str = r#"
import sys, json, glob, os
import pyarrow.parquet as pq
import numpy as np

rounds = [a for a in sys.argv[1:] if not a.startswith('--src=')]
pick = [x for a in sys.argv[1:] if a.startswith('--src=') for x in a[6:].split(',')]
src = []
for r in rounds:
    for f in sorted(glob.glob(os.path.join(r, 'meta/episodes/chunk-*/file-*.parquet'))):
        src += pq.read_table(f).to_pylist()
parts = []
for i in pick:
    if i.startswith('r'):
        st = json.load(open(os.path.join(rounds[int(i[1:])], 'meta/stats.json')))
        parts.append({ft: {k: np.asarray(v, dtype=np.float64) for k, v in d.items()} for ft, d in st.items()})
        continue
    st = {}
    for k, v in src[int(i)].items():
        if k.startswith('stats/'):
            ft, name = k[6:].rsplit('/', 1)
            st.setdefault(ft, {})[name] = np.asarray(v, dtype=np.float64)
    parts.append(st)
out = {}
for ft in parts[0]:
    ps = [p[ft] for p in parts]
    means = np.stack([p['mean'] for p in ps])
    variances = np.stack([p['std'] ** 2 for p in ps])
    counts = np.stack([p['count'] for p in ps])
    total = counts.sum(axis=0)
    while counts.ndim < means.ndim:
        counts = np.expand_dims(counts, axis=-1)
    mean = (means * counts).sum(axis=0) / total
    var = ((variances + (means - mean) ** 2) * counts).sum(axis=0) / total
    agg = {
        'min': np.min(np.stack([p['min'] for p in ps]), axis=0),
        'max': np.max(np.stack([p['max'] for p in ps]), axis=0),
        'mean': mean, 'std': np.sqrt(var), 'count': total,
    }
    for q in [k for k in ps[0] if k.startswith('q')]:
        agg[q] = (np.stack([p[q] for p in ps]) * counts).sum(axis=0) / total
    out[ft] = {k: v.tolist() for k, v in agg.items()}
print(json.dumps(out))
"#;

fn aggregate_of(inputs: &[PathBuf], picked: &[usize]) -> Value {
    let list: Vec<String> = picked.iter().map(usize::to_string).collect();
    aggregate_parts(inputs, &list.join(","))
}

fn aggregate_parts(inputs: &[PathBuf], parts: &str) -> Value {
    let py = python(&["pyarrow", "numpy"]);
    let mut args: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    args.push(format!("--src={parts}"));
    serde_json::from_str(&run_code(&py, AGGREGATE, &args)).unwrap()
}

/// Numbers within float precision; integer-valued statistics may be written as integers or
/// floats (lerobot's own writer keeps `count` and integer features' min/max as integers).
fn assert_close_num(got: &Value, want: &Value, at: &str) {
    match (got, want) {
        (Value::Object(a), Value::Object(b)) => {
            let mut ka: Vec<_> = a.keys().collect();
            let mut kb: Vec<_> = b.keys().collect();
            ka.sort();
            kb.sort();
            assert_eq!(ka, kb, "keys at {at}");
            for (k, v) in b {
                assert_close_num(&a[k], v, &format!("{at}.{k}"));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "length at {at}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_close_num(x, y, &format!("{at}[{i}]"));
            }
        }
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                "{at}: {x} vs {y}"
            );
        }
        _ => panic!("{at}: {got} vs {want}"),
    }
}

/// Episode lengths: round 0 [5, 4], round 1 [6, 7, 4], round 2 [5, 4].
#[test]
fn a_filter_on_length_keeps_exactly_the_passing_episodes() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("long");
    let s = merge_with(&rounds(), 100, Some("length >= 5"), &[], &out).unwrap();
    assert_eq!((s.samples, s.filtered, s.duplicates), (4, 3, 0));
    let said = check_picked(&out, &[0, 2, 3, 5], &rounds());
    assert_eq!(said.trim(), "ok 4 23 23", "{said}");
    // The statistics are the kept episodes' (every round lost one).
    assert_close_num(
        &json(&out.join("meta/stats.json")),
        &aggregate_of(&rounds(), &[0, 2, 3, 5]),
        "stats",
    );
    // Filtered, then cut at the quota.
    let out = t.path().join("long3");
    let s = merge_with(&rounds(), 3, Some("length > 4"), &[], &out).unwrap();
    // Counted as the streaming formats count: round 1's last episode is past the quota,
    // not filtered.
    assert_eq!((s.samples, s.filtered), (3, 1));
    let said = check_picked(&out, &[0, 2, 3], &rounds());
    assert_eq!(said.trim(), "ok 3 18 18", "{said}");
    // A filter dropping a round's every episode, and the first episode of the next.
    let out = t.path().join("short");
    let s = merge_with(&rounds(), 100, Some("length < 5"), &[], &out).unwrap();
    assert_eq!((s.samples, s.filtered), (3, 4));
    let said = check_picked(&out, &[1, 4, 6], &rounds());
    assert_eq!(said.trim(), "ok 3 12 12", "{said}");
    assert_close_num(
        &json(&out.join("meta/stats.json")),
        &aggregate_of(&rounds(), &[1, 4, 6]),
        "stats",
    );
    // inspect counts the passing episodes.
    let f = quarry_formats::Filter::parse("length >= 5").unwrap();
    let i = quarry_formats::inspect(Format::Lerobot, &rounds()[1], Some(&f)).unwrap();
    assert_eq!((i.count, i.kept), (3, 2));
}

/// A `success` column a generator adds to its episode table is a filter field.
#[test]
fn a_filter_on_an_added_episode_column() {
    let t = tempfile::tempdir().unwrap();
    let r = copy_round(t.path(), 1);
    let py = python(&["pyarrow"]);
    run_code(
        &py,
        "import sys, pyarrow as pa, pyarrow.parquet as pq\n\
         p = sys.argv[1] + '/meta/episodes/chunk-000/file-000.parquet'\n\
         t = pq.read_table(p)\n\
         t = t.append_column('success', pa.array([True, False, True]))\n\
         pq.write_table(t, p)\nprint('done')\n",
        &[r.display().to_string()],
    );
    let f = quarry_formats::Filter::parse("success == 1").unwrap();
    let i = quarry_formats::inspect(Format::Lerobot, &r, Some(&f)).unwrap();
    assert_eq!((i.count, i.kept), (3, 2));
    let out = t.path().join("ok");
    let inputs = vec![r.clone()];
    let s = merge_with(&inputs, 100, Some("success == 1"), &[], &out).unwrap();
    assert_eq!((s.samples, s.filtered), (2, 1));
    let said = check_picked(&out, &[0, 2], &inputs);
    assert_eq!(said.trim(), "ok 2 10 10", "{said}");
}

#[test]
fn dedup_on_a_frame_feature_drops_a_second_copy() {
    let t = tempfile::tempdir().unwrap();
    let again = copy_round(t.path(), 1);
    let inputs = vec![rounds()[1].clone(), again, rounds()[2].clone()];
    for fields in [&["action"][..], &["observation.state", "action"][..]] {
        let out = t.path().join(format!("d{}", fields.len()));
        let s = merge_with(&inputs, 100, None, fields, &out).unwrap();
        assert_eq!((s.samples, s.duplicates), (5, 3), "{fields:?}");
        let said = check_picked(&out, &[0, 1, 2, 6, 7], &inputs);
        assert_eq!(said.trim(), "ok 5 26 26", "{said}");
        // Round 1 whole and round 2 whole: their stats.json combined.
        let want = aggregate_parts(&inputs, "r0,r2");
        assert_close_num(&json(&out.join("meta/stats.json")), &want, "stats");
    }
    // An episode-table column: lengths 6, 7, 4 then 5, 4 (the 4 is a repeat).
    let out = t.path().join("len");
    let s = merge_with(&inputs, 100, None, &["length"], &out).unwrap();
    assert_eq!((s.samples, s.duplicates), (4, 4));
    let said = check_picked(&out, &[0, 1, 2, 6], &inputs);
    assert_eq!(said.trim(), "ok 4 22 22", "{said}");
    assert_close_num(
        &json(&out.join("meta/stats.json")),
        &aggregate_parts(&inputs, "r0,6"),
        "stats",
    );
}

#[test]
fn unknown_or_unusable_fields_are_named() {
    let t = tempfile::tempdir().unwrap();
    let f = quarry_formats::Filter::parse("nope >= 1").unwrap();
    let e = quarry_formats::inspect(Format::Lerobot, &rounds()[0], Some(&f)).unwrap_err();
    let DatasetError::Filter { path, reason } = &e else {
        panic!("{e}")
    };
    assert!(
        path.ends_with("r0/meta/episodes/chunk-000/file-000.parquet"),
        "{path}"
    );
    assert!(
        reason.contains("filter field nope") && reason.contains("length, episode_index"),
        "{reason}"
    );
    let out = t.path().join("o1");
    let e = merge_with(&rounds(), 100, Some("nope >= 1"), &[], &out).unwrap_err();
    assert!(matches!(e, DatasetError::Filter { .. }), "{e}");
    // A column that is not one number per episode.
    let f = quarry_formats::Filter::parse("tasks >= 1").unwrap();
    let e = quarry_formats::inspect(Format::Lerobot, &rounds()[0], Some(&f))
        .unwrap_err()
        .to_string();
    assert!(e.contains("filter field tasks is a column of List"), "{e}");
    let out = t.path().join("o2");
    let e = merge_with(&rounds(), 100, None, &["action", "nope.x"], &out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("de-duplication field nope.x is neither")
            && e.contains("r0/meta/episodes/chunk-000/file-000.parquet")
            && e.contains("observation.state")
            && e.contains("action"),
        "{e}"
    );
}

/// A round without episodes, as lerobot leaves it (`create` then `finalize`: `meta/info.json`
/// alone, totals 0), counts 0 and merges as nothing, first or in the middle.
#[test]
fn rounds_without_episodes_count_zero_and_merge_as_nothing() {
    let t = tempfile::tempdir().unwrap();
    let empty = t.path().join("empty");
    std::fs::create_dir_all(empty.join("meta")).unwrap();
    std::fs::copy(
        rounds()[0].join("meta/info.json"),
        empty.join("meta/info.json"),
    )
    .unwrap();
    edit_info(&empty, |v| {
        for k in ["total_episodes", "total_frames", "total_tasks"] {
            v.insert(k.into(), 0.into());
        }
        v.insert("splits".into(), serde_json::json!({}));
    });
    assert_eq!(
        quarry_formats::inspect(Format::Lerobot, &empty, None)
            .unwrap()
            .count,
        0
    );
    let inputs = vec![
        empty.clone(),
        rounds()[1].clone(),
        empty,
        rounds()[2].clone(),
    ];
    let out = t.path().join("out");
    assert_eq!(merge(&inputs, 100, &out).unwrap(), 5);
    let said = check_with_python(&out, &inputs);
    assert_eq!(said.trim(), "ok 5 26 26", "{said}");
}

/// Seeded corruption of every file of a round (bytes flipped, files cut short): inspect and
/// merge answer with an error or a count, never a panic.
#[test]
fn corrupted_rounds_are_errors_never_panics() {
    let t = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = pyhelp::tree(&rounds()[1])
        .into_keys()
        .map(PathBuf::from)
        .collect();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for case in 0..240 {
        let r = copy_round(t.path(), 1);
        let file = r.join(&files[case % files.len()]);
        let mut bytes = std::fs::read(&file).unwrap();
        if bytes.is_empty() {
            continue;
        }
        if case % 4 == 3 {
            bytes.truncate((next() as usize) % bytes.len());
        } else {
            for _ in 0..1 + next() % 8 {
                let at = (next() as usize) % bytes.len();
                bytes[at] ^= 1 << (next() % 8);
            }
        }
        std::fs::write(&file, &bytes).unwrap();
        let got = std::panic::catch_unwind(|| {
            let i = quarry_formats::inspect(Format::Lerobot, &r, None);
            let out = r.with_extension("out");
            let m = merge(&[rounds()[0].clone(), r.clone()], 100, &out);
            (i.is_err(), m.is_err())
        });
        let (i, m) = got.unwrap_or_else(|_| panic!("case {case}: {} panicked", file.display()));
        errors += usize::from(i) + usize::from(m);
        std::fs::remove_dir_all(&r).unwrap();
        let _ = std::fs::remove_dir_all(r.with_extension("out"));
    }
    assert!(errors > 100, "most corruptions are caught: {errors}");
}

/// argv: a video file of a final, the round's file it was cut from, how many frames it must
/// hold. Decodes both with PyAV; prints `ok <frames>` when the final's frames are exactly
/// the round's first ones, at the same timestamps.
const SAME_PREFIX: &str = r#"
import sys
import av, numpy as np
final, src, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def frames(p):
    with av.open(p) as c:
        return [(fr.pts, fr.to_ndarray(format='rgb24')) for fr in c.decode(video=0)]
a, b = frames(final), frames(src)
assert len(a) == n, (len(a), n, len(b))
assert len(b) > n, (len(b), n)
for (pa, x), (pb, y) in zip(a, b):
    assert pa == pb and np.array_equal(x, y), (pa, pb)
with av.open(final) as c:
    s = c.streams.video[0]
    assert s.frames in (0, n), s.frames
    d = float(s.duration * s.time_base) if s.duration else None
print('ok', len(a), d)
"#;

fn video(root: &Path, file: usize) -> PathBuf {
    root.join(format!(
        "videos/observation.images.cam/chunk-000/file-{file:03}.mp4"
    ))
}

fn same_prefix(final_file: &Path, src: &Path, n: usize) -> String {
    let py = python(&["av", "numpy"]);
    run_code(
        &py,
        SAME_PREFIX,
        &[
            final_file.display().to_string(),
            src.display().to_string(),
            n.to_string(),
        ],
    )
}

/// A video file whose last episodes are dropped keeps exactly the kept episodes' frames,
/// decoding equal to the round's; one whose dropped episode comes first is copied whole.
#[test]
fn video_files_lose_the_frames_of_their_trailing_dropped_episodes() {
    let t = tempfile::tempdir().unwrap();
    // Cut at the quota inside round 1: its first two episodes, 6 + 7 frames.
    let cut = t.path().join("cut");
    assert_eq!(merge(&rounds(), 4, &cut).unwrap(), 4);
    let said = same_prefix(&video(&cut, 1), &video(&rounds()[1], 0), 13);
    assert_eq!(
        said.split(' ').take(2).collect::<Vec<_>>(),
        ["ok", "13"],
        "{said}"
    );
    assert!(
        said.trim().ends_with("1.3"),
        "the duration is the kept frames': {said}"
    );
    let said = check_with_python(&cut, &rounds());
    assert_eq!(said.trim(), "ok 4 22 22", "{said}");
    // Round 0 whole: copied byte for byte.
    assert_eq!(
        std::fs::read(video(&cut, 0)).unwrap(),
        std::fs::read(video(&rounds()[0], 0)).unwrap()
    );
    // Filtered: every round's last episode is dropped (lengths 4), each file cut.
    let long = t.path().join("long");
    merge_with(&rounds(), 100, Some("length >= 5"), &[], &long).unwrap();
    for (f, n) in [(0, 5), (1, 13), (2, 5)] {
        let said = same_prefix(&video(&long, f), &video(&rounds()[f], 0), n);
        assert!(said.starts_with(&format!("ok {n} ")), "file {f}: {said}");
    }
    let said = check_picked(&long, &[0, 2, 3, 5], &rounds());
    assert_eq!(said.trim(), "ok 4 23 23", "{said}");
    // Round 0's first episode dropped, its last kept: the file is copied whole.
    let short = t.path().join("short");
    merge_with(&rounds(), 100, Some("length < 5"), &[], &short).unwrap();
    assert_eq!(
        std::fs::read(video(&short, 0)).unwrap(),
        std::fs::read(video(&rounds()[0], 0)).unwrap()
    );
}

/// Round 1 with its video file's bytes changed by `f`, merged with a quota cutting it.
fn merge_spoiled_video(t: &Path, f: impl FnOnce(&mut Vec<u8>)) -> String {
    let r = copy_round(t, 1);
    let p = video(&r, 0);
    let mut bytes = std::fs::read(&p).unwrap();
    f(&mut bytes);
    std::fs::write(&p, &bytes).unwrap();
    let out = r.with_extension("out");
    let got = std::panic::catch_unwind(|| merge(&[rounds()[0].clone(), r.clone()], 4, &out));
    got.expect("no panic").unwrap_err().to_string()
}

fn find_box(bytes: &[u8], typ: &[u8; 4]) -> usize {
    bytes.windows(4).position(|w| w == typ).unwrap() - 4
}

#[test]
fn hostile_video_files_are_errors_when_cut() {
    let t = tempfile::tempdir().unwrap();
    // Truncated in its mdat.
    let e = merge_spoiled_video(t.path(), |b| b.truncate(b.len() - 500));
    assert!(
        e.contains("file-000.mp4") && e.contains("\"mdat\"") && e.contains("truncated"),
        "{e}"
    );
    // Truncated inside a box header.
    let e = merge_spoiled_video(t.path(), |b| b.truncate(36));
    assert!(e.contains("file-000.mp4") && e.contains("cut short"), "{e}");
    // A box inside moov claiming more than its parent holds.
    let e = merge_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"stsd");
        b[at..at + 4].copy_from_slice(&0x7fff_fff0u32.to_be_bytes());
    });
    assert!(e.contains("box \"stsd\"") && e.contains("claims"), "{e}");
    // A top-level box bigger than the file.
    let e = merge_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"mdat");
        b[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    });
    assert!(
        e.contains("box \"mdat\"") && e.contains("claims 4294967295"),
        "{e}"
    );
    // A sample count of 2^32 - 1.
    let e = merge_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"stsz");
        b[at + 16..at + 20].copy_from_slice(&u32::MAX.to_be_bytes());
    });
    assert!(
        e.contains("stsz") && e.contains("claims 4294967295 entries"),
        "{e}"
    );
    // The same with every sample of one size: more bytes than the file.
    let e = merge_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"stsz");
        b[at + 12..at + 16].copy_from_slice(&7u32.to_be_bytes());
        b[at + 16..at + 20].copy_from_slice(&u32::MAX.to_be_bytes());
    });
    assert!(
        e.contains("stsz claims 4294967295 samples of 7 bytes"),
        "{e}"
    );
    // A chunk offset pointing past mdat.
    let e = merge_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"stco");
        b[at + 16..at + 20].copy_from_slice(&0x00ff_0000u32.to_be_bytes());
    });
    assert!(e.contains("lies outside mdat"), "{e}");
}

/// Seeded corruption of the video file of the round cut at the quota (bytes flipped in its
/// boxes' headers and tables, the file cut short): the merge trims it, copies it whole or
/// answers an error, never panics.
#[test]
fn corrupted_video_files_are_errors_never_panics_when_cut() {
    let t = tempfile::tempdir().unwrap();
    let orig = std::fs::read(video(&rounds()[1], 0)).unwrap();
    // The moov box: where the tables are.
    let moov = find_box(&orig, b"moov");
    let moov_end = moov + u32::from_be_bytes(orig[moov..moov + 4].try_into().unwrap()) as usize;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for case in 0..300 {
        let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let r = copy_round(t.path(), 1);
            let mut b = orig.clone();
            if case % 5 == 4 {
                b.truncate((next() as usize) % b.len());
            } else {
                for _ in 0..1 + next() % 4 {
                    let at = moov + (next() as usize) % (moov_end - moov);
                    b[at] = match next() % 3 {
                        0 => 0xff,
                        1 => 0,
                        _ => b[at] ^ (1 << (next() % 8)),
                    };
                }
            }
            std::fs::write(video(&r, 0), &b).unwrap();
            let out = r.with_extension("out");
            let m = merge(&[rounds()[0].clone(), r.clone()], 4, &out);
            std::fs::remove_dir_all(&r).unwrap();
            let _ = std::fs::remove_dir_all(&out);
            m.is_err()
        }));
        errors += usize::from(e.unwrap_or_else(|_| panic!("case {case} panicked")));
    }
    assert!(errors > 50, "most corruptions are caught: {errors}");
}

/// argv: a round's AV1 video file, the H.264 file to write: the same frames at the same
/// timestamps, with B-frames (decode order differs from presentation order: `ctts`, and an
/// edit list shifting the start), `moov` after `mdat`, as ffmpeg writes by default.
const TO_H264: &str = r#"
import sys
import av
src, dst = sys.argv[1], sys.argv[2]
frames = [f.to_ndarray(format='rgb24') for f in av.open(src).decode(video=0)]
out = av.open(dst, 'w')
s = out.add_stream('libx264', rate=10)
s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], 'yuv420p'
s.options = {'bf': '2', 'g': '4'}
for i, a in enumerate(frames):
    f = av.VideoFrame.from_ndarray(a, format='rgb24')
    f.pts = i
    for p in s.encode(f):
        out.mux(p)
for p in s.encode():
    out.mux(p)
out.close()
print('ok', len(frames))
"#;

/// A video with B-frames is cut after the last sample, in decode order, presented before the
/// cut: the kept frames decode, equal to the round's.
#[test]
fn video_files_with_b_frames_are_cut_in_decode_order() {
    let t = tempfile::tempdir().unwrap();
    let r = copy_round(t.path(), 1);
    let py = python(&["av"]);
    let said = run_code(
        &py,
        TO_H264,
        &[
            video(&rounds()[1], 0).display().to_string(),
            video(&r, 0).display().to_string(),
        ],
    );
    assert_eq!(said.trim(), "ok 17", "{said}");
    let bytes = std::fs::read(video(&r, 0)).unwrap();
    assert!(bytes.windows(4).any(|w| w == b"ctts"), "B-frames written");
    let inputs = vec![rounds()[0].clone(), r.clone()];
    // Round 1's first two episodes (13 frames), then its first (6 frames).
    for (limit, frames, rows) in [(4, 13, 22), (3, 6, 15)] {
        let out = t.path().join(format!("h264_{limit}"));
        assert_eq!(merge(&inputs, limit, &out).unwrap(), limit);
        let said = same_prefix(&video(&out, 1), &video(&r, 0), frames);
        assert!(said.starts_with(&format!("ok {frames} ")), "{said}");
        let said = check_with_python(&out, &inputs);
        assert_eq!(said.trim(), format!("ok {limit} {rows} {rows}"), "{said}");
    }
}

/// Everything `examine` reported: per sample its fields (values of repeated calls joined),
/// the problems and the facts.
/// One sample's fields: name and values.
type Fields = Vec<(String, Vec<f64>)>;

#[derive(Default)]
struct Seen {
    samples: Vec<(u64, Fields)>,
    problems: Vec<(String, String)>,
    facts: Vec<(String, String)>,
}

impl quarry_formats::Observer for Seen {
    fn sample(&mut self, index: u64) {
        self.samples.push((index, Vec::new()));
    }
    fn values(&mut self, field: &str, values: &[f64]) {
        let s = &mut self.samples.last_mut().expect("a sample first").1;
        match s.iter_mut().find(|(f, _)| f == field) {
            Some((_, v)) => v.extend_from_slice(values),
            None => s.push((field.to_string(), values.to_vec())),
        }
    }
    fn problem(&mut self, path: &str, reason: &str) {
        self.problems.push((path.to_string(), reason.to_string()));
    }
    fn fact(&mut self, key: &str, value: &str) {
        self.facts.push((key.to_string(), value.to_string()));
    }
}

impl Seen {
    fn fact(&self, key: &str) -> &str {
        self.facts
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no fact {key}: {:?}", self.facts))
    }
}

fn examine(root: &Path) -> (u64, Seen) {
    let mut seen = Seen::default();
    let n = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        quarry_formats::examine(Format::Lerobot, root, &mut seen)
    }))
    .expect("no panic")
    .unwrap();
    (n, seen)
}

/// pyarrow's reading of a dataset: info.json's fps and totals, the tasks, and per episode
/// its length, number of tasks and every frame's `observation.state` and `action` elements.
const READ_EPISODES: &str = r#"
import sys, json, glob, os
import pyarrow.parquet as pq
root = sys.argv[1]
info = json.load(open(os.path.join(root, 'meta/info.json')))
eps = pq.read_table(sorted(glob.glob(os.path.join(root, 'meta/episodes/*/*.parquet')))[0]).to_pylist()
tasks = pq.read_table(os.path.join(root, 'meta/tasks.parquet'))
names = [c for c in tasks.column_names if c != 'task_index']
task_list = [r[names[0]] for r in sorted(tasks.to_pylist(), key=lambda r: r['task_index'])]
data = pq.read_table(sorted(glob.glob(os.path.join(root, 'data/*/*.parquet')))[0]).to_pylist()
out = []
for e in eps:
    rows = [r for r in data if r['episode_index'] == e['episode_index']]
    o = {'index': e['episode_index'], 'length': e['length'], 'tasks': len(e['tasks'])}
    for f in ['observation.state', 'action']:
        o[f] = [x for r in rows for x in r[f]]
    if 'success' in e:
        o['success'] = float(e['success'])
    out.append(o)
print(json.dumps({'fps': info['fps'], 'frames': info['total_frames'], 'tasks': task_list, 'episodes': out}))
"#;

#[test]
fn examine_reports_each_episode_as_pyarrow_reads_it() {
    let py = python(&["pyarrow"]);
    let t = tempfile::tempdir().unwrap();
    // Round 1 with a `success` column added to its episode table.
    let r1 = copy_round(t.path(), 1);
    add_episode_column(&r1, "success", |i| i != 1);
    for root in [rounds()[0].clone(), r1.clone(), rounds()[2].clone()] {
        let want: Value = serde_json::from_str(
            run_code(&py, READ_EPISODES, &[root.display().to_string()]).trim(),
        )
        .unwrap();
        let (n, seen) = examine(&root);
        let eps = want["episodes"].as_array().unwrap();
        assert_eq!(n as usize, eps.len());
        assert!(seen.problems.is_empty(), "{:?}", seen.problems);
        assert_eq!(seen.fact("fps"), want["fps"].to_string());
        assert_eq!(seen.fact("frames"), want["frames"].to_string());
        assert_eq!(seen.fact("robot_type"), "toyarm");
        assert_eq!(seen.fact("video keys"), "observation.images.cam");
        assert_eq!(seen.fact("video files"), "1 checked");
        assert_eq!(seen.fact("feature action"), "float32 [3]");
        assert_eq!(
            seen.fact("feature observation.images.cam"),
            "video [48, 64, 3] (av1, yuv420p, 64x48, 10 fps)"
        );
        let tasks: Vec<String> = want["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| format!("{t}"))
            .collect();
        assert_eq!(
            seen.fact("tasks"),
            format!("{}: {}", tasks.len(), tasks.join(", "))
        );
        assert_eq!(seen.samples.len(), eps.len());
        for ((index, fields), e) in seen.samples.iter().zip(eps) {
            assert_eq!(*index, e["index"].as_u64().unwrap());
            let mut names: Vec<&str> = fields.iter().map(|(f, _)| f.as_str()).collect();
            names.sort_unstable();
            let mut want_names = vec!["action", "length", "observation.state", "tasks"];
            if e.get("success").is_some() {
                want_names.push("success");
                want_names.sort_unstable();
            }
            assert_eq!(names, want_names, "{root:?}");
            for (f, v) in fields {
                let w: Vec<f64> = match &e[f.as_str()] {
                    Value::Array(a) => a.iter().map(|x| x.as_f64().unwrap()).collect(),
                    x => vec![x.as_f64().unwrap()],
                };
                assert_eq!(v, &w, "episode {index} field {f} of {root:?}");
            }
        }
    }
}

/// Adds a boolean column to the round's episode table, `f(row)` per episode.
fn add_episode_column(root: &Path, name: &str, f: impl Fn(usize) -> bool) {
    use arrow::array::BooleanArray;
    use arrow::datatypes::{Field, Schema};
    let p = root.join("meta/episodes/chunk-000/file-000.parquet");
    let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
    let old = batches[0].schema();
    let mut fields: Vec<Field> = old.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(name, arrow::datatypes::DataType::Boolean, false));
    let schema = Arc::new(Schema::new_with_metadata(fields, old.metadata().clone()));
    let mut w = ArrowWriter::try_new(File::create(&p).unwrap(), schema.clone(), None).unwrap();
    let mut row = 0;
    for b in batches {
        let v: Vec<bool> = (0..b.num_rows()).map(|i| f(row + i)).collect();
        row += b.num_rows();
        let mut cols: Vec<ArrayRef> = b.columns().to_vec();
        cols.push(Arc::new(BooleanArray::from(v)));
        w.write(&RecordBatch::try_new(schema.clone(), cols).unwrap())
            .unwrap();
    }
    w.close().unwrap();
}

/// Rewrites a float64 column of the round's episode table.
fn edit_episodes_f64(root: &Path, column: &str, f: impl Fn(usize, f64) -> f64) {
    use arrow::array::Float64Array;
    let p = root.join("meta/episodes/chunk-000/file-000.parquet");
    let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = r.map(|b| b.unwrap()).collect();
    let schema = batches[0].schema();
    let i = schema.index_of(column).unwrap();
    let mut w = ArrowWriter::try_new(File::create(&p).unwrap(), schema.clone(), None).unwrap();
    let mut row = 0;
    for b in batches {
        let col = b
            .column(i)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .clone();
        let v: Vec<f64> = col
            .values()
            .iter()
            .map(|x| {
                row += 1;
                f(row - 1, *x)
            })
            .collect();
        let mut cols: Vec<ArrayRef> = b.columns().to_vec();
        cols[i] = Arc::new(Float64Array::from(v));
        w.write(&RecordBatch::try_new(schema.clone(), cols).unwrap())
            .unwrap();
    }
    w.close().unwrap();
}

/// Round 0 with its video file changed by `f`, examined: the problems, all about the file,
/// every episode still reported.
fn examine_spoiled_video(t: &Path, f: impl FnOnce(&mut Vec<u8>)) -> Vec<String> {
    let r = copy_round(t, 0);
    let p = video(&r, 0);
    let mut bytes = std::fs::read(&p).unwrap();
    f(&mut bytes);
    std::fs::write(&p, &bytes).unwrap();
    let (n, seen) = examine(&r);
    assert_eq!((n, seen.samples.len()), (2, 2));
    for (at, _) in &seen.problems {
        assert!(
            at.ends_with("videos/observation.images.cam/chunk-000/file-000.mp4"),
            "{at}"
        );
    }
    seen.problems.into_iter().map(|(_, r)| r).collect()
}

#[test]
fn hostile_video_files_are_problems_when_examined() {
    let t = tempfile::tempdir().unwrap();
    // Truncated in the middle of its mdat: the last sample lies past the end of the file.
    let p = examine_spoiled_video(t.path(), |b| {
        let mdat = find_box(b, b"mdat");
        b.truncate(mdat + (b.len() - mdat) / 2);
    });
    // Every sample is checked: the first one outside mdat is named, with how many are.
    assert!(
        p.len() == 1
            && p[0].contains("outside mdat")
            && p[0].contains("truncated")
            && p[0].contains(" of its 9 samples do"),
        "{p:?}"
    );
    // Its first sample not a sync sample.
    let p = examine_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"stss");
        b[at + 16..at + 20].copy_from_slice(&2u32.to_be_bytes());
    });
    assert!(
        p.len() == 1 && p[0].contains("first sample is not a sync (key) frame"),
        "{p:?}"
    );
    // Its codec not the one info.json names.
    let p = examine_spoiled_video(t.path(), |b| {
        // The sample entry (stsd's first), not the ftyp's compatible brand.
        let at = find_box(b, b"stsd") + 16;
        assert_eq!(&b[at + 4..at + 8], b"av01");
        b[at + 4..at + 8].copy_from_slice(b"avc1");
    });
    assert!(
        p.len() == 1 && p[0].contains("avc1") && p[0].contains("\"av1\""),
        "{p:?}"
    );
    // A chunk offset pointing before mdat.
    let p = examine_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"stco");
        b[at + 16..at + 20].copy_from_slice(&8u32.to_be_bytes());
    });
    assert!(
        p.len() == 1 && p[0].contains("first sample") && p[0].contains("outside mdat"),
        "{p:?}"
    );
    // Not an MP4 at all; cut inside a box header; garbage sizes: problems, never panics.
    for f in [
        (|b: &mut Vec<u8>| b[4..8].copy_from_slice(b"junk")) as fn(&mut Vec<u8>),
        |b| b.truncate(36),
        |b| b.truncate(0),
        |b| {
            let at = find_box(b, b"stsz");
            b[at + 16..at + 20].copy_from_slice(&u32::MAX.to_be_bytes());
        },
        |b| {
            let at = find_box(b, b"stsc");
            b[at + 20..at + 24].copy_from_slice(&u32::MAX.to_be_bytes());
        },
    ] {
        let p = examine_spoiled_video(t.path(), f);
        assert_eq!(p.len(), 1, "{p:?}");
    }
    // Fragmented (an mvex box in moov): not checked, no problem.
    let r = copy_round(t.path(), 0);
    let p = video(&r, 0);
    let mut b = std::fs::read(&p).unwrap();
    let at = find_box(&b, b"udta");
    b[at + 4..at + 8].copy_from_slice(b"mvex");
    std::fs::write(&p, &b).unwrap();
    let (_, seen) = examine(&r);
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    assert_eq!(seen.fact("video files"), "0 checked, 1 not checked");
    assert!(
        seen.facts
            .iter()
            .any(|(k, v)| k.ends_with("file-000.mp4") && v == "not checked (fragmented)"),
        "{:?}",
        seen.facts
    );
}

#[test]
fn episode_tables_promising_more_video_than_there_is_are_problems() {
    let t = tempfile::tempdir().unwrap();
    // A missing video file.
    let r = copy_round(t.path(), 0);
    std::fs::remove_file(video(&r, 0)).unwrap();
    let (n, seen) = examine(&r);
    assert_eq!((n, seen.samples.len()), (2, 2));
    assert_eq!(seen.problems.len(), 1, "{:?}", seen.problems);
    assert!(
        seen.problems[0].0.ends_with("file-000.mp4")
            && seen.problems[0].1.contains("does not exist"),
        "{:?}",
        seen.problems
    );
    // The last episode ending at 5 s: 50 frames at 10 fps, the file holds 9.
    let r = copy_round(t.path(), 0);
    edit_episodes_f64(&r, "videos/observation.images.cam/to_timestamp", |i, x| {
        if i == 1 { 5.0 } else { x }
    });
    let (_, seen) = examine(&r);
    assert_eq!(seen.problems.len(), 1, "{:?}", seen.problems);
    let (at, why) = &seen.problems[0];
    assert!(at.ends_with("file-000.mp4"), "{at}");
    assert!(
        why.contains("holds 9 frames") && why.contains("episode 1") && why.contains("50 frames"),
        "{why}"
    );
    // Half a frame more than the file holds is within rounding.
    let r = copy_round(t.path(), 0);
    edit_episodes_f64(&r, "videos/observation.images.cam/to_timestamp", |i, x| {
        if i == 1 { 0.94 } else { x }
    });
    assert!(examine(&r).1.problems.is_empty());
}

/// Finals merged here, their video files cut or copied whole, examine clean.
#[test]
fn merged_finals_examine_without_problems() {
    let t = tempfile::tempdir().unwrap();
    let all = t.path().join("all");
    merge(&rounds(), 100, &all).unwrap();
    let cut = t.path().join("cut");
    merge(&rounds(), 4, &cut).unwrap();
    let long = t.path().join("long");
    merge_with(&rounds(), 100, Some("length >= 5"), &[], &long).unwrap();
    for (root, n, frames, files) in [
        (&all, 7, "35", "3 checked"),
        (&cut, 4, "22", "2 checked"),
        (&long, 4, "23", "3 checked"),
    ] {
        let (got, seen) = examine(root);
        assert_eq!(got, n, "{root:?}");
        assert!(seen.problems.is_empty(), "{root:?}: {:?}", seen.problems);
        assert_eq!(seen.fact("frames"), frames, "{root:?}");
        assert_eq!(seen.fact("video files"), files, "{root:?}");
    }
}

/// Merges with `merge.video_files_size_in_mb` set.
fn merge_appending(
    inputs: &[PathBuf],
    limit: u64,
    filter: Option<&str>,
    mb: f64,
    out: &Path,
) -> Result<quarry_formats::MergeSummary, DatasetError> {
    let o = MergeOptions {
        limit,
        filter: filter.map(|f| quarry_formats::Filter::parse(f).unwrap()),
        video_files_size_in_mb: Some(mb),
        ..Default::default()
    };
    quarry_formats::merge(Format::Lerobot, inputs, &vec![0; inputs.len()], &o, out)
}

/// The final's video files, in index order.
fn video_files(root: &Path) -> Vec<PathBuf> {
    let dir = root.join("videos/observation.images.cam/chunk-000");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// argv: a final's root, then `ROUND:N` items: the first N frames of round ROUND's one
/// video file, in order. Decodes every frame of the final's video files in index order and
/// checks them equal to those frames (pixels), each file's timestamps rising by one frame
/// from 0, and its stream's frame count and duration those of the frames it holds. Prints
/// `ok <files> <frames> <frames per file, comma-separated>`.
const CONCAT: &str = r#"
import sys, glob, os
import av, numpy as np
final, parts = sys.argv[1], sys.argv[2:]
def frames(p):
    with av.open(p) as c:
        s = c.streams.video[0]
        out = [(fr.pts, fr.time_base, fr.to_ndarray(format='rgb24')) for fr in c.decode(video=0)]
        return out, s.frames, (float(s.duration * s.time_base) if s.duration else None)
want = []
for p in parts:
    root, n = p.rsplit(':', 1)
    v = glob.glob(os.path.join(root, 'videos/*/chunk-*/file-*.mp4'))
    assert len(v) == 1, v
    got, _, _ = frames(v[0])
    assert len(got) >= int(n), (root, len(got), n)
    want += [f[2] for f in got[:int(n)]]
files = sorted(glob.glob(os.path.join(final, 'videos/*/chunk-*/file-*.mp4')))
have, per = [], []
for f in files:
    got, count, dur = frames(f)
    step = None
    for i, (pts, tb, _) in enumerate(got):
        t = float(pts * tb)
        assert abs(t - i * 0.1) < 1e-6, (f, i, t)
    assert count in (0, len(got)), (f, count, len(got))
    assert dur is None or abs(dur - 0.1 * len(got)) < 1e-6, (f, dur, len(got))
    have += [g[2] for g in got]
    per.append(str(len(got)))
assert len(have) == len(want), (len(have), len(want))
for i, (a, b) in enumerate(zip(have, want)):
    assert np.array_equal(a, b), i
print('ok', len(files), len(have), ','.join(per))
"#;

fn concat_check(out: &Path, parts: &[(&Path, usize)]) -> String {
    let py = python(&["av", "numpy"]);
    let mut args = vec![out.display().to_string()];
    args.extend(parts.iter().map(|(r, n)| format!("{}:{n}", r.display())));
    run_code(&py, CONCAT, &args)
}

/// With `merge.video_files_size_in_mb`, the rounds' video files are appended into one: its
/// frames are the rounds' kept frames in order, every episode's frames (found by its shifted
/// timestamps) are its round's, and the size lands in info.json.
#[test]
fn video_files_are_appended_into_fewer_files() {
    let t = tempfile::tempdir().unwrap();
    let r = rounds();
    // Every episode: one file of the 35 frames.
    let all = t.path().join("all");
    assert_eq!(
        merge_appending(&r, 100, None, 1.0, &all).unwrap().samples,
        7
    );
    assert_eq!(video_files(&all).len(), 1);
    let said = concat_check(&all, &[(&r[0], 9), (&r[1], 17), (&r[2], 9)]);
    assert_eq!(said.trim(), "ok 1 35 35", "{said}");
    let said = check_with_python(&all, &r);
    assert_eq!(said.trim(), "ok 7 35 35", "{said}");
    let info = json(&all.join("meta/info.json"));
    assert_eq!(info["video_files_size_in_mb"], 1, "{info}");
    // Cut at the quota inside round 1: round 0 whole, round 1's first 13 frames.
    let cut = t.path().join("cut");
    merge_appending(&r, 4, None, 1.0, &cut).unwrap();
    let said = concat_check(&cut, &[(&r[0], 9), (&r[1], 13)]);
    assert_eq!(said.trim(), "ok 1 22 22", "{said}");
    let said = check_with_python(&cut, &r);
    assert_eq!(said.trim(), "ok 4 22 22", "{said}");
    // Every round's last episode filtered out: each file cut, then the next appended.
    let long = t.path().join("long");
    merge_appending(&r, 100, Some("length >= 5"), 1.0, &long).unwrap();
    let said = concat_check(&long, &[(&r[0], 5), (&r[1], 13), (&r[2], 5)]);
    assert_eq!(said.trim(), "ok 1 23 23", "{said}");
    let said = check_picked(&long, &[0, 2, 3, 5], &r);
    assert_eq!(said.trim(), "ok 4 23 23", "{said}");
    // A fractional size is written as given; the final is a round Quarry accepts.
    let half = t.path().join("half");
    merge_appending(&r, 100, None, 0.5, &half).unwrap();
    assert_eq!(
        json(&half.join("meta/info.json"))["video_files_size_in_mb"],
        0.5
    );
    assert_eq!(
        quarry_formats::inspect(Format::Lerobot, &all, None)
            .unwrap()
            .count,
        7
    );
    let (n, seen) = examine(&all);
    assert_eq!((n, seen.problems.len()), (7, 0), "{:?}", seen.problems);
}

/// A file is appended only while the result stays under the size: a size below every
/// round's file gives each its own file, byte for byte as without the setting; one that
/// holds two rounds' files but not three splits them 2 + 1.
#[test]
fn the_size_bounds_each_appended_file() {
    let t = tempfile::tempdir().unwrap();
    let r = rounds();
    let plain = t.path().join("plain");
    merge(&r, 100, &plain).unwrap();
    let tiny = t.path().join("tiny");
    merge_appending(&r, 100, None, 0.001, &tiny).unwrap();
    let (a, b) = (video_files(&plain), video_files(&tiny));
    assert_eq!(b.len(), 3);
    // Nothing appended: every file as without the setting, but info.json's size.
    let (mut x, mut y) = (pyhelp::tree(&plain), pyhelp::tree(&tiny));
    let (xi, yi) = (x.remove("meta/info.json"), y.remove("meta/info.json"));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    for (k, v) in &x {
        assert!(y[k] == *v, "{k} differs");
    }
    let (xi, yi): (Value, Value) = (
        serde_json::from_slice(&xi.unwrap()).unwrap(),
        serde_json::from_slice(&yi.unwrap()).unwrap(),
    );
    assert_eq!(xi["video_files_size_in_mb"], 200, "round 0's, unset");
    assert_eq!(yi["video_files_size_in_mb"], 0.001);
    // Round files of 2775, 4547 and 2874 bytes: two appended are about 6.5 kB.
    let sizes: Vec<u64> = a.iter().map(|p| p.metadata().unwrap().len()).collect();
    let limit = sizes[0] + sizes[1] + 200;
    let mb = limit as f64 / 1048576.0;
    let two = t.path().join("two");
    merge_appending(&r, 100, None, mb, &two).unwrap();
    let files = video_files(&two);
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files[0].metadata().unwrap().len() < limit);
    assert_eq!(
        std::fs::read(&files[1]).unwrap(),
        std::fs::read(&a[2]).unwrap()
    );
    let said = concat_check(&two, &[(&r[0], 9), (&r[1], 17), (&r[2], 9)]);
    assert_eq!(said.trim(), "ok 2 35 26,9", "{said}");
    let said = check_with_python(&two, &r);
    assert_eq!(said.trim(), "ok 7 35 35", "{said}");
}

/// A copy of round `r` whose video is re-encoded to H.264 with B-frames (see TO_H264).
fn h264_round(t: &Path, r: usize) -> PathBuf {
    let to = copy_round(t, r);
    let py = python(&["av"]);
    let said = run_code(
        &py,
        TO_H264,
        &[
            video(&rounds()[r], 0).display().to_string(),
            video(&to, 0).display().to_string(),
        ],
    );
    assert!(said.starts_with("ok "), "{said}");
    to
}

/// Files of another sample description (codec, size or codec configuration) start a new
/// file, in order; H.264 files with B-frames (composition offsets, an edit list) append as
/// the AV1 ones do, cut ones too.
#[test]
fn video_files_of_another_codec_start_a_new_file() {
    let t = tempfile::tempdir().unwrap();
    let r = rounds();
    let h1 = h264_round(t.path(), 1);
    let h2 = h264_round(t.path(), 2);
    // AV1, H.264, AV1: nothing appended.
    let inputs = vec![r[0].clone(), h1.clone(), r[2].clone()];
    let out = t.path().join("mixed");
    merge_appending(&inputs, 100, None, 1.0, &out).unwrap();
    assert_eq!(video_files(&out).len(), 3);
    let said = check_with_python(&out, &inputs);
    assert_eq!(said.trim(), "ok 7 35 35", "{said}");
    // AV1, AV1, H.264: the first two appended.
    let inputs = vec![r[0].clone(), r[2].clone(), h1.clone()];
    let out = t.path().join("av1_first");
    merge_appending(&inputs, 100, None, 1.0, &out).unwrap();
    assert_eq!(video_files(&out).len(), 2);
    let said = concat_check(&out, &[(&r[0], 9), (&r[2], 9), (&h1, 17)]);
    assert_eq!(said.trim(), "ok 2 35 18,17", "{said}");
    let said = check_with_python(&out, &inputs);
    assert_eq!(said.trim(), "ok 7 35 35", "{said}");
    // Two H.264 rounds with B-frames: one file.
    let inputs = vec![h1.clone(), h2.clone()];
    let out = t.path().join("h264");
    merge_appending(&inputs, 100, None, 1.0, &out).unwrap();
    assert_eq!(video_files(&out).len(), 1);
    let said = concat_check(&out, &[(&h1, 17), (&h2, 9)]);
    assert_eq!(said.trim(), "ok 1 26 26", "{said}");
    let said = check_with_python(&out, &inputs);
    assert_eq!(said.trim(), "ok 5 26 26", "{said}");
    // Each cut after its first two episodes (a reference frame presented after the cut may
    // stay, unreferenced), the second appended after the first's last presented frame.
    let out = t.path().join("h264_cut");
    merge_appending(&inputs, 100, Some("length >= 5"), 1.0, &out).unwrap();
    assert_eq!(video_files(&out).len(), 1);
    let said = check_picked(&out, &[0, 1, 3], &inputs);
    assert_eq!(said.trim(), "ok 3 18 18", "{said}");
}

/// Round 1's video file changed by `f`, merged whole after round 0 with appending.
fn append_spoiled_video(t: &Path, f: impl FnOnce(&mut Vec<u8>)) -> Result<PathBuf, String> {
    let r = copy_round(t, 1);
    let p = video(&r, 0);
    let mut bytes = std::fs::read(&p).unwrap();
    f(&mut bytes);
    std::fs::write(&p, &bytes).unwrap();
    let out = r.with_extension("out");
    let got = std::panic::catch_unwind(|| {
        merge_appending(&[rounds()[0].clone(), r.clone()], 100, None, 1.0, &out)
    });
    match got.expect("no panic") {
        Ok(_) => Ok(out),
        Err(e) => Err(e.to_string()),
    }
}

/// With appending every round's video file is read, cut or not: one whose tables lie fails
/// the merge naming it; one of a layout that is not appended is copied as its own file; one
/// that does not start with a key frame starts a new file.
#[test]
fn hostile_video_files_are_errors_when_appended() {
    let t = tempfile::tempdir().unwrap();
    let named = |e: &str| e.contains("bad1_") && e.contains("file-000.mp4");
    let e = append_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"stsz");
        b[at + 16..at + 20].copy_from_slice(&u32::MAX.to_be_bytes());
    })
    .unwrap_err();
    assert!(named(&e) && e.contains("claims 4294967295 entries"), "{e}");
    let e = append_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"stco");
        b[at + 16..at + 20].copy_from_slice(&0x00ff_0000u32.to_be_bytes());
    })
    .unwrap_err();
    assert!(named(&e) && e.contains("lies outside mdat"), "{e}");
    let e = append_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"stsc");
        b[at + 20..at + 24].copy_from_slice(&1000u32.to_be_bytes());
    })
    .unwrap_err();
    assert!(named(&e) && e.contains("stsc places"), "{e}");
    let e = append_spoiled_video(t.path(), |b| b.truncate(b.len() - 500)).unwrap_err();
    assert!(named(&e) && e.contains("truncated"), "{e}");
    // Fragmented (a moof box after mdat): copied whole as its own file.
    let mut spoiled = Vec::new();
    let out = append_spoiled_video(t.path(), |b| {
        b.extend([0, 0, 0, 16]);
        b.extend(b"moof");
        b.extend([0u8; 8]);
        spoiled = b.clone();
    })
    .unwrap();
    let files = video_files(&out);
    assert_eq!(files.len(), 2);
    assert_eq!(std::fs::read(&files[1]).unwrap(), spoiled);
    // Its first sample not listed as a sync one: not appended.
    let out = append_spoiled_video(t.path(), |b| {
        let at = find_box(b, b"stss");
        b[at + 16..at + 20].copy_from_slice(&3u32.to_be_bytes());
    })
    .unwrap();
    assert_eq!(video_files(&out).len(), 2);
}

/// Seeded corruption of round 1's video tables (bytes flipped in moov, the file cut short),
/// merged whole with appending: an error or a final, never a panic.
#[test]
fn corrupted_video_files_are_errors_never_panics_when_appended() {
    let t = tempfile::tempdir().unwrap();
    let orig = std::fs::read(video(&rounds()[1], 0)).unwrap();
    let moov = find_box(&orig, b"moov");
    let moov_end = moov + u32::from_be_bytes(orig[moov..moov + 4].try_into().unwrap()) as usize;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for case in 0..200 {
        let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let r = copy_round(t.path(), 1);
            let mut b = orig.clone();
            if case % 5 == 4 {
                b.truncate((next() as usize) % b.len());
            } else {
                for _ in 0..1 + next() % 4 {
                    let at = moov + (next() as usize) % (moov_end - moov);
                    b[at] = match next() % 3 {
                        0 => 0xff,
                        1 => 0,
                        _ => b[at] ^ (1 << (next() % 8)),
                    };
                }
            }
            std::fs::write(video(&r, 0), &b).unwrap();
            let out = r.with_extension("out");
            let inputs = [rounds()[0].clone(), r.clone(), rounds()[2].clone()];
            let m = merge_appending(&inputs, 100, None, 1.0, &out);
            std::fs::remove_dir_all(&r).unwrap();
            let _ = std::fs::remove_dir_all(&out);
            m.is_err()
        }));
        errors += usize::from(e.unwrap_or_else(|_| panic!("case {case} panicked")));
    }
    assert!(errors > 50, "most corruptions are caught: {errors}");
}

/// The round's video remuxed by PyAV (ffmpeg's mp4 muxer, packets copied) with an AAC audio
/// track added, as a recorder with a microphone writes it (moov first, as lerobot writes).
const ADD_AUDIO: &str = r#"
import sys, av, numpy as np
src, dst = sys.argv[1], sys.argv[2]
inp = av.open(src)
vin = inp.streams.video[0]
out = av.open(dst, 'w', format='mp4', options={'movflags': 'faststart'})
vout = out.add_stream_from_template(vin, opaque=True)
aout = out.add_stream('aac', rate=48000)
for pkt in inp.demux(vin):
    if pkt.dts is None:
        continue
    pkt.stream = vout
    out.mux(pkt)
frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format='fltp', layout='mono')
frame.sample_rate = 48000
for i in range(10):
    frame.pts = i * 1024
    for pkt in aout.encode(frame):
        out.mux(pkt)
for pkt in aout.encode(None):
    out.mux(pkt)
out.close()
inp.close()
n = 0
with av.open(dst) as c:
    print(len(c.streams.video), len(c.streams.audio), sum(1 for _ in c.decode(video=0)))
"#;

#[test]
fn a_video_file_with_an_audio_track_is_examined_on_its_video_track() {
    let t = tempfile::tempdir().unwrap();
    let r = copy_round(t.path(), 0);
    let p = video(&r, 0);
    let with_audio = t.path().join("with_audio.mp4");
    let py = python(&["av", "numpy"]);
    let out = run_code(
        &py,
        ADD_AUDIO,
        &[p.display().to_string(), with_audio.display().to_string()],
    );
    // One video stream of the round's 9 frames and one audio stream, as PyAV reads it back.
    assert_eq!(out.trim(), "1 1 9", "{out}");
    std::fs::copy(&with_audio, &p).unwrap();
    let (n, seen) = examine(&r);
    assert_eq!(n, 2);
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    assert_eq!(seen.fact("video files"), "1 checked");
    // Damaged, its video samples are still checked (the audio track does not hide them).
    let mut bytes = std::fs::read(&p).unwrap();
    let mdat = find_box(&bytes, b"mdat");
    bytes.truncate(mdat + 16);
    std::fs::write(&p, &bytes).unwrap();
    let (_, seen) = examine(&r);
    assert!(
        seen.problems
            .iter()
            .any(|(_, why)| why.contains("outside mdat")),
        "{:?}",
        seen.problems
    );
}
