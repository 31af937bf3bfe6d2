//! The `worker` binary: parses the command line, starts telemetry and runs the agent
//! ([`quarry_worker::cli::main`]); the exit code is the agent's. It is built by this package
//! (not quarry-worker) so that one package holds both of Quarry's binaries.

use clap::Parser;
use quarry_common::telemetry::{self, TelemetryConfig};

fn main() {
    // Started as a generator's launcher: becomes the generator here (see
    // quarry_worker::runner::launch); every other start launches its generators so.
    quarry_worker::runner::launch::answer_if_asked();
    // A re-executed libhdf5 child answers its one request and exits here, before a runtime
    // starts threads; every other start runs HDF5 operations in such children (a crash in
    // the C library then costs one round, not this process).
    quarry_formats::hdf5::child::answer_if_asked();
    quarry_worker::runner::launch::launch_through_this_binary();
    quarry_common::binary::run(quarry_formats::hdf5::child::isolate_this_binary, run());
}

async fn run() -> i32 {
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
    code
}
