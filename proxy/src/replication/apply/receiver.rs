//! The receiving end of peer links: accept, authenticate, apply, acknowledge.
//!
//! Each origin node has one slot here holding its [`Applier`]. A new link from the same node
//! (say, after the old TCP connection died without either side noticing) cancels the old
//! link's loop and waits for it to let go of the applier; the old loop only stops between
//! transactions, never in the middle of applying one. The handshake's resume position is the
//! progress record as the database has it, so a sender always restarts from what is
//! committed here, and anything it sends twice is skipped by the applier.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{origin_name, Applier, ApplyError, BatchError, Path, RemoteTx};
use crate::config::owners::OwnerRules;
use crate::config::{PostgresConfig, ReplicationConfig};
use crate::pg::pg_error_text;
use crate::pg::pool::{self, Pool};
use crate::pg::SqlState;
use crate::replication::changeset::{Change, ChangeSet};
use crate::replication::metrics::ReplicationMetrics;
use crate::replication::peer::{
    self, Body, FrameError, HandshakeLimit, HandshakePermit, PeerIdentity, PeerMetrics,
    PeerReceiver, Purpose, RequestHandler, ResumeSource, ServerTls,
};
use crate::replication::pgoutput::{parse_lsn, pg_epoch_micros, Datum, Lsn};

/// How often each end of a link says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A link that carried nothing, not even a heartbeat, for this long is dead.
pub const LINK_SILENCE: Duration = Duration::from_secs(30);
/// Transactions waiting between the link reader and apply: enough to batch commits, few enough
/// that a slow database pushes back on the sender through TCP (their bytes are bounded by
/// `[replication] apply_queue_bytes`).
const QUEUE: usize = 4096;
/// At most this many asynchronous commits before a synchronous one (and an ack).
const MAX_UNSYNCED: usize = 4096;
/// Transactions sent to the database as one pipeline.
const MAX_BATCH: usize = 1024;
/// How long a new link waits for the origin's previous apply session to end.
const ORIGIN_BUSY_WAIT: Duration = Duration::from_secs(15);

/// Reads the progress record (`pgmm.applied`, the one an aborted apply cannot move) for the
/// handshake, on a connection from pgmm's pool.
#[derive(Clone)]
pub struct OriginProgress {
    pg: PostgresConfig,
    pool: Pool,
}

impl OriginProgress {
    pub fn new(pg: PostgresConfig, pool: Pool) -> Self {
        OriginProgress { pg, pool }
    }

    /// The end LSN (on `node`) of the last transaction from `node` committed here; 0 if none.
    /// The error is the text an operator reads (the peer is told it, refused as unavailable).
    pub async fn get(&self, node: &str) -> Result<Lsn, String> {
        let client = pool::get(&self.pool, &self.pg)
            .await
            .map_err(|e| e.to_string())?;
        let row = client
            .query_opt(
                "SELECT end_lsn::text FROM pgmm.applied WHERE origin = $1",
                &[&node],
            )
            .await
            .map_err(|e| pg_error_text(&e))?;
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
        async move { this.get(&origin).await.map_err(Into::into) }
    }
}

/// The applier of one origin node, and the token of the link currently using it.
struct OriginSlot {
    applier: tokio::sync::Mutex<Option<Applier>>,
    current: Mutex<CancellationToken>,
    /// The pause before the next attempt after a failure, across links (see `stalled`).
    backoff: Mutex<Duration>,
}

/// The first pause after a failed apply, doubled after each further failure up to
/// [`STALL_BACKOFF_MAX`]: a change that cannot be applied (a table missing here) is retried
/// without spinning, and applied within that long of the operator's fix.
const STALL_BACKOFF_MIN: Duration = Duration::from_secs(1);
const STALL_BACKOFF_MAX: Duration = Duration::from_secs(30);

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
    /// What answers links opened for a membership request.
    requests: Option<Arc<dyn RequestHandler>>,
    /// Set once the node may apply (it has joined and made its own slots): until then a
    /// replication link is closed after its handshake and the peer's shipper retries, while
    /// request links are answered (a joining node must answer another joiner's `Prepare`).
    open: Arc<AtomicBool>,
}

/// What a [`Receiver`] is made of, named: the node's identity and cluster, its TLS, its
/// Postgres (and pgmm's pool of connections to it) and `[replication]` settings, metrics, the ownership rules, the shippers to wake
/// when their peer links in, and `[peer] max_pending_handshakes`.
pub struct ReceiverSetup {
    pub identity: PeerIdentity,
    pub nodes: Vec<String>,
    pub tls: Option<ServerTls>,
    pub postgres: PostgresConfig,
    /// pgmm's pool, for reading the progress record in handshakes.
    pub pool: Pool,
    pub replication: ReplicationConfig,
    pub peer_metrics: PeerMetrics,
    pub metrics: ReplicationMetrics,
    pub wake: HashMap<String, Arc<tokio::sync::Notify>>,
    pub rules: Arc<OwnerRules>,
    pub max_pending_handshakes: usize,
    /// What answers links opened for a membership request (join, check); without it they are
    /// closed.
    pub requests: Option<Arc<dyn RequestHandler>>,
    /// Whether replication links are accepted yet (see [`Receiver`]).
    pub open: Arc<AtomicBool>,
}

impl Receiver {
    pub fn new(setup: ReceiverSetup) -> Receiver {
        let ReceiverSetup {
            identity,
            nodes,
            tls,
            postgres,
            pool,
            replication,
            peer_metrics,
            metrics,
            wake,
            rules,
            max_pending_handshakes,
            requests,
            open,
        } = setup;
        Receiver {
            handshakes: HandshakeLimit::new(max_pending_handshakes, &peer_metrics),
            rules,
            identity,
            nodes,
            tls,
            progress: OriginProgress::new(postgres.clone(), pool),
            postgres,
            replication,
            peer_metrics,
            metrics,
            wake,
            origins: Mutex::new(HashMap::new()),
            requests,
            open,
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
                    backoff: Mutex::new(Duration::ZERO),
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
        if conn.purpose() == Purpose::Request {
            // A request is not the caller's replication link: it must not replace it.
            if let Some(requests) = &self.requests {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = requests.handle(conn, node) => {}
                }
            }
            return;
        }
        if !self.open.load(Ordering::Acquire) {
            tracing::debug!(peer = %node, "replication link closed: this node is still starting (or joining)");
            return;
        }
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
        let (mut sender, receiver) = conn.into_split();
        // Between the link reader and apply: at most `apply_queue_bytes` of changes (and
        // QUEUE transactions), so that a slow database pushes back on the sender through TCP
        // and memory does not follow the sender's pace.
        let (queue, mut inbound) = mpsc::channel::<Queued>(QUEUE);
        let budget = Arc::new(Semaphore::new(self.replication.apply_queue_bytes));
        let skew = ClockSkew::new(
            self.metrics.peer_clock_skew.with_label_values(&[&node]),
            Duration::from_millis(self.replication.max_clock_skew_ms),
        );
        let reader = tokio::spawn(read_link(
            receiver,
            node.clone(),
            queue,
            budget,
            self.replication.apply_queue_bytes,
            skew,
            token.clone(),
        ));

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
        // An item taken from the queue while collecting a batch that does not belong in it.
        let mut pending: Option<Queued> = None;
        loop {
            let first = match pending.take() {
                Some(item) => item,
                None => tokio::select! {
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
                },
            };
            if applier.as_ref().is_none_or(Applier::is_closed) {
                match self.open_applier(&node, &token).await {
                    Ok(a) => {
                        // A stall that was the session not opening is over now; one about a
                        // change ends when that change applies.
                        if self.metrics.stalls.opening(&node) {
                            self.resumed(&node, &slot);
                        }
                        *applier = Some(a);
                    }
                    Err(e) => {
                        apply_errors.inc();
                        self.stalled(&node, &slot, &e, &token).await;
                        break;
                    }
                }
            }
            let a = applier.as_mut().expect("opened above");
            let Queued {
                item,
                budget: _held,
            } = first;
            let (outcome, error) = match item {
                Inbound::Whole(tx) => {
                    // Whatever else has arrived goes into the same pipeline.
                    let mut batch = vec![tx];
                    let mut held = Vec::new();
                    while batch.len() < MAX_BATCH {
                        match inbound.try_recv() {
                            Ok(Queued {
                                item: Inbound::Whole(tx),
                                budget,
                            }) => {
                                batch.push(tx);
                                held.push(budget);
                            }
                            Ok(other) => {
                                pending = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let sync = pending.is_none() && inbound.is_empty()
                        || unsynced + batch.len() >= MAX_UNSYNCED;
                    match a.apply_batch(&batch, sync).await {
                        Ok(outcome) => (Some((outcome, sync)), None),
                        Err(BatchError { applied, error }) => (Some((applied, sync)), Some(error)),
                    }
                }
                Inbound::Begin {
                    commit_lsn,
                    commit_time,
                } => {
                    a.stream_begin(commit_lsn, commit_time);
                    (None, None)
                }
                Inbound::Chunk(changes) => match a.stream_chunk(&changes).await {
                    Ok(()) => (None, None),
                    Err(e) => (None, Some(e)),
                },
                Inbound::Commit { end_lsn, changes } => {
                    let sync = inbound.is_empty() || unsynced + 1 >= MAX_UNSYNCED;
                    match a.stream_commit(end_lsn, &changes, sync).await {
                        Ok(outcome) => (Some((outcome, sync)), None),
                        Err(e) => (None, Some(e)),
                    }
                }
            };
            if let Some((outcome, _)) = &outcome {
                if error.is_none() {
                    self.resumed(&node, &slot);
                }
                applied_changes.inc_by(outcome.changes as u64);
                match outcome.path {
                    Some(Path::Fast) => fast_batches.inc(),
                    Some(Path::Full) => full_batches.inc(),
                    None => {}
                }
                applied_txs.inc_by(outcome.transactions as u64);
            }
            if let Some(e) = error {
                apply_errors.inc();
                self.stalled(&node, &slot, &e, &token).await;
                break;
            }
            let Some((outcome, sync)) = outcome else {
                continue;
            };
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
        // A transaction whose link ended in its middle is rolled back now: the next link starts
        // it over.
        if let Some(a) = applier.as_mut() {
            a.abandon_stream().await;
        }
        token.cancel();
        reader.abort();
        let _ = sender.shutdown().await;
        if applier.as_ref().is_some_and(Applier::is_closed) {
            *applier = None;
        }
        tracing::info!(peer = %node, "inbound peer link closed");
    }

    /// A failed attempt at `node`'s changes: rolled back, recorded as a stall
    /// (`pgmm_apply_stalled`, `/status`, `pgmm status`), logged in full when it is news, and
    /// followed by a pause that doubles with each failure before the link is dropped and the
    /// peer resends. Everything from that peer waits behind the failing change, since
    /// transactions apply in commit order; the other peers' changes go on.
    async fn stalled(
        &self,
        node: &str,
        slot: &OriginSlot,
        e: &ApplyError,
        token: &CancellationToken,
    ) {
        let table = stall_table(e);
        let sqlstate = e.sqlstate();
        let pause = {
            let mut backoff = slot.backoff.lock().expect("backoff lock");
            *backoff = (*backoff * 2).clamp(STALL_BACKOFF_MIN, STALL_BACKOFF_MAX);
            *backoff
        };
        self.metrics.set_apply_stalled(node, Some(&table));
        if self
            .metrics
            .stalls
            .failed(node, &table, sqlstate, &e.to_string())
        {
            tracing::error!(
                peer = %node,
                %table,
                %sqlstate,
                error = %e,
                retry_in_seconds = pause.as_secs(),
                "changes from the peer cannot be applied here and wait (nothing is skipped): {}",
                stall_fix(e, sqlstate)
            );
        } else {
            tracing::debug!(peer = %node, %sqlstate, error = %e, "apply still stalled");
        }
        tokio::select! {
            _ = token.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }

    /// `node`'s changes applied: the end of a stall, if there was one.
    fn resumed(&self, node: &str, slot: &OriginSlot) {
        *slot.backoff.lock().expect("backoff lock") = Duration::ZERO;
        if let Some((stalled_for, attempts)) = self.metrics.stalls.resumed(node) {
            self.metrics.set_apply_stalled(node, None);
            tracing::info!(peer = %node, stalled_seconds = stalled_for.as_secs(), attempts, "changes from the peer apply again");
        }
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

/// What the link reader hands to apply.
enum Inbound {
    /// A transaction that came in one frame.
    Whole(RemoteTx),
    /// The start, the middle and the end of a transaction that came in chunks.
    Begin {
        commit_lsn: Lsn,
        commit_time: i64,
    },
    Chunk(ChangeSet),
    Commit {
        end_lsn: Lsn,
        changes: ChangeSet,
    },
}

/// An [`Inbound`] with its share of the queue's byte budget, given back when it is dropped
/// (once applied).
struct Queued {
    item: Inbound,
    budget: OwnedSemaphorePermit,
}

/// Largest value put back together from `TxValue` pieces: PostgreSQL's limit for one value.
const MAX_VALUE_BYTES: usize = 1 << 30;

/// Reads one inbound link until it ends, fails, or `token` is cancelled, and queues what it
/// reads for apply, each item once `budget` has room for it (`cap` bounds what one item takes).
/// Checks the order of a chunked transaction's messages and puts its staged values back.
async fn read_link(
    mut receiver: PeerReceiver,
    node: String,
    queue: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    cap: usize,
    mut skew: ClockSkew,
    token: CancellationToken,
) {
    // Made once: a fresh one per frame would register with the token every time.
    let cancelled = token.cancelled();
    tokio::pin!(cancelled);
    // Inside a chunked transaction (between TxBegin and TxCommit)?
    let mut open = false;
    // Values complete and waiting for their change, and the one being put together.
    let mut staged: VecDeque<Bytes> = VecDeque::new();
    let mut piece = BytesMut::new();
    loop {
        let next = tokio::select! {
            _ = &mut cancelled => break,
            n = tokio::time::timeout(LINK_SILENCE, receiver.recv()) => n,
        };
        let body = match next {
            Err(_) => {
                tracing::warn!(peer = %node, "peer link silent for {LINK_SILENCE:?}: dropping it");
                break;
            }
            Ok(Ok(Some(body))) => body,
            Ok(Ok(None)) => break,
            Ok(Err(FrameError::UnknownMessage { name, .. })) => {
                tracing::debug!(peer = %node, %name, "ignoring a message kind this node does not know");
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %node, error = %e, "peer link read failed");
                break;
            }
        };
        let name = body.name();
        let item = match (open, body) {
            (_, Body::Heartbeat { sent_at_micros }) => {
                skew.observe(&node, sent_at_micros, pg_epoch_micros(SystemTime::now()));
                continue;
            }
            (
                false,
                Body::Transaction {
                    origin,
                    end_lsn,
                    commit_time,
                    changes,
                    ..
                },
            ) => {
                if origin != node {
                    tracing::warn!(peer = %node, %origin, "peer sent another node's transaction: dropping the link");
                    break;
                }
                Inbound::Whole(RemoteTx {
                    end_lsn,
                    commit_time,
                    changes,
                })
            }
            (
                false,
                Body::TxBegin {
                    origin,
                    commit_lsn,
                    commit_time,
                },
            ) => {
                if origin != node {
                    tracing::warn!(peer = %node, %origin, "peer sent another node's transaction: dropping the link");
                    break;
                }
                open = true;
                Inbound::Begin {
                    commit_lsn,
                    commit_time,
                }
            }
            (true, Body::TxValue { data, last }) => {
                if piece.len() + data.len() > MAX_VALUE_BYTES {
                    tracing::warn!(peer = %node, "peer sent a value larger than {MAX_VALUE_BYTES} bytes: dropping the link");
                    break;
                }
                if piece.is_empty() && last {
                    staged.push_back(data);
                } else {
                    piece.extend_from_slice(&data);
                    if last {
                        staged.push_back(std::mem::take(&mut piece).freeze());
                    }
                }
                continue;
            }
            (true, Body::TxChunk { mut changes }) => {
                if let Err(e) = unstage(&mut changes, &mut staged) {
                    tracing::warn!(peer = %node, error = e, "malformed chunked transaction: dropping the link");
                    break;
                }
                Inbound::Chunk(changes)
            }
            (
                true,
                Body::TxCommit {
                    end_lsn,
                    mut changes,
                    ..
                },
            ) => {
                if let Err(e) = unstage(&mut changes, &mut staged) {
                    tracing::warn!(peer = %node, error = e, "malformed chunked transaction: dropping the link");
                    break;
                }
                open = false;
                Inbound::Commit { end_lsn, changes }
            }
            (_, _) => {
                tracing::warn!(peer = %node, message = name, in_transaction = open, "unexpected message on the peer link: dropping it");
                break;
            }
        };
        let bytes = match &item {
            Inbound::Whole(tx) => tx.changes.approx_bytes(),
            Inbound::Chunk(changes) | Inbound::Commit { changes, .. } => changes.approx_bytes(),
            Inbound::Begin { .. } => 0,
        };
        let want = u32::try_from(bytes.clamp(1, cap)).unwrap_or(u32::MAX);
        let permit = tokio::select! {
            _ = &mut cancelled => break,
            p = budget.clone().acquire_many_owned(want) => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        if queue
            .send(Queued {
                item,
                budget: permit,
            })
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Puts the values sent ahead in pieces back in the places of `changes` marked
/// [`Datum::Staged`], in the order the sender took them out (changes, then columns).
fn unstage(changes: &mut ChangeSet, staged: &mut VecDeque<Bytes>) -> Result<(), &'static str> {
    for change in &mut changes.changes {
        let (Change::Insert { new, .. } | Change::Update { new, .. }) = change else {
            continue;
        };
        for datum in new.iter_mut().filter(|d| matches!(d, Datum::Staged)) {
            *datum = Datum::Text(staged.pop_front().ok_or("a staged value never arrived")?);
        }
    }
    if staged.is_empty() {
        Ok(())
    } else {
        Err("values were sent that no change takes")
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

/// The `table` label of a stall: the failing change's table, `(schema change)` for DDL.
fn stall_table(e: &ApplyError) -> String {
    match e {
        ApplyError::Statement { table, .. } | ApplyError::NotReplicated { table } => {
            table.to_string()
        }
        ApplyError::Ddl { .. } | ApplyError::Enrol(_) => "(schema change)".into(),
        _ => String::new(),
    }
}

/// What the operator does about a stall, by its cause.
fn stall_fix(e: &ApplyError, sqlstate: &str) -> &'static str {
    match (e, sqlstate) {
        (ApplyError::Ddl { .. }, _) => {
            "a schema change from the peer failed here: make this node's schema match the \
             peer's (so that the statement can run), and it is applied again by itself"
        }
        (_, "42P01") => {
            "the table is missing here: create it as it is on the peer, and replication \
             resumes by itself"
        }
        (_, "42703") => {
            "a column is missing here: add it as it is on the peer, and replication resumes \
             by itself"
        }
        (_, s) if s.starts_with("22") || s == "42804" => {
            "a value does not fit this node's column: make the column's type match the peer's, \
             and replication resumes by itself"
        }
        (ApplyError::NotReplicated { .. }, _) => {
            "make [replication] tables agree on both nodes, and replication resumes by itself"
        }
        _ => "replication from this peer resumes by itself once the cause is fixed",
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
