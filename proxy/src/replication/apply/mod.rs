//! Apply: a peer's transactions written into the local database, each exactly once, each
//! change resolved by last-writer-wins and checked against the ownership rules.
//!
//! One [`Applier`] per origin node owns one session to the local Postgres, set up with
//! `session_replication_role = replica` (local triggers and FK checks behave as for any
//! replica; pgmm's own clock and guard triggers do not fire) and the replication origin
//! `pgmm_<origin>`. A batch of consecutive remote transactions becomes one local transaction
//! whose last statement before COMMIT moves the origin's row of `pgmm.applied` (the progress
//! record) to the end of the batch's last transaction, and sets up the replication origin's
//! commit data (`pg_replication_origin_xact_setup(end_lsn, commit_time)`). The record commits
//! and aborts with the data: after any crash it says exactly which remote transactions are in
//! the database, the handshake resumes the sender from it, and [`Applier::apply_batch`] skips
//! anything at or below it. That is the exactly-once argument; acks only tell the sender when it
//! may let its slot forget. A reader sees all of a batch or none of it, so never part of one
//! remote transaction.
//!
//! Why not the replication origin's own progress: from PostgreSQL 16 on, a transaction that
//! wrote under an origin and called `pg_replication_origin_xact_setup` advances the origin
//! even when it rolls back (for parallel apply of streamed transactions), and apply rolls back
//! routinely (a fast attempt that misses, a constraint error, 40001, a pgmm killed mid-batch).
//! So the origin is used only for what only it gives (the commit's origin attribution, read by
//! last-writer-wins through `pg_xact_commit_timestamp_origin`, and loop prevention), its setup
//! comes last so that a statement failing before it leaves nothing for the abort to record, and
//! each apply session rewinds it to the record before taking it.
//!
//! Throughput: the batch is sent as one pipeline (BEGIN, every change, the progress and origin
//! setup, COMMIT) and the results are read once, at the end. Each change decides, applies and
//! records its own conflict in one statement (see [`sql::Lww`]), so nothing needs a result
//! before COMMIT. The progress statement fails unless the record is exactly where this session
//! left it, so a batch can never commit past a gap. The commit is synchronous when the
//! receiver is about to ack (a WAL flush makes it and everything before it durable).

mod ddl;
mod receiver;
pub mod sql;
mod stream;

use std::collections::HashMap;
use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};
use std::sync::Arc;

use futures_util::future::join_all;
use futures_util::TryStreamExt;
use postgres_protocol::escape::{escape_identifier, escape_literal};
use thiserror::Error;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

use crate::config::owners::{OwnerRules, Verdict};
use crate::config::table::TableName;
use crate::config::{OwnerSpec, PostgresConfig, ReplicationConfig};
use crate::pg::pg_error_text;
use crate::pg::sqlstate::{self, SqlState};
use crate::replication::changeset::{Change, ChangeSet, TableDesc};
use crate::replication::metrics::ReplicationMetrics;
use crate::replication::pgoutput::{format_lsn, parse_lsn, Datum, Lsn};

pub use receiver::{Receiver, ReceiverSetup, LINK_SILENCE};

/// Retries of one batch after a serialization failure or deadlock before the error is
/// reported and the link dropped (a row so hot that every attempt loses is then visible).
const MAX_RETRIES: u32 = 20;
/// First pause before a retry; it doubles up to [`MAX_RETRY_PAUSE`], so twenty retries span
/// a few seconds at most.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);
const MAX_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// The replication origin (and slot) name pgmm uses for `node`.
pub fn origin_name(node: &str) -> String {
    format!("pgmm_{node}")
}

/// Why a remote transaction could not be applied. The transaction is rolled back and not
/// acknowledged, so the sender keeps it and sends it again after reconnecting.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("apply: cannot connect to the local Postgres: {}", pg_error_text(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error(
        "apply: replication origin {origin} is in use by another session (a previous link from \
         the same node that has not ended yet)"
    )]
    OriginBusy { origin: String },
    #[error(
        "apply: {table} is not replicated on this node (it does not match [replication] tables); \
         add it there, or stop replicating it on the origin"
    )]
    NotReplicated { table: TableName },
    #[error("apply: {what} on {table} failed: {}", pg_error_text(.source))]
    Statement {
        table: TableName,
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("apply: {what} failed: {}", pg_error_text(.source))]
    Database {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("apply: malformed change set: {0}")]
    Malformed(String),
    /// A schema change from the origin failed here (a table it alters is missing, the role it
    /// ran as does not exist here, the schema diverged).
    #[error("apply: the schema change `{statement}` failed: {}", pg_error_text(.source))]
    Ddl {
        statement: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// This node's enrolment after a schema change failed.
    #[error("apply: enrolling the tables after a schema change failed: {0}")]
    Enrol(String),
}

impl SqlState for ApplyError {
    /// The server's SQLSTATE for database failures (e.g. 42703 for a column missing here);
    /// `55006` for a busy origin, `55000` for an unreplicated table, `08P01` for bad input.
    fn sqlstate(&self) -> &str {
        match self {
            ApplyError::Connect(_) => "08006",
            ApplyError::OriginBusy { .. } => "55006",
            ApplyError::NotReplicated { .. } | ApplyError::Enrol(_) => "55000",
            ApplyError::Statement { source, .. }
            | ApplyError::Database { source, .. }
            | ApplyError::Ddl { source, .. } => sqlstate::of_pg_error(source),
            ApplyError::Malformed(_) => "08P01",
        }
    }
}

impl ApplyError {
    /// A failure a second attempt in the same session can cure: a local write raced with the
    /// batch (see [`crate::replication::metrics::RETRIED_SQLSTATES`]).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApplyError::Statement { .. } | ApplyError::Database { .. }
        ) && crate::replication::metrics::RETRIED_SQLSTATES.contains(&self.sqlstate())
    }

    fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
        move |source| ApplyError::Database { what, source }
    }
}

/// A value in Postgres's text format, whatever the parameter's type: the server parses it, as
/// it would a literal. NULL is `None`. Owns its bytes (a cheap reference to the received frame),
/// so a pipeline of many transactions can be in flight without borrowing them.
#[derive(Debug, Clone)]
struct PgText(Option<Bytes>);

impl ToSql for PgText {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// A parameter of the fast attempt: one value, or (for a bulk statement) one value of every
/// change of a group, as a `text[]` in binary array format.
#[derive(Debug, Clone)]
enum Param {
    One(PgText),
    Many(Vec<PgText>),
}

impl ToSql for Param {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Param::One(v) => v.to_sql(ty, out),
            Param::Many(vs) => vs.to_sql(ty, out),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        match self {
            Param::One(_) => Format::Text,
            Param::Many(_) => Format::Binary,
        }
    }

    to_sql_checked!();
}

fn text(d: &Datum) -> Result<PgText, ApplyError> {
    match d {
        Datum::Null => Ok(PgText(None)),
        Datum::Text(b) => Ok(PgText(Some(b.clone()))),
        Datum::UnchangedToast => Err(ApplyError::Malformed(
            "an unchanged TOAST value where a value is required".into(),
        )),
        Datum::Binary(_) => Err(ApplyError::Malformed(
            "a binary value (pgmm streams text)".into(),
        )),
        Datum::Staged => Err(ApplyError::Malformed(
            "a staged value whose pieces never arrived".into(),
        )),
    }
}

fn literal(s: String) -> PgText {
    PgText(Some(Bytes::from(s)))
}

/// One remote transaction to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTx {
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub changes: ChangeSet,
}

/// What a statement of the pipeline is, for reporting its result.
#[derive(Debug, Clone)]
enum Step {
    Begin,
    Setup,
    /// A change: its table (an index into its change set's tables), what it is, and its
    /// transaction's index in the batch. Its result rows are the conflicts it recorded, as
    /// (kind, resolution).
    Change {
        table: usize,
        what: &'static str,
        tx: usize,
    },
    /// The savepoint a chunk of a streamed transaction is applied under, and its release.
    Savepoint,
    Release,
    SyncCommit,
    Commit,
}

impl Step {
    /// What the statement was doing, for its error.
    fn doing(&self) -> &'static str {
        match self {
            Step::Begin => "starting the apply transaction",
            Step::Change { what, .. } => what,
            Step::Savepoint => "taking the savepoint of a chunk",
            Step::Release => "releasing the savepoint of a chunk",
            Step::Setup => "recording the progress under the replication origin",
            Step::SyncCommit | Step::Commit => "committing",
        }
    }
}

/// The outcome of [`Applier::apply_batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// Remote transactions committed here by this call (duplicates not included).
    pub transactions: usize,
    /// Row changes they carried.
    pub changes: usize,
    pub conflicts: usize,
    /// Transactions skipped as already applied.
    pub duplicates: usize,
    /// How the batch committed; `None` when nothing did.
    pub path: Option<Path>,
}

/// How a batch was applied (see [`Applier::apply_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// By the fast statements: no change of the batch was a conflict.
    Fast,
    /// By every change's full last-writer-wins statement, after the fast attempt missed.
    Full,
}

/// A batch that failed and was rolled back as a whole.
#[derive(Debug)]
pub struct BatchError {
    pub applied: Applied,
    pub error: ApplyError,
}

/// One origin's apply session.
pub struct Applier {
    origin_node: String,
    here: String,
    rules: Arc<OwnerRules>,
    client: Client,
    replication: ReplicationConfig,
    metrics: ReplicationMetrics,
    statements: HashMap<String, Statement>,
    texts: Texts,
    /// Tables checked by `check_tables`, by schema and name.
    known: HashMap<String, HashMap<String, Known>>,
    origins: sql::Origins,
    begin: Statement,
    setup: Statement,
    sync_commit: Statement,
    commit: Statement,
    savepoint: Statement,
    release: Statement,
    rollback_to: Statement,
    progress: Lsn,
    /// The transaction being applied chunk by chunk, between its `TxBegin` and `TxCommit`.
    stream: Option<stream::Stream>,
}

impl Applier {
    /// Opens the session and takes the origin; fails with [`ApplyError::OriginBusy`] while a
    /// previous session still holds it.
    pub async fn connect(
        pg: &PostgresConfig,
        origin_node: &str,
        here: &str,
        rules: Arc<OwnerRules>,
        replication: ReplicationConfig,
        metrics: ReplicationMetrics,
    ) -> Result<Applier, ApplyError> {
        let (client, connection) = tokio_postgres::connect(&pg.url, NoTls)
            .await
            .map_err(ApplyError::Connect)?;
        let origin = origin_name(origin_node);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %pg_error_text(&e), "apply connection ended");
            }
        });
        client
            .batch_execute(&format!(
                "SET session_replication_role = replica; SET synchronous_commit = off; \
                 SET plan_cache_mode = force_generic_plan; SET application_name = {}",
                postgres_protocol::escape::escape_literal(&format!(
                    "pgmm apply from {origin_node}"
                ))
            ))
            .await
            .map_err(ApplyError::db("setting up the apply session"))?;
        // The progress record, created at 0/0 for an origin seen for the first time.
        client
            .execute(
                "INSERT INTO pgmm.applied (origin, end_lsn) VALUES ($1, '0/0') \
                 ON CONFLICT (origin) DO NOTHING",
                &[&origin_node],
            )
            .await
            .map_err(ApplyError::db("creating the progress record"))?;
        let progress = read_progress(&client, origin_node).await?;
        // On 16+ an apply transaction that aborted after its origin setup (a pgmm killed between
        // the setup and the COMMIT) moved the origin past what committed. Put it back on the
        // record before taking it, so that the origin's progress, which operators and tools
        // read, says what the database holds. It must be done while no session holds it.
        let rewind = client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_advance($1, $2::text::pg_lsn) \
                 WHERE coalesce(pg_catalog.pg_replication_origin_progress($1, false), '0/0') \
                       <> $2::text::pg_lsn",
                &[&origin, &format_lsn(progress)],
            )
            .await;
        match rewind {
            Ok(_) => {}
            Err(e) if e.code().map(|c| c.code()) == Some("55006") => {
                return Err(ApplyError::OriginBusy { origin });
            }
            Err(e) => {
                return Err(ApplyError::Database {
                    what: "rewinding the replication origin to the progress record",
                    source: e,
                })
            }
        }
        if let Err(e) = client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
        {
            if e.code().map(|c| c.code()) == Some("55006") {
                return Err(ApplyError::OriginBusy { origin });
            }
            return Err(ApplyError::Database {
                what: "taking the replication origin",
                source: e,
            });
        }
        let prepare = |sql: &'static str| {
            let client = &client;
            async move {
                client
                    .prepare(sql)
                    .await
                    .map_err(ApplyError::db("preparing apply statements"))
            }
        };
        // Repeatable read: a local write racing with apply on the same row makes the apply
        // transaction fail (40001) and be resent, instead of deciding on a stale version.
        let begin = prepare("BEGIN ISOLATION LEVEL REPEATABLE READ").await?;
        // The last statement before COMMIT: it moves the progress record from where this
        // session left it ($3) to the batch's end ($1), and fails (22012, division by zero)
        // unless the record was exactly there, so a batch can never commit past a gap or twice.
        // Then it sets up the origin's commit data (attribution, loop prevention). Coming last,
        // a statement that fails before it leaves no origin LSN for the abort to record.
        let setup = prepare(
            "WITH moved AS (UPDATE pgmm.applied SET end_lsn = $1::text::pg_lsn, \
                 commit_time = timestamptz '2000-01-01 00:00:00+00' \
                               + $2::text::bigint * interval '1 microsecond', \
                 applied_at = now() \
               WHERE origin = $4 AND end_lsn = $3::text::pg_lsn RETURNING 1) \
             SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, \
             timestamptz '2000-01-01 00:00:00+00' + $2::text::bigint * interval '1 microsecond') \
             WHERE 1 / (SELECT count(*) FROM moved)::int = 1",
        )
        .await?;
        let sync_commit = prepare("SET LOCAL synchronous_commit = on").await?;
        let commit = prepare("COMMIT").await?;
        let savepoint = prepare("SAVEPOINT pgmm_chunk").await?;
        let release = prepare("RELEASE SAVEPOINT pgmm_chunk").await?;
        let rollback_to = prepare("ROLLBACK TO SAVEPOINT pgmm_chunk").await?;
        let origins = sql::Origins(
            client
                .query(
                    "SELECT roident::oid, substr(roname, 6) FROM pg_catalog.pg_replication_origin \
                     WHERE roname LIKE 'pgmm\\_%'",
                    &[],
                )
                .await
                .map_err(ApplyError::db("reading the replication origins"))?
                .iter()
                .map(|r| (r.get::<_, u32>(0), r.get::<_, String>(1)))
                .collect(),
        );
        let mut applier = Applier {
            texts: Texts::default(),
            known: HashMap::new(),
            origins,
            origin_node: origin_node.to_owned(),
            here: here.to_owned(),
            rules,
            client,
            replication,
            metrics,
            statements: HashMap::new(),
            begin,
            setup,
            sync_commit,
            commit,
            savepoint,
            release,
            rollback_to,
            progress: 0,
            stream: None,
        };
        applier.progress = progress;
        tracing::info!(origin = %origin_node, progress = %format_lsn(applier.progress), "apply session ready");
        Ok(applier)
    }

    /// The end LSN (on the origin) of the last remote transaction committed here.
    pub fn progress(&self) -> Lsn {
        self.progress
    }

    /// Whether the session is gone; the caller then opens a new [`Applier`].
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Applies remote transactions in order, together as one local transaction. With `sync`,
    /// the commit waits for the WAL flush, which makes the batch (and everything before it)
    /// durable: only then may it be acknowledged. On error nothing of the batch is committed;
    /// [`BatchError::applied`] counts only the duplicates skipped.
    ///
    /// A serialization failure or deadlock with a local write (the only failures that a second
    /// attempt can cure) is retried here, in the same session, after a short growing pause, up
    /// to [`MAX_RETRIES`] times; each retry is counted in `pgmm_apply_retries_total`. Dropping
    /// the link for them made the sender resend everything in flight, which under contention
    /// was most of the catch-up delay.
    pub async fn apply_batch(
        &mut self,
        batch: &[RemoteTx],
        sync: bool,
    ) -> Result<Applied, BatchError> {
        let mut pause = RETRY_PAUSE;
        let mut attempt = 0;
        loop {
            match self.apply_once(batch, sync).await {
                Err(e) if attempt < MAX_RETRIES && e.error.is_retryable() => {
                    let sqlstate = e.error.sqlstate();
                    attempt += 1;
                    self.metrics
                        .apply_retries
                        .with_label_values(&[self.origin_node.as_str(), sqlstate])
                        .inc();
                    tracing::debug!(origin = %self.origin_node, %sqlstate, attempt, "apply batch rolled back by a concurrent local write; applying it again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_RETRY_PAUSE);
                }
                other => return other,
            }
        }
    }

    async fn apply_once(&mut self, batch: &[RemoteTx], sync: bool) -> Result<Applied, BatchError> {
        let mut applied = Applied::default();
        let fresh: Vec<&RemoteTx> = batch
            .iter()
            .filter(|tx| tx.end_lsn > self.progress)
            .collect();
        applied.duplicates = batch.len() - fresh.len();
        if fresh.is_empty() {
            return Ok(applied);
        }
        let result = if fresh.iter().any(|tx| has_ddl(&tx.changes)) {
            self.apply_runs(&fresh, sync, &mut applied).await
        } else {
            self.pipeline(&fresh, sync, &mut applied).await
        };
        match result {
            Ok(()) => Ok(applied),
            Err(error) => {
                self.reset().await;
                Err(BatchError { applied, error })
            }
        }
    }

    /// A batch with schema changes: each transaction that has one is applied by itself, cut at
    /// its schema changes (`ddl.rs`); the runs of transactions between them as batches.
    async fn apply_runs(
        &mut self,
        fresh: &[&RemoteTx],
        sync: bool,
        applied: &mut Applied,
    ) -> Result<(), ApplyError> {
        let mut rest = fresh;
        while let Some((first, after)) = rest.split_first() {
            if has_ddl(&first.changes) {
                rest = after;
                // Not a duplicate (`fresh` ends past the progress): opened at the progress.
                self.stream_begin(self.progress, first.commit_time);
                let outcome = match self.chunk(&first.changes).await {
                    Ok(()) => {
                        self.commit_stream(
                            first.end_lsn,
                            &ChangeSet::default(),
                            sync && rest.is_empty(),
                        )
                        .await
                    }
                    Err(e) => Err(e),
                }?;
                applied.transactions += outcome.transactions;
                applied.changes += outcome.changes;
                applied.conflicts += outcome.conflicts;
                applied.path = outcome.path;
            } else {
                let n = rest
                    .iter()
                    .position(|tx| has_ddl(&tx.changes))
                    .unwrap_or(rest.len());
                let (run, after) = rest.split_at(n);
                rest = after;
                self.pipeline(run, sync && rest.is_empty(), applied).await?;
            }
        }
        Ok(())
    }

    /// After a failure: a transaction may be open and aborted, and the statements may no longer
    /// fit a table whose definition changed. Starts both over, and takes the progress from the
    /// database, which knows exactly what committed.
    async fn reset(&mut self) {
        let _ = self.client.batch_execute("ROLLBACK").await;
        self.stream = None;
        self.forget_tables();
        if let Ok(p) = read_progress(&self.client, &self.origin_node).await {
            self.progress = p;
        }
    }

    /// Drops what was read or prepared about the local tables, which may describe them as
    /// they were before a schema change.
    fn forget_tables(&mut self) {
        self.statements.clear();
        self.known.clear();
        self.texts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    async fn pipeline(
        &mut self,
        txs: &[&RemoteTx],
        sync: bool,
        applied: &mut Applied,
    ) -> Result<(), ApplyError> {
        let sets: Vec<(&ChangeSet, i64)> =
            txs.iter().map(|t| (&t.changes, t.commit_time)).collect();
        let (planned, table_names) = self.plan_sets(&sets).await?;
        // The whole batch is one local transaction, recorded as the last remote one's: the
        // origin's progress jumps to its end in the same commit as all the batch's data.
        let last = txs
            .last()
            .expect("apply_batch passes at least one transaction");
        let start = self.progress;
        let begin = vec![self.step_begin()];
        let commit = self.commit_steps(last.end_lsn, last.commit_time, start, sync);
        let changes = txs.iter().map(|t| t.changes.changes.len()).sum::<usize>();
        // Conflicts are rare: first try every change's fast path, which only applies changes
        // that follow from the local rows without a conflict. If one of them does not, the
        // attempt is rolled back and the batch is applied by the full statements.
        if self.try_fast(&planned, &begin, &commit).await? {
            self.progress = last.end_lsn;
            applied.transactions += txs.len();
            applied.changes += changes;
            applied.path = Some(Path::Fast);
            return Ok(());
        }
        let conflicts = self.run_full(planned, &table_names, begin, commit).await?;
        self.progress = last.end_lsn;
        applied.path = Some(Path::Full);
        applied.transactions += txs.len();
        applied.changes += changes;
        applied.conflicts += conflicts.len();
        self.count_conflicts(conflicts);
        Ok(())
    }

    /// Plans every change of `sets` (each a change set and its transaction's commit time, the
    /// `i`-th of the batch), checking their tables first; returns the plans and, per set, its
    /// tables' names (what [`Step::Change`] indexes).
    async fn plan_sets(
        &mut self,
        sets: &[(&ChangeSet, i64)],
    ) -> Result<(Vec<Planned>, Vec<Vec<Arc<TableName>>>), ApplyError> {
        let mut tx_tables = Vec::with_capacity(sets.len());
        for (set, _) in sets {
            tx_tables.push(self.check_tables(set).await?);
        }
        let rules = self.rules.clone();
        let origins = self.origins.clone();
        let conflict_column = self.replication.conflict_column.clone();
        let planner = Planner {
            origin: &self.origin_node,
            here: &self.here,
            conflict_column: &conflict_column,
            rules: &rules,
            origins: &origins,
            texts: &self.texts,
            shape: std::sync::Mutex::new(String::new()),
        };
        let mut planned = Vec::with_capacity(sets.iter().map(|(s, _)| s.changes.len()).sum());
        let mut table_names = Vec::with_capacity(sets.len());
        for (i, ((set, commit_time), tables)) in sets.iter().zip(tx_tables).enumerate() {
            for change in &set.changes {
                planned.push(planner.plan(set, &tables, change, *commit_time, i)?);
            }
            table_names.push(tables.into_iter().map(|k| k.name).collect());
        }
        Ok((planned, table_names))
    }

    fn step_begin(&self) -> (Statement, Vec<PgText>, Step) {
        (self.begin.clone(), Vec::new(), Step::Begin)
    }

    /// What ends an apply transaction: the progress record moved from `start` to `end` with the
    /// origin's commit data (see `setup`), the synchronous commit when asked, COMMIT.
    fn commit_steps(
        &self,
        end: Lsn,
        commit_time: i64,
        start: Lsn,
        sync: bool,
    ) -> Vec<(Statement, Vec<PgText>, Step)> {
        let mut steps = vec![(
            self.setup.clone(),
            setup_params(end, commit_time, start, &self.origin_node),
            Step::Setup,
        )];
        if sync {
            steps.push((self.sync_commit.clone(), Vec::new(), Step::SyncCommit));
        }
        steps.push((self.commit.clone(), Vec::new(), Step::Commit));
        steps
    }

    /// Counts and logs conflicts that committed, as (table, kind, resolution).
    fn count_conflicts(&self, conflicts: Vec<(String, String, String)>) {
        for (table, kind, resolution) in conflicts {
            self.metrics
                .conflicts
                .with_label_values(&[&table, &kind, &resolution])
                .inc();
            if kind == "ownership_violation" {
                tracing::warn!(origin = %self.origin_node, %table, "a change its origin may not make was refused and recorded in pgmm.conflicts");
            } else {
                tracing::info!(origin = %self.origin_node, %table, %kind, %resolution, "conflict recorded in pgmm.conflicts");
            }
        }
    }

    /// Every planned change by its full last-writer-wins statement, between `before` and
    /// `after`, as one pipeline. Returns the conflicts the changes recorded, as (table, kind,
    /// resolution), when every statement succeeded (with a COMMIT in `after`: committed);
    /// otherwise the first failure, the cause (the statements after it only report that the
    /// transaction aborted).
    async fn run_full(
        &mut self,
        planned: Vec<Planned>,
        table_names: &[Vec<Arc<TableName>>],
        before: Vec<(Statement, Vec<PgText>, Step)>,
        after: Vec<(Statement, Vec<PgText>, Step)>,
    ) -> Result<Vec<(String, String, String)>, ApplyError> {
        let mut steps = before;
        steps.reserve(planned.len() + after.len());
        for p in planned {
            let statement = self.prepared(&p.slow, &p.table, &p.step).await?;
            steps.push((statement, p.params, p.step));
        }
        steps.extend(after);
        let client = &self.client;
        let results = join_all(steps.iter().map(|(statement, params, step)| async move {
            match step {
                Step::Change { .. } => {
                    let rows: Vec<tokio_postgres::Row> = client
                        .query_raw(statement, params.clone())
                        .await?
                        .try_collect()
                        .await?;
                    Ok(rows
                        .iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                        .collect::<Vec<_>>())
                }
                _ => client
                    .execute_raw(statement, params.clone())
                    .await
                    .map(|_| Vec::new()),
            }
        }))
        .await;

        let mut conflicts: Vec<(String, String, String)> = Vec::new();
        for ((_, _, step), result) in steps.iter().zip(results) {
            match (step, result) {
                (Step::Change { table, tx, .. }, Ok(recorded)) => {
                    for (kind, resolution) in recorded {
                        conflicts.push((table_names[*tx][*table].to_string(), kind, resolution));
                    }
                }
                (_, Ok(_)) => {}
                (step, Err(source)) => {
                    return Err(match step {
                        Step::Change { table, what, tx } => ApplyError::Statement {
                            table: TableName::clone(&table_names[*tx][*table]),
                            what,
                            source,
                        },
                        other => ApplyError::Database {
                            what: other.doing(),
                            source,
                        },
                    });
                }
            }
        }
        Ok(conflicts)
    }

    /// The fast attempt at a batch (see `pipeline`): `before`, every change's fast statement
    /// and `after`, as one pipeline, so that it takes one round trip. A fast statement fails
    /// unless it applied all its changes (`sql::all_applied`), which aborts the transaction (a
    /// COMMIT in `after` then rolls back); then (false) the caller applies the changes by the
    /// full statements, which report the error if it is a real one. False at once when a change
    /// has no fast path.
    ///
    /// Changes to distinct rows commute, so the batch is sorted into layers in which no row is
    /// changed twice ([`layers`]), and within a layer the changes of one shape (table,
    /// operation, columns) go into one bulk statement over arrays of their values
    /// ([`sql::Lww::insert_bulk`]): one statement, one plan execution and one result for many
    /// rows.
    async fn try_fast(
        &mut self,
        planned: &[Planned],
        before: &[(Statement, Vec<PgText>, Step)],
        after: &[(Statement, Vec<PgText>, Step)],
    ) -> Result<bool, ApplyError> {
        if planned.iter().any(|p| matches!(p.fast, Fast::No)) {
            return Ok(false);
        }
        let framing = |steps: &[(Statement, Vec<PgText>, Step)]| {
            steps
                .iter()
                .map(|(statement, params, _)| {
                    (
                        statement.clone(),
                        params.iter().cloned().map(Param::One).collect::<Vec<_>>(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut steps: Vec<(Statement, Vec<Param>)> = framing(before);
        for layer in layers(planned) {
            for group in layer {
                let p = &planned[group[0]];
                let (text, bulk) = match &p.fast {
                    Fast::Text {
                        bulk: Some(bulk), ..
                    } if group.len() > 1 => (bulk, true),
                    Fast::Text { single, .. } => (single, false),
                    Fast::Same => (&p.slow, false),
                    Fast::No => unreachable!("checked above"),
                };
                let statement = self.prepared(text, &p.table, &p.step).await?;
                let params = if bulk {
                    (0..p.params.len())
                        .map(|j| {
                            Param::Many(
                                group
                                    .iter()
                                    .map(|&i| planned[i].params[j].clone())
                                    .collect(),
                            )
                        })
                        .collect()
                } else {
                    p.params.iter().cloned().map(Param::One).collect()
                };
                steps.push((statement, params));
            }
        }
        steps.extend(framing(after));
        let client = &self.client;
        let results = join_all(
            steps
                .iter()
                .map(|(statement, params)| client.execute_raw(statement, params)),
        )
        .await;
        // The first error is the cause; those after it only say that the transaction aborted.
        match results.into_iter().find_map(Result::err) {
            None => Ok(true),
            Some(e) if self.client.is_closed() => Err(ApplyError::Database {
                what: "applying a batch",
                source: e,
            }),
            Some(e) => {
                tracing::debug!(error = %pg_error_text(&e), "the fast attempt missed; applying the changes by the full statements");
                Ok(false)
            }
        }
    }

    /// The local types of `quoted`'s columns, by name, as SQL type names (without type
    /// modifiers: a value cast to `varchar` is then assigned to a `varchar(10)` column with the
    /// same checks as a parameter of the column's type). Empty when the table is missing here;
    /// the statements then fail with Postgres's own error.
    async fn column_types(&self, quoted: &str) -> Result<ColumnTypes, ApplyError> {
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, NULL) \
                 FROM pg_catalog.pg_attribute AS a \
                 WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 \
                 AND NOT a.attisdropped",
                &[&quoted],
            )
            .await
            .map_err(ApplyError::db("reading the column types"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect())
    }

    /// Each table's name, quoted name and local column types, after checking it replicates
    /// here. Every transaction describes its tables anew, so tables seen before are looked up
    /// without building their names again or reading their types.
    async fn check_tables(&mut self, set: &ChangeSet) -> Result<Vec<Known>, ApplyError> {
        let mut tables = Vec::with_capacity(set.tables.len());
        for t in &set.tables {
            if t.key.is_empty() || t.key.iter().any(|&k| k >= t.columns.len()) {
                return Err(ApplyError::Malformed(format!(
                    "{} arrived without a valid key",
                    t.table_name()
                )));
            }
            if let Some(known) = self.known.get(&t.schema).and_then(|m| m.get(&t.name)) {
                tables.push(known.clone());
                continue;
            }
            let name = t.table_name();
            if !self.replication.matches(&name) {
                return Err(ApplyError::NotReplicated { table: name });
            }
            let quoted = sql::qualified(&t.schema, &t.name);
            let known = Known {
                types: Arc::new(self.column_types(&quoted).await?),
                name: Arc::new(name),
                quoted: Arc::from(quoted),
            };
            self.known
                .entry(t.schema.clone())
                .or_default()
                .insert(t.name.clone(), known.clone());
            tables.push(known);
        }
        Ok(tables)
    }

    async fn prepared(
        &mut self,
        text: &str,
        table: &TableName,
        step: &Step,
    ) -> Result<Statement, ApplyError> {
        if let Some(s) = self.statements.get(text) {
            return Ok(s.clone());
        }
        let what = match step {
            Step::Change { what, .. } => what,
            _ => "statement",
        };
        let statement =
            self.client
                .prepare(text)
                .await
                .map_err(|source| ApplyError::Statement {
                    table: table.clone(),
                    what,
                    source,
                })?;
        self.statements.insert(text.to_owned(), statement.clone());
        Ok(statement)
    }
}

/// The origin setup's parameters for a batch from `origin` ending with the transaction that
/// ends at `end`, committed at `commit_time`, started at progress `start`.
fn setup_params(end: Lsn, commit_time: i64, start: Lsn, origin: &str) -> Vec<PgText> {
    vec![
        literal(format_lsn(end)),
        literal(commit_time.to_string()),
        literal(format_lsn(start)),
        literal(origin.to_owned()),
    ]
}

/// The end LSN (on `origin`) of the last transaction from `origin` committed here, from the
/// progress record (`pgmm.applied`); 0 when there is none yet.
pub(crate) async fn read_progress(client: &Client, origin: &str) -> Result<Lsn, ApplyError> {
    let progress: Option<String> = client
        .query_opt(
            "SELECT end_lsn::text FROM pgmm.applied WHERE origin = $1",
            &[&origin],
        )
        .await
        .map_err(ApplyError::db("reading the progress record"))?
        .map(|r| r.get(0));
    Ok(progress.as_deref().and_then(parse_lsn).unwrap_or(0))
}

/// How a change may be tried on the fast path (see `Applier::try_fast`).
#[derive(Debug, Clone)]
enum Fast {
    /// A statement that applies the change only when it is no conflict, with the same
    /// parameters as the full one; one row affected means it did. `bulk` does the same for a
    /// group of changes of this shape at once (when the local column types are known).
    Text {
        single: Arc<str>,
        bulk: Option<Arc<str>>,
    },
    /// The full statement is the fast one too (TRUNCATE).
    Same,
    /// Only the full statement will do (a change refused by ownership).
    No,
}

/// One change, planned.
struct Planned {
    /// The full last-writer-wins statement.
    slow: Arc<str>,
    fast: Fast,
    params: Vec<PgText>,
    step: Step,
    /// The table it is reported under (a TRUNCATE's first).
    table: Arc<TableName>,
    /// The rows it changes, as hashes of (table, key values): see [`layers`].
    rows: Vec<u64>,
}

/// The fast attempt's order of a batch's planned changes: layers, in order; within a layer,
/// groups of changes of one bulk statement, each in batch order. A change goes into the first
/// layer after those of every earlier change to one of its rows (for a key change, both keys),
/// so a layer never changes a row twice and each row sees its changes in batch order; changes
/// to distinct rows commute, so nothing else orders them. A TRUNCATE is a barrier: a layer of
/// its own after everything before it.
fn layers(planned: &[Planned]) -> Vec<Vec<Vec<usize>>> {
    let mut done: Vec<Vec<Vec<usize>>> = Vec::new();
    let mut layers: Vec<Vec<Vec<usize>>> = Vec::new();
    // The first layer each row's next change may go into.
    let mut next: HashMap<u64, usize> = HashMap::new();
    for (i, p) in planned.iter().enumerate() {
        let bulk = match &p.fast {
            Fast::Text { bulk, .. } => bulk.as_ref(),
            Fast::Same | Fast::No => {
                done.append(&mut layers);
                done.push(vec![vec![i]]);
                next.clear();
                continue;
            }
        };
        let layer = p
            .rows
            .iter()
            .filter_map(|r| next.get(r))
            .max()
            .copied()
            .unwrap_or(0);
        for r in &p.rows {
            next.insert(*r, layer + 1);
        }
        if layers.len() <= layer {
            layers.resize_with(layer + 1, Vec::new);
        }
        let same_shape = |g: &&mut Vec<usize>| match (&planned[g[0]].fast, bulk) {
            (Fast::Text { bulk: Some(b), .. }, Some(bulk)) => Arc::ptr_eq(b, bulk),
            _ => false,
        };
        match layers[layer].iter_mut().find(same_shape) {
            Some(group) => group.push(i),
            None => layers[layer].push(vec![i]),
        }
    }
    done.append(&mut layers);
    done
}

/// A row's identity in [`layers`]: its table and key values. A collision only puts a change
/// into a later layer than it needs.
fn row_hash<'a>(quoted: &str, key: impl Iterator<Item = &'a Datum>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    quoted.hash(&mut h);
    for d in key {
        match d {
            Datum::Text(b) | Datum::Binary(b) => b.hash(&mut h),
            Datum::Null | Datum::UnchangedToast | Datum::Staged => 0u8.hash(&mut h),
        }
    }
    h.finish()
}

/// Appends `op`, the quoted table and the names to a shape key, the names each followed by
/// U+001F, a control character no real identifier holds.
fn shape_key(key: &mut String, op: char, quoted: &str, names: &[&str]) {
    key.push(op);
    key.push_str(quoted);
    for n in names {
        key.push('\u{1f}');
        key.push_str(n);
    }
    key.push('\u{1f}');
}

/// A replicated table as apply knows it (see `Applier::check_tables`).
#[derive(Clone)]
struct Known {
    name: Arc<TableName>,
    quoted: Arc<str>,
    types: Arc<ColumnTypes>,
}

/// A table's local column types, by column name (see `Applier::column_types`).
type ColumnTypes = HashMap<String, String>;

/// Who applies: what [`plan`] needs besides the change.
struct Planner<'a> {
    origin: &'a str,
    here: &'a str,
    conflict_column: &'a str,
    rules: &'a OwnerRules,
    origins: &'a sql::Origins,
    texts: &'a Texts,
    /// The buffer shape keys are written into (see [`Planner::texts`]).
    shape: std::sync::Mutex<String>,
}

/// Statement texts by the shape of the change, so that the texts of a shape seen before are not
/// built again (they are a few kilobytes each). Only the applier's own task uses it; a Mutex
/// (never contended) rather than a RefCell keeps the applier `Send`. Cleared with the column
/// types, which the bulk texts depend on.
type Texts = std::sync::Mutex<HashMap<String, Shape>>;

/// The texts of one change shape: the full statement and the fast path (single, bulk).
#[derive(Clone)]
struct Shape {
    slow: Arc<str>,
    fast: Fast,
}

impl Planner<'_> {
    /// The texts of the shape that `key` writes, built by `build` the first time: (full, fast
    /// single, fast bulk). The key is written into a reused buffer, so a shape seen before costs
    /// no allocation.
    fn texts(
        &self,
        key: impl FnOnce(&mut String),
        build: impl FnOnce() -> (String, String, Option<String>),
    ) -> (Arc<str>, Fast) {
        let mut buf = self
            .shape
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        buf.clear();
        key(&mut buf);
        let mut texts = self
            .texts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(shape) = texts.get(buf.as_str()) {
            return (shape.slow.clone(), shape.fast.clone());
        }
        let (slow, single, bulk) = build();
        let shape = Shape {
            slow: Arc::from(slow),
            fast: Fast::Text {
                single: Arc::from(single),
                bulk: bulk.map(Arc::from),
            },
        };
        texts.insert(buf.clone(), shape.clone());
        (shape.slow, shape.fast)
    }

    /// The local types of `columns`, if all are known.
    fn column_types<'t>(&self, types: &'t ColumnTypes, columns: &[&str]) -> Option<Vec<&'t str>> {
        columns
            .iter()
            .map(|c| types.get(*c).map(String::as_str))
            .collect()
    }

    fn lww<'b>(&'b self, quoted: &'b str, label: &'b str, table: &TableName) -> sql::Lww<'b> {
        sql::Lww {
            table: quoted,
            label,
            origin: self.origin,
            here: self.here,
            conflict_column: self.conflict_column,
            row_owner: row_owner_sql(self.rules, table),
            origins: self.origins,
        }
    }

    /// Whether the origin may make a change whose new row is `new` (`None` for a delete or a
    /// truncate): table ownership, and row ownership of the new row. The local row's owner is
    /// checked by the statement itself.
    fn may_write(&self, desc: &TableDesc, table: &TableName, new: Option<&[Datum]>) -> bool {
        match self.rules.rule(table) {
            None => true,
            Some(OwnerSpec::Node(owner)) => owner == self.origin,
            Some(OwnerSpec::Column(column) | OwnerSpec::Key(column)) => {
                let Some(new) = new else { return true };
                let value =
                    desc.columns
                        .iter()
                        .position(|c| c == column)
                        .and_then(|i| match &new[i] {
                            Datum::Text(b) => std::str::from_utf8(b).ok(),
                            _ => None,
                        });
                self.rules.row_verdict(self.origin, table, value) == Verdict::Allowed
            }
        }
    }

    /// The statements, values and step of one change of a transaction committed at
    /// `commit_time`, the `tx`-th of its batch.
    fn plan(
        &self,
        set: &ChangeSet,
        tables: &[Known],
        change: &Change,
        commit_time: i64,
        tx: usize,
    ) -> Result<Planned, ApplyError> {
        let (slow, fast, params, step) = self.plan_change(set, tables, change, commit_time, tx)?;
        // plan_change has checked that the change's tables are described, and its widths.
        let Known { name, quoted, .. } = &tables[first_table(change)];
        let desc = &set.tables[first_table(change)];
        let rows = match change {
            Change::Insert { new, .. } => vec![row_hash(quoted, desc.key.iter().map(|&k| &new[k]))],
            Change::Update { old_key, new, .. } => {
                let mut rows = vec![row_hash(quoted, desc.key.iter().map(|&k| &new[k]))];
                rows.extend(old_key.as_ref().map(|old| row_hash(quoted, old.iter())));
                rows
            }
            Change::Delete { key, .. } => vec![row_hash(quoted, key.iter())],
            Change::Truncate { .. } | Change::Ddl { .. } => Vec::new(),
        };
        Ok(Planned {
            slow,
            fast,
            params,
            step,
            table: name.clone(),
            rows,
        })
    }

    fn plan_change(
        &self,
        set: &ChangeSet,
        tables: &[Known],
        change: &Change,
        commit_time: i64,
        tx: usize,
    ) -> Result<(Arc<str>, Fast, Vec<PgText>, Step), ApplyError> {
        match change {
            Change::Insert { table, new } => {
                let (desc, quoted, name, types) = table_at(set, tables, *table)?;
                check_width(desc, new.len())?;
                let columns: Vec<&str> = desc.columns.iter().map(String::as_str).collect();
                let step = Step::Change {
                    table: *table as usize,
                    what: "INSERT",
                    tx,
                };
                if !self.may_write(desc, name, Some(new)) {
                    let (text, params, step) = self.violation(quoted, name, &columns, new, step);
                    return Ok((text.into(), Fast::No, params, step));
                }
                let u = self.conflict_position(desc, name)?;
                let params = new.iter().map(text).collect::<Result<Vec<_>, _>>()?;
                let shape = |k: &mut String| {
                    shape_key(k, 'I', quoted, &columns);
                    let _ = write!(k, "{:?}", desc.key);
                };
                let (text, fast) = self.texts(shape, || {
                    let label = name.to_string();
                    let lww = self.lww(quoted, &label, name);
                    let bulk = self
                        .column_types(types, &columns)
                        .map(|types| lww.insert_bulk(&columns, &desc.key, u, &types));
                    (
                        lww.insert(&columns, &desc.key, u),
                        lww.insert_fast(&columns, &desc.key, u),
                        bulk,
                    )
                });
                Ok((text, fast, params, step))
            }
            Change::Update {
                table,
                old_key,
                new,
                old_stamp,
            } => {
                let (desc, quoted, name, types) = table_at(set, tables, *table)?;
                check_width(desc, new.len())?;
                let step = Step::Change {
                    table: *table as usize,
                    what: "UPDATE",
                    tx,
                };
                if !self.may_write(desc, name, Some(new)) {
                    let columns: Vec<&str> = desc.columns.iter().map(String::as_str).collect();
                    let (text, params, step) = self.violation(quoted, name, &columns, new, step);
                    return Ok((text.into(), Fast::No, params, step));
                }
                // Unchanged TOAST values are left out of SET, which keeps the local value.
                let mut set_columns = Vec::with_capacity(new.len());
                let mut params = Vec::with_capacity(new.len() + desc.key.len());
                let mut u = None;
                for (column, datum) in desc.columns.iter().zip(new) {
                    if *datum != Datum::UnchangedToast {
                        if *column == self.conflict_column {
                            u = Some(set_columns.len());
                        }
                        set_columns.push(column.as_str());
                        params.push(text(datum)?);
                    }
                }
                let Some(u) = u else {
                    return Err(self.no_conflict_column(name));
                };
                let key = key_columns(desc);
                match old_key {
                    Some(old) if old.len() == key.len() => {
                        for d in old {
                            params.push(text(d)?);
                        }
                    }
                    Some(old) => {
                        return Err(ApplyError::Malformed(format!(
                            "an UPDATE of {name} with {} old key values for {} key columns",
                            old.len(),
                            key.len()
                        )))
                    }
                    None => {
                        for &k in &desc.key {
                            params.push(text(&new[k])?);
                        }
                    }
                }
                params.push(PgText(old_stamp.map(|s| Bytes::from(s.to_string()))));
                // A missing row can only be inserted when the change carries all of it.
                let whole = set_columns.len() == desc.columns.len();
                let shape = |k: &mut String| {
                    shape_key(k, 'U', quoted, &set_columns);
                    shape_key(k, 'K', "", &key);
                };
                let (text, fast) = self.texts(shape, || {
                    let label = name.to_string();
                    let lww = self.lww(quoted, &label, name);
                    let typed: Vec<&str> = set_columns.iter().chain(&key).copied().collect();
                    let bulk = self
                        .column_types(types, &typed)
                        .map(|types| lww.update_bulk(&set_columns, &key, &types));
                    (
                        lww.update(&set_columns, &key, u, whole),
                        lww.update_fast(&set_columns, &key),
                        bulk,
                    )
                });
                Ok((text, fast, params, step))
            }
            Change::Delete {
                table,
                key,
                deleted_at,
                old_stamp,
            } => {
                let (desc, quoted, name, types) = table_at(set, tables, *table)?;
                let columns = key_columns(desc);
                if key.len() != columns.len() {
                    return Err(ApplyError::Malformed(format!(
                        "a DELETE of {name} with {} key values for {} key columns",
                        key.len(),
                        columns.len()
                    )));
                }
                let step = Step::Change {
                    table: *table as usize,
                    what: "DELETE",
                    tx,
                };
                if !self.may_write(desc, name, None) {
                    let (text, params, step) = self.violation(quoted, name, &columns, key, step);
                    return Ok((text.into(), Fast::No, params, step));
                }
                let mut params = key.iter().map(text).collect::<Result<Vec<_>, _>>()?;
                // A delete made without pgmm's trigger (before it was installed) carries no
                // stamp: its transaction's commit time is the best there is.
                params.push(literal(deleted_at.unwrap_or(commit_time).to_string()));
                params.push(PgText(old_stamp.map(|s| Bytes::from(s.to_string()))));
                let shape = |k: &mut String| shape_key(k, 'D', quoted, &columns);
                let (text, fast) = self.texts(shape, || {
                    let label = name.to_string();
                    let lww = self.lww(quoted, &label, name);
                    let bulk = self
                        .column_types(types, &columns)
                        .map(|types| lww.delete_bulk(&columns, &types));
                    (lww.delete(&columns), lww.delete_fast(&columns), bulk)
                });
                Ok((text, fast, params, step))
            }
            // Schema changes are cut out of the batch before planning (`chunk_with_ddl`).
            Change::Ddl { .. } => Err(ApplyError::Malformed(
                "a schema change reached the row planner".into(),
            )),
            Change::Truncate {
                tables: which,
                cascade,
                restart_identity,
            } => {
                if which.is_empty() {
                    return Err(ApplyError::Malformed("a TRUNCATE of no table".into()));
                }
                let step = Step::Change {
                    table: which[0] as usize,
                    what: "TRUNCATE",
                    tx,
                };
                let mut names = Vec::with_capacity(which.len());
                for t in which {
                    let (_, quoted, name, _) = table_at(set, tables, *t)?;
                    // Only a table's owner may truncate it; a row-owned table holds other
                    // nodes' rows, so nobody may.
                    let allowed = match self.rules.rule(name) {
                        None => true,
                        Some(OwnerSpec::Node(owner)) => owner == self.origin,
                        Some(_) => false,
                    };
                    if !allowed {
                        let (text, params, step) =
                            self.violation(quoted, name, &["truncate"], &[], step);
                        return Ok((text.into(), Fast::No, params, step));
                    }
                    names.push(quoted.to_owned());
                }
                Ok((
                    sql::truncate(&names, *cascade, *restart_identity).into(),
                    Fast::Same,
                    Vec::new(),
                    step,
                ))
            }
        }
    }

    /// The statement that records a change refused by ownership, instead of the change.
    fn violation(
        &self,
        quoted: &str,
        name: &TableName,
        columns: &[&str],
        values: &[Datum],
        step: Step,
    ) -> (String, Vec<PgText>, Step) {
        let label = name.to_string();
        let text = self.lww(quoted, &label, name).violation(columns);
        let params = columns
            .iter()
            .enumerate()
            .map(|(i, _)| match values.get(i) {
                Some(Datum::Text(b)) => PgText(Some(b.clone())),
                Some(Datum::UnchangedToast) => literal("(unchanged TOAST value)".into()),
                Some(Datum::Binary(_)) => literal("(binary value)".into()),
                Some(Datum::Staged) => literal("(a value staged in pieces)".into()),
                Some(Datum::Null) => PgText(None),
                None => literal("true".into()),
            })
            .collect();
        (text, params, step)
    }

    fn conflict_position(&self, desc: &TableDesc, name: &TableName) -> Result<usize, ApplyError> {
        desc.columns
            .iter()
            .position(|c| c == self.conflict_column)
            .ok_or_else(|| self.no_conflict_column(name))
    }

    fn no_conflict_column(&self, name: &TableName) -> ApplyError {
        ApplyError::Malformed(format!(
            "a change to {name} without the conflict column {}",
            self.conflict_column
        ))
    }
}

/// For a row-owned table, an SQL expression over the local row `l` naming the node that owns it.
fn row_owner_sql(rules: &OwnerRules, table: &TableName) -> Option<String> {
    match rules.rule(table)? {
        OwnerSpec::Node(_) => None,
        OwnerSpec::Column(c) => Some(format!("l.{}::text", escape_identifier(c))),
        OwnerSpec::Key(c) => {
            let nodes = rules.nodes();
            let n = nodes.len();
            let array = nodes
                .iter()
                .map(|x| escape_literal(x))
                .collect::<Vec<_>>()
                .join(", ");
            Some(format!(
                "(ARRAY[{array}]::text[])[pg_catalog.mod(pg_catalog.mod(l.{c}::numeric, {n}) + {n}, {n})::int + 1]",
                c = escape_identifier(c)
            ))
        }
    }
}

fn key_columns(desc: &TableDesc) -> Vec<&str> {
    desc.key.iter().map(|&k| desc.columns[k].as_str()).collect()
}

fn table_at<'a>(
    set: &'a ChangeSet,
    tables: &'a [Known],
    index: u32,
) -> Result<(&'a TableDesc, &'a str, &'a TableName, &'a ColumnTypes), ApplyError> {
    let i = index as usize;
    match (set.tables.get(i), tables.get(i)) {
        (Some(desc), Some(k)) => Ok((desc, &k.quoted, &k.name, &k.types)),
        _ => Err(ApplyError::Malformed(format!(
            "a change refers to table #{index}, which the change set does not describe"
        ))),
    }
}

fn check_width(desc: &TableDesc, got: usize) -> Result<(), ApplyError> {
    if got == desc.columns.len() {
        Ok(())
    } else {
        Err(ApplyError::Malformed(format!(
            "a change to {}.{} has {got} values for {} columns",
            desc.schema,
            desc.name,
            desc.columns.len()
        )))
    }
}

/// The table a change is reported under (a TRUNCATE's first); checked by [`plan`] first.
fn has_ddl(set: &ChangeSet) -> bool {
    set.changes.iter().any(|c| matches!(c, Change::Ddl { .. }))
}

fn first_table(change: &Change) -> usize {
    change.tables().next().unwrap_or(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A planned change for [`layers`]: `shape` names its bulk statement (`None`: none), `rows`
    /// the rows it touches; `truncate` makes it a TRUNCATE.
    fn change(shape: Option<&Arc<str>>, rows: &[u64], truncate: bool) -> Planned {
        let single: Arc<str> = Arc::from("single");
        Planned {
            slow: Arc::from("slow"),
            fast: if truncate {
                Fast::Same
            } else {
                Fast::Text {
                    single,
                    bulk: shape.cloned(),
                }
            },
            params: Vec::new(),
            step: Step::Begin,
            table: Arc::new(TableName::new("public", "t")),
            rows: rows.to_vec(),
        }
    }

    #[test]
    fn layers_keep_each_rows_changes_in_order_and_group_the_rest_by_shape() {
        let (ins, upd): (Arc<str>, Arc<str>) = (Arc::from("ins"), Arc::from("upd"));
        let planned = vec![
            change(Some(&upd), &[1], false),    // 0
            change(Some(&ins), &[2], false),    // 1
            change(Some(&upd), &[3], false),    // 2
            change(Some(&upd), &[2], false),    // 3: row 2 again: layer 1
            change(None, &[5], false),          // 4: no bulk form, a group of its own
            change(Some(&upd), &[2], false),    // 5: row 2 a third time: layer 2
            change(Some(&upd), &[6, 1], false), // 6: a key change from row 1 to 6: layer 1
            change(Some(&ins), &[6], false),    // 7: row 6 again: layer 2
            change(Some(&ins), &[8], false),    // 8: layer 0, beside 1
            change(None, &[], true),            // 9: TRUNCATE, after all of it
            change(Some(&ins), &[1], false),    // 10: layering starts over
        ];
        assert_eq!(
            layers(&planned),
            vec![
                vec![vec![0, 2], vec![1, 8], vec![4]],
                vec![vec![3, 6]],
                vec![vec![5], vec![7]],
                vec![vec![9]],
                vec![vec![10]],
            ]
        );
        assert_eq!(layers(&[]), Vec::<Vec<Vec<usize>>>::new());
    }

    #[test]
    fn a_row_is_its_table_and_key() {
        let k = |s: &'static str| Datum::Text(Bytes::from_static(s.as_bytes()));
        let a = row_hash("\"public\".\"t\"", [k("1"), k("x")].iter());
        assert_eq!(a, row_hash("\"public\".\"t\"", [k("1"), k("x")].iter()));
        assert_ne!(a, row_hash("\"public\".\"u\"", [k("1"), k("x")].iter()));
        assert_ne!(a, row_hash("\"public\".\"t\"", [k("1"), k("y")].iter()));
    }
}
