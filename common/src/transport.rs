//! How Quarry's processes reach each other over gRPC: TLS and mutual TLS, the bearer token
//! every RPC carries, message size bounds, and following the leader among several
//! coordinators.
//!
//! Clients (workers, the CLI) take a list of coordinator addresses. A standby coordinator
//! answers every RPC with `UNAVAILABLE` and the leader's address in the [`LEADER_METADATA`]
//! header; [`Coordinators::candidates`] puts that address first on the next try.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use tonic::{Request, Status};

use crate::secret::constant_time_eq;

/// Largest gRPC message accepted or sent by either side (a job spec with thousands of
/// objects, a status with thousands of rows, fit easily).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Most rounds one call carries: the leases one Acquire grants (`max_leases`), the completions
/// one CompleteBatch reports. Both sides bound themselves with it.
pub const MAX_ROUNDS_PER_CALL: usize = 64;

/// Response header in which a standby names the leader's address (`host:port`).
pub const LEADER_METADATA: &str = "quarry-leader";

/// A channel whose every request carries the bearer token (if one is configured).
pub type AuthChannel = InterceptedService<Channel, AuthToken>;

/// Errors in the transport settings; each names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{flag} {path}: {detail}")]
    File {
        flag: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{flag}: {problem}; {fix}")]
    Invalid {
        flag: &'static str,
        problem: String,
        fix: &'static str,
    },
    #[error("coordinator address {addr:?}: {detail}")]
    Address { addr: String, detail: String },
}

fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| TransportError::File {
        flag,
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Reads a bearer token file: one line, surrounding whitespace ignored.
pub fn read_token(flag: &'static str, path: &Path) -> Result<String, TransportError> {
    let bytes = read_file(flag, path)?;
    let text = String::from_utf8(bytes).map_err(|_| TransportError::File {
        flag,
        path: path.to_path_buf(),
        detail: "the token is not UTF-8 text".into(),
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TransportError::File {
            flag,
            path: path.to_path_buf(),
            detail: "the file is empty; write the shared token into it".into(),
        });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TransportError::File {
            flag,
            path: path.to_path_buf(),
            detail: "the token must be printable ASCII without spaces".into(),
        });
    }
    Ok(token.to_string())
}

/// `--tls-cert` and `--tls-key` read together: both or neither.
fn identity(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> Result<Option<Identity>, TransportError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(c), Some(k)) => Ok(Some(Identity::from_pem(
            read_file("--tls-cert", c)?,
            read_file("--tls-key", k)?,
        ))),
        _ => Err(TransportError::Invalid {
            flag: "--tls-cert/--tls-key",
            problem: "only one of the pair is given".into(),
            fix: "give both the certificate and its key, or neither",
        }),
    }
}

/// `--auth-token-file`, read if given.
fn token(path: &Option<PathBuf>) -> Result<Option<Arc<str>>, TransportError> {
    path.as_ref()
        .map(|p| read_token("--auth-token-file", p).map(Arc::from))
        .transpose()
}

// ----- client side -----

/// How a client reaches the coordinators: TLS (with a client certificate for mutual TLS)
/// and the bearer token.
#[derive(Clone, Default)]
pub struct ClientSecurity {
    tls: Option<ClientTlsConfig>,
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSecurity")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .finish()
    }
}

/// Command-line flags of a client's transport security, shared by `worker` and the
/// `coordinator` CLI commands.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientSecurityArgs {
    /// CA certificate (PEM) that signed the coordinator's certificate; turns on TLS.
    #[arg(long = "tls-ca", env = "QUARRY_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM) for mutual TLS; needs --tls-key and --tls-ca.
    #[arg(long = "tls-cert", env = "QUARRY_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// This client's private key (PEM) for mutual TLS.
    #[arg(long = "tls-key", env = "QUARRY_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Name to expect in the coordinator's certificate (default: the host of the address).
    #[arg(long = "tls-domain", env = "QUARRY_TLS_DOMAIN", value_name = "NAME")]
    pub tls_domain: Option<String>,
    /// File holding the bearer token sent with every RPC.
    #[arg(
        long = "auth-token-file",
        env = "QUARRY_AUTH_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub auth_token_file: Option<PathBuf>,
}

impl ClientSecurityArgs {
    /// Reads the files the flags name.
    pub fn load(&self) -> Result<ClientSecurity, TransportError> {
        let identity = identity(&self.tls_cert, &self.tls_key)?;
        let tls = match &self.tls_ca {
            None if identity.is_some() => {
                return Err(TransportError::Invalid {
                    flag: "--tls-ca",
                    problem: "a client certificate is given but no CA to check the coordinator"
                        .into(),
                    fix: "add --tls-ca with the CA that signed the coordinator's certificate",
                });
            }
            None => None,
            Some(ca) => {
                let mut cfg = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read_file("--tls-ca", ca)?));
                if let Some(id) = identity {
                    cfg = cfg.identity(id);
                }
                if let Some(d) = &self.tls_domain {
                    cfg = cfg.domain_name(d.clone());
                }
                Some(cfg)
            }
        };
        let token = token(&self.auth_token_file)?;
        Ok(ClientSecurity { tls, token })
    }
}

impl ClientSecurity {
    /// No TLS, no token.
    pub fn plain() -> ClientSecurity {
        ClientSecurity::default()
    }

    pub fn with_token(mut self, token: &str) -> ClientSecurity {
        self.token = Some(Arc::from(token));
        self
    }

    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A lazily connecting channel to one coordinator address (`host:port`, or a URL).
    pub fn channel(&self, addr: &str) -> Result<AuthChannel, TransportError> {
        let bad = |detail: String| TransportError::Address {
            addr: addr.to_string(),
            detail,
        };
        let url = match addr.split_once("://") {
            Some(("http", _)) if self.tls.is_some() => {
                return Err(bad(
                    "an http:// address with TLS configured; use host:port or https://".into(),
                ));
            }
            Some(("http" | "https", _)) => addr.to_string(),
            Some((scheme, _)) => return Err(bad(format!("unknown scheme {scheme:?}"))),
            None if self.tls.is_some() => format!("https://{addr}"),
            None => format!("http://{addr}"),
        };
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            // Small RPCs must not wait for the peer's delayed ACK (Nagle).
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| bad(format!("TLS settings: {e}")))?;
        }
        Ok(InterceptedService::new(
            endpoint.connect_lazy(),
            AuthToken::new(self.token.clone()),
        ))
    }
}

/// Adds `authorization: Bearer <token>` to every request, and `traceparent` when the call is
/// made inside an exported span.
#[derive(Clone)]
pub struct AuthToken {
    header: Option<MetadataValue<Ascii>>,
}

impl AuthToken {
    fn new(token: Option<Arc<str>>) -> AuthToken {
        AuthToken {
            // A token is printable ASCII (checked when read), so it always parses.
            header: token.and_then(|t| format!("Bearer {t}").parse().ok()),
        }
    }
}

impl Interceptor for AuthToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        // W3C trace context of the span the call is made in (only when spans are exported),
        // so the coordinator's span for this call joins the caller's trace.
        if let Some(tp) = crate::telemetry::current_traceparent()
            && let Ok(v) = tp.parse()
        {
            req.metadata_mut().insert(crate::telemetry::TRACEPARENT, v);
        }
        Ok(req)
    }
}

/// The coordinator addresses a client knows, and which one it last found leading.
#[derive(Debug, Clone)]
pub struct Coordinators {
    addrs: Vec<String>,
    security: ClientSecurity,
    /// Index into `addrs` of the address to try first, or a leader named by a standby.
    preferred: Option<String>,
}

impl Coordinators {
    /// `addrs` as given on the command line: repeated flags and/or comma-separated lists.
    pub fn new(addrs: &[String], security: ClientSecurity) -> Result<Coordinators, TransportError> {
        let addrs: Vec<String> = addrs
            .iter()
            .flat_map(|a| a.split(','))
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        if addrs.is_empty() {
            return Err(TransportError::Invalid {
                flag: "--coordinator",
                problem: "no address given".into(),
                fix: "pass host:port of the coordinator (several, comma separated, for standbys)",
            });
        }
        // Fail on a malformed address now rather than on first use.
        for a in &addrs {
            security.channel(a)?;
            if security.token.is_some() && security.tls.is_none() && !is_loopback_address(a) {
                tracing::warn!(
                    coordinator = %a,
                    "the auth token is sent in clear text to a non-loopback address: anyone \
                     who can watch this network can read it. Pass --tls-ca (and serve with \
                     --tls-cert/--tls-key)"
                );
            }
        }
        Ok(Coordinators {
            addrs,
            security,
            preferred: None,
        })
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    pub fn security(&self) -> &ClientSecurity {
        &self.security
    }

    /// Addresses in the order to try them: the last known leader first, then the list.
    pub fn candidates(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.addrs.len() + 1);
        if let Some(p) = &self.preferred {
            out.push(p.clone());
        }
        for a in &self.addrs {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }

    /// Remembers `addr` as the one to try first.
    pub fn prefer(&mut self, addr: &str) {
        self.preferred = Some(addr.to_string());
    }

    /// Learns from a failed call: a standby's leader hint becomes the first candidate.
    /// Returns whether the call is worth retrying on another coordinator.
    pub fn learn(&mut self, status: &Status) -> bool {
        if let Some(leader) = leader_hint(status) {
            self.preferred = Some(leader);
        }
        is_failover(status)
    }

    pub fn channel(&self, addr: &str) -> Result<AuthChannel, TransportError> {
        self.security.channel(addr)
    }
}

/// Whether a coordinator address (`host:port` or `http://host:port`) names this machine's
/// loopback: `localhost`, `127.0.0.0/8` or `::1`.
pub fn is_loopback_address(addr: &str) -> bool {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.strip_prefix('[') {
        // [v6]:port
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The leader's address a standby put in its answer, if any.
pub fn leader_hint(status: &Status) -> Option<String> {
    status
        .metadata()
        .get(LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Whether an RPC failed in a way another coordinator (or the same one later) may not:
/// unreachable, not the leader, or shutting down.
pub fn is_failover(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

// ----- server side -----

/// Command-line flags of the coordinator's transport security.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerSecurityArgs {
    /// The coordinator's certificate chain (PEM); with --tls-key turns on TLS.
    #[arg(long = "tls-cert", env = "QUARRY_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The coordinator's private key (PEM).
    #[arg(long = "tls-key", env = "QUARRY_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: turns on mutual TLS.
    #[arg(
        long = "tls-client-ca",
        env = "QUARRY_TLS_CLIENT_CA",
        value_name = "PEM"
    )]
    pub tls_client_ca: Option<PathBuf>,
    /// File holding the bearer token every RPC must carry.
    #[arg(
        long = "auth-token-file",
        env = "QUARRY_AUTH_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub auth_token_file: Option<PathBuf>,
}

/// What the server enforces.
#[derive(Clone, Default)]
pub struct ServerSecurity {
    pub tls: Option<ServerTlsConfig>,
    pub mutual_tls: bool,
    pub token: Option<Arc<str>>,
}

impl std::fmt::Debug for ServerSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSecurity")
            .field("tls", &self.tls.is_some())
            .field("mutual_tls", &self.mutual_tls)
            .field("token", &self.token.is_some())
            .finish()
    }
}

impl ServerSecurityArgs {
    pub fn load(&self) -> Result<ServerSecurity, TransportError> {
        let tls =
            identity(&self.tls_cert, &self.tls_key)?.map(|id| ServerTlsConfig::new().identity(id));
        let (tls, mutual_tls) = match (&self.tls_client_ca, tls) {
            (None, tls) => (tls, false),
            (Some(_), None) => {
                return Err(TransportError::Invalid {
                    flag: "--tls-client-ca",
                    problem: "mutual TLS needs TLS".into(),
                    fix: "add --tls-cert and --tls-key",
                });
            }
            (Some(ca), Some(tls)) => (
                Some(tls.client_ca_root(Certificate::from_pem(read_file("--tls-client-ca", ca)?))),
                true,
            ),
        };
        let token = token(&self.auth_token_file)?;
        Ok(ServerSecurity {
            tls,
            mutual_tls,
            token,
        })
    }
}

impl ServerSecurity {
    /// Whether a caller must prove who it is (client certificate or token).
    pub fn authenticates(&self) -> bool {
        self.mutual_tls || self.token.is_some()
    }

    /// The interceptor that refuses calls without the token.
    pub fn checker(&self) -> CheckToken {
        CheckToken {
            expected: self
                .token
                .as_ref()
                .map(|t| Arc::from(format!("Bearer {t}").as_bytes())),
        }
    }
}

/// Refuses a call whose `authorization` header is not the expected bearer token.
#[derive(Clone)]
pub struct CheckToken {
    expected: Option<Arc<[u8]>>,
}

impl Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        match req.metadata().get("authorization") {
            Some(got) if constant_time_eq(got.as_bytes(), expected) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated(
                "this coordinator requires a bearer token; pass --auth-token-file",
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn token_check_accepts_only_the_exact_token() {
        let sec = ServerSecurity {
            token: Some(Arc::from("s3cret")),
            ..Default::default()
        };
        let mut check = sec.checker();
        let mut with = |v: Option<&str>| {
            let mut r = Request::new(());
            if let Some(v) = v {
                r.metadata_mut().insert("authorization", v.parse().unwrap());
            }
            check.call(r).map_err(|s| s.code())
        };
        assert!(with(Some("Bearer s3cret")).is_ok());
        assert_eq!(
            with(Some("Bearer s3cre")).unwrap_err(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            with(Some("Bearer s3cretX")).unwrap_err(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(with(None).unwrap_err(), tonic::Code::Unauthenticated);
        // Without a configured token every call passes.
        let mut open = ServerSecurity::default().checker();
        assert!(open.call(Request::new(())).is_ok());
    }

    #[test]
    fn token_files_are_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "  abc.DEF-123\n").unwrap();
        assert_eq!(read_token("--auth-token-file", &p).unwrap(), "abc.DEF-123");
        std::fs::write(&p, "\n").unwrap();
        let e = read_token("--auth-token-file", &p).unwrap_err().to_string();
        assert!(
            e.contains("--auth-token-file") && e.contains("empty"),
            "{e}"
        );
        std::fs::write(&p, "two words").unwrap();
        assert!(read_token("--auth-token-file", &p).is_err());
        let e = read_token("--auth-token-file", &dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn half_a_tls_pair_is_refused_naming_the_flags() {
        let args = ClientSecurityArgs {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        };
        let e = args.load().unwrap_err().to_string();
        assert!(e.contains("--tls-cert/--tls-key"), "{e}");
        let args = ServerSecurityArgs {
            tls_client_ca: Some("ca.pem".into()),
            ..Default::default()
        };
        let e = args.load().unwrap_err().to_string();
        assert!(
            e.contains("--tls-client-ca") && e.contains("--tls-cert"),
            "{e}"
        );
    }

    #[test]
    fn loopback_addresses_are_recognized() {
        for a in [
            "127.0.0.1:50051",
            "localhost:1",
            "http://127.0.0.2:5",
            "[::1]:7",
            "http://[::1]:7/",
        ] {
            assert!(is_loopback_address(a), "{a}");
        }
        for a in [
            "10.0.0.1:50051",
            "gpu-node:1",
            "https://example.org:443",
            "[fe80::1]:7",
        ] {
            assert!(!is_loopback_address(a), "{a}");
        }
    }

    #[tokio::test]
    async fn coordinator_lists_follow_the_leader_hint() {
        let mut c = Coordinators::new(
            &["a:1,b:2".to_string(), "c:3".to_string()],
            ClientSecurity::plain(),
        )
        .unwrap();
        assert_eq!(c.candidates(), ["a:1", "b:2", "c:3"]);
        let mut st = Status::unavailable("standby");
        st.metadata_mut()
            .insert(LEADER_METADATA, "c:3".parse().unwrap());
        assert!(c.learn(&st));
        assert_eq!(c.candidates(), ["c:3", "a:1", "b:2"]);
        assert!(!c.learn(&Status::invalid_argument("bad spec")));
        assert!(Coordinators::new(&[" , ".to_string()], ClientSecurity::plain()).is_err());
        assert!(Coordinators::new(&["ftp://x:1".to_string()], ClientSecurity::plain()).is_err());
    }
}
