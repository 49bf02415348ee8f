//! The joining node's side (`[node] join_from`): prepare every other node, copy from the
//! donor, record where each stream begins. Runs at start, before the node's own slots, peer
//! listener and front door exist, so nothing reaches or leaves the node until its data is all
//! there; `/readyz` says `joining` meanwhile. An attempt that fails (a link dropped, the donor
//! or this pgmm killed) is started over from the beginning: the tables are emptied and copied
//! again, and the donor's slot for this node made anew.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio_postgres::{Client, CopyInSink};
use tokio_util::sync::CancellationToken;

use super::{MembershipError, TOMBSTONES};
use crate::config::table::TableName;
use crate::config::Config;
use crate::observe::joining::Joining;
use crate::observe::MetricsError;
use crate::pg::names::origin_name;
use crate::pg::quote::{qualified, replication_literal};
use crate::replication::peer::{
    self, Backoff, ClientTls, Member, PeerConnection, PeerIdentity, PeerMetrics, SequenceValue,
};
use crate::replication::pgoutput::format_lsn;

/// Bytes buffered per origin session before they go to its COPY.
const COPY_BUFFER: usize = 256 * 1024;
/// How often the terminal gets a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// SQLSTATEs of a schema statement whose object is there already (or, for `OWNER TO`, whose
/// role is not): the joiner keeps what it has.
const ALREADY: &[&str] = &[
    "42P07", "42710", "42P06", "42723", "42701", "42P16", "42704",
];

/// The join's metrics.
#[derive(Clone)]
pub struct JoinMetrics {
    rows: IntCounterVec,
    bytes: IntCounterVec,
    joining: IntGauge,
    failures: IntCounter,
}

impl JoinMetrics {
    pub fn register(registry: &Registry) -> Result<JoinMetrics, MetricsError> {
        let rows = IntCounterVec::new(
            Opts::new(
                "pgmm_join_rows_copied_total",
                "Rows copied from the donor while this node joined, by table.",
            ),
            &["table"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "pgmm_join_bytes_copied_total",
                "Bytes of COPY text received from the donor while this node joined, by table.",
            ),
            &["table"],
        )?;
        let joining = IntGauge::new(
            "pgmm_joining",
            "1 while this node joins the cluster (copying from its donor), else 0.",
        )?;
        let failures = IntCounter::new(
            "pgmm_join_failures_total",
            "Join attempts that failed and started over (the donor or another node unreachable, \
             a schema statement that failed here, the local Postgres restarted).",
        )?;
        registry.register(Box::new(rows.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(joining.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        Ok(JoinMetrics {
            rows,
            bytes,
            joining,
            failures,
        })
    }
}

/// What the join needs of the node.
pub struct Joiner<'a> {
    pub config: &'a Config,
    pub identity: &'a PeerIdentity,
    pub tls: Option<&'a ClientTls>,
    pub peer_metrics: &'a PeerMetrics,
    pub metrics: &'a JoinMetrics,
    pub joining: &'a Joining,
    pub shutdown: &'a CancellationToken,
}

impl Joiner<'_> {
    /// Joins from `[node] join_from` unless this node has joined already; retries until it
    /// succeeds, is stopped, or finds data of this node's own in the way. Each attempt opens
    /// its own session to the local Postgres, so that a Postgres restarted mid-join (killed,
    /// failed over) costs one attempt, not the node.
    pub async fn join_if_needed(&self) -> Result<(), MembershipError> {
        let Some(donor) = &self.config.node.join_from else {
            return Ok(());
        };
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let result = loop {
            let attempt = tokio::select! {
                _ = self.shutdown.cancelled() => break Err(MembershipError::Cancelled),
                r = self.connect_and_attempt(donor) => r,
            };
            match attempt {
                Ok(()) => break Ok(()),
                Err(e @ MembershipError::NotEmpty(_)) => break Err(e),
                Err(e) => {
                    self.metrics.failures.inc();
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        %donor,
                        error = %e,
                        retry_in = ?delay,
                        "join attempt failed; it starts over"
                    );
                    self.joining
                        .set(format!("joining from {donor}: retrying after: {e}"));
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break Err(MembershipError::Cancelled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        self.metrics.joining.set(0);
        if result.is_ok() {
            self.joining.clear();
        }
        result
    }

    /// One attempt on a fresh session, unless the join is recorded as done.
    async fn connect_and_attempt(&self, donor: &str) -> Result<(), MembershipError> {
        let client = crate::pg::connect(&self.config.postgres).await?;
        let recorded = match standing(&client, self.config).await? {
            Standing::Member => return Ok(()),
            Standing::Joining { recorded } => recorded,
        };
        self.metrics.joining.set(1);
        self.joining.set(format!("joining from {donor}: starting"));
        self.attempt(&client, donor, recorded).await
    }

    async fn connect(&self, node: &str) -> Result<PeerConnection, MembershipError> {
        let address = self
            .config
            .peers
            .iter()
            .find(|p| p.name == node)
            .map(|p| p.address.clone())
            .ok_or_else(|| {
                MembershipError::Refused(format!("node {node} has no [[peers]] entry"))
            })?;
        Ok(
            peer::connect_for_request(&address, self.identity, node, self.tls, self.peer_metrics)
                .await?,
        )
    }

    async fn attempt(
        &self,
        client: &Client,
        donor: &str,
        recorded: bool,
    ) -> Result<(), MembershipError> {
        let started = Instant::now();
        // 1. Every other node: the slot for us exists, and the donor has that node's changes
        //    up to its start.
        let mut starts: Vec<(String, u64)> = Vec::new();
        for peer in self.config.peers.iter().filter(|p| p.name != donor) {
            self.joining
                .set(format!("joining from {donor}: preparing {}", peer.name));
            let mut conn = self.connect(&peer.name).await?;
            conn.send_member(Member::Prepare {
                donor: donor.to_owned(),
            })
            .await?;
            loop {
                match conn.recv_member().await? {
                    Member::Prepared { slot_lsn } => {
                        tracing::info!(peer = %peer.name, slot_start = %format_lsn(slot_lsn), "node prepared for the join");
                        starts.push((peer.name.clone(), slot_lsn));
                        break;
                    }
                    Member::Waiting { reason } => {
                        tracing::info!(peer = %peer.name, "{reason}");
                        self.joining.set(format!("joining from {donor}: {reason}"));
                    }
                    other => return Err(unexpected(&other)),
                }
            }
        }

        // 2. The donor: schema, rows, sequences, at its new slot's snapshot.
        self.joining.set(format!("joining from {donor}: copying"));
        let mut conn = self.connect(donor).await?;
        conn.send_member(Member::Copy {
            tables: Vec::new(),
            slot: true,
        })
        .await?;
        let (pre, post, tables) = match conn.recv_member().await? {
            Member::Schema { pre, post, tables } => (pre, post, tables),
            other => return Err(unexpected(&other)),
        };
        if !recorded {
            refuse_own_data(client, &tables, donor).await?;
            client
                .execute(
                    "INSERT INTO pgmm.join_state (donor, state) VALUES ($1, 'copying')",
                    &[&donor],
                )
                .await?;
        }
        run_schema(client, &pre).await?;
        // All at once: foreign keys between the tables (a schema given beforehand, or a retry
        // after the keys were built) allow only that.
        let mut all: Vec<String> = Vec::new();
        for table in &tables {
            let name = TableName::parse(table)
                .ok_or_else(|| MembershipError::Protocol(format!("bad table {table:?}")))?;
            all.push(qualified(&name.schema, &name.name));
        }
        all.push("pgmm.tombstones".to_owned());
        in_transaction(
            client,
            &format!(
                "SET LOCAL session_replication_role = replica; TRUNCATE {}",
                all.join(", ")
            ),
        )
        .await?;
        let mut loader = Loader::new(self.config, donor);
        let mut builder = IndexBuilder::start(self.config).await?;
        let total = tables.len();
        let mut copied_rows = 0u64;
        for (done, _) in tables
            .iter()
            .chain(std::iter::once(&TOMBSTONES.to_owned()))
            .enumerate()
        {
            let (table, columns, estimate, keys) = match conn.recv_member().await? {
                Member::Table {
                    table,
                    columns,
                    estimated_rows,
                    post,
                } => (table, columns, estimated_rows, post),
                other => return Err(unexpected(&other)),
            };
            let sql_name = if table == TOMBSTONES {
                "pgmm.tombstones".to_owned()
            } else {
                let name = TableName::parse(&table)
                    .ok_or_else(|| MembershipError::Protocol(format!("bad table {table:?}")))?;
                qualified(&name.schema, &name.name)
            };
            let copy = format!(
                "COPY {sql_name} ({}) FROM STDIN",
                columns
                    .iter()
                    .map(|c| postgres_protocol::escape::escape_identifier(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            loader.start_table(copy);
            let rows_metric = self.metrics.rows.with_label_values(&[&table]);
            let bytes_metric = self.metrics.bytes.with_label_values(&[&table]);
            let mut told = Instant::now();
            let mut rows = 0u64;
            let mut bytes = 0u64;
            loop {
                match conn.recv_member().await? {
                    Member::Rows {
                        node,
                        rows: n,
                        data,
                    } => {
                        let len = data.len() as u64;
                        loader.feed(&node, data).await?;
                        rows += n;
                        bytes += len;
                        rows_metric.inc_by(n);
                        bytes_metric.inc_by(len);
                        if told.elapsed() >= PROGRESS_EVERY {
                            told = Instant::now();
                            let line = progress_line(&table, rows, estimate, bytes, done, total);
                            tracing::info!("joining from {donor}: {line}");
                            self.joining.set(format!("joining from {donor}: {line}"));
                        }
                    }
                    Member::TableDone { rows: sent } => {
                        loader.finish_table().await?;
                        if sent != rows {
                            return Err(MembershipError::Protocol(format!(
                                "{table}: the donor sent {sent} rows, {rows} arrived"
                            )));
                        }
                        copied_rows += rows;
                        tracing::info!(%table, rows, bytes, "table copied");
                        builder.build(keys).await?;
                        break;
                    }
                    other => return Err(unexpected(&other)),
                }
            }
        }
        self.joining
            .set(format!("joining from {donor}: building keys and indexes"));
        builder.finish().await?;
        run_schema(client, &post).await?;
        let (snapshot_lsn, sequences) = match conn.recv_member().await? {
            Member::Done {
                snapshot_lsn,
                sequences,
            } => (snapshot_lsn, sequences),
            other => return Err(unexpected(&other)),
        };
        finish(client, donor, snapshot_lsn, &starts, &sequences).await?;
        tracing::info!(
            %donor,
            tables = total,
            rows = copied_rows,
            seconds = started.elapsed().as_secs_f64(),
            snapshot = %format_lsn(snapshot_lsn),
            "joined the cluster: streams begin where the copy ends"
        );
        Ok(())
    }
}

/// Whether this node still has to join.
pub(super) enum Standing {
    /// No `join_from`, a join recorded as done, or a node that has replicated before
    /// `join_from` was set (it has pgmm slots or applied a peer's changes): `join_from`
    /// only ever affects a node's first start.
    Member,
    /// `recorded`: an earlier attempt is recorded (`copying`).
    Joining { recorded: bool },
}

pub(super) async fn standing(
    client: &Client,
    config: &Config,
) -> Result<Standing, MembershipError> {
    if config.node.join_from.is_none() {
        return Ok(Standing::Member);
    }
    let state: Option<(String, String)> = client
        .query_opt("SELECT donor, state FROM pgmm.join_state", &[])
        .await?
        .map(|r| (r.get(0), r.get(1)));
    match state {
        Some((donor, state)) if state == "done" => {
            tracing::debug!(%donor, "joined earlier; [node] join_from has no effect now");
            Ok(Standing::Member)
        }
        Some(_) => Ok(Standing::Joining { recorded: true }),
        None => {
            let replicated: bool = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pgmm.applied) \
                         OR EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots \
                                    WHERE database = pg_catalog.current_database() \
                                      AND slot_name LIKE 'pgmm\\_%')",
                    &[],
                )
                .await?
                .get(0);
            if replicated {
                tracing::info!(
                    "[node] join_from is set, but this node has replicated before: it is a \
                     member already and does not join"
                );
                Ok(Standing::Member)
            } else {
                Ok(Standing::Joining { recorded: false })
            }
        }
    }
}

fn unexpected(m: &Member) -> MembershipError {
    MembershipError::Protocol(format!("unexpected {m:?}").chars().take(200).collect())
}

fn progress_line(
    table: &str,
    rows: u64,
    estimate: i64,
    bytes: u64,
    done: usize,
    total: usize,
) -> String {
    let of = if estimate > 0 {
        format!(" of about {estimate}")
    } else {
        String::new()
    };
    format!(
        "copying {table}: {rows} rows{of}, {:.1} MB ({done} of {total} tables done)",
        bytes as f64 / 1e6
    )
}

/// A node that has rows in a table the join would copy is not a new node: copying would
/// empty its tables. Refused, with what to do.
async fn refuse_own_data(
    client: &Client,
    tables: &[String],
    donor: &str,
) -> Result<(), MembershipError> {
    for table in tables {
        let Some(name) = TableName::parse(table) else {
            continue;
        };
        let exists: bool = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&qualified(&name.schema, &name.name)],
            )
            .await?
            .get(0);
        if !exists {
            continue;
        }
        let has_rows: bool = client
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {})",
                    qualified(&name.schema, &name.name)
                ),
                &[],
            )
            .await?
            .get(0);
        if has_rows {
            return Err(MembershipError::NotEmpty(format!(
                "[node] join_from = {donor:?}, but table {table} already has rows here: a \
                 joining node starts empty (or with the schema only) and gets its rows from the \
                 donor. Empty the tables to join, or remove join_from to start this node with \
                 its own data"
            )));
        }
    }
    Ok(())
}

/// Runs schema statements one by one, keeping what exists already.
async fn run_schema(client: &Client, statements: &[String]) -> Result<(), MembershipError> {
    for sql in statements {
        if let Err(e) = client.batch_execute(sql).await {
            let code = crate::pg::sqlstate::of_pg_error(&e);
            if ALREADY.contains(&code) {
                tracing::debug!(statement = %sql, error = %crate::pg::pg_error_text(&e), "kept what exists");
                continue;
            }
            return Err(MembershipError::Postgres(
                format!(
                    "creating the schema from the donor: {} (statement: {sql})",
                    crate::pg::pg_error_text(&e)
                ),
                code.to_owned(),
            ));
        }
    }
    Ok(())
}

/// Builds each copied table's keys and indexes on a session of its own, in the background,
/// while the next table streams: the load of one table and the index builds of another use
/// different cores (a COPY is one backend's work).
struct IndexBuilder {
    queue: tokio::sync::mpsc::UnboundedSender<Vec<String>>,
    task: AbortOnDrop<Result<(), MembershipError>>,
}

impl IndexBuilder {
    async fn start(config: &Config) -> Result<IndexBuilder, MembershipError> {
        let session = crate::pg::connect(&config.postgres).await?;
        let (queue, mut work) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
        let task = tokio::spawn(async move {
            while let Some(statements) = work.recv().await {
                run_schema(&session, &statements).await?;
            }
            Ok(())
        });
        Ok(IndexBuilder {
            queue,
            task: AbortOnDrop(task),
        })
    }

    /// Queues one table's statements; fails with an earlier build's error.
    async fn build(&mut self, statements: Vec<String>) -> Result<(), MembershipError> {
        if statements.is_empty() || self.queue.send(statements).is_ok() {
            return Ok(());
        }
        // The builder stopped: it failed.
        Self::outcome(&mut self.task).await
    }

    /// Waits for every queued build.
    async fn finish(self) -> Result<(), MembershipError> {
        let IndexBuilder { queue, mut task } = self;
        drop(queue);
        Self::outcome(&mut task).await
    }

    async fn outcome(
        task: &mut AbortOnDrop<Result<(), MembershipError>>,
    ) -> Result<(), MembershipError> {
        match (&mut task.0).await {
            Ok(result) => result,
            Err(e) => Err(MembershipError::Protocol(format!("index builder: {e}"))),
        }
    }
}

/// A task aborted when its handle goes (an attempt that fails stops its builds).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sequences, where each stream begins, and the join's end, in one transaction.
async fn finish(
    client: &Client,
    donor: &str,
    snapshot_lsn: u64,
    starts: &[(String, u64)],
    sequences: &[SequenceValue],
) -> Result<(), MembershipError> {
    let mut sql = String::new();
    for s in sequences {
        sql.push_str(&format!(
            "SELECT pg_catalog.setval({}, {}, {});\n",
            replication_literal(&s.name),
            s.last_value,
            s.is_called
        ));
    }
    for (node, lsn) in std::iter::once(&(donor.to_owned(), snapshot_lsn)).chain(starts) {
        sql.push_str(&format!(
            "INSERT INTO pgmm.applied (origin, end_lsn) VALUES ({}, '{}') \
             ON CONFLICT (origin) DO UPDATE SET end_lsn = EXCLUDED.end_lsn, commit_time = NULL, \
             applied_at = now();\n",
            replication_literal(node),
            format_lsn(*lsn)
        ));
    }
    sql.push_str(&format!(
        "UPDATE pgmm.join_state SET state = 'done', snapshot_lsn = '{}', finished_at = now()",
        format_lsn(snapshot_lsn)
    ));
    in_transaction(client, &sql).await
}

/// Runs `sql` (statements separated by `;`) in one transaction, rolled back if any fails: a
/// failed statement would otherwise leave the session in an aborted transaction block, and the
/// next attempt would find it so.
async fn in_transaction(client: &Client, sql: &str) -> Result<(), MembershipError> {
    if let Err(e) = client
        .batch_execute(&format!("BEGIN;\n{sql};\nCOMMIT"))
        .await
    {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e.into());
    }
    Ok(())
}

/// One session per node whose rows the copy carries, each writing under that node's
/// replication origin (this node's own rows, after a rejoin, under none) with triggers off, so
/// that every copied row's commit says who wrote it, as on the donor.
struct Loader<'a> {
    config: &'a Config,
    donor: &'a str,
    sessions: HashMap<String, Session>,
    copy: String,
}

struct Session {
    client: Client,
    sink: Option<std::pin::Pin<Box<CopyInSink<Bytes>>>>,
    buffer: BytesMut,
}

impl<'a> Loader<'a> {
    fn new(config: &'a Config, donor: &'a str) -> Self {
        Loader {
            config,
            donor,
            sessions: HashMap::new(),
            copy: String::new(),
        }
    }

    fn start_table(&mut self, copy: String) {
        self.copy = copy;
    }

    /// The session of `node`, opened (and its COPY begun) on first use.
    async fn session(&mut self, node: &str) -> Result<&mut Session, MembershipError> {
        // A writer this cluster does not know is attributed to the donor.
        let node = if self.config.cluster.nodes.iter().any(|n| n == node) {
            node.to_owned()
        } else {
            self.donor.to_owned()
        };
        if !self.sessions.contains_key(&node) {
            let client = crate::pg::connect(&self.config.postgres).await?;
            client
                .batch_execute("SET session_replication_role = replica")
                .await?;
            if node != self.config.node.name {
                client
                    .execute(
                        "SELECT pg_catalog.pg_replication_origin_session_setup($1)",
                        &[&origin_name(&node)],
                    )
                    .await?;
            }
            self.sessions.insert(
                node.clone(),
                Session {
                    client,
                    sink: None,
                    buffer: BytesMut::new(),
                },
            );
        }
        let session = self.sessions.get_mut(&node).expect("inserted above");
        if session.sink.is_none() {
            session.client.batch_execute("BEGIN").await?;
            let sink = session.client.copy_in::<_, Bytes>(&self.copy).await?;
            session.sink = Some(Box::pin(sink));
        }
        Ok(session)
    }

    /// Writes `data` (COPY text of rows written by `node`; a row may continue in the next
    /// message, of the same node) into that node's session.
    async fn feed(&mut self, node: &str, data: Bytes) -> Result<(), MembershipError> {
        let session = self.session(node).await?;
        let sink = session.sink.as_mut().expect("open");
        if session.buffer.is_empty() && data.len() >= COPY_BUFFER {
            sink.send(data).await?;
        } else {
            session.buffer.extend_from_slice(&data);
            if session.buffer.len() >= COPY_BUFFER {
                sink.send(session.buffer.split().freeze()).await?;
            }
        }
        Ok(())
    }

    /// Ends the table's COPY in every session and commits each.
    async fn finish_table(&mut self) -> Result<(), MembershipError> {
        for session in self.sessions.values_mut() {
            if let Some(mut sink) = session.sink.take() {
                if !session.buffer.is_empty() {
                    sink.send(session.buffer.split().freeze()).await?;
                }
                sink.as_mut().finish().await?;
                session.client.batch_execute("COMMIT").await?;
            }
        }
        Ok(())
    }
}
