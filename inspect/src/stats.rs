//! Statistics gathered from [`quarry_formats::examine`]'s observer calls: per field the count,
//! minimum, mean and maximum of its finite values, its NaN and infinity counts, and, for a
//! field with one value per sample, a histogram.
//!
//! Memory is bounded: an array field keeps only running sums; a per-sample field keeps its
//! values (8 bytes each) for the histogram until the accumulator's cap is reached, after which
//! the field is marked for a second, binning pass ([`Binner`]) over the same datasets.

use std::collections::HashMap;

use serde::Serialize;

/// Per-sample values one accumulator keeps for histograms (all fields together): 64 MiB.
pub const DEFAULT_VALUE_CAP: usize = 8 << 20;
/// Problems kept with their text; the rest are only counted.
pub const MAX_KEPT_PROBLEMS: usize = 200;

/// One problem an examine reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub path: String,
    pub reason: String,
}

/// A fact about a whole dataset a format reported (its frame rate, its task list...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fact {
    pub key: String,
    pub value: String,
}

/// Facts kept per accumulator; the rest are dropped.
pub const MAX_FACTS: usize = 1000;

/// A field's running statistics.
#[derive(Debug, Clone)]
pub struct FieldStats {
    name: String,
    /// Finite values.
    count: u64,
    nan: u64,
    inf: u64,
    min: f64,
    max: f64,
    /// Neumaier-compensated sum of the finite values.
    sum: f64,
    comp: f64,
    /// Samples that reported the field.
    samples: u64,
    /// Most values one sample reported.
    max_len: u64,
    /// Every sample reported exactly one value.
    scalar: bool,
    /// Every finite value is a whole number.
    integer: bool,
    /// The finite values, one per sample, while `scalar` and under the cap.
    values: Vec<f64>,
    /// The cap was hit: the histogram needs a [`Binner`] pass.
    overflowed: bool,
    /// Values in the current sample so far (`last_seq` is that sample).
    cur_len: u64,
    last_seq: u64,
}

impl FieldStats {
    fn new(name: &str) -> FieldStats {
        FieldStats {
            name: name.to_string(),
            count: 0,
            nan: 0,
            inf: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            comp: 0.0,
            samples: 0,
            max_len: 0,
            scalar: true,
            integer: true,
            values: Vec::new(),
            overflowed: false,
            cur_len: 0,
            last_seq: u64::MAX,
        }
    }

    fn add_sum(&mut self, v: f64) {
        let t = self.sum + v;
        if self.sum.abs() >= v.abs() {
            self.comp += (self.sum - t) + v;
        } else {
            self.comp += (v - t) + self.sum;
        }
        self.sum = t;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether every sample that has this field holds exactly one value of it.
    pub fn is_scalar(&self) -> bool {
        self.scalar && self.samples > 0
    }

    /// The mean of the finite values.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.sum + self.comp) / self.count as f64)
    }

    /// Whether the histogram needs a [`Binner`] pass.
    pub fn needs_binning(&self) -> bool {
        self.is_scalar() && self.overflowed && self.count > 0
    }

    /// How a histogram of this field with `bins` bins is laid out (`None` when it has no
    /// finite value or is not a per-sample field).
    pub fn layout(&self, bins: usize) -> Option<Histogram> {
        if !self.is_scalar() || self.count == 0 {
            return None;
        }
        let bins = bins.max(1);
        let (lo, hi, n, integer) = if self.integer && self.max - self.min < bins as f64 {
            // Whole numbers with few distinct values: one bin per value.
            (
                self.min - 0.5,
                self.max + 0.5,
                (self.max - self.min) as usize + 1,
                true,
            )
        } else if self.min == self.max {
            let d = 0.5 * self.min.abs().max(1.0);
            (self.min - d, self.max + d, bins, false)
        } else {
            (self.min, self.max, bins, false)
        };
        Some(Histogram {
            lo,
            hi,
            integer,
            counts: vec![0; n],
        })
    }

    /// The histogram of the kept values (`None` as [`FieldStats::layout`], or when the values
    /// were not all kept: see [`FieldStats::needs_binning`]).
    pub fn histogram(&self, bins: usize) -> Option<Histogram> {
        if self.overflowed {
            return None;
        }
        let mut h = self.layout(bins)?;
        for &v in &self.values {
            h.add(v);
        }
        Some(h)
    }

    /// The field's summary, its histogram included when one is given.
    pub fn summary(&self, histogram: Option<Histogram>) -> FieldSummary {
        let some = |v: f64| (self.count > 0).then_some(v);
        FieldSummary {
            name: self.name.clone(),
            kind: if self.is_scalar() { "scalar" } else { "array" },
            samples: self.samples,
            count: self.count,
            nan: self.nan,
            inf: self.inf,
            min: some(self.min),
            mean: self.mean(),
            max: some(self.max),
            max_values_per_sample: self.max_len,
            histogram,
        }
    }
}

/// A histogram: `counts[i]` values fell in `[lo + i*w, lo + (i+1)*w)` with
/// `w = (hi - lo) / counts.len()` (the last bin includes `hi`). `integer`: one bin per whole
/// number, centred on it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    pub integer: bool,
    pub counts: Vec<u64>,
}

impl Histogram {
    /// The bin `v` falls in (values outside `[lo, hi]` go to the end bins).
    pub fn bin(&self, v: f64) -> usize {
        let n = self.counts.len();
        // Halved so that `hi - lo` cannot overflow to infinity.
        let t = (v * 0.5 - self.lo * 0.5) / (self.hi * 0.5 - self.lo * 0.5);
        let i = (t * n as f64).floor();
        if i.is_nan() || i < 0.0 {
            0
        } else {
            (i as usize).min(n - 1)
        }
    }

    /// Counts `v` (non-finite values are not binned).
    pub fn add(&mut self, v: f64) {
        if v.is_finite() {
            let i = self.bin(v);
            self.counts[i] += 1;
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What is reported of one field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldSummary {
    pub name: String,
    /// `scalar` (one value per sample) or `array`.
    pub kind: &'static str,
    /// Samples that have the field.
    pub samples: u64,
    /// Finite values (an array field: all elements).
    pub count: u64,
    pub nan: u64,
    pub inf: u64,
    pub min: Option<f64>,
    pub mean: Option<f64>,
    pub max: Option<f64>,
    pub max_values_per_sample: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub histogram: Option<Histogram>,
}

/// The accumulator: an [`quarry_formats::Observer`] that keeps field statistics and problems.
#[derive(Debug, Clone)]
pub struct Stats {
    /// `sample` calls so far.
    seq: u64,
    fields: Vec<FieldStats>,
    index: HashMap<String, usize>,
    problems: Vec<Problem>,
    problem_count: u64,
    facts: Vec<Fact>,
    kept: usize,
    cap: usize,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats::with_cap(DEFAULT_VALUE_CAP)
    }
}

impl Stats {
    /// An accumulator keeping at most `cap` per-sample values for histograms.
    pub fn with_cap(cap: usize) -> Stats {
        Stats {
            seq: 0,
            fields: Vec::new(),
            index: HashMap::new(),
            problems: Vec::new(),
            problem_count: 0,
            facts: Vec::new(),
            kept: 0,
            cap,
        }
    }

    /// `sample` calls seen.
    pub fn samples_seen(&self) -> u64 {
        self.seq
    }

    /// The fields in the order they were first reported.
    pub fn fields(&self) -> &[FieldStats] {
        &self.fields
    }

    pub fn field(&self, name: &str) -> Option<&FieldStats> {
        self.index.get(name).map(|&i| &self.fields[i])
    }

    /// The first [`MAX_KEPT_PROBLEMS`] problems.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The facts reported, in order (a key reported again replaces its value in place).
    pub fn facts(&self) -> &[Fact] {
        &self.facts
    }

    /// All problems reported, kept or not.
    pub fn problem_count(&self) -> u64 {
        self.problem_count
    }

    /// Records a problem found outside the walk (a missing file, a count that disagrees).
    pub fn add_problem(&mut self, path: &str, reason: &str) {
        self.problem_count += 1;
        if self.problems.len() < MAX_KEPT_PROBLEMS {
            self.problems.push(Problem {
                path: path.to_string(),
                reason: reason.to_string(),
            });
        }
    }

    fn field_mut(&mut self, name: &str) -> &mut FieldStats {
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                self.fields.push(FieldStats::new(name));
                self.index.insert(name.to_string(), self.fields.len() - 1);
                self.fields.len() - 1
            }
        };
        &mut self.fields[i]
    }

    /// Summaries of every field; histograms for per-sample fields from the kept values, or
    /// from `binned` for the fields that needed a [`Binner`] pass.
    pub fn summaries(&self, bins: usize, binned: &HashMap<String, Histogram>) -> Vec<FieldSummary> {
        self.fields
            .iter()
            .map(|f| {
                let h = if f.needs_binning() {
                    binned.get(&f.name).cloned()
                } else {
                    f.histogram(bins)
                };
                f.summary(h)
            })
            .collect()
    }

    /// Summaries without histograms.
    pub fn plain_summaries(&self) -> Vec<FieldSummary> {
        self.fields.iter().map(|f| f.summary(None)).collect()
    }

    /// Adds `other`'s fields, samples and problems to these (values are kept while the
    /// combined values stay under this accumulator's cap).
    pub fn absorb(&mut self, other: Stats) {
        self.seq += other.seq;
        for p in other.problems {
            if self.problems.len() < MAX_KEPT_PROBLEMS {
                self.problems.push(p);
            }
        }
        self.problem_count += other.problem_count;
        let cap = self.cap;
        let mut kept = self.kept;
        for o in other.fields {
            let f = self.field_mut(&o.name);
            f.count += o.count;
            f.nan += o.nan;
            f.inf += o.inf;
            f.min = f.min.min(o.min);
            f.max = f.max.max(o.max);
            f.add_sum(o.sum);
            f.add_sum(o.comp);
            f.samples += o.samples;
            f.max_len = f.max_len.max(o.max_len);
            f.scalar &= o.scalar;
            f.integer &= o.integer;
            f.overflowed |= o.overflowed;
            f.last_seq = u64::MAX;
            if !f.scalar || f.overflowed || kept + o.values.len() > cap {
                if f.scalar {
                    f.overflowed = true;
                }
                kept -= f.values.len();
                f.values = Vec::new();
            } else {
                kept += o.values.len();
                f.values.extend_from_slice(&o.values);
            }
        }
        self.kept = kept;
    }
}

impl quarry_formats::Observer for Stats {
    fn sample(&mut self, _index: u64) {
        self.seq += 1;
    }

    fn values(&mut self, field: &str, values: &[f64]) {
        let seq = self.seq;
        let cap = self.cap;
        let mut kept = self.kept;
        let f = self.field_mut(field);
        if f.last_seq != seq {
            f.last_seq = seq;
            f.samples += 1;
            f.cur_len = 0;
        }
        f.cur_len += values.len() as u64;
        f.max_len = f.max_len.max(f.cur_len);
        if f.cur_len != 1 && f.scalar {
            // A second value in one sample (or none): an array field after all.
            f.scalar = false;
            kept -= f.values.len();
            f.values = Vec::new();
        }
        for &v in values {
            if v.is_nan() {
                f.nan += 1;
            } else if v.is_infinite() {
                f.inf += 1;
            } else {
                f.count += 1;
                f.min = f.min.min(v);
                f.max = f.max.max(v);
                f.add_sum(v);
                if f.integer && v.fract() != 0.0 {
                    f.integer = false;
                }
                if f.scalar && !f.overflowed {
                    if kept < cap {
                        f.values.push(v);
                        kept += 1;
                    } else {
                        f.overflowed = true;
                        kept -= f.values.len();
                        f.values = Vec::new();
                    }
                }
            }
        }
        self.kept = kept;
    }

    fn problem(&mut self, path: &str, reason: &str) {
        self.add_problem(path, reason);
    }

    fn fact(&mut self, key: &str, value: &str) {
        if let Some(f) = self.facts.iter_mut().find(|f| f.key == key) {
            f.value = value.to_string();
        } else if self.facts.len() < MAX_FACTS {
            self.facts.push(Fact {
                key: key.to_string(),
                value: value.to_string(),
            });
        }
    }
}

/// The second pass for fields whose values did not all fit: bins each named field's values
/// into a histogram laid out from the first pass's minimum and maximum.
#[derive(Debug, Default)]
pub struct Binner {
    pub histograms: HashMap<String, Histogram>,
}

impl Binner {
    /// A binner for every field of `stats` that needs one.
    pub fn for_stats(stats: &Stats, bins: usize) -> Binner {
        Binner {
            histograms: stats
                .fields()
                .iter()
                .filter(|f| f.needs_binning())
                .filter_map(|f| Some((f.name.clone(), f.layout(bins)?)))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.histograms.is_empty()
    }
}

impl quarry_formats::Observer for Binner {
    fn sample(&mut self, _index: u64) {}

    fn values(&mut self, field: &str, values: &[f64]) {
        if let Some(h) = self.histograms.get_mut(field) {
            for &v in values {
                h.add(v);
            }
        }
    }

    fn problem(&mut self, _path: &str, _reason: &str) {}
}

#[cfg(test)]
mod tests {
    use quarry_formats::Observer;

    use super::*;

    /// Feeds `samples` (per sample: field name and values) to `obs`.
    fn feed(obs: &mut dyn Observer, samples: &[Vec<(&str, Vec<f64>)>]) {
        for (i, s) in samples.iter().enumerate() {
            obs.sample(i as u64);
            for (name, values) in s {
                obs.values(name, values);
            }
        }
    }

    fn dataset() -> Vec<Vec<(&'static str, Vec<f64>)>> {
        (0..10)
            .map(|i| {
                let i = i as f64;
                vec![
                    ("E_pen", vec![i * 0.1]),
                    ("qpos", vec![i, -i, 2.0 * i]),
                    ("steps", vec![(i as u64 % 3) as f64]),
                ]
            })
            .collect()
    }

    #[test]
    fn counts_min_mean_max_per_field() {
        let mut s = Stats::default();
        feed(&mut s, &dataset());
        assert_eq!(s.samples_seen(), 10);
        let names: Vec<&str> = s.fields().iter().map(FieldStats::name).collect();
        assert_eq!(names, ["E_pen", "qpos", "steps"]);
        let sums = s.summaries(4, &HashMap::new());
        let e = &sums[0];
        assert_eq!((e.kind, e.samples, e.count, e.nan), ("scalar", 10, 10, 0));
        assert_eq!(e.min, Some(0.0));
        assert!((e.max.expect("max") - 0.9).abs() < 1e-12);
        assert!((e.mean.expect("mean") - 0.45).abs() < 1e-12);
        let h = e
            .histogram
            .as_ref()
            .expect("a scalar field has a histogram");
        assert_eq!(h.counts.len(), 4);
        assert_eq!(h.total(), 10);
        // [0, .225) [.225, .45) [.45, .675) [.675, .9]
        assert_eq!(h.counts, [3, 2, 2, 3]);
        let q = &sums[1];
        assert_eq!(
            (q.kind, q.samples, q.count, q.max_values_per_sample),
            ("array", 10, 30, 3)
        );
        assert_eq!((q.min, q.max), (Some(-9.0), Some(18.0)));
        assert!((q.mean.expect("mean") - 90.0 / 30.0).abs() < 1e-12);
        assert!(q.histogram.is_none());
        // Whole numbers 0..=2: one bin per value.
        let st = sums[2].histogram.as_ref().expect("histogram");
        assert!(st.integer);
        assert_eq!(st.counts, [4, 3, 3]);
        assert_eq!((st.lo, st.hi), (-0.5, 2.5));
    }

    #[test]
    fn nan_and_infinity_are_counted_apart() {
        let mut s = Stats::default();
        feed(
            &mut s,
            &[
                vec![("energy", vec![1.0])],
                vec![("energy", vec![f64::NAN])],
                vec![("energy", vec![f64::INFINITY])],
                vec![("energy", vec![3.0])],
                vec![],
            ],
        );
        let e = &s.summaries(20, &HashMap::new())[0];
        assert_eq!((e.samples, e.count, e.nan, e.inf), (4, 2, 1, 1));
        assert_eq!((e.min, e.mean, e.max), (Some(1.0), Some(2.0), Some(3.0)));
        assert_eq!(e.histogram.as_ref().expect("histogram").total(), 2);
        // A field with no finite value has no statistics and no histogram.
        let mut s = Stats::default();
        feed(&mut s, &[vec![("x", vec![f64::NAN])]]);
        let x = &s.plain_summaries()[0];
        assert_eq!((x.min, x.mean, x.max, x.nan), (None, None, None, 1));
        assert!(s.fields()[0].histogram(20).is_none());
    }

    #[test]
    fn a_field_reported_twice_in_a_sample_is_an_array() {
        let mut s = Stats::default();
        feed(
            &mut s,
            &[
                vec![("a", vec![1.0])],
                vec![("a", vec![2.0]), ("a", vec![3.0])],
                vec![("a", vec![])],
            ],
        );
        let f = &s.fields()[0];
        assert!(!f.is_scalar());
        assert_eq!(f.summary(None).max_values_per_sample, 2);
        assert_eq!(f.summary(None).samples, 3);
        assert!(f.histogram(5).is_none());
    }

    #[test]
    fn histogram_binning_edges() {
        let h = Histogram {
            lo: 0.0,
            hi: 10.0,
            integer: false,
            counts: vec![0; 5],
        };
        assert_eq!(h.bin(0.0), 0);
        assert_eq!(h.bin(1.999), 0);
        assert_eq!(h.bin(2.0), 1);
        assert_eq!(h.bin(9.999), 4);
        assert_eq!(h.bin(10.0), 4, "the last bin includes hi");
        assert_eq!(h.bin(-5.0), 0);
        assert_eq!(h.bin(50.0), 4);
        // Extreme ranges do not overflow.
        let wide = Histogram {
            lo: -f64::MAX,
            hi: f64::MAX,
            integer: false,
            counts: vec![0; 4],
        };
        assert_eq!(wide.bin(0.0), 2);
        assert_eq!(wide.bin(f64::MAX), 3);
        // One value repeated: a range around it, everything in the middle bin.
        let mut s = Stats::default();
        feed(&mut s, &[vec![("c", vec![2.5])], vec![("c", vec![2.5])]]);
        let h = s.fields()[0].histogram(3).expect("histogram");
        assert_eq!(h.counts, [0, 2, 0]);
        assert!(h.lo < 2.5 && h.hi > 2.5);
    }

    #[test]
    fn over_the_cap_a_binning_pass_gives_the_same_histogram() {
        let data: Vec<Vec<(&str, Vec<f64>)>> = (0..1000)
            .map(|i| vec![("energy", vec![((i * 37) % 101) as f64 * 0.37])])
            .collect();
        let mut full = Stats::default();
        feed(&mut full, &data);
        let expected = full.fields()[0].histogram(20).expect("histogram");

        let mut small = Stats::with_cap(100);
        feed(&mut small, &data);
        let f = &small.fields()[0];
        assert!(f.needs_binning());
        assert!(f.histogram(20).is_none());
        let mut binner = Binner::for_stats(&small, 20);
        assert!(!binner.is_empty());
        feed(&mut binner, &data);
        let sums = small.summaries(20, &binner.histograms);
        assert_eq!(sums[0].histogram.as_ref(), Some(&expected));
        assert_eq!(sums[0].mean, full.summaries(20, &HashMap::new())[0].mean);
    }

    #[test]
    fn absorb_combines_datasets() {
        let mut a = Stats::default();
        feed(&mut a, &dataset());
        a.add_problem("a.jsonl:line 3", "bad");
        let mut b = Stats::default();
        feed(&mut b, &dataset()[..5]);
        let mut all = Stats::default();
        all.absorb(a);
        all.absorb(b);
        assert_eq!(all.samples_seen(), 15);
        assert_eq!(all.problem_count(), 1);
        let sums = all.summaries(20, &HashMap::new());
        assert_eq!(sums[0].count, 15);
        assert_eq!(sums[0].histogram.as_ref().expect("histogram").total(), 15);
        assert_eq!(sums[1].count, 45);
        // Over the cap while combining: marked for binning.
        let mut a = Stats::default();
        feed(&mut a, &dataset());
        let mut small = Stats::with_cap(12);
        small.absorb(a.clone());
        assert!(!small.fields()[0].needs_binning());
        small.absorb(a);
        assert!(small.fields()[0].needs_binning());
    }

    #[test]
    fn problems_are_capped_but_counted() {
        let mut s = Stats::default();
        for i in 0..(MAX_KEPT_PROBLEMS + 5) {
            s.problem(&format!("f:line {i}"), "broken");
        }
        assert_eq!(s.problems().len(), MAX_KEPT_PROBLEMS);
        assert_eq!(s.problem_count(), MAX_KEPT_PROBLEMS as u64 + 5);
        assert_eq!(s.problems()[0].path, "f:line 0");
    }
}
