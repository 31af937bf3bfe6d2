//! `coordinator run`: the one-process mode. The coordinator and one worker agent per GPU
//! (`quarry_worker::run`) in this process, over gRPC on loopback with a random token that only
//! this user can read (see [`crate::endpoint`]); a preflight first checks what would make every
//! round fail on this machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use quarry_common::metrics::Registry;
use quarry_common::storage::Store;
use quarry_common::transport::{ClientSecurity, ServerSecurity};
use quarry_coordinator::coordinator::{Coordinator, CoordinatorConfig};
use quarry_coordinator::metrics::CoordMetrics;
use quarry_coordinator::service::Leadership;
use quarry_coordinator::spec::JobSpec;
use quarry_coordinator::state::embedded::EmbeddedStore;
use quarry_proto::v1 as pb;
use quarry_worker::gpu::GpuInfo;
use quarry_worker::metrics::WorkerMetrics;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::args::RunArgs;
use crate::client::{ClientArgs, JobClient};
use crate::endpoint;
use crate::exit::{self, ExitStatus, StopSignal};
use crate::job_input::spec_from_flags;
use crate::progress::{self, Progress, ProgressMode};
use crate::shutdown_on_signal;

/// How a `run` ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub status: pb::JobStatus,
    pub interrupted: bool,
    /// The signal that interrupted it; `None` when the caller's token did (or nothing did).
    pub signal: Option<StopSignal>,
}

impl RunOutcome {
    /// How the process exits: interrupted (130 SIGINT, also a stop through the caller's
    /// token; 143 SIGTERM), else by the job's end state (0 done, 3 exhausted, 1 cancelled).
    pub fn exit_status(&self) -> ExitStatus {
        if self.interrupted {
            ExitStatus::Interrupted(self.signal.unwrap_or(StopSignal::Interrupt))
        } else {
            exit::of_job(self.status.state)
        }
    }

    /// [`Self::exit_status`] as the process exit code.
    pub fn exit_code(&self) -> i32 {
        self.exit_status().code()
    }
}

/// The GPU flag the user gave (`--gpus` or `--gpu`) and its values.
fn gpu_flag(a: &RunArgs) -> (&'static str, Vec<String>) {
    match &a.gpus {
        Some(ids) => ("--gpus", ids.clone()),
        None => ("--gpu", vec![a.gpu.clone()]),
    }
}

/// `coordinator run`: the one-command mode. Starts the coordinator on a loopback port and one
/// agent per GPU speaking gRPC to it (the same path as remote workers), submits the job,
/// shows progress until it ends, and stops everything. Every call to the port must carry a
/// token generated now and written owner-only beside the experiment's state, with the
/// address, so that `coordinator status/cancel` of the same user find them.
///
/// What the user typed is checked before anything starts, and refused as an
/// [`exit::UsageError`]: the flags and job file, the GPU ids, where the generator is.
pub async fn run(a: RunArgs, stop: CancellationToken, signals: bool) -> anyhow::Result<RunOutcome> {
    let spec = spec_from_flags(&a).map_err(exit::usage)?;
    spec.validate().map_err(exit::usage)?;
    let (flag, ids) = gpu_flag(&a);
    let (inventory, gpus) = quarry_worker::select_gpus(None, flag, &ids).map_err(exit::usage)?;
    preflight(&spec).map_err(exit::usage)?;
    let experiments = spec.root.join("data").join("experiments");
    let state_dir = endpoint::state_dir(&spec.root, &spec.exp_name);
    let state_path = state_dir.join("state.redb");
    let state = EmbeddedStore::open(&state_path)?;
    let store = Store::open_dir(&experiments)?;
    let shutdown = CancellationToken::new();
    let mut signal = None;
    if signals {
        let s = shutdown_on_signal();
        let st = stop.clone();
        signal = Some(s.signal);
        let token = s.token;
        tokio::spawn(async move {
            token.cancelled().await;
            st.cancel();
        });
    }
    // One registry for the coordinator's and the agents' series: the endpoint serves what
    // `serve` and `worker` serve between them.
    let registry = Registry::new();
    let coord_metrics = Arc::new(CoordMetrics::new(Arc::clone(&registry)));
    let worker_metrics = Arc::new(WorkerMetrics::new(Arc::clone(&registry)));
    a.metrics
        .start(registry, shutdown.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let cfg = CoordinatorConfig {
        lease_ttl: Duration::from_secs(a.lease_ttl.max(1)),
        metrics: Arc::clone(&coord_metrics),
        ..Default::default()
    };
    let coord = Coordinator::start(cfg, Arc::new(state), store, shutdown.clone()).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let token = endpoint::new_token()?;
    // Written before the server answers anything, and removed when this function returns.
    let published = match endpoint::publish(&state_dir, &addr.to_string(), &token) {
        Ok(p) => p,
        Err(e) => {
            shutdown.cancel();
            coord.close().await;
            return Err(e);
        }
    };
    let leadership = Leadership::leading(Arc::clone(&coord));
    leadership.track(coord_metrics.leader.clone());
    let server = tokio::spawn(quarry_coordinator::service::serve(
        leadership,
        listener,
        ServerSecurity {
            token: Some(Arc::from(token.as_str())),
            ..Default::default()
        },
        shutdown.clone(),
    ));
    let agents_stop = CancellationToken::new();
    let security = ClientSecurity::plain().with_token(&token);
    let mut base = quarry_worker::AgentConfig::new(addr.to_string(), "0");
    base.security = security.clone();
    base.lease_batch = a.lease_batch;
    base.metrics = worker_metrics;
    base.inventory = Some(inventory);
    // Nobody else would take this run's rounds: an agent whose warm generator cannot start
    // ends, so that the run ends with its error instead of waiting forever.
    base.end_when_out_of_rotation = true;
    let result = drive(
        &a,
        &spec,
        base,
        gpus,
        addr,
        security,
        &coord,
        &agents_stop,
        stop,
    )
    .await;
    let result = result.map(|mut o| {
        o.signal = signal.and_then(|s| s.get().copied());
        o
    });
    // Order matters: agents first (they stop their generators and release their leases over
    // gRPC), then the server, then the background tasks; the state file is released after.
    agents_stop.cancel();
    shutdown.cancel();
    let _ = server.await;
    coord.close().await;
    drop(published);
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    a: &RunArgs,
    spec: &JobSpec,
    base: quarry_worker::AgentConfig,
    gpus: Vec<GpuInfo>,
    addr: std::net::SocketAddr,
    security: ClientSecurity,
    coord: &Arc<Coordinator>,
    agents_stop: &CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<RunOutcome> {
    let mut client =
        JobClient::with_security(&ClientArgs::plain(&addr.to_string()), security.clone())?;
    let resp = client.submit(spec).await?;
    if !resp.created {
        eprintln!("resuming experiment {} from its saved state", resp.job_id);
    }
    let n_agents = gpus.len();
    let mut agents = {
        let t = agents_stop.clone();
        tokio::spawn(async move { quarry_worker::run(base, gpus, t).await })
    };

    let started = Instant::now();
    let mut progress = Progress::new(a.progress);
    let mut stream = client.watch(&resp.job_id).await?;
    let mut last = None;
    let mut interrupted = false;
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(s)) => {
                    progress.update(&s);
                    let ended = s.state != pb::JobState::Running as i32;
                    last = Some(s);
                    if ended { break; }
                }
                Ok(None) => break,
                Err(e) => { progress.finish(); bail!("lost the job's status stream: {}", e.message()); }
            },
            // Agents only end on their own when they cannot work at all (the coordinator
            // refused them, a setting out of range): the job would never move again.
            ended = &mut agents => {
                progress.finish();
                let errors: Vec<String> = match ended {
                    Ok(results) => results.into_iter().filter_map(|r| r.err().map(|e| e.to_string())).collect(),
                    Err(e) => vec![e.to_string()],
                };
                bail!("every worker agent stopped before the job ended: {}", errors.join("; "));
            }
            _ = stop.cancelled() => { interrupted = true; break; }
        }
    }
    progress.finish();
    agents_stop.cancel();
    let _ = agents.await;
    let status = match last {
        Some(s) => s,
        None => coord.status(&resp.job_id)?.into(),
    };
    if !interrupted
        || matches!(
            a.progress,
            ProgressMode::Auto | ProgressMode::Bars | ProgressMode::Lines
        )
    {
        eprintln!(
            "{}",
            progress::summary(&status, started.elapsed(), n_agents)
        );
    }
    Ok(RunOutcome {
        status,
        interrupted,
        signal: None,
    })
}

/// Checks, before anything runs, what would make every round fail on this machine.
fn preflight(spec: &JobSpec) -> anyhow::Result<()> {
    let cwd = spec.root.join(&spec.generator.cwd);
    if !cwd.is_dir() {
        bail!(
            "generator directory {} does not exist; run from the directory that holds it, or pass --root (or set `cwd` in the job file)",
            cwd.display()
        );
    }
    // The legacy generator is `python3 main.py`: its script must be there.
    if spec.generator.argv.get(1).is_some_and(|a| a == "main.py") && !cwd.join("main.py").is_file()
    {
        bail!(
            "{} not found; run from the directory that holds BimanGrasp-Optimization/, or pass --root",
            cwd.join("main.py").display()
        );
    }
    Ok(())
}
