//! The bytes-to-bytes codecs of zarr chunks: the v2 `compressor` (numcodecs ids) and the v3
//! `codecs` after `bytes`. Each decodes what zarr-python/numcodecs write and encodes what they
//! read back.

use std::io::{Read, Write};

use serde_json::Value;

use super::blosc;

/// One bytes-to-bytes codec with the settings an encoder needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Codec {
    /// A Zstandard frame (v2 `zstd`, v3 `zstd`).
    Zstd,
    /// A gzip member (v2 `gzip`, v3 `gzip`).
    Gzip { level: u32 },
    /// A zlib stream (v2 `zlib`).
    Zlib { level: u32 },
    /// numcodecs' `lz4`: the decoded length (u32 little-endian), then an LZ4 block.
    Lz4,
    /// A Blosc 1 buffer.
    Blosc(blosc::Params),
    /// v3 `crc32c`: the data, then its CRC-32C (little-endian).
    Crc32c,
}

fn level(cfg: &Value, key: &str, default: i64) -> i64 {
    cfg.get(key).and_then(Value::as_i64).unwrap_or(default)
}

impl Codec {
    /// A v2 `compressor` or filter object (`{"id": "blosc", ...}`); `Err` names what is not
    /// supported.
    pub fn from_v2(cfg: &Value, itemsize: usize) -> Result<Codec, String> {
        let id = cfg.get("id").and_then(Value::as_str).unwrap_or("?");
        Ok(match id {
            "zstd" => Codec::Zstd,
            "gzip" => Codec::Gzip {
                level: level(cfg, "level", 5).clamp(0, 9) as u32,
            },
            "zlib" => Codec::Zlib {
                level: level(cfg, "level", 1).clamp(0, 9) as u32,
            },
            "lz4" => Codec::Lz4,
            "blosc" => {
                let cname = cfg.get("cname").and_then(Value::as_str).unwrap_or("lz4");
                let shuffle = match level(cfg, "shuffle", 1) {
                    0 => blosc::Shuffle::None,
                    1 => blosc::Shuffle::Byte,
                    2 => blosc::Shuffle::Bit,
                    -1 if itemsize == 1 => blosc::Shuffle::Bit,
                    -1 => blosc::Shuffle::Byte,
                    s => return Err(format!("blosc shuffle {s}")),
                };
                Codec::Blosc(blosc::Params {
                    cname: blosc::Cname::parse(cname)
                        .ok_or_else(|| format!("blosc with inner codec {cname:?}"))?,
                    clevel: level(cfg, "clevel", 5).clamp(0, 9) as u8,
                    shuffle,
                    typesize: itemsize,
                    blocksize: level(cfg, "blocksize", 0).max(0) as usize,
                })
            }
            other => return Err(format!("codec {other:?}")),
        })
    }

    /// A v3 bytes-to-bytes codec object (`{"name": "zstd", "configuration": {...}}`).
    pub fn from_v3(codec: &Value, itemsize: usize) -> Result<Codec, String> {
        let name = codec.get("name").and_then(Value::as_str).unwrap_or("?");
        let cfg = codec.get("configuration").cloned().unwrap_or(Value::Null);
        Ok(match name {
            "zstd" => Codec::Zstd,
            "gzip" => Codec::Gzip {
                level: level(&cfg, "level", 5).clamp(0, 9) as u32,
            },
            "crc32c" => Codec::Crc32c,
            "blosc" => {
                let cname = cfg.get("cname").and_then(Value::as_str).unwrap_or("zstd");
                let shuffle = match cfg.get("shuffle").and_then(Value::as_str) {
                    Some("noshuffle") => blosc::Shuffle::None,
                    Some("shuffle") | None => blosc::Shuffle::Byte,
                    Some("bitshuffle") => blosc::Shuffle::Bit,
                    Some(s) => return Err(format!("blosc shuffle {s:?}")),
                };
                let typesize = level(&cfg, "typesize", itemsize as i64).clamp(1, 255) as usize;
                Codec::Blosc(blosc::Params {
                    cname: blosc::Cname::parse(cname)
                        .ok_or_else(|| format!("blosc with inner codec {cname:?}"))?,
                    clevel: level(&cfg, "clevel", 5).clamp(0, 9) as u8,
                    shuffle,
                    typesize,
                    blocksize: level(&cfg, "blocksize", 0).max(0) as usize,
                })
            }
            other => return Err(format!("codec {other:?}")),
        })
    }

    /// Undoes the codec, refusing output longer than `max_len`.
    pub fn decode(&self, src: &[u8], max_len: usize) -> Result<Vec<u8>, String> {
        match self {
            Codec::Zstd => {
                let mut out = vec![0u8; max_len];
                let n = ruzstd::decoding::FrameDecoder::new()
                    .decode_all(src, &mut out)
                    .map_err(|e| format!("zstd: {e}"))?;
                out.truncate(n);
                Ok(out)
            }
            Codec::Gzip { .. } => {
                read_capped(flate2::read::MultiGzDecoder::new(src), max_len, "gzip")
            }
            Codec::Zlib { .. } => read_capped(flate2::read::ZlibDecoder::new(src), max_len, "zlib"),
            Codec::Lz4 => {
                let (len, body) = src
                    .split_first_chunk::<4>()
                    .ok_or("lz4 buffer is shorter than its length prefix")?;
                let len = u32::from_le_bytes(*len) as usize;
                if len > max_len {
                    return Err(format!(
                        "lz4 buffer says {len} bytes, more than the {max_len} expected"
                    ));
                }
                let mut out = vec![0u8; len];
                let n = lz4_flex::block::decompress_into(body, &mut out)
                    .map_err(|e| format!("lz4: {e}"))?;
                if n != len {
                    return Err(format!("lz4: decoded {n} bytes, expected {len}"));
                }
                Ok(out)
            }
            Codec::Blosc(_) => blosc::decode(src, max_len),
            Codec::Crc32c => {
                let (body, sum) = src
                    .split_last_chunk::<4>()
                    .ok_or("crc32c buffer is shorter than its checksum")?;
                if body.len() > max_len {
                    return Err(format!(
                        "crc32c buffer holds more than the {max_len} bytes expected"
                    ));
                }
                if crc32c(body) != u32::from_le_bytes(*sum) {
                    return Err("crc32c checksum does not match".into());
                }
                Ok(body.to_vec())
            }
        }
    }

    pub fn encode(&self, src: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Codec::Zstd => Ok(zstd_compress(src)),
            Codec::Gzip { level } => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(*level));
                e.write_all(src).map_err(|e| format!("gzip: {e}"))?;
                e.finish().map_err(|e| format!("gzip: {e}"))
            }
            Codec::Zlib { level } => {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(*level));
                e.write_all(src).map_err(|e| format!("zlib: {e}"))?;
                e.finish().map_err(|e| format!("zlib: {e}"))
            }
            Codec::Lz4 => {
                let len = u32::try_from(src.len())
                    .map_err(|_| "lz4 chunks hold at most 4 GiB".to_string())?;
                let mut out = len.to_le_bytes().to_vec();
                out.extend(lz4_flex::block::compress(src));
                Ok(out)
            }
            Codec::Blosc(p) => blosc::encode(src, p),
            Codec::Crc32c => {
                let mut out = src.to_vec();
                out.extend(crc32c(src).to_le_bytes());
                Ok(out)
            }
        }
    }
}

fn read_capped(r: impl Read, max_len: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    r.take(max_len as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("{what}: {e}"))?;
    if out.len() > max_len {
        return Err(format!(
            "{what} stream decodes to more than the {max_len} bytes expected"
        ));
    }
    Ok(out)
}

/// One Zstandard frame (ruzstd's fastest level, about zstd's level 1).
pub(crate) fn zstd_compress(src: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(src, ruzstd::encoding::CompressionLevel::Fastest)
}

/// CRC-32C (Castagnoli), as zarr v3's `crc32c` codec appends it.
fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn every_codec_round_trips() {
        let data: Vec<u8> = (0..50_000u32).flat_map(|i| (i % 97).to_le_bytes()).collect();
        for c in [
            Codec::Zstd,
            Codec::Gzip { level: 5 },
            Codec::Zlib { level: 1 },
            Codec::Lz4,
            Codec::Crc32c,
            Codec::Blosc(blosc::Params {
                cname: blosc::Cname::Lz4,
                clevel: 5,
                shuffle: blosc::Shuffle::Byte,
                typesize: 4,
                blocksize: 0,
            }),
        ] {
            let enc = c.encode(&data).expect("encode");
            assert_eq!(c.decode(&enc, data.len()).expect("decode"), data, "{c:?}");
            assert!(c.decode(&enc, data.len() - 1).is_err(), "{c:?} cap");
        }
    }
}
