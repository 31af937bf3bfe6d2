//! The in-memory picture of a job: per object, which rounds are committed, quarantined,
//! in flight or waiting to retry, and what the scheduler may hand out next. Pure logic, no
//! I/O: the coordinator loads it from the state store and applies every durable change to it.
//!
//! The task list is never materialized: an object is `next_round` plus a few small sets.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::spec::JobSpec;
use crate::state::{
    CommitRecord, JobState, MergeRecord, ObjectRecord, QuarantineRecord, RoundYield,
};

/// Schema `npy::inspect` gives an object array with no elements; compatible with any object array.
pub const EMPTY_OBJECT_SCHEMA: &str = "npy object empty";

/// Whether a round's schema may join an object whose earlier rounds have `expected`: equal, or
/// an empty dataset of the same format (whose sample layout is unknown).
pub fn schema_compatible(expected: &str, got: &str) -> bool {
    if expected == got {
        return true;
    }
    let Some(prefix) = got.strip_suffix(quarry_formats::EMPTY_SCHEMA_SUFFIX) else {
        return false;
    };
    // `npy object empty` fits object arrays only, not numeric `npy <f4 ...` ones.
    expected.starts_with(prefix)
}

/// Where an object stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Rounds are being generated.
    Running,
    /// The committed prefix covers the quota (or rounds ran out); the final is being written.
    Merging,
    /// The final is written and intermediates cleaned up.
    Done { complete: bool },
}

/// One object of a running job.
#[derive(Debug)]
pub struct ObjectRt {
    pub index: usize,
    pub name: String,
    pub commits: BTreeMap<u32, CommitRecord>,
    pub quarantined: BTreeMap<u32, QuarantineRecord>,
    /// Failed attempts per round still in play (not committed, not quarantined).
    pub failures: HashMap<u32, u32>,
    /// Failed attempts over the object's life, for status.
    pub failed_attempts: u32,
    /// Rounds waiting to be re-issued, with the instant they become ready.
    pub retry: BTreeMap<u32, Instant>,
    /// Rounds with a live lease, with how many leases each.
    pub in_flight: BTreeMap<u32, u32>,
    /// Every round below this one has been issued at least once.
    pub next_round: u32,
    /// Attempts issued per round in this coordinator epoch.
    pub attempt_seq: HashMap<u32, u32>,
    pub phase: Phase,
    /// The final's record once written (kept here so the manifest needs no state reads).
    pub merge: Option<MergeRecord>,
    /// Kept up to date by `apply_commit`/`apply_quarantine` so that the scheduler's questions
    /// (how much is committed, is the prefix ready to merge) cost O(1) per call, not a walk over
    /// every commit.
    tally: Tally,
}

/// Sums over an object's commits, maintained as they are applied.
#[derive(Debug, Clone, Default)]
struct Tally {
    /// Samples counting toward the quota over every committed round.
    committed: u64,
    /// The first round that is neither committed nor quarantined.
    prefix: u32,
    /// Samples counting toward the quota in rounds below `prefix`.
    prefix_committed: u64,
    /// Attempts and successes over committed rounds that report a yield.
    yields: RoundYield,
}

impl Tally {
    fn of(
        commits: &BTreeMap<u32, CommitRecord>,
        quarantined: &BTreeMap<u32, QuarantineRecord>,
    ) -> Tally {
        let mut t = Tally::default();
        for c in commits.values() {
            t.count(c);
        }
        t.advance(commits, quarantined);
        t
    }

    /// Adds a newly committed round to the sums over every commit.
    fn count(&mut self, c: &CommitRecord) {
        self.committed += c.quota_count();
        if let Some(y) = c.yield_stats {
            self.yields.attempts += y.attempts;
            self.yields.successes += y.successes;
        }
    }

    /// Moves `prefix` past every resolved round.
    fn advance(
        &mut self,
        commits: &BTreeMap<u32, CommitRecord>,
        quarantined: &BTreeMap<u32, QuarantineRecord>,
    ) {
        loop {
            if let Some(c) = commits.get(&self.prefix) {
                self.prefix_committed += c.quota_count();
            } else if !quarantined.contains_key(&self.prefix) {
                return;
            }
            self.prefix += 1;
        }
    }
}

/// What the merge of an object must do.
#[derive(Debug, Clone, PartialEq)]
pub struct MergePlan {
    /// Committed rounds in round order, each taken whole except maybe the last.
    pub rounds: Vec<CommitRecord>,
    /// Samples the final holds: the quota, or fewer when rounds ran out.
    pub limit: u64,
    pub complete: bool,
}

impl ObjectRt {
    /// Rebuilds an object from its stored record. Rounds below the highest recorded one that
    /// have no outcome were in flight when the coordinator stopped: they are re-issued first.
    pub fn from_record(index: usize, name: &str, rec: ObjectRecord, now: Instant) -> Self {
        let mut failures = HashMap::new();
        let mut failed_attempts = 0;
        for (round, list) in &rec.failures {
            failed_attempts += list.len() as u32;
            if !rec.commits.contains_key(round) && !rec.quarantined.contains_key(round) {
                failures.insert(*round, list.len() as u32);
            }
        }
        let highest = rec
            .commits
            .keys()
            .chain(rec.quarantined.keys())
            .chain(rec.failures.keys())
            .max()
            .copied();
        let next_round = highest.map_or(0, |h| h + 1);
        let mut retry = BTreeMap::new();
        for r in 0..next_round {
            if !rec.commits.contains_key(&r) && !rec.quarantined.contains_key(&r) {
                retry.insert(r, now);
            }
        }
        let phase = match &rec.merge {
            Some(m) if m.cleaned => Phase::Done {
                complete: m.complete,
            },
            _ => Phase::Running,
        };
        ObjectRt {
            index,
            name: name.to_string(),
            tally: Tally::of(&rec.commits, &rec.quarantined),
            commits: rec.commits,
            quarantined: rec.quarantined,
            failures,
            failed_attempts,
            retry,
            in_flight: BTreeMap::new(),
            next_round,
            attempt_seq: HashMap::new(),
            phase,
            merge: rec.merge,
        }
    }

    /// Samples committed, over all committed rounds (a gap may still be open).
    pub fn committed_samples(&self) -> u64 {
        self.tally.committed
    }

    /// Attempts and successes summed over committed rounds that report a yield.
    pub fn yields(&self) -> RoundYield {
        self.tally.yields
    }

    /// Samples that count toward the quota now: the committed prefix, capped.
    pub fn collected(&self, quota: u64) -> u64 {
        self.committed_samples().min(quota)
    }

    fn expected_yield(&self, spec: &JobSpec) -> u64 {
        if self.commits.is_empty() {
            spec.round_batch_size.max(1)
        } else {
            (self.committed_samples() / self.commits.len() as u64).max(1)
        }
    }

    /// The round to run next for this object, if any may be issued now.
    ///
    /// Retries come first (they block the deterministic prefix). New rounds are capped so
    /// that rounds in flight roughly cover what is still missing, using the yield learned
    /// from committed rounds, which bounds wasted rounds near the quota.
    pub fn next_to_issue(&self, spec: &JobSpec, now: Instant) -> Option<u32> {
        if self.phase != Phase::Running {
            return None;
        }
        if let Some((&r, _)) = self.retry.iter().find(|(_, at)| **at <= now) {
            return Some(r);
        }
        let committed = self.committed_samples();
        let quota = spec.target_count_per_object;
        if committed >= quota {
            return None;
        }
        let pending = self.in_flight.len() as u64 + self.retry.len() as u64;
        let want = (quota - committed).div_ceil(self.expected_yield(spec));
        if pending < want && u64::from(self.next_round) < spec.round_cap() {
            Some(self.next_round)
        } else {
            None
        }
    }

    /// Records that `round` was leased; returns the attempt number within this epoch.
    pub fn issue(&mut self, round: u32) -> u32 {
        self.retry.remove(&round);
        if round >= self.next_round {
            self.next_round = round + 1;
        }
        *self.in_flight.entry(round).or_insert(0) += 1;
        let seq = self.attempt_seq.entry(round).or_insert(0);
        let a = *seq;
        *seq += 1;
        a
    }

    /// A lease of `round` ended (completed, failed, released or expired).
    pub fn lease_ended(&mut self, round: u32) {
        if let Some(n) = self.in_flight.get_mut(&round) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&round);
            }
        }
    }

    pub fn resolved(&self, round: u32) -> bool {
        self.commits.contains_key(&round) || self.quarantined.contains_key(&round)
    }

    pub fn apply_commit(&mut self, commit: CommitRecord) {
        self.failures.remove(&commit.round);
        self.retry.remove(&commit.round);
        self.tally.count(&commit);
        if self.commits.insert(commit.round, commit).is_some() {
            // A round's commit replaced (never in practice: a round commits once): recount.
            self.tally = Tally::of(&self.commits, &self.quarantined);
        } else {
            self.tally.advance(&self.commits, &self.quarantined);
        }
    }

    pub fn apply_failure(&mut self, round: u32, failures: u32) {
        self.failed_attempts += 1;
        self.failures.insert(round, failures);
    }

    /// Schedules a retry of a failed round after `backoff`.
    pub fn schedule_retry(&mut self, round: u32, at: Instant) {
        if !self.resolved(round) {
            self.retry.insert(round, at);
        }
    }

    /// A round given back without failing (drain): re-issued at once.
    pub fn requeue(&mut self, round: u32, now: Instant) {
        if !self.resolved(round) && !self.in_flight.contains_key(&round) {
            self.retry.insert(round, now);
        }
    }

    pub fn apply_quarantine(&mut self, q: QuarantineRecord) {
        self.failures.remove(&q.round);
        self.retry.remove(&q.round);
        self.quarantined.insert(q.round, q);
        self.tally.advance(&self.commits, &self.quarantined);
    }

    /// A committed round whose files could not be merged is quarantined instead: its commit
    /// leaves the plan (and the sums), so the next round takes its place.
    pub fn quarantine_committed(&mut self, q: QuarantineRecord) {
        self.commits.remove(&q.round);
        self.failures.remove(&q.round);
        self.retry.remove(&q.round);
        self.quarantined.insert(q.round, q);
        self.tally = Tally::of(&self.commits, &self.quarantined);
    }

    /// The schema of the object's sample files, fixed by its first committed round that has
    /// samples (an empty object array says nothing about its keys).
    pub fn schema(&self) -> Option<&str> {
        self.commits
            .values()
            .filter_map(|c| c.files.first())
            .map(|f| f.schema.as_str())
            .find(|s| !s.ends_with(quarry_formats::EMPTY_SCHEMA_SUFFIX))
    }

    /// When the object is ready to merge: the resolved prefix 0..=k covers the quota, or every
    /// round up to the cap is resolved. Deterministic: it depends only on which rounds are
    /// committed (and their counts) and which are quarantined, never on timing.
    pub fn merge_plan(&self, spec: &JobSpec) -> Option<MergePlan> {
        if self.phase != Phase::Running {
            return None;
        }
        let quota = spec.target_count_per_object;
        let cap = spec.round_cap();
        // Not ready until the resolved prefix covers the quota or reaches the cap (O(1)).
        if self.tally.prefix_committed < quota && u64::from(self.tally.prefix) < cap {
            return None;
        }
        self.walk_plan(spec)
    }

    /// The merge plan decided by a walk over the rounds in order (what `merge_plan` builds
    /// once its running tally says the object is ready).
    fn walk_plan(&self, spec: &JobSpec) -> Option<MergePlan> {
        let quota = spec.target_count_per_object;
        let cap = spec.round_cap();
        let mut rounds = Vec::new();
        let mut sum = 0u64;
        let mut r: u64 = 0;
        while r < cap {
            let round = r as u32;
            if let Some(c) = self.commits.get(&round) {
                rounds.push(c.clone());
                sum += c.quota_count();
                if sum >= quota {
                    return Some(MergePlan {
                        rounds,
                        limit: quota,
                        complete: true,
                    });
                }
            } else if !self.quarantined.contains_key(&round) {
                return None;
            }
            r += 1;
        }
        Some(MergePlan {
            rounds,
            limit: sum,
            complete: false,
        })
    }
}

/// A job as the coordinator runs it.
#[derive(Debug)]
pub struct JobRt {
    pub spec: JobSpec,
    pub objects: Vec<ObjectRt>,
    pub state: JobState,
    pub created_unix_ms: u64,
    pub started: Instant,
    /// Sum of generator time of rounds committed in this coordinator's life.
    pub generator_ms: u64,
    pub samples_this_session: u64,
    /// Why the job stopped on its own, when it did.
    pub message: String,
    /// The first determinism audit that failed (`generator.audit`), naming the round and
    /// both hashes: it stopped the job.
    pub audit_failure: Option<String>,
}

/// A job whose first rounds are all quarantined is stopped: the generator is failing on
/// everything (wrong directory, missing interpreter, a bug) and more rounds only burn seeds.
pub const FAILING_JOB_QUARANTINES: usize = 3;

impl JobRt {
    /// Whether round `round` of `object` is re-run cold to audit its warm run: warm mode
    /// and picked by `generator.audit`. A committed audited round passed its audit (a
    /// worker fails an attempt whose audit did not).
    pub fn audited(&self, object: &str, round: u32) -> bool {
        self.spec.generator.is_warm() && self.spec.audited(object, round)
    }

    /// Committed rounds that passed their audit.
    pub fn rounds_audited(&self) -> u32 {
        if !self.spec.generator.is_warm() || self.spec.generator.audit.is_none() {
            return 0;
        }
        self.objects
            .iter()
            .map(|o| {
                o.commits
                    .keys()
                    .filter(|r| self.spec.audited(&o.name, **r))
                    .count() as u32
            })
            .sum()
    }

    /// True when no round ever committed and enough rounds were quarantined to call the
    /// generator broken.
    pub fn generator_broken(&self) -> bool {
        let committed: usize = self.objects.iter().map(|o| o.commits.len()).sum();
        let quarantined: usize = self.objects.iter().map(|o| o.quarantined.len()).sum();
        committed == 0 && quarantined >= FAILING_JOB_QUARANTINES
    }

    pub fn finished(&self) -> bool {
        self.objects
            .iter()
            .all(|o| matches!(o.phase, Phase::Done { .. }))
    }

    /// Done when every object reached its quota, Incomplete when some ran out of rounds.
    pub fn end_state(&self) -> JobState {
        if self
            .objects
            .iter()
            .all(|o| o.phase == Phase::Done { complete: true })
        {
            JobState::Done
        } else {
            JobState::Incomplete
        }
    }
}

/// Backoff before retry `n` (1-based): base * 2^(n-1), capped at 60 s.
pub fn backoff(base_ms: u64, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_millis(base_ms.saturating_mul(1 << exp).min(60_000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FinalDirMode, JobSpec};

    fn spec(quota: u64, batch: u64, cap: Option<u64>) -> JobSpec {
        JobSpec {
            exp_name: "e".into(),
            objects: vec!["o".into()],
            target_count_per_object: quota,
            round_batch_size: batch,
            num_iterations: 1,
            seed_base: 0,
            seed_stride: 100_000,
            max_rounds: cap,
            final_dir_mode: FinalDirMode::SeedOnly,
            keep_intermediate: false,
            retries: 2,
            retry_backoff_ms: 10,
            root: "/r".into(),
            generator: JobSpec::legacy_generator(),
            merge: Default::default(),
        }
    }

    fn commit(round: u32, count: u64) -> CommitRecord {
        CommitRecord {
            round,
            seed: i64::from(round),
            attempt: "e1a0".into(),
            count,
            files: vec![],
            worker: "w".into(),
            generator_ms: 1,
            committed_unix_ms: 0,
            gpu: None,
            log_key: None,
            kept: None,
            yield_stats: None,
        }
    }

    #[test]
    fn filtered_rounds_count_only_their_kept_samples_and_yields_add_up() {
        let s = spec(100, 50, None);
        let now = Instant::now();
        let mut o = ObjectRt::from_record(0, "o", ObjectRecord::default(), now);
        for (round, kept) in [(0, 30), (1, 30), (2, 30)] {
            o.apply_commit(CommitRecord {
                kept: Some(kept),
                yield_stats: Some(RoundYield {
                    attempts: 80,
                    successes: 50,
                }),
                ..commit(round, 50)
            });
        }
        // 150 samples written but only 90 pass the filter: not enough for the quota yet,
        // and the scheduler expects 30 per round from now on.
        assert_eq!(o.merge_plan(&s), None);
        assert_eq!(o.collected(100), 90);
        assert_eq!(o.expected_yield(&s), 30);
        let y = o.yields();
        assert_eq!((y.attempts, y.successes), (240, 150));
        o.apply_commit(CommitRecord {
            kept: Some(20),
            ..commit(3, 50)
        });
        let p = o.merge_plan(&s).unwrap();
        assert_eq!((p.rounds.len(), p.limit, p.complete), (4, 100, true));
    }

    fn quarantine(round: u32) -> QuarantineRecord {
        QuarantineRecord {
            round,
            seed: 0,
            reason: "x".into(),
            log_tail: String::new(),
            attempts: 3,
            unix_ms: 0,
        }
    }

    #[test]
    fn the_running_tally_agrees_with_a_walk_over_every_commit() {
        // Outcomes arrive out of order; quarantines open and close gaps; one object reaches
        // the quota, the other runs into its round cap.
        for (quota, cap) in [(100, None), (1000, Some(12))] {
            let s = spec(quota, 10, cap);
            let now = Instant::now();
            let mut o = ObjectRt::from_record(0, "o", ObjectRecord::default(), now);
            let order = [5u32, 0, 3, 1, 9, 2, 7, 4, 11, 6, 10, 8, 13, 12];
            for (i, &r) in order.iter().enumerate() {
                if u64::from(r) >= s.round_cap() {
                    continue;
                }
                if r % 4 == 2 {
                    o.apply_quarantine(quarantine(r));
                } else {
                    let mut c = commit(r, 7 + u64::from(r % 3) * 5);
                    // Some rounds report a yield, some do not.
                    c.yield_stats = (r % 2 == 1).then_some(RoundYield {
                        attempts: 20 + u64::from(r),
                        successes: c.count,
                    });
                    o.apply_commit(c);
                }
                let recount: u64 = o.commits.values().map(CommitRecord::quota_count).sum();
                assert_eq!(o.committed_samples(), recount, "after {} outcomes", i + 1);
                let yields = o.commits.values().filter_map(|c| c.yield_stats).fold(
                    RoundYield::default(),
                    |a, y| RoundYield {
                        attempts: a.attempts + y.attempts,
                        successes: a.successes + y.successes,
                    },
                );
                assert_eq!(o.yields(), yields, "after {} outcomes", i + 1);
                assert_eq!(
                    o.merge_plan(&s),
                    o.walk_plan(&s),
                    "after {} outcomes",
                    i + 1
                );
                // Rebuilt from the stored record (a restart), the tally is the same.
                let rec = ObjectRecord {
                    commits: o.commits.clone(),
                    quarantined: o.quarantined.clone(),
                    ..ObjectRecord::default()
                };
                let again = ObjectRt::from_record(0, "o", rec, now);
                assert_eq!(again.committed_samples(), recount);
                assert_eq!(again.yields(), yields);
                assert_eq!(again.merge_plan(&s), o.walk_plan(&s));
            }
            assert!(
                o.merge_plan(&s).is_some(),
                "quota {quota}: ready in the end"
            );
        }
    }

    #[test]
    fn in_flight_is_capped_by_what_is_missing() {
        let s = spec(100, 40, None);
        let now = Instant::now();
        let mut o = ObjectRt::from_record(0, "o", ObjectRecord::default(), now);
        // ceil(100/40) = 3 rounds may run at once.
        for expect in 0..3 {
            let r = o.next_to_issue(&s, now).unwrap();
            assert_eq!(r, expect);
            o.issue(r);
        }
        assert_eq!(o.next_to_issue(&s, now), None);
        o.lease_ended(0);
        o.apply_commit(commit(0, 40));
        // 60 missing, 2 in flight at ~40 each: enough.
        assert_eq!(o.next_to_issue(&s, now), None);
        o.lease_ended(1);
        o.apply_commit(commit(1, 10));
        // Yield learned: 25/round, 50 missing, 1 in flight: one more.
        assert_eq!(o.next_to_issue(&s, now), Some(3));
    }

    #[test]
    fn merge_waits_for_the_prefix_and_skips_quarantine() {
        let s = spec(100, 50, None);
        let now = Instant::now();
        let mut o = ObjectRt::from_record(0, "o", ObjectRecord::default(), now);
        o.apply_commit(commit(1, 50));
        o.apply_commit(commit(2, 50));
        assert_eq!(o.merge_plan(&s), None, "round 0 is unresolved");
        o.apply_quarantine(quarantine(0));
        let p = o.merge_plan(&s).unwrap();
        assert_eq!(
            p.rounds.iter().map(|c| c.round).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(p.limit, 100);
        assert!(p.complete);
    }

    #[test]
    fn rounds_running_out_gives_a_partial_merge() {
        let s = spec(100, 50, Some(2));
        let now = Instant::now();
        let mut o = ObjectRt::from_record(0, "o", ObjectRecord::default(), now);
        assert_eq!((o.issue(0), o.issue(1)), (0, 0));
        o.lease_ended(0);
        o.apply_commit(commit(0, 30));
        assert_eq!(o.merge_plan(&s), None);
        o.lease_ended(1);
        o.apply_quarantine(quarantine(1));
        let p = o.merge_plan(&s).unwrap();
        assert_eq!((p.limit, p.complete), (30, false));
        assert_eq!(o.next_to_issue(&s, now), None, "cap reached");
    }

    #[test]
    fn unresolved_rounds_below_the_highest_are_reissued_after_restart() {
        let s = spec(1000, 10, None);
        let now = Instant::now();
        let mut rec = ObjectRecord::default();
        rec.commits.insert(4, commit(4, 10));
        rec.quarantined.insert(2, quarantine(2));
        let o = ObjectRt::from_record(0, "o", rec, now);
        assert_eq!(o.next_round, 5);
        assert_eq!(o.retry.keys().copied().collect::<Vec<_>>(), vec![0, 1, 3]);
        assert_eq!(o.next_to_issue(&s, now), Some(0));
    }

    #[test]
    fn an_empty_round_fits_rounds_of_its_format_only() {
        assert!(schema_compatible("jsonl keys [a, b]", "jsonl empty"));
        assert!(schema_compatible(
            "hdf5 robomimic [actions <f4 (*,7)]",
            "hdf5 robomimic empty"
        ));
        assert!(!schema_compatible(
            "jsonl keys [a, b]",
            "hdf5 robomimic empty"
        ));
    }

    #[test]
    fn an_empty_object_round_fits_any_object_schema() {
        assert!(schema_compatible(
            "npy object dict keys [a]",
            EMPTY_OBJECT_SCHEMA
        ));
        assert!(!schema_compatible("npy <f4 (*, 3)", EMPTY_OBJECT_SCHEMA));
        assert!(!schema_compatible(
            "npy object dict keys [a]",
            "npy object dict keys [b]"
        ));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(100, 1), Duration::from_millis(100));
        assert_eq!(backoff(100, 3), Duration::from_millis(400));
        assert_eq!(backoff(100, 30), Duration::from_secs(60));
    }
}
