//! gRPC shells over [`Coordinator`]: `WorkerService` for agents, `JobService` for the CLI.
//! Errors map to gRPC codes in one place, [`to_status`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use quarry_proto::v1 as pb;
use quarry_proto::v1::job_service_server::{JobService, JobServiceServer};
use quarry_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::coordinator::{CompleteExtras, CoordError, Coordinator};
use crate::spec::JobSpec;

/// Largest gRPC message accepted or sent (job specs with thousands of objects fit easily).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Longest long-poll an agent may ask for.
const MAX_ACQUIRE_WAIT: Duration = Duration::from_secs(30);

pub fn to_status(e: CoordError) -> Status {
    match e {
        CoordError::Spec(e) => Status::invalid_argument(e.to_string()),
        e @ CoordError::SpecChanged { .. } => Status::failed_precondition(e.to_string()),
        e @ CoordError::JobNotFound(_) => Status::not_found(e.to_string()),
        e @ CoordError::UnknownWorker(_) => Status::failed_precondition(e.to_string()),
        CoordError::State(e) => Status::unavailable(e.to_string()),
    }
}

/// Serves both services on `listener` until `shutdown` is cancelled.
pub async fn serve(
    coord: Arc<Coordinator>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let workers = WorkerServiceServer::new(WorkerApi(Arc::clone(&coord)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let jobs = JobServiceServer::new(JobApi(coord))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
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

struct WorkerApi(Arc<Coordinator>);

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let worker_id = self.0.register(&r.host, &r.gpu, &r.agent_name, r.gpu_info);
        let cfg = self.0.config();
        Ok(Response::new(pb::RegisterResponse {
            worker_id,
            lease_ttl_ms: cfg.lease_ttl.as_millis() as u64,
            heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u64,
            store_url: self.0.store().url().to_string(),
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
                .heartbeat(&r.worker_id, &r.lease_ids, r.health, r.agent_state)
            {
                Some(cancel) => pb::HeartbeatResponse {
                    cancel_lease_ids: cancel,
                    reregister: false,
                },
                None => pb::HeartbeatResponse {
                    cancel_lease_ids: r.lease_ids,
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
        let grant = self
            .0
            .acquire(&r.worker_id, wait)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::AcquireResponse {
            lease: grant.map(|g| g.lease),
        }))
    }

    async fn complete(
        &self,
        req: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let r = req.into_inner();
        let (outcome, message) = self
            .0
            .complete(
                &r.worker_id,
                r.lease_id,
                r.files,
                r.generator_ms,
                CompleteExtras {
                    gpu_stats: r.gpu_stats,
                    log_key: r.log_key,
                },
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CompleteResponse {
            outcome: outcome as i32,
            message,
        }))
    }

    async fn fail(
        &self,
        req: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailResponse>, Status> {
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
        self.0
            .fail(&r.worker_id, r.lease_id, kind, r.message, r.log_tail)
            .await;
        Ok(Response::new(pb::FailResponse {}))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let r = req.into_inner();
        self.0.release(&r.worker_id, r.lease_id);
        Ok(Response::new(pb::ReleaseResponse {}))
    }
}

struct JobApi(Arc<Coordinator>);

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
        let (job_id, created) = self.0.submit(spec).await.map_err(to_status)?;
        Ok(Response::new(pb::SubmitResponse { job_id, created }))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.0
            .status(&req.into_inner().job_id)
            .map(Response::new)
            .map_err(to_status)
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(pb::ListJobsResponse {
            jobs: self.0.list(),
        }))
    }

    type WatchJobStream = StatusStream;

    async fn watch_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let job = req.into_inner().job_id;
        let coord = Arc::clone(&self.0);
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
            .cancel(&req.into_inner().job_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CancelJobResponse {}))
    }
}
