//! A zero-work generator for Quarry's benchmark: writes a small numeric `.npy` (`<f4`, shape
//! `(B, 4)`, values derived from the seed) atomically and exits 0. It measures what Quarry
//! adds around a generator run, so it does nothing else.
//!
//! ```text
//! quarry-zero-gen --out PATH --batch_size B --seed S
//! ```
//!
//! Unknown flags (and their values) are ignored, like the legacy optimizer's tuning knobs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

struct Args {
    out: PathBuf,
    batch_size: u64,
    seed: i64,
}

fn parse() -> Result<Args, String> {
    let mut out = None;
    let mut batch_size = None;
    let mut seed = 0i64;
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

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("quarry-zero-gen: {e}");
            return ExitCode::from(2);
        }
    };
    match write(&args.out, args.batch_size, args.seed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quarry-zero-gen: writing {}: {e}", args.out.display());
            ExitCode::from(1)
        }
    }
}
