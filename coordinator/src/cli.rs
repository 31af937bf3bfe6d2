//! Command line of the `coordinator` binary. `main` parses and calls [`main`]; every command is
//! a library function so tests run them in-process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use quarry_common::storage::Store;
use quarry_proto::v1 as pb;
use quarry_proto::v1::job_service_client::JobServiceClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::progress::{self, Progress, ProgressMode};
use crate::spec::{FinalDirMode, JobSpec};
use crate::state::StateStore;
use crate::state::embedded::EmbeddedStore;
use crate::state::etcd::EtcdStore;

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Quarry coordinator: turns every GPU into one data factory."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Run a job on this machine: coordinator plus one worker agent per GPU, in one process.
    /// Accepts scale_runner.py's flags as they are spelled.
    Run(RunArgs),
    /// Serve the coordinator for remote workers and `submit`.
    Serve(ServeArgs),
    /// Submit a job file to a running coordinator.
    Submit(SubmitArgs),
    /// Show a job's progress (or every job's).
    Status(StatusArgs),
    /// Stop a job: no more rounds are handed out; running attempts are stopped.
    Cancel(CancelArgs),
}

/// scale_runner's flags, spelled as scale_runner spells them.
#[derive(Debug, Args, Default, Clone)]
pub struct LegacyFlags {
    /// Base experiment name; finals go to data/experiments/<exp_name>/.
    #[arg(long = "exp_name")]
    pub exp_name: Option<String>,
    /// Object codes, space separated; an object's position fixes its seeds.
    #[arg(long = "object_code_list", num_args = 1..)]
    pub object_code_list: Option<Vec<String>>,
    /// Samples wanted per object; finals hold exactly this many.
    #[arg(long = "target_count_per_object")]
    pub target_count_per_object: Option<u64>,
    /// Generator batch size per round (main.py --batch_size) [default: 512].
    #[arg(long = "round_batch_size")]
    pub round_batch_size: Option<u64>,
    /// Generator iterations per round (main.py --num_iterations) [default: 10000].
    #[arg(long = "num_iterations")]
    pub num_iterations: Option<u64>,
    /// Seed of object i, round r = seed_base + i*100000 + r [default: 12345].
    #[arg(long = "seed_base", allow_hyphen_values = true)]
    pub seed_base: Option<i64>,
    /// Cap on rounds per object [default: 100000, the seed stride; more would reuse the next object's seeds].
    #[arg(long = "max_rounds")]
    pub max_rounds: Option<u64>,
    /// Final directory layout [default: seed_only].
    #[arg(long = "final_dir_mode", value_enum)]
    pub final_dir_mode: Option<FinalDirMode>,
    /// Keep per-round outputs after the final is written.
    #[arg(long = "keep_intermediate")]
    pub keep_intermediate: bool,
    /// Failed attempts retried per round before it is quarantined [default: 2].
    #[arg(long = "retries")]
    pub retries: Option<u32>,
    /// Kill a generator run after this many seconds and retry it [default: no limit].
    #[arg(long = "round_timeout")]
    pub round_timeout: Option<u64>,
    /// Arguments after `--` are passed to the generator.
    #[arg(last = true)]
    pub extra: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub legacy: LegacyFlags,
    /// Single GPU id.
    #[arg(long = "gpu", default_value = "0", conflicts_with = "gpus")]
    pub gpu: String,
    /// Comma-separated GPU ids, one worker agent each (e.g. 0,1,2).
    #[arg(long = "gpus", value_delimiter = ',')]
    pub gpus: Option<Vec<String>>,
    /// Continue a previous run of the same experiment (the default when its state exists).
    #[arg(long = "resume")]
    pub resume: bool,
    /// Accepted for scale_runner compatibility; put generator arguments after `--`.
    #[arg(long = "main_extra_args", hide = true)]
    pub main_extra_args: bool,
    /// Directory holding BimanGrasp-Optimization/ and data/ [default: current directory].
    #[arg(long = "root")]
    pub root: Option<PathBuf>,
    /// A job file describing another generator (see docs/job-file.md); flags override it.
    #[arg(long = "job")]
    pub job: Option<PathBuf>,
    #[arg(long = "progress", value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Seconds a worker may go without a heartbeat before its round is re-issued.
    #[arg(long = "lease_ttl", default_value = "30")]
    pub lease_ttl: u64,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on for workers and the CLI.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// State store: file://<path> (embedded file) or etcd://host:2379[,host2:2379]/<prefix>.
    #[arg(long, default_value = "file://./quarry-state.redb")]
    pub state: String,
    /// Object store for staging, finals and manifests: file://<directory> or s3://bucket/prefix
    /// (S3 settings from the standard AWS_* variables, e.g. AWS_ENDPOINT_URL).
    #[arg(long, default_value = "file://./data/experiments")]
    pub store: String,
    /// Seconds a worker may go without a heartbeat before its round is re-issued.
    #[arg(long = "lease-ttl", default_value = "30")]
    pub lease_ttl: u64,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Job file (TOML; see docs/job-file.md).
    pub job: PathBuf,
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub coordinator: String,
    /// Follow progress until the job ends.
    #[arg(long)]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Job id (its exp_name); every job when omitted.
    pub job: Option<String>,
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub coordinator: String,
    /// Follow progress until the job ends.
    #[arg(long)]
    pub watch: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    pub job: String,
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub coordinator: String,
}

/// Runs a parsed command; returns the process exit code.
pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(a) => run(a, CancellationToken::new(), true)
            .await
            .map(|o| o.exit_code()),
        Command::Serve(a) => serve(a, shutdown_on_signal()).await.map(|()| 0),
        Command::Submit(a) => submit(a).await,
        Command::Status(a) => status(a).await,
        Command::Cancel(a) => {
            let mut c = connect(&a.coordinator).await?;
            c.cancel_job(pb::CancelJobRequest {
                job_id: a.job.clone(),
            })
            .await
            .map_err(rpc_err)?;
            println!("job {} cancelled", a.job);
            Ok(0)
        }
    }
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
        }
        eprintln!(
            "stopping: running rounds are stopped and released; run the same command again to resume"
        );
        t.cancel();
    });
    token
}

fn rpc_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

async fn connect(addr: &str) -> anyhow::Result<JobServiceClient<Channel>> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ch = Channel::from_shared(url.clone())
        .with_context(|| format!("coordinator address {addr:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the coordinator at {addr}; is `coordinator serve` running?")
        })?;
    Ok(JobServiceClient::new(ch)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
}

/// Reads a job file: TOML with the job spec's fields. `root` defaults to the file's directory;
/// a relative `root` is relative to the file.
pub fn read_job_file(path: &Path) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading job file {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("job file {}", path.display()))?;
    let dir = std::path::absolute(path)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let root = match table.get("root").and_then(|v| v.as_str()) {
        Some(r) => dir.join(r),
        None => dir,
    };
    table.insert(
        "root".into(),
        toml::Value::String(root.display().to_string()),
    );
    let spec: JobSpec = table
        .try_into()
        .with_context(|| format!("job file {}", path.display()))?;
    Ok(spec)
}

/// Builds the spec of `coordinator run` from flags (and a job file, if given).
pub fn spec_from_flags(a: &RunArgs) -> anyhow::Result<JobSpec> {
    let l = &a.legacy;
    let mut spec = match &a.job {
        Some(path) => read_job_file(path)?,
        None => {
            let exp_name = l
                .exp_name
                .clone()
                .context("--exp_name is required (the experiment's name)")?;
            let objects = l
                .object_code_list
                .clone()
                .context("--object_code_list is required (space-separated object codes)")?;
            let target = l
                .target_count_per_object
                .context("--target_count_per_object is required (samples per object)")?;
            JobSpec {
                exp_name,
                objects,
                target_count_per_object: target,
                round_batch_size: 512,
                num_iterations: 10_000,
                seed_base: 12_345,
                seed_stride: crate::spec::DEFAULT_SEED_STRIDE,
                max_rounds: None,
                final_dir_mode: FinalDirMode::SeedOnly,
                keep_intermediate: false,
                retries: 2,
                retry_backoff_ms: 1_000,
                root: PathBuf::new(),
                generator: JobSpec::legacy_generator(),
            }
        }
    };
    if let Some(v) = &l.exp_name {
        spec.exp_name = v.clone();
    }
    if let Some(v) = &l.object_code_list {
        spec.objects = v.clone();
    }
    if let Some(v) = l.target_count_per_object {
        spec.target_count_per_object = v;
    }
    if let Some(v) = l.round_batch_size {
        spec.round_batch_size = v;
    }
    if let Some(v) = l.num_iterations {
        spec.num_iterations = v;
    }
    if let Some(v) = l.seed_base {
        spec.seed_base = v;
    }
    if l.max_rounds.is_some() {
        spec.max_rounds = l.max_rounds;
    }
    if let Some(v) = l.final_dir_mode {
        spec.final_dir_mode = v;
    }
    if l.keep_intermediate {
        spec.keep_intermediate = true;
    }
    if let Some(v) = l.retries {
        spec.retries = v;
    }
    if let Some(v) = l.round_timeout {
        spec.generator.timeout_secs = Some(v);
    }
    if !l.extra.is_empty() {
        spec.generator.extra_args = l.extra.clone();
    }
    if let Some(r) = &a.root {
        spec.root = std::path::absolute(r)?;
    } else if a.job.is_none() {
        spec.root = std::env::current_dir()?;
    }
    Ok(spec)
}

/// How a `run` ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub status: pb::JobStatus,
    pub interrupted: bool,
}

impl RunOutcome {
    /// 0 done, 2 incomplete (a quota not met), 130 interrupted.
    pub fn exit_code(&self) -> i32 {
        if self.interrupted {
            130
        } else if self.status.state == pb::JobState::Done as i32 {
            0
        } else {
            2
        }
    }
}

/// `coordinator run`: the one-command mode. Starts the coordinator on a loopback port and one
/// agent per GPU speaking gRPC to it (the same path as remote workers), submits the job,
/// shows progress until it ends, and stops everything.
pub async fn run(a: RunArgs, stop: CancellationToken, signals: bool) -> anyhow::Result<RunOutcome> {
    let spec = spec_from_flags(&a)?;
    spec.validate()?;
    let gpus: Vec<String> = a.gpus.clone().unwrap_or_else(|| vec![a.gpu.clone()]);
    for g in &gpus {
        quarry_common::names::validate("--gpu", g).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    preflight(&spec)?;
    let experiments = spec.root.join("data").join("experiments");
    let state_path = experiments
        .join(&spec.exp_name)
        .join(".quarry")
        .join("state.redb");
    let state = EmbeddedStore::open(&state_path)?;
    let store = Store::open_dir(&experiments)?;
    let shutdown = CancellationToken::new();
    if signals {
        let s = shutdown_on_signal();
        let st = stop.clone();
        tokio::spawn(async move {
            s.cancelled().await;
            st.cancel();
        });
    }
    let cfg = CoordinatorConfig {
        lease_ttl: Duration::from_secs(a.lease_ttl.max(1)),
        ..Default::default()
    };
    let coord = Coordinator::start(cfg, Arc::new(state), store, shutdown.clone()).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(crate::service::serve(
        Arc::clone(&coord),
        listener,
        shutdown.clone(),
    ));
    let agents_stop = CancellationToken::new();
    let result = drive(&a, &spec, &gpus, addr, &coord, &agents_stop, stop).await;
    // Order matters: agents first (they stop their generators and release their leases over
    // gRPC), then the server, then the background tasks; the state file is released after.
    agents_stop.cancel();
    shutdown.cancel();
    let _ = server.await;
    coord.close().await;
    result
}

async fn drive(
    a: &RunArgs,
    spec: &JobSpec,
    gpus: &[String],
    addr: std::net::SocketAddr,
    coord: &Arc<Coordinator>,
    agents_stop: &CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<RunOutcome> {
    let mut client = connect(&addr.to_string()).await?;
    let spec_json = serde_json::to_string(spec)?;
    let resp = client
        .submit(pb::SubmitRequest { spec_json })
        .await
        .map_err(rpc_err)?
        .into_inner();
    if !resp.created {
        eprintln!("resuming experiment {} from its saved state", resp.job_id);
    }
    let base = quarry_worker::AgentConfig::new(addr.to_string(), "0");
    let agents = {
        let gpus = gpus.to_vec();
        let t = agents_stop.clone();
        tokio::spawn(async move { quarry_worker::run(base, &gpus, t).await })
    };

    let started = Instant::now();
    let mut progress = Progress::new(a.progress);
    let mut stream = client
        .watch_job(pb::GetJobRequest {
            job_id: resp.job_id.clone(),
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
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
            _ = stop.cancelled() => { interrupted = true; break; }
        }
    }
    progress.finish();
    agents_stop.cancel();
    let _ = agents.await;
    let status = match last {
        Some(s) => s,
        None => coord.status(&resp.job_id)?,
    };
    if !interrupted
        || matches!(
            a.progress,
            ProgressMode::Auto | ProgressMode::Bars | ProgressMode::Lines
        )
    {
        eprintln!(
            "{}",
            progress::summary(&status, started.elapsed(), gpus.len())
        );
    }
    Ok(RunOutcome {
        status,
        interrupted,
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

/// Opens `--state`: `file://<path>` (the embedded store) or
/// `etcd://host:port[,host:port...]/<prefix>` (etcd; the prefix keeps deployments apart).
pub async fn open_state(url: &str) -> anyhow::Result<Arc<dyn StateStore>> {
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Arc::new(EmbeddedStore::open(&std::path::absolute(path)?)?));
    }
    if let Some(rest) = url.strip_prefix("etcd://") {
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, "quarry"));
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            bail!("--state {url:?}: no etcd endpoints; use etcd://host:2379[,host2:2379]/prefix");
        }
        let prefix = format!("/{}", prefix.trim_matches('/'));
        return Ok(Arc::new(EtcdStore::connect(&endpoints, &prefix).await?));
    }
    bail!("--state {url:?}: use file://<path> or etcd://host:2379[,host2:2379]/prefix")
}

/// `coordinator serve`: the coordinator for remote workers, until `shutdown`.
pub async fn serve(a: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state = open_state(&a.state).await?;
    let store = if a.store.starts_with("s3://") {
        Store::open(&a.store)?
    } else {
        let store_dir = a.store.strip_prefix("file://").unwrap_or(&a.store);
        Store::open_dir(&std::path::absolute(store_dir)?)?
    };
    let cfg = CoordinatorConfig {
        lease_ttl: Duration::from_secs(a.lease_ttl.max(1)),
        ..Default::default()
    };
    let listener = TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("--listen {}", a.listen))?;
    let coord = Coordinator::start(cfg, state, store, shutdown.clone()).await?;
    eprintln!(
        "coordinator listening on {} (store {})",
        listener.local_addr()?,
        coord.store().url()
    );
    let served = crate::service::serve(Arc::clone(&coord), listener, shutdown.clone()).await;
    shutdown.cancel();
    coord.close().await;
    served?;
    Ok(())
}

async fn submit(a: SubmitArgs) -> anyhow::Result<i32> {
    let spec = read_job_file(&a.job)?;
    spec.validate()?;
    let mut c = connect(&a.coordinator).await?;
    let resp = c
        .submit(pb::SubmitRequest {
            spec_json: serde_json::to_string(&spec)?,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    println!("{}", resp.job_id);
    if !resp.created {
        eprintln!("job {} existed with the same spec; resumed", resp.job_id);
    }
    if a.watch {
        return watch(&mut c, &resp.job_id, ProgressMode::Auto).await;
    }
    Ok(0)
}

async fn watch(
    c: &mut JobServiceClient<Channel>,
    job: &str,
    mode: ProgressMode,
) -> anyhow::Result<i32> {
    let started = Instant::now();
    let mut stream = c
        .watch_job(pb::GetJobRequest { job_id: job.into() })
        .await
        .map_err(rpc_err)?
        .into_inner();
    let mut progress = Progress::new(mode);
    let mut last = None;
    while let Some(s) = stream.message().await.map_err(rpc_err)? {
        progress.update(&s);
        last = Some(s);
    }
    progress.finish();
    let Some(s) = last else {
        bail!("no status received")
    };
    eprintln!(
        "{}",
        progress::summary(&s, started.elapsed(), s.workers.len())
    );
    Ok(if s.state == pb::JobState::Done as i32 {
        0
    } else {
        2
    })
}

async fn status(a: StatusArgs) -> anyhow::Result<i32> {
    let mut c = connect(&a.coordinator).await?;
    if a.watch {
        let job = a.job.context("--watch needs a job id")?;
        return watch(
            &mut c,
            &job,
            if a.json {
                ProgressMode::Off
            } else {
                ProgressMode::Auto
            },
        )
        .await;
    }
    let jobs = match &a.job {
        Some(j) => vec![
            c.get_job(pb::GetJobRequest { job_id: j.clone() })
                .await
                .map_err(rpc_err)?
                .into_inner(),
        ],
        None => {
            c.list_jobs(pb::ListJobsRequest {})
                .await
                .map_err(rpc_err)?
                .into_inner()
                .jobs
        }
    };
    if a.json {
        let v: Vec<serde_json::Value> = jobs.iter().map(status_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    for s in &jobs {
        println!("{}", progress::line(s, Duration::from_millis(s.elapsed_ms)));
        for o in &s.objects {
            let state = pb::ObjectState::try_from(o.state)
                .map_or("?".into(), |st| format!("{st:?}").to_lowercase());
            println!(
                "  {:<32} {:>10}/{:<10} {:<9} rounds {:>4} running {:>3} failed {:>3} quarantined {:>3}",
                o.name,
                o.collected,
                o.target,
                state,
                o.rounds_committed,
                o.rounds_in_flight,
                o.failed_attempts,
                o.rounds_quarantined
            );
        }
        for w in &s.workers {
            println!("{}", worker_line(w));
        }
    }
    Ok(0)
}

/// One worker in `coordinator status`: what it runs or waits for, and its GPU's health.
fn worker_line(w: &pb::WorkerStatus) -> String {
    let doing = if !w.running.is_empty() {
        w.running.clone()
    } else if !w.agent_state.is_empty() {
        w.agent_state.clone()
    } else {
        "idle".into()
    };
    let mut line = format!("  worker {} (gpu {}) {doing}", w.worker_id, w.gpu);
    if let Some(h) = &w.health {
        let opt = |v: Option<u64>, unit: &str| v.map(|v| format!(" {v}{unit}"));
        let metrics: String = [
            opt(h.utilization_pct.map(u64::from), "% util"),
            opt(h.memory_used_mib, " MiB used"),
            opt(h.memory_free_mib, " MiB free"),
            opt(h.temperature_c.map(u64::from), " C"),
            opt(h.power_w.map(u64::from), " W"),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(",");
        line.push_str(&format!(" [{}{metrics}]", health_name(h)));
    }
    line
}

fn health_name(h: &pb::GpuHealth) -> String {
    match pb::GpuHealthState::try_from(h.state) {
        Ok(pb::GpuHealthState::Healthy) => "healthy".into(),
        Ok(pb::GpuHealthState::Unhealthy) => format!("UNHEALTHY: {}", h.reason),
        _ => "health unknown".into(),
    }
}

fn worker_json(w: &pb::WorkerStatus) -> serde_json::Value {
    let health = w.health.as_ref();
    serde_json::json!({
        "id": w.worker_id, "host": w.host, "gpu": w.gpu, "running": w.running,
        "state": w.agent_state,
        "gpu_uuid": w.gpu_info.as_ref().map(|g| g.uuid.clone()).unwrap_or_default(),
        "gpu_name": w.gpu_info.as_ref().map(|g| g.name.clone()).unwrap_or_default(),
        "health": health.map_or("unknown", |h| match pb::GpuHealthState::try_from(h.state) {
            Ok(pb::GpuHealthState::Healthy) => "healthy",
            Ok(pb::GpuHealthState::Unhealthy) => "unhealthy",
            _ => "unknown",
        }),
        "health_reason": health.map(|h| h.reason.clone()).unwrap_or_default(),
        "utilization_pct": health.and_then(|h| h.utilization_pct),
        "memory_used_mib": health.and_then(|h| h.memory_used_mib),
        "memory_free_mib": health.and_then(|h| h.memory_free_mib),
        "temperature_c": health.and_then(|h| h.temperature_c),
        "power_w": health.and_then(|h| h.power_w),
        "ecc_uncorrected": health.and_then(|h| h.ecc_uncorrected),
        "last_xid": health.and_then(|h| h.last_xid),
        "last_seen_ms_ago": w.last_seen_ms_ago,
    })
}

fn status_json(s: &pb::JobStatus) -> serde_json::Value {
    let name = |v: i32| {
        pb::ObjectState::try_from(v).map_or("unknown".into(), |st| format!("{st:?}").to_lowercase())
    };
    serde_json::json!({
        "job": s.job_id,
        "state": pb::JobState::try_from(s.state).map_or("unknown".into(), |st| format!("{st:?}").to_lowercase()),
        "samples_collected": s.samples_collected,
        "samples_target": s.samples_target,
        "rounds_committed": s.rounds_committed,
        "rounds_in_flight": s.rounds_in_flight,
        "failed_attempts": s.failed_attempts,
        "rounds_quarantined": s.rounds_quarantined,
        "objects": s.objects.iter().map(|o| serde_json::json!({
            "name": o.name, "state": name(o.state), "collected": o.collected, "target": o.target,
            "rounds_committed": o.rounds_committed, "rounds_in_flight": o.rounds_in_flight,
            "failed_attempts": o.failed_attempts, "rounds_quarantined": o.rounds_quarantined,
        })).collect::<Vec<_>>(),
        "workers": s.workers.iter().map(worker_json).collect::<Vec<_>>(),
    })
}
