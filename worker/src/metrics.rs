//! The worker's Prometheus metrics (served on `worker --metrics-listen`). Labels are the GPU
//! (`gpu`, `uuid`) and outcomes; never a job, seed or round.

use std::sync::Arc;
use std::time::Duration;

use quarry_common::metrics::{Counter, DURATION_BUCKETS, Histogram, LATENCY_BUCKETS, Registry};

use crate::gpu::{GpuInfo, GpuSample, Health};

/// Every metric the agents of one worker process update.
pub struct WorkerMetrics {
    pub registry: Arc<Registry>,
    idle_gap: Histogram,
    generator: Histogram,
    upload_bytes: Counter,
    store_errors: Counter,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics::new(Registry::new())
    }
}

/// What became of a round the agent held.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Committed,
    Failed,
    Released,
    Rejected,
}

/// Why an agent started its warm generator (`quarry_worker_generator_starts_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartReason {
    /// The agent's first warm round, or the first after a start failed.
    First,
    /// The process died or was stopped during a round (crash, timeout, cancel, lease lost).
    Died,
    /// It exited between rounds.
    Exited,
    /// `recycle_after_rounds` reached.
    Recycle,
    /// `recycle_above_memory_mib` exceeded.
    Memory,
    /// `recycle_above_gpu_memory_mib` exceeded.
    GpuMemory,
    /// A round of another generator (argv, cwd or environment) came.
    OtherGenerator,
    /// A cold re-run for the determinism audit.
    Audit,
}

impl StartReason {
    pub fn label(self) -> &'static str {
        match self {
            StartReason::First => "first",
            StartReason::Died => "died",
            StartReason::Exited => "exited",
            StartReason::Recycle => "recycle",
            StartReason::Memory => "memory",
            StartReason::GpuMemory => "gpu_memory",
            StartReason::OtherGenerator => "other_generator",
            StartReason::Audit => "audit",
        }
    }
}

impl WorkerMetrics {
    /// A warm generator started on `gpu`, and why.
    pub fn generator_started(&self, gpu: &str, reason: StartReason) {
        self.registry
            .counter(
                "quarry_worker_generator_starts_total",
                "Warm generator processes started, by GPU and reason (first, died, exited, recycle, memory, gpu_memory, other_generator, audit).",
                &[("gpu", gpu), ("reason", reason.label())],
            )
            .inc();
    }

    /// A determinism audit's outcome: `matched`, `differed` or `inconclusive`.
    pub fn audit(&self, outcome: &str) {
        self.registry
            .counter(
                "quarry_worker_audits_total",
                "Warm rounds re-run cold for the determinism audit, by outcome (matched, differed, inconclusive).",
                &[("outcome", outcome)],
            )
            .inc();
    }

    pub fn new(registry: Arc<Registry>) -> WorkerMetrics {
        let r = &registry;
        WorkerMetrics {
            idle_gap: r.histogram(
                "quarry_worker_idle_gap_seconds",
                "GPU idle time between the end of one generator run and the start of the next.",
                &[],
                LATENCY_BUCKETS,
            ),
            generator: r.histogram(
                "quarry_worker_generator_seconds",
                "Wall time of one generator run.",
                &[],
                DURATION_BUCKETS,
            ),
            upload_bytes: r.counter(
                "quarry_worker_upload_bytes_total",
                "Bytes of round outputs uploaded to the object store.",
                &[],
            ),
            store_errors: r.counter(
                "quarry_store_errors_total",
                "Object-store requests that failed, by side (coordinator or worker).",
                &[("side", "worker")],
            ),
            registry,
        }
    }

    pub fn round(&self, outcome: Outcome) {
        let name = match outcome {
            Outcome::Committed => "committed",
            Outcome::Failed => "failed",
            Outcome::Released => "released",
            Outcome::Rejected => "rejected",
        };
        self.registry
            .counter(
                "quarry_worker_rounds_total",
                "Rounds the agents finished, by outcome.",
                &[("outcome", name)],
            )
            .inc();
    }

    pub fn idle_gap(&self, d: Duration) {
        self.idle_gap.observe_duration(d);
    }

    pub fn generator(&self, d: Duration) {
        self.generator.observe_duration(d);
    }

    pub fn uploaded(&self, bytes: u64) {
        self.upload_bytes.add(bytes as f64);
    }

    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    /// The GPU gauges from one health sample (absent figures are left out).
    pub fn gpu(&self, gpu: &GpuInfo, sample: &GpuSample) {
        let uuid = gpu.uuid.clone().unwrap_or_default();
        let labels = [("gpu", gpu.id.as_str()), ("uuid", uuid.as_str())];
        let r = &self.registry;
        let set = |name: &str, help: &str, v: Option<f64>| {
            if let Some(v) = v {
                r.gauge(name, help, &labels).set(v);
            }
        };
        set(
            "quarry_gpu_utilization_ratio",
            "GPU utilization, 0 to 1.",
            sample.utilization_pct.map(|p| f64::from(p) / 100.0),
        );
        set(
            "quarry_gpu_memory_used_bytes",
            "GPU memory in use (the whole device).",
            sample.memory_used_mib.map(|m| (m as f64) * 1048576.0),
        );
        set(
            "quarry_gpu_memory_total_bytes",
            "GPU memory in all.",
            gpu.memory_total_mib.map(|m| (m as f64) * 1048576.0),
        );
        set(
            "quarry_gpu_temperature_celsius",
            "GPU temperature.",
            sample.temperature_c.map(f64::from),
        );
        set(
            "quarry_gpu_power_watts",
            "GPU power draw.",
            sample.power_w.map(f64::from),
        );
        set(
            "quarry_gpu_healthy",
            "1 healthy, 0 unhealthy (uncorrectable ECC errors, a critical XID); absent when unknown.",
            match &sample.health {
                Health::Healthy => Some(1.0),
                Health::Unhealthy(_) => Some(0.0),
                _ => None,
            },
        );
    }
}
