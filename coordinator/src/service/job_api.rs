//! `JobService`: what the CLI calls to submit, watch, list and cancel jobs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use quarry_proto::v1 as pb;
use quarry_proto::v1::job_service_server::JobService;
use tonic::{Request, Response, Status};

use super::Leadership;
use super::convert::to_status;
use crate::spec::JobSpec;

pub(super) struct JobApi(pub(super) Arc<Leadership>);

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
            .map(|s| Response::new(s.into()))
            .map_err(to_status)
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(pb::ListJobsResponse {
            jobs: self
                .0
                .current()?
                .list()
                .into_iter()
                .map(pb::JobStatus::from)
                .collect(),
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
                let status = c.status(&job).map(pb::JobStatus::from).map_err(to_status);
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
