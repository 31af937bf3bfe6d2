//! How a coordinator reaches etcd: its endpoints, TLS (the CA that signed etcd's server
//! certificate, and a client certificate when etcd runs with `--client-cert-auth`) and etcd's
//! own user and password. The state store and the election both connect through one
//! [`EtcdAccess`], so they authenticate alike; a failure to connect is told in one sentence
//! that names the `coordinator serve` flag to fix ([`EtcdAccess::explain`]).

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

/// The CLI flags [`EtcdAccess::explain`] names (defined in `cli/src/args.rs`).
pub mod flags {
    pub const CA: &str = "--etcd-ca";
    pub const CERT: &str = "--etcd-cert";
    pub const KEY: &str = "--etcd-key";
    pub const USER: &str = "--etcd-user";
    pub const PASSWORD: &str = "--etcd-password-file (or QUARRY_ETCD_PASSWORD)";
}

/// TLS to etcd: the CA PEM that signed etcd's certificate, and this client's certificate and
/// key PEM for etcd's `--client-cert-auth`.
#[derive(Clone)]
struct Tls {
    ca_pem: Vec<u8>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

/// Endpoints and credentials of one etcd cluster. `Debug` shows no secret.
#[derive(Clone)]
pub struct EtcdAccess {
    endpoints: Vec<String>,
    tls: Option<Tls>,
    user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field(
                "client_cert",
                &self.tls.as_ref().is_some_and(|t| t.client.is_some()),
            )
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl EtcdAccess {
    /// Plaintext, unauthenticated access to `endpoints` (`http://host:port` or `host:port`).
    pub fn plain(endpoints: &[String]) -> EtcdAccess {
        EtcdAccess {
            endpoints: endpoints.to_vec(),
            tls: None,
            user: None,
        }
    }

    /// TLS to every endpoint (their scheme becomes `https://`), trusting `ca_pem`; with
    /// `client` (certificate PEM, key PEM) presented to etcd's `--client-cert-auth`.
    pub fn with_tls(mut self, ca_pem: Vec<u8>, client: Option<(Vec<u8>, Vec<u8>)>) -> EtcdAccess {
        self.endpoints = self
            .endpoints
            .iter()
            .map(|e| {
                let host = e
                    .strip_prefix("http://")
                    .or_else(|| e.strip_prefix("https://"))
                    .unwrap_or(e);
                format!("https://{host}")
            })
            .collect();
        self.tls = Some(Tls { ca_pem, client });
        self
    }

    /// Authenticates as etcd user `name` with `password` (etcd's `auth enable`).
    pub fn with_user(mut self, name: String, password: String) -> EtcdAccess {
        self.user = Some((name, password));
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The endpoints as one string for messages.
    pub fn shown(&self) -> String {
        self.endpoints.join(",")
    }

    /// Connect options carrying the TLS settings and the user, for the caller to add its
    /// timeouts to.
    pub(crate) fn options(&self) -> ConnectOptions {
        let mut o = ConnectOptions::new();
        if let Some(tls) = &self.tls {
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.client {
                t = t.identity(Identity::from_pem(cert, key));
            }
            o = o.with_tls(t);
        }
        if let Some((user, password)) = &self.user {
            o = o.with_user(user.clone(), password.clone());
        }
        o
    }

    /// One sentence on why connecting failed with `e`, naming the flag that fixes it when the
    /// cause is recognized (TLS trust, a missing client certificate, the user or password),
    /// followed by etcd's own words in parentheses; the caller names the endpoints.
    pub fn explain(&self, e: &(dyn std::error::Error + 'static)) -> String {
        let detail = chain(e);
        let d = detail.to_ascii_lowercase();
        let has = |words: &[&str]| words.iter().any(|w| d.contains(w));
        let hint = if has(&[
            "unknownissuer",
            "unknown issuer",
            "invalid peer certificate",
        ]) {
            format!(
                "etcd's certificate is not signed by the CA in {}; give the CA that signed \
                 etcd's server certificate",
                flags::CA
            )
        } else if has(&[
            "certificaterequired",
            "certificate required",
            "bad certificate",
            "badcertificate",
        ]) || (self.tls.is_some() && has(CLOSED))
        {
            // Under TLS 1.3 etcd checks the client certificate after the handshake and, when
            // it refuses it, just closes the connection.
            if self.tls.as_ref().is_some_and(|t| t.client.is_some()) {
                format!(
                    "etcd closed the TLS connection, refusing this coordinator's client \
                     certificate; give {} and {} signed by the CA etcd trusts (its \
                     --trusted-ca-file)",
                    flags::CERT,
                    flags::KEY
                )
            } else {
                format!(
                    "etcd closed the TLS connection, as it does when it requires a client \
                     certificate; pass {} and {} (signed by the CA etcd trusts, its \
                     --trusted-ca-file)",
                    flags::CERT,
                    flags::KEY
                )
            }
        } else if has(&["invalid user id or password", "authentication failed"]) {
            format!(
                "etcd refused the user or password; check {} and the password in {}",
                flags::USER,
                flags::PASSWORD
            )
        } else if has(&[
            "user name is empty",
            "user name not found",
            "invalid auth token",
        ]) {
            format!(
                "etcd requires a user (its auth is enabled); pass {} and {}",
                flags::USER,
                flags::PASSWORD
            )
        } else if self.tls.is_none() && (has(CLOSED) || has(&["h2 protocol"])) {
            format!(
                "etcd closed the connection, as an etcd serving TLS does to plaintext; use \
                 --state etcd+tls://... with {}",
                flags::CA
            )
        } else if self.tls.is_some()
            && has(&[
                "invalidcontenttype",
                "corrupt message",
                "wrong version number",
            ])
        {
            "etcd does not speak TLS at this address; use --state etcd://... without TLS"
                .to_string()
        } else {
            return detail;
        };
        format!("{hint} ({detail})")
    }
}

/// How a connection the peer closed reads in an error chain: as a sentence, or as the
/// `io::ErrorKind` that hyper's Debug output shows (`Kind(ConnectionReset)`), depending on
/// where the close caught the client.
const CLOSED: &[&str] = &[
    "connection closed",
    "connection reset",
    "connectionreset",
    "broken pipe",
    "brokenpipe",
    "connectionaborted",
];

/// `e` and its sources, joined by `: ` (tonic's transport errors hide the TLS cause in
/// their sources).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn tls_turns_every_endpoint_to_https_and_debug_hides_the_password() {
        let a = EtcdAccess::plain(&["http://a:1".into(), "b:2".into()])
            .with_tls(b"ca".to_vec(), None)
            .with_user("root".into(), "hunter2".into());
        assert_eq!(a.endpoints(), ["https://a:1", "https://b:2"]);
        let shown = format!("{a:?}");
        assert!(
            shown.contains("root") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    /// A plaintext client that a TLS etcd hung up on names the fix, however the close
    /// surfaced: as a sentence or as hyper's Debug of the io error kind (seen in CI-like
    /// runs under load: `hyper::Error(Io, Kind(ConnectionReset))`).
    #[test]
    fn a_closed_connection_names_the_tls_fix_in_every_wording() {
        let plain = EtcdAccess::plain(&["http://a:1".into()]);
        for words in [
            "transport error: connection reset by peer",
            "transport error: tonic::transport::Error(Transport, hyper::Error(Io, Kind(ConnectionReset)))",
            "transport error: hyper::Error(Io, Kind(BrokenPipe))",
        ] {
            let e = std::io::Error::other(words);
            let said = plain.explain(&e);
            assert!(said.contains("etcd+tls://"), "{words}: {said}");
        }
    }
}
