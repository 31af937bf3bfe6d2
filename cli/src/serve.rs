//! `coordinator serve`: the coordinator for remote workers and the client commands. With
//! `--state file://...` it leads at once; with `--state etcd://...` (or `etcd+tls://...`) it
//! campaigns, serves as a standby until elected, and leads until shut down or until leadership
//! is lost.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use quarry_common::storage::Store;
use quarry_common::transport::ServerSecurity;
use quarry_coordinator::coordinator::{Coordinator, CoordinatorConfig};
use quarry_coordinator::election::Election;
use quarry_coordinator::service::Leadership;
use quarry_coordinator::state::embedded::EmbeddedStore;
use quarry_coordinator::state::etcd::{DEFAULT_TIMEOUT, EtcdAccess, EtcdStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::args::ServeArgs;

/// Where `--state` keeps the coordinator's state.
#[derive(Debug, Clone, PartialEq)]
enum StateUrl {
    /// `file://<path>`: the embedded store; this process always leads.
    File(PathBuf),
    /// `etcd://host:port[,host:port...]/<prefix>`: processes elect a leader (the prefix keeps
    /// deployments apart); `etcd+tls://` the same over TLS.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        tls: bool,
    },
}

impl StateUrl {
    fn parse(url: &str) -> anyhow::Result<StateUrl> {
        if let Some(path) = url.strip_prefix("file://") {
            return Ok(StateUrl::File(std::path::absolute(path)?));
        }
        let (rest, tls) = match (url.strip_prefix("etcd://"), url.strip_prefix("etcd+tls://")) {
            (Some(rest), _) => (rest, false),
            (None, Some(rest)) => (rest, true),
            (None, None) => bail!(
                "--state {url:?}: use file://<path> or etcd://host:2379[,host2:2379]/prefix \
                 (etcd+tls:// for TLS to etcd)"
            ),
        };
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, "quarry"));
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() {
            bail!("--state {url:?}: no etcd endpoints; use etcd://host:2379[,host2:2379]/prefix");
        }
        Ok(StateUrl::Etcd {
            endpoints,
            prefix: format!("/{}", prefix.trim_matches('/')),
            tls,
        })
    }
}

/// Opens `--store`: `file://<dir>` (or a bare path) or `s3://bucket/prefix`.
fn open_store(url: &str) -> anyhow::Result<Store> {
    if url.starts_with("s3://") {
        return Ok(Store::open(url)?);
    }
    let dir = url.strip_prefix("file://").unwrap_or(url);
    Ok(Store::open_dir(&std::path::absolute(dir)?)?)
}

/// The address standbys give out for this process: `--advertise`, else the listening address
/// with this host's name in place of an unspecified IP.
fn advertised(a: &ServeArgs, local: std::net::SocketAddr) -> String {
    if let Some(adv) = &a.advertise {
        return adv.clone();
    }
    if local.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        if !host.is_empty() {
            return format!("{host}:{}", local.port());
        }
    }
    local.to_string()
}

/// Refuses a listener that would answer anyone: without a token or client certificates the
/// operator must say so with `--allow-unauthenticated` (a usage error, exit status 2).
fn refuse_unauthenticated(security: &ServerSecurity, allowed: bool) -> anyhow::Result<()> {
    if security.authenticates() || allowed {
        return Ok(());
    }
    Err(crate::exit::usage(anyhow::anyhow!(
        "coordinator serve needs callers to authenticate: pass --auth-token-file FILE (a \
         token only you can read; workers and the CLI pass the same file) or --tls-client-ca \
         PEM (client certificates), or --allow-unauthenticated to let anyone who reaches \
         --listen submit and cancel jobs"
    )))
}

/// `--state` with its etcd flags read: what the process opens.
enum State {
    File(PathBuf),
    Etcd { access: EtcdAccess, prefix: String },
}

/// How a `serve` process starts: leading at once (embedded store), or campaigning (etcd).
enum Role<'a> {
    Leading(Arc<Coordinator>),
    Campaign {
        access: &'a EtcdAccess,
        prefix: &'a str,
    },
}

/// `coordinator serve`: the coordinator for remote workers, until `shutdown`. With etcd state
/// it first campaigns for leadership and serves as a standby (pointing clients to the leader)
/// until it wins.
pub async fn serve(a: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state_url = StateUrl::parse(&a.state)?;
    let store = open_store(&a.store)?;
    let security = a.security.load()?;
    refuse_unauthenticated(&security, a.allow_unauthenticated)?;
    // The etcd flags are checked before anything listens.
    let state = match state_url {
        StateUrl::File(path) => State::File(path),
        StateUrl::Etcd {
            endpoints,
            prefix,
            tls,
        } => State::Etcd {
            access: crate::etcd_access::load(
                &a.etcd,
                &endpoints,
                tls,
                std::env::var(crate::etcd_access::PASSWORD_ENV).ok(),
            )?,
            prefix,
        },
    };
    let lease_ttl = Duration::from_secs(a.lease_ttl.max(1));
    let listener = TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("--listen {}", a.listen))?;
    let local = listener.local_addr()?;
    let advertise = advertised(&a, local);
    let leadership = Leadership::standby();
    let metrics = Arc::new(quarry_coordinator::metrics::CoordMetrics::default());
    leadership.track(metrics.leader.clone());
    a.metrics
        .start(Arc::clone(&metrics.registry), shutdown.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let cfg = CoordinatorConfig {
        lease_ttl,
        // Rounds a previous leader (or a previous run) handed out may still be running on
        // remote workers: let them re-register and have them adopted before handing out more.
        adopt_window: lease_ttl,
        metrics: Arc::clone(&metrics),
        ..Default::default()
    };
    // The embedded store has no election: lead before serving, so the first call finds a
    // leader. With etcd, serve as a standby while campaigning.
    let leading = match &state {
        State::File(path) => {
            let state = Arc::new(EmbeddedStore::open(path)?);
            let coord =
                Coordinator::start(cfg.clone(), state, store.clone(), shutdown.child_token())
                    .await?;
            leadership.lead(Arc::clone(&coord));
            Role::Leading(coord)
        }
        State::Etcd { access, prefix } => Role::Campaign { access, prefix },
    };
    let server = tokio::spawn(quarry_coordinator::service::serve(
        Arc::clone(&leadership),
        listener,
        security,
        shutdown.clone(),
    ));
    eprintln!(
        "coordinator listening on {local} (advertised as {advertise}, store {})",
        store.url()
    );
    let mut server = server;
    let lead = async {
        match leading {
            Role::Leading(coord) => {
                shutdown.cancelled().await;
                leadership.step_down();
                coord.close().await;
                Ok(())
            }
            Role::Campaign { access, prefix } => {
                lead_with_etcd(
                    access,
                    prefix,
                    Duration::from_secs(a.election_ttl.max(2)),
                    &advertise,
                    cfg,
                    store,
                    &leadership,
                    &shutdown,
                )
                .await
            }
        }
    };
    tokio::pin!(lead);
    let mut finished = None;
    let led = tokio::select! {
        led = &mut lead => led,
        served = &mut server => {
            if !shutdown.is_cancelled() {
                // The server ending by itself (a TLS setup error, a crash) ends the process.
                shutdown.cancel();
                served??;
                bail!("the gRPC server stopped unexpectedly");
            }
            // A shutdown: the server may finish first; the coordinator still closes.
            finished = Some(served);
            lead.await
        }
    };
    shutdown.cancel();
    // Graceful: open calls finish and connections close; a peer that keeps its connection
    // open does not hold the process beyond a bound.
    let served = match finished {
        Some(r) => r,
        None => match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("connections still open 5 s after shutdown; closing them");
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    led?;
    served??;
    Ok(())
}

/// Campaigns, leads once elected, and returns when `shutdown` is cancelled (resigning, so a
/// standby takes over at once) or with an error when leadership is lost.
#[allow(clippy::too_many_arguments)]
async fn lead_with_etcd(
    access: &EtcdAccess,
    prefix: &str,
    election_ttl: Duration,
    advertise: &str,
    cfg: CoordinatorConfig,
    store: Store,
    leadership: &Arc<Leadership>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let election = Arc::new(Election::connect_with(access, prefix, election_ttl).await?);
    // While campaigning, keep the leader's address current for the standby's answers.
    let hints = {
        let (e, l, stop) = (
            Arc::clone(&election),
            Arc::clone(leadership),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                if let Ok(leader) = e.leader().await {
                    l.set_leader_hint(leader);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        })
    };
    eprintln!("campaigning for leadership (standby until elected)");
    let leader = tokio::select! {
        won = election.campaign(advertise) => won,
        _ = shutdown.cancelled() => { hints.abort(); return Ok(()); }
    };
    hints.abort();
    let leader = leader?;
    leadership.set_leader_hint(Some(advertise.to_string()));
    let state = EtcdStore::connect_with(access, prefix, DEFAULT_TIMEOUT)
        .await?
        .with_fence(leader.fence());
    let coord_stop = shutdown.child_token();
    let coord = match Coordinator::start(cfg, Arc::new(state), store, coord_stop.clone()).await {
        Ok(c) => c,
        Err(e) => {
            election.resign(leader).await;
            return Err(e.into());
        }
    };
    eprintln!("elected leader; serving as {advertise}");
    leadership.lead(Arc::clone(&coord));
    let lost = tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = leader.lost.cancelled() => true,
    };
    leadership.step_down();
    coord_stop.cancel();
    coord.close().await;
    if lost {
        bail!(
            "lost leadership (the etcd lease was not renewed in time, or another coordinator \
             was elected); exiting so that this process restarts as a standby"
        );
    }
    election.resign(leader).await;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn state_urls_parse_or_name_the_fix() {
        assert_eq!(
            StateUrl::parse("etcd://a:2379,b:2379/lab/").unwrap(),
            StateUrl::Etcd {
                endpoints: vec!["http://a:2379".into(), "http://b:2379".into()],
                prefix: "/lab".into(),
                tls: false,
            }
        );
        assert_eq!(
            StateUrl::parse("etcd://a:2379").unwrap(),
            StateUrl::Etcd {
                endpoints: vec!["http://a:2379".into()],
                prefix: "/quarry".into(),
                tls: false,
            }
        );
        assert_eq!(
            StateUrl::parse("etcd+tls://a:2379/lab").unwrap(),
            StateUrl::Etcd {
                endpoints: vec!["http://a:2379".into()],
                prefix: "/lab".into(),
                tls: true,
            }
        );
        assert_eq!(
            StateUrl::parse("file:///tmp/s.redb").unwrap(),
            StateUrl::File("/tmp/s.redb".into())
        );
        for bad in ["etcd:///lab", "redis://x:1", "/tmp/s.redb"] {
            let e = StateUrl::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("--state") && e.contains("etcd://host:2379"),
                "{e}"
            );
        }
    }
}
