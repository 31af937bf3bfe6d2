//! A small palette raster canvas and its PNG encoder: signature, `IHDR` (8-bit palette), `PLTE`,
//! one `IDAT` (zlib via `flate2`, every row with filter type 0), `IEND`, each chunk with its
//! CRC-32. The same canvas always encodes to the same bytes.

use std::io::Write;

use super::font;

/// An RGB colour of the report's palette.
pub type Rgb = [u8; 3];

/// The report's colours; a pixel holds an index into this table.
pub const PALETTE: [Rgb; 9] = [
    [255, 255, 255], // WHITE
    [20, 20, 20],    // INK
    [110, 110, 110], // GREY
    [220, 220, 220], // LIGHT
    [66, 114, 196],  // BLUE
    [230, 140, 40],  // ORANGE
    [40, 150, 60],   // GREEN
    [200, 40, 40],   // RED
    [247, 247, 247], // PANEL
];
pub const WHITE: u8 = 0;
pub const INK: u8 = 1;
pub const GREY: u8 = 2;
pub const LIGHT: u8 = 3;
pub const BLUE: u8 = 4;
pub const ORANGE: u8 = 5;
pub const GREEN: u8 = 6;
pub const RED: u8 = 7;
pub const PANEL: u8 = 8;

/// A `width` x `height` image of palette indices, row by row from the top. Drawing outside it
/// is clipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    /// A canvas filled with `background`.
    pub fn new(width: usize, height: usize, background: u8) -> Canvas {
        Canvas {
            width,
            height,
            pixels: vec![background; width * height],
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// The colour index at (`x`, `y`), `None` outside.
    pub fn get(&self, x: usize, y: usize) -> Option<u8> {
        (x < self.width && y < self.height).then(|| self.pixels[y * self.width + x])
    }

    pub fn set(&mut self, x: i64, y: i64, color: u8) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = color;
        }
    }

    /// Fills the rectangle with corner (`x`, `y`), `w` wide and `h` high.
    pub fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, color: u8) {
        let x0 = x.clamp(0, self.width as i64) as usize;
        let x1 = (x + w).clamp(0, self.width as i64) as usize;
        let y0 = y.clamp(0, self.height as i64) as usize;
        let y1 = (y + h).clamp(0, self.height as i64) as usize;
        if x0 >= x1 {
            return;
        }
        for row in y0..y1 {
            self.pixels[row * self.width + x0..row * self.width + x1].fill(color);
        }
    }

    /// The outline of a rectangle, one pixel wide.
    pub fn stroke_rect(&mut self, x: i64, y: i64, w: i64, h: i64, color: u8) {
        self.fill_rect(x, y, w, 1, color);
        self.fill_rect(x, y + h - 1, w, 1, color);
        self.fill_rect(x, y, 1, h, color);
        self.fill_rect(x + w - 1, y, 1, h, color);
    }

    /// Draws `text` with its top-left corner at (`x`, `y`), each font pixel `scale` pixels square.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: usize, color: u8) {
        let s = scale.max(1) as i64;
        for (i, c) in text.chars().enumerate() {
            let cx = x + (i * font::ADVANCE) as i64 * s;
            for gy in 0..font::GLYPH_H {
                for gx in 0..font::GLYPH_W {
                    if font::pixel(c, gx, gy) {
                        self.fill_rect(cx + gx as i64 * s, y + gy as i64 * s, s, s, color);
                    }
                }
            }
        }
    }

    /// The image as a PNG file.
    pub fn encode_png(&self) -> Vec<u8> {
        let mut png = Vec::with_capacity(self.pixels.len() / 8 + 1024);
        png.extend_from_slice(&SIGNATURE);
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        // Bit depth 8, colour type 3 (palette), deflate, adaptive filtering, no interlace.
        ihdr.extend_from_slice(&[8, 3, 0, 0, 0]);
        chunk(&mut png, b"IHDR", &ihdr);
        let plte: Vec<u8> = PALETTE.iter().flatten().copied().collect();
        chunk(&mut png, b"PLTE", &plte);
        let mut z = flate2::write::ZlibEncoder::new(
            Vec::with_capacity(self.pixels.len() / 16 + 64),
            flate2::Compression::best(),
        );
        for row in self.pixels.chunks(self.width.max(1)) {
            // Writing into a Vec cannot fail.
            let _ = z.write_all(&[0]);
            let _ = z.write_all(row);
        }
        let idat = z.finish().unwrap_or_default();
        chunk(&mut png, b"IDAT", &idat);
        chunk(&mut png, b"IEND", &[]);
        png
    }
}

/// The eight bytes every PNG file starts with.
pub const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Appends one chunk: length, type, data, CRC-32 of type and data.
fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 (ISO 3309 / ITU-T V.42, the one PNG and zlib's gzip use), bitwise with a table.
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut n = 0;
        while n < 256 {
            let mut c = n as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[n] = c;
            n += 1;
        }
        t
    };
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c = TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    c ^ 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// The chunks of a PNG file, each CRC checked.
    fn chunks(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
        assert_eq!(png[..8], SIGNATURE);
        let mut out = Vec::new();
        let mut at = 8;
        while at < png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind: [u8; 4] = png[at + 4..at + 8].try_into().expect("4 bytes");
            let data = png[at + 8..at + 8 + len].to_vec();
            let crc = u32::from_be_bytes(png[at + 8 + len..at + 12 + len].try_into().expect("4"));
            assert_eq!(crc, crc32(&png[at + 4..at + 8 + len]), "CRC of {kind:?}");
            out.push((kind, data));
            at += 12 + len;
        }
        out
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        // The IEND chunk's CRC every PNG ends with.
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    #[test]
    fn png_round_trips_dimensions_palette_and_pixels() {
        let mut c = Canvas::new(37, 11, WHITE);
        c.fill_rect(2, 3, 5, 4, BLUE);
        c.set(36, 10, RED);
        c.set(-1, 0, RED); // clipped
        c.text(10, 2, "Ab", 1, INK);
        let png = c.encode_png();
        let parts = chunks(&png);
        let kinds: Vec<&[u8; 4]> = parts.iter().map(|(k, _)| k).collect();
        assert_eq!(kinds, [b"IHDR", b"PLTE", b"IDAT", b"IEND"]);
        let ihdr = &parts[0].1;
        assert_eq!(u32::from_be_bytes(ihdr[0..4].try_into().expect("4")), 37);
        assert_eq!(u32::from_be_bytes(ihdr[4..8].try_into().expect("4")), 11);
        assert_eq!(ihdr[8..], [8, 3, 0, 0, 0]);
        assert_eq!(parts[1].1.len(), PALETTE.len() * 3);
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&parts[2].1[..])
            .read_to_end(&mut raw)
            .expect("IDAT inflates");
        assert_eq!(raw.len(), 11 * (37 + 1));
        for y in 0..11 {
            assert_eq!(raw[y * 38], 0, "filter type of row {y}");
            for x in 0..37 {
                assert_eq!(Some(raw[y * 38 + 1 + x]), c.get(x, y), "pixel {x},{y}");
            }
        }
        assert_eq!(c.get(2, 3), Some(BLUE));
        assert_eq!(c.get(6, 6), Some(BLUE));
        assert_eq!(c.get(7, 6), Some(WHITE));
        assert_eq!(c.get(36, 10), Some(RED));
        assert_eq!(c.get(0, 0), Some(WHITE));
        // 'A' at (10, 2): its top row is .###.
        assert_eq!(c.get(10, 2), Some(WHITE));
        assert_eq!(c.get(11, 2), Some(INK));
        // Deterministic.
        assert_eq!(png, c.encode_png());
    }

    #[test]
    fn drawing_off_the_canvas_is_clipped() {
        let mut c = Canvas::new(4, 4, WHITE);
        c.fill_rect(-10, -10, 100, 2, GREEN); // wholly above
        c.fill_rect(-10, -1, 100, 2, GREEN);
        c.stroke_rect(2, 2, 10, 10, RED);
        c.text(3, 3, "W", 3, INK);
        assert_eq!(c.get(3, 0), Some(GREEN));
        assert_eq!(c.get(0, 0), Some(GREEN));
        assert_eq!(c.get(0, 1), Some(WHITE));
        assert_eq!(c.get(3, 2), Some(RED));
        assert_eq!(c.get(2, 3), Some(RED));
        assert_eq!(c.get(4, 0), None);
    }
}
