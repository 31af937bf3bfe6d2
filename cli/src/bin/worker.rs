//! The `worker` binary: parses the command line, starts telemetry and runs the agent
//! ([`quarry_worker::cli::main`]); the exit code is the agent's. It is built by this package
//! (not quarry-worker) so that one package holds both of Quarry's binaries.

use clap::Parser;
use quarry_common::telemetry::{self, TelemetryConfig};

#[tokio::main]
async fn main() {
    let args = quarry_worker::cli::Args::parse();
    let telemetry = match telemetry::init(TelemetryConfig {
        service: "quarry-worker",
        default_filter: "info",
        log_format: args.log.log_format,
        // GPUs as given on the command line; each round's span names the one it ran on.
        attributes: vec![("quarry.gpus", args.gpu.join(","))],
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(quarry_common::exit::ExitStatus::Usage.code());
        }
    };
    let code = quarry_worker::cli::main(args).await;
    // Spans of the last rounds go out before the exit (bounded).
    telemetry.shutdown().await;
    std::process::exit(code);
}
