//! Shared by the tests that check formats against Python: finding the interpreter (failing,
//! never skipping, without it), running scripts, walking directories, recording what
//! `examine` reports.
#![allow(dead_code)] // Each test binary uses its own subset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use quarry_formats::Observer;

/// `QUARRY_TEST_PYTHON`, or `python3`.
pub fn interpreter() -> String {
    std::env::var("QUARRY_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The interpreter from `QUARRY_TEST_PYTHON` (default `python3`); panics unless it runs and
/// imports every module in `modules`.
pub fn python(modules: &[&str]) -> String {
    let py = interpreter();
    python_with(&py, modules);
    py
}

/// Panics unless `py` runs and imports every module in `modules`.
fn python_with(py: &str, modules: &[&str]) {
    let code = format!("import sys, {}", modules.join(", "));
    let out = Command::new(py)
        .args(["-c", &code])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {py:?} ({e}); these tests need Python (set QUARRY_TEST_PYTHON)")
        });
    assert!(
        out.status.success(),
        "{py:?} cannot import {modules:?}; these tests need them (set QUARRY_TEST_PYTHON): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every interpreter to check with (`QUARRY_TEST_PYTHONS`, colon separated, e.g. one with
/// numpy 1.26 and one with numpy 2.x; else [`interpreter`]); each must import numpy, or the
/// test fails saying so.
pub fn pythons() -> Vec<String> {
    let list: Vec<String> = match std::env::var("QUARRY_TEST_PYTHONS") {
        Ok(v) => v
            .split(':')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        Err(_) => vec![interpreter()],
    };
    assert!(
        !list.is_empty(),
        "QUARRY_TEST_PYTHONS is set but names no interpreter"
    );
    for py in &list {
        python_with(py, &["numpy"]);
    }
    list
}

/// Runs `py script args...`, panicking with its stderr unless it exits 0; returns stdout.
pub fn run(py: &str, script: &Path, args: &[String]) -> String {
    let out = Command::new(py)
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{py} {} {args:?} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `py -c code args...`, panicking with its stderr unless it exits 0; returns stdout.
pub fn run_code(py: &str, code: &str, args: &[String]) -> String {
    let out = Command::new(py)
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `deploy/examples/<name>`.
pub fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

/// Every file under `dir` (relative path -> bytes).
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("prefix").display().to_string();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Copies the directory tree `from` to `to` (which must not exist).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let p = e.expect("entry").path();
        let dst = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_tree(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).expect("copy");
        }
    }
}

/// What `examine` reported.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Per sample: field -> values.
    pub samples: Vec<BTreeMap<String, Vec<f64>>>,
    pub problems: Vec<(String, String)>,
}

impl Observer for Recorder {
    fn sample(&mut self, index: u64) {
        assert_eq!(
            index,
            self.samples.len() as u64,
            "samples are numbered from 0"
        );
        self.samples.push(BTreeMap::new());
    }
    fn values(&mut self, field: &str, values: &[f64]) {
        let s = self.samples.last_mut().expect("values before any sample");
        assert!(
            s.insert(field.to_string(), values.to_vec()).is_none(),
            "{field} reported twice"
        );
    }
    fn problem(&mut self, path: &str, reason: &str) {
        self.problems.push((path.to_string(), reason.to_string()));
    }
}

impl Recorder {
    /// The problem reported at exactly `path`, if any.
    pub fn problem_at(&self, path: &Path) -> Option<&str> {
        let p = path.display().to_string();
        self.problems
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, r)| r.as_str())
    }
}
