//! The PNG report's layout: a title band (name, samples, validity), the dataset's facts when
//! its format reports any (a LeRobot dataset's fps, tasks, features), a grid of histograms (one
//! per per-sample field, energies first, at most [`MAX_PANELS`]) and, for an experiment, a bar
//! chart of per-object yields.

use super::png::{BLUE, Canvas, GREEN, GREY, INK, LIGHT, ORANGE, PANEL, RED, WHITE};
use super::stats::{FieldSummary, Histogram};
use super::{InspectOutcome, Yield, fmt_num, font};

/// Width of the report in pixels.
pub const WIDTH: usize = 1000;
/// Most histogram panels drawn.
pub const MAX_PANELS: usize = 12;
/// Most objects in the yield chart.
pub const MAX_BARS: usize = 60;

const MARGIN: i64 = 10;
const COLS: i64 = 3;
const PANEL_W: i64 = (WIDTH as i64 - MARGIN * (COLS + 1)) / COLS;
const PANEL_H: i64 = 210;
const TITLE_H: i64 = 50;
const YIELD_H: i64 = 250;
/// Most lines of the facts band (a LeRobot dataset's fps, tasks, features...); the rest are
/// counted in a last line.
pub const MAX_FACT_LINES: usize = 20;
const FACT_LINE_H: i64 = 12;

/// Fields worth a histogram, most relevant first: energies (`energy` in the name, any case, or
/// `E_`) before the rest, each group in the dataset's order; at most [`MAX_PANELS`].
pub fn panel_fields(fields: &[FieldSummary]) -> Vec<&FieldSummary> {
    let relevant =
        |f: &FieldSummary| f.name.to_ascii_lowercase().contains("energy") || f.name.contains("E_");
    let with_hist = fields.iter().filter(|f| f.histogram.is_some());
    let mut out: Vec<&FieldSummary> = with_hist.clone().filter(|f| relevant(f)).collect();
    out.extend(with_hist.filter(|f| !relevant(f)));
    out.truncate(MAX_PANELS);
    out
}

/// The lines of the facts band: `key: value`, at most [`MAX_FACT_LINES`] (the last one then
/// says how many more are in the text report).
fn fact_lines(o: &InspectOutcome) -> Vec<String> {
    let mut lines: Vec<String> = o
        .facts
        .iter()
        .map(|f| format!("{}: {}", f.key, f.value))
        .collect();
    if lines.len() > MAX_FACT_LINES {
        let more = lines.len() - (MAX_FACT_LINES - 1);
        lines.truncate(MAX_FACT_LINES - 1);
        lines.push(format!(
            "... and {more} more (coordinator inspect without --png)"
        ));
    }
    lines
}

/// Height of the facts band under the title (none without facts).
fn facts_height(o: &InspectOutcome) -> i64 {
    match fact_lines(o).len() as i64 {
        0 => 0,
        n => n * FACT_LINE_H + 2 * MARGIN,
    }
}

/// Pixel height of the report for this outcome.
pub fn height(o: &InspectOutcome) -> usize {
    let panels = panel_fields(&o.fields).len().max(1) as i64;
    let rows = (panels + COLS - 1) / COLS;
    let mut h = TITLE_H + facts_height(o) + rows * (PANEL_H + MARGIN);
    if o.experiment.is_some() {
        h += YIELD_H + MARGIN;
    }
    (h + MARGIN) as usize
}

/// Draws the report.
pub fn render(o: &InspectOutcome) -> Canvas {
    let mut c = Canvas::new(WIDTH, height(o), WHITE);
    // Title band.
    let max_chars = (WIDTH as i64 - 2 * MARGIN) as usize / (font::ADVANCE * 2);
    c.text(MARGIN, 10, &clip(&o.name, max_chars), 2, INK);
    let mut info = format!("{} samples", o.samples);
    if let Some(f) = &o.format {
        info = format!("{f}  |  {info}");
    }
    if let Some(e) = &o.experiment {
        info = format!("{} objects  |  {info}", e.objects.len());
    }
    info.push_str("  |  ");
    c.text(MARGIN, 32, &info, 1, GREY);
    let (status, color) = if o.valid {
        ("VALID".to_string(), GREEN)
    } else {
        (format!("INVALID ({} problems)", o.problem_count), RED)
    };
    let x = MARGIN + font::text_width(&info, 1) as i64 + font::ADVANCE as i64;
    c.text(x, 32, &status, 1, color);

    // Facts.
    let lines = fact_lines(o);
    let top = TITLE_H + facts_height(o);
    if !lines.is_empty() {
        let w = WIDTH as i64 - 2 * MARGIN;
        c.fill_rect(MARGIN, TITLE_H, w, top - TITLE_H - MARGIN, PANEL);
        c.stroke_rect(MARGIN, TITLE_H, w, top - TITLE_H - MARGIN, LIGHT);
        let max_chars = (w as usize - 16) / font::ADVANCE;
        for (i, line) in lines.iter().enumerate() {
            let y = TITLE_H + MARGIN / 2 + 2 + i as i64 * FACT_LINE_H;
            c.text(MARGIN + 8, y, &clip(line, max_chars), 1, INK);
        }
    }

    // Histograms.
    let panels = panel_fields(&o.fields);
    if panels.is_empty() {
        let (x, y) = (MARGIN, top);
        c.fill_rect(x, y, PANEL_W, PANEL_H, PANEL);
        c.stroke_rect(x, y, PANEL_W, PANEL_H, LIGHT);
        c.text(x + 8, y + 8, "no per-sample numeric fields", 1, GREY);
    }
    for (i, f) in panels.iter().enumerate() {
        let (col, row) = (i as i64 % COLS, i as i64 / COLS);
        let x = MARGIN + col * (PANEL_W + MARGIN);
        let y = top + row * (PANEL_H + MARGIN);
        if let Some(h) = &f.histogram {
            histogram_panel(&mut c, x, y, f, h);
        }
    }

    // Yields.
    if let Some(e) = &o.experiment {
        let rows = (panels.len().max(1) as i64 + COLS - 1) / COLS;
        let y = top + rows * (PANEL_H + MARGIN);
        let bars: Vec<(&str, Option<&Yield>)> = e
            .objects
            .iter()
            .map(|r| (r.object.as_str(), r.yield_.as_ref()))
            .collect();
        yield_panel(&mut c, MARGIN, y, WIDTH as i64 - 2 * MARGIN, &bars);
    }
    c
}

/// `s` cut to `n` characters, the last one `~` when cut.
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_string();
    }
    let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
    if n > 0 {
        out.push('~');
    }
    out
}

/// A count, short: `950`, `12.5k`, `3.2M`.
fn fmt_count(n: u64) -> String {
    match n {
        0..10_000 => n.to_string(),
        10_000..1_000_000 => format!("{}k", fmt_num(n as f64 / 1e3, 3)),
        _ => format!("{}M", fmt_num(n as f64 / 1e6, 3)),
    }
}

/// Text centred on `cx`, kept inside `[lo, hi)`.
fn centred(c: &mut Canvas, cx: i64, y: i64, text: &str, lo: i64, hi: i64, color: u8) {
    let w = font::text_width(text, 1) as i64;
    let x = (cx - w / 2).min(hi - w).max(lo);
    c.text(x, y, text, 1, color);
}

fn histogram_panel(c: &mut Canvas, x: i64, y: i64, f: &FieldSummary, h: &Histogram) {
    c.fill_rect(x, y, PANEL_W, PANEL_H, PANEL);
    c.stroke_rect(x, y, PANEL_W, PANEL_H, LIGHT);
    let mut title = format!("{}  n={}", f.name, f.count);
    if f.nan + f.inf > 0 {
        title.push_str(&format!(" nan={} inf={}", f.nan, f.inf));
    }
    c.text(
        x + 6,
        y + 6,
        &clip(&title, (PANEL_W as usize - 12) / font::ADVANCE),
        1,
        INK,
    );
    let (px, py) = (x + 50, y + 24);
    let (pw, ph) = (PANEL_W - 50 - 12, PANEL_H - 24 - 26);
    let top = h.counts.iter().copied().max().unwrap_or(0).max(1);
    // Grid and y labels: 0, half, top.
    let ticks: Vec<u64> = if top >= 2 {
        vec![0, top / 2, top]
    } else {
        vec![0, top]
    };
    for t in ticks {
        let ty = py + ph - (t as f64 / top as f64 * ph as f64).round() as i64;
        c.fill_rect(px, ty, pw, 1, LIGHT);
        let label = fmt_count(t);
        let w = font::text_width(&label, 1) as i64;
        c.text(px - 5 - w, ty - 3, &label, 1, GREY);
    }
    // Bars.
    let n = h.counts.len() as i64;
    for (i, &count) in h.counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let i = i as i64;
        let x0 = px + i * pw / n;
        let x1 = px + (i + 1) * pw / n;
        let gap = i64::from(x1 - x0 >= 4);
        let bh = ((count as f64 / top as f64) * ph as f64).round().max(1.0) as i64;
        c.fill_rect(x0, py + ph - bh, (x1 - x0 - gap).max(1), bh, BLUE);
    }
    // Axes.
    c.fill_rect(px, py + ph, pw, 1, INK);
    c.fill_rect(px, py, 1, ph + 1, INK);
    // X labels: bin centres of whole-number fields, else the ends and the middle.
    let label_y = py + ph + 6;
    let (lo_x, hi_x) = (x + 2, x + PANEL_W - 2);
    let w = (h.hi - h.lo) / n as f64;
    let at = |v: f64| px + ((v - h.lo) / (h.hi - h.lo) * pw as f64).round() as i64;
    let values: Vec<f64> = if h.integer {
        // At most about 8 labels: every `step`-th whole number, and the last one.
        let n = n as usize;
        let step = n.div_ceil(8);
        let mut idx: Vec<usize> = (0..n).step_by(step).collect();
        if let Some(&l) = idx.last()
            && l != n - 1
            && (n - 1 - l) * 2 >= step
        {
            idx.push(n - 1);
        }
        idx.into_iter()
            .map(|i| h.lo + (i as f64 + 0.5) * w)
            .collect()
    } else {
        vec![h.lo, (h.lo + h.hi) / 2.0, h.hi]
    };
    for v in values {
        let tx = at(v);
        c.fill_rect(tx, py + ph, 1, 3, INK);
        centred(c, tx, label_y, &fmt_num(v, 4), lo_x, hi_x, GREY);
    }
}

fn yield_panel(c: &mut Canvas, x: i64, y: i64, w: i64, bars: &[(&str, Option<&Yield>)]) {
    c.fill_rect(x, y, w, YIELD_H, PANEL);
    c.stroke_rect(x, y, w, YIELD_H, LIGHT);
    let mut title = "per-object yield: success rate (blue), collected / quota (orange)".to_string();
    if bars.len() > MAX_BARS {
        title.push_str(&format!("  [first {MAX_BARS} of {} objects]", bars.len()));
    }
    c.text(x + 6, y + 6, &title, 1, INK);
    let (px, py) = (x + 50, y + 24);
    let (pw, ph) = (w - 50 - 12, YIELD_H - 24 - 36);
    for pct in [0u32, 25, 50, 75, 100] {
        let ty = py + ph - (f64::from(pct) / 100.0 * ph as f64).round() as i64;
        c.fill_rect(px, ty, pw, 1, LIGHT);
        let label = format!("{pct}%");
        let lw = font::text_width(&label, 1) as i64;
        c.text(px - 5 - lw, ty - 3, &label, 1, GREY);
    }
    let shown = &bars[..bars.len().min(MAX_BARS)];
    let n = shown.len().max(1) as i64;
    for (i, (name, y_)) in shown.iter().enumerate() {
        let i = i as i64;
        let slot0 = px + i * pw / n;
        let slot = (px + (i + 1) * pw / n) - slot0;
        let bw = (slot * 7 / 10).max(1);
        let bx = slot0 + (slot - bw) / 2;
        let cx = slot0 + slot / 2;
        match y_ {
            Some(yv) => {
                let v = yv.value.clamp(0.0, 1.0);
                let bh = (v * ph as f64).round() as i64;
                let color = if yv.basis == "success_rate" {
                    BLUE
                } else {
                    ORANGE
                };
                if bh > 0 {
                    c.fill_rect(bx, py + ph - bh, bw, bh, color);
                }
                let label = format!("{}%", fmt_num(yv.value * 100.0, 3));
                if font::text_width(&label, 1) as i64 <= slot {
                    centred(
                        c,
                        cx,
                        (py + ph - bh - 10).max(py + 1),
                        &label,
                        slot0,
                        slot0 + slot,
                        INK,
                    );
                }
            }
            None => centred(c, cx, py + ph - 10, "-", slot0, slot0 + slot, GREY),
        }
        let chars = (slot as usize) / font::ADVANCE;
        if chars >= 1 {
            centred(
                c,
                cx,
                py + ph + 8,
                &clip(name, chars),
                slot0,
                slot0 + slot,
                INK,
            );
        }
    }
    c.fill_rect(px, py + ph, pw, 1, INK);
    c.fill_rect(px, py, 1, ph + 1, INK);
}
