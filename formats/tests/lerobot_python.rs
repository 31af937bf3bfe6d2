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

/// argv: final root, then the round roots in order. Checks the final against the rounds
/// and prints `ok <episodes> <frames> <video frames compared>`.
const CHECK: &str = r#"
import sys, json, glob, os
import pyarrow.parquet as pq
import av, numpy as np

final, rounds = sys.argv[1], sys.argv[2:]

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
    // Cut at the quota inside round 1: its first two episodes only, its video copied whole.
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
    // A filter is refused with the field to remove.
    let f = quarry_formats::Filter::parse("length >= 3").unwrap();
    let e = quarry_formats::inspect(Format::Lerobot, &rounds()[0], Some(&f))
        .unwrap_err()
        .to_string();
    assert!(e.contains("merge.filter"), "{e}");
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
