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

mod bounds;
pub mod convert;
mod incoming;
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
pub use incoming::{DEFAULT_IDLE_TIMEOUT, ServeOptions};
pub use leadership::Leadership;

use job_api::JobApi;
use worker_api::WorkerApi;

/// Health service name that is SERVING while the process serves (liveness probes).
pub const LIVENESS: &str = "liveness";

/// Serves the services on `listener` until `shutdown` is cancelled, with `security`'s TLS
/// and token check on the Quarry services (the health service stays open for probes), and the
/// default [`ServeOptions`].
pub async fn serve(
    leadership: Arc<Leadership>,
    listener: TcpListener,
    security: ServerSecurity,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    serve_with(
        leadership,
        listener,
        security,
        ServeOptions::default(),
        shutdown,
    )
    .await
}

/// What the operator is told about the listener's security at start: every way a caller
/// could act without proving who it is, or a token could be read on the network.
fn warn_about(addr: std::net::SocketAddr, security: &ServerSecurity) {
    let loopback = addr.ip().is_loopback();
    if !security.authenticates() {
        if loopback {
            warn!(
                %addr,
                "listening without an auth token or client certificates: any user of this \
                 machine can submit jobs (their programs run as this user) and cancel yours. \
                 Pass --auth-token-file (a file only you can read) or --tls-client-ca"
            );
        } else if security.tls.is_none() {
            warn!(
                %addr,
                "LISTENING ON A NON-LOOPBACK ADDRESS WITHOUT TLS OR AN AUTH TOKEN: anyone who \
                 reaches this port can submit jobs that run programs on your workers. Pass \
                 --tls-cert/--tls-key and --auth-token-file (or --tls-client-ca)"
            );
        } else {
            warn!(%addr, "TLS without client authentication: pass --auth-token-file or --tls-client-ca");
        }
    } else if !loopback && security.tls.is_none() {
        warn!(
            %addr,
            "the auth token travels in clear text on a non-loopback address: anyone who can \
             watch this network can read it and act as a worker or a user. Pass \
             --tls-cert/--tls-key"
        );
    }
}

/// [`serve`] with explicit [`ServeOptions`] (the idle timeout of a connection).
pub async fn serve_with(
    leadership: Arc<Leadership>,
    listener: TcpListener,
    security: ServerSecurity,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    if let Ok(addr) = listener.local_addr() {
        warn_about(addr, &security);
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
        // A quiet connection is pinged well inside the idle timeout: a live peer answers,
        // which counts as traffic, and a dead one is closed by the keepalive timeout.
        .http2_keepalive_interval(Some(options.keepalive_interval()))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = security.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health)
        .add_service(workers)
        .add_service(jobs)
        .serve_with_incoming_shutdown(
            incoming::incoming(listener, options.idle_timeout),
            shutdown.cancelled_owned(),
        )
        .await
}
