//! A zero-work generator for Quarry's benchmark: writes a small numeric `.npy` (`<f4`, shape
//! `(B, 4)`, values derived from the seed) atomically and exits 0. It measures what Quarry
//! adds around a generator run, so it does nothing else.
//!
//! ```text
//! quarry-zero-gen --out PATH --batch_size B --seed S
//!     [--sleep_ms N] [--stamp FILE] [--env_out FILE] [--pid_file FILE] [--print_bytes N]
//! ```
//!
//! For the worker's tests and benchmark: `--sleep_ms` sleeps before writing (simulated GPU
//! work); `--stamp` appends `<start_ns> <end_ns>` (wall clock, at start and just before exit)
//! to FILE; `--env_out` writes this run's argv and GPU-binding environment as JSON;
//! `--pid_file` writes the pid and process group at start (then a newline); `--print_bytes`
//! prints that many bytes of progress to stdout.
//!
//! Unknown flags (and their values) are ignored, like the legacy optimizer's tuning knobs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

struct Args {
    out: PathBuf,
    batch_size: u64,
    seed: i64,
    sleep_ms: u64,
    stamp: Option<PathBuf>,
    env_out: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    print_bytes: u64,
}

/// Variables the GPU binding sets, dumped by `--env_out`.
const BINDING_VARS: &[&str] = &[
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "QUARRY_GPU",
    "QUARRY_GPU_UUID",
    "QUARRY_SEED",
];

fn parse() -> Result<Args, String> {
    let mut out = None;
    let mut batch_size = None;
    let mut seed = 0i64;
    let mut sleep_ms = 0u64;
    let mut stamp = None;
    let mut env_out = None;
    let mut pid_file = None;
    let mut print_bytes = 0u64;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match key.as_str() {
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--batch_size" => {
                let v = value("--batch_size")?;
                batch_size = Some(v.parse().map_err(|_| format!("bad --batch_size {v:?}"))?);
            }
            "--seed" => {
                let v = value("--seed")?;
                seed = v.parse().map_err(|_| format!("bad --seed {v:?}"))?;
            }
            "--sleep_ms" => {
                let v = value("--sleep_ms")?;
                sleep_ms = v.parse().map_err(|_| format!("bad --sleep_ms {v:?}"))?;
            }
            "--print_bytes" => {
                let v = value("--print_bytes")?;
                print_bytes = v.parse().map_err(|_| format!("bad --print_bytes {v:?}"))?;
            }
            "--stamp" => stamp = Some(PathBuf::from(value("--stamp")?)),
            "--env_out" => env_out = Some(PathBuf::from(value("--env_out")?)),
            "--pid_file" => pid_file = Some(PathBuf::from(value("--pid_file")?)),
            "-h" | "--help" => {
                println!("usage: quarry-zero-gen --out PATH --batch_size B --seed S");
                std::process::exit(0);
            }
            _ => {}
        }
    }
    Ok(Args {
        out: out.ok_or("--out is required")?,
        batch_size: batch_size.ok_or("--batch_size is required")?,
        seed,
        sleep_ms,
        stamp,
        env_out,
        pid_file,
        print_bytes,
    })
}

/// A version 1.0 `.npy` header for a C-order `<f4` array of shape `(rows, 4)`, padded so the
/// data starts on a 64-byte boundary, as numpy writes it.
fn header(rows: u64) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, 4), }}");
    let unpadded = 6 + 2 + 2 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let hlen = dict.len() + pad + 1;
    let mut h = Vec::with_capacity(10 + hlen);
    h.extend_from_slice(b"\x93NUMPY\x01\x00");
    h.extend_from_slice(&(hlen as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h.extend(std::iter::repeat_n(b' ', pad));
    h.push(b'\n');
    h
}

fn write(path: &Path, batch: u64, seed: i64) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        std::fs::create_dir_all(d)?;
    }
    let mut bytes = header(batch);
    for i in 0..batch {
        let base = (seed as f64) + (i as f64) * 0.25;
        for j in 0..4u32 {
            bytes.extend_from_slice(&((base + f64::from(j)) as f32).to_le_bytes());
        }
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out.npy".into());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn side_effects(args: &Args) -> std::io::Result<()> {
    if let Some(p) = &args.pid_file {
        // SAFETY: getpgrp(2) takes no arguments and cannot fail.
        let pgrp = unsafe { libc::getpgrp() };
        std::fs::write(p, format!("{} {pgrp}\n", std::process::id()))?;
    }
    if let Some(p) = &args.env_out {
        let env: serde_json::Map<String, serde_json::Value> = BINDING_VARS
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v.into())))
            .collect();
        let doc = serde_json::json!({
            "argv": std::env::args().collect::<Vec<_>>(),
            "env": env,
        });
        std::fs::write(p, doc.to_string())?;
    }
    if args.print_bytes > 0 {
        let mut out = std::io::stdout().lock();
        let line = b"quarry-zero-gen progress ..........................................\n";
        let mut left = args.print_bytes as usize;
        while left > 0 {
            let n = left.min(line.len());
            out.write_all(&line[line.len() - n..])?;
            left -= n;
        }
        out.flush()?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let start = now_ns();
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("quarry-zero-gen: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = side_effects(&args) {
        eprintln!("quarry-zero-gen: {e}");
        return ExitCode::from(1);
    }
    if args.sleep_ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(args.sleep_ms));
    }
    if let Err(e) = write(&args.out, args.batch_size, args.seed) {
        eprintln!("quarry-zero-gen: writing {}: {e}", args.out.display());
        return ExitCode::from(1);
    }
    if let Some(p) = &args.stamp {
        let line = format!("{start} {}\n", now_ns());
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!("quarry-zero-gen: --stamp {}: {e}", p.display());
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
