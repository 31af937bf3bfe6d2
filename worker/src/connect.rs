//! How an agent reaches a coordinator. Everything about the connection (addresses, timeouts,
//! and later TLS and auth) lives in [`connect`], so it can be changed in one place.

use std::time::Duration;

use quarry_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::transport::{Channel, Endpoint};

/// Largest gRPC message sent or accepted (as the coordinator's).
const MAX_MESSAGE_BYTES: usize = 16 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no coordinator could be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("coordinator address {addr:?}: {detail}")]
    BadAddress { addr: String, detail: String },
    #[error("no coordinator reachable: {}", .0.join("; "))]
    Unreachable(Vec<String>),
}

impl ConnectError {
    /// A misconfiguration that retrying cannot fix.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ConnectError::BadAddress { .. })
    }
}

/// Parses `--coordinator` values: each may hold several comma-separated addresses
/// (`host:port` or `http://host:port`); order is kept, empty entries are dropped.
pub fn parse_addresses(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn endpoint(addr: &str) -> Result<Endpoint, ConnectError> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(url)
        .map_err(|e| ConnectError::BadAddress {
            addr: addr.to_string(),
            detail: e.to_string(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true))
}

/// Checks every address parses, so a typo fails at startup rather than in a retry loop.
pub fn check_addresses(addrs: &[String]) -> Result<(), ConnectError> {
    if addrs.is_empty() {
        return Err(ConnectError::BadAddress {
            addr: String::new(),
            detail: "no coordinator address given".into(),
        });
    }
    addrs.iter().try_for_each(|a| endpoint(a).map(|_| ()))
}

/// Connects to the first reachable coordinator, trying `addrs` in order starting at `first`
/// (wrapping around). Returns the client and the index of the address it reached.
pub async fn connect(
    addrs: &[String],
    first: usize,
) -> Result<(WorkerServiceClient<Channel>, usize), ConnectError> {
    let mut errors = Vec::new();
    for k in 0..addrs.len() {
        let i = (first + k) % addrs.len();
        let ep = endpoint(&addrs[i])?;
        match ep.connect().await {
            Ok(channel) => {
                let client = WorkerServiceClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                return Ok((client, i));
            }
            Err(e) => errors.push(format!("{}: {e}", addrs[i])),
        }
    }
    Err(ConnectError::Unreachable(errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_on_commas_and_repeat() {
        let v = parse_addresses(&["a:1,b:2".into(), " c:3 ".into(), ",".into()]);
        assert_eq!(v, ["a:1", "b:2", "c:3"]);
        check_addresses(&v).unwrap();
        assert!(check_addresses(&[]).unwrap_err().is_permanent());
        assert!(check_addresses(&["http://bad host:1".into()]).is_err());
    }

    #[tokio::test]
    async fn the_first_reachable_address_wins() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listener.local_addr().unwrap().to_string();
        // A port nobody listens on: bound, then closed.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let accept = tokio::spawn(async move {
            let _conns: Vec<_> = vec![listener.accept().await];
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        let (_, i) = connect(&[dead.clone(), good], 0).await.unwrap();
        assert_eq!(i, 1);
        let e = connect(&[dead], 0).await.unwrap_err();
        assert!(matches!(e, ConnectError::Unreachable(_)), "{e}");
        accept.abort();
    }
}
