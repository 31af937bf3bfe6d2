//! Leader election among `coordinator serve` processes that share one etcd.
//!
//! Each process holds an etcd lease (renewed every third of its TTL) and campaigns on
//! `<prefix>/leader` with its advertised address as the value. The winner's election key and
//! its create revision are the fence: every write of the leader's state store compares them
//! (see [`crate::state::etcd::Fence`]), so a leader deposed while it was paused or cut off
//! cannot commit anything after its key is gone. A leader that loses its lease steps down
//! and its process exits; the supervisor (Kubernetes) restarts it as a standby.

use std::time::{Duration, Instant};

use etcd_client::{Client, LeaderKey, ResignOptions};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::etcd::{EtcdAccess, Fence};

/// Errors of the election; all are failures to talk to etcd.
#[derive(Debug, thiserror::Error)]
#[error("leader election on etcd at {endpoints}: {detail}")]
pub struct ElectionError {
    endpoints: String,
    detail: String,
}

/// One process's part in the election.
pub struct Election {
    client: Client,
    name: String,
    endpoints: String,
    ttl: Duration,
}

/// This process leads until `lost` is cancelled.
pub struct Leader {
    key: LeaderKey,
    lease: i64,
    /// Cancelled when the lease could not be renewed in time, or a fenced write failed.
    pub lost: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
}

impl Leader {
    /// The fence every state write of this leader carries.
    pub fn fence(&self) -> Fence {
        Fence {
            key: self.key.key().to_vec(),
            revision: self.key.rev(),
            lost: self.lost.clone(),
        }
    }
}

impl Election {
    /// Connects to etcd (`host:port` endpoints) for the election under `prefix`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        ttl: Duration,
    ) -> Result<Election, ElectionError> {
        Election::connect_with(&EtcdAccess::plain(endpoints), prefix, ttl).await
    }

    /// [`Election::connect`] with TLS and credentials (`access`); asks etcd for the leader
    /// once, so that a TLS or credentials problem fails here, explained naming the flag.
    pub async fn connect_with(
        access: &EtcdAccess,
        prefix: &str,
        ttl: Duration,
    ) -> Result<Election, ElectionError> {
        let shown = access.shown();
        let err = |detail: String| ElectionError {
            endpoints: shown.clone(),
            detail,
        };
        let options = access
            .options()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            Client::connect(access.endpoints(), Some(options)),
        )
        .await
        .map_err(|_| err("no answer within 10 s".into()))?
        .map_err(|e| err(access.explain(&e)))?;
        let election = Election {
            client,
            name: format!("{}/leader", prefix.trim_end_matches('/')),
            endpoints: shown.clone(),
            ttl: ttl.max(Duration::from_secs(2)),
        };
        let mut c = election.client.clone();
        match tokio::time::timeout(Duration::from_secs(10), c.leader(election.name.clone())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.to_string().contains("no leader") => {}
            Ok(Err(e)) => return Err(err(access.explain(&e))),
            Err(_) => return Err(err("no answer within 10 s".into())),
        }
        Ok(election)
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> ElectionError {
        ElectionError {
            endpoints: self.endpoints.clone(),
            detail: format!("{what}: {e}"),
        }
    }

    /// The current leader's advertised address, if there is a leader.
    pub async fn leader(&self) -> Result<Option<String>, ElectionError> {
        let mut c = self.client.clone();
        match tokio::time::timeout(Duration::from_secs(5), c.leader(self.name.clone())).await {
            Ok(Ok(r)) => Ok(r
                .kv()
                .and_then(|kv| kv.value_str().ok())
                .map(str::to_string)),
            // etcd answers "no leader" as an error.
            Ok(Err(e)) if e.to_string().contains("no leader") => Ok(None),
            Ok(Err(e)) => Err(self.err("asking for the leader", e)),
            Err(_) => Err(self.err("asking for the leader", "no answer within 5 s")),
        }
    }

    /// Waits until this process leads, announcing `advertise` as the leader's address.
    /// Cancelled by dropping the future (the lease then expires on its own).
    pub async fn campaign(&self, advertise: &str) -> Result<Leader, ElectionError> {
        let mut c = self.client.clone();
        let ttl_secs = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = c
            .lease_grant(ttl_secs, None)
            .await
            .map_err(|e| self.err("granting the election lease", e))?
            .id();
        let lost = CancellationToken::new();
        // Renew from now on: campaigning can take longer than the TTL.
        let keeper = tokio::spawn(keep_alive(
            self.client.clone(),
            lease,
            self.ttl,
            lost.clone(),
        ));
        let won = match c.campaign(self.name.clone(), advertise, lease).await {
            Ok(r) => r,
            Err(e) => {
                keeper.abort();
                let _ = c.lease_revoke(lease).await;
                return Err(self.err("campaigning", e));
            }
        };
        let Some(key) = won.leader().cloned() else {
            keeper.abort();
            let _ = c.lease_revoke(lease).await;
            return Err(self.err("campaigning", "etcd answered without a leader key"));
        };
        info!(leader_key = %String::from_utf8_lossy(key.key()), revision = key.rev(), "elected leader");
        Ok(Leader {
            key,
            lease,
            lost,
            keeper,
        })
    }

    /// Gives leadership up at once (a standby takes over without waiting for the TTL).
    pub async fn resign(&self, leader: Leader) {
        leader.keeper.abort();
        let mut c = self.client.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            c.resign(Some(ResignOptions::new().with_leader(leader.key))),
        )
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(5), c.lease_revoke(leader.lease)).await;
    }
}

/// Renews `lease` every third of `ttl`; cancels `lost` once a renewal has not succeeded for
/// longer than the TTL allows (etcd has then let the lease, and the leader key, go).
async fn keep_alive(client: Client, lease: i64, ttl: Duration, lost: CancellationToken) {
    let mut c = client;
    let every = ttl / 3;
    let mut last_ok = Instant::now();
    let mut stream = None;
    loop {
        if last_ok.elapsed() >= ttl.saturating_sub(every / 2) {
            warn!(
                lease,
                "the election lease could not be renewed in time; stepping down"
            );
            lost.cancel();
            return;
        }
        if stream.is_none() {
            stream = tokio::time::timeout(every, c.lease_keep_alive(lease))
                .await
                .ok()
                .and_then(Result::ok);
        }
        if let Some((keeper, responses)) = stream.as_mut() {
            let renewed = tokio::time::timeout(every, async {
                keeper.keep_alive().await?;
                responses.message().await
            })
            .await;
            match renewed {
                Ok(Ok(Some(r))) if r.ttl() > 0 => last_ok = Instant::now(),
                Ok(Ok(Some(_))) => {
                    warn!(lease, "the election lease expired; stepping down");
                    lost.cancel();
                    return;
                }
                _ => stream = None,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = lost.cancelled() => return,
        }
    }
}
