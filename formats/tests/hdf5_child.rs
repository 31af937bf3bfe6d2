//! libhdf5 in a child process (`quarry_formats::hdf5::child`): the child's answers are the
//! in-process answers (merged files byte for byte, examine's events value for value, errors
//! variant for variant), and a child that dies, hangs, exits or answers garbage is one
//! [`DatasetError::Crashed`] naming the file and how the child ended, never the caller.
//!
//! The child is `quarry-hdf5-child`, this crate's binary that only answers as a child, as the
//! `coordinator` and `worker` binaries do. `data/libhdf5-segv.hdf5` is an h5py-written
//! robomimic file with ten bytes changed (a byte-mutation campaign, docs/fuzzing.md) that
//! makes libhdf5 1.10 (Debian libhdf5-103-1) read past a buffer in `H5F__accum_read` while
//! iterating a group's local heap: SIGSEGV. `data/libhdf5-segv-on-copy.hdf5` (same campaign)
//! inspects cleanly and segfaults libhdf5 in `H5HG_read` when `H5Ocopy` converts a
//! variable-length attribute. Needs a Python with numpy and h5py.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quarry_formats::hdf5::child::{Isolation, Limits};
use quarry_formats::{DatasetError, Filter, MergeOptions, Observer, hdf5};

mod pyhelp;

/// Writes `n` demos per round into each OUT: `gen.py SEED N OUT...`; round k's demo 1 holds
/// a NaN and an infinity, and demo 0 of every round is the same (a duplicate).
const GEN: &str = r#"
import sys, json, numpy as np, h5py
seed, n, outs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
for k, out in enumerate(outs):
    with h5py.File(out, 'w') as f:
        data = f.create_group('data')
        data.attrs['env_args'] = json.dumps({'env_name': 'Lift', 'type': 1})
        total = 0
        for i in range(n):
            rng = np.random.default_rng(0 if i == 0 else seed * 1000 + k * 100 + i)
            L = int(rng.integers(3, 9))
            g = data.create_group('demo_%d' % i)
            g.attrs['num_samples'] = L
            g.attrs['success'] = bool(i % 2 == 0)
            a = rng.standard_normal((L, 7)).astype('<f4')
            if i == 1:
                a[0, 0], a[1, 1] = np.nan, -np.inf
            g.create_dataset('actions', data=a)
            g.create_dataset('obs/eef_pos', data=rng.standard_normal((L, 3)))
            g.create_dataset('obs/image', data=rng.integers(0, 255, (L, 4, 4, 3), dtype='u1'),
                             chunks=(1, 4, 4, 3), compression='gzip')
            total += L
        data.attrs['total'] = total
        m = f.create_group('mask')
        m.create_dataset('train', data=np.array([b'demo_%d' % i for i in range(0, n, 2)]))
"#;

fn child() -> Isolation {
    Isolation {
        program: PathBuf::from(env!("CARGO_BIN_EXE_quarry-hdf5-child")),
        limits: Limits {
            memory_bytes: 4 << 30,
            cpu_seconds: 60,
            wall: Duration::from_secs(60),
        },
    }
}

fn rounds(dir: &Path, n: usize, demos: usize) -> Vec<PathBuf> {
    let py = pyhelp::python(&["numpy", "h5py"]);
    let outs: Vec<PathBuf> = (0..n).map(|k| dir.join(format!("r{k}.hdf5"))).collect();
    let mut args = vec!["7".to_string(), demos.to_string()];
    args.extend(outs.iter().map(|p| p.display().to_string()));
    pyhelp::run_code(&py, GEN, &args);
    outs
}

fn segv_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/libhdf5-segv.hdf5")
}

/// Examine's events, values as bits (NaN equals NaN).
#[derive(Debug, Default, PartialEq)]
struct Events(Vec<String>);

impl Observer for Events {
    fn sample(&mut self, index: u64) {
        self.0.push(format!("sample {index}"));
    }
    fn values(&mut self, field: &str, values: &[f64]) {
        let bits: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
        self.0.push(format!("values {field} {bits:?}"));
    }
    fn problem(&mut self, path: &str, reason: &str) {
        self.0.push(format!("problem {path}: {reason}"));
    }
}

#[test]
fn a_merge_in_a_child_writes_the_bytes_the_in_process_merge_writes() {
    let d = tempfile::tempdir().unwrap();
    let inputs = rounds(d.path(), 3, 4);
    let counts = vec![4, 4, 4];
    let iso = child();
    let variants = [
        MergeOptions {
            limit: 100,
            ..Default::default()
        },
        MergeOptions {
            limit: 6,
            ..Default::default()
        },
        MergeOptions {
            limit: 100,
            filter: Some(Filter::parse("success >= 1").unwrap()),
            dedup: vec!["actions".into()],
            video_files_size_in_mb: None,
        },
    ];
    for (k, options) in variants.iter().enumerate() {
        let here = d.path().join(format!("here{k}.hdf5"));
        let there = d.path().join(format!("there{k}.hdf5"));
        let a = hdf5::merge(&inputs, &counts, options, &here).unwrap();
        let b = iso.merge(&inputs, &counts, options, &there).unwrap();
        assert_eq!(a, b, "summaries of variant {k}");
        assert!(a.samples > 0);
        assert_eq!(
            std::fs::read(&here).unwrap(),
            std::fs::read(&there).unwrap(),
            "variant {k}: the child's final differs from the in-process final"
        );
        for filter in [None, options.filter.as_ref()] {
            assert_eq!(
                hdf5::inspect(&there, filter).unwrap(),
                iso.inspect(&there, filter).unwrap()
            );
        }
    }
}

#[test]
fn examine_in_a_child_reports_every_event_of_the_in_process_walk() {
    let d = tempfile::tempdir().unwrap();
    let inputs = rounds(d.path(), 1, 3);
    let (mut here, mut there) = (Events::default(), Events::default());
    let a = hdf5::examine(&inputs[0], &mut here).unwrap();
    let b = child().examine(&inputs[0], &mut there).unwrap();
    assert_eq!(a, b);
    assert_eq!(here, there);
    assert!(
        there.0.iter().any(|e| e.contains("non-finite")),
        "the NaN is reported: {:?}",
        there.0
    );
}

#[test]
fn errors_cross_the_child_with_their_variant_and_words() {
    let d = tempfile::tempdir().unwrap();
    let inputs = rounds(d.path(), 2, 2);
    let iso = child();
    let not_hdf5 = d.path().join("text.hdf5");
    std::fs::write(&not_hdf5, b"not an hdf5 file at all").unwrap();
    let missing = d.path().join("missing.hdf5");
    for p in [&not_hdf5, &missing] {
        let a = hdf5::inspect(p, None).unwrap_err();
        let b = iso.inspect(p, None).unwrap_err();
        assert_eq!(a.to_string(), b.to_string());
        assert_eq!(
            std::mem::discriminant(&a),
            std::mem::discriminant(&b),
            "{a:?} / {b:?}"
        );
    }
    // Counts that disagree with the files; an output that exists.
    let opts = MergeOptions {
        limit: 10,
        ..Default::default()
    };
    let out = d.path().join("o.hdf5");
    let a = hdf5::merge(&inputs, &[2, 5], &opts, &out).unwrap_err();
    std::fs::remove_file(&out).unwrap();
    let b = iso.merge(&inputs, &[2, 5], &opts, &out).unwrap_err();
    assert_eq!(a.to_string(), b.to_string());
    assert!(matches!(b, DatasetError::Invalid { .. }), "{b:?}");
    let b = iso.merge(&inputs, &[2, 2], &opts, &inputs[0]).unwrap_err();
    assert!(
        matches!(&b, DatasetError::Io { op: "create", source, .. }
            if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{b:?}"
    );
}

#[test]
fn a_file_that_crashes_libhdf5_is_an_error_naming_it_and_the_signal() {
    let f = segv_file();
    let name = f.display().to_string();
    let iso = child();
    let crashed = |e: DatasetError, doing: &str| match e {
        DatasetError::Crashed { path, reason } => {
            assert!(
                reason.starts_with(&format!(
                    "libhdf5 crashed (signal 11 SIGSEGV) while {doing}"
                )),
                "{reason}"
            );
            path
        }
        other => panic!("not a crash: {other:?}"),
    };
    assert_eq!(
        crashed(iso.inspect(&f, None).unwrap_err(), "reading it"),
        name
    );
    assert_eq!(
        crashed(
            iso.examine(&f, &mut Events::default()).unwrap_err(),
            "reading it"
        ),
        name
    );
    let d = tempfile::tempdir().unwrap();
    let good = rounds(d.path(), 1, 2);
    let out = d.path().join("final.hdf5");
    let opts = MergeOptions {
        limit: 10,
        ..Default::default()
    };
    let e = iso
        .merge(&[f.clone(), good[0].clone()], &[3, 2], &opts, &out)
        .unwrap_err();
    assert_eq!(
        crashed(e, "merging 2 rounds into it"),
        out.display().to_string()
    );
    // A file that inspects cleanly and crashes libhdf5 only when its demos are copied.
    let on_copy =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/libhdf5-segv-on-copy.hdf5");
    assert_eq!(iso.inspect(&on_copy, None).unwrap().count, 3);
    let _ = std::fs::remove_file(&out);
    let e = iso
        .merge(&[good[0].clone(), on_copy], &[2, 3], &opts, &out)
        .unwrap_err();
    crashed(e, "merging 2 rounds into it");
    // This process is alive, and the next file is read as ever.
    assert_eq!(iso.inspect(&good[0], None).unwrap().count, 2);
}

/// A stand-in child: a shell script given as the program.
fn script(dir: &Path, name: &str, body: &str) -> Isolation {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut perms = std::fs::metadata(&p).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&p, perms).unwrap();
    Isolation {
        program: p,
        limits: Limits {
            memory_bytes: 0,
            cpu_seconds: 0,
            wall: Duration::from_secs(2),
        },
    }
}

fn reason(e: DatasetError) -> String {
    match e {
        DatasetError::Crashed { path, reason } => {
            assert_eq!(path, "round.hdf5");
            reason
        }
        other => panic!("not a crash: {other:?}"),
    }
}

#[test]
fn a_child_that_hangs_exits_or_babbles_is_an_error_saying_how_it_ended() {
    let d = tempfile::tempdir().unwrap();
    let f = Path::new("round.hdf5");
    let hang = script(d.path(), "hang", "exec sleep 60");
    let t0 = Instant::now();
    let r = reason(hang.inspect(f, None).unwrap_err());
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    assert_eq!(
        r,
        "libhdf5 was killed at its time limit of 2 s while reading it"
    );
    // An answer, then no exit: still killed at the deadline, and not taken as an answer.
    let lingers = script(
        d.path(),
        "lingers",
        r"cat >/dev/null; printf 'O\002\000\000\000\000\000\000\00042'; exec sleep 60",
    );
    let t0 = Instant::now();
    assert_eq!(
        reason(lingers.examine(f, &mut Events::default()).unwrap_err()),
        "libhdf5 was killed at its time limit of 2 s while reading it"
    );
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let exits = script(d.path(), "exits", "echo 'out of sorts' >&2; exit 3");
    assert_eq!(
        reason(exits.inspect(f, None).unwrap_err()),
        "libhdf5 exited with status 3 before answering while reading it \
         (its stderr ends: out of sorts)"
    );
    let babbles = script(d.path(), "babbles", "cat >/dev/null; echo hello");
    let r = reason(babbles.inspect(f, None).unwrap_err());
    assert!(r.starts_with("libhdf5 answered garbage ("), "{r}");
    let aborts = script(d.path(), "aborts", "kill -ABRT $$");
    assert_eq!(
        reason(aborts.examine(f, &mut Events::default()).unwrap_err()),
        "libhdf5 crashed (signal 6 SIGABRT, an assertion or abort in the library) while reading it"
    );
}
