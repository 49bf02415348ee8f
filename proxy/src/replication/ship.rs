//! Capture and shipping: this node's committed changes, read from its slot for one peer and
//! streamed to that peer in commit order.
//!
//! One [`Shipper`] task per peer owns the peer's slot (`pgmm_<peer>`) and the outbound link.
//! A session starts with the handshake, whose `Welcome` says from which LSN the peer wants our
//! changes (its replication origin's progress); the slot is then streamed from there. Every
//! transaction that carries an Origin message was applied from a peer and is dropped (shipping
//! it would echo it around the cluster); every other one is shipped whole.
//!
//! The slot's confirmed position is where a restart begins, so it only moves to positions the
//! peer has acknowledged as durably applied, or, when nothing shipped is awaiting an ack, to
//! positions whose transactions were all dropped. A crash anywhere therefore re-sends at most
//! the unacknowledged tail, which the peer's applier recognises by its origin progress.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{PeerEntry, PostgresConfig};
use crate::pg::names::origin_name;
use crate::pg::names::PUBLICATION;
use crate::pg::pg_error_text;
use crate::pg::sqlstate::{self, SqlState};
use crate::replication::changeset::{
    AssembleError, Assembled, Assembler, CapturedTx, Change, ChangeSet,
};
use crate::replication::metrics::ReplicationMetrics;
use crate::replication::peer::{
    self, Backoff, Body, ClientTls, FrameError, PeerError, PeerIdentity, PeerMetrics, PeerSender,
    BACKOFF_BASE, CHUNKED_PROTOCOL_VERSION, DDL_PROTOCOL_VERSION,
};
use crate::replication::pgoutput::{
    self, encode_standby_status_update, format_lsn, pg_epoch_micros, Datum, DecodeError, Lsn,
    ReplicationMessage,
};
use crate::replication::slot::{ReplicationConn, ReplicationError, WalSenderConfig};
use crate::replication::toast_fill::{self, FillError};

/// Longest wait between reconnection attempts: a peer that comes back is found within this.
pub const RECONNECT_CAP: Duration = Duration::from_secs(5);
/// Heartbeats to the peer, status updates to the slot, lag gauges.
const TICK: Duration = Duration::from_secs(1);
/// A link on which the peer said nothing, not even a heartbeat, for this long is dead.
const LINK_SILENCE: Duration = crate::replication::apply::LINK_SILENCE;
/// Status updates triggered by acks are sent at most this often (the tick sends one anyway).
const STATUS_INTERVAL: Duration = Duration::from_millis(100);
/// Transactions queued on the link before a flush even if the slot has more to give.
const FLUSH_EVERY: usize = 64;

/// Why a shipping session ended; the shipper logs it, counts it by [`ShipError::stage`] and
/// reconnects.
#[derive(Debug, Error)]
pub enum ShipError {
    #[error(transparent)]
    Link(#[from] PeerError),
    #[error("peer link: {0}")]
    Frame(#[from] FrameError),
    #[error("the peer closed the link or stopped answering")]
    LinkClosed,
    #[error("slot: {0}")]
    Slot(#[from] ReplicationError),
    #[error("the slot's stream ended")]
    StreamEnded,
    #[error("decoding the slot's stream: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error(transparent)]
    Fill(#[from] FillError),
    #[error("connecting to the local Postgres to read unchanged TOAST values: {}", pg_error_text(.0))]
    FillConnect(#[source] tokio_postgres::Error),
    #[error(
        "a transaction with a schema change waits: the peer speaks link protocol {protocol},          which cannot carry DDL (version {DDL_PROTOCOL_VERSION} can); upgrade pgmm on the peer"
    )]
    DdlUnsupported { protocol: u16 },
}

impl ShipError {
    /// The metric label: where it broke.
    pub fn stage(&self) -> &'static str {
        match self {
            ShipError::Link(_)
            | ShipError::Frame(_)
            | ShipError::LinkClosed
            | ShipError::DdlUnsupported { .. } => "link",
            ShipError::Slot(_) | ShipError::StreamEnded => "slot",
            ShipError::Decode(_) | ShipError::Assemble(_) => "decode",
            ShipError::Fill(_) | ShipError::FillConnect(_) => "fill",
        }
    }
}

impl SqlState for ShipError {
    fn sqlstate(&self) -> &str {
        match self {
            ShipError::Link(e) => e.sqlstate(),
            ShipError::Frame(e) => e.sqlstate(),
            ShipError::LinkClosed | ShipError::StreamEnded => "08006",
            ShipError::DdlUnsupported { .. } => "0A000",
            ShipError::Slot(e) => e.sqlstate(),
            ShipError::Decode(e) => e.sqlstate(),
            ShipError::Assemble(e) => e.sqlstate(),
            ShipError::Fill(FillError(e)) | ShipError::FillConnect(e) => sqlstate::of_pg_error(e),
        }
    }
}

/// What every per-peer shipping task shares.
pub struct Shipper {
    pub identity: PeerIdentity,
    pub tls: Option<ClientTls>,
    /// The replication connection to the local Postgres (from `[postgres] url`).
    pub conn: WalSenderConfig,
    /// The local Postgres, for reading the unchanged TOAST values of updates (`toast_fill`).
    pub postgres: PostgresConfig,
    pub peer_metrics: PeerMetrics,
    pub metrics: ReplicationMetrics,
    /// Highest commit end LSN whose changes were counted as captured: every slot reads the same
    /// local transactions, and each must be counted once, by whichever slot reads it first.
    pub captured_upto: Arc<AtomicU64>,
    /// `[replication] chunk_bytes`: a larger transaction is shipped in chunks of this size.
    pub chunk_bytes: usize,
}

/// What the link's reader task reports.
#[derive(Debug, Clone, Copy)]
struct Heard {
    acked: Lsn,
}

impl Shipper {
    /// Ships to `peer` until `shutdown`, reconnecting with capped exponential backoff.
    /// `wake` cuts a backoff wait short (the peer just linked in to us, so it is up).
    pub async fn run(
        self: Arc<Self>,
        peer: PeerEntry,
        wake: Arc<tokio::sync::Notify>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Backoff::new(BACKOFF_BASE, RECONNECT_CAP);
        let labels = [peer.name.as_str()];
        let up = self.metrics.peer_up.with_label_values(&labels);
        let lag = self.metrics.lag_seconds.with_label_values(&labels);
        // While the link is down the peer's lag is what it was when the link dropped plus the
        // time since: the peer has nothing newer than that moment. Both are taken anew at every
        // drop of a link that was up (a link that never came up changes neither).
        let mut down_since = Instant::now();
        let mut lag_at_drop = 0.0;
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.session(&peer, &shutdown, &mut backoff) => r,
            };
            if up.get() == 1 {
                down_since = Instant::now();
                lag_at_drop = lag.get();
            }
            up.set(0);
            match result {
                Ok(()) => break,
                Err(e) => {
                    self.metrics
                        .replication_errors
                        .with_label_values(&[peer.name.as_str(), e.stage()])
                        .inc();
                    tracing::warn!(
                        peer = %peer.name,
                        stage = e.stage(),
                        sqlstate = %e.sqlstate(),
                        error = %e,
                        "shipping to peer interrupted; reconnecting"
                    );
                }
            }
            let delay = backoff.next_delay();
            let wait = tokio::time::sleep(delay);
            tokio::pin!(wait);
            let mut tick = tokio::time::interval(TICK);
            loop {
                lag.set(lag_at_drop + down_since.elapsed().as_secs_f64());
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = &mut wait => break,
                    _ = wake.notified() => break,
                    _ = tick.tick() => {}
                }
            }
        }
        up.set(0);
    }

    /// One connection's life: handshake, slot stream, ship until something breaks.
    async fn session(
        &self,
        peer: &PeerEntry,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), ShipError> {
        let (conn, welcome) = peer::connect(
            &peer.address,
            &self.identity,
            &peer.name,
            self.tls.as_ref(),
            &self.peer_metrics,
        )
        .await?;
        let resume = welcome.resume_from;
        let slot = origin_name(&peer.name);
        let repl = ReplicationConn::connect(&self.conn).await?;
        // Logical messages carry the stamps of local deletes (see `guard`).
        let mut options = vec![
            ("proto_version", "1"),
            ("publication_names", PUBLICATION),
            ("messages", "true"),
        ];
        // PostgreSQL 16+ can drop peers' transactions inside the server, saving the decoding;
        // 15 sends them with an Origin message and they are dropped here.
        if server_major(repl.parameter("server_version")) >= 16 {
            options.push(("origin", "none"));
        }
        let mut stream = repl.start_logical(&slot, resume, &options).await?;
        backoff.reset();
        let labels = [peer.name.as_str()];
        self.metrics.peer_up.with_label_values(&labels).set(1);
        tracing::info!(peer = %peer.name, %slot, resume_from = %format_lsn(resume), "shipping to peer");

        let protocol = conn.protocol();
        let (mut link, mut replies) = conn.into_split();
        let (heard_tx, mut heard) = watch::channel(Heard { acked: 0 });
        let reader_peer = peer.name.clone();
        let reader = tokio::spawn(async move {
            loop {
                match tokio::time::timeout(LINK_SILENCE, replies.recv()).await {
                    Ok(Ok(Some(Body::Ack { applied_lsn }))) => {
                        heard_tx.send_modify(|h| h.acked = h.acked.max(applied_lsn));
                    }
                    Ok(Ok(Some(Body::Heartbeat { .. }))) => {}
                    Ok(Err(FrameError::UnknownMessage { name, .. })) => {
                        tracing::debug!(peer = %reader_peer, %name, "ignoring a message kind this node does not know");
                    }
                    Ok(Ok(Some(other))) => {
                        tracing::warn!(peer = %reader_peer, message = other.name(), "unexpected message on the peer link");
                        break;
                    }
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %reader_peer, error = %e, "peer link read failed");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(peer = %reader_peer, "peer silent for {LINK_SILENCE:?}: dropping the link");
                        break;
                    }
                }
            }
        });

        let shipped = self.metrics.changes_shipped.with_label_values(&labels);
        let lag = self.metrics.lag_seconds.with_label_values(&labels);
        // A peer of the previous release (protocol 1) takes whole transactions only.
        let chunked = protocol >= CHUNKED_PROTOCOL_VERSION;
        let mut assembler = Assembler::new(if chunked {
            self.chunk_bytes
        } else {
            usize::MAX
        });
        // The transaction being shipped in chunks, from its first chunk to its commit.
        let mut streaming: Option<Streaming> = None;
        // Opened the first time an update leaves a TOASTed column untouched.
        let mut filler: Option<tokio_postgres::Client> = None;
        let mut state = Progress::new(resume);
        let mut unflushed = 0usize;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = Instant::now();
        let result: Result<(), ShipError> = async {
            // Made once: a fresh one per pass through the select would register with the token
            // anew every time.
            let cancelled = shutdown.cancelled();
            tokio::pin!(cancelled);
            loop {
                tokio::select! {
                    _ = &mut cancelled => {
                        link.flush().await?;
                        send_status(&mut stream, &state, false).await?;
                        return Ok(());
                    }
                    changed = heard.changed() => {
                        if changed.is_err() {
                            return Err(ShipError::LinkClosed);
                        }
                        let acked = heard.borrow_and_update().acked;
                        state.acked(acked);
                        if last_status.elapsed() >= STATUS_INTERVAL {
                            send_status(&mut stream, &state, false).await?;
                            last_status = Instant::now();
                        }
                    }
                    data = stream.next() => {
                        let mut data = data?.ok_or(ShipError::StreamEnded)?;
                        // Every message already read is handled here, in this one wakeup: a
                        // transaction arrives as a burst of small messages (Begin, one per row,
                        // Commit), and a pass through the select per message costs more than
                        // decoding it. Frames are batched while the slot has more to give right
                        // away and flushed once the burst is consumed (or every FLUSH_EVERY
                        // transactions). Keepalives count as messages: the server often sends
                        // one right behind a commit, and the transaction must not wait for it.
                        loop {
                            match pgoutput::decode_copy_data_bytes(data)? {
                                ReplicationMessage::XLogData { data, .. } => 'message: {
                                    // A peer's transaction is dropped whole: its row changes need
                                    // not even be decoded (on PostgreSQL 15 every transaction
                                    // applied here comes back through the slot).
                                    if assembler.drops(&data) {
                                        break 'message;
                                    }
                                    let Some(done) = assembler.push(pgoutput::decode_bytes(data)?)? else {
                                        break 'message;
                                    };
                                    let tx = match done {
                                        Assembled::Chunk(mut changes) => {
                                            let open = match &mut streaming {
                                                Some(open) => open,
                                                None => {
                                                    let (commit_lsn, commit_time) = assembler
                                                        .open_begin()
                                                        .expect("a chunk comes from an open transaction");
                                                    // Applied there already (see Applier::stream_begin).
                                                    let skip = commit_lsn < resume;
                                                    if !skip {
                                                        link.queue(&Body::TxBegin {
                                                            origin: self.identity.node.clone(),
                                                            commit_lsn,
                                                            commit_time,
                                                        })?;
                                                    }
                                                    streaming.insert(Streaming { skip, changes: 0 })
                                                }
                                            };
                                            if open.skip {
                                                break 'message;
                                            }
                                            check_ddl(protocol, &changes)?;
                                            self.fill(&mut filler, &mut changes).await?;
                                            let n = changes.len() as u64;
                                            open.changes += n;
                                            shipped.inc_by(n);
                                            send_staged(&mut link, &mut changes, self.chunk_bytes).await?;
                                            link.queue(&Body::TxChunk { changes })?;
                                            // A chunk is large: it goes out now, so that the link
                                            // buffers at most one.
                                            link.flush().await?;
                                            unflushed = 0;
                                            break 'message;
                                        }
                                        Assembled::Commit(tx) => tx,
                                    };
                                    if let Some(open) = streaming.take() {
                                        if open.skip {
                                            state.skipped(tx.end_lsn);
                                            break 'message;
                                        }
                                        warn_enclosed_ddl(&tx);
                                        let mut changes = tx.changes;
                                        check_ddl(protocol, &changes)?;
                                        self.fill(&mut filler, &mut changes).await?;
                                        let n = changes.len() as u64;
                                        self.count_captured(tx.end_lsn, open.changes + n);
                                        shipped.inc_by(n);
                                        send_staged(&mut link, &mut changes, self.chunk_bytes).await?;
                                        link.queue(&Body::TxCommit {
                                            commit_lsn: tx.commit_lsn,
                                            end_lsn: tx.end_lsn,
                                            commit_time: tx.commit_time,
                                            changes,
                                        })?;
                                        state.shipped(tx.end_lsn, tx.commit_time);
                                        link.flush().await?;
                                        unflushed = 0;
                                        break 'message;
                                    }
                                    if tx.origin.is_some() || tx.changes.is_empty() || tx.end_lsn <= resume {
                                        state.skipped(tx.end_lsn);
                                        break 'message;
                                    }
                                    warn_enclosed_ddl(&tx);
                                    check_ddl(protocol, &tx.changes)?;
                                    let mut tx = tx;
                                    self.fill(&mut filler, &mut tx.changes).await?;
                                    let n = tx.changes.len() as u64;
                                    self.count_captured(tx.end_lsn, n);
                                    link.queue(&Body::Transaction {
                                        origin: self.identity.node.clone(),
                                        commit_lsn: tx.commit_lsn,
                                        end_lsn: tx.end_lsn,
                                        commit_time: tx.commit_time,
                                        changes: tx.changes,
                                    })?;
                                    state.shipped(tx.end_lsn, tx.commit_time);
                                    shipped.inc_by(n);
                                    unflushed += 1;
                                }
                                ReplicationMessage::Keepalive { wal_end, reply_requested, .. } => {
                                    if !assembler.in_transaction() {
                                        state.idle_at(wal_end);
                                    }
                                    if reply_requested {
                                        send_status(&mut stream, &state, false).await?;
                                        last_status = Instant::now();
                                    }
                                }
                            }
                            if unflushed >= FLUSH_EVERY {
                                link.flush().await?;
                                unflushed = 0;
                            }
                            match stream.next_buffered()? {
                                Some(more) => data = more,
                                None => break,
                            }
                        }
                        if unflushed > 0 {
                            link.flush().await?;
                            unflushed = 0;
                        }
                    }
                    _ = tick.tick() => {
                        if unflushed > 0 {
                            link.flush().await?;
                            unflushed = 0;
                        }
                        let now = pg_epoch_micros(SystemTime::now());
                        link.send(&Body::Heartbeat { sent_at_micros: now }).await?;
                        // Asking for a reply makes the server report its position, which lets
                        // an idle slot's confirmed position follow the WAL.
                        send_status(&mut stream, &state, true).await?;
                        last_status = Instant::now();
                        lag.set(state.lag_seconds(now));
                    }
                }
            }
        }
        .await;
        reader.abort();
        let _ = stream.close().await;
        result
    }
}

/// A transaction being shipped in chunks.
struct Streaming {
    /// The peer has it already: nothing of it is sent.
    skip: bool,
    /// Changes shipped so far.
    changes: u64,
}

/// Values up to this size stay in their row even when the row is staged (at most 1,664 columns
/// of it: a few megabytes).
const SMALL_VALUE: usize = 1024;

/// Sends every value of `changes` larger than `piece` ahead in [`Body::TxValue`] pieces of at
/// most `piece` bytes (each flushed at once, so that the link buffers one piece at a time),
/// leaving [`Datum::Staged`] in its place: no frame then holds more than a chunk, however large
/// a value is (PostgreSQL's limit is 1 GB). A row larger than `piece` in all has every value
/// over [`SMALL_VALUE`] staged too, since many values just under `piece` (say twenty of 4 MiB)
/// would otherwise make one frame over the link's limit. Only new row values can be large; keys
/// are bounded by the index (a few kilobytes).
async fn send_staged(
    link: &mut PeerSender,
    changes: &mut ChangeSet,
    piece: usize,
) -> Result<(), ShipError> {
    for change in &mut changes.changes {
        let (Change::Insert { new, .. } | Change::Update { new, .. }) = change else {
            continue;
        };
        let whole: usize = new.iter().map(Datum::len).sum();
        let limit = if whole > piece { SMALL_VALUE } else { piece };
        for datum in new.iter_mut().filter(|d| d.len() > limit) {
            let (Datum::Text(value) | Datum::Binary(value)) =
                std::mem::replace(datum, Datum::Staged)
            else {
                unreachable!("only a value has a length");
            };
            let mut rest = value;
            loop {
                let data = rest.split_to(rest.len().min(piece));
                let last = rest.is_empty();
                link.send(&Body::TxValue { data, last }).await?;
                if last {
                    break;
                }
            }
        }
    }
    Ok(())
}

impl Shipper {
    /// Reads the unchanged TOAST values of updates in `changes`, over a session opened the first
    /// time one is needed.
    async fn fill(
        &self,
        filler: &mut Option<tokio_postgres::Client>,
        changes: &mut ChangeSet,
    ) -> Result<(), ShipError> {
        if !toast_fill::needs_fill(changes) {
            return Ok(());
        }
        let client = match filler.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.connect_filler().await?,
        };
        toast_fill::fill(&client, changes).await?;
        *filler = Some(client);
        Ok(())
    }

    /// Counts `n` changes as captured for the transaction ending at `end`, unless another
    /// peer's shipper has counted it already.
    fn count_captured(&self, end: Lsn, n: u64) {
        if self.captured_upto.fetch_max(end, Ordering::Relaxed) < end {
            self.metrics.changes_captured.inc_by(n);
        }
    }

    async fn connect_filler(&self) -> Result<tokio_postgres::Client, ShipError> {
        let (client, connection) =
            tokio_postgres::connect(&self.postgres.url, tokio_postgres::NoTls)
                .await
                .map_err(ShipError::FillConnect)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
            .batch_execute("SET application_name = 'pgmm capture (unchanged TOAST values)'")
            .await
            .map_err(ShipError::FillConnect)?;
        Ok(client)
    }
}

/// Positions of one session, and the rule for what the slot may confirm.
#[derive(Debug)]
struct Progress {
    /// Shipped and not yet acknowledged: (end LSN, commit time), in commit order.
    inflight: VecDeque<(Lsn, i64)>,
    /// Highest position the peer acknowledged as applied.
    acked: Lsn,
    /// Highest position up to which every transaction was shipped or dropped.
    processed: Lsn,
}

impl Progress {
    fn new(resume: Lsn) -> Self {
        Progress {
            inflight: VecDeque::new(),
            acked: resume,
            processed: resume,
        }
    }

    fn shipped(&mut self, end: Lsn, commit_time: i64) {
        self.inflight.push_back((end, commit_time));
        self.processed = self.processed.max(end);
    }

    fn skipped(&mut self, end: Lsn) {
        self.processed = self.processed.max(end);
    }

    fn idle_at(&mut self, wal_end: Lsn) {
        self.processed = self.processed.max(wal_end);
    }

    fn acked(&mut self, lsn: Lsn) {
        self.acked = self.acked.max(lsn);
        while self
            .inflight
            .front()
            .is_some_and(|(end, _)| *end <= self.acked)
        {
            self.inflight.pop_front();
        }
    }

    /// What the slot may forget: everything the peer has, and, when nothing is awaiting an ack,
    /// everything read so far (the rest was dropped, not shipped).
    fn confirmable(&self) -> Lsn {
        if self.inflight.is_empty() {
            self.processed.max(self.acked)
        } else {
            self.acked
        }
    }

    /// Age of the oldest unacknowledged transaction.
    fn lag_seconds(&self, now_micros: i64) -> f64 {
        self.inflight
            .front()
            .map_or(0.0, |(_, t)| (now_micros - t).max(0) as f64 / 1e6)
    }
}

async fn send_status(
    stream: &mut crate::replication::slot::ReplicationStream,
    state: &Progress,
    reply: bool,
) -> Result<(), ReplicationError> {
    let confirm = state.confirmable();
    let written = state.processed.max(confirm);
    let now = pg_epoch_micros(SystemTime::now());
    stream
        .send_status(&encode_standby_status_update(
            written, confirm, confirm, now, reply,
        ))
        .await
}

/// `15.18 (Debian 15.18-0+deb12u1)` → 15; 0 when unknown.
fn server_major(version: Option<&str>) -> u32 {
    version
        .and_then(|v| {
            v.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse().ok())
        })
        .unwrap_or(0)
}

/// A peer older than [`DDL_PROTOCOL_VERSION`] cannot decode a schema change: the transaction
/// is not sent (the link is dropped and retried with backoff, and the error says to upgrade),
/// since skipping it would leave that peer's schema behind for good.
fn check_ddl(protocol: u16, changes: &ChangeSet) -> Result<(), ShipError> {
    if protocol < DDL_PROTOCOL_VERSION
        && changes
            .changes
            .iter()
            .any(|c| matches!(c, Change::Ddl { .. }))
    {
        return Err(ShipError::DdlUnsupported { protocol });
    }
    Ok(())
}

fn warn_enclosed_ddl(tx: &CapturedTx) {
    if tx.enclosed_ddl_with_rows {
        tracing::warn!(
            commit_lsn = %format_lsn(tx.commit_lsn),
            "DDL ran inside a DO block or function in a transaction that also changed rows:              peers replay that statement whole, so rows it wrote are written there twice; run              schema changes and data changes as separate statements"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_confirms_only_what_the_peer_has_or_what_was_dropped() {
        let mut p = Progress::new(100);
        assert_eq!(p.confirmable(), 100);
        p.skipped(150);
        assert_eq!(
            p.confirmable(),
            150,
            "a dropped transaction with nothing in flight"
        );
        p.shipped(200, 1);
        p.skipped(250);
        p.idle_at(300);
        assert_eq!(p.confirmable(), 100, "in flight: only the ack counts");
        p.shipped(400, 2);
        p.acked(200);
        assert_eq!(p.confirmable(), 200);
        assert_eq!(p.lag_seconds(2_000_002), 2.0);
        p.acked(400);
        assert_eq!(p.confirmable(), 400);
        p.idle_at(500);
        assert_eq!(p.confirmable(), 500);
        assert_eq!(p.lag_seconds(9), 0.0);
    }

    #[test]
    fn server_versions() {
        assert_eq!(server_major(Some("15.18 (Debian 15.18-0+deb12u1)")), 15);
        assert_eq!(server_major(Some("16beta1")), 16);
        assert_eq!(server_major(None), 0);
    }
}
