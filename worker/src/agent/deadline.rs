//! The end of the allocation a worker runs in (a Slurm job's time limit, `--end-time`): a
//! round that cannot finish before it is not taken, so that the allocation's end does not kill
//! rounds half-way and waste their GPU time.
//!
//! What a round will take is not known before it is leased; the estimate is the longest round
//! this worker has run so far, with a tenth more and a fixed margin for its upload and report.
//! Before the first round nothing is known and only the margin counts. Once the time left is
//! shorter, every agent of the worker drains: running rounds finish and report, nothing new is
//! taken, and the worker exits 0 before the allocation ends.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Time kept free after a round for its upload and report.
pub const MARGIN: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub struct Deadline {
    end: SystemTime,
    longest: Mutex<Duration>,
}

impl Deadline {
    pub fn new(end: SystemTime) -> Self {
        Deadline {
            end,
            longest: Mutex::new(Duration::ZERO),
        }
    }

    /// When the allocation ends.
    pub fn end(&self) -> SystemTime {
        self.end
    }

    /// Records how long a round ran.
    pub fn observe(&self, took: Duration) {
        let mut longest = self.longest.lock().unwrap_or_else(|p| p.into_inner());
        *longest = (*longest).max(took);
    }

    /// Why no round may be taken at `now`, or `None` while one still fits.
    pub fn refuses(&self, now: SystemTime) -> Option<String> {
        let longest = *self.longest.lock().unwrap_or_else(|p| p.into_inner());
        let need = longest + longest / 10 + MARGIN;
        let left = self.end.duration_since(now).unwrap_or(Duration::ZERO);
        (left < need).then(|| {
            format!(
                "the allocation ends in {} s, too soon for another round (the longest so far took {} s; {} s are kept for upload and report)",
                left.as_secs(),
                longest.as_secs(),
                MARGIN.as_secs()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_taken_only_while_the_longest_so_far_still_fits() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let d = Deadline::new(now + Duration::from_secs(100));
        // Nothing run yet: only the margin counts.
        assert_eq!(d.refuses(now), None);
        assert!(d.refuses(now + Duration::from_secs(90)).is_some());
        d.observe(Duration::from_secs(60));
        d.observe(Duration::from_secs(20));
        // 60 s + 6 s + 15 s = 81 s needed.
        assert_eq!(d.refuses(now + Duration::from_secs(19)), None);
        let why = d.refuses(now + Duration::from_secs(20)).unwrap_or_default();
        assert!(
            why.contains("ends in 80 s") && why.contains("took 60 s"),
            "{why}"
        );
        // Past the end.
        assert!(d.refuses(now + Duration::from_secs(200)).is_some());
    }
}
