//! What a running node answers on a request link ([`Purpose::Request`]): a joiner's
//! `Prepare` and `Copy`, and `pgmm check`'s hash requests. One link carries one request after
//! another until the caller closes it.
//!
//! [`Purpose::Request`]: crate::replication::peer::Purpose::Request

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::StreamExt;
use tokio_postgres::Client;

use super::catalog::{self, CopiedTable};
use super::hashes;
use super::join::{standing, Standing};
use super::MembershipError;
use crate::config::Config;
use crate::pg::names::origin_name;
use crate::pg::pg_error_text;
use crate::replication::peer::{Body, Member, PeerConnection, RefusalKind, RequestHandler};
use crate::replication::pgoutput::{format_lsn, parse_lsn};
use crate::replication::slot::{ReplicationConn, ReplicationError, WalSenderConfig};

/// How often a long wait tells the caller it is still alive.
const WAITING_EVERY: Duration = Duration::from_secs(5);
/// How often a wait re-reads what it waits for.
const POLL: Duration = Duration::from_millis(200);

/// The membership side of a running node.
pub struct Answerer {
    pub config: Config,
    pub walsender: WalSenderConfig,
    /// Set once the node has started (enrolled its tables, made its slots): before, its
    /// publication may not hold the tables yet, and a copy would miss them.
    pub started: Arc<AtomicBool>,
}

impl RequestHandler for Answerer {
    fn handle(
        &self,
        conn: PeerConnection,
        peer: String,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let mut conn = conn;
            if let Err(e) = self.answer(&mut conn, &peer).await {
                tracing::warn!(%peer, error = %e, "membership request failed");
                let _ = conn
                    .send(&Body::Refused {
                        reason: e.to_string(),
                        kind: RefusalKind::Other,
                    })
                    .await;
            }
        })
    }
}

impl Answerer {
    async fn answer(&self, conn: &mut PeerConnection, peer: &str) -> Result<(), MembershipError> {
        // One session for the link's small requests (`pgmm check` sends two per table),
        // opened at the first that needs it.
        let mut session: Option<Client> = None;
        loop {
            let request = match conn.recv_member().await {
                Ok(m) => m,
                // The caller is done.
                Err(crate::replication::peer::MemberError::Frame(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            if self.joining(&mut session).await? {
                if let Member::Prepare { .. } = request {
                    // This node has written nothing yet, and its first write will come after
                    // its slot for the caller exists: the caller streams it from that slot's
                    // start, with nothing to wait for.
                    tracing::info!(joiner = %peer, "prepared for a joining node: this node is joining too");
                    conn.send_member(Member::Prepared { slot_lsn: 0 }).await?;
                    continue;
                }
                return Err(MembershipError::Refused(format!(
                    "node {} is joining the cluster: ask a node that has joined",
                    self.config.node.name
                )));
            }
            if !self.started.load(Ordering::Acquire) {
                return Err(MembershipError::Refused(format!(
                    "node {} is starting: try again in a moment",
                    self.config.node.name
                )));
            }
            match request {
                Member::Prepare { donor } => self.prepare(conn, peer, &donor).await?,
                Member::Copy { tables, slot } => self.copy(conn, peer, &tables, slot).await?,
                Member::HashBuckets {
                    table,
                    columns,
                    key,
                    buckets,
                } => {
                    let client = self.session(&mut session).await?;
                    let hashes = hashes::buckets(client, &table, &columns, &key, buckets).await?;
                    conn.send_member(Member::BucketHashes { hashes }).await?;
                }
                Member::HashRows {
                    table,
                    columns,
                    key,
                    buckets,
                    which,
                } => {
                    let client = self.session(&mut session).await?;
                    let rows = hashes::rows(
                        client,
                        &self.config,
                        &table,
                        &columns,
                        &key,
                        buckets,
                        &which,
                    )
                    .await?;
                    conn.send_member(Member::RowHashes { rows, last: true })
                        .await?;
                }
                other => {
                    return Err(MembershipError::Protocol(format!(
                        "{other:?} is not a request"
                    )))
                }
            }
        }
    }

    /// Whether this node is itself joining (see [`standing`]): its peer port is open during
    /// its join so that joiners can prepare each other.
    async fn joining(&self, session: &mut Option<Client>) -> Result<bool, MembershipError> {
        if self.config.node.join_from.is_none() {
            return Ok(false);
        }
        let client = self.session(session).await?;
        Ok(matches!(
            standing(client, &self.config).await?,
            Standing::Joining { .. }
        ))
    }

    /// The link's session (with the fixed settings hashes need), opened on first use.
    async fn session<'s>(
        &self,
        session: &'s mut Option<Client>,
    ) -> Result<&'s Client, MembershipError> {
        if session.is_none() {
            *session = Some(hashes::session(&self.config).await?);
        }
        Ok(session.as_ref().expect("opened above"))
    }

    /// A joiner asks this node (not its donor) to be ready: the slot for the joiner exists, and
    /// the donor has acknowledged this node's changes up to that slot's start, so that the
    /// donor's copy holds everything before it and the slot everything after.
    async fn prepare(
        &self,
        conn: &mut PeerConnection,
        joiner: &str,
        donor: &str,
    ) -> Result<(), MembershipError> {
        let me = &self.config.node.name;
        for (name, what) in [(joiner, "the joining node"), (donor, "its donor")] {
            if !self.config.peers.iter().any(|p| p.name == name) {
                return Err(MembershipError::Refused(format!(
                    "node {me} has no [[peers]] entry for {name} ({what}): add it to this \
                     node's config (and to [cluster] nodes) and restart pgmm on {me}"
                )));
            }
        }
        let slot = origin_name(joiner);
        let mut repl = ReplicationConn::connect(&self.walsender).await?;
        match repl.create_logical_slot(&slot, "pgoutput").await {
            Ok(_) | Err(ReplicationError::SlotExists) => {}
            Err(e) => return Err(e.into()),
        }
        let _ = repl.close().await;
        let client = crate::pg::connect(&self.config.postgres).await?;
        let slot_lsn: String = client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .get(0);
        let donor_slot = origin_name(donor);
        let started = Instant::now();
        let mut told = Instant::now();
        loop {
            let caught_up: Option<bool> = client
                .query_opt(
                    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn \
                     FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                    &[&donor_slot, &slot_lsn],
                )
                .await?
                .map(|r| r.get::<_, Option<bool>>(0).unwrap_or(false));
            match caught_up {
                None => {
                    return Err(MembershipError::Refused(format!(
                        "node {me} has no slot {donor_slot} for the donor {donor}"
                    )))
                }
                Some(true) => break,
                Some(false) => {}
            }
            if told.elapsed() >= WAITING_EVERY {
                told = Instant::now();
                conn.send_member(Member::Waiting {
                    reason: format!(
                        "node {me}: waiting {}s until {donor} has applied {me}'s changes up to \
                         {slot_lsn} (the link from {me} to {donor} must be up)",
                        started.elapsed().as_secs()
                    ),
                })
                .await?;
            }
            tokio::time::sleep(POLL).await;
        }
        tracing::info!(%joiner, %donor, %slot_lsn, "prepared for a joining node");
        conn.send_member(Member::Prepared {
            slot_lsn: parse_lsn(&slot_lsn).unwrap_or(0),
        })
        .await?;
        Ok(())
    }

    /// Copies the replicated tables (or `only` those) to the caller. With `slot`, first
    /// creates the caller's slot anew and copies at its exported snapshot: the caller then
    /// streams this node's changes from exactly where the copy ends.
    async fn copy(
        &self,
        conn: &mut PeerConnection,
        joiner: &str,
        only: &[String],
        slot: bool,
    ) -> Result<(), MembershipError> {
        let me = &self.config.node.name;
        let mut repl = ReplicationConn::connect(&self.walsender).await?;
        let client = crate::pg::connect(&self.config.postgres).await?;
        let exported = if slot {
            let name = origin_name(joiner);
            // The slot made when this node learnt of the joiner holds changes the copy will
            // contain: it starts over at the copy's snapshot.
            match repl.drop_slot(&name).await {
                Ok(()) => {}
                Err(ReplicationError::Server { code, .. }) if code == "42704" => {}
                Err(e) => return Err(e.into()),
            }
            let (at, snapshot) = repl
                .create_logical_slot_exporting(&name, "pgoutput")
                .await?;
            tracing::info!(%joiner, slot = %name, at = %format_lsn(at), "copying for a joining node");
            Some((at, snapshot))
        } else {
            None
        };
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
        let snapshot_lsn = match &exported {
            Some((at, snapshot)) => {
                client
                    .batch_execute(&format!(
                        "SET TRANSACTION SNAPSHOT {}",
                        crate::pg::quote::replication_literal(snapshot)
                    ))
                    .await?;
                *at
            }
            None => {
                let lsn: String = client
                    .query_one("SELECT pg_catalog.pg_current_wal_lsn()::text", &[])
                    .await?
                    .get(0);
                parse_lsn(&lsn).unwrap_or(0)
            }
        };
        // The snapshot is imported: the exporting session may go.
        let _ = repl.close().await;
        client
            .batch_execute("SET LOCAL search_path = pg_catalog")
            .await?;
        let mut tables = catalog::tables(&client, only).await?;
        if tables.is_empty() && !only.is_empty() {
            return Err(MembershipError::Refused(format!(
                "node {me} replicates no table named {}",
                only.join(", ")
            )));
        }
        let (pre, post) = catalog::schema(&client, &mut tables).await?;
        conn.send_member(Member::Schema {
            pre,
            post,
            tables: tables.iter().map(|t| t.label.clone()).collect(),
        })
        .await?;
        let chunk = self.config.replication.chunk_bytes;
        let mut writers = Writers::load(&self.config, me).await?;
        for table in &tables {
            send_table(conn, &client, &mut writers, table, chunk).await?;
        }
        send_tombstones(conn, &client, me, &tables, chunk).await?;
        let sequences = catalog::sequences(&client, &tables).await?;
        conn.send_member(Member::Done {
            snapshot_lsn,
            sequences,
        })
        .await?;
        client.batch_execute("COMMIT").await?;
        tracing::info!(%joiner, tables = tables.len(), "copy sent");
        Ok(())
    }
}

/// Streams one table as COPY text in `Rows` messages grouped by the node that wrote each row
/// (its commit's replication origin; this node when written here).
async fn send_table(
    conn: &mut PeerConnection,
    client: &Client,
    writers: &mut Writers,
    table: &CopiedTable,
    chunk: usize,
) -> Result<(), MembershipError> {
    conn.send_member(Member::Table {
        table: table.label.clone(),
        columns: table.columns.clone(),
        estimated_rows: table.estimated_rows as i64,
        post: table.post.clone(),
    })
    .await?;
    let columns: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("t.{}", postgres_protocol::escape::escape_identifier(c)))
        .collect();
    // Each row leads with its xmin, which `Writers` turns into the node that wrote it: one
    // commit-timestamp lookup per distinct transaction rather than per row (a bulk-loaded
    // table has a handful).
    let query = format!(
        "COPY (SELECT t.xmin, {columns} FROM {only}{name} t) TO STDOUT",
        columns = columns.join(", "),
        only = if table.partitioned { "" } else { "ONLY " },
        name = table.sql_name,
    );
    let stream = client.copy_out(&query).await?;
    futures_util::pin_mut!(stream);
    let mut pending: Vec<(u32, bytes::Bytes)> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut rows = 0u64;
    while let Some(data) = stream.next().await {
        let data = data?;
        // One CopyData message is one row.
        rows += 1;
        let tab = data
            .iter()
            .position(|&b| b == b'\t')
            .ok_or_else(|| MembershipError::Protocol("a COPY row without columns".into()))?;
        let xid: u32 = std::str::from_utf8(&data[..tab])
            .ok()
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| MembershipError::Protocol("a COPY row without its xmin".into()))?;
        pending_bytes += data.len();
        pending.push((xid, data.slice(tab + 1..)));
        if pending_bytes >= chunk {
            send_rows(conn, writers, &mut pending, chunk).await?;
            pending_bytes = 0;
        }
    }
    send_rows(conn, writers, &mut pending, chunk).await?;
    conn.send_member(Member::TableDone { rows }).await?;
    Ok(())
}

/// Which node wrote a row, by the transaction that wrote it (`pg_xact_commit_timestamp_origin`
/// of its xmin): the node of origin `pgmm_<node>`, or this node for a local transaction (or one
/// under another origin, or too old to have a commit timestamp).
struct Writers {
    lookup: Client,
    me: String,
    nodes: HashMap<u32, String>,
    by_xid: HashMap<u32, usize>,
    /// Node names, indexed by `by_xid`'s values.
    names: Vec<String>,
}

/// Transactions remembered before the cache starts over: bounds its memory on a table
/// written by millions of transactions.
const WRITERS_CACHED: usize = 1 << 16;

impl Writers {
    async fn load(config: &Config, me: &str) -> Result<Writers, MembershipError> {
        let lookup = crate::pg::connect(&config.postgres).await?;
        let nodes = lookup
            .query(
                "SELECT roident, substr(roname, 6) FROM pg_catalog.pg_replication_origin \
                 WHERE roname LIKE 'pgmm\\_%'",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, u32>(0), r.get::<_, String>(1)))
            .collect();
        Ok(Writers {
            lookup,
            me: me.to_owned(),
            nodes,
            by_xid: HashMap::new(),
            names: Vec::new(),
        })
    }

    /// Looks up the transactions of `xids` not known yet, in one query.
    async fn resolve(&mut self, xids: &[u32]) -> Result<(), MembershipError> {
        let mut unknown: Vec<String> = xids
            .iter()
            .filter(|x| !self.by_xid.contains_key(x))
            .map(|x| x.to_string())
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        unknown.dedup();
        if self.by_xid.len() + unknown.len() > WRITERS_CACHED {
            self.by_xid.clear();
        }
        let rows = self
            .lookup
            .query(
                "SELECT x, (pg_catalog.pg_xact_commit_timestamp_origin(x::xid)).roident \
                 FROM unnest($1::text[]) AS x",
                &[&unknown],
            )
            .await?;
        for row in rows {
            let xid: u32 = row.get::<_, String>(0).parse().unwrap_or(0);
            let node = row
                .get::<_, Option<u32>>(1)
                .and_then(|id| self.nodes.get(&id))
                .unwrap_or(&self.me);
            let index = match self.names.iter().position(|n| n == node) {
                Some(i) => i,
                None => {
                    self.names.push(node.clone());
                    self.names.len() - 1
                }
            };
            self.by_xid.insert(xid, index);
        }
        Ok(())
    }

    fn name(&self, xid: u32) -> &str {
        self.by_xid
            .get(&xid)
            .map(|&i| self.names[i].as_str())
            .unwrap_or(&self.me)
    }
}

/// Sends `pending` rows (their columns, without the xmin) in `Rows` messages of about `chunk`
/// bytes, one writer per message.
async fn send_rows(
    conn: &mut PeerConnection,
    writers: &mut Writers,
    pending: &mut Vec<(u32, bytes::Bytes)>,
    chunk: usize,
) -> Result<(), MembershipError> {
    if pending.is_empty() {
        return Ok(());
    }
    let xids: Vec<u32> = pending.iter().map(|(x, _)| *x).collect();
    writers.resolve(&xids).await?;
    let mut out = RowsOut::new(chunk);
    for (xid, row) in pending.drain(..) {
        let node = writers.name(xid).to_owned();
        out.row(conn, &node, &row).await?;
    }
    out.flush(conn).await
}

/// `Rows` messages being filled: rows of one writer, up to about `chunk` bytes each.
struct RowsOut {
    chunk: usize,
    node: String,
    rows: u64,
    buf: BytesMut,
}

impl RowsOut {
    fn new(chunk: usize) -> RowsOut {
        RowsOut {
            chunk,
            node: String::new(),
            rows: 0,
            buf: BytesMut::with_capacity(chunk.min(1 << 20)),
        }
    }

    /// Adds one row (a COPY text line) written by `node`.
    async fn row(
        &mut self,
        conn: &mut PeerConnection,
        node: &str,
        row: &[u8],
    ) -> Result<(), MembershipError> {
        if node != self.node {
            self.flush(conn).await?;
            self.node = node.to_owned();
        }
        let mut rest = row;
        loop {
            let room = self.chunk.saturating_sub(self.buf.len()).max(1);
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.buf.extend_from_slice(now);
            rest = later;
            if rest.is_empty() {
                self.rows += 1;
            }
            if self.buf.len() >= self.chunk {
                self.flush(conn).await?;
            }
            if rest.is_empty() {
                return Ok(());
            }
        }
    }

    async fn flush(&mut self, conn: &mut PeerConnection) -> Result<(), MembershipError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        conn.send_member(Member::Rows {
            node: self.node.clone(),
            rows: std::mem::take(&mut self.rows),
            data: self.buf.split().freeze(),
        })
        .await?;
        Ok(())
    }
}

/// The tombstones of the copied tables, as a table of their own (`pgmm.tombstones`).
async fn send_tombstones(
    conn: &mut PeerConnection,
    client: &Client,
    me: &str,
    tables: &[CopiedTable],
    chunk: usize,
) -> Result<(), MembershipError> {
    let columns = ["table_name", "key", "deleted_at", "origin"];
    conn.send_member(Member::Table {
        table: super::TOMBSTONES.to_owned(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        estimated_rows: 0,
        post: Vec::new(),
    })
    .await?;
    let labels: Vec<String> = tables
        .iter()
        .map(|t| crate::pg::quote::replication_literal(&t.label))
        .collect();
    let rows = if labels.is_empty() {
        0
    } else {
        let query = format!(
            "COPY (SELECT table_name, key, deleted_at, origin FROM pgmm.tombstones \
                   WHERE table_name IN ({})) TO STDOUT",
            labels.join(", "),
        );
        stream_copy(conn, client, me, &query, chunk).await?
    };
    conn.send_member(Member::TableDone { rows }).await?;
    Ok(())
}

/// Runs a `COPY ... TO STDOUT` of rows written by `node` and sends its output in `Rows`
/// messages of about `chunk` bytes. Returns the row count.
async fn stream_copy(
    conn: &mut PeerConnection,
    client: &Client,
    node: &str,
    query: &str,
    chunk: usize,
) -> Result<u64, MembershipError> {
    let stream = client.copy_out(query).await?;
    futures_util::pin_mut!(stream);
    let mut out = RowsOut::new(chunk);
    let mut rows = 0u64;
    while let Some(data) = stream.next().await {
        // One CopyData message is one row.
        out.row(conn, node, &data?).await?;
        rows += 1;
    }
    out.flush(conn).await?;
    Ok(rows)
}

impl From<tokio_postgres::Error> for MembershipError {
    fn from(e: tokio_postgres::Error) -> Self {
        MembershipError::Postgres(
            pg_error_text(&e),
            crate::pg::sqlstate::of_pg_error(&e).to_owned(),
        )
    }
}
