//! Quarry's worker agent: runs the generator bound to its GPU, uploads outputs to object
//! storage and reports back to the coordinator. The `worker` binary (quarry-cli's
//! `src/bin/worker.rs`) is a thin shell over [`cli::main`];
//! [`run`] is what `coordinator run` uses in-process.

pub mod agent;
pub mod binding;
pub mod cli;
pub mod connect;
pub mod gpu;
pub mod metrics;
pub mod monitor;
pub mod runner;
pub mod scratch;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use agent::{AgentConfig, AgentError, AgentStats, Shutdown, parse_lease_batch, run_agent};

/// The GPUs the values of `flag` name (ids as `--gpu` takes them), resolved against
/// `inventory`, or the host's when `None` (NVML when it loads, see [`gpu::detect`]); ids it
/// does not list are used as given ([`gpu::resolve_lenient`]). Returns the inventory used.
pub fn select_gpus(
    inventory: Option<Arc<dyn gpu::Inventory>>,
    flag: &str,
    values: &[String],
) -> Result<(Arc<dyn gpu::Inventory>, Vec<gpu::GpuInfo>), gpu::GpuError> {
    let inventory = match inventory {
        Some(i) => i,
        None => gpu::detect()?,
    };
    let gpus = gpu::resolve_lenient(inventory.as_ref(), flag, values)?;
    Ok((inventory, gpus))
}

/// Runs one agent per GPU of `gpus` (from [`select_gpus`]) until `shutdown` is cancelled,
/// which stops them at once; returns each agent's stats.
pub async fn run(
    base: AgentConfig,
    gpus: Vec<gpu::GpuInfo>,
    shutdown: CancellationToken,
) -> Vec<Result<AgentStats, AgentError>> {
    run_gpus(base, gpus, Shutdown::immediate(shutdown)).await
}

/// Runs one agent per resolved GPU until `shutdown`; returns each agent's stats.
/// The name of the agent of GPU `gpu` (the `i`th) when a worker named `name` drives several:
/// `<name>-gpu<id>`, or `<name>-<i>` when the id does not make a valid name.
fn agent_name(name: &str, gpu: &str, i: usize) -> String {
    let named = format!("{name}-gpu{gpu}");
    if named.len() <= MAX_NAME_BYTES && quarry_common::names::validate("--name", &named).is_ok() {
        named
    } else {
        format!("{name}-{i}")
    }
}

/// Longest `--name` (the coordinator accepts agent names of up to 64 bytes; room is left for
/// a GPU suffix).
pub const MAX_NAME_BYTES: usize = 64;

pub async fn run_gpus(
    base: AgentConfig,
    gpus: Vec<gpu::GpuInfo>,
    shutdown: Shutdown,
) -> Vec<Result<AgentStats, AgentError>> {
    let n = gpus.len();
    let handles: Vec<_> = gpus
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let mut cfg = base.clone();
            if !base.name.is_empty() && n > 1 {
                cfg.name = agent_name(&base.name, &g.id, i);
            }
            cfg.gpu = g;
            cfg.agents_in_process = n;
            tokio::spawn(run_agent(cfg, shutdown.clone()))
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(match h.await {
            Ok(r) => r,
            Err(e) => Err(AgentError::Task(e.to_string())),
        });
    }
    out
}
