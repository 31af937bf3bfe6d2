//! The `coordinator` binary's command line: every subcommand and flag as clap types. The
//! scale_runner flags ([`LegacyFlags`]) are spelled as scale_runner spells them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use quarry_common::transport::ServerSecurityArgs;
use quarry_coordinator::spec::FinalDirMode;

use crate::client::ClientArgs;
use crate::progress::ProgressMode;

#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Quarry coordinator: turns every GPU into one data factory.",
    after_help = crate::exit::HELP
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
    #[command(after_help = crate::exit::HELP)]
    Run(RunArgs),
    /// Serve the coordinator for remote workers and `submit`.
    Serve(ServeArgs),
    /// Submit a job (a job file, or scale_runner-style flags) to a running coordinator.
    #[command(after_help = crate::exit::HELP)]
    Submit(SubmitArgs),
    /// Show a job's progress (or every job's).
    Status(StatusArgs),
    /// List the jobs a coordinator knows, one line each.
    Jobs(JobsArgs),
    /// Stop a job: no more rounds are handed out; running attempts are stopped.
    Cancel(CancelArgs),
    /// Validate a dataset (or every final of an experiment directory), print its statistics
    /// and, with --png, draw a report.
    Inspect(quarry_inspect::InspectArgs),
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
    /// Single GPU id: an index, a UUID (GPU-..., MIG-...) or all.
    #[arg(long = "gpu", default_value = "0", conflicts_with = "gpus")]
    pub gpu: String,
    /// Comma-separated GPU ids, one worker agent each (e.g. 0,1,2), each named once.
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
    /// The coordinator's and the agents' metrics on one endpoint, as `serve` and `worker`
    /// serve them between them.
    #[command(flatten)]
    pub metrics: quarry_common::metrics::MetricsArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on for workers and the CLI.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// State store: file://<path> (embedded file), etcd://host:2379[,host2:2379]/<prefix>, or
    /// etcd+tls://... (TLS to etcd; needs --etcd-ca).
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
    /// Serve the Quarry services without a bearer token or client certificates: anyone who
    /// reaches --listen can submit jobs (programs that run on the workers) and cancel them.
    /// Without this flag `serve` refuses to start unauthenticated.
    #[arg(long = "allow-unauthenticated")]
    pub allow_unauthenticated: bool,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// How `serve` reaches an etcd `--state` that requires TLS or a user. The password comes from
/// a file or the environment, never the command line (other users can read argv).
#[derive(Debug, Clone, Default, Args)]
pub struct EtcdArgs {
    /// CA (PEM) that signed etcd's server certificate; turns on TLS to etcd (as
    /// --state etcd+tls://...).
    #[arg(long = "etcd-ca", env = "QUARRY_ETCD_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// This coordinator's client certificate (PEM) for an etcd run with --client-cert-auth;
    /// needs --etcd-key and TLS.
    #[arg(long = "etcd-cert", env = "QUARRY_ETCD_CERT", value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM), readable by its owner only.
    #[arg(long = "etcd-key", env = "QUARRY_ETCD_KEY", value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// etcd user (etcd's auth enabled); the password from --etcd-password-file or the
    /// QUARRY_ETCD_PASSWORD variable.
    #[arg(long = "etcd-user", env = "QUARRY_ETCD_USER", value_name = "NAME")]
    pub user: Option<String>,
    /// File holding the etcd user's password (one line), readable by its owner only.
    #[arg(
        long = "etcd-password-file",
        env = "QUARRY_ETCD_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub password_file: Option<PathBuf>,
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
    /// Where a `coordinator run` of the job runs (the directory holding data/): without
    /// --coordinator, its address and token are read from the job's state directory there
    /// [default: the current directory].
    #[arg(long = "root")]
    pub root: Option<PathBuf>,
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
    /// Where a `coordinator run` of the job runs, as `status --root`.
    #[arg(long = "root")]
    pub root: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the answer as JSON for scripts.
    #[arg(long)]
    pub json: bool,
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
}
