//! The service boundary: wire types (`quarry.v1`) to the core's types and back, and the core's
//! errors to gRPC status codes — each mapping in exactly one place.

use quarry_proto::v1 as pb;
use tonic::Status;

use crate::coordinator::{
    CompleteExtras, CoordError, FailureKind, GpuHealth, GpuHealthState, GpuInfo, JobStatus,
    ObjectState, ObjectStatus, OutputSpec, ReportedFile, RoundLease, RoundTask, RunningRound,
    Verdict, WorkerStatus,
};
use crate::state::{JobState, RoundGpuStats, RoundYield, StateError};

/// The gRPC status of a core error. What a client may retry is UNAVAILABLE (the store or
/// state backend did not answer, or this process lost the lead); a state record that cannot
/// be decoded is DATA_LOSS: terminal, retrying cannot help, an operator must look.
pub fn to_status(e: CoordError) -> Status {
    match e {
        CoordError::Spec(e) => Status::invalid_argument(e.to_string()),
        e @ CoordError::SpecChanged { .. } => Status::failed_precondition(e.to_string()),
        e @ CoordError::JobNotFound(_) => Status::not_found(e.to_string()),
        e @ CoordError::UnknownWorker(_) => Status::failed_precondition(e.to_string()),
        e @ CoordError::RegistryFull(_) => Status::resource_exhausted(e.to_string()),
        e @ CoordError::WrongWorkerSecret(_) => Status::permission_denied(e.to_string()),
        e @ CoordError::Random(_) => Status::internal(e.to_string()),
        CoordError::State(e) => match e {
            StateError::JobNotFound(_) => Status::not_found(e.to_string()),
            StateError::Corrupt { .. } => Status::data_loss(e.to_string()),
            StateError::Backend(_) | StateError::Fenced(_) => Status::unavailable(e.to_string()),
        },
        e @ CoordError::Store(_) => Status::unavailable(e.to_string()),
    }
}

/// A failure kind a worker reported.
pub fn failure_kind(wire: i32) -> FailureKind {
    match pb::FailureKind::try_from(wire).unwrap_or(pb::FailureKind::Unspecified) {
        pb::FailureKind::Exit => FailureKind::Exit,
        pb::FailureKind::Timeout => FailureKind::Timeout,
        pb::FailureKind::OutputMissing => FailureKind::OutputMissing,
        pb::FailureKind::OutputInvalid => FailureKind::OutputInvalid,
        pb::FailureKind::Upload => FailureKind::Upload,
        pb::FailureKind::Spawn => FailureKind::Spawn,
        pb::FailureKind::AuditMismatch => FailureKind::AuditMismatch,
        pb::FailureKind::Unspecified => FailureKind::Unspecified,
    }
}

impl From<Verdict> for pb::CommitOutcome {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Committed => pb::CommitOutcome::Committed,
            Verdict::Duplicate => pb::CommitOutcome::Duplicate,
            Verdict::Rejected => pb::CommitOutcome::Rejected,
        }
    }
}

impl From<RoundLease> for pb::Lease {
    fn from(l: RoundLease) -> Self {
        pb::Lease {
            lease_id: l.lease_id,
            job_id: l.job_id,
            object: l.object,
            object_index: l.object_index,
            round: l.round,
            seed: l.seed,
            attempt: l.attempt,
            round_name: l.round_name,
            task: Some(l.task.into()),
            // Filled in by the service from its `lease` span.
            traceparent: String::new(),
        }
    }
}

impl From<RoundTask> for pb::Task {
    fn from(t: RoundTask) -> Self {
        pb::Task {
            argv: t.argv,
            root: t.root,
            cwd: t.cwd,
            env: t
                .env
                .into_iter()
                .map(|(name, value)| pb::EnvVar { name, value })
                .collect(),
            outputs: t.outputs.into_iter().map(pb::OutputFile::from).collect(),
            stats_path: t.stats_path,
            round_dir: t.round_dir,
            timeout_ms: t.timeout_ms,
            staging_prefix: t.staging_prefix,
            keep_intermediate: t.keep_intermediate,
            bind_gpu: t.bind_gpu,
            threads_per_gpu: t.threads_per_gpu,
            min_free_gpu_memory_mib: t.min_free_gpu_memory_mib,
            mode: t.mode,
            batch_size: t.batch_size,
            num_iterations: t.num_iterations,
            recycle_after_rounds: t.recycle_after_rounds,
            recycle_above_memory_mib: t.recycle_above_memory_mib,
            recycle_above_gpu_memory_mib: t.recycle_above_gpu_memory_mib,
            audit: t.audit,
        }
    }
}

impl From<OutputSpec> for pb::OutputFile {
    fn from(o: OutputSpec) -> Self {
        pb::OutputFile {
            path: o.path,
            name: o.name,
            format: o.format,
            filter: o.filter,
        }
    }
}

impl From<&pb::Lease> for RunningRound {
    fn from(l: &pb::Lease) -> Self {
        RunningRound {
            lease_id: l.lease_id,
            job_id: l.job_id.clone(),
            object: l.object.clone(),
            object_index: l.object_index,
            round: l.round,
            seed: l.seed,
            attempt: l.attempt.clone(),
        }
    }
}

impl From<pb::UploadedFile> for ReportedFile {
    fn from(f: pb::UploadedFile) -> Self {
        ReportedFile {
            name: f.name,
            key: f.key,
            size: f.size,
            sha256: f.sha256,
            count: f.count,
            schema: f.schema,
            kept: f.kept,
        }
    }
}

impl From<ReportedFile> for pb::UploadedFile {
    fn from(f: ReportedFile) -> Self {
        pb::UploadedFile {
            name: f.name,
            key: f.key,
            size: f.size,
            sha256: f.sha256,
            count: f.count,
            schema: f.schema,
            kept: f.kept,
        }
    }
}

/// What a completion carries besides its files.
pub fn complete_extras(
    gpu_stats: Option<pb::RoundGpuStats>,
    log_key: String,
    yield_stats: Option<pb::RoundYield>,
) -> CompleteExtras {
    CompleteExtras {
        gpu_stats: gpu_stats.map(|g| RoundGpuStats {
            utilization_mean_pct: g.utilization_mean_pct,
            memory_peak_mib: g.memory_peak_mib,
            samples: g.samples,
        }),
        log_key,
        yield_stats: yield_stats.map(|y| RoundYield {
            attempts: y.attempts,
            successes: y.successes,
        }),
    }
}

impl From<pb::GpuInfo> for GpuInfo {
    fn from(g: pb::GpuInfo) -> Self {
        GpuInfo {
            index: g.index,
            uuid: g.uuid,
            name: g.name,
            memory_total_mib: g.memory_total_mib,
            driver_version: g.driver_version,
        }
    }
}

impl From<GpuInfo> for pb::GpuInfo {
    fn from(g: GpuInfo) -> Self {
        pb::GpuInfo {
            index: g.index,
            uuid: g.uuid,
            name: g.name,
            memory_total_mib: g.memory_total_mib,
            driver_version: g.driver_version,
        }
    }
}

impl From<pb::GpuHealth> for GpuHealth {
    fn from(h: pb::GpuHealth) -> Self {
        GpuHealth {
            state: match pb::GpuHealthState::try_from(h.state)
                .unwrap_or(pb::GpuHealthState::Unknown)
            {
                pb::GpuHealthState::Unknown => GpuHealthState::Unknown,
                pb::GpuHealthState::Healthy => GpuHealthState::Healthy,
                pb::GpuHealthState::Unhealthy => GpuHealthState::Unhealthy,
            },
            reason: h.reason,
            utilization_pct: h.utilization_pct,
            memory_used_mib: h.memory_used_mib,
            memory_free_mib: h.memory_free_mib,
            temperature_c: h.temperature_c,
            power_w: h.power_w,
            ecc_uncorrected: h.ecc_uncorrected,
            last_xid: h.last_xid,
        }
    }
}

impl From<GpuHealth> for pb::GpuHealth {
    fn from(h: GpuHealth) -> Self {
        pb::GpuHealth {
            state: match h.state {
                GpuHealthState::Unknown => pb::GpuHealthState::Unknown,
                GpuHealthState::Healthy => pb::GpuHealthState::Healthy,
                GpuHealthState::Unhealthy => pb::GpuHealthState::Unhealthy,
            } as i32,
            reason: h.reason,
            utilization_pct: h.utilization_pct,
            memory_used_mib: h.memory_used_mib,
            memory_free_mib: h.memory_free_mib,
            temperature_c: h.temperature_c,
            power_w: h.power_w,
            ecc_uncorrected: h.ecc_uncorrected,
            last_xid: h.last_xid,
        }
    }
}

/// The wire value of a job's state.
pub fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Running => pb::JobState::Running,
        JobState::Done => pb::JobState::Done,
        JobState::Incomplete => pb::JobState::Incomplete,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

impl From<JobStatus> for pb::JobStatus {
    fn from(s: JobStatus) -> Self {
        pb::JobStatus {
            job_id: s.job_id,
            state: job_state(s.state) as i32,
            objects: s.objects.into_iter().map(pb::ObjectStatus::from).collect(),
            samples_collected: s.samples_collected,
            samples_target: s.samples_target,
            rounds_committed: s.rounds_committed,
            failed_attempts: s.failed_attempts,
            rounds_quarantined: s.rounds_quarantined,
            rounds_in_flight: s.rounds_in_flight,
            elapsed_ms: s.elapsed_ms,
            generator_ms: s.generator_ms,
            workers: s.workers.into_iter().map(pb::WorkerStatus::from).collect(),
            message: s.message,
            samples_this_session: s.samples_this_session,
            attempts: s.attempts,
            successes: s.successes,
            rounds_audited: s.rounds_audited,
        }
    }
}

impl From<ObjectStatus> for pb::ObjectStatus {
    fn from(o: ObjectStatus) -> Self {
        pb::ObjectStatus {
            name: o.name,
            state: match o.state {
                ObjectState::Pending => pb::ObjectState::Pending,
                ObjectState::Running => pb::ObjectState::Running,
                ObjectState::Merging => pb::ObjectState::Merging,
                ObjectState::Done => pb::ObjectState::Done,
                ObjectState::Exhausted => pb::ObjectState::Exhausted,
            } as i32,
            collected: o.collected,
            target: o.target,
            rounds_committed: o.rounds_committed,
            rounds_in_flight: o.rounds_in_flight,
            rounds_quarantined: o.rounds_quarantined,
            failed_attempts: o.failed_attempts,
            attempts: o.attempts,
            successes: o.successes,
        }
    }
}

impl From<WorkerStatus> for pb::WorkerStatus {
    fn from(w: WorkerStatus) -> Self {
        pb::WorkerStatus {
            worker_id: w.worker_id,
            host: w.host,
            gpu: w.gpu,
            running: w.running,
            last_seen_ms_ago: w.last_seen_ms_ago,
            gpu_info: w.gpu_info.map(pb::GpuInfo::from),
            health: w.health.map(pb::GpuHealth::from),
            agent_state: w.agent_state,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_state_is_terminal_and_an_unreachable_one_retryable() {
        let corrupt = to_status(CoordError::State(StateError::Corrupt {
            what: "job x".into(),
            detail: "bad json".into(),
        }));
        assert_eq!(corrupt.code(), tonic::Code::DataLoss);
        assert!(
            corrupt.message().contains("cannot decode"),
            "{}",
            corrupt.message()
        );
        let down = to_status(CoordError::State(StateError::Backend("timeout".into())));
        assert_eq!(down.code(), tonic::Code::Unavailable);
        let fenced = to_status(CoordError::State(StateError::Fenced("lost".into())));
        assert_eq!(fenced.code(), tonic::Code::Unavailable);
        let store = to_status(CoordError::Store("503".into()));
        assert_eq!(store.code(), tonic::Code::Unavailable);
        let unknown = to_status(CoordError::UnknownWorker("w".into()));
        assert_eq!(unknown.code(), tonic::Code::FailedPrecondition);
        let missing = to_status(CoordError::JobNotFound("j".into()));
        assert_eq!(missing.code(), tonic::Code::NotFound);
    }

    #[test]
    fn every_wire_failure_kind_has_its_label() {
        let labels: Vec<&str> = (0..=6).map(|k| failure_kind(k).label()).collect();
        assert_eq!(
            labels,
            [
                "unspecified",
                "exit",
                "timeout",
                "output_missing",
                "output_invalid",
                "upload",
                "spawn"
            ]
        );
        // A kind from a newer worker is not refused: it is recorded as unspecified.
        assert_eq!(failure_kind(99), FailureKind::Unspecified);
        // Labels are distinct (they are metric label values and stored names).
        let all: std::collections::HashSet<&str> =
            FailureKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(all.len(), FailureKind::ALL.len());
    }

    #[test]
    fn a_lease_keeps_every_field_on_the_wire() {
        let lease = RoundLease {
            lease_id: 7,
            job_id: "j".into(),
            object: "mug".into(),
            object_index: 2,
            round: 3,
            seed: 200_015,
            attempt: "e1a9".into(),
            round_name: "j__mug__r3_s200015".into(),
            task: RoundTask {
                argv: vec!["python3".into(), "main.py".into()],
                root: "/r".into(),
                cwd: "gen".into(),
                env: vec![("A".into(), "1".into())],
                outputs: vec![OutputSpec {
                    path: "out/x.npy".into(),
                    name: "x.npy".into(),
                    format: "npy".into(),
                    filter: "E <= 1".into(),
                }],
                stats_path: "s.json".into(),
                round_dir: "out".into(),
                timeout_ms: 5,
                staging_prefix: "j/rounds/mug/r3_s200015/e1a9".into(),
                keep_intermediate: true,
                bind_gpu: true,
                threads_per_gpu: 2,
                min_free_gpu_memory_mib: 100,
                mode: "warm".into(),
                batch_size: 40,
                num_iterations: 3,
                recycle_after_rounds: 7,
                recycle_above_memory_mib: 512,
                recycle_above_gpu_memory_mib: 2048,
                audit: true,
            },
        };
        let wire = pb::Lease::from(lease.clone());
        let task = wire.task.clone().unwrap();
        assert_eq!(task.env[0].name, "A");
        assert_eq!(task.outputs[0].filter, "E <= 1");
        assert_eq!(
            (task.threads_per_gpu, task.min_free_gpu_memory_mib),
            (2, 100)
        );
        assert_eq!(
            (
                task.mode.as_str(),
                task.batch_size,
                task.num_iterations,
                task.recycle_after_rounds,
                task.recycle_above_memory_mib,
                task.recycle_above_gpu_memory_mib
            ),
            ("warm", 40, 3, 7, 512, 2048)
        );
        let running = RunningRound::from(&wire);
        assert_eq!(
            (
                running.lease_id,
                running.job_id.as_str(),
                running.object.as_str()
            ),
            (lease.lease_id, lease.job_id.as_str(), lease.object.as_str())
        );
        assert_eq!(
            (
                running.object_index,
                running.round,
                running.seed,
                running.attempt.as_str()
            ),
            (
                lease.object_index,
                lease.round,
                lease.seed,
                lease.attempt.as_str()
            )
        );
    }
}
