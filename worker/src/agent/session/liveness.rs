//! A session's liveness: heartbeats that renew its leases and carry cancellations, and the
//! watchdog that fences the session when the coordinator stops answering.

use super::*;

impl Session {
    pub(super) async fn heartbeat_loop(self: Arc<Self>) {
        // An answer later than this is treated as lost; the next heartbeat follows at once.
        let rpc_timeout = (self.ttl / 2).max(Duration::from_millis(200));
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.heartbeat_every) => {}
                _ = self.lost.cancelled() => return,
            }
            let conn = self.conn();
            let sample = self.monitor.latest();
            self.cfg.metrics.gpu(&self.cfg.gpu, &sample);
            let lease_ids: Vec<u64> = lock(&self.running).keys().copied().collect();
            let req = pb::HeartbeatRequest {
                worker_id: conn.worker_id.clone(),
                worker_secret: conn.worker_secret.clone(),
                lease_ids,
                health: Some(sample.to_proto()),
                agent_state: self.state_for_heartbeat(),
            };
            let sent = Instant::now();
            let mut client = conn.client.clone();
            match tokio::time::timeout(rpc_timeout, client.heartbeat(req)).await {
                Ok(Ok(resp)) => {
                    failures = 0;
                    // The coordinator renewed the leases no earlier than `sent`.
                    *lock(&self.contact) = sent;
                    let resp = resp.into_inner();
                    {
                        let running = lock(&self.running);
                        for id in &resp.cancel_lease_ids {
                            if let Some((_, t)) = running.get(id) {
                                info!(lease = id, "coordinator asked to stop this round");
                                t.cancel();
                            }
                        }
                    }
                    if resp.reregister {
                        // A new leader (or a restarted coordinator): carry the runs over.
                        self.rebind(conn.generation).await;
                    }
                }
                other => {
                    failures += 1;
                    match other {
                        Ok(Err(e)) => debug!(error = %e, "heartbeat failed"),
                        _ => debug!("heartbeat timed out"),
                    }
                    // Two missed in a row: the coordinator may be gone; find the leader.
                    if failures >= 2 {
                        self.rebind(conn.generation).await;
                    }
                }
            }
        }
    }

    /// Fences the session when no heartbeat was answered for longer than the lease TTL. The
    /// contact time is when the last answered heartbeat was *sent*, which is no later than
    /// when the coordinator renewed the leases: the agent stops no later than the
    /// coordinator gives up on its leases.
    pub(super) async fn fence_watchdog(self: Arc<Self>) {
        let tick = (self.ttl / 10).clamp(Duration::from_millis(20), Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.lost.cancelled() => return,
            }
            let silent = lock(&self.contact).elapsed();
            if silent > self.ttl {
                warn!(
                    gpu = %self.cfg.gpu.id,
                    worker = %self.conn().worker_id,
                    coordinator = %self.conn().addr,
                    silent_s = silent.as_secs_f64(),
                    ttl_s = self.ttl.as_secs_f64(),
                    "no coordinator contact for longer than the lease TTL: fencing (stopping runs, discarding staging)"
                );
                self.lose(Lost::Fenced(silent));
                return;
            }
        }
    }
}
