//! gRPC shells over [`Coordinator`]: `WorkerService` for agents, `JobService` for the CLI,
//! and `grpc.health.v1.Health` for probes. Wire types are converted to the core's types at this
//! boundary (`convert.rs`, which also maps errors to gRPC codes in one place).
//!
//! A process that does not lead (a standby waiting in the election) serves every call with
//! `UNAVAILABLE` and the leader's address in the `quarry-leader` header, and reports the
//! health service `""` as NOT_SERVING, so a load balancer routes to the leader only. The
//! health service `"liveness"` is SERVING as long as the process serves at all.
//!
//! [`Coordinator`]: crate::coordinator::Coordinator

pub mod convert;
mod job_api;
mod leadership;
mod worker_api;

use std::sync::Arc;
use std::time::Duration;

use quarry_common::transport::{MAX_MESSAGE_BYTES, ServerSecurity};
use quarry_proto::v1::job_service_server::JobServiceServer;
use quarry_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tracing::warn;

pub use convert::to_status;
pub use leadership::Leadership;

use job_api::JobApi;
use worker_api::WorkerApi;

/// Health service name that is SERVING while the process serves (liveness probes).
pub const LIVENESS: &str = "liveness";

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
