//! Byte-for-byte agreement with the legacy tool: rounds written by real numpy
//! (`np.save(path, list_of_dicts, allow_pickle=True)`) merged here must equal, byte for byte,
//! what that numpy writes for `np.save(final, items_of_all_rounds[:quota])` after loading each
//! round with `np.load`: the legacy tool's merge.
//!
//! numpy 1.x rounds (pickle protocol 3) are compared byte for byte; numpy 2.x rounds (protocol
//! 4, framed) are merged into a valid protocol-4 stream that is not yet numpy 2's own framing,
//! so for them the merged array is compared by value. Every interpreter in
//! `QUARRY_TEST_PYTHONS` (default `QUARRY_TEST_PYTHON`) is run; each must import numpy.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::fs::File;
use std::path::{Path, PathBuf};

use quarry_formats::npy;

mod pyhelp;
use pyhelp::{pythons, run};

/// Writes rounds of dicts: nested dicts, floats, ints, bools, None, strings shared within a
/// round, one-character and empty strings (one object in CPython, so shared across rounds once
/// loaded), empty and one-byte bytes, tuples, the `'|'` the header also holds, repeated keys.
/// Then writes the legacy merge of those rounds at each quota.
const GEN: &str = r#"
import sys, numpy as np
out, sizes, quotas = sys.argv[1], sys.argv[2], sys.argv[3]
sizes = [int(x) for x in sizes.split(',')]
quotas = [int(x) for x in quotas.split(',')]
paths = []
for r, n in enumerate(sizes):
    tag = 'round%d' % r
    items = []
    for i in range(n):
        name = 'obj%d' % (i % 300)
        items.append({
            'object_code': tag, 'index': i, 'scale': 0.1 * i, 'valid': bool(i % 3),
            'grade': 'abc'[i % 3], 'empty': '', 'pipe': '|', 'e': '\u00e9', 'w': '\u0100',
            'name': name, 'again': name, 'raw': b'', 'one': b'x', 'note': None,
            'pair': (i, 'k'), 'neg': -i, 'big': 2 ** 40 + i,
            'qpos': {'WRJTx': 0.5 * i, 'WRJTy': -0.25 * i, 'j%d' % (i % 5): i},
            'nested': {'a': {'b': [i, 'x', None]}, 'k': 'v%d' % (i % 2)},
        })
    p = '%s/r%d.npy' % (out, r)
    np.save(p, items, allow_pickle=True)
    paths.append(p)
loaded = []
for p in paths:
    loaded += list(np.load(p, allow_pickle=True))
for q in quotas:
    np.save('%s/legacy-%d.npy' % (out, q), np.array(loaded[:q], dtype=object),
            allow_pickle=True)
print(np.__version__)
"#;

const SAME: &str = r#"
import sys, numpy as np
a = np.load(sys.argv[1], allow_pickle=True)
b = np.load(sys.argv[2], allow_pickle=True)
assert a.dtype == b.dtype and a.shape == b.shape, (a.shape, b.shape)
assert list(a) == list(b)
print('ok')
"#;

fn merge_files(rounds: &[PathBuf], counts: &[u64], limit: u64, out: &Path) {
    let f = File::create(out).unwrap();
    let s = npy::merge(counts, limit, |i| File::open(&rounds[i]), &f).unwrap();
    assert_eq!(s.bytes_written, std::fs::metadata(out).unwrap().len());
}

#[test]
fn object_merge_writes_the_legacy_tools_bytes() {
    // Rounds crossing pickle's 1000-item batches and the 256-entry one-byte memo indices;
    // quotas at one element, mid-round, at batch edges, mid-batch and past the total.
    let sizes = [3u64, 1, 1200, 2, 300, 1000];
    let total: u64 = sizes.iter().sum();
    let quotas = [
        1u64, 2, 4, 5, 1000, 1004, 1005, 1204, 1206, 1506, 2000, 2506, total,
    ];
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    for py in pythons() {
        let dir = tempfile::tempdir().unwrap();
        let gen_py = dir.path().join("gen.py");
        let same = dir.path().join("same.py");
        std::fs::write(&gen_py, GEN).unwrap();
        std::fs::write(&same, SAME).unwrap();
        let version = run(
            &py,
            &gen_py,
            &[
                dir.path().display().to_string(),
                list(&sizes),
                list(&quotas),
            ],
        );
        let version = version.trim().to_string();
        let rounds: Vec<PathBuf> = (0..sizes.len())
            .map(|r| dir.path().join(format!("r{r}.npy")))
            .collect();
        for &q in &quotas {
            let ours = dir.path().join(format!("quarry-{q}.npy"));
            let legacy = dir.path().join(format!("legacy-{q}.npy"));
            merge_files(&rounds, &sizes, q, &ours);
            if version.starts_with("1.") {
                let (a, b) = (
                    std::fs::read(&ours).unwrap(),
                    std::fs::read(&legacy).unwrap(),
                );
                let first = a.iter().zip(&b).position(|(x, y)| x != y);
                assert!(
                    a == b,
                    "numpy {version}, quota {q}: merged file differs from the legacy one \
                     (lengths {} vs {}, first difference at byte {first:?})",
                    a.len(),
                    b.len()
                );
            } else {
                let said = run(
                    &py,
                    &same,
                    &[ours.display().to_string(), legacy.display().to_string()],
                );
                assert_eq!(said.trim(), "ok", "numpy {version}, quota {q}");
            }
        }
        eprintln!("{py}: numpy {version}: {} quotas checked", quotas.len());
    }
}
