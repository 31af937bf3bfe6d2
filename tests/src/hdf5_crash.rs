//! Robomimic HDF5 jobs whose rounds crash libhdf5, for the tests that the real binaries run
//! libhdf5 in child processes (`quarry_formats::hdf5::child`): tests/tests/hdf5_crash.rs, and
//! tests/tests/installed.rs against the binaries the pip wheel installed.
//!
//! The generator copies a file by seed: most rounds get a well-formed robomimic file of 3
//! demos; [`SEGV_INSPECT`] gets `libhdf5-segv.hdf5` (libhdf5 1.10 segfaults on it as soon as
//! it lists `data`: the agent's inspection dies), [`SEGV_COPY`] `libhdf5-segv-on-copy.hdf5`
//! (it inspects cleanly, so it is uploaded and committed, and libhdf5 segfaults when the merge
//! copies its demos: the coordinator's merge dies). Both are real files from the
//! byte-mutation campaign of docs/fuzzing.md.

#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cluster::{Killed, spawn_worker_args, start_serve_with, status, submit, wait_until};
use crate::{log_tail, python, repo_root};

/// The seed whose round's file crashes libhdf5 when inspected, and the one whose file
/// crashes it when merged.
pub const SEGV_INSPECT: i64 = 11;
pub const SEGV_COPY: i64 = 12;

const GENERATOR: &str = r#"
import os, shutil, sys
seed, out, data = int(sys.argv[1]), sys.argv[2], sys.argv[3]
name = {%INSPECT%: 'libhdf5-segv.hdf5', %COPY%: 'libhdf5-segv-on-copy.hdf5'}.get(seed, 'robomimic-3demos.hdf5')
os.makedirs(os.path.dirname(out), exist_ok=True)
shutil.copy(os.path.join(data, name), out)
"#;

fn data_dir() -> PathBuf {
    repo_root().join("formats/tests/data")
}

/// A one-object job `exp` of 3-demo rounds, quota 9, seeds from 10, no retries (a round
/// fails once and is quarantined, so with one agent the count of quarantined rounds is
/// exact).
pub fn job_file(dir: &Path, root: &Path, exp: &str) -> PathBuf {
    let gen_path = dir.join("copy_gen.py");
    std::fs::write(
        &gen_path,
        GENERATOR
            .replace("%INSPECT%", &SEGV_INSPECT.to_string())
            .replace("%COPY%", &SEGV_COPY.to_string()),
    )
    .unwrap();
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let text = format!(
        "exp_name = \"{exp}\"\nobjects = [\"obj\"]\ntarget_count_per_object = 9\n\
         round_batch_size = 3\nnum_iterations = 1\nseed_base = 10\nretries = 0\n\
         retry_backoff_ms = 10\nroot = {root}\n\n[generator]\n\
         argv = [{py}, {gen}, \"{{seed}}\", \"out/{{name}}/demo.hdf5\", {data}]\n\
         output = \"out/{{name}}/demo.hdf5\"\nround_dir = \"out/{{name}}\"\n",
        root = q(root.to_str().unwrap()),
        py = q(&python()),
        gen = q(gen_path.to_str().unwrap()),
        data = q(data_dir().to_str().unwrap()),
    );
    let p = dir.join(format!("{exp}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// The manifest's quarantined rounds of `obj` as (seed, reason), in seed order.
pub fn quarantined(m: &serde_json::Value) -> Vec<(i64, String)> {
    let mut q: Vec<(i64, String)> = m["objects"]["obj"]["quarantined"]
        .as_array()
        .unwrap_or_else(|| panic!("no quarantined list in {m}"))
        .iter()
        .map(|e| {
            (
                e["seed"].as_i64().unwrap(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    q.sort();
    q
}

/// Both crashing rounds quarantined with the child's ending in their reason, the quota met
/// from the other rounds, and a final that inspects to 3 demos per round.
pub fn check_manifest(m: &serde_json::Value, final_path: &Path) {
    let q = quarantined(m);
    assert_eq!(
        q.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [SEGV_INSPECT, SEGV_COPY],
        "{m}"
    );
    let inspect_reason = &q[0].1;
    assert!(
        inspect_reason.starts_with("output_invalid")
            && inspect_reason.contains("libhdf5 crashed (signal 11 SIGSEGV) while reading it"),
        "{inspect_reason}"
    );
    let copy_reason = &q[1].1;
    assert!(
        copy_reason.contains("cannot be merged")
            && copy_reason.contains("libhdf5 crashed (signal 11 SIGSEGV) while merging"),
        "{copy_reason}"
    );
    assert_eq!(m["objects"]["obj"]["collected"], 9, "{m}");
    let i = quarry_formats::inspect(quarry_formats::Format::Hdf5, final_path, None).unwrap();
    assert_eq!(i.count, 3 * 3);
}

/// `coordinator serve` on `home`'s state and store, and one `worker` on it.
pub struct Served {
    serve: Killed,
    addr: String,
    log: PathBuf,
    worker: Killed,
    worker_log: PathBuf,
}

impl Served {
    /// Start number `n` (logs `coordinator<n>.log`, `worker<n>.log`).
    pub fn start(home: &Path, n: u32) -> Served {
        let state = format!("file://{}", home.join("state.redb").display());
        let store = format!("file://{}", home.join("store").display());
        let args = ["--lease-ttl", "10", "--state", &state, "--store", &store];
        let log = home.join(format!("coordinator{n}.log"));
        let (serve, addr) = start_serve_with(&args, &[], &log);
        let worker_log = home.join(format!("worker{n}.log"));
        let worker = spawn_worker_args(
            &[
                "--coordinator",
                &addr,
                "--gpu",
                "0",
                "--gpu-inventory",
                "none",
                "--min-scratch-mib",
                "1",
            ],
            &[],
            Some(&worker_log),
        );
        Served {
            serve,
            addr,
            log,
            worker,
            worker_log,
        }
    }

    /// Submits `job` (named `exp`) and waits until it is done, `serve` and the worker alive
    /// all along; checks its status and manifest.
    pub fn run(&mut self, job: &Path, exp: &str, home: &Path) {
        let out = submit(job, &self.addr, false);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until("the job to be done", Duration::from_secs(180), || {
            assert!(
                self.serve.0.try_wait().unwrap().is_none(),
                "serve died:\n{}",
                log_tail(&self.log)
            );
            assert!(
                self.worker.0.try_wait().unwrap().is_none(),
                "the worker died:\n{}",
                log_tail(&self.worker_log)
            );
            status(&self.addr, exp).is_some_and(|s| s["state"] == "done")
        });
        let s = status(&self.addr, exp).unwrap();
        assert_eq!(s["rounds_quarantined"], 2, "{s}");
        assert_eq!(s["samples_collected"], 9, "{s}");
        let store_dir = home.join("store");
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(store_dir.join(exp).join("manifest.json")).unwrap(),
        )
        .unwrap();
        let final_key = m["objects"]["obj"]["final"][0]
            .as_str()
            .unwrap()
            .to_string();
        check_manifest(&m, &store_dir.join(&final_key));
        let log = std::fs::read_to_string(&self.log).unwrap();
        assert!(
            log.contains("libhdf5 crashed (signal 11 SIGSEGV) while merging"),
            "the coordinator says why it quarantined:\n{log}"
        );
    }
}
