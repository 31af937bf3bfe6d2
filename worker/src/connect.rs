//! How an agent reaches the leading coordinator: TLS, the bearer token and message bounds come
//! from [`quarry_common::transport`]; this module tries the known addresses, follows a
//! standby's pointer to the leader, and registers.

use std::time::Duration;

use quarry_common::transport::{
    AuthChannel, ClientSecurity, Coordinators, MAX_MESSAGE_BYTES, TransportError,
};
use quarry_proto::v1 as pb;
use quarry_proto::v1::worker_service_client::WorkerServiceClient;

/// The agent's client of the worker service.
pub type Client = WorkerServiceClient<AuthChannel>;

/// Why no coordinator could be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    BadSettings(#[from] TransportError),
    #[error("no coordinator registered this agent: {}", .0.join("; "))]
    Unreachable(Vec<String>),
}

impl ConnectError {
    /// A misconfiguration that retrying cannot fix.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ConnectError::BadSettings(_))
    }
}

/// The coordinators `--coordinator` names (each value may list several, comma-separated, in
/// order), checked with these settings so that a typo fails at startup, not in a retry loop.
pub fn coordinators(
    addrs: &[String],
    security: &ClientSecurity,
) -> Result<Coordinators, ConnectError> {
    Ok(Coordinators::new(addrs, security.clone())?)
}

/// A client of the coordinator at `addr`.
pub fn client(coords: &Coordinators, addr: &str) -> Result<Client, ConnectError> {
    Ok(WorkerServiceClient::new(coords.channel(addr)?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Registers with the leader: tries each address (the last known leader first), following a
/// standby's answer to the leader it names. Returns the client, the answer and the address.
pub async fn register(
    coords: &mut Coordinators,
    req: &pb::RegisterRequest,
    timeout: Duration,
) -> Result<(Client, pb::RegisterResponse, String), ConnectError> {
    let mut errors = Vec::new();
    let mut tried: Vec<String> = Vec::new();
    // A hint may name an address outside the list: allow one extra round for it.
    for _ in 0..2 {
        for addr in coords.candidates() {
            if tried.contains(&addr) {
                continue;
            }
            tried.push(addr.clone());
            let mut c = client(coords, &addr)?;
            match tokio::time::timeout(timeout, c.register(req.clone())).await {
                Ok(Ok(r)) => {
                    coords.prefer(&addr);
                    return Ok((c, r.into_inner(), addr));
                }
                Ok(Err(st)) => {
                    let before = coords.candidates();
                    coords.learn(&st);
                    errors.push(format!("{addr}: {}", st.message()));
                    if coords.candidates().first() != before.first() {
                        // A standby named the leader: go there next.
                        break;
                    }
                }
                Err(_) => errors.push(format!("{addr}: no answer within {timeout:?}")),
            }
        }
    }
    Err(ConnectError::Unreachable(errors))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_split_on_commas_and_repeat() {
        let v = ["a:1,b:2".into(), " c:3 ".into(), ",".into()];
        let c = coordinators(&v, &ClientSecurity::plain()).unwrap();
        assert_eq!(c.addrs(), ["a:1", "b:2", "c:3"]);
        assert!(
            coordinators(&[], &ClientSecurity::plain())
                .unwrap_err()
                .is_permanent()
        );
        assert!(coordinators(&["ftp://x:1".into()], &ClientSecurity::plain()).is_err());
    }

    #[tokio::test]
    async fn nobody_listening_is_unreachable_not_a_hang() {
        // A port nobody listens on: bound, then closed.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let mut c = coordinators(&[dead], &ClientSecurity::plain()).unwrap();
        let e = register(
            &mut c,
            &pb::RegisterRequest::default(),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ConnectError::Unreachable(_)), "{e}");
    }
}
