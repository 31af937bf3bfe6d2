//! The `coordinator` binary: parses the command line, starts telemetry and runs the command
//! ([`quarry_cli::main`]); the exit code is the command's, or for an error the one
//! [`quarry_cli::exit::of_error`] gives (usage errors 2, others 1).

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
    let cli = quarry_cli::Cli::parse();
    let telemetry = match telemetry::init(TelemetryConfig {
        service: "quarry-coordinator",
        default_filter: "warn",
        log_format: cli.log.log_format,
        attributes: Vec::new(),
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(quarry_common::exit::ExitStatus::Usage.code());
        }
    };
    let code = match quarry_cli::main(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            quarry_cli::exit::of_error(&e).code()
        }
    };
    // Spans of the last rounds and merges go out before the exit (bounded).
    telemetry.shutdown().await;
    code
}
