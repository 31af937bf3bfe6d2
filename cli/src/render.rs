//! How the client commands print a job: status lines (per job, object and worker) and the
//! JSON that `--json` prints for scripts.

use quarry_coordinator::state::RoundYield;
use quarry_proto::v1 as pb;

use crate::progress;

/// One object in `coordinator status`: samples against the quota, state, rounds and the
/// success rate where the generator reports yields.
pub fn object_line(o: &pb::ObjectStatus) -> String {
    let state = pb::ObjectState::try_from(o.state)
        .map_or("?".into(), |st| format!("{st:?}").to_lowercase());
    let rate = progress::success_rate(o.attempts, o.successes)
        .map(|r| format!(" success {r}"))
        .unwrap_or_default();
    format!(
        "  {:<32} {:>10}/{:<10} {:<9} rounds {:>4} running {:>3} failed {:>3} quarantined {:>3}{rate}",
        o.name,
        o.collected,
        o.target,
        state,
        o.rounds_committed,
        o.rounds_in_flight,
        o.failed_attempts,
        o.rounds_quarantined
    )
}

/// One worker in `coordinator status`: what it runs or waits for, and its GPU's health.
pub fn worker_line(w: &pb::WorkerStatus) -> String {
    let doing = if !w.running.is_empty() {
        w.running.clone()
    } else if !w.agent_state.is_empty() {
        w.agent_state.clone()
    } else {
        "idle".into()
    };
    let mut line = format!("  worker {} (gpu {}) {doing}", w.worker_id, w.gpu);
    if let Some(h) = &w.health {
        let opt = |v: Option<u64>, unit: &str| v.map(|v| format!(" {v}{unit}"));
        let metrics: String = [
            opt(h.utilization_pct.map(u64::from), "% util"),
            opt(h.memory_used_mib, " MiB used"),
            opt(h.memory_free_mib, " MiB free"),
            opt(h.temperature_c.map(u64::from), " C"),
            opt(h.power_w.map(u64::from), " W"),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(",");
        line.push_str(&format!(" [{}{metrics}]", health_name(h)));
    }
    line
}

fn health_name(h: &pb::GpuHealth) -> String {
    match pb::GpuHealthState::try_from(h.state) {
        Ok(pb::GpuHealthState::Healthy) => "healthy".into(),
        Ok(pb::GpuHealthState::Unhealthy) => format!("UNHEALTHY: {}", h.reason),
        _ => "health unknown".into(),
    }
}

/// One worker in `--json` output.
pub fn worker_json(w: &pb::WorkerStatus) -> serde_json::Value {
    let health = w.health.as_ref();
    serde_json::json!({
        "id": w.worker_id, "host": w.host, "gpu": w.gpu, "running": w.running,
        "state": w.agent_state,
        "gpu_uuid": w.gpu_info.as_ref().map(|g| g.uuid.clone()).unwrap_or_default(),
        "gpu_name": w.gpu_info.as_ref().map(|g| g.name.clone()).unwrap_or_default(),
        "health": health.map_or("unknown", |h| match pb::GpuHealthState::try_from(h.state) {
            Ok(pb::GpuHealthState::Healthy) => "healthy",
            Ok(pb::GpuHealthState::Unhealthy) => "unhealthy",
            _ => "unknown",
        }),
        "health_reason": health.map(|h| h.reason.clone()).unwrap_or_default(),
        "utilization_pct": health.and_then(|h| h.utilization_pct),
        "memory_used_mib": health.and_then(|h| h.memory_used_mib),
        "memory_free_mib": health.and_then(|h| h.memory_free_mib),
        "temperature_c": health.and_then(|h| h.temperature_c),
        "power_w": health.and_then(|h| h.power_w),
        "ecc_uncorrected": health.and_then(|h| h.ecc_uncorrected),
        "last_xid": health.and_then(|h| h.last_xid),
        "last_seen_ms_ago": w.last_seen_ms_ago,
    })
}

/// A job in `--json` output (`status`, `jobs`, `submit --watch`).
pub fn status_json(s: &pb::JobStatus) -> serde_json::Value {
    let name = |v: i32| {
        pb::ObjectState::try_from(v).map_or("unknown".into(), |st| format!("{st:?}").to_lowercase())
    };
    serde_json::json!({
        "job": s.job_id,
        "state": pb::JobState::try_from(s.state).map_or("unknown".into(), |st| format!("{st:?}").to_lowercase()),
        "samples_collected": s.samples_collected,
        "samples_target": s.samples_target,
        "rounds_committed": s.rounds_committed,
        "rounds_in_flight": s.rounds_in_flight,
        "failed_attempts": s.failed_attempts,
        "rounds_quarantined": s.rounds_quarantined,
        "attempts": s.attempts,
        "successes": s.successes,
        "success_rate": RoundYield::rate(s.attempts, s.successes),
        "rounds_audited": s.rounds_audited,
        "message": s.message,
        "objects": s.objects.iter().map(|o| serde_json::json!({
            "name": o.name, "state": name(o.state), "collected": o.collected, "target": o.target,
            "rounds_committed": o.rounds_committed, "rounds_in_flight": o.rounds_in_flight,
            "failed_attempts": o.failed_attempts, "rounds_quarantined": o.rounds_quarantined,
            "attempts": o.attempts, "successes": o.successes,
            "success_rate": RoundYield::rate(o.attempts, o.successes),
        })).collect::<Vec<_>>(),
        "workers": s.workers.iter().map(worker_json).collect::<Vec<_>>(),
    })
}
