//! Command line of the `worker` binary: `worker --gpu ... --coordinator ...` runs agents,
//! `worker gpus` lists this host's GPUs. Flags are documented in docs/worker.md.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::{AgentConfig, Shutdown};
use crate::connect::coordinators;
use crate::gpu::{self, INVENTORY_ENV};
use quarry_common::exit::ExitStatus;
use quarry_common::transport::ClientSecurityArgs;

/// Quarry worker agent: runs the job's generator on its GPU(s) for a coordinator.
#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    subcommand_negates_reqs = true,
    after_help = quarry_common::exit::WORKER_HELP
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// GPUs to drive, one agent each: ids (`3`, `0,2`), UUIDs (`GPU-...`) or `all` (needs NVML).
    #[arg(long, value_delimiter = ',', required = true)]
    pub gpu: Vec<String>,
    /// Coordinator address(es), `host:port`; comma-separated or repeated, tried in order.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:50051")]
    pub coordinator: Vec<String>,
    /// Run generators under this directory instead of the job's root.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when a generator is stopped.
    #[arg(long, default_value = "10")]
    pub kill_grace: u64,
    /// On SIGTERM or Ctrl-C: seconds the running rounds get to finish before they are stopped
    /// and released (a second signal stops them at once).
    #[arg(long, default_value = "30")]
    pub drain_grace: u64,
    /// Free MiB needed under the task root before a round is accepted.
    #[arg(long, default_value = "1024")]
    pub min_scratch_mib: u64,
    /// Seconds a round waits for the job's minimum free GPU memory before it is given back.
    #[arg(long, default_value = "60")]
    pub gpu_wait: u64,
    /// Bytes of generator output kept per round (head and tail), uploaded beside its outputs.
    #[arg(long, default_value = "1048576")]
    pub log_limit: usize,
    /// A simulated GPU inventory (JSON, re-read on every poll; see docs/worker.md), or `none`.
    #[arg(long, env = INVENTORY_ENV, hide = true)]
    pub gpu_inventory: Option<PathBuf>,
    /// Milliseconds between GPU health and metrics samples.
    #[arg(long, default_value = "1000", hide = true)]
    pub sample_interval_ms: u64,
    /// Do not acquire the next round while the previous one uploads (for measurements).
    #[arg(long, hide = true)]
    pub no_prefetch: bool,
    /// Rounds each agent leases per Acquire call, 1 to 64 (1: no batching). Worth raising
    /// when rounds last much less than a second and many GPUs share one coordinator: fewer
    /// calls per round (finished rounds are also reported together, and up to N upload at
    /// once). The cost: up to N-1 leased rounds wait in the agent's queue, which can delay a
    /// job's last rounds.
    #[arg(long, value_name = "N", default_value = "1", value_parser = crate::agent::parse_lease_batch)]
    pub lease_batch: u32,
    /// The name this worker registers under, kept across restarts and requeues (status and
    /// metrics show it; with several GPUs each agent adds `-gpu<id>`). Letters, digits, `.`,
    /// `_`, `-`. Default: `<host>-gpu<id>`.
    #[arg(long, env = "QUARRY_WORKER_NAME", value_parser = parse_name)]
    pub name: Option<String>,
    /// When the allocation this worker runs in ends, in seconds since the Unix epoch (Slurm
    /// 23.02+ sets SLURM_JOB_END_TIME; deploy/slurm's scripts pass it on older versions): no
    /// round is taken that the longest round so far says cannot finish before it, and the
    /// worker exits 0 once its last round is reported.
    /// An empty value counts as none.
    #[arg(long, env = "SLURM_JOB_END_TIME", value_name = "UNIX_SECONDS", value_parser = parse_end_time)]
    pub end_time: Option<EndTime>,
    #[command(flatten)]
    pub metrics: quarry_common::metrics::MetricsArgs,
    #[command(flatten)]
    pub security: ClientSecurityArgs,
    #[command(flatten)]
    pub log: quarry_common::telemetry::LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List this host's GPUs (index, UUID, name, memory, driver, utilization, health).
    Gpus {
        /// A simulated GPU inventory instead of NVML.
        #[arg(long, env = INVENTORY_ENV, hide = true)]
        gpu_inventory: Option<PathBuf>,
    },
}

/// Runs the parsed command; returns the process exit code ([`ExitStatus`]): 0 stopped after a
/// drain, 1 an agent failed, 2 a usage error (bad `--gpu`, unusable inventory, bad address).
///
/// A worker only ends when it is told to (a signal) or fails, so a signal is its normal stop
/// and exits 0, as service managers expect of a clean shutdown (systemd and Kubernetes count
/// 143 as a failure); the interrupted statuses are for `coordinator run`, whose job is left
/// unfinished.
pub async fn main(args: Args) -> i32 {
    if let Some(Command::Gpus { gpu_inventory }) = &args.command {
        return list_gpus(gpu_inventory.as_deref());
    }
    let inventory = match gpu::open(args.gpu_inventory.as_deref()) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitStatus::Usage.code();
        }
    };
    let gpus = match gpu::resolve(inventory.as_ref(), "--gpu", &args.gpu) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitStatus::Usage.code();
        }
    };
    let security = match args.security.load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitStatus::Usage.code();
        }
    };
    let addrs = args.coordinator.clone();
    if let Err(e) = coordinators(&addrs, &security) {
        eprintln!("error: {e}");
        return ExitStatus::Usage.code();
    }
    let metrics = std::sync::Arc::new(crate::metrics::WorkerMetrics::default());
    if let Err(e) = args
        .metrics
        .start(
            std::sync::Arc::clone(&metrics.registry),
            CancellationToken::new(),
        )
        .await
    {
        eprintln!("error: {e}");
        return ExitStatus::Usage.code();
    }
    info!(
        inventory = %inventory.describe(),
        gpus = %gpus.iter().map(|g| g.visible_devices()).collect::<Vec<_>>().join(","),
        "worker starting"
    );
    let mut cfg = AgentConfig::new("", "");
    cfg.coordinators = addrs;
    cfg.security = security;
    cfg.metrics = metrics;
    cfg.inventory = Some(inventory);
    cfg.root_override = args.root;
    cfg.kill_grace = Duration::from_secs(args.kill_grace);
    cfg.min_scratch_mib = args.min_scratch_mib;
    cfg.gpu_wait = Duration::from_secs(args.gpu_wait);
    cfg.log_limit = args.log_limit;
    cfg.sample_interval = Duration::from_millis(args.sample_interval_ms.max(10));
    cfg.prefetch = !args.no_prefetch;
    cfg.lease_batch = args.lease_batch;
    cfg.name = args.name.unwrap_or_default();
    cfg.deadline = args.end_time.and_then(|e| e.0).map(|s| {
        std::sync::Arc::new(crate::agent::Deadline::new(
            std::time::UNIX_EPOCH + Duration::from_secs(s),
        ))
    });
    let shutdown = Shutdown::new();
    drain_on_signals(&shutdown, Duration::from_secs(args.drain_grace));
    let mut status = ExitStatus::Done;
    for r in crate::run_gpus(cfg, gpus, shutdown).await {
        match r {
            Ok(stats) => info!(?stats, "agent stopped"),
            Err(e) => {
                eprintln!("error: {e}");
                status = ExitStatus::Error;
            }
        }
    }
    status.code()
}

fn list_gpus(inventory: Option<&std::path::Path>) -> i32 {
    let inv = match gpu::open(inventory) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitStatus::Usage.code();
        }
    };
    match inv.list() {
        Ok(gpus) if gpus.is_empty() => {
            println!("no GPUs ({})", inv.describe());
            ExitStatus::Done.code()
        }
        Ok(gpus) => {
            print!("{}", gpu::table(inv.as_ref(), &gpus));
            ExitStatus::Done.code()
        }
        Err(e) => {
            eprintln!(
                "error: {e}: cannot list GPUs; explicit ids still work (worker --gpu 0,1), with health unknown"
            );
            ExitStatus::Error.code()
        }
    }
}

/// `--end-time`: seconds since the Unix epoch; empty (an unset-but-exported variable) is none.
#[derive(Debug, Clone, Copy)]
pub struct EndTime(Option<u64>);

fn parse_end_time(s: &str) -> Result<EndTime, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(EndTime(None));
    }
    s.parse::<u64>().map(|v| EndTime(Some(v))).map_err(|_| {
        format!("{s:?} is not a time in seconds since the Unix epoch (date +%s prints one)")
    })
}

/// `--name`: a valid name short enough for the coordinator's bound.
fn parse_name(s: &str) -> Result<String, String> {
    let limit = crate::MAX_NAME_BYTES - 8;
    if s.len() > limit {
        return Err(format!("{} bytes; at most {limit}", s.len()));
    }
    quarry_common::names::validate("--name", s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// First SIGTERM/SIGINT: drain (stop acquiring, let running rounds finish) and stop after
/// `grace`; a second signal stops at once.
fn drain_on_signals(shutdown: &Shutdown, grace: Duration) {
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        next_signal(&mut term, &mut int).await;
        warn!(
            grace_s = grace.as_secs(),
            "draining: no new rounds; running rounds get --drain-grace to finish, then are stopped and released (signal again to stop now)"
        );
        s.drain.cancel();
        let stop = s.stop.clone();
        let timer = CancellationToken::new();
        let t = timer.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {
                    warn!("drain grace period over: stopping running rounds and releasing them");
                    stop.cancel();
                }
                _ = t.cancelled() => {}
            }
        });
        next_signal(&mut term, &mut int).await;
        warn!("second signal: stopping running rounds now");
        timer.cancel();
        s.stop.cancel();
    });
}

async fn next_signal(
    term: &mut Option<tokio::signal::unix::Signal>,
    int: &mut Option<tokio::signal::unix::Signal>,
) {
    async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
        match s.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        _ = recv(term) => {}
        _ = recv(int) => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec!["worker", "--gpu", "0"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn lease_batch_defaults_to_one_and_takes_1_to_64() {
        assert_eq!(parse(&[]).unwrap().lease_batch, 1);
        for n in ["1", "4", "64"] {
            assert_eq!(
                parse(&["--lease-batch", n])
                    .unwrap()
                    .lease_batch
                    .to_string(),
                n
            );
        }
    }

    #[test]
    fn a_lease_batch_out_of_range_names_the_flag_and_its_range() {
        for bad in ["0", "65", "-1", "four", "1.5", ""] {
            let e = parse(&[&format!("--lease-batch={bad}")])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("--lease-batch") && e.contains("from 1 to 64"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn an_agent_refuses_a_lease_batch_out_of_range() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for bad in [0, quarry_common::transport::MAX_ROUNDS_PER_CALL as u32 + 1] {
            let mut cfg = AgentConfig::new("127.0.0.1:1", "0");
            cfg.lease_batch = bad;
            let e = rt
                .block_on(crate::run_agent(cfg, Shutdown::new()))
                .unwrap_err();
            assert!(e.to_string().contains("--lease-batch"), "{bad}: {e}");
        }
    }
}
