//! Cross-checks `quarry_formats::jsonl` against Python: rounds written by the example
//! generator (`deploy/examples/jsonl_gen.py`, nested fields), merged here, and compared byte
//! for byte with Python's own merge of the same rounds (filter, de-duplication on canonical
//! JSON, cut), which `json.loads` reads back line by line.
//!
//! Needs Python 3; fails (never skips) without it. `QUARRY_TEST_PYTHON` names the
//! interpreter (default `python3`).
#![allow(clippy::unwrap_used)] // test code may unwrap

mod pyhelp;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pyhelp::{Recorder, example, python, run};
use quarry_formats::{DatasetError, Filter, Format, MergeOptions, MergeSummary};

/// Python's reference merge. argv: a JSON spec `{"inputs": [...], "merges": [{"out", "limit",
/// "filter": [field, op, value] | null, "dedup": [...]}]}`; checks each output equals its
/// reference byte for byte and that every line loads; prints per merge `{"samples",
/// "filtered", "duplicates"}` as a JSON list.
const CHECK: &str = r#"
import sys, json, operator
OPS = {'<': operator.lt, '<=': operator.le, '>': operator.gt, '>=': operator.ge,
       '==': operator.eq, '!=': operator.ne}

def get(v, field):
    for part in field.split('.'):
        v = v[part] if isinstance(v, dict) else v[int(part)]
    return v

def lines(path):
    with open(path, 'rb') as f:
        data = f.read()
    out = data.split(b'\n')
    if out[-1] == b'':
        out.pop()
    return [l + b'\n' for l in out]

def reference(inputs, limit, filt, dedup):
    out, filtered, dups, seen = [], 0, 0, set()
    for path in inputs:
        if len(out) >= limit:
            break
        for raw in lines(path):
            v = json.loads(raw)
            if filt and not OPS[filt[1]](float(get(v, filt[0])), filt[2]):
                filtered += 1
                continue
            if dedup:
                key = tuple(json.dumps(get(v, f), sort_keys=True, separators=(',', ':'))
                            for f in dedup)
                if key in seen:
                    dups += 1
                    continue
                seen.add(key)
            out.append(raw)
            if len(out) >= limit:
                break
    return b''.join(out), len(out), filtered, dups

spec = json.load(open(sys.argv[1]))
res = []
for m in spec['merges']:
    want, n, filtered, dups = reference(spec['inputs'], m['limit'], m['filter'], m['dedup'])
    with open(m['out'], 'rb') as f:
        got = f.read()
    assert got == want, (m, got[:300], want[:300])
    assert all(isinstance(json.loads(l), dict) for l in got.splitlines())
    res.append({'samples': n, 'filtered': filtered, 'duplicates': dups})
print(json.dumps(res))
"#;

/// Per line of a file: its numeric fields (dotted, bools as 0/1, numeric arrays flattened).
const FIELDS: &str = r#"
import sys, json
def flat(a, out):
    for x in a:
        if isinstance(x, list):
            if not flat(x, out):
                return False
        elif isinstance(x, (bool, int, float)):
            out.append(float(x))
        else:
            return False
    return True
def walk(prefix, v, row):
    if isinstance(v, dict):
        for k, x in v.items():
            walk(prefix + '.' + k if prefix else k, x, row)
    elif isinstance(v, list):
        out = []
        if flat(v, out) and out:
            row[prefix] = out
    elif isinstance(v, (bool, int, float)):
        row[prefix] = [float(v)]
rows = []
for line in open(sys.argv[1], 'rb').read().splitlines():
    row = {}
    walk('', json.loads(line), row)
    rows.append(row)
print(json.dumps(rows))
"#;

struct Env {
    py: String,
    dir: tempfile::TempDir,
}

fn env() -> Env {
    Env {
        py: python(&["json"]),
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn script(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A round written by the example generator.
    fn generate(&self, name: &str, seed: u64, batch: u64, extra: &[&str]) -> PathBuf {
        let out = self.path(name);
        let sidecar = self.path(&format!("{name}.stats.json"));
        let mut args: Vec<String> = vec![
            "--seed".into(),
            seed.to_string(),
            "--object".into(),
            "mug".into(),
            "--batch_size".into(),
            batch.to_string(),
            "--out".into(),
            out.display().to_string(),
            "--stats".into(),
            sidecar.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        run(&self.py, &example("jsonl_gen.py"), &args);
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
        assert_eq!(st["attempts"], batch);
        out
    }
}

const SCHEMA: &str =
    "jsonl keys [energy, joints, metrics, note, object, pose, seed, tags, trial, valid]";

fn merge(inputs: &[PathBuf], o: &MergeOptions, out: &Path) -> Result<MergeSummary, DatasetError> {
    let counts: Vec<u64> = inputs
        .iter()
        .map(|p| {
            quarry_formats::inspect(Format::Jsonl, p, None)
                .unwrap()
                .count
        })
        .collect();
    quarry_formats::merge(Format::Jsonl, inputs, &counts, o, out)
}

fn options(limit: u64, filter: Option<&str>, dedup: &[&str]) -> MergeOptions {
    MergeOptions {
        limit,
        filter: filter.map(|f| Filter::parse(f).unwrap()),
        dedup: dedup.iter().map(|s| s.to_string()).collect(),
        video_files_size_in_mb: None,
    }
}

/// Rounds: plain, without a final newline, with CRLF endings, empty, and a copy of round 0.
fn rounds(e: &Env) -> Vec<PathBuf> {
    let r0 = e.generate("r0.jsonl", 1, 30, &[]);
    let r1 = e.generate("r1.jsonl", 2, 25, &["--no_final_newline"]);
    let r2 = e.generate("r2.jsonl", 3, 20, &["--crlf"]);
    let r3 = e.generate("r3.jsonl", 4, 10, &["--success_rate", "0"]);
    let r4 = e.path("r4.jsonl");
    std::fs::copy(&r0, &r4).unwrap();
    vec![r0, r1, r2, r3, r4]
}

#[test]
fn merges_like_python() {
    let e = env();
    let check = e.script("check.py", CHECK);
    let inputs = rounds(&e);
    let mut counts = Vec::new();
    for p in &inputs {
        let i = quarry_formats::inspect(Format::Jsonl, p, None).unwrap();
        let lines = std::fs::read(p)
            .unwrap()
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64;
        assert_eq!((i.count, i.kept), (lines, lines));
        assert_eq!(i.schema, if lines == 0 { "jsonl empty" } else { SCHEMA });
        counts.push(lines);
    }
    assert!(
        counts[0] > 5 && counts[1] > 5 && counts[2] > 5 && counts[3] == 0,
        "{counts:?}"
    );
    assert!(!std::fs::read(&inputs[1]).unwrap().ends_with(b"\n"));
    let total: u64 = counts.iter().sum();
    type Spec = (u64, Option<&'static str>, &'static [&'static str]);
    let cases: Vec<Spec> = vec![
        (1000, None, &[]),
        // Ends on round 1's last line (no newline in the input); cuts inside round 2.
        (counts[0] + counts[1], None, &[]),
        (counts[0] + counts[1] + 3, None, &[]),
        (0, None, &[]),
        (total, Some("metrics.E_pen <= 0.02"), &[]),
        (1000, Some("valid == 1"), &[]),
        (1000, Some("pose.pos.0 > 0"), &[]),
        // The copy of round 0 is dropped whole; so is any repeated pose.
        (1000, None, &["pose", "joints"]),
        (1000, Some("energy < 3"), &["metrics.steps", "tags"]),
        (4, None, &["metrics.steps"]),
    ];
    let mut merges = Vec::new();
    let mut got = Vec::new();
    for (n, (limit, filter, dedup)) in cases.iter().enumerate() {
        let out = e.path(&format!("merged{n}.jsonl"));
        let s = merge(&inputs, &options(*limit, *filter, dedup), &out).unwrap();
        assert_eq!(s.bytes_written, std::fs::metadata(&out).unwrap().len());
        let back = quarry_formats::inspect(Format::Jsonl, &out, None).unwrap();
        assert_eq!(back.count, s.samples);
        got.push(serde_json::json!({
            "samples": s.samples, "filtered": s.filtered, "duplicates": s.duplicates
        }));
        merges.push(serde_json::json!({
            "out": out,
            "limit": limit,
            "filter": filter.map(|f| {
                let f = Filter::parse(f).unwrap();
                let op = f.to_string().split_whitespace().nth(1).unwrap().to_string();
                serde_json::json!([f.field, op, f.value])
            }),
            "dedup": dedup,
        }));
    }
    let spec = e.path("spec.json");
    std::fs::write(
        &spec,
        serde_json::to_vec(&serde_json::json!({"inputs": inputs, "merges": merges})).unwrap(),
    )
    .unwrap();
    let said = run(&e.py, &check, &[spec.display().to_string()]);
    let want: Vec<serde_json::Value> = serde_json::from_str(said.trim()).unwrap();
    assert_eq!(got, want);
    assert_eq!(want[0]["samples"], total);
    for i in [4, 5, 6] {
        assert!(want[i]["filtered"].as_u64().unwrap() > 0, "case {i}");
    }
    assert_eq!(want[7]["duplicates"], counts[0]);
    assert!(want[8]["duplicates"].as_u64().unwrap() > 0);
    assert_eq!(want[9]["samples"], 4);
    // CRLF lines are copied as they are.
    let all = std::fs::read(e.path("merged0.jsonl")).unwrap();
    assert!(all.windows(2).any(|w| w == b"\r\n"));
}

#[test]
fn merges_are_deterministic() {
    let e = env();
    let inputs = rounds(&e);
    let o = options(
        40,
        Some("metrics.E_pen < 0.03"),
        &["metrics.steps", "tags", "valid"],
    );
    let (a, b) = (e.path("a.jsonl"), e.path("b.jsonl"));
    let sa = merge(&inputs, &o, &a).unwrap();
    assert_eq!(sa, merge(&inputs, &o, &b).unwrap());
    assert!(sa.samples > 0 && sa.duplicates > 0);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(matches!(
        merge(&inputs, &o, &a).unwrap_err(),
        DatasetError::Io { op: "create", .. }
    ));
    // The generator is deterministic too.
    let g1 = e.generate("g1.jsonl", 9, 12, &[]);
    let g2 = e.generate("g2.jsonl", 9, 12, &[]);
    assert_eq!(std::fs::read(g1).unwrap(), std::fs::read(g2).unwrap());
}

#[test]
fn examine_and_filters_agree_with_python() {
    let e = env();
    let fields = e.script("fields.py", FIELDS);
    let r = e.generate("x.jsonl", 7, 40, &["--no_final_newline"]);
    let want: Vec<BTreeMap<String, Vec<f64>>> =
        serde_json::from_str(run(&e.py, &fields, &[r.display().to_string()]).trim()).unwrap();
    let mut rec = Recorder::default();
    let n = quarry_formats::examine(Format::Jsonl, &r, &mut rec).unwrap();
    assert_eq!(n, want.len() as u64);
    assert!(rec.problems.is_empty(), "{:?}", rec.problems);
    assert_eq!(rec.samples, want);
    assert!(want[0].contains_key("metrics.E_pen") && want[0].contains_key("joints"));

    let passing = want.iter().filter(|row| row["valid"] == [1.0]).count() as u64;
    let f = Filter::parse("valid != 0").unwrap();
    let i = quarry_formats::inspect(Format::Jsonl, &r, Some(&f)).unwrap();
    assert_eq!((i.count, i.kept), (n, passing));
}

fn invalid_at<T: std::fmt::Debug>(r: Result<T, DatasetError>, path: &str, what: &str) {
    match r {
        Err(DatasetError::Invalid { path: p, reason }) => {
            assert_eq!(p, path, "{reason}");
            assert!(reason.contains(what), "{p}: {reason} (wanted {what:?})");
        }
        other => panic!("expected Invalid at {path}: {other:?}"),
    }
}

#[test]
fn damaged_rounds_are_rejected_with_file_and_line() {
    let e = env();
    let good = e.generate("good.jsonl", 5, 20, &[]);
    let inspect = |p: &Path| quarry_formats::inspect(Format::Jsonl, p, None);
    let at = |p: &Path, line: u64| format!("{}:line {line}", p.display());

    // Invalid JSON on line 2, as the generator's fault flag writes it.
    let bad = e.generate("bad.jsonl", 5, 20, &["--bad_line_seeds", "5"]);
    invalid_at(inspect(&bad), &at(&bad, 2), "invalid JSON");
    let counts = [inspect(&good).unwrap().count, 20];
    let r = quarry_formats::merge(
        Format::Jsonl,
        &[good.clone(), bad.clone()],
        &counts,
        &options(1000, None, &[]),
        &e.path("m-bad.jsonl"),
    );
    invalid_at(r, &at(&bad, 2), "invalid JSON");
    let mut rec = Recorder::default();
    let n = quarry_formats::examine(Format::Jsonl, &bad, &mut rec).unwrap();
    assert_eq!(rec.problems.len(), 1, "{:?}", rec.problems);
    assert_eq!(rec.problems[0].0, at(&bad, 2));
    assert_eq!(n, counts[0] - 1);

    let text = std::fs::read_to_string(&good).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let write = |name: &str, body: String| {
        let p = e.path(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    // A blank line (line 3), a trailing blank line, a non-object line, other keys.
    let blank = write(
        "blank.jsonl",
        format!("{}\n{}\n\n{}\n", lines[0], lines[1], lines[2]),
    );
    invalid_at(inspect(&blank), &at(&blank, 3), "blank line");
    let trailing = write("trailing.jsonl", format!("{}\n \n", lines[0]));
    invalid_at(inspect(&trailing), &at(&trailing, 2), "blank line");
    let array = write("array.jsonl", format!("{}\n[1, 2]\n", lines[0]));
    invalid_at(
        inspect(&array),
        &at(&array, 2),
        "an array where a JSON object",
    );
    let keys = write(
        "keys.jsonl",
        format!("{}\n{{\"object\": \"mug\"}}\n", lines[0]),
    );
    invalid_at(inspect(&keys), &at(&keys, 2), "keys differ");

    // Inputs with different keys do not merge; the error names the input.
    let other = write("other.jsonl", "{\"a\": 1}\n{\"a\": 2}\n".into());
    let r = quarry_formats::merge(
        Format::Jsonl,
        &[good.clone(), other.clone()],
        &[counts[0], 2],
        &options(1000, None, &[]),
        &e.path("m-other.jsonl"),
    );
    match r.unwrap_err() {
        DatasetError::Mismatch { input, what } => {
            assert_eq!(input, 1);
            assert!(what.contains(&at(&other, 1)), "{what}");
        }
        e => panic!("{e}"),
    }
    // A filter or dedup field a line lacks names the file and line.
    let f = Filter::parse("metrics.E_tot < 1").unwrap();
    match quarry_formats::inspect(Format::Jsonl, &good, Some(&f)).unwrap_err() {
        DatasetError::Filter { path, reason } => {
            assert_eq!(path, at(&good, 1));
            assert!(reason.contains("metrics.E_tot"), "{reason}");
        }
        e => panic!("{e}"),
    }
    let r = merge(
        std::slice::from_ref(&good),
        &options(5, None, &["tags.7"]),
        &e.path("m-dd.jsonl"),
    );
    assert!(
        matches!(&r, Err(DatasetError::Filter { path, .. }) if *path == at(&good, 1)),
        "{r:?}"
    );
    let s = quarry_formats::merge(
        Format::Jsonl,
        std::slice::from_ref(&good),
        &[counts[0] + 1],
        &options(1000, None, &[]),
        &e.path("m-count.jsonl"),
    );
    invalid_at(s, &good.display().to_string(), "committed with");
}
