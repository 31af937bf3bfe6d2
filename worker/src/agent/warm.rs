//! The agent's warm generator (`generator.mode = "warm"`): started once, handed the agent's
//! rounds one JSON line at a time, and restarted whenever a fresh process would have been
//! safer: after it died, timed out or was stopped mid-round, after `recycle_after_rounds`,
//! once its process group holds more than `recycle_above_memory_mib` of host memory or more
//! than `recycle_above_gpu_memory_mib` of the agent's GPU (as the GPU inventory lists its
//! processes), and when a round of another generator (argv, cwd, environment) comes. Every
//! start is counted by reason in `quarry_worker_generator_starts_total`.
//!
//! `generator.audit`: a round the coordinator marked is, once done, re-run cold in a fresh
//! process with the same round line (the warm outputs set aside meanwhile), and the outputs'
//! digests compared (see [`super::audit`]).
//!
//! A generator that dies before answering its first round, or cannot be spawned at all,
//! failed to start; after [`MAX_START_FAILURES`] such failures in a row the agent leaves
//! rotation (see [`Slot::out_of_rotation`]) rather than burn every round it is given.

use std::sync::Arc;
use std::time::Duration;

use quarry_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::audit::audit_round;
use super::round::Paths;
use crate::gpu::{GpuInfo, Inventory};
use crate::metrics::{StartReason, WorkerMetrics};
use crate::runner::warm::{WarmProcess, WarmSpec};
use crate::runner::{RunError, RunOutcome, RunReport};

/// Failed starts in a row after which the agent takes no more rounds.
pub const MAX_START_FAILURES: u32 = 3;

/// The agent's warm generator, kept across rounds (and sessions).
pub struct Slot {
    process: Option<WarmProcess>,
    /// Why the next start happens when no process runs: first, or after one died mid-round.
    next_start: StartReason,
    metrics: Arc<WorkerMetrics>,
    /// The agent's GPU id, the metrics' label.
    gpu: String,
    /// The agent's GPU and where its processes are listed, for the GPU-memory ceiling.
    gpu_info: GpuInfo,
    inventory: Arc<dyn Inventory>,
    /// Starts in a row that ended before the process answered a round.
    start_failures: u32,
    /// Whether the current process has answered a round yet.
    answered: bool,
    out_of_rotation: Option<String>,
}

impl Slot {
    pub fn new(metrics: Arc<WorkerMetrics>, gpu: GpuInfo, inventory: Arc<dyn Inventory>) -> Slot {
        Slot {
            process: None,
            next_start: StartReason::First,
            metrics,
            gpu: gpu.id.clone(),
            gpu_info: gpu,
            inventory,
            start_failures: 0,
            answered: false,
            out_of_rotation: None,
        }
    }

    /// Set once the generator failed to start [`MAX_START_FAILURES`] times in a row: why the
    /// agent takes no more rounds.
    pub fn out_of_rotation(&self) -> Option<&str> {
        self.out_of_rotation.as_deref()
    }

    /// Stops the warm generator, if one runs (shutdown).
    pub async fn shut_down(&mut self) {
        if let Some(p) = self.process.take() {
            p.shut_down().await;
        }
    }

    /// Runs one leased round on the warm generator started from `spec`, then, when the
    /// coordinator marked it for audit and it is done, its cold re-run (see [`audit_round`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &mut self,
        spec: WarmSpec,
        lease: &pb::Lease,
        task: &pb::Task,
        paths: &Paths,
        job_env: &[(String, String)],
        limit: Option<Duration>,
        stop: &CancellationToken,
    ) -> Result<RunReport, RunError> {
        let line = request(lease, task, paths, &spec.argv, job_env);
        let audit = task.audit.then(|| spec.clone());
        let mut report = self.round(spec, &line, task, limit, stop).await?;
        if let Some(spec) = audit
            && report.outcome == RunOutcome::Exited(0)
        {
            self.metrics
                .generator_started(&self.gpu, StartReason::Audit);
            // The same line: the cold process writes where the warm one did.
            audit_round(&mut report, spec, &line, paths, lease, limit, stop).await;
            self.metrics.audit(match report.outcome {
                RunOutcome::Exited(0) => "matched",
                RunOutcome::AuditMismatch => "differed",
                _ => "inconclusive",
            });
        }
        Ok(report)
    }

    /// Runs one round on the warm generator, starting (or restarting) it first when needed.
    async fn round(
        &mut self,
        spec: WarmSpec,
        request: &str,
        task: &pb::Task,
        limit: Option<Duration>,
        stop: &CancellationToken,
    ) -> Result<RunReport, RunError> {
        let exited = self.process.as_mut().is_some_and(WarmProcess::exited);
        let restart_why = match &self.process {
            None => None,
            Some(_) if exited => Some(StartReason::Exited),
            Some(p) if p.spec() != &spec => Some(StartReason::OtherGenerator),
            Some(p) if task.recycle_after_rounds > 0 && p.served() >= task.recycle_after_rounds => {
                Some(StartReason::Recycle)
            }
            Some(p)
                if task.recycle_above_memory_mib > 0
                    && over_memory(p, task.recycle_above_memory_mib) =>
            {
                Some(StartReason::Memory)
            }
            Some(p) if task.recycle_above_gpu_memory_mib > 0 => {
                let over = over_gpu_memory(
                    p.group_id(),
                    Arc::clone(&self.inventory),
                    self.gpu_info.clone(),
                    task.recycle_above_gpu_memory_mib,
                )
                .await;
                over.then_some(StartReason::GpuMemory)
            }
            Some(_) => None,
        };
        if let Some(why) = restart_why
            && let Some(p) = self.process.take()
        {
            info!(
                reason = why.label(),
                served = p.served(),
                "restarting the warm generator"
            );
            p.shut_down().await;
            self.next_start = why;
        }
        if self.process.is_none() {
            self.metrics.generator_started(&self.gpu, self.next_start);
            match WarmProcess::start(spec).await {
                Ok(p) => {
                    self.process = Some(p);
                    self.answered = false;
                }
                Err(e) => {
                    self.start_failed(&e.to_string());
                    return Err(e);
                }
            }
        }
        let Some(process) = self.process.as_mut() else {
            // Unreachable: a process was just started or kept above.
            return Err(RunError::EmptyArgv);
        };
        let ran = process.round(request, limit, stop).await;
        let replied = matches!(
            ran.report.outcome,
            RunOutcome::Exited(0) | RunOutcome::Failed
        ) && ran.alive;
        if replied {
            self.answered = true;
            self.start_failures = 0;
        } else {
            self.process = None;
            self.next_start = if self.answered {
                StartReason::Died
            } else {
                StartReason::First
            };
            let died = matches!(
                ran.report.outcome,
                RunOutcome::Exited(_) | RunOutcome::Signaled(_)
            );
            if died && !self.answered {
                let tail = ran.report.log.tail_lines(5);
                self.start_failed(&format!(
                    "it ended ({:?}) before answering a round; its output: {tail}",
                    ran.report.outcome
                ));
            }
        }
        Ok(ran.report)
    }

    fn start_failed(&mut self, why: &str) {
        self.next_start = StartReason::First;
        self.start_failures += 1;
        warn!(failures = self.start_failures, error = %why, "warm generator failed to start");
        if self.start_failures >= MAX_START_FAILURES {
            self.out_of_rotation = Some(format!(
                "out of rotation: the warm generator failed to start {} times in a row; last: {why}. Fix the job's generator (try its argv by hand with QUARRY_WARM unset) and restart this worker",
                self.start_failures
            ));
        }
    }
}

/// Whether the process group of `p` holds more resident memory than `ceiling_mib`. A
/// `/proc` that cannot be read keeps the process (the ceiling is a bound on leaks, not a
/// safety check).
fn over_memory(p: &WarmProcess, ceiling_mib: u64) -> bool {
    match p.resident_bytes() {
        Ok(bytes) => {
            let over = bytes > ceiling_mib.saturating_mul(1 << 20);
            if over {
                info!(
                    resident_mib = bytes >> 20,
                    ceiling_mib, "the warm generator is over its memory ceiling"
                );
            }
            over
        }
        Err(e) => {
            warn!(error = %e, "cannot read the warm generator's memory; keeping it");
            false
        }
    }
}

/// Whether the processes of group `pgid` hold more of `gpu`'s memory than `ceiling_mib`,
/// as `inventory` lists them (off the async threads: NVML calls and `/proc` walks block). A
/// figure that cannot be read (no inventory, an NVML error, a garbled inventory file, a
/// member whose usage the driver does not report) keeps the process, as an unreadable
/// `/proc` does for the host ceiling.
async fn over_gpu_memory(
    pgid: Option<u32>,
    inventory: Arc<dyn Inventory>,
    gpu: GpuInfo,
    ceiling_mib: u64,
) -> bool {
    let Some(pgid) = pgid else {
        return false;
    };
    let held = tokio::task::spawn_blocking(move || {
        let pids = crate::runner::memory::group_pids(pgid)
            .map_err(|e| format!("cannot list its process group in /proc: {e}"))?;
        let on_gpu = inventory.processes(&gpu).map_err(|e| {
            format!(
                "{} cannot list the GPU's processes: {e}",
                inventory.describe()
            )
        })?;
        crate::gpu::held_by(&on_gpu, &pids)
            .map(|mib| (mib, pids.len()))
            .ok_or_else(|| {
                "the driver does not report the GPU memory of one of its processes".to_string()
            })
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match held {
        Ok((held_mib, processes)) => {
            let over = held_mib > ceiling_mib;
            if over {
                info!(
                    gpu_memory_mib = held_mib,
                    ceiling_mib, processes, "the warm generator is over its GPU memory ceiling"
                );
            }
            over
        }
        Err(why) => {
            warn!(error = %why, "cannot read the warm generator's GPU memory; keeping it");
            false
        }
    }
}

/// The round line handed to a warm generator (see docs/job-file.md, "Warm generators").
fn request(
    lease: &pb::Lease,
    task: &pb::Task,
    paths: &Paths,
    argv: &[String],
    job_env: &[(String, String)],
) -> String {
    let outputs: Vec<String> = paths.outs.iter().map(|p| p.display().to_string()).collect();
    let env: serde_json::Map<String, serde_json::Value> = job_env
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "round_name": lease.round_name,
        "seed": lease.seed,
        "object": lease.object,
        "object_index": lease.object_index,
        "round": lease.round,
        "attempt": lease.attempt,
        "batch_size": task.batch_size,
        "num_iterations": task.num_iterations,
        "output": outputs.first(),
        "outputs": outputs,
        "stats": paths.stats.as_ref().map(|p| p.display().to_string()),
        "round_dir": paths.round_dir.as_ref().map(|p| p.display().to_string()),
        "cwd": paths.cwd.display().to_string(),
        "argv": argv,
        "env": env,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A real warm generator (python3 speaking the protocol): a round named `grow` keeps
    /// 96 MiB, one named `die` kills the process mid-round, one named `gpu*` lists itself
    /// and a child it starts in the GPU inventory file `inventory.json` (standing in for
    /// the driver; see [`gpu_entries`]), any other answers done.
    const GENERATOR: &str = r#"
import json, os, subprocess, sys
keep = []
reply = os.fdopen(int(os.environ["QUARRY_REPLY_FD"]), "w")
for line in sys.stdin:
    r = json.loads(line)
    name = r["round_name"]
    if name == "die":
        os._exit(3)
    if name == "grow":
        keep.append(b"x" * (96 << 20))
    if name.startswith("gpu"):
        child = subprocess.Popen(["sleep", "60"])
        keep.append(child)
        entries = name.split(":", 1)[1] % {"me": os.getpid(), "child": child.pid}
        with open("inventory.json.tmp", "w") as f:
            f.write('{"gpus": [{"index": 3, "processes": [%s]}]}' % entries)
        os.replace("inventory.json.tmp", "inventory.json")
    reply.write('{"status": "done"}\n')
    reply.flush()
"#;

    /// The round that makes [`GENERATOR`] list `entries` as the GPU's processes, `%(me)d`
    /// standing for its pid and `%(child)d` for a child's.
    fn gpu_entries(entries: &str) -> String {
        format!("gpu:{entries}")
    }

    /// The agent's GPU (id 3) in an inventory file in `dir` that lists no processes yet.
    fn file_gpu(dir: &Path) -> (GpuInfo, Arc<dyn Inventory>) {
        let p = dir.join("inventory.json");
        std::fs::write(&p, r#"{"gpus": [{"index": 3}]}"#).unwrap();
        let inv = crate::gpu::file::FileInventory::open(&p).unwrap();
        (GpuInfo::unlisted("3"), Arc::new(inv))
    }

    fn no_gpu() -> (GpuInfo, Arc<dyn Inventory>) {
        let none = crate::gpu::NoInventory {
            reason: "test".into(),
        };
        (GpuInfo::unlisted("3"), Arc::new(none))
    }

    fn spec(dir: &Path) -> WarmSpec {
        WarmSpec {
            argv: vec!["python3".into(), "-c".into(), GENERATOR.into()],
            cwd: dir.to_path_buf(),
            env: Vec::new(),
            kill_grace: Duration::from_millis(300),
            log_limit: 1 << 16,
        }
    }

    async fn round(slot: &mut Slot, dir: &Path, name: &str, task: &pb::Task) -> RunOutcome {
        let lease = pb::Lease {
            round_name: name.into(),
            ..Default::default()
        };
        let paths = Paths {
            root: dir.to_path_buf(),
            cwd: dir.to_path_buf(),
            outs: vec![dir.join("out.npy")],
            round_dir: None,
            stats: None,
        };
        let stop = CancellationToken::new();
        let ran = tokio::time::timeout(
            Duration::from_secs(30),
            slot.run(spec(dir), &lease, task, &paths, &[], None, &stop),
        )
        .await
        .expect("the round ended");
        ran.expect("the generator started").outcome
    }

    /// A generator that leaves a FIFO where its output should be: the audit refuses it
    /// (without blocking on it) and the round fails with the reason, the agent goes on.
    #[tokio::test]
    async fn an_audited_round_whose_output_is_a_fifo_fails_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(WorkerMetrics::default());
        let (gpu, inventory) = no_gpu();
        let mut slot = Slot::new(Arc::clone(&metrics), gpu, inventory);
        let fifo = WarmSpec {
            argv: vec![
                "python3".into(),
                "-c".into(),
                r#"
import json, os, sys
reply = os.fdopen(int(os.environ["QUARRY_REPLY_FD"]), "w")
for line in sys.stdin:
    os.mkfifo(json.loads(line)["output"])
    reply.write('{"status": "done"}\n')
    reply.flush()
"#
                .into(),
            ],
            ..spec(dir.path())
        };
        let lease = pb::Lease {
            round_name: "f".into(),
            ..Default::default()
        };
        let paths = Paths {
            root: dir.path().to_path_buf(),
            cwd: dir.path().to_path_buf(),
            outs: vec![dir.path().join("out.npy")],
            round_dir: None,
            stats: None,
        };
        let task = pb::Task {
            audit: true,
            ..Default::default()
        };
        let report = tokio::time::timeout(
            Duration::from_secs(30),
            slot.run(
                fifo,
                &lease,
                &task,
                &paths,
                &[],
                None,
                &CancellationToken::new(),
            ),
        )
        .await
        .expect("the audit did not block")
        .expect("the generator started");
        assert_eq!(report.outcome, RunOutcome::Failed);
        let reason = report.reason.unwrap_or_default();
        assert!(
            reason.contains(
                "it is a FIFO; only plain files and directories of plain files are audited"
            ),
            "{reason}"
        );
        slot.shut_down().await;
    }

    fn starts(metrics: &WorkerMetrics, reason: &str) -> u32 {
        let text = metrics.registry.render();
        let needle =
            format!("quarry_worker_generator_starts_total{{gpu=\"3\",reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u32)
    }

    /// Every start of the warm generator is counted with its reason, and a process over
    /// `recycle_above_memory_mib` is replaced before the next round.
    #[tokio::test]
    async fn restarts_are_counted_by_reason_and_the_memory_ceiling_recycles() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(WorkerMetrics::default());
        let (gpu, inventory) = no_gpu();
        let mut slot = Slot::new(Arc::clone(&metrics), gpu, inventory);
        let plain = pb::Task::default();
        let ceiling = pb::Task {
            recycle_above_memory_mib: 64,
            ..Default::default()
        };
        let done = RunOutcome::Exited(0);
        assert_eq!(round(&mut slot, dir.path(), "a", &ceiling).await, done);
        assert_eq!(starts(&metrics, "first"), 1);
        // Under the ceiling: kept.
        assert_eq!(round(&mut slot, dir.path(), "grow", &ceiling).await, done);
        assert_eq!(starts(&metrics, "memory"), 0);
        // Now over it: replaced before this round.
        assert_eq!(round(&mut slot, dir.path(), "b", &ceiling).await, done);
        assert_eq!(starts(&metrics, "memory"), 1);
        // Without a ceiling a grown process is kept.
        assert_eq!(round(&mut slot, dir.path(), "grow", &plain).await, done);
        assert_eq!(round(&mut slot, dir.path(), "c", &plain).await, done);
        assert_eq!(starts(&metrics, "memory"), 1);
        // Died mid-round: the next round starts a new one.
        assert_eq!(
            round(&mut slot, dir.path(), "die", &plain).await,
            RunOutcome::Exited(3)
        );
        assert_eq!(round(&mut slot, dir.path(), "d", &plain).await, done);
        assert_eq!(starts(&metrics, "died"), 1);
        let recycle = pb::Task {
            recycle_after_rounds: 1,
            ..Default::default()
        };
        assert_eq!(round(&mut slot, dir.path(), "e", &recycle).await, done);
        assert_eq!(starts(&metrics, "recycle"), 1);
        assert_eq!(starts(&metrics, "first"), 1);
        slot.shut_down().await;
    }

    /// `recycle_above_gpu_memory_mib`: the generator is replaced before the next round once
    /// the GPU processes of its group (itself and a child it started) hold more than the
    /// ceiling together; other processes on the GPU are not counted; an entry the inventory
    /// cannot measure, or garbage in the inventory file, keeps it; without the ceiling, or
    /// without an inventory, nothing is replaced.
    #[tokio::test]
    async fn the_gpu_memory_ceiling_recycles_counting_the_group_only() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(WorkerMetrics::default());
        let (gpu, inventory) = file_gpu(dir.path());
        let mut slot = Slot::new(Arc::clone(&metrics), gpu, inventory);
        let ceiling = pb::Task {
            recycle_above_gpu_memory_mib: 512,
            ..Default::default()
        };
        let done = RunOutcome::Exited(0);
        let d = dir.path();
        assert_eq!(round(&mut slot, d, "a", &ceiling).await, done);
        // 300 + 300 over the group, a stranger (pid 1) holding 100000: 600 > 512.
        let group_of_two = gpu_entries(
            r#"{"pid": %(me)d, "used_memory_mib": 300}, {"pid": %(child)d, "used_memory_mib": 300}, {"pid": 1, "used_memory_mib": 100000}"#,
        );
        assert_eq!(round(&mut slot, d, &group_of_two, &ceiling).await, done);
        assert_eq!(starts(&metrics, "gpu_memory"), 0);
        assert_eq!(round(&mut slot, d, "b", &ceiling).await, done);
        assert_eq!(starts(&metrics, "gpu_memory"), 1);
        // The file still lists the old process's pids: the new one holds nothing.
        assert_eq!(round(&mut slot, d, "c", &ceiling).await, done);
        assert_eq!(starts(&metrics, "gpu_memory"), 1);
        // Under the ceiling (the stranger does not count): kept.
        let under = gpu_entries(
            r#"{"pid": %(me)d, "used_memory_mib": 500}, {"pid": 1, "used_memory_mib": 100000}"#,
        );
        assert_eq!(round(&mut slot, d, &under, &ceiling).await, done);
        assert_eq!(round(&mut slot, d, "e", &ceiling).await, done);
        assert_eq!(starts(&metrics, "gpu_memory"), 1);
        // Unknown for one member (no figure), or a garbled file: kept, no panic.
        for unknown in [
            r#"{"pid": %(me)d, "used_memory_mib": 9000}, {"pid": %(child)d}"#,
            r#"{"pid": %(me)d, "used_memory_mib": -9000}"#,
            r#"{"pid": %(me)d, "used_memory_mib": 1e400}"#,
            r#"{"pid": %(me)d, "used_memory_mib": "9000"}"#,
            r#"{"pid": "me", "used_memory_mib": 9000}"#,
        ] {
            assert_eq!(
                round(&mut slot, d, &gpu_entries(unknown), &ceiling).await,
                done
            );
            assert_eq!(round(&mut slot, d, "f", &ceiling).await, done, "{unknown}");
            assert_eq!(starts(&metrics, "gpu_memory"), 1, "{unknown}");
        }
        // The largest figure that parses recycles (the sum saturates).
        let huge = gpu_entries(&format!(
            r#"{{"pid": %(me)d, "used_memory_mib": {max}}}, {{"pid": %(child)d, "used_memory_mib": {max}}}"#,
            max = u64::MAX
        ));
        assert_eq!(round(&mut slot, d, &huge, &ceiling).await, done);
        assert_eq!(round(&mut slot, d, "g", &ceiling).await, done);
        assert_eq!(starts(&metrics, "gpu_memory"), 2);
        // Over, but the job sets no ceiling: kept.
        let plain = pb::Task::default();
        let over = gpu_entries(r#"{"pid": %(me)d, "used_memory_mib": 9000}"#);
        assert_eq!(round(&mut slot, d, &over, &plain).await, done);
        assert_eq!(round(&mut slot, d, "h", &plain).await, done);
        assert_eq!(starts(&metrics, "gpu_memory"), 2);
        assert_eq!(starts(&metrics, "first"), 1);
        slot.shut_down().await;

        // Without an inventory the figure is unknown: kept.
        let metrics = Arc::new(WorkerMetrics::default());
        let (gpu, inventory) = no_gpu();
        let mut slot = Slot::new(Arc::clone(&metrics), gpu, inventory);
        assert_eq!(round(&mut slot, d, &over, &ceiling).await, done);
        assert_eq!(round(&mut slot, d, "i", &ceiling).await, done);
        assert_eq!(starts(&metrics, "gpu_memory"), 0);
        slot.shut_down().await;
    }
}
