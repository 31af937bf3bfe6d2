//! Whether this process leads, and if not, who does: a standby answers every Quarry call
//! UNAVAILABLE with the leader's address in the `quarry-leader` header and reports the health
//! service `""` NOT_SERVING.

use std::sync::{Arc, Mutex};

use quarry_common::transport::LEADER_METADATA;
use tonic::Status;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::LIVENESS;
use crate::coordinator::Coordinator;

/// Whether this process leads, and if not, who does.
pub struct Leadership {
    coord: Mutex<Option<Arc<Coordinator>>>,
    leader_hint: Mutex<Option<String>>,
    pub(super) health: HealthReporter,
    /// `quarry_leader`, when metrics are kept.
    gauge: Mutex<Option<quarry_common::metrics::Gauge>>,
}

impl Leadership {
    /// A process that does not lead (yet).
    pub fn standby() -> Arc<Leadership> {
        let health = HealthReporter::new();
        let l = Arc::new(Leadership {
            coord: Mutex::new(None),
            leader_hint: Mutex::new(None),
            health,
            gauge: Mutex::new(None),
        });
        l.report(false);
        l
    }

    /// A process that leads from the start (the embedded store has no election).
    pub fn leading(coord: Arc<Coordinator>) -> Arc<Leadership> {
        let l = Leadership::standby();
        l.lead(coord);
        l
    }

    /// This process now leads with `coord`.
    pub fn lead(&self, coord: Arc<Coordinator>) {
        *self.coord.lock().unwrap_or_else(|p| p.into_inner()) = Some(coord);
        self.report(true);
    }

    /// This process no longer leads; calls are answered UNAVAILABLE again.
    pub fn step_down(&self) {
        self.coord.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.report(false);
    }

    /// The address standbys name as the leader's (`None`: unknown, e.g. during an election).
    pub fn set_leader_hint(&self, addr: Option<String>) {
        *self.leader_hint.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    pub fn is_leader(&self) -> bool {
        self.coord
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Keeps `gauge` at 1 while leading, 0 otherwise.
    pub fn track(&self, gauge: quarry_common::metrics::Gauge) {
        gauge.set(if self.is_leader() { 1.0 } else { 0.0 });
        *self.gauge.lock().unwrap_or_else(|p| p.into_inner()) = Some(gauge);
    }

    fn report(&self, leading: bool) {
        if let Some(g) = self
            .gauge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            g.set(if leading { 1.0 } else { 0.0 });
        }
        let health = self.health.clone();
        let status = if leading {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        // The reporter's setters are async only to take a lock; they never wait long.
        tokio::spawn(async move {
            health.set_service_status("", status).await;
            health
                .set_service_status(LIVENESS, ServingStatus::Serving)
                .await;
            for name in ["quarry.v1.WorkerService", "quarry.v1.JobService"] {
                health.set_service_status(name, status).await;
            }
        });
    }

    /// The coordinator to serve a call with, or UNAVAILABLE naming the leader.
    pub(super) fn current(&self) -> Result<Arc<Coordinator>, Status> {
        if let Some(c) = self
            .coord
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(Arc::clone(c));
        }
        let hint = self
            .leader_hint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut st = Status::unavailable(match &hint {
            Some(h) => format!("this coordinator is a standby; the leader is {h}"),
            None => "this coordinator is a standby and no leader is known yet; retry".into(),
        });
        if let Some(h) = hint.and_then(|h| h.parse().ok()) {
            st.metadata_mut().insert(LEADER_METADATA, h);
        }
        Err(st)
    }
}
