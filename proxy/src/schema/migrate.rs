//! The `pgmm` schema: its migrations (the SQL in `migrations/`, embedded at build time) and the
//! runner that brings a database up to the version this binary knows.
//!
//! The SQL is embedded rather than read at run time so that a deployed binary and its schema can
//! never disagree. Every migration runs in its own transaction behind a transaction-level
//! advisory lock: two pgmm processes starting against the same database at once serialise, and
//! the second finds nothing left to do. A database whose schema is newer than the binary is
//! refused, because an older pgmm would misread tables it does not know the shape of.

use std::fmt;

use thiserror::Error;
use tokio_postgres::{Client, GenericClient};

use crate::config::PostgresConfig;
use crate::pg::SqlState;
use crate::pg::{self, pg_error_text, ConnectError};

/// One numbered SQL file from `migrations/`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The file number: `0001_pgmm_schema.sql` is version 1.
    pub version: i32,
    /// The file name between the number and `.sql`.
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in version order, numbered 1, 2, ... without gaps (checked by a unit test
/// against the files in `migrations/`, so a file cannot be added and forgotten here).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "pgmm_schema",
        sql: include_str!("../../../migrations/0001_pgmm_schema.sql"),
    },
    Migration {
        version: 2,
        name: "lww",
        sql: include_str!("../../../migrations/0002_lww.sql"),
    },
    Migration {
        version: 3,
        name: "applied",
        sql: include_str!("../../../migrations/0003_applied.sql"),
    },
    Migration {
        version: 4,
        name: "join",
        sql: include_str!("../../../migrations/0004_join.sql"),
    },
];

/// The schema version this binary brings a database to, and the newest it accepts.
pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Key of the transaction-level advisory lock that serialises migration runners ("pgmmmigr").
/// Advisory locks are per database, which is exactly the scope of a schema.
const LOCK_KEY: i64 = 0x7067_6d6d_6d69_6772;

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// (version, name) of each migration applied by this run, in order; empty when the database
    /// was already current.
    pub applied: Vec<(i32, &'static str)>,
    /// The database's schema version after the run.
    pub current: i32,
}

impl fmt::Display for MigrateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (version, name) in &self.applied {
            writeln!(f, "applied migration {version:04}_{name}")?;
        }
        if self.applied.is_empty() {
            write!(
                f,
                "pgmm schema is at version {}, nothing to apply",
                self.current
            )
        } else {
            write!(f, "pgmm schema is now at version {}", self.current)
        }
    }
}

/// Why the schema could not be brought up to date.
#[derive(Debug, Error)]
pub enum MigrateError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(
        "the database's pgmm schema is at version {found}, newer than this pgmm knows \
         (version {known}): run a pgmm at least as new as the one that migrated it"
    )]
    NewerSchema { found: i32, known: i32 },
    #[error("migration {version:04}_{name} failed: {}", pg_error_text(.source))]
    Apply {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("reading or recording the pgmm schema version failed: {}", pg_error_text(.0))]
    Database(#[from] tokio_postgres::Error),
}

impl SqlState for MigrateError {
    /// A category code: connection failures are `08006`, a too-new schema `55000`
    /// (object_not_in_prerequisite_state); anything Postgres refused is `58000`, with the
    /// server's own code in the message.
    fn sqlstate(&self) -> &str {
        match self {
            MigrateError::Connect(e) => e.sqlstate(),
            MigrateError::NewerSchema { .. } => "55000",
            MigrateError::Apply { source, .. } | MigrateError::Database(source)
                if source.is_closed() =>
            {
                "08006"
            }
            MigrateError::Apply { .. } | MigrateError::Database(_) => "58000",
        }
    }
}

/// Brings the database `client` is connected to up to [`LATEST`], one transaction per migration.
/// Idempotent: a current database gets no writes at all beyond taking the lock.
pub async fn migrate(client: &mut Client) -> Result<MigrateReport, MigrateError> {
    let mut applied = Vec::new();
    loop {
        let tx = client.transaction().await?;
        // Taken before reading the version, so the read sees whatever a concurrent runner committed.
        tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({LOCK_KEY})"))
            .await?;
        let current = current_version(&tx).await?;
        let Some(next) = next_migration(MIGRATIONS, current)? else {
            tx.rollback().await?;
            return Ok(MigrateReport { applied, current });
        };
        tx.batch_execute(next.sql)
            .await
            .map_err(|source| MigrateError::Apply {
                version: next.version,
                name: next.name,
                source,
            })?;
        tx.execute(
            "INSERT INTO pgmm.schema_version (version, name) VALUES ($1, $2)",
            &[&next.version, &next.name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(
            version = next.version,
            name = next.name,
            "applied migration"
        );
        applied.push((next.version, next.name));
    }
}

/// The highest recorded version; 0 before the first migration created the table.
pub async fn current_version(client: &impl GenericClient) -> Result<i32, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT to_regclass('pgmm.schema_version') IS NOT NULL", &[])
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM pgmm.schema_version",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The migration that follows `current`, or `None` when the database is current; an error when
/// the database is newer than `migrations` knows.
fn next_migration(
    migrations: &'static [Migration],
    current: i32,
) -> Result<Option<&'static Migration>, MigrateError> {
    let known = migrations.last().map_or(0, |m| m.version);
    if current > known {
        return Err(MigrateError::NewerSchema {
            found: current,
            known,
        });
    }
    Ok(migrations.iter().find(|m| m.version > current))
}

/// Connects with `[postgres] url` and migrates that database.
pub async fn migrate_database(pg: &PostgresConfig) -> Result<MigrateReport, MigrateError> {
    let mut client = pg::connect(pg).await?;
    migrate(&mut client).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &[Migration] = &[
        Migration {
            version: 1,
            name: "one",
            sql: "",
        },
        Migration {
            version: 2,
            name: "two",
            sql: "",
        },
    ];

    #[test]
    fn next_migration_walks_in_order() {
        assert_eq!(next_migration(M, 0).unwrap().unwrap().version, 1);
        assert_eq!(next_migration(M, 1).unwrap().unwrap().version, 2);
        assert!(next_migration(M, 2).unwrap().is_none());
    }

    #[test]
    fn newer_database_is_refused_naming_both_versions() {
        let err = next_migration(M, 999).unwrap_err();
        assert!(matches!(
            err,
            MigrateError::NewerSchema {
                found: 999,
                known: 2
            }
        ));
        let text = err.to_string();
        assert!(text.contains("999") && text.contains("version 2"), "{text}");
        assert_eq!(err.sqlstate(), "55000");
    }

    #[test]
    fn versions_are_contiguous_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "{}", m.name);
        }
        assert_eq!(LATEST, MIGRATIONS.len() as i32);
    }

    /// The list above and the directory must agree file for file, so that a new SQL file cannot
    /// be forgotten (or an entry point at stale text).
    #[test]
    fn list_matches_the_migrations_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|entry| entry.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "sql"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&p).expect("read migration");
                (name, text)
            })
            .collect();
        files.sort();
        let listed: Vec<(String, String)> = MIGRATIONS
            .iter()
            .map(|m| (format!("{:04}_{}.sql", m.version, m.name), m.sql.to_owned()))
            .collect();
        assert_eq!(files, listed);
    }

    #[test]
    fn report_says_what_was_applied() {
        let report = MigrateReport {
            applied: vec![(1, "pgmm_schema")],
            current: 1,
        };
        assert_eq!(
            report.to_string(),
            "applied migration 0001_pgmm_schema\npgmm schema is now at version 1"
        );
        let idle = MigrateReport {
            applied: vec![],
            current: 1,
        };
        assert_eq!(
            idle.to_string(),
            "pgmm schema is at version 1, nothing to apply"
        );
    }
}
