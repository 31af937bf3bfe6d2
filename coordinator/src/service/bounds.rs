//! Bounds on what an agent's Register and Heartbeat may carry, checked at the service boundary
//! before the core stores anything: every string the registry keeps (and every status lists)
//! has a length bound, and a name that becomes part of a worker id is a valid name. A call
//! that passes a bound is refused with INVALID_ARGUMENT naming the field and the bound.

use quarry_proto::v1 as pb;
use tonic::Status;

/// Longest host name, GPU name (`name`), or Register string that is not an id, in bytes.
pub const MAX_FIELD_BYTES: usize = 256;

/// Longest GPU id (`--gpu`), GPU UUID, driver version or agent name, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// Longest heartbeat text (agent state, GPU health reason), in bytes; the registry reserves
/// room for both per worker (`HEARTBEAT_TEXT_RESERVE`).
pub const MAX_TEXT_BYTES: usize = 256;

/// Most running rounds one Register may list, and lease ids one Heartbeat may renew.
pub const MAX_LEASES_PER_CALL: usize = 1024;

fn refuse(field: &str, problem: String) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

/// `value` is at most `limit` bytes of text without control characters.
fn text(field: &str, value: &str, limit: usize) -> Result<(), Status> {
    if value.len() > limit {
        return Err(refuse(
            field,
            format!("{} bytes; at most {limit} bytes are accepted", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(refuse(
            field,
            "contains a control character; only printable text is accepted".into(),
        ));
    }
    Ok(())
}

fn count(field: &str, n: usize) -> Result<(), Status> {
    if n > MAX_LEASES_PER_CALL {
        return Err(refuse(
            field,
            format!("{n} entries; at most {MAX_LEASES_PER_CALL} are accepted"),
        ));
    }
    Ok(())
}

/// Checks a Register: host, GPU, agent name, GPU description and the running rounds listed.
pub fn register(r: &pb::RegisterRequest) -> Result<(), Status> {
    text("host", &r.host, MAX_FIELD_BYTES)?;
    text("gpu", &r.gpu, MAX_ID_BYTES)?;
    if !r.agent_name.is_empty() {
        if r.agent_name.len() > MAX_ID_BYTES {
            return Err(refuse(
                "agent_name",
                format!(
                    "{} bytes; at most {MAX_ID_BYTES} bytes are accepted",
                    r.agent_name.len()
                ),
            ));
        }
        quarry_common::names::validate("agent_name", &r.agent_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    if let Some(info) = &r.gpu_info {
        text("gpu_info.uuid", &info.uuid, MAX_ID_BYTES)?;
        text("gpu_info.name", &info.name, MAX_FIELD_BYTES)?;
        text(
            "gpu_info.driver_version",
            &info.driver_version,
            MAX_ID_BYTES,
        )?;
    }
    text("previous_worker_id", &r.previous_worker_id, MAX_FIELD_BYTES)?;
    text(
        "previous_worker_secret",
        &r.previous_worker_secret,
        MAX_FIELD_BYTES,
    )?;
    count("running", r.running.len())?;
    Ok(())
}

/// Checks a Heartbeat: the worker id it names, the leases it renews and its texts.
pub fn heartbeat(r: &pb::HeartbeatRequest) -> Result<(), Status> {
    // The id is only looked up; an id longer than any the registry hands out is no one's.
    text(
        "worker_id",
        &r.worker_id,
        MAX_FIELD_BYTES + MAX_ID_BYTES + 64,
    )?;
    count("lease_ids", r.lease_ids.len())?;
    text("agent_state", &r.agent_state, MAX_TEXT_BYTES)?;
    if let Some(h) = &r.health {
        text("health.reason", &h.reason, MAX_TEXT_BYTES)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn each_refusal_names_its_field_and_bound() {
        let ok = pb::RegisterRequest {
            host: "node-1.lab".into(),
            gpu: "0".into(),
            ..Default::default()
        };
        register(&ok).unwrap();
        let mut big = ok.clone();
        big.host = "h".repeat(MAX_FIELD_BYTES + 1);
        let e = register(&big).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().starts_with("host:") && e.message().contains("256"),
            "{e:?}"
        );
        let mut bad = ok.clone();
        bad.agent_name = "../x".into();
        assert!(register(&bad).unwrap_err().message().contains("agent_name"));
        let mut ctl = ok.clone();
        ctl.gpu = "0\n1".into();
        assert!(register(&ctl).unwrap_err().message().starts_with("gpu:"));
        let mut info = ok;
        info.gpu_info = Some(pb::GpuInfo {
            name: "n".repeat(MAX_FIELD_BYTES + 1),
            ..Default::default()
        });
        assert!(
            register(&info)
                .unwrap_err()
                .message()
                .starts_with("gpu_info.name:")
        );
        let hb = pb::HeartbeatRequest {
            worker_id: "w".into(),
            agent_state: "s".repeat(MAX_TEXT_BYTES + 1),
            ..Default::default()
        };
        assert!(
            heartbeat(&hb)
                .unwrap_err()
                .message()
                .starts_with("agent_state:")
        );
    }
}
