//! `inspect_bytes` (a file's bytes already in memory: a worker's small output, a round read
//! back at commit) gives what `inspect` gives on a file holding the same bytes, for every
//! format it covers: the same count, kept count and schema, or an error for both. Checked on
//! numpy-written numeric, structured and object `.npy` files and on JSON Lines, each whole,
//! truncated at every length up to its header's end and then in steps, and with seeded byte
//! flips, with and without a filter. Needs Python with numpy.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::path::Path;

use quarry_formats::{Filter, Format};

mod pyhelp;

const NUMPY_SEEDS: &str = r#"
import sys, os, numpy as np
d = sys.argv[1]
rng = np.random.default_rng(0)
np.save(os.path.join(d, 'numeric.npy'), rng.standard_normal((6, 3)).astype('<f4'))
rec = np.zeros(5, dtype=[('energy', '<f8'), ('pose', '<f4', (3,)), ('ok', '?')])
rec['energy'] = rng.random(5)
np.save(os.path.join(d, 'structured.npy'), rec)
elems = [{'energy': float(e), 'pose': rng.standard_normal(3), 'name': 'o%d' % i}
         for i, e in enumerate(rng.random(5))]
a = np.empty(len(elems), dtype=object)
for i, e in enumerate(elems):
    a[i] = e
np.save(os.path.join(d, 'object.npy'), a, allow_pickle=True)
"#;

/// Compares both entry points on `bytes`; returns whether the file inspected.
fn same(format: Format, dir: &Path, bytes: &[u8], filter: Option<&Filter>, what: &str) -> bool {
    let file = dir.join("input");
    std::fs::write(&file, bytes).unwrap();
    let on_file = quarry_formats::inspect(format, &file, filter);
    let in_memory =
        quarry_formats::inspect_bytes(format, &file, bytes, filter).expect("inspected from bytes");
    match (&on_file, &in_memory) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{what}"),
        (Err(_), Err(_)) => {}
        _ => panic!("{what}: the file gave {on_file:?}, its bytes {in_memory:?}"),
    }
    on_file.is_ok()
}

/// Every truncation near the start, then every 7th byte, then byte flips (xorshift, seeded).
fn variants(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![("whole".to_string(), data.to_vec())];
    for n in (0..data.len().min(200)).chain((200..data.len()).step_by(7)) {
        out.push((format!("cut at {n}"), data[..n].to_vec()));
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..300 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut d = data.to_vec();
        let at = (x as usize) % d.len();
        d[at] ^= 1 << ((x >> 32) % 8);
        out.push((format!("flip {i} at {at}"), d));
    }
    out
}

#[test]
fn bytes_in_memory_inspect_as_the_same_file_does() {
    let py = pyhelp::python(&["numpy"]);
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("seeds.py");
    std::fs::write(&script, NUMPY_SEEDS).unwrap();
    pyhelp::run(&py, &script, &[dir.path().display().to_string()]);
    let jsonl: String = (0..6)
        .map(|i| {
            format!(
                "{{\"score\": {}, \"pose\": [{i}, 2], \"n\": \"s{i}\"}}\n",
                i as f64 / 5.0
            )
        })
        .collect();
    let seeds: Vec<(Format, Vec<u8>, Option<&str>)> = vec![
        (
            Format::Npy,
            std::fs::read(dir.path().join("numeric.npy")).unwrap(),
            None,
        ),
        (
            Format::Npy,
            std::fs::read(dir.path().join("structured.npy")).unwrap(),
            Some("energy<0.5"),
        ),
        (
            Format::Npy,
            std::fs::read(dir.path().join("object.npy")).unwrap(),
            Some("energy<0.5"),
        ),
        (Format::Jsonl, jsonl.into_bytes(), Some("score>0.3")),
    ];
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    for (format, data, filter) in seeds {
        let filter = filter.map(|f| Filter::parse(f).unwrap());
        assert!(format.inspects_bytes());
        let mut inspected = 0;
        for (what, bytes) in variants(&data) {
            let what = format!("{format} {what}");
            inspected += same(format, &work, &bytes, None, &what) as u32;
            if let Some(f) = &filter {
                same(format, &work, &bytes, Some(f), &what);
            }
        }
        assert!(
            inspected > 1,
            "{format}: too few variants inspected ({inspected})"
        );
    }
    for format in [Format::Hdf5, Format::Npz, Format::Zarr, Format::Episodes] {
        assert!(!format.inspects_bytes());
        assert!(quarry_formats::inspect_bytes(format, Path::new("x"), b"", None).is_none());
    }
}
