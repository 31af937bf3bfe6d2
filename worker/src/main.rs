use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Quarry worker agent: runs the job's generator on its GPU(s) for a coordinator.
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
struct Args {
    /// GPU id(s) to drive, comma separated; one agent each (e.g. 3 or 0,2).
    #[arg(long, value_delimiter = ',', required = true)]
    gpu: Vec<String>,
    /// Coordinator address (host:port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    coordinator: String,
    /// Run generators under this directory instead of the job's root.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when a run is stopped.
    #[arg(long, default_value = "10")]
    kill_grace: u64,
}

#[tokio::main]
async fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("QUARRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    for g in &args.gpu {
        if g == "all" {
            eprintln!(
                "error: --gpu all needs NVML GPU discovery, which this build does not have; list the ids, e.g. --gpu 0,1,2,3"
            );
            std::process::exit(2);
        }
        if let Err(e) = quarry_common::names::validate("--gpu", g) {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
    let mut cfg = quarry_worker::AgentConfig::new(args.coordinator.clone(), "");
    cfg.root_override = args.root;
    cfg.kill_grace = Duration::from_secs(args.kill_grace);
    let shutdown = CancellationToken::new();
    let t = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
        }
        t.cancel();
    });
    let mut code = 0;
    for r in quarry_worker::run(cfg, &args.gpu, shutdown).await {
        if let Err(e) = r {
            eprintln!("error: {e}");
            code = 1;
        }
    }
    std::process::exit(code);
}
