//! What a session tells the coordinator about its rounds: a lease given back, a failed
//! attempt, a completion (coalesced into CompleteBatch calls by the outbox).

use super::*;

impl Session {
    /// Gives a lease back without counting a failure, so the coordinator re-leases it at
    /// once. A lost session cannot: the coordinator re-issues it at its TTL.
    pub(in crate::agent) async fn give_back(&self, held: &Held, reason: &str) {
        self.unhold(held);
        held.span.record("outcome", "released");
        Counters::bump(&self.counters.released);
        self.cfg.metrics.round(crate::metrics::Outcome::Released);
        if self.is_lost() {
            return;
        }
        let conn = self.conn();
        let req = pb::ReleaseRequest {
            worker_id: conn.worker_id.clone(),
            worker_secret: conn.worker_secret.clone(),
            lease_id: held.lease.lease_id,
            reason: reason.to_string(),
        };
        let mut client = conn.client.clone();
        match tokio::time::timeout(RELEASE_TIMEOUT, client.release(req)).await {
            Ok(Ok(_)) => {
                debug!(object = %held.lease.object, round = held.lease.round, reason, "lease released")
            }
            Ok(Err(e)) => {
                warn!(object = %held.lease.object, round = held.lease.round, error = %e, "could not release a lease")
            }
            Err(_) => {
                warn!(object = %held.lease.object, round = held.lease.round, "releasing a lease timed out")
            }
        }
    }

    pub(in crate::agent) async fn report_failure(
        &self,
        held: &Held,
        kind: pb::FailureKind,
        message: String,
        log_tail: String,
        generator_ms: u64,
    ) {
        self.unhold(held);
        held.span.record("outcome", "failed");
        Counters::bump(&self.counters.failed);
        self.cfg.metrics.round(crate::metrics::Outcome::Failed);
        if self.is_lost() {
            return;
        }
        let outcome = self
            .report("reporting a failure", &held.span, RPC_TIMEOUT, |conn| {
                let req = pb::FailRequest {
                    worker_id: conn.worker_id.clone(),
                    worker_secret: conn.worker_secret.clone(),
                    lease_id: held.lease.lease_id,
                    kind: kind as i32,
                    message: message.clone(),
                    log_tail: log_tail.clone(),
                    generator_ms,
                };
                let mut client = conn.client;
                async move { client.fail(req).await }
            })
            .await;
        match outcome {
            Some(Ok(Ok(_))) | None => {}
            Some(Ok(Err(e))) => warn!(error = %e, "could not report a failure"),
            Some(Err(_)) => warn!("reporting a failure timed out"),
        }
    }

    /// Reports a round's outcome (Complete, Fail) with `call`, made in the round's `span` so
    /// that the coordinator's span joins its trace. A coordinator that went away (a failover)
    /// is found again and the report repeated, for as long as the lease can still be valid:
    /// the fence watchdog ends the session once no coordinator answered for a lease TTL.
    /// Each try is bounded by `limit`. `None` when fenced before any answer; the last
    /// failover error when fenced after one.
    pub(in crate::agent) async fn report<T, F, Fut>(
        &self,
        what: &str,
        span: &tracing::Span,
        limit: Duration,
        mut call: F,
    ) -> Option<Result<Result<T, tonic::Status>, tokio::time::error::Elapsed>>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut last = None;
        loop {
            let conn = self.conn();
            let generation = conn.generation;
            let r = tokio::select! {
                r = tokio::time::timeout(limit, call(conn).instrument(span.clone())) => r,
                _ = self.fenced.cancelled() => return last,
            };
            match r {
                Ok(Err(e)) if is_failover(&e) && !self.is_lost() => {
                    debug!(error = %e, "{what}: coordinator unavailable; registering again");
                    last = Some(Ok(Err(e)));
                    if !self.rebind(generation).await {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = self.fenced.cancelled() => return last,
                        }
                    }
                }
                other => return Some(other),
            }
        }
    }

    /// Sends one round's completion and returns the coordinator's answer to it. Alone, it
    /// goes at once as a unary Complete made in the round's `span`; completions ready while
    /// another Complete or CompleteBatch of this session is in flight go together in one
    /// CompleteBatch as soon as that returns, each carrying its round's trace context. A
    /// per-completion error in a batch is returned as the status that round's Complete would
    /// have failed with; a failed call, as every one of its rounds' status. `req.worker_id`
    /// is filled in when it is sent. Each call is bounded by `RPC_TIMEOUT`, and at most one
    /// call is ahead of a completion (a session has at most `lease_batch` <= 64 rounds
    /// finishing), so the answer comes within [`COMPLETE_WAIT`].
    pub(in crate::agent) async fn complete(
        self: &Arc<Self>,
        req: pb::CompleteRequest,
        span: tracing::Span,
    ) -> outbox::Answer {
        let (answer, rx) = tokio::sync::oneshot::channel();
        if self.outbox.push(Waiting { req, span, answer }) {
            tokio::spawn(Arc::clone(self).send_completions());
        }
        rx.await.unwrap_or_else(|_| {
            Err(tonic::Status::internal(
                "the completion sender ended without an answer",
            ))
        })
    }

    /// The outbox's sender: sends what waits, call after call, until nothing does.
    pub(super) async fn send_completions(self: Arc<Self>) {
        while let Some(batch) = self.outbox.next_batch() {
            let n = batch.len();
            let conn = self.conn();
            let mut client = conn.client;
            let call = async {
                if let [one] = batch.as_slice() {
                    let mut req = one.req.clone();
                    req.worker_id = conn.worker_id.clone();
                    req.worker_secret = conn.worker_secret.clone();
                    // The round's trace context travels in the metadata (the interceptor
                    // reads the current span).
                    let r = client.complete(req).instrument(one.span.clone()).await;
                    return vec![r.map(tonic::Response::into_inner)];
                }
                let completions = batch
                    .iter()
                    .map(|w| pb::CompleteRequest {
                        worker_id: conn.worker_id.clone(),
                        worker_secret: conn.worker_secret.clone(),
                        traceparent: quarry_common::telemetry::traceparent(&w.span)
                            .unwrap_or_default(),
                        ..w.req.clone()
                    })
                    .collect();
                match client
                    .complete_batch(pb::CompleteBatchRequest { completions })
                    .await
                {
                    Ok(resp) => outbox::batch_answers(resp.into_inner(), n),
                    Err(e) => vec![Err(e); n],
                }
            };
            let answers = tokio::select! {
                r = tokio::time::timeout(RPC_TIMEOUT, call) => r.unwrap_or_else(|_| {
                    vec![Err(tonic::Status::deadline_exceeded("reporting completion timed out")); n]
                }),
                _ = self.fenced.cancelled() => {
                    vec![Err(tonic::Status::aborted("session lost before the coordinator answered")); n]
                }
            };
            if n > 1 {
                debug!(gpu = %self.cfg.gpu.id, completions = n, "completions reported in one call");
            }
            for (w, a) in batch.into_iter().zip(answers) {
                let _ = w.answer.send(a);
            }
        }
    }
}
