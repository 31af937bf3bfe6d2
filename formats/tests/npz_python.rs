//! Cross-checks `quarry_formats::npz` against numpy: rounds written by `np.savez` and
//! `np.savez_compressed`, merged here, loaded back by `np.load` and compared with Python's own
//! `{k: np.concatenate([...])[mask][:limit]}`.
//!
//! Needs a Python with numpy; fails (never skips) without one. `QUARRY_TEST_PYTHON` names
//! the interpreter (default `python3`).
#![allow(clippy::unwrap_used)] // test helpers may unwrap

mod pyhelp;

use std::path::{Path, PathBuf};
use std::process::Command;

use quarry_formats::{DatasetError, Filter, Format, MergeOptions, Observer};

const GEN: &str = r#"
import sys, numpy as np

def write(path, seed, n, mode):
    rng = np.random.default_rng(seed)
    action = rng.standard_normal((n, 3))
    # Duplicates: seeds 0 and 1 share row 0's action; seed 3's row 1 repeats its row 0.
    if seed < 2 and n > 0:
        action[0] = [1.0, 2.0, 3.0]
    if seed == 3 and n > 1:
        action[1] = action[0]
    arrays = {
        'obs': rng.standard_normal((n, 5)).astype('<f4'),
        'action': action,
        'success': rng.random(n) < 0.7,
        'score': rng.random(n).astype('<f4'),
        'idx': (np.arange(n) + 1000 * seed).astype('>i8'),
        'img': rng.integers(0, 255, (n, 2, 3), dtype='u1'),
        'half': rng.standard_normal(n).astype('<f2'),
    }
    if mode.endswith('obj'):
        meta = np.empty(n, dtype=object)
        meta[:] = [{'seed': seed, 'i': i, 'tag': 'r%d' % i} for i in range(n)]
        arrays['meta'] = meta
    if mode.startswith('compressed'):
        np.savez_compressed(path, **arrays)
    else:
        np.savez(path, **arrays)

for spec in sys.argv[1:]:
    path, seed, n, mode = spec.split(':')
    write(path, int(seed), int(n), mode)
"#;

const CHECK: &str = r#"
import sys, zipfile, numpy as np
ninputs = int(sys.argv[1])
inputs = sys.argv[2:2 + ninputs]
loaded = [dict(np.load(p, allow_pickle=True)) for p in inputs]
order = [list(np.load(p, allow_pickle=True).keys()) for p in inputs]
t = [i for i, l in enumerate(loaded) if len(next(iter(l.values()))) > 0][0]

def eq(a, b):
    if a.dtype == object:
        return len(a) == len(b) and all(x == y for x, y in zip(a, b))
    return np.array_equal(a, b)

for spec in sys.argv[2 + ninputs:]:
    merged, limit, filt, dedup = spec.split('|')
    limit = int(limit)
    concat = {k: np.concatenate([l[k] for l in loaded]) for k in order[t]}
    n = len(concat[order[t][0]])
    mask = np.ones(n, bool)
    if filt != 'none':
        field, thr = filt.split('>=')
        mask &= concat[field] >= float(thr)
    if dedup != 'none':
        seen = set()
        for i in range(n):
            if not mask[i]:
                continue
            key = b''.join(concat[k][i].tobytes() for k in dedup.split(','))
            if key in seen:
                mask[i] = False
            seen.add(key)
    got = np.load(merged, allow_pickle=True)
    assert list(got.keys()) == order[t], (list(got.keys()), order[t])
    for k in order[t]:
        # concatenate canonicalises byte order; a merge keeps the inputs'.
        want = concat[k][mask][:limit].astype(loaded[t][k].dtype)
        g = got[k]
        assert g.dtype == want.dtype and g.shape == want.shape, (k, g.dtype, g.shape, want.dtype, want.shape)
        assert eq(g, want), k
    with zipfile.ZipFile(merged) as z, zipfile.ZipFile(inputs[t]) as zt:
        assert z.testzip() is None
        assert [i.compress_type for i in z.infolist()] == [i.compress_type for i in zt.infolist()]
    print('ok', len(got[order[t][0]]))
"#;

fn python() -> String {
    pyhelp::interpreter()
}

fn check_python() {
    pyhelp::python(&["numpy"]);
}

fn run_py(script: &str, args: &[String]) -> String {
    pyhelp::run_code(&python(), script, args)
}

fn gen_rounds(dir: &Path, mode: &str, rounds: &[(u64, u64)]) -> Vec<PathBuf> {
    let paths: Vec<PathBuf> = rounds
        .iter()
        .map(|(seed, _)| dir.join(format!("{mode}-{seed}.npz")))
        .collect();
    let args: Vec<String> = paths
        .iter()
        .zip(rounds)
        .map(|(p, (seed, n))| format!("{}:{seed}:{n}:{mode}", p.display()))
        .collect();
    run_py(GEN, &args);
    paths
}

fn counts(inputs: &[PathBuf]) -> Vec<u64> {
    inputs
        .iter()
        .map(|p| quarry_formats::inspect(Format::Npz, p, None).unwrap().count)
        .collect()
}

fn merge_and_check(dir: &Path, inputs: &[PathBuf], tag: &str, picky: bool) {
    let counts = counts(inputs);
    let total: u64 = counts.iter().sum();
    let mut cases: Vec<(u64, Option<&str>, &str)> = vec![
        (u64::MAX, None, "none"),
        (total.saturating_sub(3).max(1), None, "none"),
        (0, None, "none"),
    ];
    if picky {
        cases.extend([
            (u64::MAX, Some("score>=0.3"), "action"),
            (5, Some("score>=0.3"), "action,img"),
            (u64::MAX, None, "action"),
        ]);
    }
    let mut specs = Vec::new();
    let mut want = Vec::new();
    for (k, (limit, filter, dedup)) in cases.into_iter().enumerate() {
        let options = MergeOptions {
            limit,
            filter: filter.map(|f| Filter::parse(f).unwrap()),
            dedup: if dedup == "none" {
                vec![]
            } else {
                dedup.split(',').map(String::from).collect()
            },
            video_files_size_in_mb: None,
        };
        let out = dir.join(format!("{tag}-merged-{k}.npz"));
        let s = quarry_formats::merge(Format::Npz, inputs, &counts, &options, &out)
            .unwrap_or_else(|e| panic!("{tag} case {k}: {e}"));
        assert_eq!(s.bytes_written, std::fs::metadata(&out).unwrap().len());
        specs.push(format!(
            "{}|{}|{}|{dedup}",
            out.display(),
            limit.min(1 << 40),
            filter.unwrap_or("none")
        ));
        want.push(format!("ok {}", s.samples));
        let back = quarry_formats::inspect(Format::Npz, &out, None).unwrap();
        assert_eq!(back.count, s.samples);
        if filter.is_some() || dedup != "none" {
            let again = dir.join(format!("{tag}-merged-{k}-again.npz"));
            let s2 = quarry_formats::merge(Format::Npz, inputs, &counts, &options, &again).unwrap();
            assert_eq!(s, s2);
            assert!(
                std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(),
                "{tag} case {k}: not deterministic"
            );
        }
        if dedup == "action" && filter.is_none() {
            assert!(s.duplicates > 0, "{tag}: the rounds hold duplicates");
        }
    }
    let mut args = vec![inputs.len().to_string()];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    args.extend(specs);
    let said = run_py(CHECK, &args);
    assert_eq!(said.lines().collect::<Vec<_>>(), want, "{tag}");
}

const ROUNDS: &[(u64, u64)] = &[(0, 9), (1, 7), (2, 0), (3, 12), (4, 5)];

#[test]
fn savez_and_savez_compressed_merge_like_numpy() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    for mode in ["stored", "compressed"] {
        let inputs = gen_rounds(dir.path(), mode, ROUNDS);
        merge_and_check(dir.path(), &inputs, mode, true);
    }
    // Mixed compression follows input 0; an empty input 0 hands the layout to the next.
    let mut mixed = gen_rounds(dir.path(), "stored", &[(2, 0)]);
    mixed.extend(gen_rounds(dir.path(), "compressed", &ROUNDS[..2]));
    mixed.extend(gen_rounds(dir.path(), "stored", &ROUNDS[3..]));
    merge_and_check(dir.path(), &mixed, "mixed", true);
}

#[test]
fn object_members_merge_without_filters() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    let inputs = gen_rounds(dir.path(), "compressed-obj", ROUNDS);
    merge_and_check(dir.path(), &inputs, "obj", false);
    let c = counts(&inputs);
    let err = quarry_formats::merge(
        Format::Npz,
        &inputs,
        &c,
        &MergeOptions {
            limit: 100,
            filter: Some(Filter::parse("score >= 0.3").unwrap()),
            dedup: vec![],
            video_files_size_in_mb: None,
        },
        &dir.path().join("refused.npz"),
    )
    .unwrap_err();
    match err {
        DatasetError::Unsupported { reason } => assert!(reason.contains("meta"), "{reason}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn inspect_counts_filters_and_describes() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    let inputs = gen_rounds(dir.path(), "compressed", &[(0, 9), (2, 0)]);
    let f = Filter::parse("score >= 0.3").unwrap();
    let i = quarry_formats::inspect(Format::Npz, &inputs[0], Some(&f)).unwrap();
    assert_eq!(i.count, 9);
    let want: u64 = run_py(
        "import sys, numpy as np; print(int((np.load(sys.argv[1])['score'] >= 0.3).sum()))",
        &[inputs[0].display().to_string()],
    )
    .trim()
    .parse()
    .unwrap();
    assert_eq!(i.kept, want);
    assert_eq!(
        i.schema,
        "npz [action <f8 (*,3); half <f2 (*,); idx >i8 (*,); img |u1 (*,2,3); obs <f4 (*,5); \
         score <f4 (*,); success |b1 (*,)]"
    );
    let e = quarry_formats::inspect(Format::Npz, &inputs[1], None).unwrap();
    assert_eq!(e.count, 0);
    assert!(e.schema.ends_with(" empty"));
    let bad = Filter::parse("obs > 0").unwrap();
    assert!(matches!(
        quarry_formats::inspect(Format::Npz, &inputs[0], Some(&bad)),
        Err(DatasetError::Filter { .. })
    ));
}

#[derive(Default)]
struct Seen {
    samples: u64,
    fields: Vec<(String, usize)>,
    problems: Vec<String>,
}

impl Observer for Seen {
    fn sample(&mut self, _index: u64) {
        self.samples += 1;
    }
    fn values(&mut self, field: &str, values: &[f64]) {
        self.fields.push((field.to_string(), values.len()));
    }
    fn problem(&mut self, path: &str, _reason: &str) {
        self.problems.push(path.to_string());
    }
}

#[test]
fn damage_is_found_with_its_member() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    for mode in ["stored", "compressed"] {
        let p = gen_rounds(dir.path(), mode, &[(5, 40)]).remove(0);
        let mut seen = Seen::default();
        assert_eq!(
            quarry_formats::examine(Format::Npz, &p, &mut seen).unwrap(),
            40
        );
        assert!(seen.problems.is_empty(), "{:?}", seen.problems);
        assert!(seen.fields.contains(&("obs".to_string(), 5)));
        assert!(seen.fields.contains(&("img".to_string(), 6)));
        // Flip bytes in the middle of the obs member's data.
        let range: Vec<u64> = run_py(
            "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\ni = z.getinfo('obs.npy')\n\
             print(i.header_offset, i.compress_size)",
            &[p.display().to_string()],
        )
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
        let mut bytes = std::fs::read(&p).unwrap();
        let at = (range[0] + 100 + range[1] / 2) as usize;
        for b in &mut bytes[at..at + 4] {
            *b ^= 0x5a;
        }
        std::fs::write(&p, &bytes).unwrap();
        let want = format!("{}:obs.npy", p.display());
        match quarry_formats::inspect(Format::Npz, &p, None).unwrap_err() {
            DatasetError::Invalid { path, .. } => assert_eq!(path, want, "{mode}"),
            other => panic!("{mode}: unexpected {other}"),
        }
        let mut seen = Seen::default();
        quarry_formats::examine(Format::Npz, &p, &mut seen).unwrap();
        assert!(seen.problems.contains(&want), "{mode}: {:?}", seen.problems);
    }
}

#[test]
fn mismatches_and_ragged_members_are_refused() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    let a = gen_rounds(dir.path(), "stored", &[(0, 4)]).remove(0);
    let b = dir.path().join("b.npz");
    let ragged = dir.path().join("ragged.npz");
    run_py(
        r#"
import sys, numpy as np
np.savez(sys.argv[1], obs=np.zeros((3, 6), '<f4'))
np.savez(sys.argv[2], obs=np.zeros((3, 5), '<f4'), action=np.zeros((2, 3)))
"#,
        &[b.display().to_string(), ragged.display().to_string()],
    );
    let err = quarry_formats::merge(
        Format::Npz,
        &[a.clone(), b],
        &[4, 3],
        &MergeOptions {
            limit: 100,
            ..Default::default()
        },
        &dir.path().join("m.npz"),
    )
    .unwrap_err();
    assert!(
        matches!(err, DatasetError::Mismatch { input: 1, .. }),
        "{err}"
    );
    match quarry_formats::inspect(Format::Npz, &ragged, None).unwrap_err() {
        DatasetError::Invalid { path, .. } => assert!(path.ends_with(":action.npy"), "{path}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn example_generator_rounds_merge() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    let gen_py = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/npz_gen.py");
    let mut inputs = Vec::new();
    for seed in 0..3 {
        let out = dir.path().join(format!("g{seed}.npz"));
        let stats = dir.path().join(format!("g{seed}.json"));
        let mut cmd = Command::new(python());
        cmd.arg(&gen_py)
            .args([
                "--seed",
                &seed.to_string(),
                "--object",
                "mug",
                "--batch_size",
                "20",
            ])
            .arg("--out")
            .arg(&out)
            .arg("--stats")
            .arg(&stats);
        if seed == 1 {
            cmd.arg("--stored");
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        assert_eq!(s["attempts"], 20);
        let i = quarry_formats::inspect(Format::Npz, &out, None).unwrap();
        assert_eq!(s["successes"].as_u64().unwrap(), i.count);
        inputs.push(out);
    }
    let c = counts(&inputs);
    let out = dir.path().join("merged.npz");
    let options = MergeOptions {
        limit: 25,
        filter: Some(Filter::parse("energy <= 1.5").unwrap()),
        dedup: vec![],
        video_files_size_in_mb: None,
    };
    let s = quarry_formats::merge(Format::Npz, &inputs, &c, &options, &out).unwrap();
    let mut args = vec![inputs.len().to_string()];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    args.push(format!("{}|25|none|none", out.display()));
    // The filter is `<=`; check it with numpy directly.
    let said = run_py(
        r#"
import sys, numpy as np
n = int(sys.argv[1]); ins = sys.argv[2:2 + n]; out = sys.argv[2 + n].split('|')[0]
ls = [np.load(p) for p in ins]
got = np.load(out)
for k in ls[0].keys():
    c = np.concatenate([l[k] for l in ls])
    m = np.concatenate([l['energy'] for l in ls]) <= 1.5
    assert np.array_equal(got[k], c[m][:25]), k
print(len(got['energy']))
"#,
        &args,
    );
    assert_eq!(said.trim(), s.samples.to_string());
}
