//! Tests on a real GPU with the NVIDIA driver: `#[ignore]`d, since CI has no GPU. On a GPU
//! host: `cargo test -p quarry-tests --test gpu -- --ignored` (the worker and coordinator
//! binaries must be built: `cargo build --bins`).
//!
//! Also here, not ignored: the PyTorch example generator, run on the CPU when PyTorch is
//! installed (`QUARRY_TEST_TORCH_PYTHON`, default `python3`), else checked to say it needs it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use quarry_tests::cluster::{spawn_worker_args, start_serve, status, submit, wait_until};
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
