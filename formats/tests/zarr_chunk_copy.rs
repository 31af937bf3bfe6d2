//! Zarr merges that copy chunk files whole: replay buffers in the Diffusion Policy style
//! (images compressed with imagecodecs' `Jpeg2k`, depth with `Qoi`, written by zarr-python
//! with the codecs registered as Diffusion Policy registers them), v2 `filters` and v3
//! `sharding_indexed`. Finals are read back by zarr-python and compared with the rounds;
//! chunks that do not line up, and chunks that are not what their metadata says, are
//! refused naming the array and the fix.
//!
//! Needs a Python with numpy, zarr 3 and imagecodecs (`.ci/run` installs them into
//! `.ci/venv-np2`); fails (never skips) without one. `QUARRY_TEST_PYTHON` names it.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

mod pyhelp;

use std::path::{Path, PathBuf};

use quarry_formats::{DatasetError, Filter, Format, MergeOptions};

/// Writes one round: `kind path seed spec-json`.
const GEN: &str = r#"
import sys, json, numpy as np, zarr, numcodecs
from imagecodecs.numcodecs import register_codecs, Jpeg2k, Qoi
register_codecs()
kind, path, seed, spec = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
rng = np.random.default_rng(seed)
if kind == "dp":
    # Diffusion Policy's layout: images one chunk per step, Jpeg2k and Qoi; low-dim arrays
    # one chunk for the whole round, uncompressed; episode_ends uncompressed. Chunks of
    # several steps (spec c0) hold no single image, so there LZMA and BZ2 stand in for
    # codecs Quarry does not decode.
    lengths = spec["lengths"]
    rows, c0 = sum(lengths), spec.get("c0", 1)
    rgb_codec = Jpeg2k(level=spec.get("level", 50)) if c0 == 1 else numcodecs.LZMA()
    depth_codec = Qoi() if c0 == 1 else numcodecs.BZ2()
    root = zarr.open_group(path, mode="w", zarr_format=2)
    data, meta = root.require_group("data"), root.require_group("meta")
    img = rng.integers(0, 255, (rows, 24, 32, 3), dtype=np.uint8)
    if rows > 2:
        img[2] = 0  # all fill value: zarr stores no chunk for it
    a = data.create_array("camera0_rgb", shape=img.shape, chunks=(c0, 24, 32, 3),
                          dtype=np.uint8, compressors=rgb_codec)
    a[...] = img
    depth = rng.integers(0, 255, (rows, 24, 32, 3), dtype=np.uint8)
    d = data.create_array("camera0_depth", shape=depth.shape, chunks=(c0, 24, 32, 3),
                          dtype=np.uint8, compressors=depth_codec)
    d[...] = depth
    pos = rng.standard_normal((rows, 3)).astype(np.float32)
    data.create_array("robot0_eef_pos", shape=pos.shape, chunks=(max(rows, 1), 3),
                      dtype=np.float32, compressors=None)[...] = pos
    meta.create_array("episode_ends", shape=(len(lengths),), chunks=(max(len(lengths), 1),),
                      dtype=np.int64, compressors=None)[...] = np.cumsum(lengths, dtype=np.int64)
    scores = np.asarray(spec.get("scores", [0.5] * len(lengths)), dtype=np.float32)
    meta.create_array("score", shape=scores.shape, chunks=(max(len(lengths), 1),),
                      dtype=np.float32, compressors=None)[...] = scores
elif kind == "filters":
    rows = spec["rows"]
    root = zarr.open_group(path, mode="w", zarr_format=2)
    x = (np.arange(rows * 3, dtype="<i4").reshape(rows, 3) * (seed + 1)) % 1000
    root.create_array("data/x", shape=x.shape, chunks=(spec["c0"], 3), dtype="<i4",
                      filters=[numcodecs.Delta(dtype="<i4")],
                      compressors=numcodecs.Zstd())[...] = x
elif kind == "sharded":
    rows = spec["rows"]
    root = zarr.open_group(path, mode="w", zarr_format=3)
    x = rng.standard_normal((rows, 7)).astype("<f4")
    root.create_array("data/action", shape=x.shape, chunks=(2, 7), shards=(spec["shard"], 7),
                      dtype="<f4")[...] = x
else:
    raise SystemExit("unknown kind " + kind)
"#;

/// `final limit round...`: the final equals the rounds' concatenation cut to `limit`
/// episodes (every array zarr decodes, image chunks byte for byte where chunks are one step),
/// and chunks missing from the rounds are missing from the final.
const CHECK_DP: &str = r#"
import os, sys, numpy as np, zarr
from imagecodecs.numcodecs import register_codecs
register_codecs()
final, limit, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
out = zarr.open_group(final, mode="r")
ends, parts, files, off = [], {}, [], 0
for p in rounds:
    g = zarr.open_group(p, mode="r")
    e = np.asarray(g["meta/episode_ends"][:])
    ends.extend((e + off).tolist())
    for k in g["data"].keys():
        parts.setdefault(k, []).append(np.asarray(g["data"][k][:]))
    c0 = g["data/camera0_rgb"].chunks[0]
    n = (int(e[-1]) if len(e) else 0)
    files.extend((p, r) for r in range(0, n, c0))
    off += n
ends = ends[:limit]
assert np.asarray(out["meta/episode_ends"][:]).tolist() == ends
rows = ends[-1] if ends else 0
for k, ps in parts.items():
    want = np.concatenate(ps)[:rows]
    got = np.asarray(out["data"][k][:])
    assert got.shape == want.shape and np.array_equal(got, want), k
c0 = out["data/camera0_rgb"].chunks[0]
for j in range(0, -(-rows // c0)):
    p, r = files[j]
    for k in ("camera0_rgb", "camera0_depth"):
        src = os.path.join(p, "data", k, "%d.0.0.0" % (r // c0))
        dst = os.path.join(final, "data", k, "%d.0.0.0" % j)
        assert os.path.exists(src) == os.path.exists(dst), (src, dst)
        if os.path.exists(src):
            assert open(src, "rb").read() == open(dst, "rb").read(), (src, dst)
print("ok", rows)
"#;

fn python() -> String {
    pyhelp::python(&["numpy", "zarr", "imagecodecs"])
}

fn write(dir: &Path, kind: &str, name: &str, seed: u64, spec: &str) -> PathBuf {
    let p = dir.join(name);
    pyhelp::run_code(
        &python(),
        GEN,
        &[
            kind.into(),
            p.display().to_string(),
            seed.to_string(),
            spec.into(),
        ],
    );
    p
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

fn merge(inputs: &[PathBuf], options: &MergeOptions, out: &Path) -> Result<u64, DatasetError> {
    quarry_formats::merge(Format::Zarr, inputs, &counts(inputs), options, out).map(|s| s.samples)
}

fn limit(n: u64) -> MergeOptions {
    MergeOptions {
        limit: n,
        filter: None,
        dedup: vec![],
        video_files_size_in_mb: None,
    }
}

fn check_dp(final_: &Path, limit: u64, rounds: &[PathBuf]) -> String {
    let mut args = vec![final_.display().to_string(), limit.to_string()];
    args.extend(rounds.iter().map(|p| p.display().to_string()));
    pyhelp::run_code(&python(), CHECK_DP, &args)
}

/// The reason of an error, whatever its kind.
fn reason(e: &DatasetError) -> String {
    e.to_string()
}

#[test]
fn jpeg2k_and_qoi_replay_buffers_merge_by_copying_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rounds = vec![
        write(d, "dp", "r0.zarr", 0, r#"{"lengths": [3, 4]}"#),
        write(d, "dp", "r1.zarr", 1, r#"{"lengths": [5]}"#),
        write(d, "dp", "r2.zarr", 2, r#"{"lengths": []}"#),
        write(d, "dp", "r3.zarr", 3, r#"{"lengths": [2, 2, 3]}"#),
    ];
    assert!(
        !rounds[0].join("data/camera0_rgb/2.0.0.0").exists(),
        "an all-zero frame is stored as no chunk"
    );
    for (k, n) in [(0, u64::MAX), (1, 4)] {
        let out = d.join(format!("final-{k}.zarr"));
        let samples = merge(&rounds, &limit(n), &out).unwrap();
        assert_eq!(samples, n.min(6));
        let said = check_dp(&out, n.min(6), &rounds);
        assert!(said.starts_with("ok"), "{said}");
        assert_eq!(
            quarry_formats::inspect(Format::Zarr, &out, None)
                .unwrap()
                .count,
            samples
        );
    }
    // Chunks of 4 steps, rounds of whole chunks, episodes inside them: the quota's cut
    // inside a chunk keeps that chunk whole, its rows past the cut outside the final's shape.
    let four = vec![
        write(d, "dp", "q0.zarr", 4, r#"{"lengths": [4, 4], "c0": 4}"#),
        write(d, "dp", "q1.zarr", 5, r#"{"lengths": [3, 5], "c0": 4}"#),
    ];
    let out = d.join("final-cut.zarr");
    assert_eq!(merge(&four, &limit(3), &out).unwrap(), 3);
    let said = check_dp(&out, 3, &four);
    assert_eq!(said.trim(), "ok 11");
}

#[test]
fn undecodable_arrays_that_do_not_line_up_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A round whose rows end inside a chunk: refused at inspection.
    let partial = write(d, "dp", "partial.zarr", 0, r#"{"lengths": [3], "c0": 4}"#);
    let e = quarry_formats::inspect(Format::Zarr, &partial, None).unwrap_err();
    let r = reason(&e);
    assert!(
        r.contains("data/camera0_depth") || r.contains("data/camera0_rgb"),
        "{r}"
    );
    assert!(r.contains("do not fill whole chunks of 4 rows"), "{r}");
    assert!(r.contains("chunks=(1, ...)"), "{r}");

    // A filter dropping an episode inside a chunk: refused at merge, naming the codec.
    let a = write(
        d,
        "dp",
        "a.zarr",
        1,
        r#"{"lengths": [3, 5], "c0": 4, "scores": [0.1, 0.9]}"#,
    );
    let b = write(d, "dp", "b.zarr", 2, r#"{"lengths": [4], "c0": 4}"#);
    let options = MergeOptions {
        limit: u64::MAX,
        filter: Some(Filter::parse("meta.score >= 0.5").unwrap()),
        dedup: vec![],
        video_files_size_in_mb: None,
    };
    let e = merge(&[a.clone(), b], &options, &d.join("filtered.zarr")).unwrap_err();
    match &e {
        DatasetError::Mismatch { input: 0, what } => {
            assert!(what.contains("data/camera0_depth"), "{what}");
            assert!(what.contains("bz2"), "{what}");
            assert!(what.contains("use a codec Quarry decodes"), "{what}");
        }
        other => panic!("unexpected {other}"),
    }

    // Another Jpeg2k level in a later round: its chunks are not the final's encoding.
    let c = write(d, "dp", "c.zarr", 3, r#"{"lengths": [2], "level": 30}"#);
    let first = write(d, "dp", "first.zarr", 4, r#"{"lengths": [2]}"#);
    let e = merge(&[first, c], &limit(u64::MAX), &d.join("levels.zarr")).unwrap_err();
    match &e {
        DatasetError::Mismatch { input: 1, what } => {
            assert!(what.contains("data/camera0_rgb"), "{what}");
            assert!(what.contains("differ from input 0's"), "{what}");
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn chunks_that_are_not_what_the_metadata_says_fail_inspection() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (case, damage) in [
        ("jpeg2k cut", "data/camera0_rgb/1.0.0.0"),
        ("qoi cut", "data/camera0_depth/0.0.0.0"),
        ("outside the grid", "data/camera0_rgb/9.0.0.0"),
    ] {
        let p = write(
            d,
            "dp",
            &format!("{}.zarr", case.replace(' ', "_")),
            0,
            r#"{"lengths": [2, 3]}"#,
        );
        assert!(quarry_formats::inspect(Format::Zarr, &p, None).is_ok());
        let f = p.join(damage);
        if case == "outside the grid" {
            std::fs::copy(p.join("data/camera0_rgb/0.0.0.0"), &f).unwrap();
        } else {
            let bytes = std::fs::read(&f).unwrap();
            std::fs::write(&f, &bytes[..bytes.len() - 5]).unwrap();
        }
        let e = quarry_formats::inspect(Format::Zarr, &p, None).unwrap_err();
        match &e {
            DatasetError::Invalid { path, reason } => {
                assert_eq!(path, &format!("{}/{damage}", p.display()), "{case}");
                let want = if case == "outside the grid" {
                    "outside the array's grid"
                } else {
                    "truncated"
                };
                assert!(reason.contains(want), "{case}: {reason}");
            }
            other => panic!("{case}: unexpected {other}"),
        }
    }
}

/// Reads `data/<array>` of each store with zarr and prints whether the first equals the
/// others concatenated.
const CONCAT: &str = r#"
import sys, numpy as np, zarr
arr, final, rounds = sys.argv[1], sys.argv[2], sys.argv[3:]
got = zarr.open_group(final, mode="r")["data/" + arr][:]
want = np.concatenate([zarr.open_group(p, mode="r")["data/" + arr][:] for p in rounds])
print(got.shape == want.shape and bool(np.array_equal(got, want)))
"#;

fn concat_equal(array: &str, final_: &Path, rounds: &[PathBuf]) -> bool {
    let mut args = vec![array.to_string(), final_.display().to_string()];
    args.extend(rounds.iter().map(|p| p.display().to_string()));
    pyhelp::run_code(&python(), CONCAT, &args).trim() == "True"
}

#[test]
fn v2_filters_merge_whole_chunks_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rounds = vec![
        write(d, "filters", "f0.zarr", 0, r#"{"rows": 4, "c0": 2}"#),
        write(d, "filters", "f1.zarr", 1, r#"{"rows": 6, "c0": 2}"#),
    ];
    let out = d.join("final.zarr");
    assert_eq!(merge(&rounds, &limit(u64::MAX), &out).unwrap(), 10);
    assert!(concat_equal("x", &out, &rounds));
    // Rows that do not fill the chunks: refused, naming the array and its filters.
    let odd = write(d, "filters", "odd.zarr", 2, r#"{"rows": 5, "c0": 2}"#);
    let r = reason(&quarry_formats::inspect(Format::Zarr, &odd, None).unwrap_err());
    assert!(r.contains("data/x") && r.contains("filters [delta]"), "{r}");
    // Another chunk shape than the first round's: refused at merge.
    let other = write(d, "filters", "c3.zarr", 3, r#"{"rows": 6, "c0": 3}"#);
    let e = merge(
        &[rounds[0].clone(), other],
        &limit(u64::MAX),
        &d.join("x.zarr"),
    )
    .unwrap_err();
    match &e {
        DatasetError::Mismatch { input: 1, what } => {
            assert!(
                what.contains("data/x") && what.contains("filters [delta]"),
                "{what}"
            )
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn sharded_arrays_merge_whole_shards_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rounds = vec![
        write(d, "sharded", "s0.zarr", 0, r#"{"rows": 8, "shard": 4}"#),
        write(d, "sharded", "s1.zarr", 1, r#"{"rows": 4, "shard": 4}"#),
    ];
    let out = d.join("final.zarr");
    assert_eq!(merge(&rounds, &limit(u64::MAX), &out).unwrap(), 12);
    assert!(concat_equal("action", &out, &rounds));
    let odd = write(d, "sharded", "odd.zarr", 2, r#"{"rows": 6, "shard": 4}"#);
    let r = reason(&quarry_formats::inspect(Format::Zarr, &odd, None).unwrap_err());
    assert!(
        r.contains("data/action")
            && r.contains("sharding_indexed")
            && r.contains("fill whole chunks"),
        "{r}"
    );
}
