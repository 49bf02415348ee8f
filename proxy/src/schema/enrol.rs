//! Enrolment: which tables replicate, checked against what LWW needs, and kept in publication
//! `pgmm`, the one publication every capture slot streams.
//!
//! The set is recomputed from the catalog each time (at start, after DDL, periodically) rather
//! than tracked incrementally, so that a missed event costs one period of delay and never a
//! wrong publication. Tables are compared by oid, so a renamed table is neither re-added nor
//! dropped. A matching table without a primary key or without the conflict column is an error,
//! not a silent skip: replicating it would make apply unable to find rows or to order versions,
//! and the operator must decide whether to fix the table or exclude it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use postgres_protocol::escape::escape_identifier;
use thiserror::Error;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient};

use crate::config::table::TableName;
use crate::config::ReplicationConfig;
use crate::pg::pg_error_text;
use crate::pg::quote::{readable_ident, readable_table};
use crate::pg::SqlState;

pub use crate::pg::names::PUBLICATION;

/// Schemas that are never enrolled, whatever the patterns say: pgmm's own per-node bookkeeping
/// and the system catalogs (whose tables have no primary keys and cannot be published anyway).
const EXCLUDED_SCHEMAS: [&str; 3] = ["pgmm", "pg_catalog", "information_schema"];

/// Key of the advisory lock that serialises publication changes ("pgmmpubl"), so that two
/// nodes' periodic checks against one database never both try to create the publication.
const LOCK_KEY: i64 = 0x7067_6d6d_7075_626c;

/// A table that replicates, as the catalog described it when enrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledTable {
    pub name: TableName,
    pub oid: u32,
    /// Primary key columns in key order; never empty.
    pub key_columns: Vec<String>,
    /// Every live column in attribute order, with its type as `format_type` spells it
    /// (e.g. `timestamp with time zone`, `character varying(20)`).
    pub columns: Vec<(String, String)>,
}

/// What [`sync_publication`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublicationChange {
    /// The publication did not exist and was created.
    pub created: bool,
    pub added: Vec<TableName>,
    pub removed: Vec<TableName>,
}

impl PublicationChange {
    pub fn is_empty(&self) -> bool {
        !self.created && self.added.is_empty() && self.removed.is_empty()
    }
}

impl fmt::Display for PublicationChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |tables: &[TableName]| {
            tables
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if self.created {
            parts.push(format!("created publication {PUBLICATION}"));
        }
        if !self.added.is_empty() {
            parts.push(format!("added {}", list(&self.added)));
        }
        if !self.removed.is_empty() {
            parts.push(format!("removed {}", list(&self.removed)));
        }
        if parts.is_empty() {
            write!(f, "publication {PUBLICATION} unchanged")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

/// Why the replicated set could not be determined or published.
#[derive(Debug, Error)]
pub enum EnrolError {
    #[error(
        "table {table} has no primary key: add one (ALTER TABLE {} ADD PRIMARY KEY (...)) \
         or exclude it from [replication] tables",
        readable_table(.table)
    )]
    NoPrimaryKey { table: TableName },
    #[error(
        "table {table} has no conflict column {column}: add it (ALTER TABLE {} ADD COLUMN {} \
         timestamptz NOT NULL DEFAULT now()) or exclude the table from [replication] tables",
        readable_table(.table),
        readable_ident(.column)
    )]
    MissingConflictColumn { table: TableName, column: String },
    #[error(
        "table {table}: conflict column {column} is {found}, but it must be timestamptz: \
         ALTER TABLE {} ALTER COLUMN {} TYPE timestamptz (or exclude the table from \
         [replication] tables)",
        readable_table(.table),
        readable_ident(.column)
    )]
    WrongConflictColumnType {
        table: TableName,
        column: String,
        found: String,
    },
    #[error(
        "publication {PUBLICATION} exists and is FOR ALL TABLES, which would replicate schema \
         pgmm too: drop it (DROP PUBLICATION {PUBLICATION}) and let pgmm create it"
    )]
    PublicationForAllTables,
    #[error("reading the catalog or changing publication {PUBLICATION} failed: {}", pg_error_text(.0))]
    Database(#[from] tokio_postgres::Error),
}

impl SqlState for EnrolError {
    /// `55000` (object_not_in_prerequisite_state) for a table or publication that must be fixed
    /// by the operator; `08006` for a lost connection, `58000` for another server error.
    fn sqlstate(&self) -> &str {
        match self {
            EnrolError::Database(e) if e.is_closed() => "08006",
            EnrolError::Database(_) => "58000",
            _ => "55000",
        }
    }
}

impl EnrolError {
    /// The table the error is about, if it is about one.
    pub fn table(&self) -> Option<&TableName> {
        match self {
            EnrolError::NoPrimaryKey { table }
            | EnrolError::MissingConflictColumn { table, .. }
            | EnrolError::WrongConflictColumnType { table, .. } => Some(table),
            _ => None,
        }
    }
}

/// One candidate from the catalog: a permanent ordinary or partitioned table outside the
/// excluded schemas.
#[derive(Debug, Clone)]
struct Candidate {
    oid: u32,
    name: TableName,
    /// Partition ancestors (empty unless the table is a partition).
    ancestors: Vec<u32>,
}

/// A matched table's shape, before the checks.
#[derive(Debug, Clone)]
struct TableShape {
    oid: u32,
    name: TableName,
    key_columns: Vec<String>,
    /// (name, format_type, type oid)
    columns: Vec<(String, String, u32)>,
}

/// The tables matching `config`, each checked for a primary key and a `timestamptz` conflict
/// column; sorted by name. The first table (by name) that fails a check is the error.
///
/// Unlogged and temporary tables are skipped: Postgres cannot publish them. A partition is
/// skipped when one of its ancestors is enrolled, since publishing the partitioned table already
/// publishes its partitions.
pub async fn enrolled_tables(
    client: &impl GenericClient,
    config: &ReplicationConfig,
) -> Result<Vec<EnrolledTable>, EnrolError> {
    checked_tables(client, config).await?.into_iter().collect()
}

/// Every matching table with its own verdict, sorted by name: what a running node uses, so
/// that one table created without a primary key does not hold up the enrolment of the others.
pub async fn checked_tables(
    client: &impl GenericClient,
    config: &ReplicationConfig,
) -> Result<Vec<Result<EnrolledTable, EnrolError>>, EnrolError> {
    let excluded: Vec<&str> = EXCLUDED_SCHEMAS.to_vec();
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, \
                    CASE WHEN c.relispartition \
                         THEN ARRAY(SELECT a.relid::oid FROM pg_catalog.pg_partition_ancestors(c.oid) a \
                                    WHERE a.relid <> c.oid) \
                         ELSE '{}'::oid[] END \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p' \
               AND n.nspname <> ALL ($1::text[]) \
               AND n.nspname !~ '^pg_(toast|temp_)'",
            &[&excluded],
        )
        .await?;
    let candidates: Vec<Candidate> = rows
        .iter()
        .map(|row| Candidate {
            oid: row.get(0),
            name: TableName::new(row.get::<_, String>(1), row.get::<_, String>(2)),
            ancestors: row.get(3),
        })
        .collect();
    let selected = select(&candidates, config);
    if selected.is_empty() {
        return Ok(Vec::new());
    }
    // One statement, so the shapes are one consistent snapshot; a table dropped since the first
    // query is simply absent, and a renamed one is matched again under its new name.
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, \
                    ARRAY(SELECT a.attname::text \
                          FROM pg_catalog.pg_constraint con \
                          CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord) \
                          JOIN pg_catalog.pg_attribute a \
                            ON a.attrelid = con.conrelid AND a.attnum = k.attnum \
                          WHERE con.conrelid = c.oid AND con.contype = 'p' \
                          ORDER BY k.ord), \
                    ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a \
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                          ORDER BY a.attnum), \
                    ARRAY(SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) \
                          FROM pg_catalog.pg_attribute a \
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                          ORDER BY a.attnum), \
                    ARRAY(SELECT a.atttypid FROM pg_catalog.pg_attribute a \
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                          ORDER BY a.attnum) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = ANY ($1::oid[])",
            &[&selected],
        )
        .await?;
    let mut shapes: Vec<TableShape> = rows
        .iter()
        .map(|row| {
            let names: Vec<String> = row.get(4);
            let types: Vec<String> = row.get(5);
            let type_oids: Vec<u32> = row.get(6);
            TableShape {
                oid: row.get(0),
                name: TableName::new(row.get::<_, String>(1), row.get::<_, String>(2)),
                key_columns: row.get(3),
                columns: names
                    .into_iter()
                    .zip(types)
                    .zip(type_oids)
                    .map(|((n, t), o)| (n, t, o))
                    .collect(),
            }
        })
        .filter(|shape| config.matches(&shape.name))
        .collect();
    shapes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(shapes
        .into_iter()
        .map(|shape| check(shape, &config.conflict_column))
        .collect())
}

/// Oids of the candidates that match, minus partitions of a matching ancestor; sorted.
fn select(candidates: &[Candidate], config: &ReplicationConfig) -> Vec<u32> {
    let matched: BTreeSet<u32> = candidates
        .iter()
        .filter(|c| config.matches(&c.name) && !EXCLUDED_SCHEMAS.contains(&c.name.schema.as_str()))
        .map(|c| c.oid)
        .collect();
    candidates
        .iter()
        .filter(|c| matched.contains(&c.oid) && !c.ancestors.iter().any(|a| matched.contains(a)))
        .map(|c| c.oid)
        .collect::<BTreeSet<u32>>()
        .into_iter()
        .collect()
}

/// A primary key, then the conflict column, present and of type `timestamptz`.
fn check(shape: TableShape, conflict_column: &str) -> Result<EnrolledTable, EnrolError> {
    if shape.key_columns.is_empty() {
        return Err(EnrolError::NoPrimaryKey { table: shape.name });
    }
    match shape.columns.iter().find(|(n, _, _)| n == conflict_column) {
        None => {
            return Err(EnrolError::MissingConflictColumn {
                table: shape.name,
                column: conflict_column.to_owned(),
            })
        }
        Some((_, found, type_oid)) if *type_oid != Type::TIMESTAMPTZ.oid() => {
            return Err(EnrolError::WrongConflictColumnType {
                table: shape.name,
                column: conflict_column.to_owned(),
                found: found.clone(),
            })
        }
        Some(_) => {}
    }
    Ok(EnrolledTable {
        name: shape.name,
        oid: shape.oid,
        key_columns: shape.key_columns,
        columns: shape.columns.into_iter().map(|(n, t, _)| (n, t)).collect(),
    })
}

/// Makes publication `pgmm` hold exactly `tables`: creates it if missing, adds the tables it
/// lacks and drops the ones it has but should not (including anything in schema `pgmm` that was
/// put there by hand). One transaction, under an advisory lock. A table dropped since it was
/// enrolled is skipped; the next enrolment will not list it.
pub async fn sync_publication(
    client: &mut Client,
    tables: &[EnrolledTable],
) -> Result<PublicationChange, EnrolError> {
    let tx = client.transaction().await?;
    let change = sync_publication_in(&tx, tables).await?;
    tx.commit().await?;
    if !change.is_empty() {
        tracing::info!(%change, "publication {PUBLICATION} updated");
    }
    Ok(change)
}

/// [`sync_publication`] inside the caller's open transaction (apply, right after a schema
/// change, so that the publication changes with it).
pub async fn sync_publication_in(
    tx: &impl GenericClient,
    tables: &[EnrolledTable],
) -> Result<PublicationChange, EnrolError> {
    tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({LOCK_KEY})"))
        .await?;
    let wanted: Vec<u32> = tables
        .iter()
        .filter(|t| !EXCLUDED_SCHEMAS.contains(&t.name.schema.as_str()))
        .map(|t| t.oid)
        .collect();
    // Current names, by oid: a table renamed since enrolment is addressed by its new name.
    let existing: BTreeMap<u32, TableName> = tx
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = ANY ($1::oid[])",
            &[&wanted],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), table_name(row, 1)))
        .collect();
    let publication = tx
        .query_opt(
            "SELECT oid, puballtables FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&PUBLICATION],
        )
        .await?;
    let change = match publication {
        None => {
            let added: Vec<TableName> = existing.values().cloned().collect();
            tx.batch_execute(&create_publication_sql(&added)).await?;
            PublicationChange {
                created: true,
                added,
                removed: Vec::new(),
            }
        }
        Some(row) if row.get::<_, bool>(1) => return Err(EnrolError::PublicationForAllTables),
        Some(row) => {
            let pub_oid: u32 = row.get(0);
            let members: BTreeMap<u32, TableName> = tx
                .query(
                    "SELECT c.oid, n.nspname::text, c.relname::text \
                     FROM pg_catalog.pg_publication_rel pr \
                     JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     WHERE pr.prpubid = $1",
                    &[&pub_oid],
                )
                .await?
                .iter()
                .map(|row| (row.get(0), table_name(row, 1)))
                .collect();
            let (added, removed) = diff(&existing, &members);
            for sql in alter_publication_sql(&added, &removed) {
                tx.batch_execute(&sql).await?;
            }
            PublicationChange {
                created: false,
                added,
                removed,
            }
        }
    };
    Ok(change)
}

/// [`enrolled_tables`] then [`sync_publication`]: the whole enrolment step.
pub async fn enrol(
    client: &mut Client,
    config: &ReplicationConfig,
) -> Result<(Vec<EnrolledTable>, PublicationChange), EnrolError> {
    let tables = enrolled_tables(&*client, config).await?;
    let change = sync_publication(client, &tables).await?;
    Ok((tables, change))
}

fn table_name(row: &tokio_postgres::Row, first: usize) -> TableName {
    TableName::new(row.get::<_, String>(first), row.get::<_, String>(first + 1))
}

/// (to add, to remove), each sorted by name.
fn diff(
    wanted: &BTreeMap<u32, TableName>,
    members: &BTreeMap<u32, TableName>,
) -> (Vec<TableName>, Vec<TableName>) {
    let mut added: Vec<TableName> = wanted
        .iter()
        .filter(|(oid, _)| !members.contains_key(oid))
        .map(|(_, t)| t.clone())
        .collect();
    let mut removed: Vec<TableName> = members
        .iter()
        .filter(|(oid, _)| !wanted.contains_key(oid))
        .map(|(_, t)| t.clone())
        .collect();
    added.sort();
    removed.sort();
    (added, removed)
}

/// `ONLY` everywhere: without it, adding a table with inheritance children would add the
/// children too (partitions of a partitioned table are published implicitly either way).
fn table_list(tables: &[TableName]) -> String {
    tables
        .iter()
        .map(|t| {
            format!(
                "ONLY {}.{}",
                escape_identifier(&t.schema),
                escape_identifier(&t.name)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn create_publication_sql(tables: &[TableName]) -> String {
    let name = escape_identifier(PUBLICATION);
    if tables.is_empty() {
        format!("CREATE PUBLICATION {name}")
    } else {
        format!("CREATE PUBLICATION {name} FOR TABLE {}", table_list(tables))
    }
}

fn alter_publication_sql(added: &[TableName], removed: &[TableName]) -> Vec<String> {
    let name = escape_identifier(PUBLICATION);
    let mut statements = Vec::new();
    if !removed.is_empty() {
        statements.push(format!(
            "ALTER PUBLICATION {name} DROP TABLE {}",
            table_list(removed)
        ));
    }
    if !added.is_empty() {
        statements.push(format!(
            "ALTER PUBLICATION {name} ADD TABLE {}",
            table_list(added)
        ));
    }
    statements
}

/// An identifier as an operator would type it in the suggested fix: bare when Postgres would
/// read it back unchanged, quoted otherwise.
#[cfg(test)]
mod tests {
    use super::*;

    fn config(patterns: &[&str]) -> ReplicationConfig {
        ReplicationConfig {
            tables: patterns.iter().map(|p| p.to_string()).collect(),
            conflict_column: "updated_at".into(),
            ..ReplicationConfig::default()
        }
    }

    fn candidate(oid: u32, schema: &str, name: &str, ancestors: &[u32]) -> Candidate {
        Candidate {
            oid,
            name: TableName::new(schema, name),
            ancestors: ancestors.to_vec(),
        }
    }

    fn shape(columns: &[(&str, &str, u32)], key: &[&str]) -> TableShape {
        TableShape {
            oid: 42,
            name: TableName::new("public", "x"),
            key_columns: key.iter().map(|k| k.to_string()).collect(),
            columns: columns
                .iter()
                .map(|(n, t, o)| (n.to_string(), t.to_string(), *o))
                .collect(),
        }
    }

    const TSTZ: (&str, &str, u32) = ("updated_at", "timestamp with time zone", 1184);

    #[test]
    fn select_applies_patterns_and_never_pgmm() {
        let candidates = [
            candidate(1, "public", "a", &[]),
            candidate(2, "sales", "b", &[]),
            candidate(3, "pgmm", "conflicts", &[]),
        ];
        assert_eq!(select(&candidates, &config(&["public.*"])), vec![1]);
        assert_eq!(select(&candidates, &config(&["*.*"])), vec![1, 2]);
        assert_eq!(select(&candidates, &config(&["*.b"])), vec![2]);
        assert!(select(&candidates, &config(&[])).is_empty());
    }

    #[test]
    fn partitions_of_an_enrolled_table_are_left_to_it() {
        let candidates = [
            candidate(10, "public", "parted", &[]),
            candidate(11, "public", "parted_1", &[10]),
            candidate(12, "other", "child", &[10]),
            candidate(13, "other", "orphan", &[99]),
        ];
        assert_eq!(select(&candidates, &config(&["public.*"])), vec![10]);
        assert_eq!(select(&candidates, &config(&["other.*"])), vec![12, 13]);
        assert_eq!(
            select(&candidates, &config(&["other.*", "public.parted"])),
            vec![10, 13]
        );
    }

    #[test]
    fn check_accepts_a_good_table() {
        let table = check(shape(&[("id", "integer", 23), TSTZ], &["id"]), "updated_at").unwrap();
        assert_eq!(table.key_columns, vec!["id"]);
        assert_eq!(
            table.columns,
            vec![
                ("id".to_string(), "integer".to_string()),
                (
                    "updated_at".to_string(),
                    "timestamp with time zone".to_string()
                )
            ]
        );
    }

    #[test]
    fn check_refuses_without_primary_key() {
        let err = check(shape(&[("id", "integer", 23), TSTZ], &[]), "updated_at").unwrap_err();
        assert!(matches!(err, EnrolError::NoPrimaryKey { .. }));
        assert_eq!(
            err.to_string(),
            "table public.x has no primary key: add one (ALTER TABLE public.x ADD PRIMARY KEY \
             (...)) or exclude it from [replication] tables"
        );
        assert_eq!(err.sqlstate(), "55000");
    }

    #[test]
    fn check_refuses_without_conflict_column() {
        let err = check(shape(&[("id", "integer", 23)], &["id"]), "updated_at").unwrap_err();
        assert!(matches!(err, EnrolError::MissingConflictColumn { .. }));
        let text = err.to_string();
        assert!(
            text.contains(
                "ALTER TABLE public.x ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now()"
            ),
            "{text}"
        );
    }

    #[test]
    fn check_refuses_a_conflict_column_of_another_type() {
        let err = check(
            shape(
                &[
                    ("id", "integer", 23),
                    ("updated_at", "timestamp without time zone", 1114),
                ],
                &["id"],
            ),
            "updated_at",
        )
        .unwrap_err();
        match &err {
            EnrolError::WrongConflictColumnType { found, column, .. } => {
                assert_eq!(found, "timestamp without time zone");
                assert_eq!(column, "updated_at");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err
            .to_string()
            .contains("ALTER TABLE public.x ALTER COLUMN updated_at TYPE timestamptz"));
    }

    #[test]
    fn publication_statements_quote_every_name() {
        let tables = [
            TableName::new("public", "a"),
            TableName::new("My Schema", "b\"c"),
        ];
        assert_eq!(create_publication_sql(&[]), "CREATE PUBLICATION \"pgmm\"");
        assert_eq!(
            create_publication_sql(&tables),
            "CREATE PUBLICATION \"pgmm\" FOR TABLE ONLY \"public\".\"a\", ONLY \"My Schema\".\"b\"\"c\""
        );
        assert_eq!(
            alter_publication_sql(&tables[..1], &tables[1..]),
            vec![
                "ALTER PUBLICATION \"pgmm\" DROP TABLE ONLY \"My Schema\".\"b\"\"c\"".to_string(),
                "ALTER PUBLICATION \"pgmm\" ADD TABLE ONLY \"public\".\"a\"".to_string(),
            ]
        );
        assert!(alter_publication_sql(&[], &[]).is_empty());
    }

    #[test]
    fn diff_compares_by_oid() {
        let wanted: BTreeMap<u32, TableName> = [
            (1, TableName::new("public", "kept_renamed")),
            (2, TableName::new("public", "new")),
        ]
        .into();
        let members: BTreeMap<u32, TableName> = [
            (1, TableName::new("public", "kept")),
            (3, TableName::new("pgmm", "conflicts")),
        ]
        .into();
        let (added, removed) = diff(&wanted, &members);
        assert_eq!(added, vec![TableName::new("public", "new")]);
        assert_eq!(removed, vec![TableName::new("pgmm", "conflicts")]);
    }

    #[test]
    fn change_display() {
        assert_eq!(
            PublicationChange::default().to_string(),
            "publication pgmm unchanged"
        );
        let change = PublicationChange {
            created: true,
            added: vec![TableName::new("public", "a")],
            removed: vec![TableName::new("public", "b")],
        };
        assert_eq!(
            change.to_string(),
            "created publication pgmm; added public.a; removed public.b"
        );
    }
}
