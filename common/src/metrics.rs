//! Prometheus metrics: a small registry of counters, gauges and histograms rendered in the
//! text exposition format, and the HTTP endpoint (`--metrics-listen`, [`http`]) that serves
//! `/metrics` and `/healthz`. Names are prefixed `quarry_`; labels are few and low-cardinality
//! (never a seed, round or attempt).
//!
//! The registry and its rendering are written here rather than taken from the
//! `prometheus-client` crate: that crate renders OpenMetrics, where a counter's family is named
//! without its `_total` suffix (`# TYPE quarry_rounds_leased counter` over the sample
//! `quarry_rounds_leased_total`), the body ends in `# EOF` and the content type differs. The
//! `# HELP`/`# TYPE` families would no longer match the metric names the documentation, the
//! dashboard and the alert rules use (and `tests/tests/prometheus.rs` checks), its registry
//! registers through `&mut` (ours creates series on first use through a shared `Arc`), and its
//! histogram takes a lock per observation. What it would replace is the ~150 lines below.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod http;

pub use http::{MetricsArgs, ServeConfig, bind, serve, serve_with};

/// Buckets (seconds) for RPC-scale latencies.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets (seconds) for work that takes seconds to minutes (merges, generator runs).
pub const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// An `f64` in an atomic.
#[derive(Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    fn add(&self, v: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + v).to_bits())
            });
    }
}

/// A monotonically increasing count.
#[derive(Clone)]
pub struct Counter(Arc<AtomicF64>);

impl Counter {
    pub fn inc(&self) {
        self.0.add(1.0);
    }
    pub fn add(&self, v: f64) {
        if v > 0.0 {
            self.0.add(v);
        }
    }
    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

/// A value that goes up and down.
#[derive(Clone)]
pub struct Gauge(Arc<AtomicF64>);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.set(v);
    }
    pub fn get(&self) -> f64 {
        self.0.get()
    }
}

struct HistogramCells {
    bounds: Vec<f64>,
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: Vec<AtomicU64>,
    sum: AtomicF64,
}

/// A distribution of observed values.
#[derive(Clone)]
pub struct Histogram(Arc<HistogramCells>);

impl Histogram {
    pub fn observe(&self, v: f64) {
        let i = self
            .0
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.0.bounds.len());
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum.add(v);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

enum Cell {
    Value(Arc<AtomicF64>),
    Histogram(Arc<HistogramCells>),
}

struct Series {
    labels: String,
    cell: Cell,
}

struct Family {
    name: String,
    help: String,
    kind: Kind,
    series: Vec<Series>,
}

/// The metrics of one process.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Family>>,
}

fn valid_name(name: &str) -> bool {
    name.starts_with("quarry_")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut out = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let v = v
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = write!(out, "{k}=\"{v}\"");
    }
    out.push('}');
    out
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    fn cell(
        &self,
        name: &str,
        help: &str,
        kind: Kind,
        labels: &[(&str, &str)],
        make: impl FnOnce() -> Cell,
    ) -> Cell {
        // Names are compile-time constants of this code base; a bad one is a bug.
        debug_assert!(valid_name(name), "metric name {name:?}");
        let labels = render_labels(labels);
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let pos = match families.iter().position(|f| f.name == name) {
            Some(p) => p,
            None => {
                families.push(Family {
                    name: name.to_string(),
                    help: help.to_string(),
                    kind,
                    series: Vec::new(),
                });
                families.len() - 1
            }
        };
        let family = &mut families[pos];
        if let Some(s) = family.series.iter().find(|s| s.labels == labels) {
            return match &s.cell {
                Cell::Value(v) => Cell::Value(Arc::clone(v)),
                Cell::Histogram(h) => Cell::Histogram(Arc::clone(h)),
            };
        }
        let cell = make();
        let shared = match &cell {
            Cell::Value(v) => Cell::Value(Arc::clone(v)),
            Cell::Histogram(h) => Cell::Histogram(Arc::clone(h)),
        };
        family.series.push(Series { labels, cell });
        shared
    }

    /// The counter `name{labels}` (created at zero on first use).
    pub fn counter(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Counter {
        match self.cell(name, help, Kind::Counter, labels, || {
            Cell::Value(Arc::default())
        }) {
            Cell::Value(v) => Counter(v),
            Cell::Histogram(_) => Counter(Arc::default()),
        }
    }

    pub fn gauge(&self, name: &str, help: &str, labels: &[(&str, &str)]) -> Gauge {
        match self.cell(name, help, Kind::Gauge, labels, || {
            Cell::Value(Arc::default())
        }) {
            Cell::Value(v) => Gauge(v),
            Cell::Histogram(_) => Gauge(Arc::default()),
        }
    }

    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        bounds: &[f64],
    ) -> Histogram {
        let make = || {
            Cell::Histogram(Arc::new(HistogramCells {
                bounds: bounds.to_vec(),
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum: AtomicF64::default(),
            }))
        };
        match self.cell(name, help, Kind::Histogram, labels, make) {
            Cell::Histogram(h) => Histogram(h),
            Cell::Value(_) => Histogram(Arc::new(HistogramCells {
                bounds: Vec::new(),
                counts: vec![AtomicU64::new(0)],
                sum: AtomicF64::default(),
            })),
        }
    }

    /// Every metric in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for f in families.iter() {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.name());
            for s in &f.series {
                match &s.cell {
                    Cell::Value(v) => {
                        let _ = writeln!(out, "{}{} {}", f.name, s.labels, fmt_f64(v.get()));
                    }
                    Cell::Histogram(h) => {
                        let inner = s.labels.trim_start_matches('{').trim_end_matches('}');
                        let sep = if inner.is_empty() { "" } else { "," };
                        let mut cumulative = 0u64;
                        for (i, c) in h.counts.iter().enumerate() {
                            cumulative += c.load(Ordering::Relaxed);
                            let le = h.bounds.get(i).map_or("+Inf".to_string(), |b| fmt_f64(*b));
                            let _ = writeln!(
                                out,
                                "{}_bucket{{{inner}{sep}le=\"{le}\"}} {cumulative}",
                                f.name
                            );
                        }
                        let _ =
                            writeln!(out, "{}_sum{} {}", f.name, s.labels, fmt_f64(h.sum.get()));
                        let _ = writeln!(out, "{}_count{} {cumulative}", f.name, s.labels);
                    }
                }
            }
        }
        out
    }
}

fn fmt_f64(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let r = Registry::new();
        let c = r.counter(
            "quarry_rounds_failed_total",
            "Failed attempts.",
            &[("kind", "exit")],
        );
        c.inc();
        c.add(2.0);
        r.counter(
            "quarry_rounds_failed_total",
            "Failed attempts.",
            &[("kind", "timeout")],
        );
        r.gauge("quarry_leader", "1 while leading.", &[]).set(1.0);
        let h = r.histogram("quarry_commit_seconds", "Commit latency.", &[], &[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(7.0);
        // Asking again returns the same series.
        r.counter(
            "quarry_rounds_failed_total",
            "Failed attempts.",
            &[("kind", "exit")],
        )
        .inc();
        let text = r.render();
        let want = "\
# HELP quarry_rounds_failed_total Failed attempts.
# TYPE quarry_rounds_failed_total counter
quarry_rounds_failed_total{kind=\"exit\"} 4
quarry_rounds_failed_total{kind=\"timeout\"} 0
# HELP quarry_leader 1 while leading.
# TYPE quarry_leader gauge
quarry_leader 1
# HELP quarry_commit_seconds Commit latency.
# TYPE quarry_commit_seconds histogram
quarry_commit_seconds_bucket{le=\"0.1\"} 1
quarry_commit_seconds_bucket{le=\"1\"} 2
quarry_commit_seconds_bucket{le=\"+Inf\"} 3
quarry_commit_seconds_sum 7.55
quarry_commit_seconds_count 3
";
        assert_eq!(text, want);
        assert_eq!(h.count(), 3);
    }
}
