//! The coordinator's Prometheus metrics (served on `coordinator serve --metrics-listen`).

use std::sync::Arc;

use quarry_common::metrics::{
    Counter, DURATION_BUCKETS, Gauge, Histogram, LATENCY_BUCKETS, Registry,
};

/// Buckets of `quarry_complete_batch_rounds`: up to the 64 completions one call may carry.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Every metric the coordinator updates, registered once.
pub struct CoordMetrics {
    pub registry: Arc<Registry>,
    pub rounds_leased: Counter,
    pub rounds_committed: Counter,
    pub rounds_quarantined: Counter,
    pub rounds_released: Counter,
    pub rounds_duplicate: Counter,
    pub samples_committed: Counter,
    pub lease_expiries: Counter,
    pub acquire_seconds: Histogram,
    pub commit_seconds: Histogram,
    /// Completions per CompleteBatch call (a unary Complete is not counted).
    pub complete_batch_rounds: Histogram,
    pub merge_bytes: Counter,
    pub merge_seconds: Histogram,
    pub merges_failed: Counter,
    pub store_errors: Counter,
    pub leader: Gauge,
    pub workers: Gauge,
    pub rounds_in_flight: Gauge,
    pub jobs_running: Gauge,
}

impl std::fmt::Debug for CoordMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordMetrics").finish_non_exhaustive()
    }
}

impl CoordMetrics {
    pub fn new(registry: Arc<Registry>) -> CoordMetrics {
        let r = &registry;
        CoordMetrics {
            rounds_leased: r.counter(
                "quarry_rounds_leased_total",
                "Rounds handed to workers (attempts started).",
                &[],
            ),
            rounds_committed: r.counter(
                "quarry_rounds_committed_total",
                "Rounds committed (first commit of each round).",
                &[],
            ),
            rounds_quarantined: r.counter(
                "quarry_rounds_quarantined_total",
                "Rounds quarantined after exhausting their retries.",
                &[],
            ),
            rounds_released: r.counter(
                "quarry_rounds_released_total",
                "Leases given back by workers (drain, shutdown) and re-leased at once.",
                &[],
            ),
            rounds_duplicate: r.counter(
                "quarry_rounds_duplicate_total",
                "Attempts that finished after their round was resolved; their files were deleted.",
                &[],
            ),
            samples_committed: r.counter(
                "quarry_samples_committed_total",
                "Samples in committed rounds.",
                &[],
            ),
            lease_expiries: r.counter(
                "quarry_lease_expiries_total",
                "Leases that expired without a heartbeat (counted as failed attempts).",
                &[],
            ),
            acquire_seconds: r.histogram(
                "quarry_acquire_seconds",
                "Time from an agent's acquire call to its lease, for calls that got one.",
                &[],
                LATENCY_BUCKETS,
            ),
            commit_seconds: r.histogram(
                "quarry_commit_seconds",
                "Time to verify and commit a finished attempt.",
                &[],
                LATENCY_BUCKETS,
            ),
            complete_batch_rounds: r.histogram(
                "quarry_complete_batch_rounds",
                "Completions carried by one CompleteBatch call.",
                &[],
                BATCH_BUCKETS,
            ),
            merge_bytes: r.counter(
                "quarry_merge_bytes_total",
                "Bytes of finals written by merges.",
                &[],
            ),
            merge_seconds: r.histogram(
                "quarry_merge_seconds",
                "Duration of one object's merge.",
                &[],
                DURATION_BUCKETS,
            ),
            merges_failed: r.counter(
                "quarry_merges_failed_total",
                "Merge attempts that failed and are retried.",
                &[],
            ),
            store_errors: r.counter(
                "quarry_store_errors_total",
                "Object-store requests that failed, by side (coordinator or worker).",
                &[("side", "coordinator")],
            ),
            leader: r.gauge(
                "quarry_leader",
                "1 while this coordinator leads, 0 while it is a standby.",
                &[],
            ),
            workers: r.gauge(
                "quarry_workers",
                "Worker agents registered with this coordinator.",
                &[],
            ),
            rounds_in_flight: r.gauge("quarry_rounds_in_flight", "Leases outstanding.", &[]),
            jobs_running: r.gauge("quarry_jobs_running", "Jobs in the running state.", &[]),
            registry,
        }
    }

    /// A failed attempt of kind `kind` (`exit`, `timeout`, `lease_expired`, ...).
    pub fn failed(&self, kind: &str) {
        self.registry
            .counter(
                "quarry_rounds_failed_total",
                "Failed attempts, by kind.",
                &[("kind", kind)],
            )
            .inc();
    }
}

impl Default for CoordMetrics {
    fn default() -> Self {
        CoordMetrics::new(Registry::new())
    }
}
