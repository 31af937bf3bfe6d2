//! Quarry's command line: the `coordinator` binary above the coordinator library
//! (`quarry-coordinator`), the worker agent (`quarry-worker`, for the one-process `run`) and the
//! dataset inspector (`quarry-inspect`). `main` parses and calls [`main`]; every command is a
//! library function so tests run them in-process.
//!
//! - [`args`]: the clap types of every subcommand and flag;
//! - [`run`](mod@run): `coordinator run`, the coordinator and one agent per GPU in one process;
//! - [`serve`](mod@serve): `coordinator serve`, with the etcd leadership loop;
//! - [`commands`]: `submit`, `status`, `jobs`, `cancel` over the job service ([`client`]);
//! - [`endpoint`]: the address and token a `coordinator run` publishes for its user;
//! - [`job_input`]: job files and scale_runner-style flags to a [`JobSpec`];
//! - [`render`] and [`progress`]: what the commands print.
//!
//! [`JobSpec`]: quarry_coordinator::spec::JobSpec

pub mod args;
pub mod client;
pub mod commands;
pub mod endpoint;
pub mod job_input;
pub mod progress;
pub mod render;
pub mod run;
pub mod serve;

use tokio_util::sync::CancellationToken;

pub use args::{
    CancelArgs, Cli, Command, JobsArgs, LegacyFlags, RunArgs, ServeArgs, StatusArgs, SubmitArgs,
};
pub use job_input::{read_job_file, spec_from, spec_from_flags};
pub use run::{RunOutcome, run};
pub use serve::serve;

/// Runs a parsed command; returns the process exit code.
pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(a) => run(a, CancellationToken::new(), true)
            .await
            .map(|o| o.exit_code()),
        Command::Serve(a) => serve(a, shutdown_on_signal()).await.map(|()| 0),
        Command::Submit(a) => commands::submit(a).await,
        Command::Status(a) => commands::status(a).await,
        Command::Jobs(a) => commands::jobs(a).await,
        Command::Cancel(a) => commands::cancel(a).await,
        Command::Inspect(a) => Ok(quarry_inspect::main(&a)),
    }
}

/// A token cancelled on Ctrl-C or SIGTERM, after telling the user how to resume.
pub(crate) fn shutdown_on_signal() -> CancellationToken {
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
