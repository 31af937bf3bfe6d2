//! The client commands: `submit`, `status`, `jobs` and `cancel`, over the job service of a
//! running `coordinator serve` (following a failover to the new leader).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use quarry_proto::v1 as pb;

use crate::args::{CancelArgs, JobsArgs, StatusArgs, SubmitArgs};
use crate::client::{ClientArgs, JobClient, rpc_err};
use crate::exit;
use crate::job_input::spec_from;
use crate::progress::{self, Progress, ProgressMode};
use crate::render::{object_line, status_json, worker_line};

/// `println!` for the commands' output. A reader that went away (`coordinator status | head`)
/// ends it quietly, the command's exit status standing, where `println!` would panic; any
/// other write error is said once per line on stderr.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*)
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            eprintln!("error: writing to standard output: {e}");
        }
    }};
}

/// `coordinator submit`: sends the job; with `--watch`, follows it until it ends.
pub async fn submit(a: SubmitArgs) -> anyhow::Result<i32> {
    if a.job.is_none() && a.legacy.exp_name.is_none() {
        return Err(exit::usage(anyhow::anyhow!(
            "nothing to submit: give a job file (coordinator submit job.toml) or scale_runner-style \
             flags (--exp_name --object_code_list --target_count_per_object ...)"
        )));
    }
    let spec = spec_from(&a.legacy, a.job.as_deref(), a.root.as_deref()).map_err(exit::usage)?;
    spec.validate().map_err(exit::usage)?;
    let mut c = JobClient::new(&a.client)?;
    let resp = c.submit(&spec).await?;
    if a.json {
        out!(
            "{}",
            serde_json::json!({ "job": resp.job_id, "created": resp.created })
        );
    } else {
        out!("{}", resp.job_id);
        if !resp.created {
            eprintln!("job {} existed with the same spec; resumed", resp.job_id);
        }
    }
    if a.watch {
        let mode = if a.json {
            ProgressMode::Off
        } else {
            ProgressMode::Auto
        };
        return watch(&mut c, &resp.job_id, mode, a.json).await;
    }
    Ok(0)
}

/// Follows a job until it ends, across leader changes; exits as [`exit::of_job`] says.
async fn watch(
    c: &mut JobClient,
    job: &str,
    mode: ProgressMode,
    json: bool,
) -> anyhow::Result<i32> {
    let started = Instant::now();
    let mut progress = Progress::new(mode);
    let mut last: Option<pb::JobStatus> = None;
    // A failover ends the stream; pick it up again from the new leader (bounded).
    let mut reconnects = 0u32;
    loop {
        let mut stream = c.watch(job).await?;
        let ended = loop {
            match stream.message().await {
                Ok(Some(s)) => {
                    progress.update(&s);
                    let running = s.state == pb::JobState::Running as i32;
                    last = Some(s);
                    if !running {
                        break true;
                    }
                }
                Ok(None) => {
                    break last
                        .as_ref()
                        .is_some_and(|s| s.state != pb::JobState::Running as i32);
                }
                Err(e) if JobClient::retryable(&e) => break false,
                Err(e) => {
                    progress.finish();
                    return Err(rpc_err(e));
                }
            }
        };
        if ended {
            break;
        }
        reconnects += 1;
        if reconnects > 100 {
            progress.finish();
            bail!("lost the job's status stream {reconnects} times; giving up");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress.finish();
    let Some(s) = last else {
        bail!("no status received")
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&status_json(&s))?);
    } else {
        eprintln!(
            "{}",
            progress::summary(&s, started.elapsed(), s.workers.len())
        );
    }
    Ok(exit::of_job(s.state).code())
}

async fn fetch_jobs(c: &mut JobClient, job: Option<&str>) -> anyhow::Result<Vec<pb::JobStatus>> {
    Ok(match job {
        Some(j) => vec![
            c.call(|mut c| {
                let job_id = j.to_string();
                async move { c.get_job(pb::GetJobRequest { job_id }).await }
            })
            .await
            .map_err(rpc_err)?
            .into_inner(),
        ],
        None => {
            c.call(|mut c| async move { c.list_jobs(pb::ListJobsRequest {}).await })
                .await
                .map_err(rpc_err)?
                .into_inner()
                .jobs
        }
    })
}

/// `client` aimed at the `coordinator run` of `job` under `root` (default: the current
/// directory) when no address is given and that run published its endpoint there; and the
/// state directory it was found in.
fn local_run(
    client: &ClientArgs,
    root: Option<&Path>,
    job: Option<&str>,
) -> anyhow::Result<(ClientArgs, Option<PathBuf>)> {
    let Some(job) = job else {
        return Ok((client.clone(), None));
    };
    let root = match root {
        Some(r) => r.to_path_buf(),
        None => std::env::current_dir()?,
    };
    client.clone().or_local_run(&root, job)
}

/// A failed call, with where the endpoint came from when it was a `coordinator run`'s.
fn explain(e: anyhow::Error, found: &Option<PathBuf>) -> anyhow::Error {
    match found {
        Some(dir) => e.context(format!(
            "reaching the `coordinator run` whose address and token are in {} (has it ended?)",
            dir.display()
        )),
        None => e,
    }
}

/// `coordinator status`: one job's progress (or every job's), or `--watch` it.
pub async fn status(a: StatusArgs) -> anyhow::Result<i32> {
    let (client, found) = local_run(&a.client, a.root.as_deref(), a.job.as_deref())?;
    status_of(a, client).await.map_err(|e| explain(e, &found))
}

async fn status_of(a: StatusArgs, client: ClientArgs) -> anyhow::Result<i32> {
    let mut c = JobClient::new(&client)?;
    if a.watch {
        let job = a
            .job
            .context("--watch needs a job id: coordinator status <job> --watch")
            .map_err(exit::usage)?;
        let mode = if a.json {
            ProgressMode::Off
        } else {
            ProgressMode::Auto
        };
        return watch(&mut c, &job, mode, a.json).await;
    }
    let jobs = fetch_jobs(&mut c, a.job.as_deref()).await?;
    if a.json {
        let v: Vec<serde_json::Value> = jobs.iter().map(status_json).collect();
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    for s in &jobs {
        out!("{}", progress::line(s, Duration::from_millis(s.elapsed_ms)));
        for o in &s.objects {
            out!("{}", object_line(o));
        }
        for w in &s.workers {
            out!("{}", worker_line(w));
        }
    }
    Ok(0)
}

/// `coordinator jobs`: one line per job (or a JSON array).
pub async fn jobs(a: JobsArgs) -> anyhow::Result<i32> {
    let mut c = JobClient::new(&a.client)?;
    let jobs = fetch_jobs(&mut c, None).await?;
    if a.json {
        let v: Vec<serde_json::Value> = jobs.iter().map(status_json).collect();
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if jobs.is_empty() {
        out!("no jobs");
    }
    for s in &jobs {
        out!("{}", progress::line(s, Duration::from_millis(s.elapsed_ms)));
    }
    Ok(0)
}

/// `coordinator cancel`: stops a job.
pub async fn cancel(a: CancelArgs) -> anyhow::Result<i32> {
    let (client, found) = local_run(&a.client, a.root.as_deref(), Some(&a.job))?;
    let mut c = JobClient::new(&client).map_err(|e| explain(e, &found))?;
    let job_id = a.job.clone();
    c.call(|mut c| {
        let job_id = job_id.clone();
        async move { c.cancel_job(pb::CancelJobRequest { job_id }).await }
    })
    .await
    .map_err(|e| explain(rpc_err(e), &found))?;
    if a.json {
        out!("{}", serde_json::json!({ "job": a.job, "cancelled": true }));
    } else {
        out!("job {} cancelled", a.job);
    }
    Ok(0)
}
