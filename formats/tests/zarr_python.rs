//! Cross-checks `quarry_formats::zarr` against zarr-python: replay-buffer rounds written by the
//! `zarr` package (v2 and v3, default codecs, blosc variants, no compressor, gzip, zstd, F
//! order, transpose), merged here, opened back with `zarr.open_group` and compared with
//! Python's own concatenation (episode ends offset, filter, de-duplication, truncation).
//!
//! Needs a Python with numpy and zarr 3; fails (never skips) without one. `QUARRY_TEST_PYTHON`
//! names the interpreter (default `python3`).
#![allow(clippy::unwrap_used)] // test helpers may unwrap

mod pyhelp;

use std::path::{Path, PathBuf};
use std::process::Command;

use quarry_formats::{DatasetError, Filter, Format, MergeOptions, Observer};

const GEN: &str = r#"
import sys, numpy as np, zarr, numcodecs
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec, TransposeCodec

def write(path, fmt, variant, seed, episodes):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, episodes)
    if seed < 2 and episodes > 0:
        lengths[0] = 2
    if seed == 3 and episodes > 1:
        lengths[1] = lengths[0]
    rows = int(lengths.sum())
    g = zarr.open_group(path, mode='w', zarr_format=fmt)
    g.attrs['generator'] = 'test'
    g.attrs['seed'] = seed

    kw = {}
    extra = {}
    if variant == 'none':
        kw = {'compressors': None}
    elif variant == 'blosc':
        kw = {'compressors': BloscCodec() if fmt == 3 else numcodecs.Blosc()}
    elif variant == 'blosc-bit':
        kw = {'compressors': BloscCodec(cname='lz4', shuffle='bitshuffle') if fmt == 3
              else numcodecs.Blosc(cname='zstd', shuffle=numcodecs.Blosc.BITSHUFFLE)}
    elif variant == 'blosc-zlib':
        kw = {'compressors': BloscCodec(cname='zlib', shuffle='noshuffle') if fmt == 3
              else numcodecs.Blosc(cname='zlib', shuffle=numcodecs.Blosc.NOSHUFFLE)}
    elif variant == 'gzip':
        kw = {'compressors': GzipCodec() if fmt == 3 else numcodecs.GZip()}
    elif variant == 'zstd':
        kw = {'compressors': ZstdCodec() if fmt == 3 else numcodecs.Zstd()}
    elif variant == 'order':
        if fmt == 2:
            extra = {'order': 'F'}
        else:
            extra = {'filters': [TransposeCodec(order=(1, 0, 2))]}
    elif variant != 'default':
        raise SystemExit('unknown variant ' + variant)
    if variant == 'gzip':
        kw['chunk_key_encoding'] = ({'name': 'v2', 'separator': '/'} if fmt == 2
                                    else {'name': 'default', 'separator': '.'})

    def arr(name, data, chunks, **more):
        a = g.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype, **kw, **more)
        a[...] = data
        return a

    action = rng.standard_normal((rows, 7)).astype('<f4')
    # Duplicates: seeds 0 and 1 start with the same 2-step episode; seed 3's episode 1 repeats its
    # episode 0.
    if seed < 2 and episodes > 0 and lengths[0] == 2:
        action[:2] = np.arange(14, dtype='<f4').reshape(2, 7)
    if seed == 3 and episodes > 1 and lengths[0] == lengths[1]:
        action[lengths[0]:2 * lengths[0]] = action[:lengths[0]]
    arr('data/action', action, (5, 7))
    arr('data/state', rng.standard_normal((rows, 3, 2)), (4, 3, 2), **extra)
    arr('data/img', rng.integers(0, 255, (rows, 4, 6), dtype='u1'), (3, 2, 4))
    arr('meta/episode_ends', np.cumsum(lengths).astype('<i8'), (4,))
    succ = rng.random(episodes) < 0.7
    if seed % 4 == 3:
        succ[:] = False   # all fill value: zarr writes no chunk
    arr('meta/success', succ, (8,))
    arr('meta/score', rng.random(episodes).astype('<f4'), (3,))
    fps = g.create_array('meta/fps', shape=(), dtype='<i4', **kw)
    fps[...] = 30

fmt, variant = int(sys.argv[1]), sys.argv[2]
for spec in sys.argv[3:]:
    path, seed, episodes = spec.rsplit(':', 2)
    write(path, fmt, variant, int(seed), int(episodes))
"#;

const CHECK: &str = r#"
import sys, json, numpy as np, zarr
ninputs = int(sys.argv[1])
inputs = sys.argv[2:2 + ninputs]
opened = [zarr.open_group(p, mode='r') for p in inputs]

def check(merged, limit, filt, dedup):
    names = ['data/action', 'data/img', 'data/state', 'meta/score', 'meta/success']
    eps = []  # (input, episode, row0, row1)
    for g in opened:
        ends = g['meta/episode_ends'][:]
        starts = np.concatenate([[0], ends[:-1]])
        for e, (s, t) in enumerate(zip(starts, ends)):
            eps.append((g, e, s, t))
    seen = set()
    kept = []
    for g, e, s, t in eps:
        if filt != 'none':
            field, thr = filt.split('>=')
            if not g[field.replace('.', '/')][e] >= float(thr):
                continue
        if dedup != 'none':
            key = b''.join(g[f.replace('.', '/')][s:t].tobytes() for f in dedup.split(','))
            if key in seen:
                continue
            seen.add(key)
        kept.append((g, e, s, t))
    kept = kept[:limit]
    out = zarr.open_group(merged, mode='r')
    g0 = opened[[i for i, g in enumerate(opened) if g['meta/episode_ends'].shape[0] > 0][0]]
    assert out.metadata.zarr_format == g0.metadata.zarr_format
    assert dict(out.attrs) == dict(g0.attrs), (dict(out.attrs), dict(g0.attrs))
    want_ends = np.cumsum([t - s for _, _, s, t in kept]).astype('<i8')
    got_ends = out['meta/episode_ends'][:]
    assert got_ends.dtype == want_ends.dtype and np.array_equal(got_ends, want_ends), (got_ends, want_ends)
    for n in names:
        a = out[n]
        if n.startswith('data/'):
            parts = [g[n][s:t] for g, _, s, t in kept]
        else:
            parts = [g[n][e:e + 1] for g, e, _, _ in kept]
        want = np.concatenate(parts) if parts else np.zeros((0,) + g0[n].shape[1:], g0[n].dtype)
        got = a[...]
        assert got.dtype == want.dtype and got.shape == want.shape, (n, got.dtype, got.shape, want.dtype, want.shape)
        assert np.array_equal(got, want), n
        # Layout and codecs are input 0's.
        t = g0[n]
        assert a.chunks == t.chunks, (n, a.chunks, t.chunks)
        if out.metadata.zarr_format == 2:
            assert a.metadata.compressor == t.metadata.compressor, (n, a.metadata.compressor)
            assert a.metadata.order == t.metadata.order
        else:
            assert a.metadata.codecs == t.metadata.codecs, (n, a.metadata.codecs)
    assert out['meta/fps'][...] == 30
    print('ok', len(kept))

for spec in sys.argv[2 + ninputs:]:
    merged, limit, filt, dedup = spec.split('|')
    check(merged, int(limit), filt, dedup)
"#;

fn python() -> String {
    pyhelp::interpreter()
}

fn check_python() {
    pyhelp::python(&["numpy", "zarr", "numcodecs"]);
}

fn run_py(script: &str, args: &[String]) -> String {
    pyhelp::run_code(&python(), script, args)
}

/// Writes rounds `(seed, episodes)` of one format/variant; returns their paths.
fn gen_rounds(dir: &Path, fmt: u8, variant: &str, rounds: &[(u64, u64)]) -> Vec<PathBuf> {
    let paths: Vec<PathBuf> = rounds
        .iter()
        .map(|(seed, _)| dir.join(format!("v{fmt}-{variant}-{seed}.zarr")))
        .collect();
    let mut args = vec![fmt.to_string(), variant.to_string()];
    for (p, (seed, n)) in paths.iter().zip(rounds) {
        args.push(format!("{}:{seed}:{n}", p.display()));
    }
    run_py(GEN, &args);
    paths
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn counts(inputs: &[PathBuf]) -> Vec<u64> {
    inputs
        .iter()
        .map(|p| {
            quarry_formats::inspect(Format::Zarr, p, None)
                .unwrap()
                .count
        })
        .collect()
}

/// Merges with each option set and checks the result in Python; twice for filtered and
/// de-duplicated merges, which must give the same bytes.
fn merge_and_check(dir: &Path, inputs: &[PathBuf], tag: &str) {
    let counts = counts(inputs);
    let total: u64 = counts.iter().sum();
    let cases: Vec<(u64, Option<&str>, &str)> = vec![
        (u64::MAX, None, "none"),
        (total.saturating_sub(3).max(1), None, "none"),
        (u64::MAX, Some("meta.score>=0.3"), "data.action"),
        (4, Some("meta.score>=0.3"), "data.action,data.img"),
        (u64::MAX, None, "data.action"),
    ];
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
        let out = dir.join(format!("{tag}-merged-{k}.zarr"));
        let s = quarry_formats::merge(Format::Zarr, inputs, &counts, &options, &out)
            .unwrap_or_else(|e| panic!("{tag} case {k}: {e}"));
        specs.push(format!(
            "{}|{}|{}|{dedup}",
            out.display(),
            limit.min(1 << 40),
            filter.unwrap_or("none")
        ));
        want.push(format!("ok {}", s.samples));
        let back = quarry_formats::inspect(Format::Zarr, &out, None).unwrap();
        assert_eq!(back.count, s.samples);
        if k == 0 {
            assert_eq!(s.samples, total);
            assert_eq!(s.filtered + s.duplicates, 0);
        }
        if filter.is_some() || dedup != "none" {
            let again = dir.join(format!("{tag}-merged-{k}-again.zarr"));
            let s2 =
                quarry_formats::merge(Format::Zarr, inputs, &counts, &options, &again).unwrap();
            assert_eq!(s, s2);
            assert!(
                files(&out) == files(&again),
                "{tag} case {k}: not deterministic"
            );
        }
        if dedup == "data.action" && filter.is_none() {
            assert!(s.duplicates > 0, "{tag}: the rounds hold duplicates");
        }
    }
    let mut args = vec![inputs.len().to_string()];
    args.extend(inputs.iter().map(|p| p.display().to_string()));
    args.extend(specs);
    let said = run_py(CHECK, &args);
    assert_eq!(said.lines().collect::<Vec<_>>(), want, "{tag}");
}

const ROUNDS: &[(u64, u64)] = &[(0, 5), (1, 4), (2, 0), (3, 6), (4, 3)];

#[test]
fn v2_variants_merge_like_python() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    for variant in [
        "default",
        "none",
        "blosc-bit",
        "blosc-zlib",
        "zstd",
        "gzip",
        "order",
    ] {
        let inputs = gen_rounds(dir.path(), 2, variant, ROUNDS);
        merge_and_check(dir.path(), &inputs, &format!("v2-{variant}"));
    }
}

#[test]
fn v3_variants_merge_like_python() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    for variant in [
        "default",
        "none",
        "blosc",
        "blosc-bit",
        "blosc-zlib",
        "gzip",
        "order",
    ] {
        let inputs = gen_rounds(dir.path(), 3, variant, ROUNDS);
        merge_and_check(dir.path(), &inputs, &format!("v3-{variant}"));
    }
}

#[test]
fn mixed_codecs_merge_into_input_zeros() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    let mut inputs = gen_rounds(dir.path(), 3, "blosc", &ROUNDS[..2]);
    inputs.extend(gen_rounds(dir.path(), 3, "none", &ROUNDS[2..4]));
    inputs.extend(gen_rounds(dir.path(), 3, "default", &ROUNDS[4..]));
    merge_and_check(dir.path(), &inputs, "v3-mixed");
    // An empty input 0: the first input with episodes sets the layout.
    let mut with_empty = gen_rounds(dir.path(), 2, "zstd", &[(2, 0)]);
    with_empty.extend(gen_rounds(dir.path(), 2, "default", &ROUNDS[..2]));
    merge_and_check(dir.path(), &with_empty, "v2-empty-first");
}

#[test]
fn inspect_reports_schema_counts_and_filter() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    let inputs = gen_rounds(dir.path(), 3, "default", &[(0, 5), (2, 0)]);
    let f = Filter::parse("meta.score >= 0.3").unwrap();
    let i = quarry_formats::inspect(Format::Zarr, &inputs[0], Some(&f)).unwrap();
    assert_eq!(i.count, 5);
    let want: u64 = run_py(
        "import sys, zarr; print(int((zarr.open_group(sys.argv[1])['meta/score'][:] >= 0.3).sum()))",
        &[inputs[0].display().to_string()],
    )
    .trim()
    .parse()
    .unwrap();
    assert_eq!(i.kept, want);
    assert_eq!(
        i.schema,
        "zarr v3 replay [data/action <f4 (*,7); data/img |u1 (*,4,6); data/state <f8 (*,3,2); \
         meta/episode_ends <i8 (*,); meta/fps <i4 (); meta/score <f4 (*,); meta/success |b1 (*,)]"
    );
    let e = quarry_formats::inspect(Format::Zarr, &inputs[1], None).unwrap();
    assert_eq!(e.count, 0);
    assert!(e.schema.ends_with(" empty"), "{}", e.schema);
    let bad = Filter::parse("data.action > 0").unwrap();
    assert!(matches!(
        quarry_formats::inspect(Format::Zarr, &inputs[0], Some(&bad)),
        Err(DatasetError::Filter { .. })
    ));
}

#[derive(Default)]
struct Seen {
    samples: u64,
    values: Vec<(u64, String, usize)>,
    problems: Vec<(String, String)>,
    current: u64,
}

impl Observer for Seen {
    fn sample(&mut self, index: u64) {
        self.samples += 1;
        self.current = index;
    }
    fn values(&mut self, field: &str, values: &[f64]) {
        self.values
            .push((self.current, field.to_string(), values.len()));
    }
    fn problem(&mut self, path: &str, reason: &str) {
        self.problems.push((path.to_string(), reason.to_string()));
    }
}

#[test]
fn corrupted_chunks_are_flagged_with_their_path() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    for (fmt, key) in [(2u8, "1.0"), (3, "c/1/0")] {
        let inputs = gen_rounds(dir.path(), fmt, "default", &[(0, 5)]);
        let store = &inputs[0];
        let mut seen = Seen::default();
        assert_eq!(
            quarry_formats::examine(Format::Zarr, store, &mut seen).unwrap(),
            5
        );
        assert!(seen.problems.is_empty(), "{:?}", seen.problems);
        assert!(
            seen.values
                .iter()
                .any(|(s, f, n)| *s == 0 && f == "meta.score" && *n == 1)
        );
        assert!(
            seen.values
                .iter()
                .any(|(s, f, _)| *s == 4 && f == "data.action")
        );
        let chunk = store.join("data/action").join(key);
        let mut bytes = std::fs::read(&chunk).unwrap();
        let n = bytes.len();
        bytes.truncate(n / 2);
        std::fs::write(&chunk, &bytes).unwrap();
        let err = quarry_formats::inspect(Format::Zarr, store, None).unwrap_err();
        let want = format!("{}/data/action/{key}", store.display());
        match &err {
            DatasetError::Invalid { path, .. } => assert_eq!(path, &want),
            other => panic!("unexpected {other}"),
        }
        let mut seen = Seen::default();
        quarry_formats::examine(Format::Zarr, store, &mut seen).unwrap();
        assert_eq!(seen.samples, 5);
        assert!(
            seen.problems.iter().any(|(p, _)| p == &want),
            "{:?}",
            seen.problems
        );
    }
}

#[test]
fn mismatched_inputs_are_refused() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    let a = gen_rounds(dir.path(), 3, "default", &[(0, 3)]);
    let b = dir.path().join("other.zarr");
    run_py(
        r#"
import sys, numpy as np, zarr
g = zarr.open_group(sys.argv[1], mode='w', zarr_format=3)
g.create_array('data/action', shape=(4, 7), dtype='f8')[...] = 1.0
g.create_array('meta/episode_ends', shape=(2,), dtype='i8')[...] = [2, 4]
"#,
        &[b.display().to_string()],
    );
    let inputs = vec![a[0].clone(), b];
    let c = counts(&inputs);
    let err = quarry_formats::merge(
        Format::Zarr,
        &inputs,
        &c,
        &MergeOptions {
            limit: 100,
            ..Default::default()
        },
        &dir.path().join("m.zarr"),
    )
    .unwrap_err();
    assert!(
        matches!(err, DatasetError::Mismatch { input: 1, .. }),
        "{err}"
    );
    let v2 = gen_rounds(dir.path(), 2, "default", &[(1, 3)]);
    let inputs = vec![a[0].clone(), v2[0].clone()];
    let err = quarry_formats::merge(
        Format::Zarr,
        &inputs,
        &[3, 3],
        &MergeOptions {
            limit: 100,
            ..Default::default()
        },
        &dir.path().join("m2.zarr"),
    )
    .unwrap_err();
    assert!(
        matches!(err, DatasetError::Mismatch { input: 1, .. }),
        "{err}"
    );
}

/// The example generator writes stores Quarry merges and zarr reads back.
#[test]
fn example_generator_rounds_merge() {
    check_python();
    let dir = tempfile::tempdir().unwrap();
    let gen_py =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/zarr_replay_gen.py");
    for fmt in ["2", "3"] {
        let mut inputs = Vec::new();
        for seed in 0..3 {
            let out = dir.path().join(format!("gen{fmt}-{seed}.zarr"));
            let stats = dir.path().join(format!("gen{fmt}-{seed}.json"));
            let o = Command::new(python())
                .arg(&gen_py)
                .args([
                    "--seed",
                    &seed.to_string(),
                    "--object",
                    "mug",
                    "--batch_size",
                    "6",
                ])
                .args(["--format", fmt, "--out"])
                .arg(&out)
                .arg("--stats")
                .arg(&stats)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let s: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
            let i = quarry_formats::inspect(Format::Zarr, &out, None).unwrap();
            assert_eq!(s["attempts"], 6);
            assert_eq!(s["successes"].as_u64().unwrap(), i.count);
            inputs.push(out);
        }
        let c = counts(&inputs);
        let out = dir.path().join(format!("gen{fmt}-merged.zarr"));
        let s = quarry_formats::merge(
            Format::Zarr,
            &inputs,
            &c,
            &MergeOptions {
                limit: 7,
                ..Default::default()
            },
            &out,
        )
        .unwrap();
        assert_eq!(s.samples, 7.min(c.iter().sum()));
        let said = run_py(
            r#"
import sys, numpy as np, zarr
out = zarr.open_group(sys.argv[1], mode='r')
ends = out['meta/episode_ends'][:]
assert out['data/action'].shape[0] == ends[-1]
assert out['meta/success'][:].all()
print(len(ends))
"#,
            &[out.display().to_string()],
        );
        assert_eq!(said.trim(), s.samples.to_string());
    }
}
