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
//! - [`etcd_access`]: `serve`'s etcd TLS and user flags, read and checked;
//! - [`exit`]: the exit statuses (usage error, exhausted, interrupted...);
//! - [`job_input`]: job files and scale_runner-style flags to a [`JobSpec`];
//! - [`render`] and [`progress`]: what the commands print.
//!
//! [`JobSpec`]: quarry_coordinator::spec::JobSpec

pub mod args;
pub mod client;
pub mod commands;
pub mod endpoint;
pub mod etcd_access;
pub mod exit;
pub mod job_input;
pub mod progress;
pub mod render;
pub mod run;
pub mod serve;

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::exit::StopSignal;

pub use args::{
    CancelArgs, Cli, Command, JobsArgs, LegacyFlags, RunArgs, ServeArgs, StatusArgs, SubmitArgs,
};
pub use job_input::{read_job_file, spec_from, spec_from_flags};
pub use run::{RunOutcome, run};
pub use serve::serve;

/// Runs a parsed command; returns the process exit code ([`exit::ExitStatus`]). An error the
/// user must fix on the command line is an [`exit::UsageError`] (see [`exit::of_error`]).
pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(a) => run(a, CancellationToken::new(), true)
            .await
            .map(|o| o.exit_code()),
        Command::Serve(a) => serve(a, shutdown_on_signal().token).await.map(|()| 0),
        Command::Submit(a) => commands::submit(a).await,
        Command::Status(a) => commands::status(a).await,
        Command::Jobs(a) => commands::jobs(a).await,
        Command::Cancel(a) => commands::cancel(a).await,
        Command::Inspect(a) => Ok(quarry_inspect::main(&a, &mut std::io::stdout().lock())),
    }
}

/// What a Ctrl-C or SIGTERM does: `token` is cancelled, after telling the user how to
/// resume, and `signal` says which of the two came first.
pub(crate) struct SignalStop {
    pub token: CancellationToken,
    pub signal: Arc<OnceLock<StopSignal>>,
}

/// Watches for Ctrl-C (SIGINT) and SIGTERM; see [`SignalStop`].
pub(crate) fn shutdown_on_signal() -> SignalStop {
    let token = CancellationToken::new();
    let signal = Arc::new(OnceLock::new());
    let (t, which) = (token.clone(), Arc::clone(&signal));
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let got = tokio::select! {
            _ = tokio::signal::ctrl_c() => StopSignal::Interrupt,
            _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => StopSignal::Terminate,
        };
        let _ = which.set(got);
        eprintln!(
            "stopping: running rounds are stopped and released; run the same command again to resume"
        );
        t.cancel();
    });
    SignalStop { token, signal }
}
