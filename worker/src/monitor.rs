//! Samples one GPU periodically: the latest sample feeds heartbeats and the agent's decisions
//! (stop acquiring when unhealthy, wait for free memory); the samples taken while a generator
//! runs become that round's GPU figures.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use crate::gpu::{GpuInfo, GpuSample, Health, Inventory, RoundStats};

/// A handle on the sampler of one GPU; clones share it. The sampler stops when the last
/// handle is dropped.
#[derive(Clone)]
pub struct Monitor {
    inner: Arc<Inner>,
    _stop: Arc<DropGuard>,
}

struct Inner {
    inv: Arc<dyn Inventory>,
    gpu: GpuInfo,
    latest: watch::Sender<GpuSample>,
    /// Figures of the generator run in progress, if one is.
    round: Mutex<Option<RoundStats>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Monitor {
    /// Takes a first sample (so that a GPU unhealthy at startup never gets a round) and starts
    /// sampling every `every`.
    pub async fn start(inv: Arc<dyn Inventory>, gpu: GpuInfo, every: Duration) -> Monitor {
        let stop = CancellationToken::new();
        let m = Monitor {
            inner: Arc::new(Inner {
                inv,
                gpu,
                latest: watch::Sender::new(GpuSample::unknown()),
                round: Mutex::new(None),
            }),
            _stop: Arc::new(stop.clone().drop_guard()),
        };
        let first = m.sample_now().await;
        if let Health::Unhealthy(why) = &first.health {
            warn!(gpu = %m.inner.gpu.id, reason = %why, "GPU is unhealthy; this agent will not take rounds");
        }
        let inner = Arc::clone(&m.inner);
        tokio::spawn(async move {
            let mut previous = first.health;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                }
                let s = Inner::sample(&inner).await;
                if let Some(r) = lock(&inner.round).as_mut() {
                    r.add(&s);
                }
                if s.health != previous {
                    match &s.health {
                        Health::Unhealthy(why) => {
                            warn!(gpu = %inner.gpu.id, reason = %why, "GPU turned unhealthy; this agent stops taking rounds");
                        }
                        h => info!(gpu = %inner.gpu.id, health = %h, "GPU health changed"),
                    }
                    previous = s.health;
                }
            }
        });
        m
    }

    pub fn gpu(&self) -> &GpuInfo {
        &self.inner.gpu
    }

    /// The most recent sample.
    pub fn latest(&self) -> GpuSample {
        self.inner.latest.borrow().clone()
    }

    /// Resolves when the GPU is (or turns) unhealthy; pending forever otherwise.
    pub async fn unhealthy(&self) {
        let mut rx = self.inner.latest.subscribe();
        loop {
            if matches!(rx.borrow_and_update().health, Health::Unhealthy(_)) {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Samples now (off the async threads: NVML calls block) and records it as the latest.
    pub async fn sample_now(&self) -> GpuSample {
        Inner::sample(&self.inner).await
    }

    /// Starts collecting the figures of a generator run.
    pub fn begin_round(&self) {
        *lock(&self.inner.round) = Some(RoundStats::default());
    }

    /// Ends the run's collection. A run shorter than the sampling interval gets one sample
    /// taken now, so that every run has figures when the GPU can be measured.
    pub async fn end_round(&self) -> RoundStats {
        let taken = lock(&self.inner.round).take().unwrap_or_default();
        if taken.samples() > 0 {
            return taken;
        }
        let mut r = taken;
        r.add(&self.sample_now().await);
        r
    }
}

impl Inner {
    async fn sample(inner: &Arc<Inner>) -> GpuSample {
        let i = Arc::clone(inner);
        let s = tokio::task::spawn_blocking(move || i.inv.sample(&i.gpu))
            .await
            .unwrap_or_else(|_| GpuSample::unknown());
        inner.latest.send_replace(s.clone());
        s
    }
}
