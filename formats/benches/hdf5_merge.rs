//! Quarry's robomimic HDF5 merge against the same merge written with h5py.
//!
//! h5py writes ROUNDS rounds of DEMOS demos (STEPS steps each, about 0.7 MB a demo: states,
//! actions, two image streams, a gzip-compressed depth stream); then, on the same disk, each
//! contender merges all of them into one file twice (alternating, the best time counts):
//! Quarry (`quarry_formats::hdf5::merge`, in process) and a Python script that copies every
//! demo with `src.copy(demo, dst_group, name=...)` and writes `total` and the masks (timed
//! inside Python, from opening the output to closing it, so interpreter start-up is not
//! counted). Prints MB/s (output bytes over time) for each and the ratio, and checks with h5py
//! that both outputs hold the same demos, values and attributes.
//!
//! `cargo bench -p quarry-formats --bench hdf5_merge`. Environment: `QUARRY_TEST_PYTHON`
//! (default `python3`, with numpy and h5py), `QUARRY_BENCH_DIR` (default: a temporary
//! directory), `QUARRY_BENCH_ROUNDS` (64), `QUARRY_BENCH_DEMOS` (8), `QUARRY_BENCH_STEPS`
//! (100).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use quarry_formats::{MergeOptions, hdf5};

const GEN: &str = r#"
import sys, json, numpy as np, h5py
out, rounds, demos, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for r in range(rounds):
    rng = np.random.default_rng(r)
    with h5py.File('%s/round_%03d.hdf5' % (out, r), 'w') as f:
        data = f.create_group('data')
        total = 0
        for d in range(demos):
            L = int(rng.integers(steps // 2, steps * 3 // 2 + 1))
            g = data.create_group('demo_%d' % d)
            g.attrs['num_samples'] = L
            g.attrs['model_file'] = '<mujoco model="bench"/>'
            g['actions'] = rng.standard_normal((L, 7)).astype('<f4')
            g['rewards'] = rng.random(L)
            g['dones'] = (np.arange(L) == L - 1).astype('<i8')
            g['states'] = rng.standard_normal((L, 64))
            for part in ('obs', 'next_obs'):
                g[part + '/eef_pos'] = rng.standard_normal((L, 3))
                g[part + '/agentview_image'] = rng.integers(0, 255, (L, 32, 32, 3), dtype='u1')
            depth = np.zeros((L, 16, 16), dtype='<f4')
            depth[:, 4:12, 4:12] = rng.random((L, 1, 1))
            g.create_dataset('obs/depth', data=depth, chunks=(8, 16, 16), compression='gzip')
            total += L
        data.attrs['total'] = total
        data.attrs['env_args'] = json.dumps({'env_name': 'Bench', 'type': 1, 'env_kwargs': {}})
        names = ['demo_%d' % d for d in range(demos)]
        f['mask/train'] = np.array(names[:-1], dtype='S')
        f['mask/valid'] = np.array(names[-1:], dtype='S')
"#;

const H5PY_MERGE: &str = r#"
import sys, time, numpy as np, h5py
out, inputs = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
with h5py.File(out, 'w') as dst:
    dd = dst.create_group('data')
    k = total = 0
    keys, masks = [], {}
    for i, path in enumerate(inputs):
        with h5py.File(path, 'r') as src:
            data = src['data']
            if i == 0:
                for name, v in data.attrs.items():
                    if name != 'total':
                        dd.attrs[name] = v
            listed = {}
            for key in src.get('mask', {}):
                if key not in masks:
                    keys.append(key)
                    masks[key] = []
                for n in src['mask'][key][()]:
                    listed.setdefault(n.decode(), []).append(key)
            for d in sorted(data, key=lambda n: int(n[5:])):
                new = 'demo_%d' % k
                src.copy(data[d], dd, name=new)
                for key in listed.get(d, []):
                    masks[key].append(new)
                total += int(data[d].attrs['num_samples'])
                k += 1
    dd.attrs['total'] = total
    for key in keys:
        dst.create_dataset('mask/' + key, data=np.array(masks[key], dtype='S'))
print(time.perf_counter() - t0)
"#;

const COMPARE: &str = r#"
import sys, numpy as np, h5py
a, b = h5py.File(sys.argv[1], 'r'), h5py.File(sys.argv[2], 'r')
def walk(f):
    out = {}
    f.visititems(lambda n, o: out.__setitem__(n, o))
    return out
oa, ob = walk(a), walk(b)
assert sorted(oa) == sorted(ob), sorted(set(oa) ^ set(ob))
for n in sorted(oa):
    x, y = oa[n], ob[n]
    assert sorted(x.attrs) == sorted(y.attrs), n
    for k in x.attrs:
        assert np.array_equal(np.asarray(x.attrs[k]), np.asarray(y.attrs[k])), (n, k)
    if isinstance(x, h5py.Dataset):
        assert x.dtype == y.dtype and x.shape == y.shape, n
        assert np.array_equal(x[()], y[()]), n
assert sorted(a.attrs) == sorted(b.attrs)
print(len(a['data']))
"#;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().expect(name))
        .unwrap_or(default)
}

fn run(py: &str, script: &Path, args: &[String]) -> String {
    let out = Command::new(py)
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py} ({e}); set QUARRY_TEST_PYTHON"));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    let py = std::env::var("QUARRY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let rounds = env_u64("QUARRY_BENCH_ROUNDS", 64);
    let demos = env_u64("QUARRY_BENCH_DEMOS", 8);
    let steps = env_u64("QUARRY_BENCH_STEPS", 100);
    let tmp;
    let dir: PathBuf = match std::env::var_os("QUARRY_BENCH_DIR") {
        Some(d) => {
            let d = PathBuf::from(d).join(format!("hdf5-merge-bench-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            d
        }
        None => {
            tmp = tempfile::tempdir().unwrap();
            tmp.path().to_path_buf()
        }
    };
    let script = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let gen_py = script("gen.py", GEN);
    let merge_py = script("merge.py", H5PY_MERGE);
    let compare_py = script("compare.py", COMPARE);

    let t = Instant::now();
    run(
        &py,
        &gen_py,
        &[
            dir.display().to_string(),
            rounds.to_string(),
            demos.to_string(),
            steps.to_string(),
        ],
    );
    let inputs: Vec<PathBuf> = (0..rounds)
        .map(|r| dir.join(format!("round_{r:03}.hdf5")))
        .collect();
    let in_bytes: u64 = inputs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    println!(
        "wrote {rounds} rounds x {demos} demos ({:.1} MB) with h5py in {:.1} s, in {}",
        in_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        dir.display()
    );
    let counts = vec![demos; rounds as usize];
    let options = MergeOptions {
        limit: u64::MAX,
        ..Default::default()
    };

    let (mut best_quarry, mut best_h5py) = (f64::INFINITY, f64::INFINITY);
    let (mut quarry_bytes, mut h5py_bytes) = (0, 0);
    let quarry_out = dir.join("merged-quarry.hdf5");
    let h5py_out = dir.join("merged-h5py.hdf5");
    for _ in 0..2 {
        let _ = std::fs::remove_file(&quarry_out);
        let t = Instant::now();
        let s = hdf5::merge(&inputs, &counts, &options, &quarry_out).expect("quarry merge");
        best_quarry = best_quarry.min(t.elapsed().as_secs_f64());
        quarry_bytes = s.bytes_written;
        assert_eq!(s.samples, rounds * demos);

        let _ = std::fs::remove_file(&h5py_out);
        let mut args = vec![h5py_out.display().to_string()];
        args.extend(inputs.iter().map(|p| p.display().to_string()));
        let secs: f64 = run(&py, &merge_py, &args).parse().expect("seconds");
        best_h5py = best_h5py.min(secs);
        h5py_bytes = std::fs::metadata(&h5py_out).unwrap().len();
    }
    let mbps = |bytes: u64, secs: f64| bytes as f64 / 1e6 / secs;
    println!(
        "quarry hdf5 merge: {:.1} MB in {:.3} s = {:.0} MB/s",
        quarry_bytes as f64 / 1e6,
        best_quarry,
        mbps(quarry_bytes, best_quarry)
    );
    println!(
        "h5py copy merge:   {:.1} MB in {:.3} s = {:.0} MB/s",
        h5py_bytes as f64 / 1e6,
        best_h5py,
        mbps(h5py_bytes, best_h5py)
    );
    println!(
        "ratio (h5py time / quarry time): {:.2}x",
        best_h5py / best_quarry
    );
    let n = run(
        &py,
        &compare_py,
        &[
            quarry_out.display().to_string(),
            h5py_out.display().to_string(),
        ],
    );
    assert_eq!(n, (rounds * demos).to_string());
    println!("both outputs hold the same {n} demos (values and attributes compared)");
    if std::env::var_os("QUARRY_BENCH_DIR").is_some() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
