//! `WorkerService`: what agents call to register, heartbeat, lease rounds and report them.

use std::sync::Arc;
use std::time::Duration;

use quarry_common::telemetry;
use quarry_common::transport::MAX_ROUNDS_PER_CALL;
use quarry_proto::v1 as pb;
use quarry_proto::v1::worker_service_server::WorkerService;
use tonic::{Request, Response, Status};
use tracing::{Instrument, field::Empty, info_span};

use super::Leadership;
use super::bounds;
use super::convert::{self, to_status};
use crate::coordinator::{Coordinator, ReportedFile, RunningRound, WorkerProof};

/// Longest long-poll an agent may ask for.
const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(30);

/// The `commit` span of one completion; the coordinator records which round it is once the
/// lease is looked up.
fn commit_span() -> tracing::Span {
    info_span!(
        "commit",
        job = Empty,
        object = Empty,
        round = Empty,
        seed = Empty,
        attempt = Empty,
        worker = Empty,
        outcome = Empty,
        bytes = Empty,
        samples = Empty,
    )
}

/// Judges one completion (see [`Coordinator::complete`]) in its `commit` span.
async fn judge(
    coord: &Arc<Coordinator>,
    r: pb::CompleteRequest,
    span: tracing::Span,
) -> Result<pb::CompleteResponse, Status> {
    span.record("worker", r.worker_id.as_str());
    coord
        .check_worker(&r.worker_id, &r.worker_secret)
        .map_err(to_status)?;
    span.record("bytes", r.files.iter().map(|f| f.size).sum::<u64>());
    if let Some(f) = r.files.first() {
        span.record("samples", f.count);
    }
    let files = r.files.into_iter().map(ReportedFile::from).collect();
    let extras = convert::complete_extras(r.gpu_stats, r.log_key, r.yield_stats);
    let (verdict, message) = coord
        .complete(&r.worker_id, r.lease_id, files, r.generator_ms, extras)
        .instrument(span.clone())
        .await
        .map_err(|e| {
            span.record("outcome", "error");
            to_status(e)
        })?;
    span.record("outcome", verdict.label());
    Ok(pb::CompleteResponse {
        outcome: pb::CommitOutcome::from(verdict) as i32,
        message,
    })
}

pub(super) struct WorkerApi(pub(super) Arc<Leadership>);

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let c = self.0.current()?;
        bounds::register(&r)?;
        let running: Vec<RunningRound> = r.running.iter().map(RunningRound::from).collect();
        let gpu_info = r.gpu_info.map(Into::into);
        let previous = (!r.previous_worker_id.is_empty()).then(|| WorkerProof {
            worker: &r.previous_worker_id,
            secret: &r.previous_worker_secret,
        });
        let reg = c
            .try_register(&r.host, &r.gpu, &r.agent_name, gpu_info, &running, previous)
            .map_err(to_status)?;
        let cfg = c.config();
        Ok(Response::new(pb::RegisterResponse {
            worker_id: reg.worker,
            worker_secret: reg.secret,
            lease_ttl_ms: cfg.lease_ttl.as_millis() as u64,
            // Three heartbeats per lease TTL at least, so one lost heartbeat costs no lease.
            heartbeat_interval_ms: cfg.heartbeat_interval.min(cfg.lease_ttl / 3).as_millis() as u64,
            store_url: c.store().url().to_string(),
            cancel_lease_ids: reg.refused,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        bounds::heartbeat(&r)?;
        let c = self.0.current()?;
        c.check_worker(&r.worker_id, &r.worker_secret)
            .map_err(to_status)?;
        Ok(Response::new(
            match c.heartbeat(
                &r.worker_id,
                &r.lease_ids,
                r.health.map(Into::into),
                r.agent_state,
            ) {
                Some(cancel) => pb::HeartbeatResponse {
                    cancel_lease_ids: cancel,
                    reregister: false,
                },
                // Runs go on: the agent registers again listing them, and they are adopted.
                None => pb::HeartbeatResponse {
                    cancel_lease_ids: Vec::new(),
                    reregister: true,
                },
            },
        ))
    }

    async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let r = req.into_inner();
        let wait = Duration::from_millis(r.wait_ms).min(MAX_ACQUIRE_WAIT);
        let c = self.0.current()?;
        c.check_worker(&r.worker_id, &r.worker_secret)
            .map_err(to_status)?;
        let grants = c
            .acquire_many(&r.worker_id, r.max_leases as usize, wait)
            .await
            .map_err(to_status)?;
        let mut leases = grants.into_iter().map(|g| {
            let mut lease = pb::Lease::from(g.lease);
            // The root of the round's trace: the worker parents its spans on it through the
            // lease, and its Complete carries the trace back to the `commit` span.
            let span = info_span!(
                parent: None,
                "lease",
                job = %lease.job_id,
                object = %lease.object,
                round = lease.round,
                seed = lease.seed,
                attempt = %lease.attempt,
                worker = %r.worker_id,
            );
            lease.traceparent = telemetry::traceparent(&span).unwrap_or_default();
            lease
        });
        let lease = leases.next();
        Ok(Response::new(pb::AcquireResponse {
            lease,
            more: leases.collect(),
        }))
    }

    async fn complete(
        &self,
        req: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        // A child of the worker's `round` span (its context travels in the metadata).
        let span = commit_span();
        telemetry::set_parent_from_metadata(&span, req.metadata());
        let coord = self.0.current()?;
        judge(&coord, req.into_inner(), span)
            .await
            .map(Response::new)
    }

    async fn complete_batch(
        &self,
        req: Request<pb::CompleteBatchRequest>,
    ) -> Result<Response<pb::CompleteBatchResponse>, Status> {
        let coord = self.0.current()?;
        let completions = req.into_inner().completions;
        if completions.len() > MAX_ROUNDS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} completions in one CompleteBatch; at most {MAX_ROUNDS_PER_CALL}",
                completions.len()
            )));
        }
        coord
            .config()
            .metrics
            .complete_batch_rounds
            .observe(completions.len() as f64);
        // A lease named twice in one call is answered once; the repeat is a duplicate that
        // touches nothing (judging both at once could let the repeat's cleanup race the commit).
        let mut seen = std::collections::HashSet::new();
        let repeated: Vec<bool> = completions
            .iter()
            .map(|c| !seen.insert((c.worker_id.clone(), c.lease_id)))
            .collect();
        // Judged side by side: their commits share the state store's group commit.
        let results = futures::future::join_all(completions.into_iter().zip(repeated).map(
            |(c, repeated)| {
                let coord = &coord;
                async move {
                    if repeated {
                        return Ok(pb::CompleteResponse {
                            outcome: pb::CommitOutcome::Duplicate as i32,
                            message: "lease repeated in this batch; answered once".into(),
                        });
                    }
                    let span = commit_span();
                    telemetry::set_parent(&span, &c.traceparent);
                    judge(coord, c, span).await
                }
            },
        ))
        .await;
        let results = results
            .into_iter()
            .map(|r| match r {
                Ok(response) => pb::CompleteResult {
                    response: Some(response),
                    ..Default::default()
                },
                Err(status) => pb::CompleteResult {
                    response: None,
                    error_code: status.code() as i32,
                    error_message: status.message().to_string(),
                },
            })
            .collect();
        Ok(Response::new(pb::CompleteBatchResponse { results }))
    }

    async fn fail(
        &self,
        req: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailResponse>, Status> {
        let md = req.metadata().clone();
        let r = req.into_inner();
        let kind = convert::failure_kind(r.kind);
        // In the round's trace, like `commit` (the worker reports from the round's span).
        let span = info_span!("fail", worker = %r.worker_id, kind = kind.label());
        telemetry::set_parent_from_metadata(&span, &md);
        let c = self.0.current()?;
        c.check_worker(&r.worker_id, &r.worker_secret)
            .map_err(to_status)?;
        c.fail(&r.worker_id, r.lease_id, kind, r.message, r.log_tail)
            .instrument(span)
            .await;
        Ok(Response::new(pb::FailResponse {}))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let r = req.into_inner();
        let c = self.0.current()?;
        c.check_worker(&r.worker_id, &r.worker_secret)
            .map_err(to_status)?;
        c.release(&r.worker_id, r.lease_id);
        Ok(Response::new(pb::ReleaseResponse {}))
    }
}
