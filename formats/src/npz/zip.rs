//! The subset of ZIP that `.npz` files use: stored or deflated members, zip64 sizes and
//! offsets, CRC-32 checked on every full read. Writes what Python's `zipfile` writes for
//! `np.savez`/`np.savez_compressed` (zip64 local headers patched after each member), with a
//! fixed timestamp so equal inputs give equal bytes.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flate2::Crc;

use crate::DatasetError;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
pub(crate) const STORED: u16 = 0;
pub(crate) const DEFLATED: u16 = 8;
/// Refuse central directories larger than this instead of allocating them.
const MAX_CENTRAL: u64 = 1 << 30;

/// One member of an archive.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub name: String,
    pub method: u16,
    crc: u32,
    compressed: u64,
    pub size: u64,
    local_offset: u64,
}

/// An archive's directory.
#[derive(Debug)]
pub(crate) struct Archive {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        b[at + 7],
    ])
}

fn read_at(f: &mut File, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(buf)
}

impl Archive {
    /// Reads the central directory.
    pub fn open(path: &Path) -> Result<Archive, DatasetError> {
        let label = path.display().to_string();
        let bad = |reason: String| DatasetError::invalid(&label, reason);
        let mut f = File::open(path).map_err(DatasetError::io("open", path))?;
        let len = f.metadata().map_err(DatasetError::io("stat", path))?.len();
        let tail_len = len.min(22 + 65535);
        let mut tail = vec![0u8; tail_len as usize];
        read_at(&mut f, len - tail_len, &mut tail).map_err(DatasetError::io("read", path))?;
        let eocd = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| le32(&tail, i) == EOCD_SIG)
            .ok_or_else(|| bad("not a zip archive (no end of central directory record)".into()))?;
        let eocd_pos = len - tail_len + eocd as u64;
        let e = &tail[eocd..];
        let mut count = le16(e, 10) as u64;
        let mut cd_size = le32(e, 12) as u64;
        let mut cd_offset = le32(e, 16) as u64;
        if eocd_pos >= 20 {
            let mut loc = [0u8; 20];
            read_at(&mut f, eocd_pos - 20, &mut loc).map_err(DatasetError::io("read", path))?;
            if le32(&loc, 0) == ZIP64_LOCATOR_SIG {
                let at = le64(&loc, 8);
                let mut z = [0u8; 56];
                read_at(&mut f, at, &mut z)
                    .map_err(|_| bad("zip64 end record is cut off".into()))?;
                if le32(&z, 0) != ZIP64_EOCD_SIG {
                    return Err(bad("zip64 locator points at no zip64 end record".into()));
                }
                count = le64(&z, 32);
                cd_size = le64(&z, 40);
                cd_offset = le64(&z, 48);
            }
        }
        if cd_size > MAX_CENTRAL || cd_offset.checked_add(cd_size).is_none_or(|end| end > len) {
            return Err(bad(format!(
                "central directory ({cd_size} bytes at {cd_offset}) lies outside the {len}-byte file"
            )));
        }
        let mut cd = vec![0u8; cd_size as usize];
        read_at(&mut f, cd_offset, &mut cd).map_err(DatasetError::io("read", path))?;
        let mut entries = Vec::new();
        let mut at = 0usize;
        for n in 0..count {
            if at + 46 > cd.len() || le32(&cd, at) != CENTRAL_SIG {
                return Err(bad(format!("central directory entry {n} is malformed")));
            }
            let flags = le16(&cd, at + 8);
            let method = le16(&cd, at + 10);
            let crc = le32(&cd, at + 16);
            let mut compressed = le32(&cd, at + 20) as u64;
            let mut size = le32(&cd, at + 24) as u64;
            let name_len = le16(&cd, at + 28) as usize;
            let extra_len = le16(&cd, at + 30) as usize;
            let comment_len = le16(&cd, at + 32) as usize;
            let mut local_offset = le32(&cd, at + 42) as u64;
            let end = at + 46 + name_len + extra_len + comment_len;
            if end > cd.len() {
                return Err(bad(format!("central directory entry {n} is cut off")));
            }
            let name = String::from_utf8_lossy(&cd[at + 46..at + 46 + name_len]).into_owned();
            let mut extra = &cd[at + 46 + name_len..at + 46 + name_len + extra_len];
            while extra.len() >= 4 {
                let (id, sz) = (le16(extra, 0), le16(extra, 2) as usize);
                let body = extra.get(4..4 + sz).unwrap_or(&[]);
                if id == 1 {
                    let mut p = 0;
                    for field in [&mut size, &mut compressed, &mut local_offset] {
                        if *field == 0xFFFF_FFFF && p + 8 <= body.len() {
                            *field = le64(body, p);
                            p += 8;
                        }
                    }
                }
                extra = extra.get(4 + sz..).unwrap_or(&[]);
            }
            if flags & 1 != 0 {
                return Err(DatasetError::Unsupported {
                    reason: format!("{label}: member {name} is encrypted"),
                });
            }
            entries.push(Entry {
                name,
                method,
                crc,
                compressed,
                size,
                local_offset,
            });
            at = end;
        }
        Ok(Archive {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// A fresh reader of a member's decoded bytes. Reading it to its end checks the length
    /// and the CRC-32 (an error there is `InvalidData`).
    pub fn reader(&self, e: &Entry) -> Result<Member, DatasetError> {
        let label = format!("{}:{}", self.path.display(), e.name);
        let mut f = File::open(&self.path).map_err(DatasetError::io("open", &self.path))?;
        let mut h = [0u8; 30];
        read_at(&mut f, e.local_offset, &mut h).map_err(|_| {
            DatasetError::invalid(&label, "local header lies past the end of the file")
        })?;
        if le32(&h, 0) != LOCAL_SIG {
            return Err(DatasetError::invalid(
                &label,
                "no local header where the directory says",
            ));
        }
        let start = e.local_offset + 30 + le16(&h, 26) as u64 + le16(&h, 28) as u64;
        f.seek(SeekFrom::Start(start))
            .map_err(DatasetError::io("seek", &self.path))?;
        let raw = BufReader::with_capacity(1 << 16, f).take(e.compressed);
        let inner: Box<dyn Read + Send> = match e.method {
            STORED => Box::new(raw),
            DEFLATED => Box::new(flate2::read::DeflateDecoder::new(raw)),
            m => {
                return Err(DatasetError::Unsupported {
                    reason: format!("{label}: compression method {m} (only stored and deflate)"),
                });
            }
        };
        Ok(Member {
            inner,
            crc: Crc::new(),
            read: 0,
            size: e.size,
            want_crc: e.crc,
        })
    }
}

/// A member's decoded bytes.
pub(crate) struct Member {
    inner: Box<dyn Read + Send>,
    crc: Crc,
    read: u64,
    size: u64,
    want_crc: u32,
}

impl Read for Member {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        self.read += n as u64;
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        if self.read > self.size {
            return Err(bad(format!(
                "member decodes to more than the {} bytes its directory entry says",
                self.size
            )));
        }
        if n == 0 && !buf.is_empty() {
            if self.read != self.size {
                return Err(bad(format!(
                    "member is truncated: {} of {} bytes",
                    self.read, self.size
                )));
            }
            if self.crc.sum() != self.want_crc {
                return Err(bad("member CRC-32 does not match".into()));
            }
        }
        Ok(n)
    }
}

struct Counting {
    f: BufWriter<File>,
    at: u64,
}

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.f.write(buf)?;
        self.at += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.f.flush()
    }
}

enum Sink {
    Plain(Counting),
    Deflate(flate2::write::DeflateEncoder<Counting>),
    Gone,
}

struct Current {
    name: String,
    method: u16,
    header_at: u64,
    data_at: u64,
    crc: Crc,
    size: u64,
}

struct Written {
    name: String,
    method: u16,
    crc: u32,
    compressed: u64,
    size: u64,
    header_at: u64,
}

/// Writes an archive member by member: [`ZipWriter::begin`], `write`s, [`ZipWriter::end`],
/// then [`ZipWriter::finish`].
pub(crate) struct ZipWriter {
    sink: Sink,
    cur: Option<Current>,
    done: Vec<Written>,
}

const DOS_DATE_1980_01_01: u16 = 0x21;

impl ZipWriter {
    pub fn new(f: File) -> ZipWriter {
        ZipWriter {
            sink: Sink::Plain(Counting {
                f: BufWriter::with_capacity(1 << 16, f),
                at: 0,
            }),
            cur: None,
            done: Vec::new(),
        }
    }

    fn plain(&mut self) -> std::io::Result<&mut Counting> {
        match &mut self.sink {
            Sink::Plain(c) => Ok(c),
            _ => Err(std::io::Error::other(
                "zip writer is inside a deflated member",
            )),
        }
    }

    /// Starts member `name` (stored or deflated, level 6 as Python's `zipfile`).
    pub fn begin(&mut self, name: &str, method: u16) -> std::io::Result<()> {
        let c = self.plain()?;
        let header_at = c.at;
        let mut h = Vec::with_capacity(50 + name.len());
        h.extend(LOCAL_SIG.to_le_bytes());
        h.extend(45u16.to_le_bytes());
        h.extend(utf8_flag(name).to_le_bytes());
        h.extend(method.to_le_bytes());
        h.extend(0u16.to_le_bytes());
        h.extend(DOS_DATE_1980_01_01.to_le_bytes());
        h.extend(0u32.to_le_bytes()); // CRC, patched by `end`
        h.extend(u32::MAX.to_le_bytes());
        h.extend(u32::MAX.to_le_bytes());
        h.extend((name.len() as u16).to_le_bytes());
        h.extend(20u16.to_le_bytes());
        h.extend(name.as_bytes());
        h.extend(1u16.to_le_bytes());
        h.extend(16u16.to_le_bytes());
        h.extend([0u8; 16]); // sizes, patched by `end`
        c.write_all(&h)?;
        let data_at = c.at;
        if method == DEFLATED {
            let Sink::Plain(c) = std::mem::replace(&mut self.sink, Sink::Gone) else {
                return Err(std::io::Error::other("zip writer state"));
            };
            self.sink = Sink::Deflate(flate2::write::DeflateEncoder::new(
                c,
                flate2::Compression::new(6),
            ));
        }
        self.cur = Some(Current {
            name: name.to_string(),
            method,
            header_at,
            data_at,
            crc: Crc::new(),
            size: 0,
        });
        Ok(())
    }

    /// Ends the current member, filling in its local header's CRC and sizes.
    pub fn end(&mut self) -> std::io::Result<()> {
        let cur = self
            .cur
            .take()
            .ok_or_else(|| std::io::Error::other("no member to end"))?;
        if let Sink::Deflate(_) = self.sink {
            let Sink::Deflate(e) = std::mem::replace(&mut self.sink, Sink::Gone) else {
                return Err(std::io::Error::other("zip writer state"));
            };
            self.sink = Sink::Plain(e.finish()?);
        }
        let c = self.plain()?;
        let compressed = c.at - cur.data_at;
        let crc = cur.crc.sum();
        c.f.seek(SeekFrom::Start(cur.header_at + 14))?;
        c.f.write_all(&crc.to_le_bytes())?;
        c.f.seek(SeekFrom::Start(
            cur.header_at + 30 + cur.name.len() as u64 + 4,
        ))?;
        c.f.write_all(&cur.size.to_le_bytes())?;
        c.f.write_all(&compressed.to_le_bytes())?;
        c.f.seek(SeekFrom::Start(c.at))?;
        self.done.push(Written {
            name: cur.name,
            method: cur.method,
            crc,
            compressed,
            size: cur.size,
            header_at: cur.header_at,
        });
        Ok(())
    }

    /// Writes the central directory; returns the archive's length.
    pub fn finish(mut self) -> std::io::Result<u64> {
        if self.cur.is_some() {
            self.end()?;
        }
        let done = std::mem::take(&mut self.done);
        let c = self.plain()?;
        let cd_at = c.at;
        for w in &done {
            let big = |v: u64| v >= 0xFFFF_FFFF;
            let mut extra = Vec::new();
            for v in [w.size, w.compressed, w.header_at] {
                if big(v) {
                    extra.extend(v.to_le_bytes());
                }
            }
            let clip = |v: u64| if big(v) { u32::MAX } else { v as u32 };
            let mut h = Vec::with_capacity(80 + w.name.len());
            h.extend(CENTRAL_SIG.to_le_bytes());
            h.extend(45u16.to_le_bytes());
            h.extend(45u16.to_le_bytes());
            h.extend(utf8_flag(&w.name).to_le_bytes());
            h.extend(w.method.to_le_bytes());
            h.extend(0u16.to_le_bytes());
            h.extend(DOS_DATE_1980_01_01.to_le_bytes());
            h.extend(w.crc.to_le_bytes());
            h.extend(clip(w.compressed).to_le_bytes());
            h.extend(clip(w.size).to_le_bytes());
            h.extend((w.name.len() as u16).to_le_bytes());
            let extra_len = if extra.is_empty() { 0 } else { 4 + extra.len() };
            h.extend((extra_len as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes()); // comment
            h.extend(0u16.to_le_bytes()); // disk
            h.extend(0u16.to_le_bytes()); // internal attributes
            h.extend((0o100644u32 << 16).to_le_bytes());
            h.extend(clip(w.header_at).to_le_bytes());
            h.extend(w.name.as_bytes());
            if !extra.is_empty() {
                h.extend(1u16.to_le_bytes());
                h.extend((extra.len() as u16).to_le_bytes());
                h.extend(&extra);
            }
            c.write_all(&h)?;
        }
        let cd_size = c.at - cd_at;
        let n = done.len() as u64;
        let mut e = Vec::new();
        if n >= 0xFFFF || cd_at >= 0xFFFF_FFFF || cd_size >= 0xFFFF_FFFF {
            let z_at = c.at;
            e.extend(ZIP64_EOCD_SIG.to_le_bytes());
            e.extend(44u64.to_le_bytes());
            e.extend(45u16.to_le_bytes());
            e.extend(45u16.to_le_bytes());
            e.extend(0u32.to_le_bytes());
            e.extend(0u32.to_le_bytes());
            e.extend(n.to_le_bytes());
            e.extend(n.to_le_bytes());
            e.extend(cd_size.to_le_bytes());
            e.extend(cd_at.to_le_bytes());
            e.extend(ZIP64_LOCATOR_SIG.to_le_bytes());
            e.extend(0u32.to_le_bytes());
            e.extend(z_at.to_le_bytes());
            e.extend(1u32.to_le_bytes());
        }
        e.extend(EOCD_SIG.to_le_bytes());
        e.extend(0u16.to_le_bytes());
        e.extend(0u16.to_le_bytes());
        e.extend((n.min(0xFFFF) as u16).to_le_bytes());
        e.extend((n.min(0xFFFF) as u16).to_le_bytes());
        e.extend((cd_size.min(0xFFFF_FFFF) as u32).to_le_bytes());
        e.extend((cd_at.min(0xFFFF_FFFF) as u32).to_le_bytes());
        e.extend(0u16.to_le_bytes());
        c.write_all(&e)?;
        c.flush()?;
        Ok(c.at)
    }
}

fn utf8_flag(name: &str) -> u16 {
    if name.is_ascii() { 0 } else { 0x0800 }
}

impl Write for ZipWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let cur = self
            .cur
            .as_mut()
            .ok_or_else(|| std::io::Error::other("write outside a member"))?;
        let n = match &mut self.sink {
            Sink::Plain(c) => c.write(buf)?,
            Sink::Deflate(d) => d.write(buf)?,
            Sink::Gone => return Err(std::io::Error::other("zip writer state")),
        };
        cur.crc.update(&buf[..n]);
        cur.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.zip");
        let mut w = ZipWriter::new(File::create(&p).expect("create"));
        let big: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        w.begin("x.npy", STORED).expect("begin");
        w.write_all(b"hello").expect("write");
        w.end().expect("end");
        w.begin("y.npy", DEFLATED).expect("begin");
        w.write_all(&big).expect("write");
        w.end().expect("end");
        let len = w.finish().expect("finish");
        assert_eq!(len, std::fs::metadata(&p).expect("stat").len());
        let a = Archive::open(&p).expect("open");
        let names: Vec<&str> = a.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["x.npy", "y.npy"]);
        let mut got = Vec::new();
        a.reader(&a.entries[1])
            .expect("reader")
            .read_to_end(&mut got)
            .expect("read");
        assert_eq!(got, big);
        // A flipped byte in the stored member fails its CRC.
        let mut bytes = std::fs::read(&p).expect("read");
        let at = bytes.windows(5).position(|w| w == b"hello").expect("found");
        bytes[at] = b'j';
        std::fs::write(&p, &bytes).expect("write");
        let a = Archive::open(&p).expect("open");
        let mut sink = Vec::new();
        let e = a
            .reader(&a.entries[0])
            .expect("reader")
            .read_to_end(&mut sink);
        assert!(e.is_err());
    }
}
