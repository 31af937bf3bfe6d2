//! One round on this agent: where its files go, the generator run bound to the GPU, and what
//! happens after (inspect, upload to the attempt's staging prefix with the run's log, report
//! to the coordinator, remove local files).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quarry_common::storage::keys;
use quarry_proto::v1 as pb;
use tokio_util::sync::DropGuard;
use tracing::{Instrument, debug, field::Empty, info, info_span, warn};

use super::Counters;
use super::output;
use super::session::{COMPLETE_WAIT, Held, Session};
use crate::binding;
use crate::gpu::RoundStats;
use crate::runner::warm::WarmSpec;
use crate::runner::{self, RunError, RunOutcome, RunReport, RunSpec};

/// Name of the generator's log under the attempt's staging prefix. Output names end in
/// `.npy`, so it cannot collide with one.
pub const LOG_NAME: &str = "generator.log";
/// Lines of the log's tail sent with a failure.
const TAIL_LINES: usize = 20;

/// How long a generator that died of SIGTERM or SIGINT waits for the same signal to drain its
/// agent before it is judged a failure. Slurm (scancel, requeue, preemption) and service
/// managers signal a job's processes one by one: the generator may die, and be reaped, before
/// the agent's own signal has been handled.
const SIGNAL_SKEW: Duration = Duration::from_secs(2);

/// Where a round's files are on this worker.
#[derive(Clone)]
pub(super) struct Paths {
    pub root: PathBuf,
    pub cwd: PathBuf,
    pub outs: Vec<PathBuf>,
    pub round_dir: Option<PathBuf>,
    /// The generator's yield sidecar, when the job names one.
    pub stats: Option<PathBuf>,
}

impl Paths {
    /// Resolves the task's paths under its root (or the worker's `--root`); refuses `..`.
    pub fn resolve(root_override: Option<&Path>, lease: &pb::Lease) -> Result<Paths, String> {
        let task = lease.task.as_ref().ok_or("lease carries no task")?;
        let root = root_override.map_or_else(|| PathBuf::from(&task.root), Path::to_path_buf);
        let resolve = |rel: &str| -> Result<PathBuf, String> {
            let p = Path::new(rel);
            if p.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err(format!("path {rel:?} leaves the task root"));
            }
            Ok(if p.is_absolute() {
                p.to_path_buf()
            } else {
                root.join(p)
            })
        };
        let cwd = resolve(&task.cwd)?;
        let outs = task
            .outputs
            .iter()
            .map(|o| resolve(&o.path))
            .collect::<Result<Vec<_>, _>>()?;
        let round_dir = if task.round_dir.is_empty() {
            None
        } else {
            Some(resolve(&task.round_dir)?)
        };
        let stats = if task.stats_path.is_empty() {
            None
        } else {
            Some(resolve(&task.stats_path)?)
        };
        Ok(Paths {
            root,
            cwd,
            outs,
            round_dir,
            stats,
        })
    }
}

/// A generator run that ended, with the GPU figures sampled while it ran.
pub(super) struct Ran {
    pub run: Result<RunReport, RunError>,
    pub stats: RoundStats,
}

/// Runs the round's generator bound to this agent's GPU until it exits, times out or the
/// lease is stopped.
///
/// `finish_waits` holds the previous round's finish back: it is let go once this round's
/// process is started (or the round is handed to the warm process).
pub(super) async fn run_generator(
    s: &Session,
    held: &Held,
    paths: &Paths,
    finish_waits: Option<DropGuard>,
) -> Ran {
    let lease = &held.lease;
    let task = lease.task.clone().unwrap_or_default();
    // A previous attempt's leftovers must not pass for this attempt's output.
    for o in &paths.outs {
        output::remove_stale(o);
    }
    if let Some(p) = &paths.stats {
        let _ = std::fs::remove_file(p);
    }
    let job_env: Vec<(String, String)> = task
        .env
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    let gpu = s.monitor.gpu();
    let mut env = binding::environment(
        gpu,
        task.bind_gpu,
        Some(task.threads_per_gpu),
        s.cfg.agents_in_process,
        &job_env,
    );
    let argv: Vec<String> = task
        .argv
        .iter()
        .map(|a| a.replace("{gpu}", &gpu.id))
        .collect();
    let timeout = (task.timeout_ms > 0).then(|| Duration::from_millis(task.timeout_ms));
    debug!(object = %lease.object, round = lease.round, seed = lease.seed, "generator starting");
    let run = if task.mode == "warm" {
        // The process outlives the round: it gets no per-round variables (its rounds carry
        // them in their JSON line).
        let spec = WarmSpec {
            argv,
            cwd: paths.cwd.clone(),
            env,
            kill_grace: s.cfg.kill_grace,
            log_limit: s.cfg.log_limit,
        };
        // A round line is a pipe write: nothing for the previous finish to slow down.
        drop(finish_waits);
        let mut slot = s.warm.lock().await;
        s.monitor.begin_round();
        slot.run(spec, lease, &task, paths, &job_env, timeout, &held.stop)
            .await
    } else {
        env.push(("QUARRY_SEED".into(), lease.seed.to_string()));
        env.push(("QUARRY_ROUND".into(), lease.round.to_string()));
        env.push(("QUARRY_ATTEMPT".into(), lease.attempt.clone()));
        env.push(("QUARRY_OBJECT".into(), lease.object.clone()));
        let spec = RunSpec {
            argv,
            cwd: paths.cwd.clone(),
            env,
            timeout,
            kill_grace: s.cfg.kill_grace,
            log_limit: s.cfg.log_limit,
            spawned: finish_waits.map(DropGuard::disarm),
            // The next round starts while this one's escaped processes are swept; `finish`
            // waits for the sweep before it reads the outputs.
            defer_sweep: true,
        };
        s.monitor.begin_round();
        runner::run(&spec, held.stop.clone()).await
    };
    let stats = s.monitor.end_round().await;
    tracing::Span::current().record(
        "outcome",
        match &run {
            Ok(r) => match r.outcome {
                RunOutcome::Exited(0) => "ok".to_string(),
                RunOutcome::Exited(c) => format!("exit {c}"),
                RunOutcome::Signaled(sig) => format!("signal {sig}"),
                RunOutcome::TimedOut => "timeout".into(),
                RunOutcome::Cancelled => "cancelled".into(),
                RunOutcome::Failed => "failed".into(),
                RunOutcome::AuditMismatch => "audit mismatch".into(),
            },
            Err(_) => "spawn".into(),
        },
    );
    Ran { run, stats }
}

/// What became of a run.
enum Outcome {
    Uploaded {
        files: Vec<pb::UploadedFile>,
        log_key: String,
        yield_stats: Option<pb::RoundYield>,
    },
    Failed {
        kind: pb::FailureKind,
        message: String,
    },
    Stopped,
}

/// Inspects and uploads a finished run, reports it, and removes its local files.
pub(super) async fn finish(s: &Arc<Session>, held: &Held, paths: &Paths, ran: Ran) {
    let lease = &held.lease;
    let task = lease.task.clone().unwrap_or_default();
    let mut report = match ran.run {
        Ok(r) => r,
        Err(e) => {
            s.report_failure(
                held,
                pb::FailureKind::Spawn,
                e.to_string(),
                String::new(),
                0,
            )
            .await;
            return;
        }
    };
    // No process of the run may still write its outputs once they are read.
    report.leftovers.swept().await;
    let generator_ms = report.duration.as_millis() as u64;
    if let Some(d) = &s.cfg.deadline {
        d.observe(report.duration);
    }
    // Whether the signal that stopped the generator is draining this agent too.
    let drained = match report.outcome {
        RunOutcome::Signaled(libc::SIGTERM | libc::SIGINT) | RunOutcome::Exited(130 | 143) => {
            tokio::time::timeout(SIGNAL_SKEW, s.shutdown.drain.cancelled())
                .await
                .is_ok()
        }
        _ => false,
    };
    let outcome = match report.outcome {
        RunOutcome::Cancelled => Outcome::Stopped,
        // The agent drains because it was told to stop (SIGTERM, Ctrl-C), and the same signal
        // reached the generator: Slurm's scancel and preemption, and service managers that
        // signal every process of a job or unit, do that (the generator possibly first:
        // `SIGNAL_SKEW`). The round stopped with the agent; it is given back, not failed.
        RunOutcome::Signaled(sig @ (libc::SIGTERM | libc::SIGINT)) if drained => {
            info!(object = %lease.object, round = lease.round, signal = sig, "the generator was stopped by the signal that drains this agent; giving the round back");
            Outcome::Stopped
        }
        RunOutcome::Exited(code @ (130 | 143)) if drained => {
            info!(object = %lease.object, round = lease.round, code, "the generator exited on the signal that drains this agent; giving the round back");
            Outcome::Stopped
        }
        RunOutcome::TimedOut => Outcome::Failed {
            kind: pb::FailureKind::Timeout,
            message: format!(
                "generator ran past its timeout of {} s and was killed",
                task.timeout_ms / 1000
            ),
        },
        RunOutcome::Exited(0) => {
            // A stop (fence, shutdown, the coordinator's order) does not cut the upload short:
            // the store writes from a blocking thread that a dropped future would not stop, so
            // a file could land after the staging was discarded below and stay forever. The
            // upload finishes (bounded by the store's own timeouts), then a stopped lease's
            // files are deleted.
            let span = info_span!(
                parent: &held.span,
                "upload",
                bytes = Empty,
                samples = Empty,
                files = task.outputs.len(),
            );
            upload(s, lease, &task, paths, &report)
                .instrument(span)
                .await
        }
        RunOutcome::Exited(code) => Outcome::Failed {
            kind: pb::FailureKind::Exit,
            message: format!("generator exited with status {code}"),
        },
        RunOutcome::Signaled(sig) => Outcome::Failed {
            kind: pb::FailureKind::Exit,
            message: format!("generator killed by signal {sig}"),
        },
        RunOutcome::AuditMismatch => Outcome::Failed {
            kind: pb::FailureKind::AuditMismatch,
            message: report.reason.clone().unwrap_or_default(),
        },
        RunOutcome::Failed => Outcome::Failed {
            kind: pb::FailureKind::Exit,
            message: format!(
                "warm generator failed the round: {}",
                report.reason.as_deref().unwrap_or("no reason given")
            ),
        },
    };
    // Files uploaded by a lease that was stopped or lost before its Complete was sent are
    // discarded: nobody will commit them.
    let outcome = match outcome {
        Outcome::Uploaded { .. } if held.stop.is_cancelled() => Outcome::Stopped,
        o => o,
    };
    if matches!(outcome, Outcome::Stopped)
        && !task.staging_prefix.is_empty()
        && let Err(e) = s.store.delete_prefix(&task.staging_prefix).await
    {
        warn!(prefix = %task.staging_prefix, error = %e, "could not discard a stopped attempt's staging");
    }
    match outcome {
        Outcome::Uploaded {
            files,
            log_key,
            yield_stats,
        } => {
            let reported = Reported {
                files,
                log_key,
                yield_stats,
                generator_ms,
            };
            complete(s, held, reported, &ran.stats).await;
        }
        Outcome::Failed { kind, message } => {
            let key = keys::log(
                &lease.job_id,
                &lease.object,
                lease.round,
                lease.seed,
                &lease.attempt,
            );
            if let Err(e) = s.store.put_bytes(&key, report.log.to_bytes()).await {
                debug!(error = %e, "could not upload the failed attempt's log");
            }
            let tail = report.log.tail_lines(TAIL_LINES);
            s.report_failure(held, kind, message, tail, generator_ms)
                .await;
        }
        Outcome::Stopped => {
            // Released, not failed: on drain or shutdown the round is re-issued at once; when
            // the coordinator ordered the stop (round committed elsewhere, job cancelled) the
            // release just ends the lease. A lost session cannot release (see give_back).
            let reason = if s.shutdown.stop.is_cancelled() {
                "agent shutting down"
            } else if s.is_lost() {
                "agent fenced"
            } else if s.shutdown.drain.is_cancelled() && !held.stop.is_cancelled() {
                "agent draining: the generator was stopped by the same signal"
            } else {
                "stopped by the coordinator"
            };
            if s.is_lost() && !s.shutdown.stop.is_cancelled() {
                info!(object = %lease.object, round = lease.round, "run stopped and staging discarded (fenced)");
            }
            s.give_back(held, reason).await;
        }
    }
    if !task.keep_intermediate {
        match &paths.round_dir {
            Some(d) => {
                if let Err(kept) = super::round_dir::remove(d, &paths.root) {
                    warn!(dir = %d.display(), why = ?kept, "not removing the round directory: it is not a round's (an experiment's or the job root)");
                }
            }
            None => {
                for o in &paths.outs {
                    output::remove_stale(o);
                }
            }
        }
        if let Some(p) = &paths.stats {
            let _ = std::fs::remove_file(p);
        }
    }
    // A staging directory (with an archive, a transport copy) is never kept.
    for o in &paths.outs {
        let _ = std::fs::remove_dir_all(output::staging_dir(o));
    }
}

/// What a successful run reports.
struct Reported {
    files: Vec<pb::UploadedFile>,
    log_key: String,
    yield_stats: Option<pb::RoundYield>,
    generator_ms: u64,
}

async fn complete(s: &Arc<Session>, held: &Held, reported: Reported, stats: &RoundStats) {
    let Reported {
        files,
        log_key,
        yield_stats,
        generator_ms,
    } = reported;
    let lease = &held.lease;
    held.span
        .record("bytes", files.iter().map(|f| f.size).sum::<u64>());
    if let Some(f) = files.first() {
        held.span.record("samples", f.count);
    }
    // Once sent, a Complete may commit: its files must never be deleted here, even if the
    // session is lost while waiting for the answer. A stop waits for the answer (bounded), so
    // the coordinator either commits the files or deletes them; only a lost session, whose
    // coordinator is unreachable, gives up on it. A coordinator that became unavailable (a
    // failover) gets the report again through the new leader, which adopted the lease; a
    // commit that did land is recognised there as this attempt's own.
    // Completions ready together go in one CompleteBatch (see `Session::complete`); a
    // per-round error there is this round's Complete failing with that status.
    let answer = s
        .report("reporting completion", &held.span, COMPLETE_WAIT, |_conn| {
            let req = pb::CompleteRequest {
                // Filled in by the sender, for the coordinator it reaches.
                worker_id: String::new(),
                worker_secret: String::new(),
                lease_id: lease.lease_id,
                files: files.clone(),
                generator_ms,
                gpu_stats: stats.to_proto(),
                log_key: log_key.clone(),
                yield_stats,
                // Metadata when sent alone; filled in by the sender in a CompleteBatch.
                traceparent: String::new(),
            };
            s.complete(req, held.span.clone())
        })
        .await;
    let committed = match answer {
        Some(Ok(Ok(r))) => {
            let committed = r.outcome == pb::CommitOutcome::Committed as i32;
            held.span
                .record("outcome", if committed { "committed" } else { "rejected" });
            s.cfg.metrics.round(if committed {
                crate::metrics::Outcome::Committed
            } else {
                crate::metrics::Outcome::Rejected
            });
            if !committed {
                info!(object = %lease.object, round = lease.round, message = %r.message, "attempt not committed");
            }
            committed
        }
        Some(Ok(Err(e))) => {
            held.span.record("outcome", "unreported");
            warn!(object = %lease.object, round = lease.round, error = %e, "could not report completion");
            false
        }
        Some(Err(_)) => {
            warn!(object = %lease.object, round = lease.round, "reporting completion timed out");
            false
        }
        None => false,
    };
    Counters::bump(if committed {
        &s.counters.committed
    } else {
        &s.counters.failed
    });
}

/// Validates each output and uploads it, then the run's log, under the staging prefix.
async fn upload(
    s: &Session,
    lease: &pb::Lease,
    task: &pb::Task,
    paths: &Paths,
    report: &RunReport,
) -> Outcome {
    let yield_stats = match &paths.stats {
        Some(p) => match output::read_yield(p, &task.stats_path) {
            Ok(y) => Some(y),
            Err(r) => {
                return Outcome::Failed {
                    kind: r.kind,
                    message: r.message,
                };
            }
        },
        None => None,
    };
    let mut files = Vec::with_capacity(paths.outs.len());
    for (spec, path) in task.outputs.iter().zip(&paths.outs) {
        let (sp, p) = (spec.clone(), path.clone());
        let checked = match tokio::task::spawn_blocking(move || output::check(&sp, &p)).await {
            Ok(Ok(c)) => c,
            Ok(Err(r)) => {
                return Outcome::Failed {
                    kind: r.kind,
                    message: r.message,
                };
            }
            Err(e) => {
                return Outcome::Failed {
                    kind: pb::FailureKind::OutputInvalid,
                    message: e.to_string(),
                };
            }
        };
        let key = format!("{}/{}", task.staging_prefix, spec.name);
        let put = match &checked.upload {
            // The bytes that were hashed and inspected.
            output::Upload::Memory { data, digest } => s
                .store
                .put_bytes(&key, data.clone())
                .await
                .map(|()| digest.clone()),
            // Uploaded from the handle that was hashed before inspection, never re-opened by
            // name.
            output::Upload::Staged { hashed, .. } => match hashed.file.try_clone() {
                Ok(f) => s.store.put_open_file(&key, f, &checked.path).await,
                Err(e) => Err(quarry_common::storage::StoreError::Io {
                    op: "read",
                    path: checked.path.display().to_string(),
                    source: e,
                }),
            },
        };
        if let Ok(up) = &put
            && let Err(r) = checked.verify(&spec.path, up)
        {
            warn!(object = %lease.object, round = lease.round, reason = %r.message, "output changed after inspection");
            let _ = s.store.delete_prefix(&task.staging_prefix).await;
            return Outcome::Failed {
                kind: r.kind,
                message: r.message,
            };
        }
        match put {
            Ok(up) => {
                s.cfg.metrics.uploaded(up.size);
                files.push(pb::UploadedFile {
                    name: spec.name.clone(),
                    key,
                    size: up.size,
                    sha256: up.sha256,
                    count: checked.count,
                    schema: checked.schema,
                    kept: Some(checked.kept),
                })
            }
            Err(e) => {
                s.cfg.metrics.store_error();
                let _ = s.store.delete_prefix(&task.staging_prefix).await;
                return Outcome::Failed {
                    kind: pb::FailureKind::Upload,
                    message: e.to_string(),
                };
            }
        }
    }
    // The log goes beside the outputs; a log that cannot be stored does not fail the round.
    let log_key = format!("{}/{LOG_NAME}", task.staging_prefix);
    let log_key = match s.store.put_bytes(&log_key, report.log.to_bytes()).await {
        Ok(_) => log_key,
        Err(e) => {
            warn!(key = %log_key, error = %e, "could not upload the generator's log");
            String::new()
        }
    };
    debug!(object = %lease.object, round = lease.round, "outputs uploaded");
    let span = tracing::Span::current();
    span.record("bytes", files.iter().map(|f| f.size).sum::<u64>());
    if let Some(f) = files.first() {
        span.record("samples", f.count);
    }
    Outcome::Uploaded {
        files,
        log_key,
        yield_stats,
    }
}
