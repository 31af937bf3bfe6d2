//! A deterministic fuzz campaign over every parser of outside input in `quarry-formats`.
//!
//! Seed datasets are written at test start by the real libraries and by the example generators
//! in `deploy/examples/` (numpy `.npy` numeric, structured and object arrays, `.npz` stored and
//! compressed, JSON Lines, zarr v2 and v3 stores, an episode directory); each is mutated
//! thousands of times (bit flips, interesting bytes, inserted and deleted runs, truncation,
//! length fields that lie, duplicated chunks, splices of two seeds) and every mutant goes
//! through `inspect` (with and without a filter), `merge` (alone and after its seed, with a
//! limit, a filter or de-duplication) and `examine`. Directory formats get one file of the
//! tree mutated at a time; the tar archive that carries them is mutated and unpacked. HDF5 is
//! fuzzed by structure, not bytes (libhdf5 is C and may itself crash on flipped bytes): h5py
//! writes random robomimic trees with cycles, shared and soft links, deep and wide groups,
//! odd dtypes, shapes and attributes.
//!
//! Every call runs under `catch_unwind`; the test fails on any panic, on an input that takes
//! longer than [`MAX_PER_INPUT`], and on an `Ok` that contradicts itself (a merge whose output
//! of inputs that inspect does not inspect to the samples it reports, a filter keeping more
//! than it counted, examine counting other samples than inspect).
//!
//! `QUARRY_FUZZ_ITERS` (mutants per seed file, default 150) and `QUARRY_FUZZ_SEED` (default
//! 1) run a longer campaign; see `docs/fuzzing.md`. Needs Python with numpy, h5py and zarr.
#![allow(clippy::unwrap_used)] // test helpers may unwrap

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quarry_formats::hdf5::child::{self, Limits};
use quarry_formats::{DatasetError, Filter, Format, MergeOptions, Observer, archive};

mod pyhelp;

/// The longest one mutant may take through all its calls (debug build, shared machine).
const MAX_PER_INPUT: Duration = Duration::from_secs(20);

/// xorshift64*: small, seedable, the same everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Values that make length and count fields lie.
const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    1 << 40,
];

/// One to four stacked mutations of `data`; `other` is another seed to splice from.
fn mutate(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    // Four in ten mutants get one in-place change (reaching past the header), the rest one to
    // four of any kind.
    let (rounds, kinds) = if rng.chance(40) {
        (1, 4)
    } else {
        (1 + rng.below(4), 10)
    };
    for _ in 0..rounds {
        let len = d.len();
        match rng.below(kinds) {
            0 | 1 => {
                if len > 0 {
                    let i = rng.below(len);
                    d[i] ^= 1 << rng.below(8);
                }
            }
            2 => {
                if len > 0 {
                    let i = rng.below(len);
                    d[i] = INTERESTING[rng.below(INTERESTING.len())] as u8;
                }
            }
            3 => {
                // A length field that lies: 1, 2, 4 or 8 bytes, either byte order.
                let w = [1usize, 2, 4, 8][rng.below(4)];
                if len >= w {
                    let i = rng.below(len - w + 1);
                    let v = INTERESTING[rng.below(INTERESTING.len())];
                    let b = if rng.chance(50) {
                        v.to_le_bytes()
                    } else {
                        v.to_be_bytes()
                    };
                    d[i..i + w].copy_from_slice(&b[..w]);
                }
            }
            4 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(i..i, ins);
            }
            5 => {
                if len > 0 {
                    let i = rng.below(len);
                    let n = (1 + rng.below(64)).min(len - i);
                    d.drain(i..i + n);
                }
            }
            6 => {
                let keep = rng.below(len + 1);
                d.truncate(keep);
            }
            7 => {
                // A duplicated chunk, inserted elsewhere.
                if len > 0 {
                    let i = rng.below(len);
                    let n = (1 + rng.below(256)).min(len - i);
                    let chunk = d[i..i + n].to_vec();
                    let at = rng.below(len + 1);
                    d.splice(at..at, chunk);
                }
            }
            8 => {
                // Splice: a prefix of this one, a suffix of the other.
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                d.truncate(cut);
                d.extend_from_slice(&other[from..]);
            }
            _ => {
                // A digit in text changed (counts, shapes, lengths in JSON and headers).
                let digits: Vec<usize> = (0..len).filter(|&i| d[i].is_ascii_digit()).collect();
                if !digits.is_empty() {
                    let i = digits[rng.below(digits.len())];
                    d[i] = b"0123456789-9"[rng.below(12)];
                }
            }
        }
    }
    d
}

/// Counts what `examine` reports, checking the calls come in order.
#[derive(Default)]
struct Count {
    samples: u64,
    values: u64,
    problems: u64,
}

impl Observer for Count {
    fn sample(&mut self, _index: u64) {
        self.samples += 1;
    }
    fn values(&mut self, _field: &str, values: &[f64]) {
        self.values += values.len() as u64;
    }
    fn problem(&mut self, _path: &str, _reason: &str) {
        self.problems += 1;
    }
}

/// One parser's seeds and how to exercise them.
struct Target {
    name: &'static str,
    format: Format,
    /// Seed datasets (files, or directories for directory formats).
    seeds: Vec<PathBuf>,
    filter: &'static str,
    dedup: &'static [&'static str],
}

/// What a campaign over one parser found.
#[derive(Default, Debug)]
struct Tally {
    inputs: u64,
    inspect_ok: u64,
    merge_ok: u64,
    panics: Vec<String>,
    inconsistent: Vec<String>,
    slow: Vec<String>,
    slowest: Duration,
    /// Calls whose libhdf5 child died (byte-mutated HDF5 only).
    deaths: u64,
}

/// Counts a child's death among `r`'s errors.
fn note_death<T>(r: &Result<T, DatasetError>, tally: &mut Tally) {
    if let Err(DatasetError::Crashed { .. }) = r {
        tally.deaths += 1;
    }
}

fn remove(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// Runs `f`, turning a panic into its message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

/// Sends one dataset through every entry point; returns inconsistencies found.
fn exercise(
    t: &Target,
    input: &Path,
    seed: &Path,
    seed_count: u64,
    out: &Path,
    rng: &mut Rng,
    tally: &mut Tally,
) -> Result<(), String> {
    let fmt = t.format;
    let filter = Filter::parse(t.filter).ok();
    let mut bad = Vec::new();
    let inspected = quarry_formats::inspect(fmt, input, None);
    if std::env::var_os("QUARRY_FUZZ_VERBOSE").is_some() {
        eprintln!("{} {}: {:?}", t.name, input.display(), inspected);
    }
    note_death(&inspected, tally);
    if let Ok(i) = &inspected {
        tally.inspect_ok += 1;
        if i.kept != i.count {
            bad.push(format!(
                "inspect without a filter kept {} of {}",
                i.kept, i.count
            ));
        }
    }
    if let Some(f) = &filter
        && let Ok(i) = quarry_formats::inspect(fmt, input, Some(f))
        && i.kept > i.count
    {
        bad.push(format!("filter kept {} of {}", i.kept, i.count));
    }
    let count = inspected.as_ref().map(|i| i.count).unwrap_or(seed_count);
    let with_seed = rng.chance(50);
    let (inputs, counts) = if with_seed {
        (
            vec![seed.to_path_buf(), input.to_path_buf()],
            vec![seed_count, count],
        )
    } else {
        (vec![input.to_path_buf()], vec![count])
    };
    let total: u64 = counts.iter().sum();
    let mut options = MergeOptions {
        limit: 1 + rng.below(total as usize + 2) as u64,
        ..Default::default()
    };
    match rng.below(3) {
        0 => options.filter = filter.clone(),
        1 => options.dedup = t.dedup.iter().map(|s| s.to_string()).collect(),
        _ => {}
    }
    remove(out);
    // A merge trusts inputs that inspect with schemas that match (the checks a round passes
    // before it is committed): its output must inspect back only when they did.
    let inputs_ok = match (&inspected, with_seed) {
        (Ok(_), false) => true,
        (Ok(i), true) => quarry_formats::inspect(fmt, seed, None)
            .is_ok_and(|s| quarry_formats::schemas_compatible(&s.schema, &i.schema)),
        (Err(_), _) => false,
    };
    let merged = quarry_formats::merge(fmt, &inputs, &counts, &options, out);
    note_death(&merged, tally);
    if let Ok(s) = merged {
        tally.merge_ok += 1;
        if s.samples > options.limit {
            bad.push(format!(
                "merge wrote {} samples, limit {}",
                s.samples, options.limit
            ));
        }
        match quarry_formats::inspect(fmt, out, None) {
            _ if !inputs_ok => {}
            Ok(i) if i.count == s.samples => {}
            Ok(i) => bad.push(format!(
                "merge reported {} samples, its output inspects to {}",
                s.samples, i.count
            )),
            Err(e) => bad.push(format!("merge output does not inspect: {e}")),
        }
    }
    remove(out);
    let mut c = Count::default();
    let examined = quarry_formats::examine(fmt, input, &mut c);
    note_death(&examined, tally);
    if let (Ok(n), Ok(i)) = (examined, &inspected)
        && n != i.count
    {
        bad.push(format!("examine counted {n} samples, inspect {}", i.count));
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

/// Every file under `dir`, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = pyhelp::tree(dir).keys().map(|k| dir.join(k)).collect();
    out.sort();
    out
}

fn run_target(t: &Target, iters: u64, seed: u64, work: &Path) -> Tally {
    let mut tally = Tally::default();
    let mut rng = Rng::new(seed ^ fnv(t.name));
    let out = work.join(format!("{}-merged", t.name));
    for (k, s) in t.seeds.iter().enumerate() {
        let seed_count = quarry_formats::inspect(t.format, s, None)
            .unwrap_or_else(|e| panic!("seed {} does not inspect: {e}", s.display()))
            .count;
        let other = &t.seeds[(k + 1) % t.seeds.len()];
        // The mutant lives in a copy of the seed (for a directory, one file of it changes).
        let input = work.join(format!(
            "{}-in-{k}{}",
            t.name,
            s.extension()
                .map(|e| format!(".{}", e.to_string_lossy()))
                .unwrap_or_default()
        ));
        remove(&input);
        let files: Vec<PathBuf> = if s.is_dir() {
            pyhelp::copy_tree(s, &input);
            files_under(&input)
        } else {
            std::fs::copy(s, &input).unwrap();
            vec![input.clone()]
        };
        let other_bytes: Vec<Vec<u8>> = if other.is_dir() {
            files_under(other)
                .iter()
                .map(|p| std::fs::read(p).unwrap())
                .collect()
        } else {
            vec![std::fs::read(other).unwrap()]
        };
        for i in 0..iters {
            let target = &files[rng.below(files.len())];
            let original = std::fs::read(target).unwrap();
            let deleted = s.is_dir() && rng.chance(5);
            if deleted {
                std::fs::remove_file(target).unwrap();
            } else {
                let donor = &other_bytes[rng.below(other_bytes.len())];
                std::fs::write(target, mutate(&mut rng, &original, donor)).unwrap();
            }
            let start = Instant::now();
            let what = format!(
                "{} seed {k} iteration {i} ({})",
                t.name,
                target.strip_prefix(work).unwrap_or(target).display()
            );
            match guarded(|| exercise(t, &input, s, seed_count, &out, &mut rng, &mut tally)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tally.inconsistent.push(format!("{what}: {e}")),
                Err(p) => tally.panics.push(format!("{what}: {p}")),
            }
            let took = start.elapsed();
            tally.slowest = tally.slowest.max(took);
            if took > MAX_PER_INPUT {
                tally.slow.push(format!("{what}: {took:?}"));
            }
            tally.inputs += 1;
            std::fs::write(target, &original).unwrap();
        }
        remove(&input);
    }
    tally
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

/// Writes the numpy seeds no example generator covers.
const NUMPY_SEEDS: &str = r#"
import sys, os, numpy as np
d = sys.argv[1]
rng = np.random.default_rng(0)
np.save(os.path.join(d, 'numeric.npy'), rng.standard_normal((6, 3)).astype('<f4'))
rec = np.zeros(5, dtype=[('energy', '<f8'), ('pose', '<f4', (3,)), ('ok', '?')])
rec['energy'] = rng.random(5)
np.save(os.path.join(d, 'structured.npy'), rec)
shared = {'k': [1, 2.5, 'x']}
elems = [{'energy': float(e), 'pose': rng.standard_normal(3), 'meta': shared, 'name': 'o%d' % i,
          'tags': ('a', i), 'big': 2**70 + i, 'blob': b'\x00' * (5 + i)}
         for i, e in enumerate(rng.random(5))]
a = np.empty(len(elems), dtype=object)
for i, e in enumerate(elems):
    a[i] = e
np.save(os.path.join(d, 'object.npy'), a, allow_pickle=True)
"#;

/// `hdf5_trees.py DIR SEED N`: N random robomimic files built by h5py.
const HDF5_TREES: &str = r#"
import sys, os, numpy as np, h5py
d, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(seed)
dtypes = ['<f4', '>f8', '<i8', 'u1', '?', 'S8', 'f2', '<i2']
def odd(p):
    return rng.random() < p
for k in range(n):
    p = os.path.join(d, 'tree_%03d.hdf5' % k)
    # One layout for every demo (paths, dtypes, trailing shapes), broken now and then.
    layout = []
    for j in range(int(rng.integers(1, 5))):
        path = '/'.join('n%d' % int(rng.integers(0, 3)) for _ in range(int(rng.integers(0, 4))))
        path = (path + '/' if path else '') + 'ds%d' % j
        rest = tuple(int(x) for x in rng.integers(1, 3, int(rng.integers(0, 3))))
        layout.append((path, dtypes[int(rng.integers(0, len(dtypes)))], rest))
    with h5py.File(p, 'w') as f:
        data = f.create_group('data')
        groups = []
        total = 0
        for i in range(int(rng.integers(0, 5))):
            L = int(rng.integers(0, 5))
            total += L
            name = 'demo_%d' % (i * 2 if odd(0.2) else i)
            if name in data:
                continue
            g = data.create_group(name)
            if not odd(0.05):
                g.attrs['num_samples'] = L if not odd(0.05) else int(rng.integers(-2, 9))
            g.attrs['success'] = bool(odd(0.5))
            groups.append(g)
            g.create_dataset('actions', data=rng.standard_normal((L, 2)).astype('<f4'))
            for path, dt, rest in layout:
                if odd(0.03) or path in g:
                    continue
                shape = (L if not odd(0.03) else L + 1,) + rest
                if dt == 'S8':
                    g.create_dataset(path, data=np.full(shape, b'ab', dtype='S8'))
                else:
                    kw = dict(chunks=True, compression='gzip') if L > 0 and odd(0.3) else {}
                    v = (rng.standard_normal(shape) * 3).astype(dt)
                    if dt[-2:] == 'f4' and v.size and odd(0.1):
                        v.flat[0] = np.nan
                    g.create_dataset(path, data=v, **kw)
                groups.append(g[path].parent)
        # Links now and then: back to ancestors (cycles), across demos (sharing), soft, external.
        for j in range(int(rng.integers(0, 3)) if odd(0.4) else 0):
            if not groups:
                break
            a = groups[int(rng.integers(0, len(groups)))]
            b = groups[int(rng.integers(0, len(groups)))]
            name = 'link%d' % j
            if name in a:
                continue
            r = rng.random()
            if r < 0.5:
                a[name] = b
            elif r < 0.7:
                a[name] = h5py.SoftLink(b.name)
            elif r < 0.8:
                a[name] = h5py.ExternalLink('nowhere.hdf5', '/x')
            else:
                a[name] = f
        if odd(0.05):
            data['stray'] = np.zeros(3)
        data.attrs['total'] = total if not odd(0.1) else total + 1
        data.attrs['env_args'] = '{"env_name": "Lift"}'
        if odd(0.3):
            names = [n.encode() for n in data.keys()] + ([b'demo_99'] if odd(0.3) else [])
            f.create_dataset('mask/train', data=np.array(names or [b''], dtype='S10'))
        if odd(0.03):
            wide = data.create_group('demo_50').create_group('wide')
            for j in range(3000):
                wide['x%d' % j] = wide.parent
"#;

#[test]
fn fuzz_every_parser() {
    let iters = env_u64("QUARRY_FUZZ_ITERS", 150);
    let seed = env_u64("QUARRY_FUZZ_SEED", 1);
    let py = pyhelp::python(&["numpy", "h5py", "zarr"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let seeds = d.join("seeds");
    std::fs::create_dir(&seeds).unwrap();
    let s = |name: &str| seeds.join(name);
    let script = d.join("numpy_seeds.py");
    std::fs::write(&script, NUMPY_SEEDS).unwrap();
    pyhelp::run(&py, &script, &[seeds.display().to_string()]);
    let gen_ = |name: &str, args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        pyhelp::run(&py, &pyhelp::example(name), &args);
    };
    gen_(
        "grasp_gen.py",
        &[
            "--name",
            "fz",
            "--object_code",
            "mug",
            "--batch_size",
            "4",
            "--out_root",
            seeds.to_str().unwrap(),
        ],
    );
    std::fs::rename(s("fz/results/mug.npy"), s("grasp.npy")).unwrap();
    for (args, out) in [
        (
            &["--seed", "1", "--object", "mug", "--batch_size", "6"][..],
            "z.npz",
        ),
        (
            &[
                "--seed",
                "2",
                "--object",
                "mug",
                "--batch_size",
                "5",
                "--stored",
            ][..],
            "s.npz",
        ),
    ] {
        let mut a = args.to_vec();
        let o = s(out);
        a.extend(["--out", o.to_str().unwrap()]);
        gen_("npz_gen.py", &a);
    }
    for (sd, out, extra) in [("1", "a.jsonl", None), ("2", "b.jsonl", Some("--crlf"))] {
        let o = s(out);
        let mut a = vec![
            "--seed",
            sd,
            "--object",
            "mug",
            "--batch_size",
            "6",
            "--out",
        ];
        a.push(o.to_str().unwrap());
        a.extend(extra);
        gen_("jsonl_gen.py", &a);
    }
    for (fmt, out) in [("2", "v2.zarr"), ("3", "v3.zarr")] {
        let o = s(out);
        gen_(
            "zarr_replay_gen.py",
            &[
                "--seed",
                "1",
                "--object",
                "mug",
                "--batch_size",
                "4",
                "--format",
                fmt,
                "--out",
                o.to_str().unwrap(),
            ],
        );
    }
    let o = s("episodes");
    gen_(
        "episode_collector.py",
        &[
            "--seed",
            "1",
            "--object",
            "Lift",
            "--batch_size",
            "3",
            "--num_points",
            "4",
            "--success_rate",
            "1.0",
            "--out",
            o.to_str().unwrap(),
        ],
    );

    let targets = [
        Target {
            name: "npy numeric",
            format: Format::Npy,
            seeds: vec![s("numeric.npy"), s("structured.npy")],
            filter: "energy<0.5",
            dedup: &["energy"],
        },
        Target {
            name: "npy object (pickle)",
            format: Format::Npy,
            seeds: vec![s("object.npy"), s("grasp.npy")],
            filter: "energy<0.5",
            dedup: &["energy", "name"],
        },
        Target {
            name: "npz (zip)",
            format: Format::Npz,
            seeds: vec![s("z.npz"), s("s.npz")],
            filter: "energy<0.5",
            dedup: &["energy"],
        },
        Target {
            name: "jsonl",
            format: Format::Jsonl,
            seeds: vec![s("a.jsonl"), s("b.jsonl")],
            filter: "energy<0.5",
            dedup: &["energy", "pose.pos"],
        },
        Target {
            name: "zarr (metadata, codecs)",
            format: Format::Zarr,
            seeds: vec![s("v2.zarr"), s("v3.zarr")],
            filter: "score>0.3",
            dedup: &["data/action"],
        },
        Target {
            name: "episodes (pickles, metadata)",
            format: Format::Episodes,
            seeds: vec![s("episodes")],
            filter: "num_timesteps>3",
            dedup: &["actions"],
        },
    ];

    // HDF5 trees, written before the quiet panic hook is set (a failing script must show).
    let trees = d.join("trees");
    std::fs::create_dir(&trees).unwrap();
    let script = d.join("hdf5_trees.py");
    std::fs::write(&script, HDF5_TREES).unwrap();
    let n = (iters / 3).max(10);
    pyhelp::run(
        &py,
        &script,
        &[trees.display().to_string(), seed.to_string(), n.to_string()],
    );
    let work = d.join("work");
    std::fs::create_dir(&work).unwrap();
    let prev_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for t in &targets {
        let t0 = Instant::now();
        let tally = run_target(t, iters, seed, &work);
        report.push(summary(t.name, &tally, t0.elapsed()));
        failures.extend(tally.panics.iter().map(|p| format!("PANIC {p}")));
        failures.extend(tally.slow.iter().map(|p| format!("SLOW {p}")));
        failures.extend(
            tally
                .inconsistent
                .iter()
                .map(|p| format!("INCONSISTENT {p}")),
        );
    }

    // The tar archive that carries directory datasets.
    let t0 = Instant::now();
    let tally = fuzz_archive(&[s("v2.zarr"), s("episodes")], iters * 2, seed, &work);
    report.push(summary("tar archive", &tally, t0.elapsed()));
    failures.extend(tally.panics.iter().map(|p| format!("PANIC {p}")));
    failures.extend(
        tally
            .inconsistent
            .iter()
            .map(|p| format!("INCONSISTENT {p}")),
    );

    // HDF5 by structure.
    let t0 = Instant::now();
    let tally = fuzz_hdf5_trees(&trees, seed, &work);
    report.push(summary("hdf5 (h5py trees)", &tally, t0.elapsed()));
    failures.extend(tally.panics.iter().map(|p| format!("PANIC {p}")));
    failures.extend(tally.slow.iter().map(|p| format!("SLOW {p}")));
    failures.extend(
        tally
            .inconsistent
            .iter()
            .map(|p| format!("INCONSISTENT {p}")),
    );

    // HDF5 by bytes, every call in a libhdf5 child (on from here for this process): the
    // first trees that inspect, mutated like the other seeds.
    let byte_seeds: Vec<PathBuf> = {
        let mut all: Vec<PathBuf> = std::fs::read_dir(&trees)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        all.sort();
        all.into_iter()
            .filter(|p| quarry_formats::inspect(Format::Hdf5, p, None).is_ok_and(|i| i.count > 0))
            .take(2)
            .collect()
    };
    assert!(!byte_seeds.is_empty(), "no h5py tree inspects");
    child::isolate_in_child(
        PathBuf::from(env!("CARGO_BIN_EXE_quarry-hdf5-child")),
        Limits {
            memory_bytes: 4 << 30,
            cpu_seconds: 4,
            wall: Duration::from_secs(4),
        },
    );
    let t0 = Instant::now();
    let t = Target {
        name: "hdf5 bytes (child)",
        format: Format::Hdf5,
        seeds: byte_seeds,
        filter: "success>0",
        dedup: &["actions"],
    };
    let tally = run_target(&t, iters, seed, &work);
    report.push(summary(t.name, &tally, t0.elapsed()));
    failures.extend(tally.panics.iter().map(|p| format!("PANIC {p}")));
    failures.extend(tally.slow.iter().map(|p| format!("SLOW {p}")));
    failures.extend(
        tally
            .inconsistent
            .iter()
            .map(|p| format!("INCONSISTENT {p}")),
    );

    std::panic::set_hook(prev_hook);
    println!(
        "fuzz seed {seed}, {iters} mutants per seed file, {:.1?} in all",
        started.elapsed()
    );
    for line in &report {
        println!("{line}");
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn summary(name: &str, t: &Tally, took: Duration) -> String {
    format!(
        "{name:<30} inputs {:>6}  inspect ok {:>6}  merge ok {:>6}  panics {}  slow {}  \
         inconsistent {}  deaths {}  slowest {:.2?}  time {:.1?}",
        t.inputs,
        t.inspect_ok,
        t.merge_ok,
        t.panics.len(),
        t.slow.len(),
        t.inconsistent.len(),
        t.deaths,
        t.slowest,
        took
    )
}

/// Packs each seed directory, mutates the archive, unpacks it into a fresh directory: no
/// panic, nothing written outside it, and an unpacked tree that inspects when it unpacks.
fn fuzz_archive(dirs: &[PathBuf], iters: u64, seed: u64, work: &Path) -> Tally {
    let mut tally = Tally::default();
    let mut rng = Rng::new(seed ^ fnv("tar"));
    let tars: Vec<Vec<u8>> = dirs
        .iter()
        .enumerate()
        .map(|(k, dir)| {
            let p = work.join(format!("seed-{k}.tar"));
            archive::pack_dir(dir, &p).unwrap();
            std::fs::read(&p).unwrap()
        })
        .collect();
    let box_dir = work.join("tarbox");
    for i in 0..iters {
        let k = rng.below(tars.len());
        let m = mutate(&mut rng, &tars[k], &tars[(k + 1) % tars.len()]);
        remove(&box_dir);
        std::fs::create_dir(&box_dir).unwrap();
        let tar = box_dir.join("in.tar");
        std::fs::write(&tar, &m).unwrap();
        let into = box_dir.join("x").join("unpacked");
        std::fs::create_dir(box_dir.join("x")).unwrap();
        let what = format!("tar iteration {i}");
        match guarded(|| archive::unpack(&tar, &into)) {
            Ok(_) => {}
            Err(p) => tally.panics.push(format!("{what}: {p}")),
        }
        // Only `in.tar` and `x/unpacked/...` may exist.
        for f in pyhelp::tree(&box_dir).keys() {
            if f != "in.tar" && !f.starts_with("x/unpacked/") {
                tally
                    .inconsistent
                    .push(format!("{what}: wrote {f} outside the dataset directory"));
            }
        }
        tally.inputs += 1;
    }
    remove(&box_dir);
    tally
}

/// Sends each h5py-built tree through inspect, merge and examine (alone and after tree 0).
fn fuzz_hdf5_trees(dir: &Path, seed: u64, work: &Path) -> Tally {
    let mut tally = Tally::default();
    let mut rng = Rng::new(seed ^ fnv("hdf5"));
    let mut trees: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    trees.sort();
    let t = Target {
        name: "hdf5",
        format: Format::Hdf5,
        seeds: Vec::new(),
        filter: "success>0",
        dedup: &["actions"],
    };
    let out = work.join("hdf5-merged.hdf5");
    // A well-formed partner for two-input merges: the first tree that inspects.
    let partner = trees.iter().find_map(|p| {
        quarry_formats::inspect(Format::Hdf5, p, None)
            .ok()
            .map(|i| (p.clone(), i.count))
    });
    for (i, p) in trees.iter().enumerate() {
        let (seed_path, seed_count) = partner.clone().unwrap_or((p.clone(), 0));
        let start = Instant::now();
        let what = format!("hdf5 tree {i} ({})", p.display());
        match guarded(|| exercise(&t, p, &seed_path, seed_count, &out, &mut rng, &mut tally)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tally.inconsistent.push(format!("{what}: {e}")),
            Err(e) => tally.panics.push(format!("{what}: {e}")),
        }
        let took = start.elapsed();
        tally.slowest = tally.slowest.max(took);
        if took > MAX_PER_INPUT {
            tally.slow.push(format!("{what}: {took:?}"));
        }
        tally.inputs += 1;
    }
    tally
}
