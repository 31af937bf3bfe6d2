//! Zarr replay buffers whose images no Quarry decoder reads, end to end: a `coordinator
//! run` job whose generator writes Diffusion-Policy-style rounds (camera images compressed
//! with imagecodecs' `Jpeg2k`, depth with `Qoi`, registered as Diffusion Policy registers
//! them) merges them by copying chunk files, and zarr reads the final back equal to the
//! rounds. One round per object is hostile (a truncated Jpeg2k chunk; a chunk key outside
//! the array's grid): that round alone is lost, with a reason naming the chunk.
//!
//! Needs `QUARRY_TEST_PYTHON` with numpy, zarr 3 and imagecodecs (`.ci/run` installs them).

use std::path::Path;

use quarry_proto::v1 as pb;
use quarry_tests::*;

/// The generator: one round as a zarr v2 replay buffer, everything a function of (seed,
/// object); `--bad SEED:KIND,...` damages the round of those seeds.
const GEN: &str = r#"
import argparse, os, shutil, zlib, numpy as np, zarr
from imagecodecs.numcodecs import register_codecs, Jpeg2k, Qoi
register_codecs()
p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, required=True)
p.add_argument("--object", required=True)
p.add_argument("--out", required=True)
p.add_argument("--bad", default="")
a = p.parse_args()
rng = np.random.default_rng([a.seed, zlib.crc32(a.object.encode())])
lengths = [int(x) for x in rng.integers(2, 6, 1 + a.seed % 3)]
rows = sum(lengths)
tmp = a.out + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
root = zarr.open_group(tmp, mode="w", zarr_format=2)
root.attrs["seed"] = a.seed
data, meta = root.require_group("data"), root.require_group("meta")
img = rng.integers(0, 255, (rows, 16, 16, 3), dtype=np.uint8)
data.create_array("camera0_rgb", shape=img.shape, chunks=(1, 16, 16, 3), dtype=np.uint8,
                  compressors=Jpeg2k(level=50))[...] = img
depth = rng.integers(0, 255, (rows, 16, 16, 3), dtype=np.uint8)
data.create_array("camera0_depth", shape=depth.shape, chunks=(1, 16, 16, 3), dtype=np.uint8,
                  compressors=Qoi())[...] = depth
pos = rng.standard_normal((rows, 3)).astype(np.float32)
data.create_array("robot0_eef_pos", shape=pos.shape, chunks=pos.shape, dtype=np.float32,
                  compressors=None)[...] = pos
meta.create_array("episode_ends", shape=(len(lengths),), chunks=(len(lengths),),
                  dtype=np.int64, compressors=None)[...] = np.cumsum(lengths)
bad = dict(b.split(":") for b in a.bad.split(",") if b)
kind = bad.get(str(a.seed))
chunk = os.path.join(tmp, "data", "camera0_rgb", "0.0.0.0")
if kind == "truncated":
    b = open(chunk, "rb").read()
    open(chunk, "wb").write(b[: len(b) - 7])
elif kind == "grid":
    shutil.copy(chunk, os.path.join(tmp, "data", "camera0_rgb", "%d.0.0.0" % (rows + 3)))
shutil.rmtree(a.out, ignore_errors=True)
os.rename(tmp, a.out)
"#;

/// `final gen object limit seeds-json`: the final equals the rounds of those seeds
/// (regenerated) concatenated and cut to `limit` episodes, read by zarr with imagecodecs,
/// and its image chunk files are the rounds' byte for byte.
const CHECK: &str = r#"
import json, os, subprocess, sys, tempfile, numpy as np, zarr
from imagecodecs.numcodecs import register_codecs
register_codecs()
final, gen, obj, limit, seeds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
tmp = tempfile.mkdtemp()
ends, parts, frames, off = [], {}, [], 0
for s in seeds:
    p = os.path.join(tmp, "%d.zarr" % s)
    subprocess.run([sys.executable, gen, "--seed", str(s), "--object", obj, "--out", p], check=True)
    g = zarr.open_group(p, mode="r")
    e = np.asarray(g["meta/episode_ends"][:])
    ends.extend((e + off).tolist())
    for k in g["data"].keys():
        parts.setdefault(k, []).append(np.asarray(g["data"][k][:]))
    frames.extend((p, r) for r in range(int(e[-1])))
    off += int(e[-1])
out = zarr.open_group(final, mode="r")
ends = ends[:limit]
assert np.asarray(out["meta/episode_ends"][:]).tolist() == ends
rows = ends[-1]
for k, ps in parts.items():
    want = np.concatenate(ps)[:rows]
    got = np.asarray(out["data"][k][:])
    assert got.shape == want.shape and np.array_equal(got, want), k
for j in range(rows):
    p, r = frames[j]
    for k in ("camera0_rgb", "camera0_depth"):
        a = open(os.path.join(p, "data", k, "%d.0.0.0" % r), "rb").read()
        b = open(os.path.join(final, "data", k, "%d.0.0.0" % j), "rb").read()
        assert a == b, (k, j)
print("ok", rows)
"#;

/// The job; `bad` is the generator's `--bad` list, `tail` goes at the end of the job file.
fn job(root: &Path, generator: &Path, bad: &str, tail: &str) -> String {
    format!(
        r#"
exp_name = "jp2k"
objects = ["mug", "bowl"]
target_count_per_object = 6
round_batch_size = 3
seed_base = 3
seed_stride = 100
retries = 0
root = "{root}"

[generator]
argv = ["{py}", "{gen}", "--seed", "{{seed}}", "--object", "{{object}}",
        "--out", "out/{{name}}/replay.zarr", "--bad", "{bad}"]
output = "out/{{name}}/replay.zarr"
round_dir = "out/{{name}}"
{tail}
"#,
        root = root.display(),
        py = python(),
        gen = generator.display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jpeg2k_replay_buffers_merge_and_a_damaged_round_alone_is_lost() {
    let root = tempfile::tempdir().expect("tempdir");
    let generator = root.path().join("dp_gen.py");
    std::fs::write(&generator, GEN).expect("write generator");
    let job_file = root.path().join("job.toml");
    std::fs::write(
        &job_file,
        job(root.path(), &generator, "4:truncated,104:grid", ""),
    )
    .expect("write job");
    let job_file = job_file.to_str().expect("utf-8 path").to_string();
    let out = run(&["--job", &job_file, "--progress", "off", "--gpus", "0,1"])
        .await
        .expect("job runs");
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), "jp2k");
    for (object, bad_seed, why) in [
        ("mug", 4, "truncated"),
        ("bowl", 104, "outside the array's grid"),
    ] {
        let entry = &m["objects"][object];
        assert_eq!(entry["collected"], 6, "{entry}");
        let q = entry["quarantined"].as_array().expect("quarantined");
        assert_eq!(q.len(), 1, "{entry}");
        let reason = q[0]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("data/camera0_rgb/"), "{reason}");
        assert!(reason.contains(why), "{reason}");
        let seeds: Vec<i64> = entry["seeds"]
            .as_array()
            .expect("seeds")
            .iter()
            .map(|s| s.as_i64().expect("seed"))
            .collect();
        assert!(!seeds.contains(&bad_seed), "{seeds:?}");
        let f = finals(root.path(), "jp2k", object);
        let said = run_python(
            &python(),
            CHECK,
            &[
                f[0].to_str().expect("path"),
                generator.to_str().expect("path"),
                object,
                "6",
                &serde_json::to_string(&seeds).expect("json"),
            ],
        );
        assert!(said.trim().starts_with("ok"), "{said}");
    }
}

/// De-duplicating on an array stored with a codec Quarry does not decode cannot work for any
/// round: the job stops at the first merge with a message naming the field, the codec and the
/// fix, instead of retrying the merge for ever or quarantining every round in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_on_an_undecoded_array_stops_the_job_naming_the_field() {
    let root = tempfile::tempdir().expect("tempdir");
    let generator = root.path().join("dp_gen.py");
    std::fs::write(&generator, GEN).expect("write generator");
    let job_file = root.path().join("job.toml");
    std::fs::write(
        &job_file,
        job(
            root.path(),
            &generator,
            "",
            "[merge]\ndedup = [\"data.camera0_rgb\"]\n",
        ),
    )
    .expect("write job");
    let job_file = job_file.to_str().expect("utf-8 path").to_string();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        run(&["--job", &job_file, "--progress", "off", "--gpus", "0,1"]),
    )
    .await
    .expect("the run ended instead of retrying the merge")
    .expect("job runs");
    assert_ne!(out.exit_code(), 0, "{:?}", out.status);
    assert_eq!(
        out.status.state,
        pb::JobState::Cancelled as i32,
        "{:?}",
        out.status
    );
    let msg = &out.status.message;
    for want in [
        "stopped: merging",
        "de-duplication field data.camera0_rgb",
        "jpeg2k",
        "merge.dedup",
    ] {
        assert!(msg.to_lowercase().contains(want), "{want:?} not in {msg}");
    }
    // No round was blamed: the rounds are fine, the job's field is not.
    let m = manifest(root.path(), "jp2k");
    for object in ["mug", "bowl"] {
        let q = m["objects"][object]["quarantined"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(q, 0, "{}", m["objects"][object]);
    }
}
