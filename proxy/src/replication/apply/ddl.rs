//! Apply of schema changes (`Change::Ddl`): a transaction that carries one is applied like a
//! chunked transaction (one local transaction, committed with the progress record), cut into
//! segments at each schema change, so that the row changes after it are planned against the
//! schema it made: the statements that apply them are prepared, and the local column types
//! read, only once it has run.
//!
//! The statement runs with the origin session's `search_path` and role (`SET LOCAL`, undone
//! right after, so the row changes that follow run as pgmm again), so that unqualified names
//! resolve and new objects get the owner they have on the origin. Right after it, in the same
//! transaction, this node's enrolment follows (`schema::enrol`, `schema::guard`): a table it
//! created gets its guard trigger and joins publication `pgmm` before the transaction commits,
//! so the first local write to it here is stamped and published.
//!
//! `CONCURRENTLY` cannot run inside a transaction block; such a statement (CREATE INDEX, DROP
//! INDEX, REINDEX) is applied without it, inside the apply transaction: the peer builds the
//! index with a lock that holds writes to that table here for the build (docs/SCHEMA_CHANGES.md).

use super::{Applier, ApplyError};
use crate::pg::pg_error_text;
use crate::replication::changeset::{Change, ChangeSet};
use crate::replication::ddl::{has_tag, without_concurrently};
use crate::schema::guard::{self, GuardContext};
use crate::schema::{enrol, guard::GuardError};

/// How much of a failed statement an error message quotes.
const QUOTED: usize = 200;

impl Applier {
    /// Applies `changes` (part of the open stream) segment by segment: row changes between
    /// schema changes as one chunk each, each schema change by itself.
    pub(super) async fn chunk_with_ddl(&mut self, changes: &ChangeSet) -> Result<(), ApplyError> {
        let mut rows: Vec<Change> = Vec::new();
        for change in &changes.changes {
            match change {
                Change::Ddl {
                    statement,
                    search_path,
                    role,
                } => {
                    if !rows.is_empty() {
                        let segment = ChangeSet {
                            tables: changes.tables.clone(),
                            changes: std::mem::take(&mut rows),
                        };
                        self.chunk_rows(&segment).await?;
                    }
                    self.run_ddl(statement, search_path, role).await?;
                }
                row => rows.push(row.clone()),
            }
        }
        if !rows.is_empty() {
            let segment = ChangeSet {
                tables: changes.tables.clone(),
                changes: rows,
            };
            self.chunk_rows(&segment).await?;
        }
        Ok(())
    }

    async fn run_ddl(
        &mut self,
        statement: &str,
        search_path: &str,
        role: &str,
    ) -> Result<(), ApplyError> {
        let Some(stream) = &self.stream else {
            return Err(ApplyError::Malformed(
                "a schema change outside a transaction".into(),
            ));
        };
        if stream.duplicate {
            return Ok(());
        }
        if !stream.begun {
            self.client
                .execute(&self.begin, &[])
                .await
                .map_err(ApplyError::db("starting the apply transaction"))?;
            self.stream.as_mut().expect("checked above").begun = true;
        }
        let statement = without_concurrently(statement);
        let failed = |source| ApplyError::Ddl {
            statement: quote_start(&statement),
            source,
        };
        self.client
            .batch_execute("SAVEPOINT pgmm_ddl")
            .await
            .map_err(ApplyError::db("taking the savepoint of a schema change"))?;
        let ran = async {
            self.client
                .query(
                    "SELECT pg_catalog.set_config('search_path', $1, true), \
                            pg_catalog.set_config('role', $2, true)",
                    &[&search_path, &role],
                )
                .await?;
            self.client.batch_execute(&statement).await
        }
        .await;
        match ran {
            Ok(()) => {}
            Err(e) if already_done(&statement, &e) => {
                // The operator ran it here too (the way schema changes were rolled out before
                // pgmm replicated them): this node already has what the statement makes.
                tracing::warn!(origin = %self.origin_node, statement = %quote_start(&statement), error = %pg_error_text(&e), "schema change from the peer skipped: this node already has its effect");
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT pgmm_ddl")
                    .await
                    .map_err(ApplyError::db(
                        "rolling back a schema change already made here",
                    ))?;
            }
            Err(e) => return Err(failed(e)),
        }
        self.client
            .batch_execute("RELEASE SAVEPOINT pgmm_ddl; SET LOCAL ROLE NONE; RESET search_path")
            .await
            .map_err(ApplyError::db("resetting the role after a schema change"))?;
        self.forget_tables();
        self.enrol_here().await?;
        tracing::info!(origin = %self.origin_node, statement = %quote_start(&statement), "schema change applied");
        Ok(())
    }

    /// This node's enrolment, inside the apply transaction: guard triggers on every table that
    /// replicates, and publication `pgmm` made to hold exactly them. A table that cannot
    /// replicate (no primary key yet) is left to the enrolment loop, which reports it.
    async fn enrol_here(&mut self) -> Result<(), ApplyError> {
        let enrol_failed = |e: enrol::EnrolError| ApplyError::Enrol(e.to_string());
        let checked = enrol::checked_tables(&self.client, &self.replication)
            .await
            .map_err(enrol_failed)?;
        let ctx = GuardContext {
            node: &self.here,
            conflict_column: &self.replication.conflict_column,
            rules: &self.rules,
        };
        let mut tables = Vec::new();
        for table in checked.into_iter().flatten() {
            match guard::install(&self.client, &table, &ctx).await {
                Ok(()) => tables.push(table),
                Err(e @ (GuardError::KeyType { .. } | GuardError::NoOwnerColumn { .. })) => {
                    tracing::debug!(error = %e, "table left to the enrolment loop");
                }
                Err(e) => return Err(ApplyError::Enrol(e.to_string())),
            }
        }
        enrol::sync_publication_in(&self.client, &tables)
            .await
            .map_err(enrol_failed)?;
        Ok(())
    }
}

/// Whether `e` says this node already has the effect of `statement`: an object it creates
/// exists (`42P07`, `42701`, `42710`, `42P06`, `42723`), or one a DROP removes is gone (`42P01`,
/// `42704`, `42703`, `3F000`, `42883`). A missing object for anything but a DROP is a real
/// divergence and stops the apply.
fn already_done(statement: &str, e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code().map(|c| c.code()) else {
        return false;
    };
    let exists = matches!(code, "42P07" | "42701" | "42710" | "42P06" | "42723");
    let gone = matches!(code, "42P01" | "42704" | "42703" | "3F000" | "42883");
    exists || (gone && (has_tag(statement, "DROP") || has_tag(statement, "ALTER DROP")))
}

fn quote_start(statement: &str) -> String {
    let mut end = statement.len().min(QUOTED);
    while !statement.is_char_boundary(end) {
        end -= 1;
    }
    if end < statement.len() {
        format!("{}...", &statement[..end])
    } else {
        statement.to_owned()
    }
}
