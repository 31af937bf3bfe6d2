//! Cross-checks `quarry_formats::episodes` against Python: rounds written by the example
//! collector (`deploy/examples/episode_collector.py`: real pickles of numpy arrays), merged
//! here, then read back by Python and compared with Python's own merge of the same rounds:
//! the kept episodes and their order, metadata, byte-identical files that unpickle, and the
//! merged collection summary.
//!
//! Needs a Python with numpy; fails (never skips) without one. `QUARRY_TEST_PYTHON` names the
//! interpreter (default `python3`).
#![allow(clippy::unwrap_used)] // test code may unwrap

mod pyhelp;

use std::path::{Path, PathBuf};

use pyhelp::{Recorder, copy_tree, example, python, run, tree};
use quarry_formats::{DatasetError, Filter, Format, MergeOptions, MergeSummary};

/// Python's reference merge and its check of a Rust merge. argv: a JSON spec
/// `{"inputs": [...], "merges": [{"out", "limit", "filter": [field, op, value] | null,
/// "dedup": [...]}]}`; prints, per merge, `{"samples", "filtered", "duplicates"}` as a JSON
/// list after checking the output.
const CHECK: &str = r#"
import sys, os, json, pickle, hashlib, math, operator
import numpy as np

OPS = {'<': operator.lt, '<=': operator.le, '>': operator.gt, '>=': operator.ge,
       '==': operator.eq, '!=': operator.ne}
SUMMED = ['total_episodes', 'successful_episodes', 'failed_episodes', 'total_timesteps',
          'duration_seconds']
DERIVED = ['success_rate', 'avg_timesteps_per_episode', 'avg_duration_per_episode']

def get(v, field):
    for part in field.split('.'):
        v = v[part] if isinstance(v, dict) else v[int(part)]
    return v

def load(p):
    with open(p) as f:
        return json.load(f)

def read(p):
    with open(p, 'rb') as f:
        return f.read()

def ep(d, k):
    return os.path.join(d, 'episodes', 'episode_%05d.pkl' % k)

def meta(d, k):
    return os.path.join(d, 'metadata', 'episode_%05d_meta.json' % k)

def reference(inputs, limit, filt, dedup):
    kept, filtered, dups, seen = [], 0, 0, set()
    for i, d in enumerate(inputs):
        if len(kept) >= limit:
            break
        names = sorted(os.listdir(os.path.join(d, 'episodes')))
        assert names == ['episode_%05d.pkl' % k for k in range(len(names))], names
        for k in range(len(names)):
            m = load(meta(d, k))
            if filt and not OPS[filt[1]](float(get(m, filt[0])), filt[2]):
                filtered += 1
                continue
            if dedup:
                key = tuple(hashlib.sha256(read(ep(d, k))).hexdigest() if f == 'file'
                            else json.dumps(get(m, f), sort_keys=True, separators=(',', ':'))
                            for f in dedup)
                if key in seen:
                    dups += 1
                    continue
                seen.add(key)
            kept.append((i, k, m))
            if len(kept) >= limit:
                break
    return kept, filtered, dups

def check(inputs, out, limit, filt, dedup):
    kept, filtered, dups = reference(inputs, limit, filt, dedup)
    n = len(kept)
    # One-to-one files and metadata, nothing else; the inputs' logs/ are not merged.
    assert sorted(os.listdir(out)) == ['episodes', 'metadata'], os.listdir(out)
    assert sorted(os.listdir(os.path.join(out, 'episodes'))) == \
        ['episode_%05d.pkl' % j for j in range(n)]
    assert sorted(os.listdir(os.path.join(out, 'metadata'))) == \
        sorted(['episode_%05d_meta.json' % j for j in range(n)] + ['collection_summary.json'])
    for j, (i, k, m) in enumerate(kept):
        got = load(meta(out, j))
        want = dict(m, episode_idx=j, filepath='episodes/episode_%05d.pkl' % j,
                    source={'input': i, 'episode_idx': k})
        assert got == want, (j, got, want)
        # Byte-identical to the file its source map names.
        src = got['source']
        data = read(ep(out, j))
        assert data == read(ep(inputs[src['input']], src['episode_idx'])), j
        d, attrs = pickle.loads(data)
        assert isinstance(d['obs']['point_cloud'], np.ndarray), type(d['obs']['point_cloud'])
        assert d['obs']['robot0_eef_pos'].shape == (m['statistics']['num_timesteps'], 3)
        assert d['actions'].shape[0] == m['statistics']['num_actions']
        assert len(d['contacts']) == m['statistics']['num_contacts']
        assert attrs['success'] is True and attrs['object_names'] == m['statistics']['object_names']
    sums = [load(os.path.join(d, 'metadata', 'collection_summary.json')) for d in inputs]
    got = load(os.path.join(out, 'metadata', 'collection_summary.json'))
    for key in SUMMED[:4]:
        assert got[key] == sum(s[key] for s in sums) and type(got[key]) is int, key
    assert math.isclose(got['duration_seconds'], math.fsum(s['duration_seconds'] for s in sums),
                        rel_tol=1e-12)
    t, s_, ts = got['total_episodes'], got['successful_episodes'], got['total_timesteps']
    assert math.isclose(got['success_rate'], s_ / t if t else 0.0, rel_tol=1e-12)
    assert math.isclose(got['avg_timesteps_per_episode'], ts / s_ if s_ else 0.0, rel_tol=1e-12)
    assert math.isclose(got['avg_duration_per_episode'],
                        got['duration_seconds'] / t if t else 0.0, rel_tol=1e-12)
    assert got['error_log'] == [e for s in sums for e in s['error_log']]
    assert got['merged_from'] == len(inputs)
    assert got['episodes_in_dataset'] == n
    for key, v in sums[0].items():
        if key not in SUMMED + DERIVED + ['error_log']:
            assert got[key] == v, key
    assert set(got) == set(sums[0]) | {'merged_from', 'episodes_in_dataset'}
    return {'samples': n, 'filtered': filtered, 'duplicates': dups}

spec = load(sys.argv[1])
print(json.dumps([check(spec['inputs'], m['out'], m['limit'], m['filter'], m['dedup'])
                  for m in spec['merges']]))
"#;

/// Per episode of a dataset: its statistics' numeric fields (dotted) and `file_bytes`, and
/// how many episodes pass `argv[2] argv[3] argv[4]`.
const STATS: &str = r#"
import sys, os, json, operator
d = sys.argv[1]
OPS = {'<': operator.lt, '<=': operator.le, '>': operator.gt, '>=': operator.ge}
n = len(os.listdir(os.path.join(d, 'episodes')))
out, passing = [], 0
for k in range(n):
    with open(os.path.join(d, 'metadata', 'episode_%05d_meta.json' % k)) as f:
        m = json.load(f)
    row = {'file_bytes': [float(os.path.getsize(os.path.join(d, 'episodes', 'episode_%05d.pkl' % k)))]}
    for key, v in m['statistics'].items():
        if isinstance(v, (bool, int, float)):
            row['statistics.' + key] = [float(v)]
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            row['statistics.' + key] = [float(x) for x in v]
    out.append(row)
    if OPS[sys.argv[3]](float(m['statistics'][sys.argv[2].split('.')[1]]), float(sys.argv[4])):
        passing += 1
print(json.dumps({'rows': out, 'passing': passing}))
"#;

struct Env {
    py: String,
    dir: tempfile::TempDir,
    check: PathBuf,
    stats: PathBuf,
}

fn env() -> Env {
    let py = python(&["numpy", "pickle", "json", "hashlib"]);
    let dir = tempfile::tempdir().unwrap();
    let check = dir.path().join("check.py");
    std::fs::write(&check, CHECK).unwrap();
    let stats = dir.path().join("stats.py");
    std::fs::write(&stats, STATS).unwrap();
    Env {
        py,
        dir,
        check,
        stats,
    }
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A round written by the example collector: (dataset dir, its --stats sidecar).
    fn collect(&self, name: &str, seed: u64, batch: u64, extra: &[&str]) -> PathBuf {
        let out = self.path(name);
        let sidecar = self.path(&format!("{name}.stats.json"));
        let mut args: Vec<String> = [
            "--seed",
            &seed.to_string(),
            "--object",
            "Stack",
            "--batch_size",
            &batch.to_string(),
            "--out",
            out.to_str().unwrap(),
            "--stats",
            sidecar.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        run(&self.py, &example("episode_collector.py"), &args);
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
        assert_eq!(st["attempts"], batch);
        let n = std::fs::read_dir(out.join("episodes")).unwrap().count() as u64;
        assert_eq!(
            st["successes"], n,
            "{name}: the sidecar counts the saved episodes"
        );
        out
    }
}

const SCHEMA: &str =
    "episodes pkl meta [num_actions, num_contacts, num_objects, num_timesteps, object_names]";

struct Case {
    limit: u64,
    filter: Option<&'static str>,
    dedup: &'static [&'static str],
}

fn options(c: &Case) -> MergeOptions {
    MergeOptions {
        limit: c.limit,
        filter: c.filter.map(|f| Filter::parse(f).unwrap()),
        dedup: c.dedup.iter().map(|s| s.to_string()).collect(),
        video_files_size_in_mb: None,
    }
}

fn merge(inputs: &[PathBuf], o: &MergeOptions, out: &Path) -> Result<MergeSummary, DatasetError> {
    let counts: Vec<u64> = inputs
        .iter()
        .map(|p| {
            quarry_formats::inspect(Format::Episodes, p, None)
                .unwrap()
                .count
        })
        .collect();
    quarry_formats::merge(Format::Episodes, inputs, &counts, o, out)
}

/// Rounds of several pickle protocols, an empty round and an exact copy of round 0.
fn rounds(e: &Env) -> Vec<PathBuf> {
    let r0 = e.collect("r0", 1, 7, &[]);
    let r1 = e.collect("r1", 2, 5, &["--protocol", "5"]);
    let r2 = e.collect("r2", 3, 4, &["--success_rate", "0"]);
    let r3 = e.collect("r3", 4, 6, &["--protocol", "2"]);
    let r4 = e.path("r4");
    copy_tree(&r0, &r4);
    vec![r0, r1, r2, r3, r4]
}

#[test]
fn merges_like_python() {
    let e = env();
    let inputs = rounds(&e);
    let counts: Vec<u64> = inputs
        .iter()
        .map(|p| std::fs::read_dir(p.join("episodes")).unwrap().count() as u64)
        .collect();
    assert!(
        counts[0] > 2 && counts[1] > 0 && counts[3] > 0,
        "{counts:?}"
    );
    assert_eq!(counts[2], 0);
    for (p, &n) in inputs.iter().zip(&counts) {
        let i = quarry_formats::inspect(Format::Episodes, p, None).unwrap();
        assert_eq!((i.count, i.kept), (n, n));
        assert_eq!(i.schema, if n == 0 { "episodes empty" } else { SCHEMA });
    }
    let total: u64 = counts.iter().sum();
    let cases = [
        Case {
            limit: 1000,
            filter: None,
            dedup: &[],
        },
        // Cut inside input 1 (input 0 whole, then part of input 1).
        Case {
            limit: counts[0] + 1,
            filter: None,
            dedup: &[],
        },
        Case {
            limit: 0,
            filter: None,
            dedup: &[],
        },
        Case {
            limit: total,
            filter: Some("statistics.num_timesteps >= 60"),
            dedup: &[],
        },
        // The copy of round 0 is dropped whole.
        Case {
            limit: 1000,
            filter: None,
            dedup: &["file"],
        },
        Case {
            limit: 1000,
            filter: Some("statistics.num_contacts > 3"),
            dedup: &["statistics.num_objects"],
        },
        Case {
            limit: 2,
            filter: None,
            dedup: &["statistics.num_objects", "statistics.object_names"],
        },
    ];
    let mut merges = Vec::new();
    let mut got = Vec::new();
    for (n, c) in cases.iter().enumerate() {
        let out = e.path(&format!("merged{n}"));
        let s = merge(&inputs, &options(c), &out).unwrap();
        let files = tree(&out);
        assert_eq!(
            s.bytes_written,
            files.values().map(|v| v.len() as u64).sum::<u64>()
        );
        let back = quarry_formats::inspect(Format::Episodes, &out, None).unwrap();
        assert_eq!(back.count, s.samples);
        if s.samples > 0 {
            assert_eq!(back.schema, SCHEMA);
        }
        got.push(serde_json::json!({
            "samples": s.samples, "filtered": s.filtered, "duplicates": s.duplicates
        }));
        merges.push(serde_json::json!({
            "out": out,
            "limit": c.limit,
            "filter": c.filter.map(|f| {
                let f = Filter::parse(f).unwrap();
                let op = f.to_string().split_whitespace().nth(1).unwrap().to_string();
                serde_json::json!([f.field, op, f.value])
            }),
            "dedup": c.dedup,
        }));
    }
    let spec = e.path("spec.json");
    std::fs::write(
        &spec,
        serde_json::to_vec(&serde_json::json!({"inputs": inputs, "merges": merges})).unwrap(),
    )
    .unwrap();
    let said = run(&e.py, &e.check, &[spec.display().to_string()]);
    let want: Vec<serde_json::Value> = serde_json::from_str(said.trim()).unwrap();
    assert_eq!(got, want);
    // The cases did what they are for.
    assert_eq!(want[0]["samples"], total);
    assert_eq!(want[1]["samples"], counts[0] + 1);
    assert!(want[3]["filtered"].as_u64().unwrap() > 0);
    assert_eq!(want[4]["duplicates"], counts[0]);
    assert!(want[5]["duplicates"].as_u64().unwrap() > 0);
}

#[test]
fn merges_are_deterministic_and_refuse_an_existing_output() {
    let e = env();
    let inputs = rounds(&e);
    let o = options(&Case {
        limit: 9,
        filter: Some("statistics.num_timesteps > 40"),
        dedup: &["file", "statistics.num_objects"],
    });
    let (a, b) = (e.path("a"), e.path("b"));
    let sa = merge(&inputs, &o, &a).unwrap();
    let sb = merge(&inputs, &o, &b).unwrap();
    assert_eq!(sa, sb);
    assert!(sa.samples > 0);
    assert_eq!(tree(&a), tree(&b));
    match merge(&inputs, &o, &a).unwrap_err() {
        DatasetError::Io { op, path, .. } => assert_eq!((op, path), ("create", a)),
        e => panic!("{e}"),
    }
    // The collector itself is deterministic.
    let c1 = e.collect("c1", 5, 4, &[]);
    let c2 = e.collect("c2", 5, 4, &[]);
    // Metadata names the file by the collector's output path; everything else is the same.
    let normal = |d: &Path| {
        let mut t = tree(d);
        for (k, v) in t.iter_mut() {
            if k.ends_with("_meta.json") {
                let mut m: serde_json::Value = serde_json::from_slice(v).unwrap();
                let fp = m["filepath"].as_str().unwrap().to_string();
                let name = format!(
                    "{}.pkl",
                    &k["metadata/".len()..k.len() - "_meta.json".len()]
                );
                assert_eq!(Path::new(&fp), d.join("episodes").join(name));
                m["filepath"] = serde_json::Value::Null;
                *v = serde_json::to_vec(&m).unwrap();
            }
        }
        t
    };
    assert_eq!(normal(&c1), normal(&c2));
}

#[test]
fn inspect_filter_and_examine_agree_with_python() {
    let e = env();
    let r = e.collect("r", 11, 9, &["--protocol", "5"]);
    let said = run(
        &e.py,
        &e.stats,
        &[
            r.display().to_string(),
            "statistics.num_timesteps".into(),
            ">=".into(),
            "60".into(),
        ],
    );
    let want: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
    let f = Filter::parse("statistics.num_timesteps >= 60").unwrap();
    let i = quarry_formats::inspect(Format::Episodes, &r, Some(&f)).unwrap();
    assert_eq!(i.kept, want["passing"]);
    let mut rec = Recorder::default();
    let n = quarry_formats::examine(Format::Episodes, &r, &mut rec).unwrap();
    assert_eq!(n, i.count);
    assert!(rec.problems.is_empty(), "{:?}", rec.problems);
    let rows: Vec<std::collections::BTreeMap<String, Vec<f64>>> =
        serde_json::from_value(want["rows"].clone()).unwrap();
    assert_eq!(rec.samples, rows);
    // A filter on a field the metadata lacks names the file.
    let f = Filter::parse("statistics.energy < 1").unwrap();
    match quarry_formats::inspect(Format::Episodes, &r, Some(&f)).unwrap_err() {
        DatasetError::Filter { path, reason } => {
            assert!(path.ends_with("metadata/episode_00000_meta.json"), "{path}");
            assert!(reason.contains("statistics.energy"), "{reason}");
        }
        e => panic!("{e}"),
    }
}

/// Expects an `Invalid` error at `path` whose reason contains `what`.
fn invalid_at(r: Result<impl std::fmt::Debug, DatasetError>, path: &Path, what: &str) {
    match r {
        Err(DatasetError::Invalid { path: p, reason }) => {
            assert_eq!(p, path.display().to_string(), "{reason}");
            assert!(reason.contains(what), "{p}: {reason} (wanted {what:?})");
        }
        other => panic!("expected Invalid at {}: {other:?}", path.display()),
    }
}

#[test]
fn damaged_rounds_are_rejected_with_path_and_reason() {
    let e = env();
    let good = e.collect("good", 21, 6, &[]);
    let n = quarry_formats::inspect(Format::Episodes, &good, None)
        .unwrap()
        .count;
    assert!(n >= 3, "{n}");
    let ep = |d: &Path, k: u64| d.join(format!("episodes/episode_{k:05}.pkl"));
    let meta = |d: &Path, k: u64| d.join(format!("metadata/episode_{k:05}_meta.json"));
    let inspect = |d: &Path| quarry_formats::inspect(Format::Episodes, d, None);
    let examine = |d: &Path| {
        let mut rec = Recorder::default();
        quarry_formats::examine(Format::Episodes, d, &mut rec).unwrap();
        rec
    };

    // A truncated pickle, as the collector's fault flag leaves it.
    let cut = e.collect("cut", 21, 6, &["--truncate_seeds", "21"]);
    invalid_at(inspect(&cut), &ep(&cut, 0), "truncated");
    let r = merge_err(&e, &[good.clone(), cut.clone()], "m-cut");
    invalid_at(r, &ep(&cut, 0), "truncated");
    let rec = examine(&cut);
    assert!(rec.problem_at(&ep(&cut, 0)).unwrap().contains("truncated"));
    assert_eq!(rec.samples.len() as u64, n);

    // Trailing bytes after the pickle.
    let tail = e.path("tail");
    copy_tree(&good, &tail);
    let mut data = std::fs::read(ep(&tail, 1)).unwrap();
    data.extend_from_slice(b"junk");
    std::fs::write(ep(&tail, 1), data).unwrap();
    invalid_at(inspect(&tail), &ep(&tail, 1), "longer than expected");

    // Missing metadata.
    let nometa = e.path("nometa");
    copy_tree(&good, &nometa);
    std::fs::remove_file(meta(&nometa, 2)).unwrap();
    invalid_at(inspect(&nometa), &meta(&nometa, 2), "has no metadata");
    let r = merge_err(&e, &[good.clone(), nometa.clone()], "m-nometa");
    invalid_at(r, &meta(&nometa, 2), "has no metadata");
    let rec = examine(&nometa);
    assert!(
        rec.problem_at(&meta(&nometa, 2)).is_some(),
        "{:?}",
        rec.problems
    );
    // Its episode is still a sample, with its file size but no statistics.
    assert_eq!(rec.samples[2].keys().collect::<Vec<_>>(), ["file_bytes"]);

    // A gap: episode 1 and its metadata gone.
    let gap = e.path("gap");
    copy_tree(&good, &gap);
    std::fs::remove_file(ep(&gap, 1)).unwrap();
    std::fs::remove_file(meta(&gap, 1)).unwrap();
    invalid_at(inspect(&gap), &ep(&gap, 1), "without gaps");
    assert!(examine(&gap).problem_at(&ep(&gap, 1)).is_some());

    // Metadata that does not parse, or names another episode.
    let badjson = e.path("badjson");
    copy_tree(&good, &badjson);
    std::fs::write(meta(&badjson, 1), b"{\"episode_idx\": 1,").unwrap();
    invalid_at(inspect(&badjson), &meta(&badjson, 1), "invalid JSON");
    let rec = examine(&badjson);
    assert!(
        rec.problem_at(&meta(&badjson, 1))
            .unwrap()
            .contains("invalid JSON")
    );
    let wrongidx = e.path("wrongidx");
    copy_tree(&good, &wrongidx);
    let m = std::fs::read_to_string(meta(&wrongidx, 1)).unwrap();
    std::fs::write(
        meta(&wrongidx, 1),
        m.replace("\"episode_idx\": 1", "\"episode_idx\": 7"),
    )
    .unwrap();
    invalid_at(inspect(&wrongidx), &meta(&wrongidx, 1), "episode_idx is 7");

    // An empty episode file; a stray file; a missing summary.
    let empty = e.path("empty");
    copy_tree(&good, &empty);
    std::fs::write(ep(&empty, 0), b"").unwrap();
    invalid_at(inspect(&empty), &ep(&empty, 0), "empty");
    let stray = e.path("stray");
    copy_tree(&good, &stray);
    std::fs::write(stray.join("episodes/notes.txt"), b"x").unwrap();
    invalid_at(
        inspect(&stray),
        &stray.join("episodes/notes.txt"),
        "unexpected",
    );
    let nosum = e.path("nosum");
    copy_tree(&good, &nosum);
    std::fs::remove_file(nosum.join("metadata/collection_summary.json")).unwrap();
    invalid_at(
        inspect(&nosum),
        &nosum.join("metadata/collection_summary.json"),
        "missing",
    );

    // A merge checks the committed count.
    let counts = [n + 1];
    let r = quarry_formats::merge(
        Format::Episodes,
        std::slice::from_ref(&good),
        &counts,
        &MergeOptions {
            limit: 100,
            ..MergeOptions::default()
        },
        &e.path("m-count"),
    );
    invalid_at(r, &good, "committed with");
}

fn merge_err(e: &Env, inputs: &[PathBuf], out: &str) -> Result<MergeSummary, DatasetError> {
    // Counts as the files say (the damaged input cannot be inspected).
    let counts: Vec<u64> = inputs
        .iter()
        .map(|p| std::fs::read_dir(p.join("episodes")).unwrap().count() as u64)
        .collect();
    let o = MergeOptions {
        limit: 1000,
        ..MergeOptions::default()
    };
    quarry_formats::merge(Format::Episodes, inputs, &counts, &o, &e.path(out))
}
