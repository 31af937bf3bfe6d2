//! One registration of an agent with a coordinator: the round pipeline, heartbeats and the
//! self-fencing watchdog.
//!
//! Pipeline: acquire → prepare (GPU healthy, scratch space, free GPU memory) → run the
//! generator → finish (inspect, upload, report) in the background while the next round
//! runs. With prefetch the next round is acquired shortly before the current one ends
//! (`ahead.rs`), and a finished round's finish waits until the next round's process has
//! started, so that the start does not compete with its inspection and upload. At most
//! `lease_batch` + 1 rounds finish while the next runs, so the GPU waits on neither the upload
//! nor the coordinator.
//!
//! Batching (`lease_batch` N > 1): one Acquire asks for up to N rounds; the ones not started
//! wait in a queue, in the order granted, and Acquire is called again only once it is empty.
//! Completions ready while another of the session's Complete calls is in flight go together
//! in one CompleteBatch ([`Session::complete`]).
//!
//! Every lease the agent holds (running, finishing, or queued and not started) is in
//! `running`, so heartbeats renew it, with a token that stops its work; the tokens are
//! children of `lost`, which is cancelled when the session is fenced, forgotten by the
//! coordinator, or stopped.
//!
//! This file holds the pipeline; `reports.rs` what the session tells the coordinator about its
//! rounds (give back, failure, completion), `liveness.rs` the heartbeats and the fence.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quarry_common::storage::Store;
use quarry_common::transport::{Coordinators, is_failover};
use quarry_proto::v1 as pb;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Instrument, debug, field::Empty, info, info_span, warn};

use super::outbox::{self, Outbox, Waiting};
use super::round::{self, Paths};
use super::{AgentConfig, Backoff, Counters, RPC_TIMEOUT, Shutdown};
use crate::connect::{Client, register};
use crate::gpu::Health;
use crate::monitor::Monitor;
use crate::scratch;

mod ahead;
mod liveness;
mod reports;

/// Bound on a Release: it must not hold up a shutdown.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a completion's answer: the call in flight ahead of it, then its own.
pub(super) const COMPLETE_WAIT: Duration = Duration::from_secs(2 * RPC_TIMEOUT.as_secs() + 1);
/// Lease TTL assumed when an old coordinator does not say.
const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Longest a finished round's inspection and upload wait for the next round's process to
/// start (a start that takes longer, waiting for GPU memory say, no longer holds it back).
const HOLD_BACK_LIMIT: Duration = Duration::from_millis(500);

/// How a session ended.
#[derive(Debug)]
pub(super) enum End {
    /// Drained or stopped: the agent ends.
    Shutdown,
    /// The session fenced itself: register again (with what it learned of the leader).
    Lost(Lost, Box<Coordinators>),
    /// The warm generator failed to start too often and the agent ends
    /// ([`AgentConfig::end_when_out_of_rotation`]).
    OutOfRotation(String),
}

#[derive(Debug, Clone)]
pub(super) enum Lost {
    /// No heartbeat answered for longer than the lease TTL.
    Fenced(Duration),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Fenced(d) => write!(
                f,
                "no coordinator contact for {:.1} s, longer than the lease TTL: runs stopped and staging discarded",
                d.as_secs_f64()
            ),
        }
    }
}

/// A lease this agent holds, with the token that stops its work.
pub(super) struct Held {
    pub lease: pb::Lease,
    pub stop: CancellationToken,
    /// The round's span, a child of the coordinator's `lease` span; it ends when the round
    /// is reported (or given back) and this is dropped.
    pub span: tracing::Span,
}

/// Why acquiring is paused after a round was given back.
enum Block {
    /// The task root's filesystem is short of space.
    Scratch { path: PathBuf, need: u64 },
    /// The GPU lacked a job's minimum free memory; retried once it is free or after `until`.
    Memory { need: u64, until: Instant },
}

/// The coordinator the session talks to now, and who it is there. A failover or a
/// coordinator restart replaces it (see [`Session::rebind`]); the runs go on.
#[derive(Clone)]
pub(super) struct Conn {
    pub client: Client,
    pub worker_id: String,
    /// The secret Register gave `worker_id`; every call naming the worker carries it.
    pub worker_secret: String,
    pub addr: String,
    /// Bumped by every rebind, so that concurrent callers rebind once.
    pub generation: u64,
}

pub(super) struct Session {
    pub cfg: Arc<AgentConfig>,
    conn: Mutex<Conn>,
    coords: Mutex<Coordinators>,
    rebinding: tokio::sync::Mutex<()>,
    pub store: Store,
    pub monitor: Monitor,
    pub counters: Arc<Counters>,
    pub shutdown: Shutdown,
    ttl: Duration,
    heartbeat_every: Duration,
    /// Cancelled when the session is lost, and on stop (it is a child of `shutdown.stop`).
    pub lost: CancellationToken,
    /// Cancelled only when the session is lost (fenced or forgotten), not on stop.
    pub fenced: CancellationToken,
    lost_why: Mutex<Option<Lost>>,
    /// Every lease held, as received (sent again at a re-registration to be adopted).
    running: Mutex<HashMap<u64, (pb::Lease, CancellationToken)>>,
    /// What the agent is waiting for, sent in heartbeats; empty when it is simply working.
    state: Mutex<String>,
    /// When the last heartbeat that got an answer was sent.
    contact: Mutex<Instant>,
    block: Mutex<Option<Block>>,
    /// When the last generator run ended (for the idle-gap metric).
    last_run_end: Mutex<Option<Instant>>,
    /// Completions waiting for the Complete in flight (see [`Session::complete`]).
    outbox: Outbox,
    /// The agent's warm generator (warm jobs only), shared with the agent's later sessions.
    pub warm: Arc<tokio::sync::Mutex<super::warm::Slot>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        cfg: Arc<AgentConfig>,
        coords: Coordinators,
        client: Client,
        addr: String,
        reg: pb::RegisterResponse,
        store: Store,
        monitor: Monitor,
        counters: Arc<Counters>,
        shutdown: Shutdown,
        warm: Arc<tokio::sync::Mutex<super::warm::Slot>>,
    ) -> Arc<Session> {
        let ttl = if reg.lease_ttl_ms == 0 {
            DEFAULT_TTL
        } else {
            Duration::from_millis(reg.lease_ttl_ms)
        };
        // Three heartbeats per TTL whatever the coordinator's interval, so one lost heartbeat
        // never costs a lease.
        let heartbeat_every = Duration::from_millis(reg.heartbeat_interval_ms.max(50))
            .min(ttl / 3)
            .max(Duration::from_millis(50));
        Arc::new(Session {
            lost: shutdown.stop.child_token(),
            fenced: CancellationToken::new(),
            cfg,
            conn: Mutex::new(Conn {
                client,
                worker_id: reg.worker_id,
                worker_secret: reg.worker_secret,
                addr,
                generation: 0,
            }),
            coords: Mutex::new(coords),
            rebinding: tokio::sync::Mutex::new(()),
            store,
            monitor,
            counters,
            shutdown,
            ttl,
            heartbeat_every,
            lost_why: Mutex::new(None),
            running: Mutex::new(HashMap::new()),
            state: Mutex::new(String::new()),
            contact: Mutex::new(Instant::now()),
            block: Mutex::new(None),
            last_run_end: Mutex::new(None),
            outbox: Outbox::default(),
            warm,
        })
    }

    /// Runs the session until it is drained, stopped or lost. Returns after every generator
    /// it started is gone and every round it ran is reported (or discarded).
    pub(super) async fn run(self: Arc<Self>) -> End {
        let hb = tokio::spawn(Arc::clone(&self).heartbeat_loop());
        let fence = tokio::spawn(Arc::clone(&self).fence_watchdog());
        // Finishing rounds (inspect, upload, report), oldest first; at most `lease_batch`
        // while the next round runs.
        let mut finishing: VecDeque<tokio::task::JoinHandle<()>> = VecDeque::new();
        // Leased rounds not started yet, in the order the coordinator granted them.
        let mut queue: VecDeque<Held> = VecDeque::new();
        let mut out_of_rotation = None;
        // The previous round's generator time, which says when to acquire ahead.
        let mut previous: Option<Duration> = None;
        // Holds the last round's finish back until the next round's process has started: on
        // a small host its inspection and upload would slow that start down. Dropped (the
        // finish goes on) when the process starts or when anything else comes first.
        let mut hold_back: Option<DropGuard> = None;
        loop {
            let mut finish_waits = hold_back.take();
            if let Some(why) = self.warm.lock().await.out_of_rotation().map(str::to_owned) {
                // No more rounds here: give back what is queued and stay registered, so that
                // status shows why, until the agent is stopped.
                warn!(gpu = %self.cfg.gpu.id, reason = %why, "agent out of rotation");
                self.set_state(why.clone());
                self.give_back_all(queue.drain(..), "agent out of rotation")
                    .await;
                if self.cfg.end_when_out_of_rotation {
                    out_of_rotation = Some(why);
                } else {
                    self.shutdown.drain.cancelled().await;
                }
                break;
            }
            if queue.is_empty() {
                drop(finish_waits.take());
                queue.extend(self.acquire().await);
            }
            let Some(held) = queue.pop_front() else {
                break;
            };
            // Queued rounds that must not start any more: give them back at once.
            if self.shutdown.drain.is_cancelled() {
                queue.push_front(held);
                self.give_back_all(queue.drain(..), "agent draining").await;
                continue;
            }
            if held.stop.is_cancelled() {
                self.give_back(&held, "stopped by the coordinator").await;
                continue;
            }
            let prepare = info_span!(parent: &held.span, "prepare", gpu = %self.cfg.gpu.id);
            let Some(paths) = self.prepare(&held).instrument(prepare).await else {
                continue;
            };
            Counters::bump(&self.counters.rounds_run);
            let started = Instant::now();
            if let Some(end) = lock(&self.last_run_end).take() {
                self.cfg.metrics.idle_gap(started - end);
            }
            // `mode`: `warm` for a round handed to a long-lived process, `process` for a
            // fresh process (the cold start inside the span).
            let mode = match held.lease.task.as_ref().map(|t| t.mode.as_str()) {
                Some("warm") => "warm",
                _ => "process",
            };
            let generator = info_span!(
                parent: &held.span,
                "generator",
                gpu = %self.cfg.gpu.id,
                mode,
                outcome = Empty,
            );
            // With prefetch, the next round is leased while this one runs (`ahead.rs`).
            let ahead = previous
                .filter(|_| self.cfg.prefetch && queue.is_empty())
                .map(|p| ahead::Ahead::start(&self, p));
            let ran = round::run_generator(&self, &held, &paths, finish_waits.take())
                .instrument(generator)
                .await;
            previous = Some(started.elapsed());
            self.cfg.metrics.generator(started.elapsed());
            *lock(&self.last_run_end) = Some(Instant::now());
            self.make_room(&mut finishing).await;
            let go = CancellationToken::new();
            let fin = tokio::spawn(Arc::clone(&self).finish(held, paths, ran, go.clone()));
            if self.cfg.prefetch {
                // The next rounds are started while this one uploads.
                finishing.push_back(fin);
                hold_back = Some(go.drop_guard());
                if queue.is_empty() {
                    let next = match ahead {
                        Some(a) if a.is_ready() => a.rounds().await,
                        // Waiting for the coordinator: nothing to hold the finish back for.
                        not_ready => {
                            hold_back = None;
                            match not_ready {
                                Some(a) => a.rounds().await,
                                None => self.acquire().await,
                            }
                        }
                    };
                    queue.extend(next);
                }
            } else {
                go.cancel();
                let _ = fin.await;
            }
        }
        for f in finishing {
            let _ = f.await;
        }
        hb.abort();
        fence.abort();
        if let Some(why) = out_of_rotation {
            return End::OutOfRotation(why);
        }
        let why = lock(&self.lost_why).clone();
        match why {
            Some(l) if !self.shutdown.drain.is_cancelled() => {
                End::Lost(l, Box::new(lock(&self.coords).clone()))
            }
            _ => End::Shutdown,
        }
    }

    /// Waits until at most `lease_batch` rounds are finishing, so that one more may start its
    /// finish (with batch 1: the round before the previous one is done). One finish more than
    /// the batch may be under way: an upload that once takes longer than a round does not
    /// keep the GPU waiting; uploads that stay slower than the rounds still do, bounding the
    /// outputs on local disk.
    async fn make_room(&self, finishing: &mut VecDeque<tokio::task::JoinHandle<()>>) {
        finishing.retain(|f| !f.is_finished());
        while finishing.len() > self.cfg.lease_batch.max(1) as usize {
            if let Some(f) = finishing.pop_front() {
                let _ = f.await;
            }
        }
    }

    /// Gives back every lease of `held` at once (each as [`Session::give_back`]), so that a
    /// drain with a full queue is bounded by one Release timeout, not one per lease.
    async fn give_back_all(&self, held: impl Iterator<Item = Held>, reason: &str) {
        let held: Vec<Held> = held.collect();
        futures::future::join_all(held.iter().map(|h| self.give_back(h, reason))).await;
    }

    /// The coordinator connection to use now.
    pub(super) fn conn(&self) -> Conn {
        lock(&self.conn).clone()
    }

    /// Registers again with whichever coordinator leads now (after a failover, or when the
    /// coordinator forgot this worker), listing every lease held so that the new leader adopts
    /// them: the runs go on and commit as if nothing happened. Leases it refuses are stopped.
    /// `seen` is the connection generation the caller found failing: if another caller has
    /// rebound since, nothing is done. Returns whether the session has a coordinator again.
    pub(super) async fn rebind(&self, seen: u64) -> bool {
        let _one = self.rebinding.lock().await;
        if lock(&self.conn).generation != seen {
            return true;
        }
        let running: Vec<pb::Lease> = lock(&self.running)
            .values()
            .map(|(l, _)| l.clone())
            .collect();
        // Proof that the listed rounds are this agent's own, should the coordinator still
        // count its old registration as alive.
        let previous = self.conn();
        let req = pb::RegisterRequest {
            host: self.cfg.host.clone(),
            gpu: self.cfg.gpu.id.clone(),
            agent_name: self.cfg.name.clone(),
            gpu_info: Some(self.cfg.gpu.to_proto()),
            running,
            previous_worker_id: previous.worker_id,
            previous_worker_secret: previous.worker_secret,
        };
        let mut coords = lock(&self.coords).clone();
        let timeout = (self.ttl / 2).max(Duration::from_millis(200));
        let sent = Instant::now();
        let result = register(&mut coords, &req, timeout).await;
        *lock(&self.coords) = coords;
        match result {
            Ok((client, resp, addr)) => {
                {
                    let running = lock(&self.running);
                    for id in &resp.cancel_lease_ids {
                        if let Some((_, t)) = running.get(id) {
                            info!(
                                lease = id,
                                "the coordinator cannot adopt this round; stopping it"
                            );
                            t.cancel();
                        }
                    }
                }
                info!(
                    gpu = %self.cfg.gpu.id,
                    worker = %resp.worker_id,
                    coordinator = %addr,
                    adopted = req.running.len() - resp.cancel_lease_ids.len(),
                    "registered again; running rounds carried over"
                );
                let mut conn = lock(&self.conn);
                *conn = Conn {
                    client,
                    worker_id: resp.worker_id,
                    worker_secret: resp.worker_secret,
                    addr,
                    generation: seen + 1,
                };
                *lock(&self.contact) = sent;
                true
            }
            Err(e) => {
                debug!(gpu = %self.cfg.gpu.id, error = %e, "no coordinator to register with yet");
                false
            }
        }
    }

    fn lose(&self, why: Lost) {
        lock(&self.lost_why).get_or_insert(why);
        self.fenced.cancel();
        self.lost.cancel();
    }

    /// True when the session was lost (not stopped): its leases cannot be reported any more.
    pub(super) fn is_lost(&self) -> bool {
        lock(&self.lost_why).is_some()
    }

    fn hold(&self, lease: pb::Lease) -> Held {
        let stop = self.lost.child_token();
        lock(&self.running).insert(lease.lease_id, (lease.clone(), stop.clone()));
        let span = info_span!(
            parent: None,
            "round",
            job = %lease.job_id,
            object = %lease.object,
            round = lease.round,
            seed = lease.seed,
            attempt = %lease.attempt,
            gpu = %self.cfg.gpu.id,
            gpu.uuid = Empty,
            worker = %self.conn().worker_id,
            outcome = Empty,
            bytes = Empty,
            samples = Empty,
        );
        if let Some(uuid) = &self.cfg.gpu.uuid {
            span.record("gpu.uuid", uuid.as_str());
        }
        quarry_common::telemetry::set_parent(&span, &lease.traceparent);
        Held { lease, stop, span }
    }

    pub(super) fn unhold(&self, held: &Held) {
        lock(&self.running).remove(&held.lease.lease_id);
    }

    fn set_state(&self, s: String) {
        let mut st = lock(&self.state);
        if *st != s {
            if !s.is_empty() {
                info!(gpu = %self.cfg.gpu.id, state = %s, "agent waiting");
            }
            *st = s;
        }
    }

    fn state_for_heartbeat(&self) -> String {
        if self.shutdown.drain.is_cancelled() {
            return "draining".into();
        }
        lock(&self.state).clone()
    }

    /// Sleeps `d`; true when drained or lost meanwhile.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.shutdown.drain.cancelled() => true,
            _ = self.lost.cancelled() => true,
        }
    }

    /// Why the agent must not ask for a round now, if it must not.
    fn gate(&self) -> Option<String> {
        let sample = self.monitor.latest();
        if let Health::Unhealthy(why) = &sample.health {
            return Some(format!("unhealthy: {why}"));
        }
        if let Some(root) = &self.cfg.root_override
            && let Ok(free) = scratch::free_mib(root)
            && free < self.cfg.min_scratch_mib
        {
            return Some(scratch_message(free, root, self.cfg.min_scratch_mib));
        }
        let mut block = lock(&self.block);
        let why = match block.as_ref() {
            None => None,
            Some(Block::Scratch { path, need }) => match scratch::free_mib(path) {
                Ok(free) if free < *need => Some(scratch_message(free, path, *need)),
                _ => None,
            },
            Some(Block::Memory { need, until }) => match sample.memory_free_mib {
                Some(free) if free < *need && Instant::now() < *until => {
                    Some(memory_message(free, *need))
                }
                _ => None,
            },
        };
        if why.is_none() {
            *block = None;
        }
        why
    }

    /// Long-polls for rounds while the agent may take one: up to `lease_batch` of them, in
    /// the order granted, each held (renewed by heartbeats, listed at a re-registration).
    /// Empty when drained or lost.
    async fn acquire(&self) -> Vec<Held> {
        let mut backoff = Backoff::new();
        loop {
            if self.shutdown.drain.is_cancelled() || self.lost.is_cancelled() {
                return Vec::new();
            }
            if let Some(why) = self
                .cfg
                .deadline
                .as_ref()
                .and_then(|d| d.refuses(std::time::SystemTime::now()))
            {
                warn!(gpu = %self.cfg.gpu.id, reason = %why, "draining: no new rounds before the allocation ends");
                self.set_state(format!("draining: {why}"));
                self.shutdown.drain.cancel();
                return Vec::new();
            }
            if let Some(why) = self.gate() {
                self.set_state(why);
                if self.pause(self.cfg.sample_interval).await {
                    return Vec::new();
                }
                continue;
            }
            self.set_state(String::new());
            let conn = self.conn();
            let req = pb::AcquireRequest {
                worker_id: conn.worker_id.clone(),
                worker_secret: conn.worker_secret.clone(),
                wait_ms: self.cfg.acquire_wait.as_millis() as u64,
                max_leases: self.cfg.lease_batch.max(1),
            };
            let mut client = conn.client.clone();
            // Dropping the call on drain cancels the long-poll on the server before it grants
            // anything (the stream is reset).
            let r = tokio::select! {
                r = tokio::time::timeout(self.cfg.acquire_wait + RPC_TIMEOUT, client.acquire(req)) => r,
                _ = self.shutdown.drain.cancelled() => return Vec::new(),
                _ = self.lost.cancelled() => return Vec::new(),
                // Turning unhealthy ends the long-poll at once (and shows in status).
                _ = self.monitor.unhealthy() => continue,
            };
            let failure = match r {
                Ok(Ok(resp)) => {
                    backoff.reset();
                    let resp = resp.into_inner();
                    let granted: Vec<Held> = resp
                        .lease
                        .into_iter()
                        .chain(resp.more)
                        .map(|lease| self.hold(lease))
                        .collect();
                    if !granted.is_empty() {
                        return granted;
                    }
                    continue;
                }
                // Forgotten (the coordinator restarted) or not the leader any more: register
                // again with the one that leads, carrying the held rounds over.
                Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition || is_failover(&s) => {
                    if self.rebind(conn.generation).await {
                        continue;
                    }
                    s.to_string()
                }
                Ok(Err(s)) => s.to_string(),
                Err(_) => "timed out".into(),
            };
            debug!(gpu = %self.cfg.gpu.id, error = %failure, "acquire failed; retrying");
            tokio::select! {
                _ = backoff.wait(&self.lost) => {}
                _ = self.shutdown.drain.cancelled() => return Vec::new(),
            }
        }
    }

    /// Checks a leased round can run here now. `None`: it was given back (or failed).
    async fn prepare(&self, held: &Held) -> Option<Paths> {
        if let Health::Unhealthy(why) = self.monitor.latest().health {
            self.give_back(held, &format!("GPU unhealthy: {why}")).await;
            return None;
        }
        let paths = match Paths::resolve(self.cfg.root_override.as_deref(), &held.lease) {
            Ok(p) => p,
            Err(msg) => {
                self.report_failure(held, pb::FailureKind::Spawn, msg, String::new(), 0)
                    .await;
                return None;
            }
        };
        let need = self.cfg.min_scratch_mib;
        if let Ok(free) = scratch::free_mib(&paths.root)
            && free < need
        {
            let why = scratch_message(free, &paths.root, need);
            warn!(gpu = %self.cfg.gpu.id, "{why}; round given back");
            *lock(&self.block) = Some(Block::Scratch {
                path: paths.root.clone(),
                need,
            });
            self.set_state(why.clone());
            self.give_back(held, &why).await;
            return None;
        }
        let need = held
            .lease
            .task
            .as_ref()
            .map_or(0, |t| t.min_free_gpu_memory_mib);
        if need > 0 && !self.wait_for_memory(held, need).await {
            return None;
        }
        Some(paths)
    }

    /// Waits until the GPU has `need` MiB free, up to `gpu_wait`. False when the round was
    /// given back instead (still short, drained, stopped).
    async fn wait_for_memory(&self, held: &Held, need: u64) -> bool {
        let started = Instant::now();
        loop {
            let free = match self.monitor.latest().memory_free_mib {
                // Without NVML there is nothing to check: run.
                None => return true,
                Some(f) if f >= need => {
                    self.set_state(String::new());
                    return true;
                }
                Some(f) => f,
            };
            let why = memory_message(free, need);
            self.set_state(why.clone());
            if started.elapsed() >= self.cfg.gpu_wait {
                warn!(gpu = %self.cfg.gpu.id, "{why}; round given back after {:?}", self.cfg.gpu_wait);
                *lock(&self.block) = Some(Block::Memory {
                    need,
                    until: Instant::now() + self.cfg.gpu_wait,
                });
                self.give_back(held, &why).await;
                return false;
            }
            let stopped = tokio::select! {
                _ = tokio::time::sleep(self.cfg.sample_interval) => false,
                _ = held.stop.cancelled() => true,
                _ = self.shutdown.drain.cancelled() => true,
            };
            if stopped {
                self.give_back(held, "stopped while waiting for GPU memory")
                    .await;
                return false;
            }
        }
    }

    /// Inspects, uploads and reports one finished run, then cleans its local files.
    async fn finish(
        self: Arc<Self>,
        held: Held,
        paths: Paths,
        ran: round::Ran,
        go: CancellationToken,
    ) {
        // Until the next round's process has started, bounded (see `hold_back` in `run`).
        tokio::select! {
            () = go.cancelled() => {}
            () = tokio::time::sleep(HOLD_BACK_LIMIT) => {}
        }
        round::finish(&self, &held, &paths, ran).await;
        self.unhold(&held);
    }
}

fn scratch_message(free: u64, path: &std::path::Path, need: u64) -> String {
    format!(
        "waiting for scratch space: {free} MiB free under {}, {need} MiB needed (--min-scratch-mib)",
        path.display()
    )
}

fn memory_message(free: u64, need: u64) -> String {
    format!("waiting for GPU memory: {free} MiB free, {need} MiB needed (min_free_gpu_memory_mib)")
}
