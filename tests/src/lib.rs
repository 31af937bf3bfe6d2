//! Harness shared by Quarry's end-to-end tests: a legacy-layout root with the example
//! generator as `main.py`, runs of `coordinator run` in-process or as a real process, and
//! readers for finals and the manifest.
//!
//! Everything here starts real components: real generator processes, real gRPC on loopback.

use std::path::{Path, PathBuf};
use std::process::Command;

use quarry_cli::{Cli, Command as Cmd, RunOutcome};
use sha2::{Digest, Sha256};

pub mod cluster;
pub mod etcd;
pub mod faultproxy;
pub mod hdf5_crash;
pub mod latency;
pub mod netns;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod s3;
pub mod slurm;
pub mod warm_kill;
use tokio_util::sync::CancellationToken;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The example generator shipped in deploy/examples.
pub fn example_generator() -> PathBuf {
    repo_root().join("deploy/examples/grasp_gen.py")
}

/// Where tests take Quarry's binaries from instead of the workspace's build: a directory holding
/// `coordinator` and `worker`, e.g. the `bin/` of a venv the pip wheel is installed in (.ci/run
/// runs the Slurm test so).
pub const BIN_DIR_ENV: &str = "QUARRY_BIN_DIR";

/// A binary of Quarry (`coordinator`, `worker`): from [`BIN_DIR_ENV`] when that is set, else the
/// workspace's build next to the test executable's directory (Cargo builds them for quarry-cli's
/// own integration tests in the same run).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|d| !d.is_empty()) {
        let p = Path::new(&dir).join(name);
        assert!(
            p.is_file(),
            "{BIN_DIR_ENV}={} has no {name}: install the wheel into that venv \
             (pip install quarry_data-*.whl, docs/slurm.md) or unset {BIN_DIR_ENV}",
            Path::new(&dir).display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is not built; run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

/// A fresh root laid out as the legacy tool expects: `BimanGrasp-Optimization/main.py` is the
/// example generator.
pub fn legacy_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let gen_dir = dir.path().join("BimanGrasp-Optimization");
    std::fs::create_dir_all(&gen_dir).expect("mkdir");
    std::fs::copy(example_generator(), gen_dir.join("main.py")).expect("copy generator");
    dir
}

/// A job file (TOML) for the example grasp generator under `root` (see [`legacy_root`]) with
/// uneven yields and a yield sidecar per round; `tail` is appended (e.g. a `[merge]` table).
pub fn grasp_job_with_yields(
    root: &Path,
    exp: &str,
    quota: u64,
    batch: u64,
    seed_base: i64,
    tail: &str,
) -> String {
    format!(
        r#"
exp_name = "{exp}"
objects = ["mug", "bowl"]
target_count_per_object = {quota}
round_batch_size = {batch}
num_iterations = 2
seed_base = {seed_base}
root = "{root}"

[generator]
argv = ["python3", "main.py", "--name", "{{name}}", "--object_code", "{{object}}",
        "--batch_size", "{{batch_size}}", "--num_iterations", "{{num_iterations}}",
        "--seed", "{{seed}}", "--yield_mode", "uneven",
        "--stats_file", "../data/experiments/{{name}}/stats.json"]
cwd = "BimanGrasp-Optimization"
output = "data/experiments/{{name}}/results/{{object}}.npy"
round_dir = "data/experiments/{{name}}"
stats = "data/experiments/{{name}}/stats.json"
{tail}
"#,
        root = root.display()
    )
}

/// Parses `coordinator run` arguments as the binary would.
pub fn run_args(args: &[&str]) -> quarry_cli::RunArgs {
    let mut argv = vec!["coordinator", "run"];
    argv.extend_from_slice(args);
    match <Cli as clap::Parser>::try_parse_from(argv) {
        Ok(Cli {
            command: Cmd::Run(a),
            ..
        }) => a,
        Ok(_) => panic!("not a run command"),
        Err(e) => panic!("bad test arguments: {e}"),
    }
}

/// Runs `coordinator run` in this process (real gRPC on loopback, real generator processes).
pub async fn run(args: &[&str]) -> anyhow::Result<RunOutcome> {
    quarry_cli::run(run_args(args), CancellationToken::new(), false).await
}

/// `coordinator run --job JOB --progress off EXTRA...` in this process, which must end the job
/// (exit code 0): the reference a cluster run is compared with.
pub async fn run_job_to_end(job: &Path, extra: &[&str]) -> RunOutcome {
    let job = job.to_str().expect("UTF-8 job path");
    let mut args = vec!["--job", job, "--progress", "off"];
    args.extend_from_slice(extra);
    let out = run(&args).await.expect("coordinator run");
    assert_eq!(
        out.exit_code(),
        0,
        "the run did not finish: {:?}",
        out.status
    );
    out
}

/// `<root>/data/experiments`.
pub fn experiments(root: &Path) -> PathBuf {
    root.join("data/experiments")
}

pub fn manifest(root: &Path, exp: &str) -> serde_json::Value {
    let p = experiments(root).join(exp).join("manifest.json");
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    serde_json::from_str(&text).expect("manifest is JSON")
}

/// Paths of the finals of `object` as the manifest names them.
pub fn finals(root: &Path, exp: &str, object: &str) -> Vec<PathBuf> {
    let m = manifest(root, exp);
    m["objects"][object]["final"]
        .as_array()
        .unwrap_or_else(|| panic!("no finals for {object} in {m}"))
        .iter()
        .map(|k| experiments(root).join(k.as_str().expect("key")))
        .collect()
}

pub fn sha256_file(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    quarry_common::storage::hex(&Sha256::digest(&bytes))
}

/// sha256 of every object's final, in object order.
pub fn final_hashes(root: &Path, exp: &str, objects: &[&str]) -> Vec<String> {
    objects
        .iter()
        .map(|o| sha256_file(&finals(root, exp, o)[0]))
        .collect()
}

/// Files (not directories) under `dir`, relative, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.push(rel.display().to_string());
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The Python interpreter with numpy for cross-checks (`QUARRY_TEST_PYTHON`, default python3).
/// Tests that need it fail loudly when numpy is missing: `.ci/run` installs it.
pub fn python() -> String {
    std::env::var("QUARRY_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Every interpreter to cross-check with (`QUARRY_TEST_PYTHONS`, colon separated).
pub fn pythons() -> Vec<String> {
    match std::env::var("QUARRY_TEST_PYTHONS") {
        Ok(v) if !v.is_empty() => v.split(':').map(str::to_string).collect(),
        _ => vec![python()],
    }
}

/// Runs a Python snippet with `args`; panics with its output when it fails.
pub fn run_python(py: &str, code: &str, args: &[&str]) -> String {
    let out = Command::new(py)
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot start {py}: {e} (numpy checks need Python; .ci/run installs it)")
        });
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{py} failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The finals that `store` holds for experiment `exp` (keys read from its manifest there) are
/// byte-identical to those a `coordinator run` wrote under `reference`, object by object, and
/// no staging object is left. Returns the store's manifest.
pub async fn assert_store_finals_match(
    store: &quarry_common::storage::Store,
    exp: &str,
    objects: &[&str],
    reference: &Path,
) -> serde_json::Value {
    let manifest: serde_json::Value = serde_json::from_slice(
        &store
            .get_bytes(&format!("{exp}/manifest.json"))
            .await
            .expect("read the manifest from the store")
            .expect("the manifest is in the store"),
    )
    .expect("the manifest is JSON");
    let scratch = tempfile::tempdir().expect("scratch dir");
    for o in objects {
        let keys = manifest["objects"][o]["final"]
            .as_array()
            .unwrap_or_else(|| panic!("no finals for {o}: {manifest}"));
        let reference_finals = finals(reference, exp, o);
        assert_eq!(keys.len(), reference_finals.len(), "{manifest}");
        for (key, reference_final) in keys.iter().zip(&reference_finals) {
            let key = key.as_str().expect("final keys are strings");
            // The same names under the store's prefix as in the local run's directory.
            assert_eq!(
                experiments(reference).join(key),
                *reference_final,
                "{manifest}"
            );
            let local = scratch.path().join(key);
            store
                .download_to(key, &local)
                .await
                .expect("download a final");
            assert_eq!(
                sha256_file(&local),
                sha256_file(reference_final),
                "{key} differs from {}",
                reference_final.display()
            );
        }
    }
    let left = store
        .list(&format!("{exp}/rounds"))
        .await
        .expect("list staging");
    assert!(left.is_empty(), "staging left: {left:?}");
    manifest
}

/// A loopback port that was free a moment ago (a server started on it binds its own listener;
/// callers retry on a clash).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("loopback bind")
        .local_addr()
        .expect("bound address")
        .port()
}

/// The last 4000 bytes of a log file (empty when unreadable), for failure messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(4000);
    text.get(start..).unwrap_or(&text).to_string()
}
