//! Quarry's worker agent: runs the generator bound to its GPU, uploads outputs to object
//! storage and reports back to the coordinator. `main` is a thin shell over [`run`].

pub mod agent;
pub mod runner;

use tokio_util::sync::CancellationToken;

pub use agent::{AgentConfig, AgentStats, run_agent};

/// Runs one agent per GPU in `gpus` until `shutdown`; returns each agent's stats.
pub async fn run(
    base: AgentConfig,
    gpus: &[String],
    shutdown: CancellationToken,
) -> Vec<Result<AgentStats, agent::AgentError>> {
    let handles: Vec<_> = gpus
        .iter()
        .map(|g| {
            let mut cfg = base.clone();
            cfg.gpu = g.clone();
            tokio::spawn(run_agent(cfg, shutdown.clone()))
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        match h.await {
            Ok(r) => out.push(r),
            Err(e) => out.push(Err(agent::AgentError::BadAddress {
                addr: String::new(),
                detail: format!("agent task failed: {e}"),
            })),
        }
    }
    out
}
