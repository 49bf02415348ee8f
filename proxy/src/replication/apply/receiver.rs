//! The receiving end of peer links: accept, authenticate, apply, acknowledge.
//!
//! Each origin node has one slot here holding its [`Applier`]. A new link from the same node
//! (say, after the old TCP connection died without either side noticing) cancels the old
//! link's loop and waits for it to let go of the applier; the old loop only stops between
//! transactions, never in the middle of applying one. The handshake's resume position is the
//! progress record as the database has it, so a sender always restarts from what is
//! committed here, and anything it sends twice is skipped by the applier.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{origin_name, Applier, ApplyError, BatchError, Path, RemoteTx};
use crate::config::owners::OwnerRules;
use crate::config::{PostgresConfig, ReplicationConfig};
use crate::pg::pg_error_text;
use crate::replication::metrics::ReplicationMetrics;
use crate::replication::peer::{
    self, Body, FrameError, HandshakeLimit, HandshakePermit, PeerIdentity, PeerMetrics,
    ResumeSource, ServerTls,
};
use crate::replication::pgoutput::{parse_lsn, pg_epoch_micros, Lsn};

/// How often each end of a link says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A link that carried nothing, not even a heartbeat, for this long is dead.
pub const LINK_SILENCE: Duration = Duration::from_secs(30);
/// Transactions waiting between the link reader and apply: enough to batch commits, few enough
/// that a slow database pushes back on the sender through TCP.
const QUEUE: usize = 4096;
/// At most this many asynchronous commits before a synchronous one (and an ack).
const MAX_UNSYNCED: usize = 4096;
/// Transactions sent to the database as one pipeline.
const MAX_BATCH: usize = 1024;
/// How long a new link waits for the origin's previous apply session to end.
const ORIGIN_BUSY_WAIT: Duration = Duration::from_secs(15);

/// Reads the progress record (`pgmm.applied`, the one an aborted apply cannot move) for the
/// handshake, over one lazily (re)opened session.
#[derive(Clone)]
pub struct OriginProgress {
    pg: PostgresConfig,
    client: Arc<tokio::sync::Mutex<Option<Client>>>,
}

impl OriginProgress {
    pub fn new(pg: PostgresConfig) -> Self {
        OriginProgress {
            pg,
            client: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// The end LSN (on `node`) of the last transaction from `node` committed here; 0 if none.
    pub async fn get(&self, node: &str) -> Result<Lsn, tokio_postgres::Error> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let (client, connection) = tokio_postgres::connect(&self.pg.url, NoTls).await?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            *guard = Some(client);
        }
        let client = guard.as_ref().expect("just connected");
        let row = client
            .query_opt(
                "SELECT end_lsn::text FROM pgmm.applied WHERE origin = $1",
                &[&node],
            )
            .await?;
        let text: Option<String> = row.map(|r| r.get(0));
        Ok(text.as_deref().and_then(parse_lsn).unwrap_or(0))
    }
}

impl ResumeSource for OriginProgress {
    fn resume_from(
        &self,
        origin: &str,
    ) -> impl std::future::Future<Output = Result<u64, Box<dyn std::error::Error + Send + Sync>>> + Send
    {
        let origin = origin.to_owned();
        let this = self.clone();
        async move {
            this.get(&origin)
                .await
                .map_err(|e| Box::<dyn std::error::Error + Send + Sync>::from(pg_error_text(&e)))
        }
    }
}

/// The applier of one origin node, and the token of the link currently using it.
struct OriginSlot {
    applier: tokio::sync::Mutex<Option<Applier>>,
    current: Mutex<CancellationToken>,
}

/// Everything the accepting side needs; shared by all links.
pub struct Receiver {
    pub identity: PeerIdentity,
    pub nodes: Vec<String>,
    pub tls: Option<ServerTls>,
    pub postgres: PostgresConfig,
    pub replication: ReplicationConfig,
    pub peer_metrics: PeerMetrics,
    pub metrics: ReplicationMetrics,
    pub progress: OriginProgress,
    /// The ownership rules every applied change is checked against.
    pub rules: Arc<OwnerRules>,
    /// Per peer: wakes our shipper to that peer when the peer links in, since a node that
    /// links in is up and our shipper need not wait out its backoff to find out.
    pub wake: HashMap<String, Arc<tokio::sync::Notify>>,
    /// `[peer] max_pending_handshakes`: how many accepted connections may be in their
    /// handshake at once.
    handshakes: HandshakeLimit,
    origins: Mutex<HashMap<String, Arc<OriginSlot>>>,
}

/// What a [`Receiver`] is made of, named: the node's identity and cluster, its TLS, its
/// Postgres and `[replication]` settings, metrics, the ownership rules, the shippers to wake
/// when their peer links in, and `[peer] max_pending_handshakes`.
pub struct ReceiverSetup {
    pub identity: PeerIdentity,
    pub nodes: Vec<String>,
    pub tls: Option<ServerTls>,
    pub postgres: PostgresConfig,
    pub replication: ReplicationConfig,
    pub peer_metrics: PeerMetrics,
    pub metrics: ReplicationMetrics,
    pub wake: HashMap<String, Arc<tokio::sync::Notify>>,
    pub rules: Arc<OwnerRules>,
    pub max_pending_handshakes: usize,
}

impl Receiver {
    pub fn new(setup: ReceiverSetup) -> Receiver {
        let ReceiverSetup {
            identity,
            nodes,
            tls,
            postgres,
            replication,
            peer_metrics,
            metrics,
            wake,
            rules,
            max_pending_handshakes,
        } = setup;
        Receiver {
            handshakes: HandshakeLimit::new(max_pending_handshakes, &peer_metrics),
            rules,
            identity,
            nodes,
            tls,
            progress: OriginProgress::new(postgres.clone()),
            postgres,
            replication,
            peer_metrics,
            metrics,
            wake,
            origins: Mutex::new(HashMap::new()),
        }
    }

    /// Accepts peer links until `shutdown`, then waits for their loops to stop (each stops
    /// between transactions).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        tracing::info!(addr = ?listener.local_addr().ok(), "peer link listening");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, remote)) => {
                    // Over the cap, the connection is dropped here, before anything is read.
                    let Some(permit) = self.handshakes.try_acquire(Some(remote)) else {
                        continue;
                    };
                    let this = self.clone();
                    let shutdown = shutdown.clone();
                    tracker.spawn(async move { this.link(stream, permit, shutdown).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "peer link accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tracker.close();
        tracker.wait().await;
    }

    fn slot(&self, node: &str) -> Arc<OriginSlot> {
        self.origins
            .lock()
            .expect("origins lock")
            .entry(node.to_owned())
            .or_insert_with(|| {
                Arc::new(OriginSlot {
                    applier: tokio::sync::Mutex::new(None),
                    current: Mutex::new(CancellationToken::new()),
                })
            })
            .clone()
    }

    /// `permit` is this connection's handshake slot, held until the handshake has ended.
    async fn link(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        permit: HandshakePermit,
        shutdown: CancellationToken,
    ) {
        let handshake = tokio::select! {
            _ = shutdown.cancelled() => return,
            h = peer::accept(
                stream,
                &self.identity,
                &self.nodes,
                self.tls.as_ref(),
                &self.peer_metrics,
                &self.progress,
            ) => h,
        };
        drop(permit);
        // The handshake logged and counted its own failure.
        let Ok((conn, node)) = handshake else { return };
        if let Some(wake) = self.wake.get(&node) {
            wake.notify_one();
        }
        let slot = self.slot(&node);
        let token = shutdown.child_token();
        {
            let mut current = slot.current.lock().expect("origin slot lock");
            current.cancel();
            *current = token.clone();
        }
        let mut applier = tokio::select! {
            _ = token.cancelled() => return,
            guard = slot.applier.lock() => guard,
        };
        let (mut sender, mut receiver) = conn.into_split();
        let (queue, mut inbound) = mpsc::channel::<RemoteTx>(QUEUE);
        let reader_token = token.clone();
        let reader_node = node.clone();
        let mut skew = ClockSkew::new(
            self.metrics.peer_clock_skew.with_label_values(&[&node]),
            Duration::from_millis(self.replication.max_clock_skew_ms),
        );
        let reader = tokio::spawn(async move {
            // Made once: a fresh one per frame would register with the token every time.
            let cancelled = reader_token.cancelled();
            tokio::pin!(cancelled);
            loop {
                let next = tokio::select! {
                    _ = &mut cancelled => break,
                    n = tokio::time::timeout(LINK_SILENCE, receiver.recv()) => n,
                };
                match next {
                    Err(_) => {
                        tracing::warn!(peer = %reader_node, "peer link silent for {LINK_SILENCE:?}: dropping it");
                        break;
                    }
                    Ok(Ok(Some(Body::Transaction {
                        origin,
                        end_lsn,
                        commit_time,
                        changes,
                        ..
                    }))) => {
                        if origin != reader_node {
                            tracing::warn!(peer = %reader_node, %origin, "peer sent another node's transaction: dropping the link");
                            break;
                        }
                        let item = RemoteTx {
                            end_lsn,
                            commit_time,
                            changes,
                        };
                        if queue.send(item).await.is_err() {
                            break;
                        }
                    }
                    Ok(Ok(Some(Body::Heartbeat { sent_at_micros }))) => {
                        skew.observe(
                            &reader_node,
                            sent_at_micros,
                            pg_epoch_micros(SystemTime::now()),
                        );
                    }
                    Ok(Ok(Some(other))) => {
                        tracing::warn!(peer = %reader_node, message = other.name(), "unexpected message on the peer link: dropping it");
                        break;
                    }
                    Ok(Ok(None)) => break,
                    Ok(Err(FrameError::UnknownMessage { name, .. })) => {
                        tracing::debug!(peer = %reader_node, %name, "ignoring a message kind this node does not know");
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %reader_node, error = %e, "peer link read failed");
                        break;
                    }
                }
            }
        });

        let applied_changes = self.metrics.changes_applied.with_label_values(&[&node]);
        let applied_txs = self
            .metrics
            .transactions_applied
            .with_label_values(&[&node]);
        let apply_errors = self.metrics.apply_errors.with_label_values(&[&node]);
        let fast_batches = self
            .metrics
            .apply_batches
            .with_label_values(&[node.as_str(), "fast"]);
        let full_batches = self
            .metrics
            .apply_batches
            .with_label_values(&[node.as_str(), "full"]);
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unsynced = 0usize;
        loop {
            let first = tokio::select! {
                _ = token.cancelled() => break,
                _ = heartbeat.tick() => {
                    let now = pg_epoch_micros(SystemTime::now());
                    if sender.send(&Body::Heartbeat { sent_at_micros: now }).await.is_err() {
                        break;
                    }
                    continue;
                }
                item = inbound.recv() => match item {
                    Some(item) => item,
                    None => break,
                },
            };
            // Whatever else has arrived goes into the same pipeline.
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match inbound.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            if applier.as_ref().is_none_or(Applier::is_closed) {
                match self.open_applier(&node, &token).await {
                    Ok(a) => *applier = Some(a),
                    Err(e) => {
                        apply_errors.inc();
                        tracing::error!(peer = %node, sqlstate = %e.sqlstate(), error = %e, "cannot apply: dropping the link (the peer will resend)");
                        break;
                    }
                }
            }
            let a = applier.as_mut().expect("opened above");
            let sync = inbound.is_empty() || unsynced + batch.len() >= MAX_UNSYNCED;
            let (outcome, error) = match a.apply_batch(&batch, sync).await {
                Ok(outcome) => (outcome, None),
                Err(BatchError { applied, error }) => (applied, Some(error)),
            };
            applied_changes.inc_by(outcome.changes as u64);
            match outcome.path {
                Some(Path::Fast) => fast_batches.inc(),
                Some(Path::Full) => full_batches.inc(),
                None => {}
            }
            applied_txs.inc_by(outcome.transactions as u64);
            if let Some(e) = error {
                apply_errors.inc();
                tracing::error!(
                    peer = %node,
                    sqlstate = %e.sqlstate(),
                    error = %e,
                    "a transaction from the peer failed to apply and was rolled back: \
                     dropping the link; the peer resends it after reconnecting"
                );
                break;
            }
            unsynced += outcome.transactions;
            // Duplicates alone change nothing here: the current progress may be acked at once.
            if sync || unsynced == 0 {
                unsynced = 0;
                let ack = Body::Ack {
                    applied_lsn: a.progress(),
                };
                if sender.send(&ack).await.is_err() {
                    break;
                }
            }
        }
        token.cancel();
        reader.abort();
        let _ = sender.shutdown().await;
        if applier.as_ref().is_some_and(Applier::is_closed) {
            *applier = None;
        }
        tracing::info!(peer = %node, "inbound peer link closed");
    }

    /// Opens the origin's apply session, waiting a while for a previous one (of a link that
    /// has just been replaced, or of a pgmm that was killed) to release the origin.
    async fn open_applier(
        &self,
        node: &str,
        token: &CancellationToken,
    ) -> Result<Applier, ApplyError> {
        let deadline = tokio::time::Instant::now() + ORIGIN_BUSY_WAIT;
        loop {
            match Applier::connect(
                &self.postgres,
                node,
                &self.identity.node,
                self.rules.clone(),
                self.replication.clone(),
                self.metrics.clone(),
            )
            .await
            {
                Err(ApplyError::OriginBusy { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::select! {
                        _ = token.cancelled() => return Err(ApplyError::OriginBusy { origin: origin_name(node) }),
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                other => return other,
            }
        }
    }
}

/// The estimate of one peer's clock offset, from the send times of its heartbeats: the offset
/// is at most `sent - received` plus the one-way delay, so the smallest of the recent samples
/// is the closest bound. Warns (at most once a minute) while it is past the configured bound.
struct ClockSkew {
    gauge: prometheus::Gauge,
    bound: Duration,
    /// `sent - received` of the last heartbeats, in microseconds.
    samples: std::collections::VecDeque<i64>,
    last_warning: Option<std::time::Instant>,
}

/// Heartbeats considered: about a minute of them.
const SKEW_SAMPLES: usize = 60;
const SKEW_WARNING_EVERY: Duration = Duration::from_secs(60);

impl ClockSkew {
    fn new(gauge: prometheus::Gauge, bound: Duration) -> Self {
        ClockSkew {
            gauge,
            bound,
            samples: std::collections::VecDeque::with_capacity(SKEW_SAMPLES),
            last_warning: None,
        }
    }

    /// One heartbeat sent at `sent` (peer's clock) and received at `received` (ours), both in
    /// microseconds since 2000-01-01.
    fn observe(&mut self, peer: &str, sent: i64, received: i64) {
        if self.samples.len() == SKEW_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(sent.saturating_sub(received));
        let offset = self.estimate().unwrap_or(0);
        self.gauge.set(offset as f64 / 1e6);
        let too_far = offset.unsigned_abs() > self.bound.as_micros() as u64;
        if too_far
            && self
                .last_warning
                .is_none_or(|t| t.elapsed() >= SKEW_WARNING_EVERY)
        {
            self.last_warning = Some(std::time::Instant::now());
            tracing::warn!(
                %peer,
                offset_seconds = offset as f64 / 1e6,
                bound_seconds = self.bound.as_secs_f64(),
                "the peer's clock is off from this node's by more than \
                 [replication] max_clock_skew_ms: last-writer-wins still keeps causally later \
                 writes, but between concurrent writes the node whose clock runs ahead wins; \
                 fix the clocks (NTP)"
            );
        }
    }

    /// The sample closest to zero delay: the largest `sent - received` when the peer is behind
    /// (delay only makes it smaller), the smallest when ahead. Taking the one of least
    /// magnitude keeps the estimate conservative either way.
    fn estimate(&self) -> Option<i64> {
        self.samples
            .iter()
            .copied()
            .min_by_key(|o| o.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_is_the_least_offset_of_the_recent_heartbeats() {
        let gauge = prometheus::Gauge::new("g", "g").unwrap();
        let mut skew = ClockSkew::new(gauge.clone(), Duration::from_secs(1));
        // The peer runs 5 s behind; network delays of 1 to 3 ms.
        for delay in [3_000, 1_000, 2_000] {
            skew.observe("c", 10_000_000, 15_000_000 + delay);
        }
        assert_eq!(skew.estimate(), Some(-5_001_000));
        assert!((gauge.get() + 5.001).abs() < 1e-9);
        assert!(skew.last_warning.is_some(), "5 s is past the 1 s bound");
        // Old samples roll out.
        for _ in 0..SKEW_SAMPLES {
            skew.observe("c", 20_000_000, 20_000_100);
        }
        assert_eq!(skew.estimate(), Some(-100));
    }
}
