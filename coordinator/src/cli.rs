//! Command line of the `coordinator` binary. `main` parses and calls [`main`]; every command is
//! a library function so tests run them in-process.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use quarry_common::storage::Store;
use quarry_common::transport::{ServerSecurity, ServerSecurityArgs};
use quarry_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientArgs, JobClient};
use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::election::Election;
use crate::progress::{self, Progress, ProgressMode};
use crate::service::Leadership;
use crate::spec::{FinalDirMode, JobSpec};
use crate::state::RoundYield;
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
    #[command(flatten)]
    pub log: quarry_common::telemetry::LogArgs,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Run a job on this machine: coordinator plus one worker agent per GPU, in one process.
    /// Accepts scale_runner.py's flags as they are spelled.
    Run(RunArgs),
    /// Serve the coordinator for remote workers and `submit`.
    Serve(ServeArgs),
    /// Submit a job (a job file, or scale_runner-style flags) to a running coordinator.
    Submit(SubmitArgs),
    /// Show a job's progress (or every job's).
    Status(StatusArgs),
    /// List the jobs a coordinator knows, one line each.
    Jobs(JobsArgs),
    /// Stop a job: no more rounds are handed out; running attempts are stopped.
    Cancel(CancelArgs),
    /// Validate a dataset (or every final of an experiment directory), print its statistics
    /// and, with --png, draw a report.
    Inspect(crate::inspect::InspectArgs),
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
    /// Quality filter applied at merge, before the cut to the quota: keep samples for which
    /// `<field> <op> <number>` holds, e.g. --filter 'E_pen <= 0.02' (see docs/job-file.md).
    #[arg(long = "filter", value_name = "EXPR")]
    pub filter: Option<String>,
    /// Drop samples whose listed fields (comma separated) equal an earlier sample's, e.g.
    /// --dedup qpos.
    #[arg(long = "dedup", value_name = "FIELDS", value_delimiter = ',')]
    pub dedup: Option<Vec<String>>,
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
    /// Rounds each agent leases per Acquire call, 1 to 64 (1: no batching), as `worker
    /// --lease-batch`. Worth raising when rounds last much less than a second: fewer calls
    /// per round. The cost: up to N-1 leased rounds wait in an agent's queue, which can delay
    /// the job's last rounds.
    #[arg(
        long = "lease-batch",
        alias = "lease_batch",
        value_name = "N",
        default_value = "1",
        value_parser = quarry_worker::parse_lease_batch
    )]
    pub lease_batch: u32,
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
    /// Address workers and the CLI reach this process at (host:port), which standbys name
    /// as the leader's [default: the --listen address, or this host's name with its port].
    #[arg(long, env = "QUARRY_ADVERTISE")]
    pub advertise: Option<String>,
    /// Seconds the leader's etcd lease lives without renewal: how soon a standby takes over
    /// after the leader dies (etcd state only).
    #[arg(long = "election-ttl", default_value = "10")]
    pub election_ttl: u64,
    #[command(flatten)]
    pub metrics: quarry_common::metrics::MetricsArgs,
    #[command(flatten)]
    pub security: ServerSecurityArgs,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Job file (TOML; see docs/job-file.md). Without one, the job comes from the
    /// scale_runner-style flags alone (the legacy generator, as `coordinator run` builds it).
    pub job: Option<PathBuf>,
    #[command(flatten)]
    pub legacy: LegacyFlags,
    /// The job's root on the workers (where BimanGrasp-Optimization/ is) [default: the job
    /// file's directory, or the current directory].
    #[arg(long = "root")]
    pub root: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Follow progress until the job ends.
    #[arg(long)]
    pub watch: bool,
    /// Print the answer as JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Job id (its exp_name); every job when omitted.
    pub job: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Follow progress until the job ends.
    #[arg(long)]
    pub watch: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    pub job: String,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the answer as JSON for scripts.
    #[arg(long)]
    pub json: bool,
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
        Command::Jobs(a) => jobs(a).await,
        Command::Cancel(a) => {
            let mut c = JobClient::new(&a.client)?;
            let job_id = a.job.clone();
            c.call(|mut c| {
                let job_id = job_id.clone();
                async move { c.cancel_job(pb::CancelJobRequest { job_id }).await }
            })
            .await
            .map_err(rpc_err)?;
            if a.json {
                println!("{}", serde_json::json!({ "job": a.job, "cancelled": true }));
            } else {
                println!("job {} cancelled", a.job);
            }
            Ok(0)
        }
        Command::Inspect(a) => Ok(crate::inspect::main(&a)),
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
    spec_from(&a.legacy, a.job.as_deref(), a.root.as_deref())
}

/// A job spec from scale_runner-style flags over an optional job file; `root` defaults to the
/// job file's directory, or to the current directory without one.
pub fn spec_from(
    l: &LegacyFlags,
    job: Option<&Path>,
    root: Option<&Path>,
) -> anyhow::Result<JobSpec> {
    let mut spec = match job {
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
                merge: Default::default(),
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
    if let Some(v) = &l.filter {
        spec.merge.filter = Some(v.clone());
    }
    if let Some(v) = &l.dedup {
        spec.merge.dedup = v.clone();
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
    if let Some(r) = root {
        spec.root = std::path::absolute(r)?;
    } else if job.is_none() {
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
        Leadership::leading(Arc::clone(&coord)),
        listener,
        ServerSecurity::default(),
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
    let mut client = JobClient::new(&ClientArgs::plain(&addr.to_string()))?;
    let spec_json = serde_json::to_string(spec)?;
    let resp = client
        .call(|mut c| {
            let spec_json = spec_json.clone();
            async move { c.submit(pb::SubmitRequest { spec_json }).await }
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    if !resp.created {
        eprintln!("resuming experiment {} from its saved state", resp.job_id);
    }
    let mut base = quarry_worker::AgentConfig::new(addr.to_string(), "0");
    base.lease_batch = a.lease_batch;
    let agents = {
        let gpus = gpus.to_vec();
        let t = agents_stop.clone();
        tokio::spawn(async move { quarry_worker::run(base, &gpus, t).await })
    };

    let started = Instant::now();
    let mut progress = Progress::new(a.progress);
    let job_id = resp.job_id.clone();
    let mut stream = client
        .call(|mut c| {
            let job_id = job_id.clone();
            async move { c.watch_job(pb::GetJobRequest { job_id }).await }
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

/// Where `--state` keeps the coordinator's state.
#[derive(Debug, Clone, PartialEq)]
enum StateUrl {
    /// `file://<path>`: the embedded store; this process always leads.
    File(PathBuf),
    /// `etcd://host:port[,host:port...]/<prefix>`: processes elect a leader (the prefix keeps
    /// deployments apart).
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

impl StateUrl {
    fn parse(url: &str) -> anyhow::Result<StateUrl> {
        if let Some(path) = url.strip_prefix("file://") {
            return Ok(StateUrl::File(std::path::absolute(path)?));
        }
        let Some(rest) = url.strip_prefix("etcd://") else {
            bail!("--state {url:?}: use file://<path> or etcd://host:2379[,host2:2379]/prefix")
        };
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, "quarry"));
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            bail!("--state {url:?}: no etcd endpoints; use etcd://host:2379[,host2:2379]/prefix");
        }
        Ok(StateUrl::Etcd {
            endpoints,
            prefix: format!("/{}", prefix.trim_matches('/')),
        })
    }
}

/// Opens `--store`: `file://<dir>` (or a bare path) or `s3://bucket/prefix`.
fn open_store(url: &str) -> anyhow::Result<Store> {
    if url.starts_with("s3://") {
        return Ok(Store::open(url)?);
    }
    let dir = url.strip_prefix("file://").unwrap_or(url);
    Ok(Store::open_dir(&std::path::absolute(dir)?)?)
}

/// The address standbys give out for this process: `--advertise`, else the listening address
/// with this host's name in place of an unspecified IP.
fn advertised(a: &ServeArgs, local: std::net::SocketAddr) -> String {
    if let Some(adv) = &a.advertise {
        return adv.clone();
    }
    if local.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        if !host.is_empty() {
            return format!("{host}:{}", local.port());
        }
    }
    local.to_string()
}

/// How a `serve` process starts: leading at once (embedded store), or campaigning (etcd).
enum Role<'a> {
    Leading(Arc<Coordinator>),
    Campaign {
        endpoints: &'a [String],
        prefix: &'a str,
    },
}

/// `coordinator serve`: the coordinator for remote workers, until `shutdown`. With etcd state
/// it first campaigns for leadership and serves as a standby (pointing clients to the leader)
/// until it wins.
pub async fn serve(a: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state_url = StateUrl::parse(&a.state)?;
    let store = open_store(&a.store)?;
    let security = a.security.load()?;
    let lease_ttl = Duration::from_secs(a.lease_ttl.max(1));
    let listener = TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("--listen {}", a.listen))?;
    let local = listener.local_addr()?;
    let advertise = advertised(&a, local);
    let leadership = Leadership::standby();
    let metrics = Arc::new(crate::metrics::CoordMetrics::default());
    leadership.track(metrics.leader.clone());
    a.metrics
        .start(Arc::clone(&metrics.registry), shutdown.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let cfg = CoordinatorConfig {
        lease_ttl,
        // Rounds a previous leader (or a previous run) handed out may still be running on
        // remote workers: let them re-register and have them adopted before handing out more.
        adopt_window: lease_ttl,
        metrics: Arc::clone(&metrics),
        ..Default::default()
    };
    // The embedded store has no election: lead before serving, so the first call finds a
    // leader. With etcd, serve as a standby while campaigning.
    let leading = match &state_url {
        StateUrl::File(path) => {
            let state = Arc::new(EmbeddedStore::open(path)?);
            let coord =
                Coordinator::start(cfg.clone(), state, store.clone(), shutdown.child_token())
                    .await?;
            leadership.lead(Arc::clone(&coord));
            Role::Leading(coord)
        }
        StateUrl::Etcd { endpoints, prefix } => Role::Campaign { endpoints, prefix },
    };
    let server = tokio::spawn(crate::service::serve(
        Arc::clone(&leadership),
        listener,
        security,
        shutdown.clone(),
    ));
    eprintln!(
        "coordinator listening on {local} (advertised as {advertise}, store {})",
        store.url()
    );
    let mut server = server;
    let lead = async {
        match leading {
            Role::Leading(coord) => {
                shutdown.cancelled().await;
                leadership.step_down();
                coord.close().await;
                Ok(())
            }
            Role::Campaign { endpoints, prefix } => {
                lead_with_etcd(
                    endpoints,
                    prefix,
                    Duration::from_secs(a.election_ttl.max(2)),
                    &advertise,
                    cfg,
                    store,
                    &leadership,
                    &shutdown,
                )
                .await
            }
        }
    };
    tokio::pin!(lead);
    let mut finished = None;
    let led = tokio::select! {
        led = &mut lead => led,
        served = &mut server => {
            if !shutdown.is_cancelled() {
                // The server ending by itself (a TLS setup error, a crash) ends the process.
                shutdown.cancel();
                served??;
                bail!("the gRPC server stopped unexpectedly");
            }
            // A shutdown: the server may finish first; the coordinator still closes.
            finished = Some(served);
            lead.await
        }
    };
    shutdown.cancel();
    // Graceful: open calls finish and connections close; a peer that keeps its connection
    // open does not hold the process beyond a bound.
    let served = match finished {
        Some(r) => r,
        None => match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("connections still open 5 s after shutdown; closing them");
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    led?;
    served??;
    Ok(())
}

/// Campaigns, leads once elected, and returns when `shutdown` is cancelled (resigning, so a
/// standby takes over at once) or with an error when leadership is lost.
#[allow(clippy::too_many_arguments)]
async fn lead_with_etcd(
    endpoints: &[String],
    prefix: &str,
    election_ttl: Duration,
    advertise: &str,
    cfg: CoordinatorConfig,
    store: Store,
    leadership: &Arc<Leadership>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let election = Arc::new(Election::connect(endpoints, prefix, election_ttl).await?);
    // While campaigning, keep the leader's address current for the standby's answers.
    let hints = {
        let (e, l, stop) = (
            Arc::clone(&election),
            Arc::clone(leadership),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                if let Ok(leader) = e.leader().await {
                    l.set_leader_hint(leader);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        })
    };
    eprintln!("campaigning for leadership (standby until elected)");
    let leader = tokio::select! {
        won = election.campaign(advertise) => won,
        _ = shutdown.cancelled() => { hints.abort(); return Ok(()); }
    };
    hints.abort();
    let leader = leader?;
    leadership.set_leader_hint(Some(advertise.to_string()));
    let state = EtcdStore::connect(endpoints, prefix)
        .await?
        .with_fence(leader.fence());
    let coord_stop = shutdown.child_token();
    let coord = match Coordinator::start(cfg, Arc::new(state), store, coord_stop.clone()).await {
        Ok(c) => c,
        Err(e) => {
            election.resign(leader).await;
            return Err(e.into());
        }
    };
    eprintln!("elected leader; serving as {advertise}");
    leadership.lead(Arc::clone(&coord));
    let lost = tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = leader.lost.cancelled() => true,
    };
    leadership.step_down();
    coord_stop.cancel();
    coord.close().await;
    if lost {
        bail!(
            "lost leadership (the etcd lease was not renewed in time, or another coordinator \
             was elected); exiting so that this process restarts as a standby"
        );
    }
    election.resign(leader).await;
    Ok(())
}

async fn submit(a: SubmitArgs) -> anyhow::Result<i32> {
    if a.job.is_none() && a.legacy.exp_name.is_none() {
        bail!(
            "nothing to submit: give a job file (coordinator submit job.toml) or scale_runner-style \
             flags (--exp_name --object_code_list --target_count_per_object ...)"
        );
    }
    let spec = spec_from(&a.legacy, a.job.as_deref(), a.root.as_deref())?;
    spec.validate()?;
    let spec_json = serde_json::to_string(&spec)?;
    let mut c = JobClient::new(&a.client)?;
    let resp = c
        .call(|mut c| {
            let spec_json = spec_json.clone();
            async move { c.submit(pb::SubmitRequest { spec_json }).await }
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "job": resp.job_id, "created": resp.created })
        );
    } else {
        println!("{}", resp.job_id);
        if !resp.created {
            eprintln!("job {} existed with the same spec; resumed", resp.job_id);
        }
    }
    if a.watch {
        let mode = if a.json {
            ProgressMode::Off
        } else {
            ProgressMode::Auto
        };
        return watch(&mut c, &resp.job_id, mode, a.json).await;
    }
    Ok(0)
}

/// Follows a job until it ends, across leader changes; 0 when done, 2 otherwise.
async fn watch(
    c: &mut JobClient,
    job: &str,
    mode: ProgressMode,
    json: bool,
) -> anyhow::Result<i32> {
    let started = Instant::now();
    let mut progress = Progress::new(mode);
    let mut last: Option<pb::JobStatus> = None;
    // A failover ends the stream; pick it up again from the new leader (bounded).
    let mut reconnects = 0u32;
    loop {
        let mut stream = c
            .call(|mut c| {
                let job_id = job.to_string();
                async move { c.watch_job(pb::GetJobRequest { job_id }).await }
            })
            .await
            .map_err(rpc_err)?
            .into_inner();
        let ended = loop {
            match stream.message().await {
                Ok(Some(s)) => {
                    progress.update(&s);
                    let running = s.state == pb::JobState::Running as i32;
                    last = Some(s);
                    if !running {
                        break true;
                    }
                }
                Ok(None) => {
                    break last
                        .as_ref()
                        .is_some_and(|s| s.state != pb::JobState::Running as i32);
                }
                Err(e) if JobClient::retryable(&e) => break false,
                Err(e) => {
                    progress.finish();
                    return Err(rpc_err(e));
                }
            }
        };
        if ended {
            break;
        }
        reconnects += 1;
        if reconnects > 100 {
            progress.finish();
            bail!("lost the job's status stream {reconnects} times; giving up");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress.finish();
    let Some(s) = last else {
        bail!("no status received")
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
    } else {
        eprintln!(
            "{}",
            progress::summary(&s, started.elapsed(), s.workers.len())
        );
    }
    Ok(if s.state == pb::JobState::Done as i32 {
        0
    } else {
        2
    })
}

async fn fetch_jobs(c: &mut JobClient, job: Option<&str>) -> anyhow::Result<Vec<pb::JobStatus>> {
    Ok(match job {
        Some(j) => vec![
            c.call(|mut c| {
                let job_id = j.to_string();
                async move { c.get_job(pb::GetJobRequest { job_id }).await }
            })
            .await
            .map_err(rpc_err)?
            .into_inner(),
        ],
        None => {
            c.call(|mut c| async move { c.list_jobs(pb::ListJobsRequest {}).await })
                .await
                .map_err(rpc_err)?
                .into_inner()
                .jobs
        }
    })
}

async fn status(a: StatusArgs) -> anyhow::Result<i32> {
    let mut c = JobClient::new(&a.client)?;
    if a.watch {
        let job = a.job.context("--watch needs a job id")?;
        let mode = if a.json {
            ProgressMode::Off
        } else {
            ProgressMode::Auto
        };
        return watch(&mut c, &job, mode, a.json).await;
    }
    let jobs = fetch_jobs(&mut c, a.job.as_deref()).await?;
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
            let rate = progress::success_rate(o.attempts, o.successes)
                .map(|r| format!(" success {r}"))
                .unwrap_or_default();
            println!(
                "  {:<32} {:>10}/{:<10} {:<9} rounds {:>4} running {:>3} failed {:>3} quarantined {:>3}{rate}",
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

/// `coordinator jobs`: one line per job (or a JSON array).
async fn jobs(a: JobsArgs) -> anyhow::Result<i32> {
    let mut c = JobClient::new(&a.client)?;
    let jobs = fetch_jobs(&mut c, None).await?;
    if a.json {
        let v: Vec<serde_json::Value> = jobs.iter().map(status_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if jobs.is_empty() {
        println!("no jobs");
    }
    for s in &jobs {
        println!("{}", progress::line(s, Duration::from_millis(s.elapsed_ms)));
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
        "attempts": s.attempts,
        "successes": s.successes,
        "success_rate": RoundYield::rate(s.attempts, s.successes),
        "objects": s.objects.iter().map(|o| serde_json::json!({
            "name": o.name, "state": name(o.state), "collected": o.collected, "target": o.target,
            "rounds_committed": o.rounds_committed, "rounds_in_flight": o.rounds_in_flight,
            "failed_attempts": o.failed_attempts, "rounds_quarantined": o.rounds_quarantined,
            "attempts": o.attempts, "successes": o.successes,
            "success_rate": RoundYield::rate(o.attempts, o.successes),
        })).collect::<Vec<_>>(),
        "workers": s.workers.iter().map(worker_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["coordinator", "run"];
        argv.extend_from_slice(extra);
        match <Cli as clap::Parser>::try_parse_from(argv)?.command {
            Command::Run(a) => Ok(a),
            _ => panic!("not a run command"),
        }
    }

    #[test]
    fn run_takes_a_lease_batch_for_its_agents_from_1_to_64() {
        assert_eq!(run_args(&[]).unwrap().lease_batch, 1);
        assert_eq!(run_args(&["--lease-batch", "8"]).unwrap().lease_batch, 8);
        assert_eq!(run_args(&["--lease_batch", "64"]).unwrap().lease_batch, 64);
        for bad in ["0", "65", "x"] {
            let e = run_args(&["--lease-batch", bad]).unwrap_err().to_string();
            assert!(
                e.contains("--lease-batch") && e.contains("from 1 to 64"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn state_urls_parse_or_name_the_fix() {
        assert_eq!(
            StateUrl::parse("etcd://a:2379,b:2379/lab/").unwrap(),
            StateUrl::Etcd {
                endpoints: vec!["http://a:2379".into(), "http://b:2379".into()],
                prefix: "/lab".into()
            }
        );
        assert_eq!(
            StateUrl::parse("etcd://a:2379").unwrap(),
            StateUrl::Etcd {
                endpoints: vec!["http://a:2379".into()],
                prefix: "/quarry".into()
            }
        );
        assert_eq!(
            StateUrl::parse("file:///tmp/s.redb").unwrap(),
            StateUrl::File("/tmp/s.redb".into())
        );
        for bad in ["etcd:///lab", "redis://x:1", "/tmp/s.redb"] {
            let e = StateUrl::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("--state") && e.contains("etcd://host:2379"),
                "{e}"
            );
        }
    }
}
