//! Tests on a real GPU with the NVIDIA driver: `#[ignore]`d, since CI has no GPU. On a GPU
//! host: `cargo test -p quarry-tests --test gpu -- --ignored` (the worker and coordinator
//! binaries must be built: `cargo build --bins`).
//!
//! Also here, not ignored: the PyTorch example generator, run on the CPU when PyTorch is
//! installed (`QUARRY_TEST_TORCH_PYTHON`, default `python3`), else checked to say it needs it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use quarry_tests::cluster::{
    metrics_addr, scrape, spawn_worker_args, start_serve, status, submit, wait_until,
};
use quarry_tests::{bin, repo_root};

const GEN: &str = env!("CARGO_BIN_EXE_quarry-zero-gen");

fn torch_python() -> String {
    std::env::var("QUARRY_TEST_TORCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn has_torch(py: &str) -> bool {
    Command::new(py)
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `(index, uuid)` of every GPU `worker gpus` lists through NVML.
fn nvml_gpus() -> Vec<(String, String)> {
    let out = Command::new(bin("worker"))
        .arg("gpus")
        .env_remove("QUARRY_GPU_INVENTORY")
        .output()
        .expect("run a process");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "worker gpus failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU and driver"]
fn nvml_lists_the_gpus() {
    let gpus = nvml_gpus();
    assert!(!gpus.is_empty(), "no GPU listed");
    for (index, uuid) in &gpus {
        assert!(index.parse::<u32>().is_ok(), "{index}");
        assert!(
            uuid.starts_with("GPU-") || uuid.starts_with("MIG-"),
            "{uuid}"
        );
    }
}

/// On a real GPU: the generator gets the GPU's UUID, the agent reports it healthy with real
/// figures, and the round's record carries its peak memory.
#[test]
#[ignore = "needs an NVIDIA GPU and driver"]
fn a_round_on_a_real_gpu_is_bound_by_uuid_and_measured() {
    let (index, uuid) = nvml_gpus().into_iter().next().expect("a GPU");
    let home = tempfile::tempdir().unwrap();
    let root = home.path().join("root");
    std::fs::create_dir_all(root.join("env")).unwrap();
    let (_serve, addr) = start_serve(
        &format!("file://{}", home.path().join("state.redb").display()),
        &format!("file://{}", home.path().join("store").display()),
        "10",
        &[],
        &home.path().join("coordinator.log"),
    );
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let job = home.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "exp_name = \"gpu\"\nobjects = [\"obj\"]\ntarget_count_per_object = 8\n\
             round_batch_size = 4\nnum_iterations = 1\nroot = {root}\n\n[generator]\n\
             argv = [{gen}, \"--out\", \"out/{{name}}/r.npy\", \"--batch_size\", \"{{batch_size}}\", \
             \"--seed\", \"{{seed}}\", \"--sleep_ms\", \"1500\", \"--env_out\", \"env/{{name}}.json\"]\n\
             output = \"out/{{name}}/r.npy\"\nround_dir = \"out/{{name}}\"\n",
            root = q(root.to_str().unwrap()),
            gen = q(GEN),
        ),
    )
    .unwrap();
    let _w = spawn_worker_args(
        &[
            "--gpu",
            &index,
            "--coordinator",
            &addr,
            "--sample-interval-ms",
            "200",
        ],
        &[],
        Some(&home.path().join("worker.log")),
    );
    let out = submit(&job, &addr, true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for e in std::fs::read_dir(root.join("env")).unwrap().flatten() {
        let d: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        assert_eq!(d["env"]["CUDA_VISIBLE_DEVICES"], uuid.as_str(), "{d}");
        assert_eq!(d["env"]["CUDA_DEVICE_ORDER"], "PCI_BUS_ID", "{d}");
    }
    let mut w = serde_json::Value::Null;
    wait_until("a health report", Duration::from_secs(15), || {
        w = status(&addr, "gpu")
            .and_then(|s| s["workers"].get(0).cloned())
            .unwrap_or_default();
        w["health"] != "unknown" && !w["health"].is_null()
    });
    assert_eq!(w["health"], "healthy", "{w}");
    assert_eq!(w["gpu_uuid"], uuid.as_str(), "{w}");
    assert!(w["memory_free_mib"].as_u64().is_some_and(|m| m > 0), "{w}");
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.path().join("store/gpu/manifest.json")).unwrap(),
    )
    .unwrap();
    for c in m["objects"]["obj"]["commits"].as_array().unwrap() {
        assert!(c["gpu_memory_peak_mib"].as_u64().is_some(), "{c}");
        assert!(c["gpu_utilization_mean_pct"].as_u64().is_some(), "{c}");
    }
}

/// A warm generator in PyTorch that keeps `$LEAK_MIB` of CUDA memory per round (a leak, as
/// a cache that grows would), logs `<round name> <pid>` to `$ROUNDS_LOG` and writes its
/// round as float32 values from the seed.
const TORCH_LEAKER: &str = r#"
import os, struct
import torch
from quarry_generator import serve

held = []

def handler(r):
    with open(os.environ["ROUNDS_LOG"], "a") as f:
        f.write("%s %d\n" % (r.round_name, os.getpid()))
    # float32: 4 bytes, so MiB << 18 elements. Zero still creates the CUDA context.
    held.append(torch.ones(int(os.environ["LEAK_MIB"]) << 18, device="cuda"))
    torch.cuda.synchronize()
    values = [float(r.seed * 10 + i) for i in range(r.batch_size)]
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % len(values)
    raw = header.encode("latin1")
    pad = 64 - ((10 + len(raw) + 1) % 64)
    data = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw) + pad + 1) + raw + b" " * pad + b"\n"
    os.makedirs(os.path.dirname(r.output), exist_ok=True)
    with open(r.output, "wb") as f:
        f.write(data + struct.pack("<%df" % len(values), *values))

serve(handler)
"#;

/// `recycle_above_gpu_memory_mib = 1500` on a real GPU through NVML: a warm PyTorch
/// generator that keeps 2 GiB of CUDA memory per round is over the ceiling after every
/// round, so each round runs in a fresh process (counted as `gpu_memory` starts); one that
/// keeps nothing (its CUDA context alone, a few hundred MiB) serves every round. NVML lists
/// host pids: run it on the host or in a container that shares the host's PID namespace.
#[test]
#[ignore = "needs an NVIDIA GPU, its driver and PyTorch with CUDA"]
fn a_warm_torch_generator_over_its_gpu_memory_ceiling_is_replaced() {
    let py = torch_python();
    assert!(has_torch(&py), "{py} cannot import torch");
    let (index, _uuid) = nvml_gpus().into_iter().next().expect("a GPU");
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let root = h.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let script = h.join("leaker.py");
    std::fs::write(&script, TORCH_LEAKER).unwrap();
    let rounds_log = h.join("rounds.log");
    let (_serve, addr) = start_serve(
        &format!("file://{}", h.join("state.redb").display()),
        &format!("file://{}", h.join("store").display()),
        "30",
        &[],
        &h.join("coordinator.log"),
    );
    let worker_log = h.join("worker.log");
    let mut worker = Command::new(bin("worker"));
    worker
        .args([
            "--gpu",
            &index,
            "--coordinator",
            &addr,
            "--min-scratch-mib",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env_remove("QUARRY_GPU_INVENTORY")
        .stderr(std::fs::File::create(&worker_log).unwrap());
    let _w = quarry_tests::cluster::Killed(worker.spawn().expect("start the worker"));
    let q = |p: &Path| serde_json::to_string(p.to_str().unwrap()).unwrap();
    let gpu_memory_starts = || {
        let text = scrape(&metrics_addr(&worker_log), "/metrics");
        let series = format!(
            "quarry_worker_generator_starts_total{{gpu=\"{index}\",reason=\"gpu_memory\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    // Four rounds of the one object; the pids they ran in.
    let run_job = |exp: &str, leak_mib: u32| -> Vec<u32> {
        let job = h.join(format!("{exp}.toml"));
        std::fs::write(
            &job,
            format!(
                "exp_name = \"{exp}\"\nobjects = [\"obj\"]\ntarget_count_per_object = 16\n\
                 round_batch_size = 4\nnum_iterations = 1\nretries = 0\nroot = {root}\n\n\
                 [generator]\nmode = \"warm\"\nrecycle_above_gpu_memory_mib = 1500\n\
                 argv = [{py}, {script}]\noutput = \"out/{{name}}/r.npy\"\n\
                 round_dir = \"out/{{name}}\"\n[generator.env]\nPYTHONPATH = {pythonpath}\n\
                 ROUNDS_LOG = {rounds_log}\nLEAK_MIB = \"{leak_mib}\"\n",
                root = q(&root),
                py = serde_json::to_string(&py).unwrap(),
                script = q(&script),
                pythonpath = q(&repo_root().join("deploy/python")),
                rounds_log = q(&rounds_log),
            ),
        )
        .unwrap();
        let out = submit(&job, &addr, false);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut last = serde_json::Value::Null;
        // PyTorch and a CUDA context per process: allow for slow starts.
        wait_until(
            &format!("job {exp} to end"),
            Duration::from_secs(300),
            || {
                last = status(&addr, exp).unwrap_or_default();
                last["state"] != "running" && !last["state"].is_null()
            },
        );
        assert_eq!(
            last["state"],
            "done",
            "{exp}: {last}\n{}",
            quarry_tests::log_tail(&worker_log)
        );
        let pids: Vec<u32> = std::fs::read_to_string(&rounds_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&format!("{exp}__")))
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(pids.len(), 4, "{exp}: {pids:?}");
        pids
    };

    let leaky = run_job("leaky", 2048);
    let distinct: std::collections::BTreeSet<u32> = leaky.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        4,
        "a fresh process for every round: {leaky:?}\n{}",
        quarry_tests::log_tail(&worker_log)
    );
    assert_eq!(gpu_memory_starts(), 3.0);
    let text = std::fs::read_to_string(&worker_log).unwrap();
    assert!(
        text.contains("over its GPU memory ceiling") && text.contains("ceiling_mib=1500"),
        "{text}"
    );

    let tidy = run_job("tidy", 0);
    assert!(
        tidy.iter().all(|p| *p == tidy[0]),
        "{tidy:?}\n{}",
        quarry_tests::log_tail(&worker_log)
    );
    assert_eq!(gpu_memory_starts(), 3.0);
}

/// The PyTorch example on the GPU it is bound to.
#[test]
#[ignore = "needs an NVIDIA GPU, its driver and PyTorch with CUDA"]
fn the_torch_example_runs_on_the_gpu() {
    let py = torch_python();
    assert!(has_torch(&py), "{py} cannot import torch");
    let dir = tempfile::tempdir().unwrap();
    let out = run_torch_example(&py, dir.path(), "cuda");
    assert!(out.contains("device=cuda"), "{out}");
}

/// Runs the example with a small batch; returns its stdout after checking its output file
/// has the grasp generator's schema.
fn run_torch_example(py: &str, dir: &Path, device: &str) -> String {
    let script = repo_root().join("deploy/examples/torch_grasp_gen.py");
    let out = Command::new(py)
        .arg(&script)
        .args([
            "--name",
            "t__obj__r0_s5",
            "--object_code",
            "obj",
            "--batch_size",
            "16",
            "--num_iterations",
            "30",
            "--seed",
            "5",
            "--gpu",
            "0",
            "--device",
            device,
            "--out_root",
        ])
        .arg(dir)
        .args(["--vis_frame_stride", "200"])
        .output()
        .expect("run a process");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.join("t__obj__r0_s5/results/obj.npy");
    let ours = quarry_formats::npy::inspect_path(&file).expect("a valid .npy");
    assert_eq!(ours.count, 16);
    // The same schema (dict keys) as the pure-Python example: rounds of both merge together.
    let reference = tempfile::tempdir().expect("tempdir");
    let st = Command::new("python3")
        .arg(repo_root().join("deploy/examples/grasp_gen.py"))
        .args([
            "--name",
            "g",
            "--object_code",
            "obj",
            "--batch_size",
            "3",
            "--out_root",
        ])
        .arg(reference.path())
        .status()
        .expect("run grasp_gen.py");
    assert!(st.success());
    let theirs = quarry_formats::npy::inspect_path(&reference.path().join("g/results/obj.npy"))
        .expect("grasp_gen.py output is valid");
    assert_eq!(ours.schema, theirs.schema);
    stdout
}

/// Not ignored: with PyTorch the example runs on the CPU and writes the grasp format; without
/// it, it says so and exits 2. Either way the script parses.
#[test]
fn the_torch_example_runs_on_cpu_or_says_it_needs_torch() {
    let py = torch_python();
    let dir = tempfile::tempdir().unwrap();
    if has_torch(&py) {
        let out = run_torch_example(&py, dir.path(), "cpu");
        assert!(out.contains("device=cpu"), "{out}");
        return;
    }
    let script = repo_root().join("deploy/examples/torch_grasp_gen.py");
    let out = Command::new(&py)
        .arg(&script)
        .args(["--name", "n", "--object_code", "o"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs PyTorch"), "{err}");
}
