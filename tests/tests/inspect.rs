//! `coordinator inspect` end to end: the real binary on datasets Python writes (JSON Lines,
//! `.npy`) and on an experiment directory a real `coordinator run` produced. Statistics are
//! checked against numpy's over the same data; the PNG report is parsed with Python's standard
//! library (`zlib`, `struct`): chunk CRCs, size, and that it is not blank.
//!
//! Needs the `coordinator` binary built (`cargo build -p quarry-cli`)
//! and `QUARRY_TEST_PYTHON` with numpy; fails loudly without them.

use std::path::Path;
use std::process::{Command, Output};

use quarry_proto::v1 as pb;
use quarry_tests::*;

/// Runs `coordinator inspect ARGS`.
fn inspect(args: &[&str]) -> Output {
    Command::new(bin("coordinator"))
        .arg("inspect")
        .args(args)
        .output()
        .expect("start the coordinator binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

/// A JSON Lines dataset: 500 samples with a float energy, a bool, nested metrics (a float
/// and a whole-number step count), an id, a 6-element array and a string.
const WRITE_JSONL: &str = r#"
import json, random, sys
rng = random.Random(7)
with open(sys.argv[1], "w") as f:
    for i in range(500):
        f.write(json.dumps({
            "id": i,
            "energy": rng.gauss(0.0, 1.0),
            "valid": i % 3 == 0,
            "metrics": {"E_pen": rng.random() * 0.05, "steps": rng.randint(5, 14)},
            "joints": [rng.uniform(-1.0, 1.0) for _ in range(6)],
            "tag": "grasp",
        }) + "\n")
"#;

/// Recomputes every field's statistics and histogram with numpy from the dataset (JSON Lines
/// or an object `.npy`), and compares them with `coordinator inspect --json`'s.
const CHECK_STATS: &str = r#"
import json, sys
import numpy as np
kind, report, bins = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
paths = sys.argv[4:]
samples = []
for p in paths:
    if kind == "jsonl":
        samples += [json.loads(l) for l in open(p)]
    else:
        samples += [dict(x) for x in np.load(p, allow_pickle=True)]

def leaves(prefix, v, out):
    if isinstance(v, dict):
        for k, x in v.items():
            leaves(f"{prefix}.{k}" if prefix else k, x, out)
    elif isinstance(v, (bool, int, float, np.number, np.bool_)):
        out.setdefault(prefix, []).append([float(v)])
    elif isinstance(v, (list, np.ndarray)) and len(v) and all(
            isinstance(e, (int, float, np.number)) and not isinstance(e, bool)
            for e in np.ravel(np.asarray(v, dtype=object))):
        out.setdefault(prefix, []).append([float(e) for e in np.ravel(np.asarray(v, dtype=object))])

fields = {}
for s in samples:
    leaves("", s, fields)
got = {f["name"]: f for f in report["fields"]}
assert report["samples"] == len(samples), (report["samples"], len(samples))
for name, per_sample in fields.items():
    assert name in got, f"{name} missing from {sorted(got)}"
    g = got[name]
    vals = np.array([v for s in per_sample for v in s])
    scalar = all(len(s) == 1 for s in per_sample)
    assert g["kind"] == ("scalar" if scalar else "array"), (name, g["kind"])
    assert g["samples"] == len(per_sample), (name, g["samples"], len(per_sample))
    assert g["count"] == len(vals), (name, g["count"], len(vals))
    assert g["min"] == vals.min() and g["max"] == vals.max(), (name, g, vals.min(), vals.max())
    assert abs(g["mean"] - vals.mean()) <= 1e-9 * max(1.0, abs(vals.mean())), (name, g["mean"], vals.mean())
    if not scalar:
        assert "histogram" not in g, name
        continue
    h = g["histogram"]
    if np.all(vals == np.round(vals)) and vals.max() - vals.min() < bins:
        # One bin per whole number.
        lo = int(vals.min())
        want = [int(np.sum(vals == lo + i)) for i in range(int(vals.max()) - lo + 1)]
        assert h["integer"], name
    else:
        want = np.histogram(vals, bins=bins, range=(vals.min(), vals.max()))[0].tolist()
    assert h["counts"] == want, (name, h["counts"], want)
print(json.dumps(sorted(fields)))
"#;

/// Parses a PNG with the standard library only; prints its size, chunk types and how many
/// pixels have each colour.
const CHECK_PNG: &str = r#"
import json, struct, sys, zlib
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "signature"
pos, chunks = 8, []
while pos < len(data):
    (n,) = struct.unpack(">I", data[pos:pos + 4])
    kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
    (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
    assert zlib.crc32(kind + body) & 0xffffffff == crc, f"CRC of {kind}"
    chunks.append((kind.decode(), body))
    pos += 12 + n
assert pos == len(data), "trailing bytes"
w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
assert (depth, ctype, comp, filt, interlace) == (8, 3, 0, 0, 0)
palette = dict(chunks)["PLTE"]
raw = zlib.decompress(b"".join(b for k, b in chunks if k == "IDAT"))
assert len(raw) == h * (w + 1), (len(raw), w, h)
colors = {}
for y in range(h):
    row = raw[y * (w + 1):(y + 1) * (w + 1)]
    assert row[0] == 0, f"filter type of row {y}"
    for i in set(row[1:]):
        rgb = ",".join(str(c) for c in palette[3 * i:3 * i + 3])
        colors[rgb] = colors.get(rgb, 0) + row[1:].count(i)
print(json.dumps({"width": w, "height": h, "chunks": [k for k, _ in chunks], "colors": colors}))
"#;

/// Checks the PNG at `png` and returns (width, height, pixels per colour "r,g,b").
fn check_png(png: &Path) -> (u64, u64, serde_json::Map<String, serde_json::Value>) {
    let out = run_python(&python(), CHECK_PNG, &[png.to_str().expect("utf-8")]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["chunks"][0], "IHDR");
    assert_eq!(
        v["chunks"].as_array().expect("chunks").last(),
        Some(&"IEND".into())
    );
    let colors = v["colors"].as_object().expect("colors").clone();
    (
        v["width"].as_u64().expect("w"),
        v["height"].as_u64().expect("h"),
        colors,
    )
}

const WHITE: &str = "255,255,255";
const BLUE: &str = "66,114,196";
const ORANGE: &str = "230,140,40";
const GREEN: &str = "40,150,60";
const RED: &str = "200,40,40";

fn pixels(colors: &serde_json::Map<String, serde_json::Value>, rgb: &str) -> u64 {
    colors.get(rgb).and_then(|v| v.as_u64()).unwrap_or(0)
}

#[test]
fn a_valid_jsonl_dataset_gets_statistics_and_a_png() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("grasps.jsonl");
    let d = data.to_str().expect("utf-8");
    run_python(&python(), WRITE_JSONL, &[d]);
    let png = dir.path().join("report.png");
    let p = png.to_str().expect("utf-8");

    let out = inspect(&[d, "--png", p]);
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 0, "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("format   jsonl"), "{stdout}");
    assert!(stdout.contains("samples  500"), "{stdout}");
    assert!(stdout.contains("status   valid"), "{stdout}");
    for row in [
        "energy ",
        "metrics.E_pen ",
        "metrics.steps ",
        "joints ",
        "valid ",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(row)),
            "no row {row:?}:\n{stdout}"
        );
    }
    let joints = stdout
        .lines()
        .find(|l| l.starts_with("joints "))
        .expect("joints row");
    assert!(joints.contains("array[6]"), "{joints}");

    // The statistics are numpy's.
    let json = inspect(&[d, "--json", "--bins", "16"]);
    assert_eq!(code(&json), 0);
    let report = dir.path().join("report.json");
    std::fs::write(&report, &json.stdout).expect("write");
    let fields = run_python(
        &python(),
        CHECK_STATS,
        &["jsonl", report.to_str().expect("utf-8"), "16", d],
    );
    assert!(fields.contains("metrics.steps"), "{fields}");

    // The PNG: 5 histograms (energy and metrics.E_pen first) in rows of 3, no yield chart.
    let (w, h, colors) = check_png(&png);
    assert_eq!((w, h), (1000, 50 + 2 * 220 + 10));
    assert!(pixels(&colors, BLUE) > 20_000, "histogram bars: {colors:?}");
    assert!(pixels(&colors, GREEN) > 0, "VALID in the title: {colors:?}");
    assert_eq!(pixels(&colors, RED), 0);
    assert!(
        pixels(&colors, WHITE) < w * h / 2,
        "mostly blank: {colors:?}"
    );
    // Deterministic: the same input draws the same bytes.
    let first = std::fs::read(&png).expect("read");
    assert_eq!(code(&inspect(&[d, "--png", p])), 0);
    assert_eq!(std::fs::read(&png).expect("read"), first);
}

#[test]
fn a_valid_npy_dataset_matches_numpy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let status = Command::new(python())
        .arg(example_generator())
        .args(["--name", "n", "--object_code", "mug", "--batch_size", "64"])
        .args(["--num_iterations", "1", "--seed", "5", "--out_root"])
        .arg(dir.path())
        .output()
        .expect("run the example generator");
    assert!(status.status.success(), "{}", text(&status.stderr));
    let data = dir.path().join("n/results/mug.npy");
    let d = data.to_str().expect("utf-8");
    let json = inspect(&[d, "--json"]);
    assert_eq!(code(&json), 0, "{}", text(&json.stdout));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(
        (v["format"].as_str(), v["samples"].as_u64()),
        (Some("npy"), Some(64))
    );
    let report = dir.path().join("report.json");
    std::fs::write(&report, &json.stdout).expect("write");
    let fields = run_python(
        &python(),
        CHECK_STATS,
        &["npy", report.to_str().expect("utf-8"), "20", d],
    );
    assert!(fields.contains("E_pen"), "{fields}");
}

#[test]
fn a_corrupted_dataset_is_flagged_with_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("bad.jsonl");
    let d = data.to_str().expect("utf-8");
    run_python(&python(), WRITE_JSONL, &[d]);
    // Line 3 is cut short; line 5 loses a key.
    let mut lines: Vec<String> = std::fs::read_to_string(&data)
        .expect("read")
        .lines()
        .map(String::from)
        .collect();
    lines[2].truncate(20);
    lines[4] = lines[4]
        .replace("\"tag\": \"grasp\", ", "")
        .replace(", \"tag\": \"grasp\"", "");
    std::fs::write(&data, lines.join("\n") + "\n").expect("write");
    let png = dir.path().join("bad.png");
    let out = inspect(&[d, "--png", png.to_str().expect("utf-8")]);
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 3, "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("INVALID: 2 problem(s)"), "{stdout}");
    assert!(
        stdout.contains(&format!("{d}:line 3: invalid JSON")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{d}:line 5: keys differ: missing [tag]")),
        "{stdout}"
    );
    assert!(stdout.contains("samples  499"), "{stdout}");
    // The report is still drawn, marked invalid.
    let (_, _, colors) = check_png(&png);
    assert!(pixels(&colors, RED) > 0, "INVALID in the title: {colors:?}");
    assert_eq!(pixels(&colors, GREEN), 0);

    // A truncated .npy: the walk stops, the file is named.
    let status = Command::new(python())
        .arg(example_generator())
        .args(["--name", "t", "--object_code", "mug", "--batch_size", "64"])
        .args([
            "--num_iterations",
            "1",
            "--seed",
            "9",
            "--truncate_seeds",
            "9",
        ])
        .arg("--out_root")
        .arg(dir.path())
        .output()
        .expect("run the example generator");
    assert!(status.status.success(), "{}", text(&status.stderr));
    let cut = dir.path().join("t/results/mug.npy");
    let c = cut.to_str().expect("utf-8");
    let out = inspect(&[c, "--json"]);
    assert_eq!(code(&out), 3, "{}", text(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["valid"], false);
    let problem = &v["problems"][0];
    assert!(
        problem["path"].as_str().expect("path").contains("mug.npy"),
        "{problem}"
    );
    assert!(!problem["reason"].as_str().expect("reason").is_empty());
}

#[test]
fn usage_errors_have_their_own_exit_status() {
    let out = inspect(&["/nonexistent/quarry/dataset.npy"]);
    assert_eq!(code(&out), 2);
    assert!(text(&out.stderr).contains("no such file or directory"));
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = dir.path().join("data.bin");
    std::fs::write(&odd, b"\x00\x01\x02").expect("write");
    let out = inspect(&[odd.to_str().expect("utf-8")]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("--format"),
        "{}",
        text(&out.stderr)
    );
    let out = inspect(&["--format", "csv", "x"]);
    assert_eq!(code(&out), 2, "clap's usage error");
    let help = inspect(&["--help"]);
    let help = text(&help.stdout);
    assert!(
        help.contains("Exit status") && help.contains("3  invalid"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_directory_reports_every_object() {
    let root = legacy_root();
    let toml = grasp_job_with_yields(root.path(), "insp", 60, 40, 3, "");
    let job = root.path().join("job.toml");
    std::fs::write(&job, toml).expect("write job file");
    let out = run(&["--job", job.to_str().expect("utf-8"), "--progress", "off"])
        .await
        .expect("job runs");
    assert_eq!(
        out.status.state,
        pb::JobState::Done as i32,
        "{:?}",
        out.status
    );
    let m = manifest(root.path(), "insp");
    let exp = experiments(root.path()).join("insp");
    let e = exp.to_str().expect("utf-8");
    let png = root.path().join("insp.png");
    let p = png.to_str().expect("utf-8");

    let out = inspect(&[e, "--png", p]);
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 0, "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("experiment  insp"), "{stdout}");
    assert!(
        stdout.contains("objects     2 (2 with a final)"),
        "{stdout}"
    );
    assert!(stdout.contains("samples     120"), "{stdout}");
    for o in ["mug", "bowl"] {
        let entry = &m["objects"][o];
        let rate = entry["success_rate"]
            .as_f64()
            .expect("the sidecars give a rate");
        let row: Vec<&str> = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{o} ")))
            .unwrap_or_else(|| panic!("no row for {o}:\n{stdout}"))
            .split_whitespace()
            .collect();
        // object samples collected attempts successes yield filtered duplicates status
        assert_eq!(row[1..3], ["60", "60"], "{row:?}");
        assert_eq!(row[3], entry["attempts"].to_string(), "{row:?}");
        assert_eq!(row[4], entry["successes"].to_string(), "{row:?}");
        let shown: f64 = row[5].trim_end_matches('%').parse().expect("a percentage");
        assert!((shown - rate * 100.0).abs() < 0.5, "{row:?} vs {rate}");
        assert_eq!(row[8], "valid");
    }

    // Statistics over both finals are numpy's.
    let json = inspect(&[e, "--json"]);
    assert_eq!(code(&json), 0);
    let report = root.path().join("insp.json");
    std::fs::write(&report, &json.stdout).expect("write");
    let mut args = vec!["npy".to_string(), report.display().to_string(), "20".into()];
    for o in ["mug", "bowl"] {
        args.push(finals(root.path(), "insp", o)[0].display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_python(&python(), CHECK_STATS, &args);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(
        v["experiment"]["objects"][0]["object"], "mug",
        "the job's order"
    );
    assert_eq!(
        v["experiment"]["objects"][0]["yield"]["basis"],
        "success_rate"
    );

    // The PNG has the yield chart below the histograms.
    let (w, h, colors) = check_png(&png);
    let panels = v["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .filter(|f| f.get("histogram").is_some())
        .count()
        .min(12) as u64;
    assert_eq!((w, h), (1000, 50 + panels.div_ceil(3) * 220 + 260 + 10));
    assert!(pixels(&colors, BLUE) > 20_000, "{colors:?}");
    assert_eq!(
        pixels(&colors, ORANGE),
        0,
        "every object has a success rate"
    );

    // A final cut short makes the experiment invalid, naming that final.
    let bowl = &finals(root.path(), "insp", "bowl")[0];
    let len = std::fs::metadata(bowl).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(bowl)
        .expect("open");
    f.set_len(len / 2).expect("truncate");
    let out = inspect(&[e]);
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 3, "{stdout}");
    let bowl_name = bowl.file_name().expect("name").to_str().expect("utf-8");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("  ") && l.contains(bowl_name)),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("bowl "))
        .expect("bowl row");
    assert!(row.contains("INVALID"), "{row}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("mug "))
        .expect("mug row");
    assert!(row.ends_with("valid") && !row.contains("INVALID"), "{row}");
}

/// Per-sample values of one field, read with h5py (a demo's `num_samples`) or zarr (an
/// episode's `meta/attempt`).
const READ_FIELD: &str = r#"
import json, sys
import numpy as np
kind, path = sys.argv[1:3]
if kind == "hdf5":
    import h5py
    with h5py.File(path, "r") as f:
        v = [int(f["data"][k].attrs["num_samples"]) for k in f["data"].keys()]
    print(json.dumps({"samples": len(v), "field": "attrs.num_samples", "values": v}))
else:
    import zarr
    g = zarr.open_group(path, mode="r")
    v = np.asarray(g["meta/attempt"][:]).tolist()
    n = len(g["meta/episode_ends"][:])
    print(json.dumps({"samples": n, "field": "meta.attempt", "values": v}))
"#;

/// Writes a dataset with an example generator (`robomimic_gen.py`, `zarr_replay_gen.py`).
fn generate(script: &str, out: &Path, extra: &[&str]) {
    let o = Command::new(python())
        .arg(repo_root().join("deploy/examples").join(script))
        .args([
            "--seed",
            "3",
            "--object",
            "mug",
            "--batch_size",
            "12",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .expect("run an example generator");
    assert!(o.status.success(), "{script}: {}", text(&o.stderr));
}

/// Inspects `path` (valid) and compares one per-sample field with Python's reading.
fn check_against_python(kind: &str, path: &Path) {
    let p = path.to_str().expect("utf-8");
    let out = inspect(&[p, "--json"]);
    assert_eq!(
        code(&out),
        0,
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let want: serde_json::Value =
        serde_json::from_str(run_python(&python(), READ_FIELD, &[kind, p]).trim()).expect("json");
    assert_eq!(v["format"], kind);
    assert_eq!(v["samples"], want["samples"], "{v}");
    let values: Vec<f64> = want["values"]
        .as_array()
        .expect("values")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect();
    let f = v["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .find(|f| f["name"] == want["field"])
        .unwrap_or_else(|| panic!("no field {} in {v}", want["field"]));
    assert_eq!(f["kind"], "scalar");
    assert_eq!(f["count"].as_u64(), Some(values.len() as u64));
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    assert_eq!(
        (f["min"].as_f64(), f["max"].as_f64()),
        (Some(min), Some(max))
    );
    assert!((f["mean"].as_f64().expect("mean") - mean).abs() < 1e-9);
    let total: u64 = f["histogram"]["counts"]
        .as_array()
        .expect("histogram")
        .iter()
        .map(|c| c.as_u64().expect("count"))
        .sum();
    assert_eq!(total, values.len() as u64);
}

#[test]
fn hdf5_and_zarr_datasets_are_examined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h5 = dir.path().join("demos.hdf5");
    generate("robomimic_gen.py", &h5, &[]);
    check_against_python("hdf5", &h5);
    for version in ["2", "3"] {
        let store = dir.path().join(format!("replay_v{version}.zarr"));
        generate("zarr_replay_gen.py", &store, &["--format", version]);
        check_against_python("zarr", &store);

        // A damaged chunk of data/action is a problem at that chunk.
        let chunks = files_under(&store.join("data/action"));
        let chunk = chunks
            .iter()
            .find(|c| !c.starts_with('.') && !c.ends_with(".json"))
            .unwrap_or_else(|| panic!("no chunk in {chunks:?}"));
        std::fs::write(store.join("data/action").join(chunk), b"not a chunk").expect("write");
        let out = inspect(&[store.to_str().expect("utf-8")]);
        let stdout = text(&out.stdout);
        assert_eq!(code(&out), 3, "{stdout}\n{}", text(&out.stderr));
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("  ") && l.contains("data/action")),
            "{stdout}"
        );
    }
    // An HDF5 file cut short.
    let len = std::fs::metadata(&h5).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&h5)
        .expect("open");
    f.set_len(len / 2).expect("truncate");
    let out = inspect(&[h5.to_str().expect("utf-8")]);
    assert_eq!(code(&out), 3, "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("demos.hdf5"),
        "{}",
        text(&out.stdout)
    );
}

/// pyarrow's reading of a LeRobot dataset's frames: per numeric feature the count, min,
/// max and mean of every element.
const READ_LEROBOT: &str = r#"
import sys, json, glob, os
import pyarrow.parquet as pq
root = sys.argv[1]
out = {}
for f in ['observation.state', 'action']:
    vals = []
    for p in sorted(glob.glob(os.path.join(root, 'data/*/*.parquet'))):
        for row in pq.read_table(p, columns=[f]).column(f).to_pylist():
            vals.extend(row)
    out[f] = {'count': len(vals), 'min': min(vals), 'max': max(vals), 'mean': sum(vals) / len(vals)}
print(json.dumps(out))
"#;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

#[test]
fn lerobot_datasets_report_their_facts_frames_and_videos() {
    let root = repo_root().join("tests/fixtures/lerobot/rounds/r1");
    let p = root.to_str().expect("utf-8");
    let out = inspect(&[p, "--json"]);
    assert_eq!(code(&out), 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["format"], "lerobot");
    assert_eq!(v["samples"], 3);
    let fact = |k: &str| {
        v["facts"]
            .as_array()
            .expect("facts")
            .iter()
            .find(|f| f["key"] == k)
            .unwrap_or_else(|| panic!("no fact {k} in {v}"))["value"]
            .as_str()
            .expect("text")
            .to_string()
    };
    assert_eq!(fact("fps"), "10");
    assert_eq!(fact("episodes"), "3");
    assert_eq!(fact("frames"), "17");
    assert_eq!(fact("tasks"), r#"2: "place the cube", "push the cube""#);
    assert_eq!(fact("feature observation.state"), "float32 [4]");
    assert_eq!(fact("video keys"), "observation.images.cam");
    assert_eq!(fact("video files"), "1 checked");
    let want: serde_json::Value =
        serde_json::from_str(run_python(&python(), READ_LEROBOT, &[p]).trim()).expect("json");
    let field = |name: &str| {
        v["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no field {name} in {v}"))
            .clone()
    };
    for name in ["observation.state", "action"] {
        let (f, w) = (field(name), &want[name]);
        assert_eq!(f["kind"], "array");
        assert_eq!(f["samples"], 3);
        assert_eq!(f["count"], w["count"], "{name}");
        assert_eq!((&f["min"], &f["max"]), (&w["min"], &w["max"]), "{name}");
        let d = f["mean"].as_f64().expect("mean") - w["mean"].as_f64().expect("mean");
        assert!(d.abs() < 1e-9, "{name}: {f} vs {w}");
    }
    let length = field("length");
    assert_eq!(
        (length["min"].as_f64(), length["max"].as_f64()),
        (Some(4.0), Some(7.0))
    );
    // The text report lists the facts.
    let out = inspect(&[p]);
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 0, "{stdout}");
    assert!(stdout.contains("\ndataset:\n"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("  fps") && l.ends_with(" 10")),
        "{stdout}"
    );

    // A video file cut in the middle of its mdat; a video file missing: problems naming them.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("r0");
    copy_dir(&repo_root().join("tests/fixtures/lerobot/rounds/r0"), &bad);
    let mp4 = bad.join("videos/observation.images.cam/chunk-000/file-000.mp4");
    let len = std::fs::metadata(&mp4).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&mp4)
        .expect("open");
    f.set_len(len - 600).expect("truncate");
    let out = inspect(&[bad.to_str().expect("utf-8")]);
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 3, "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.lines().any(|l| l.starts_with("  ")
            && l.contains("chunk-000/file-000.mp4")
            && l.contains("truncated")),
        "{stdout}"
    );
    assert!(stdout.contains("samples  2"), "{stdout}");
    std::fs::remove_file(&mp4).expect("remove");
    let out = inspect(&[bad.to_str().expect("utf-8")]);
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 3, "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("file-000.mp4") && l.contains("does not exist")),
        "{stdout}"
    );
}

/// `coordinator inspect ... | head`: a reader that goes away before the report is written
/// ends the output quietly, with the dataset's exit status, not a panic.
#[test]
fn a_reader_that_goes_away_ends_the_report_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("grasps.jsonl");
    let d = data.to_str().expect("utf-8");
    run_python(&python(), WRITE_JSONL, &[d]);
    for json in [false, true] {
        let mut cmd = Command::new(bin("coordinator"));
        cmd.arg("inspect").arg(d);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the coordinator binary");
        // The read end closes before anything is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(code(&out), 0, "{stderr}");
    }
}
