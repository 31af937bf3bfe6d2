//! The CLI's client of the job service: tries each known coordinator, follows a standby's
//! pointer to the leader, and retries (bounded) while a failover is under way.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use quarry_common::transport::MAX_MESSAGE_BYTES;
use quarry_common::transport::{
    AuthChannel, ClientSecurity, ClientSecurityArgs, Coordinators, is_failover,
};
use quarry_coordinator::spec::JobSpec;
use quarry_proto::v1 as pb;
use quarry_proto::v1::job_service_client::JobServiceClient;
use tonic::{Status, Streaming};

/// The address of `coordinator serve` when none is given.
pub const DEFAULT_COORDINATOR: &str = "127.0.0.1:50051";

/// Where the CLI finds the coordinators, and how it proves who it is.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Coordinator address(es), host:port; repeat or comma-separate to list standbys
    /// [default: the `coordinator run` of the named job under --root (or the current
    /// directory) if one runs there, else 127.0.0.1:50051].
    #[arg(
        long = "coordinator",
        env = "QUARRY_COORDINATOR",
        value_delimiter = ','
    )]
    pub coordinator: Vec<String>,
    /// How long to keep trying while no coordinator answers (seconds).
    #[arg(long = "connect-timeout", default_value = "30")]
    pub connect_timeout: u64,
    #[command(flatten)]
    pub security: ClientSecurityArgs,
}

impl ClientArgs {
    /// Plain (no TLS, no token) settings for `addr`; for in-process use and tests.
    pub fn plain(addr: &str) -> ClientArgs {
        ClientArgs {
            coordinator: vec![addr.to_string()],
            connect_timeout: 30,
            security: ClientSecurityArgs::default(),
        }
    }

    pub fn with_token_file(mut self, path: PathBuf) -> ClientArgs {
        self.security.auth_token_file = Some(path);
        self
    }

    /// These settings, aimed at the `coordinator run` of experiment `job` under `root` when
    /// no coordinator address is given and that run has published its endpoint (see
    /// [`crate::endpoint`]): its address, and its token unless --auth-token-file is given.
    /// Returns where the endpoint was found, for error messages.
    pub fn or_local_run(
        mut self,
        root: &Path,
        job: &str,
    ) -> anyhow::Result<(ClientArgs, Option<PathBuf>)> {
        if !self.coordinator.is_empty() {
            return Ok((self, None));
        }
        let Some((addr, token)) = crate::endpoint::find(root, job)? else {
            return Ok((self, None));
        };
        self.coordinator = vec![addr];
        if self.security.auth_token_file.is_none() {
            self.security.auth_token_file = Some(token);
        }
        Ok((self, Some(crate::endpoint::state_dir(root, job))))
    }

    /// The addresses to try: the given ones, or [`DEFAULT_COORDINATOR`].
    fn addresses(&self) -> Vec<String> {
        if self.coordinator.is_empty() {
            vec![DEFAULT_COORDINATOR.to_string()]
        } else {
            self.coordinator.clone()
        }
    }
}

pub type Client = JobServiceClient<AuthChannel>;

/// A job-service client over every known coordinator.
pub struct JobClient {
    coords: Coordinators,
    patience: Duration,
}

impl JobClient {
    pub fn new(args: &ClientArgs) -> anyhow::Result<JobClient> {
        let security = args.security.load()?;
        JobClient::with_security(args, security)
    }

    /// A client with `security` in place of the files `args` names.
    pub fn with_security(args: &ClientArgs, security: ClientSecurity) -> anyhow::Result<JobClient> {
        Ok(JobClient {
            coords: Coordinators::new(&args.addresses(), security)?,
            patience: Duration::from_secs(args.connect_timeout.max(1)),
        })
    }

    /// Runs `call` against the leader: each coordinator in turn (the last known leader
    /// first), until one answers with something other than "unavailable", or until the
    /// patience runs out. The error says which addresses were tried.
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let until = Instant::now() + self.patience;
        let mut pause = Duration::from_millis(100);
        loop {
            let mut last: Option<Status> = None;
            for addr in self.coords.candidates() {
                let channel = self
                    .coords
                    .channel(&addr)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let client = JobServiceClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                match call(client).await {
                    Ok(v) => {
                        self.coords.prefer(&addr);
                        return Ok(v);
                    }
                    Err(st) if self.coords.learn(&st) => last = Some(st),
                    Err(st) => return Err(st),
                }
            }
            if Instant::now() + pause > until {
                let tried = self.coords.addrs().join(", ");
                let why = last.as_ref().map_or_else(String::new, describe);
                return Err(Status::unavailable(format!(
                    "no coordinator leads at {tried} ({why}); is `coordinator serve` running \
                     there, and do --coordinator and the TLS/token flags match it?"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Submits `spec` (creates the job, or resumes it when its plan is unchanged).
    pub async fn submit(&mut self, spec: &JobSpec) -> anyhow::Result<pb::SubmitResponse> {
        let spec_json = serde_json::to_string(spec)?;
        let resp = self
            .call(|mut c| {
                let spec_json = spec_json.clone();
                async move { c.submit(pb::SubmitRequest { spec_json }).await }
            })
            .await
            .map_err(rpc_err)?;
        Ok(resp.into_inner())
    }

    /// The stream of `job`'s status, one message per change (and at least one every 2 s).
    pub async fn watch(&mut self, job: &str) -> anyhow::Result<Streaming<pb::JobStatus>> {
        let resp = self
            .call(|mut c| {
                let job_id = job.to_string();
                async move { c.watch_job(pb::GetJobRequest { job_id }).await }
            })
            .await
            .map_err(rpc_err)?;
        Ok(resp.into_inner())
    }

    /// Whether a failed call is worth re-issuing (the leader changed or is restarting).
    pub fn retryable(status: &Status) -> bool {
        is_failover(status)
    }
}

/// A failed call as the commands report it: the status's message alone.
pub fn rpc_err(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// A status's message with the chain of errors under it (a transport failure's message alone,
/// "tcp connect error", hides whether TLS or the network failed).
pub fn describe(status: &Status) -> String {
    let mut out = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}
