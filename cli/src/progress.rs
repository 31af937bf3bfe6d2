//! Progress while a job runs: bars on a terminal (overall, plus the objects in flight), plain
//! periodic lines otherwise; and the summary printed at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use quarry_proto::v1 as pb;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// Bars on a terminal, lines otherwise.
    Auto,
    Bars,
    Lines,
    Off,
}

/// Most object bars shown at once; the rest are summed in the overall bar.
const MAX_OBJECT_BARS: usize = 8;
const LINE_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    mode: ProgressMode,
    multi: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    objects: Vec<(String, ProgressBar)>,
    last_line: Option<Instant>,
    started: Instant,
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Self {
        let mode = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bars,
            ProgressMode::Auto => ProgressMode::Lines,
            m => m,
        };
        Progress {
            mode,
            multi: None,
            overall: None,
            objects: Vec::new(),
            last_line: None,
            started: Instant::now(),
        }
    }

    /// Shows a status; cheap to call often.
    pub fn update(&mut self, s: &pb::JobStatus) {
        match self.mode {
            ProgressMode::Bars => self.bars(s),
            ProgressMode::Lines => {
                let due = self.last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY);
                if due || s.state != pb::JobState::Running as i32 {
                    self.last_line = Some(Instant::now());
                    eprintln!("{}", line(s, self.started.elapsed()));
                }
            }
            _ => {}
        }
    }

    fn bars(&mut self, s: &pb::JobStatus) {
        let multi = self.multi.get_or_insert_with(|| {
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4))
        });
        let overall = self.overall.get_or_insert_with(|| {
            let b = multi.add(ProgressBar::new(s.samples_target));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:40.cyan/blue}] {pos}/{len} samples  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix("all objects");
            b
        });
        overall.set_length(s.samples_target);
        overall.set_position(s.samples_collected);
        overall.set_message(rate_eta(s, self.started.elapsed()));
        // Bars for the objects being worked on; finished ones leave.
        let active: Vec<&pb::ObjectStatus> = s
            .objects
            .iter()
            .filter(|o| {
                o.state == pb::ObjectState::Running as i32
                    || o.state == pb::ObjectState::Merging as i32
            })
            .take(MAX_OBJECT_BARS)
            .collect();
        self.objects.retain(|(name, bar)| {
            let keep = active.iter().any(|o| &o.name == name);
            if !keep {
                bar.finish_and_clear();
                multi.remove(bar);
            }
            keep
        });
        for o in active {
            let bar = match self.objects.iter().find(|(n, _)| n == &o.name) {
                Some((_, b)) => b.clone(),
                None => {
                    let b = multi.add(ProgressBar::new(o.target));
                    b.set_style(
                        ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len}  {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                    b.set_prefix(truncate(&o.name, 12));
                    self.objects.push((o.name.clone(), b.clone()));
                    b
                }
            };
            bar.set_position(o.collected);
            let mut msg = format!(
                "{} rounds, {} running",
                o.rounds_committed, o.rounds_in_flight
            );
            if o.state == pb::ObjectState::Merging as i32 {
                msg = "merging".into();
            }
            if o.failed_attempts > 0 {
                msg.push_str(&format!(", {} failed", o.failed_attempts));
            }
            bar.set_message(msg);
        }
    }

    /// Clears the bars before the summary is printed.
    pub fn finish(&mut self) {
        for (_, b) in self.objects.drain(..) {
            b.finish_and_clear();
        }
        if let Some(b) = self.overall.take() {
            b.finish_and_clear();
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

fn rate_eta(s: &pb::JobStatus, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = s.samples_this_session as f64 / secs;
    let left = s.samples_target.saturating_sub(s.samples_collected);
    let eta = if rate > 0.0 {
        format_duration(Duration::from_secs_f64(left as f64 / rate))
    } else {
        "?".into()
    };
    let done = s
        .objects
        .iter()
        .filter(|o| o.state == pb::ObjectState::Done as i32)
        .count();
    format!(
        "{rate:.1} samples/s, ETA {eta}, objects {done}/{}",
        s.objects.len()
    )
}

/// One plain progress line.
pub fn line(s: &pb::JobStatus, elapsed: Duration) -> String {
    let pct = if s.samples_target > 0 {
        100.0 * s.samples_collected as f64 / s.samples_target as f64
    } else {
        100.0
    };
    let yield_part = success_rate(s.attempts, s.successes)
        .map(|r| format!(", success {r}"))
        .unwrap_or_default();
    format!(
        "[{}] {}/{} samples ({pct:.1}%), {} rounds committed, {} running, {} failed attempts, {} quarantined{yield_part}; {}",
        s.job_id,
        s.samples_collected,
        s.samples_target,
        s.rounds_committed,
        s.rounds_in_flight,
        s.failed_attempts,
        s.rounds_quarantined,
        rate_eta(s, elapsed)
    )
}

/// `successes/attempts (rate%)`, or `None` when no round reported a yield.
pub fn success_rate(attempts: u64, successes: u64) -> Option<String> {
    quarry_coordinator::state::RoundYield::rate(attempts, successes)
        .map(|r| format!("{successes}/{attempts} ({:.1}%)", 100.0 * r))
}

pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The end-of-job summary.
pub fn summary(s: &pb::JobStatus, wall: Duration, agents: usize) -> String {
    let state = pb::JobState::try_from(s.state)
        .map_or("unknown".into(), |st| format!("{st:?}").to_lowercase());
    let gen_secs = s.generator_ms as f64 / 1000.0;
    let capacity = wall.as_secs_f64() * agents.max(1) as f64;
    let busy = if capacity > 0.0 {
        100.0 * gen_secs / capacity
    } else {
        0.0
    };
    let overhead = if s.rounds_committed > 0 && agents > 0 {
        let per = (capacity - gen_secs).max(0.0) / f64::from(s.rounds_committed);
        format!("{:.1} ms per round", per * 1000.0)
    } else {
        "n/a".into()
    };
    let mut out = format!(
        "job {}: {state}\n  samples   {} of {} ({} objects)\n  rounds    {} committed, {} failed attempts, {} quarantined\n  time      wall {}, generator {} over {agents} agent(s) ({busy:.0}% busy), agent time outside the generator {overhead}",
        s.job_id,
        s.samples_collected,
        s.samples_target,
        s.objects.len(),
        s.rounds_committed,
        s.failed_attempts,
        s.rounds_quarantined,
        format_duration(wall),
        format_duration(Duration::from_secs_f64(gen_secs)),
    );
    if let Some(rate) = success_rate(s.attempts, s.successes) {
        out.push_str(&format!("\n  yield     {rate} successful trials"));
    }
    if s.rounds_audited > 0 {
        out.push_str(&format!(
            "\n  audit     {} committed warm round(s) re-run cold and matched",
            s.rounds_audited
        ));
    }
    if !s.message.is_empty() {
        out.push_str(&format!("\n  {}", s.message));
    }
    for o in s
        .objects
        .iter()
        .filter(|o| o.state == pb::ObjectState::Exhausted as i32)
    {
        out.push_str(&format!(
            "\n  warning: {} ran out of rounds with {} of {} samples (raise --max_rounds or check quarantines in the manifest)",
            o.name, o.collected, o.target
        ));
    }
    out
}
