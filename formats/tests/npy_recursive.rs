//! Object arrays whose elements hold themselves, written by the real numpy (`np.save(...,
//! allow_pickle=True)`, which numpy loads back without complaint): a dict holding itself, a
//! list holding itself, two dicts holding each other. Every
//! entry point that reads values (inspect, inspect with a filter, the filtered and
//! de-duplicating merge, examine) must end with a clear error (a recursive value is not a tree
//! of samples), never a panic, a stack overflow or an endless walk. The plain merge copies
//! elements as pickle bytes without evaluating them: it keeps the cycle as numpy wrote it,
//! and numpy loads the merged file with the cycle intact.
//!
//! Needs a Python with numpy; fails (never skips) without one.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::path::{Path, PathBuf};

use quarry_formats::{Filter, Format, MergeOptions};

mod pyhelp;

/// `recursive.py DIR`: one `.npy` per variant, plus `plain.npy` (the same layout, no cycle).
const RECURSIVE: &str = r#"
import sys, os, numpy as np

d = sys.argv[1]
def save(name, elems):
    a = np.empty(len(elems), dtype=object)
    for i, e in enumerate(elems):
        a[i] = e
    np.save(os.path.join(d, name + '.npy'), a, allow_pickle=True)
    back = np.load(os.path.join(d, name + '.npy'), allow_pickle=True)
    assert len(back) == len(elems), name

save('plain', [{'a': 1.0, 'b': [1, 2]}, {'a': 2.0, 'b': [3]}])

x = {'a': 1.0}
x['b'] = x
save('dict_self', [{'a': 0.5, 'b': None}, x])

l = [1, 2]
l.append(l)
save('list_self', [{'a': 1.0, 'b': l}, {'a': 2.0, 'b': [3]}])

p = {'a': 1.0}
q = {'p': p}
p['b'] = q
save('mutual', [p, {'a': 2.0, 'b': None}])
"#;

fn files() -> (tempfile::TempDir, Vec<PathBuf>) {
    let py = pyhelp::python(&["numpy"]);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("recursive.py");
    std::fs::write(&script, RECURSIVE).unwrap();
    pyhelp::run(&py, &script, &[dir.path().display().to_string()]);
    let files = ["dict_self", "list_self", "mutual"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.npy")))
        .collect();
    (dir, files)
}

/// Runs `f`, failing the test with `what` if it panics.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| panic!("{what} panicked"))
}

fn assert_recursive(what: &str, e: impl std::fmt::Display) {
    let text = e.to_string();
    assert!(
        text.contains("a recursive value") && text.contains("without cycles"),
        "{what}: {text}"
    );
}

fn merge(inputs: &[PathBuf], options: &MergeOptions, out: &Path) -> String {
    let counts = vec![2; inputs.len()];
    match quarry_formats::merge(Format::Npy, inputs, &counts, options, out) {
        Ok(s) => panic!("merge of {inputs:?} succeeded: {s:?}"),
        Err(e) => e.to_string(),
    }
}

/// `check.py MERGED`: loads the plain merge and says whether its last two elements still
/// hold themselves.
const CHECK: &str = r#"
import sys, numpy as np
a = np.load(sys.argv[1], allow_pickle=True)
def cyclic(v, seen=()):
    if any(v is s for s in seen):
        return True
    kids = list(v.values()) if isinstance(v, dict) else (v if isinstance(v, list) else [])
    return any(cyclic(k, seen + (v,)) for k in kids)
print(len(a), ' '.join(str(cyclic(e)) for e in a))
"#;

#[test]
fn plain_file_reads() {
    let (dir, _) = files();
    let plain = dir.path().join("plain.npy");
    let i = quarry_formats::inspect(Format::Npy, &plain, None).unwrap();
    assert_eq!(i.count, 2);
}

#[test]
fn recursive_values_are_errors_everywhere() {
    let (dir, files) = files();
    let py = pyhelp::python(&["numpy"]);
    let check = dir.path().join("check.py");
    std::fs::write(&check, CHECK).unwrap();
    let plain = dir.path().join("plain.npy");
    let filter = Filter::parse("a>0").unwrap();
    for (k, f) in files.iter().enumerate() {
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        let e = no_panic(&format!("inspect {name}"), || {
            quarry_formats::inspect(Format::Npy, f, None).unwrap_err()
        });
        assert_recursive(&format!("inspect {name}"), e);
        let e = no_panic(&format!("filtered inspect {name}"), || {
            quarry_formats::inspect(Format::Npy, f, Some(&filter)).unwrap_err()
        });
        assert_recursive(&format!("filtered inspect {name}"), e);

        let inputs = [plain.clone(), f.clone()];
        let out = dir.path().join(format!("plain-merge-{k}.npy"));
        let counts = [2, 2];
        let options = MergeOptions {
            limit: 10,
            ..Default::default()
        };
        let s = no_panic(&format!("merge {name}"), || {
            quarry_formats::merge(Format::Npy, &inputs, &counts, &options, &out).unwrap()
        });
        assert_eq!(s.samples, 4);
        let shown = pyhelp::run(&py, &check, &[out.display().to_string()]);
        let cyclic = if name == "list_self.npy" || name == "mutual.npy" {
            "True False"
        } else {
            "False True"
        };
        assert_eq!(shown.trim(), format!("4 False False {cyclic}"), "{name}");

        for (tag, options) in [
            (
                "filtered merge",
                MergeOptions {
                    limit: 10,
                    filter: Some(filter.clone()),
                    ..Default::default()
                },
            ),
            (
                "dedup merge",
                MergeOptions {
                    limit: 10,
                    dedup: vec!["a".into(), "b".into()],
                    ..Default::default()
                },
            ),
        ] {
            let out = dir
                .path()
                .join(format!("out-{k}-{}.npy", tag.replace(' ', "-")));
            let e = no_panic(&format!("{tag} {name}"), || merge(&inputs, &options, &out));
            assert_recursive(&format!("{tag} {name}"), e);
        }

        let mut rec = pyhelp::Recorder::default();
        let r = no_panic(&format!("examine {name}"), || {
            quarry_formats::examine(Format::Npy, f, &mut rec)
        });
        match r {
            Err(e) => assert_recursive(&format!("examine {name}"), e),
            Ok(_) => {
                let found = rec
                    .problems
                    .iter()
                    .any(|(_, r)| r.contains("a recursive value"));
                assert!(found, "examine {name}: {:?}", rec.problems);
            }
        }
    }
}
