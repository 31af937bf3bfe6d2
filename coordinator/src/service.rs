//! gRPC shells over [`Coordinator`]: `WorkerService` for agents, `JobService` for the CLI,
//! and `grpc.health.v1.Health` for probes. Errors map to gRPC codes in one place,
//! [`to_status`].
//!
//! A process that does not lead (a standby waiting in the election) serves every call with
//! `UNAVAILABLE` and the leader's address in the `quarry-leader` header, and reports the
//! health service `""` as NOT_SERVING, so a load balancer routes to the leader only. The
//! health service `"liveness"` is SERVING as long as the process serves at all.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use quarry_common::telemetry;
use quarry_common::transport::{
    LEADER_METADATA, MAX_MESSAGE_BYTES, MAX_ROUNDS_PER_CALL, ServerSecurity,
};
use quarry_proto::v1 as pb;
use quarry_proto::v1::job_service_server::{JobService, JobServiceServer};
use quarry_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{Instrument, field::Empty, info_span, warn};

use crate::coordinator::{CompleteExtras, CoordError, Coordinator};
use crate::spec::JobSpec;

/// Longest long-poll an agent may ask for.
const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(30);

/// Health service name that is SERVING while the process serves (liveness probes).
pub const LIVENESS: &str = "liveness";

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
    span.record("bytes", r.files.iter().map(|f| f.size).sum::<u64>());
    if let Some(f) = r.files.first() {
        span.record("samples", f.count);
    }
    let (outcome, message) = coord
        .complete(
            &r.worker_id,
            r.lease_id,
            r.files,
            r.generator_ms,
            CompleteExtras {
                gpu_stats: r.gpu_stats,
                log_key: r.log_key,
                yield_stats: r.yield_stats,
            },
        )
        .instrument(span.clone())
        .await
        .map_err(|e| {
            span.record("outcome", "error");
            to_status(e)
        })?;
    span.record(
        "outcome",
        match outcome {
            pb::CommitOutcome::Committed => "committed",
            pb::CommitOutcome::Duplicate => "duplicate",
            pb::CommitOutcome::Rejected => "rejected",
            pb::CommitOutcome::Unspecified => "unspecified",
        },
    );
    Ok(pb::CompleteResponse {
        outcome: outcome as i32,
        message,
    })
}

pub fn to_status(e: CoordError) -> Status {
    match e {
        CoordError::Spec(e) => Status::invalid_argument(e.to_string()),
        e @ CoordError::SpecChanged { .. } => Status::failed_precondition(e.to_string()),
        e @ CoordError::JobNotFound(_) => Status::not_found(e.to_string()),
        e @ CoordError::UnknownWorker(_) => Status::failed_precondition(e.to_string()),
        CoordError::State(e) => Status::unavailable(e.to_string()),
        e @ CoordError::Store(_) => Status::unavailable(e.to_string()),
    }
}

/// Whether this process leads, and if not, who does.
pub struct Leadership {
    coord: Mutex<Option<Arc<Coordinator>>>,
    leader_hint: Mutex<Option<String>>,
    health: HealthReporter,
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
    fn current(&self) -> Result<Arc<Coordinator>, Status> {
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

/// Serves the services on `listener` until `shutdown` is cancelled, with `security`'s TLS
/// and token check on the Quarry services (the health service stays open for probes).
pub async fn serve(
    leadership: Arc<Leadership>,
    listener: TcpListener,
    security: ServerSecurity,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    if let Ok(addr) = listener.local_addr()
        && !addr.ip().is_loopback()
    {
        if security.tls.is_none() && security.token.is_none() {
            warn!(
                %addr,
                "LISTENING ON A NON-LOOPBACK ADDRESS WITHOUT TLS OR AN AUTH TOKEN: anyone who \
                 reaches this port can submit jobs that run programs on your workers. Pass \
                 --tls-cert/--tls-key and --auth-token-file (or --tls-client-ca)"
            );
        } else if !security.authenticates() {
            warn!(%addr, "TLS without client authentication: pass --auth-token-file or --tls-client-ca");
        }
    }
    let check = security.checker();
    let workers = InterceptedService::new(
        WorkerServiceServer::new(WorkerApi(Arc::clone(&leadership)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        check.clone(),
    );
    let jobs = InterceptedService::new(
        JobServiceServer::new(JobApi(Arc::clone(&leadership)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        check,
    );
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(leadership.health.clone()),
    );
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = security.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health)
        .add_service(workers)
        .add_service(jobs)
        .serve_with_incoming_shutdown(
            // Nagle would hold the second small write of each response for the peer's
            // delayed ACK (~40 ms per round): small RPCs need TCP_NODELAY.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await
}

struct WorkerApi(Arc<Leadership>);

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let c = self.0.current()?;
        let (worker_id, refused) =
            c.register(&r.host, &r.gpu, &r.agent_name, r.gpu_info, &r.running);
        let cfg = c.config();
        Ok(Response::new(pb::RegisterResponse {
            worker_id,
            lease_ttl_ms: cfg.lease_ttl.as_millis() as u64,
            // Three heartbeats per lease TTL at least, so one lost heartbeat costs no lease.
            heartbeat_interval_ms: cfg.heartbeat_interval.min(cfg.lease_ttl / 3).as_millis() as u64,
            store_url: c.store().url().to_string(),
            cancel_lease_ids: refused,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            match self
                .0
                .current()?
                .heartbeat(&r.worker_id, &r.lease_ids, r.health, r.agent_state)
            {
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
        let grants = self
            .0
            .current()?
            .acquire_many(&r.worker_id, r.max_leases as usize, wait)
            .await
            .map_err(to_status)?;
        let mut leases = grants.into_iter().map(|g| {
            let mut lease = g.lease;
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
        let kind = match pb::FailureKind::try_from(r.kind).unwrap_or(pb::FailureKind::Unspecified) {
            pb::FailureKind::Exit => "exit",
            pb::FailureKind::Timeout => "timeout",
            pb::FailureKind::OutputMissing => "output_missing",
            pb::FailureKind::OutputInvalid => "output_invalid",
            pb::FailureKind::Upload => "upload",
            pb::FailureKind::Spawn => "spawn",
            pb::FailureKind::Unspecified => "unspecified",
        };
        // In the round's trace, like `commit` (the worker reports from the round's span).
        let span = info_span!("fail", worker = %r.worker_id, kind);
        telemetry::set_parent_from_metadata(&span, &md);
        self.0
            .current()?
            .fail(&r.worker_id, r.lease_id, kind, r.message, r.log_tail)
            .instrument(span)
            .await;
        Ok(Response::new(pb::FailResponse {}))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let r = req.into_inner();
        self.0.current()?.release(&r.worker_id, r.lease_id);
        Ok(Response::new(pb::ReleaseResponse {}))
    }
}

struct JobApi(Arc<Leadership>);

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let r = req.into_inner();
        let spec: JobSpec = serde_json::from_str(&r.spec_json)
            .map_err(|e| Status::invalid_argument(format!("job spec: {e}")))?;
        let (job_id, created) = self.0.current()?.submit(spec).await.map_err(to_status)?;
        Ok(Response::new(pb::SubmitResponse { job_id, created }))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.0
            .current()?
            .status(&req.into_inner().job_id)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(pb::ListJobsResponse {
            jobs: self.0.current()?.list(),
        }))
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let job = req.into_inner().job_id;
        let coord = self.0.current()?;
        // Fail fast on an unknown job.
        coord.status(&job).map_err(to_status)?;
        let mut changes = coord.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let c = Arc::clone(&coord);
        coord.spawn(async move {
            let stop = c.shutdown_token().clone();
            loop {
                let status = c.status(&job).map_err(to_status);
                let ended = status.as_ref().map_or(true, |s| s.state != pb::JobState::Running as i32);
                if tx.send(status).await.is_err() || ended {
                    return;
                }
                // At most ~5 updates a second, and at least one every 2 s for elapsed time.
                tokio::select! {
                    _ = async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let _ = tokio::time::timeout(Duration::from_secs(2), changes.changed()).await;
                    } => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        self.0
            .current()?
            .cancel(&req.into_inner().job_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CancelJobResponse {}))
    }
}
