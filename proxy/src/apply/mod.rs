//! Apply: a peer's transactions written into the local database, each exactly once.
//!
//! One [`Applier`] per origin node owns one session to the local Postgres, set up with
//! `session_replication_role = replica` (local triggers and FK checks behave as for any
//! replica) and the replication origin `pgmm_<origin>`. Each remote transaction becomes one
//! local transaction that starts with `pg_replication_origin_xact_setup(end_lsn, commit_time)`,
//! so the origin's progress commits atomically with the data: after any crash the progress says
//! exactly which remote transactions are in the database, and [`Applier::apply`] skips anything
//! at or below it. That is the exactly-once argument; acks only tell the sender when it may
//! let its slot forget.
//!
//! Throughput: the statements of one transaction are sent as one pipeline (BEGIN, the origin
//! setup and every change, then COMMIT), and commits are asynchronous except the last of a
//! batch, whose synchronous commit makes every earlier one durable too (a WAL flush covers all
//! that precedes it). The receiver acks only after such a synchronous commit.

mod receiver;
pub mod sql;

use std::collections::HashMap;

use bytes::BytesMut;
use futures_util::future::join_all;
use thiserror::Error;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

use crate::changeset::{Change, ChangeSet, TableDesc};
use crate::config::{PostgresConfig, ReplicationConfig};
use crate::metrics::ReplicationMetrics;
use crate::migrate::pg_error_text;
use crate::pgoutput::{format_lsn, parse_lsn, Datum, Lsn};
use crate::table::TableName;

pub use receiver::{OriginProgress, Receiver, HEARTBEAT, LINK_SILENCE};

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
}

impl ApplyError {
    /// The server's SQLSTATE for database failures (e.g. 42703 for a column missing here);
    /// `55006` for a busy origin, `55000` for an unreplicated table, `08P01` for bad input.
    pub fn sqlstate(&self) -> String {
        match self {
            ApplyError::Connect(_) => "08006".into(),
            ApplyError::OriginBusy { .. } => "55006".into(),
            ApplyError::NotReplicated { .. } => "55000".into(),
            ApplyError::Statement { source, .. } | ApplyError::Database { source, .. } => source
                .code()
                .map_or_else(|| "08006".into(), |c| c.code().to_owned()),
            ApplyError::Malformed(_) => "08P01".into(),
        }
    }

    fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
        move |source| ApplyError::Database { what, source }
    }
}

/// A value in Postgres's text format, whatever the parameter's type: the server parses it, as
/// it would a literal. NULL is `None`.
#[derive(Debug, Clone, Copy)]
struct PgText<'a>(Option<&'a [u8]>);

impl ToSql for PgText<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
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

fn text(d: &Datum) -> Result<PgText<'_>, ApplyError> {
    match d {
        Datum::Null => Ok(PgText(None)),
        Datum::Text(b) => Ok(PgText(Some(b))),
        Datum::UnchangedToast => Err(ApplyError::Malformed(
            "an unchanged TOAST value where a value is required".into(),
        )),
        Datum::Binary(_) => Err(ApplyError::Malformed(
            "a binary value (pgmm streams text)".into(),
        )),
    }
}

/// What one change did, for conflict detection: INSERT, UPDATE and DELETE touch one row or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

/// One planned statement: which prepared text, with which values.
struct Planned<'a> {
    change: usize,
    op: Op,
    statement: Statement,
    params: Vec<PgText<'a>>,
}

/// The outcome of [`Applier::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// Row changes applied (conflicting ones included, as they were resolved).
    pub changes: usize,
    pub conflicts: usize,
    /// The transaction was at or below the origin's progress: already applied, skipped.
    pub duplicate: bool,
}

/// One origin's apply session.
pub struct Applier {
    origin_node: String,
    client: Client,
    replication: ReplicationConfig,
    metrics: ReplicationMetrics,
    statements: HashMap<String, Statement>,
    begin: Statement,
    setup: Statement,
    sync_commit: Statement,
    commit: Statement,
    record_conflict: Statement,
    progress: Lsn,
}

impl Applier {
    /// Opens the session and takes the origin; fails with [`ApplyError::OriginBusy`] while a
    /// previous session still holds it.
    pub async fn connect(
        pg: &PostgresConfig,
        origin_node: &str,
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
                 SET application_name = {}",
                postgres_protocol::escape::escape_literal(&format!(
                    "pgmm apply from {origin_node}"
                ))
            ))
            .await
            .map_err(ApplyError::db("setting up the apply session"))?;
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
        let progress: Option<String> = client
            .query_one(
                "SELECT pg_replication_origin_session_progress(false)::text",
                &[],
            )
            .await
            .map_err(ApplyError::db("reading the origin's progress"))?
            .get(0);
        let progress = progress.as_deref().and_then(parse_lsn).unwrap_or(0);
        let prepare = |sql: &'static str| {
            let client = &client;
            async move {
                client
                    .prepare(sql)
                    .await
                    .map_err(ApplyError::db("preparing apply statements"))
            }
        };
        let begin = prepare("BEGIN").await?;
        let setup = prepare(
            "SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, \
             timestamptz '2000-01-01 00:00:00+00' + $2::text::bigint * interval '1 microsecond')",
        )
        .await?;
        let sync_commit = prepare("SET LOCAL synchronous_commit = on").await?;
        let commit = prepare("COMMIT").await?;
        let record_conflict = prepare(
            "INSERT INTO pgmm.conflicts \
             (table_name, kind, origin, local_tuple, remote_tuple, resolution) \
             VALUES ($1, $2, $3, $4::text::jsonb, jsonb_object($5::text[], $6::text[]), $7)",
        )
        .await?;
        tracing::info!(origin = %origin_node, progress = %format_lsn(progress), "apply session ready");
        Ok(Applier {
            origin_node: origin_node.to_owned(),
            client,
            replication,
            metrics,
            statements: HashMap::new(),
            begin,
            setup,
            sync_commit,
            commit,
            record_conflict,
            progress,
        })
    }

    /// The end LSN (on the origin) of the last remote transaction committed here.
    pub fn progress(&self) -> Lsn {
        self.progress
    }

    /// Whether the session is gone; the caller then opens a new [`Applier`].
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Applies one remote transaction as one local transaction. With `sync`, its commit waits
    /// for the WAL flush, which makes it and every earlier one durable: only then may they be
    /// acknowledged.
    pub async fn apply(
        &mut self,
        end_lsn: Lsn,
        commit_time: i64,
        set: &ChangeSet,
        sync: bool,
    ) -> Result<Applied, ApplyError> {
        if end_lsn <= self.progress {
            return Ok(Applied {
                duplicate: true,
                ..Applied::default()
            });
        }
        let result = self.apply_inner(end_lsn, commit_time, set, sync).await;
        match result {
            Ok(applied) => {
                self.progress = end_lsn;
                Ok(applied)
            }
            Err(e) => {
                // The transaction may be open and aborted; the statements may no longer fit a
                // table whose definition changed. Start both over.
                let _ = self.client.batch_execute("ROLLBACK").await;
                self.statements.clear();
                Err(e)
            }
        }
    }

    async fn apply_inner(
        &mut self,
        end_lsn: Lsn,
        commit_time: i64,
        set: &ChangeSet,
        sync: bool,
    ) -> Result<Applied, ApplyError> {
        let tables = self.check_tables(set)?;
        let planned = self.plan(set, &tables).await?;
        let lsn_text = format_lsn(end_lsn);
        let time_text = commit_time.to_string();
        let head = [
            (&self.begin, Vec::new()),
            (
                &self.setup,
                vec![
                    PgText(Some(lsn_text.as_bytes())),
                    PgText(Some(time_text.as_bytes())),
                ],
            ),
        ];
        let futures = head
            .into_iter()
            .chain(planned.iter().map(|p| (&p.statement, p.params.clone())))
            .map(|(statement, params)| self.client.execute_raw(statement, params));
        let results = join_all(futures).await;
        let mut rows = Vec::with_capacity(planned.len());
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(n) => rows.push(n),
                Err(source) if i < 2 => {
                    return Err(ApplyError::Database {
                        what: "starting the transaction under the replication origin",
                        source,
                    })
                }
                Err(source) => {
                    let p = &planned[i - 2];
                    return Err(ApplyError::Statement {
                        table: tables[first_table(&set.changes[p.change])].0.clone(),
                        what: op_name(p.op),
                        source,
                    });
                }
            }
        }
        let mut conflicts = 0;
        for (p, n) in planned.iter().zip(&rows[2..]) {
            if *n == 0 && p.op != Op::Truncate {
                self.record_conflict(set, &tables, p).await?;
                conflicts += 1;
            }
        }
        if sync {
            let (a, b) = tokio::join!(
                self.client
                    .execute_raw(&self.sync_commit, Vec::<PgText>::new()),
                self.client.execute_raw(&self.commit, Vec::<PgText>::new())
            );
            a.and(b).map_err(ApplyError::db("committing"))?;
        } else {
            self.client
                .execute_raw(&self.commit, Vec::<PgText>::new())
                .await
                .map_err(ApplyError::db("committing"))?;
        }
        Ok(Applied {
            changes: set.changes.len(),
            conflicts,
            duplicate: false,
        })
    }

    /// Each table's name and quoted name, after checking it replicates here.
    fn check_tables(&self, set: &ChangeSet) -> Result<Vec<(TableName, String)>, ApplyError> {
        set.tables
            .iter()
            .map(|t| {
                let name = t.table_name();
                if !self.replication.matches(&name) {
                    return Err(ApplyError::NotReplicated { table: name });
                }
                Ok((name, sql::qualified(&t.schema, &t.name)))
            })
            .collect()
    }

    /// The statement and values of every change, preparing statements not seen before.
    async fn plan<'s>(
        &mut self,
        set: &'s ChangeSet,
        tables: &[(TableName, String)],
    ) -> Result<Vec<Planned<'s>>, ApplyError> {
        let mut planned = Vec::with_capacity(set.changes.len());
        for (i, change) in set.changes.iter().enumerate() {
            let (op, text, params) = match change {
                Change::Insert { table, new } => {
                    let (desc, quoted) = table_at(set, tables, *table)?;
                    let columns: Vec<&str> = desc.columns.iter().map(String::as_str).collect();
                    check_width(desc, new.len())?;
                    let params = new.iter().map(text).collect::<Result<Vec<_>, _>>()?;
                    (Op::Insert, sql::insert(quoted, &columns), params)
                }
                Change::Update {
                    table,
                    old_key,
                    new,
                } => {
                    let (desc, quoted) = table_at(set, tables, *table)?;
                    check_width(desc, new.len())?;
                    // Unchanged TOAST values are left out of SET, which keeps the local value.
                    let mut set_columns = Vec::with_capacity(new.len());
                    let mut params = Vec::with_capacity(new.len() + desc.key.len());
                    for (column, datum) in desc.columns.iter().zip(new) {
                        if *datum != Datum::UnchangedToast {
                            set_columns.push(column.as_str());
                            params.push(text(datum)?);
                        }
                    }
                    let key = key_columns(desc);
                    match old_key {
                        Some(old) => {
                            for d in old {
                                params.push(text(d)?);
                            }
                        }
                        None => {
                            for &k in &desc.key {
                                params.push(text(&new[k])?);
                            }
                        }
                    }
                    if set_columns.is_empty() || params.len() != set_columns.len() + key.len() {
                        return Err(ApplyError::Malformed(format!(
                            "an UPDATE of {} without values or key",
                            tables[*table as usize].0
                        )));
                    }
                    (Op::Update, sql::update(quoted, &set_columns, &key), params)
                }
                Change::Delete { table, key } => {
                    let (desc, quoted) = table_at(set, tables, *table)?;
                    let columns = key_columns(desc);
                    if key.len() != columns.len() || columns.is_empty() {
                        return Err(ApplyError::Malformed(format!(
                            "a DELETE of {} with {} key values for {} key columns",
                            tables[*table as usize].0,
                            key.len(),
                            columns.len()
                        )));
                    }
                    let params = key.iter().map(text).collect::<Result<Vec<_>, _>>()?;
                    (Op::Delete, sql::delete(quoted, &columns), params)
                }
                Change::Truncate {
                    tables: which,
                    cascade,
                    restart_identity,
                } => {
                    if which.is_empty() {
                        return Err(ApplyError::Malformed("a TRUNCATE of no table".into()));
                    }
                    let names = which
                        .iter()
                        .map(|t| table_at(set, tables, *t).map(|(_, q)| q.to_owned()))
                        .collect::<Result<Vec<_>, _>>()?;
                    (
                        Op::Truncate,
                        sql::truncate(&names, *cascade, *restart_identity),
                        Vec::new(),
                    )
                }
            };
            let statement = self
                .prepared(&text, &tables[first_table(change)].0, op)
                .await?;
            planned.push(Planned {
                change: i,
                op,
                statement,
                params,
            });
        }
        Ok(planned)
    }

    async fn prepared(
        &mut self,
        text: &str,
        table: &TableName,
        op: Op,
    ) -> Result<Statement, ApplyError> {
        if let Some(s) = self.statements.get(text) {
            return Ok(s.clone());
        }
        let statement =
            self.client
                .prepare(text)
                .await
                .map_err(|source| ApplyError::Statement {
                    table: table.clone(),
                    what: op_name(op),
                    source,
                })?;
        self.statements.insert(text.to_owned(), statement.clone());
        Ok(statement)
    }

    /// Records a change that found no row to update or delete, or an insert whose key exists,
    /// in the same transaction as the data, so the log and the data never disagree.
    async fn record_conflict(
        &mut self,
        set: &ChangeSet,
        tables: &[(TableName, String)],
        p: &Planned<'_>,
    ) -> Result<(), ApplyError> {
        let change = &set.changes[p.change];
        let (table, quoted) = &tables[first_table(change)];
        let desc = &set.tables[first_table(change)];
        let (kind, resolution, remote): (&str, &str, Vec<(&str, &Datum)>) = match change {
            Change::Insert { new, .. } => ("insert_exists", "keep_local", named(desc, new)),
            Change::Update { new, .. } => ("update_missing", "skip", named(desc, new)),
            Change::Delete { key, .. } => (
                "delete_missing",
                "skip",
                desc.key
                    .iter()
                    .map(|&k| desc.columns[k].as_str())
                    .zip(key)
                    .collect(),
            ),
            Change::Truncate { .. } => return Ok(()),
        };
        let local: Option<String> = if p.op == Op::Insert {
            let key = key_columns(desc);
            let text = sql::local_row(quoted, &key);
            let statement = self.prepared(&text, table, Op::Insert).await?;
            let params: Vec<PgText> = match change {
                Change::Insert { new, .. } => {
                    desc.key.iter().map(|&k| text_or_null(&new[k])).collect()
                }
                _ => Vec::new(),
            };
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            self.client
                .query_opt(&statement, &refs)
                .await
                .map_err(ApplyError::db("reading the local row of a conflict"))?
                .and_then(|row| row.get(0))
        } else {
            None
        };
        let names: Vec<&str> = remote.iter().map(|(n, _)| *n).collect();
        let values: Vec<Option<&str>> = remote
            .iter()
            .map(|(_, d)| match d {
                Datum::Text(b) => std::str::from_utf8(b).ok(),
                _ => None,
            })
            .collect();
        let table_text = table.to_string();
        self.client
            .execute(
                &self.record_conflict,
                &[
                    &table_text,
                    &kind,
                    &self.origin_node,
                    &local,
                    &names,
                    &values,
                    &resolution,
                ],
            )
            .await
            .map_err(ApplyError::db("recording a conflict"))?;
        self.metrics
            .conflicts
            .with_label_values(&[&table_text, kind, resolution])
            .inc();
        tracing::info!(
            origin = %self.origin_node,
            table = %table_text,
            kind,
            resolution,
            "conflict recorded in pgmm.conflicts"
        );
        Ok(())
    }
}

fn text_or_null(d: &Datum) -> PgText<'_> {
    text(d).unwrap_or(PgText(None))
}

/// Column names paired with values, unchanged TOAST values left out (they are not known here).
fn named<'a>(desc: &'a TableDesc, row: &'a [Datum]) -> Vec<(&'a str, &'a Datum)> {
    desc.columns
        .iter()
        .map(String::as_str)
        .zip(row)
        .filter(|(_, d)| **d != Datum::UnchangedToast)
        .collect()
}

fn key_columns(desc: &TableDesc) -> Vec<&str> {
    desc.key.iter().map(|&k| desc.columns[k].as_str()).collect()
}

fn table_at<'a>(
    set: &'a ChangeSet,
    tables: &'a [(TableName, String)],
    index: u32,
) -> Result<(&'a TableDesc, &'a str), ApplyError> {
    let i = index as usize;
    match (set.tables.get(i), tables.get(i)) {
        (Some(desc), Some((_, quoted))) if desc.key.iter().all(|&k| k < desc.columns.len()) => {
            Ok((desc, quoted))
        }
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

/// The table a change is reported under (a TRUNCATE's first); validated by `plan` first.
fn first_table(change: &Change) -> usize {
    change.tables().next().unwrap_or(0) as usize
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Insert => "INSERT",
        Op::Update => "UPDATE",
        Op::Delete => "DELETE",
        Op::Truncate => "TRUNCATE",
    }
}
