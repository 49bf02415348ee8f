//! DDL capture: the event triggers that put every schema change of this node into its WAL, in
//! order with the data changes around it, as a transactional logical message (prefix
//! [`DDL_MESSAGE_PREFIX`]) that capture ships like a row change.
//!
//! Why an event trigger and not the front door: it sees DDL from every connection (a migration
//! tool connected straight to Postgres, a function, a DO block), and the message it writes is
//! part of the DDL's own transaction, so it commits, aborts and is decoded exactly where the
//! schema change happened. Event triggers do not fire under `session_replication_role =
//! replica`, so DDL applied from a peer is not captured again.
//!
//! What is not captured: DDL on pgmm's own schema and on temporary objects (node-local), on
//! publications and subscriptions (node-local replication wiring), DDL run by pgmm's own
//! sessions (they set `pgmm.capture_ddl = off`, see [`crate::pg::own_session`]) and what
//! Postgres fires no event trigger for (roles, databases, tablespaces).
//!
//! A table created (or given its primary key) that `[replication] tables` covers is also added
//! to publication `pgmm` by the trigger, in the same transaction, through a SECURITY DEFINER
//! helper so that an application role needs no rights on the publication: rows written into it
//! before pgmm's enrolment installs its guard trigger (a moment later) are published too, so
//! nothing written to a new table is lost to replication.

use postgres_protocol::escape::escape_literal;
use thiserror::Error;
use tokio_postgres::GenericClient;

use crate::config::ReplicationConfig;
use crate::pg::{pg_error_text, SqlState};

pub use crate::pg::names::{CAPTURE_SETTING, DDL_MESSAGE_PREFIX};

#[derive(Debug, Error)]
pub enum DdlCaptureError {
    #[error(
        "installing pgmm's DDL capture (event triggers) needs a superuser: connect \
         [postgres] url as one (event triggers cannot be created otherwise): {}",
        pg_error_text(.0)
    )]
    NotSuperuser(#[source] tokio_postgres::Error),
    #[error("installing pgmm's DDL capture failed: {}", pg_error_text(.0))]
    Database(#[source] tokio_postgres::Error),
}

impl SqlState for DdlCaptureError {
    fn sqlstate(&self) -> &str {
        match self {
            DdlCaptureError::NotSuperuser(_) => "42501",
            DdlCaptureError::Database(_) => "58000",
        }
    }
}

/// The SQL condition that a table (schema `s`, name `n`) is covered by `[replication] tables`.
fn pattern_condition(replication: &ReplicationConfig) -> String {
    let parts: Vec<String> = replication
        .patterns()
        .into_iter()
        .map(|(schema, name)| {
            let mut terms = Vec::new();
            if let Some(schema) = schema {
                terms.push(format!("s = {}", escape_literal(&schema)));
            }
            if let Some(name) = name {
                terms.push(format!("n = {}", escape_literal(&name)));
            }
            if terms.is_empty() {
                "true".to_owned()
            } else {
                format!("({})", terms.join(" AND "))
            }
        })
        .collect();
    if parts.is_empty() {
        "false".to_owned()
    } else {
        parts.join(" OR ")
    }
}

/// The PL/pgSQL that refuses a schema change on `node` when `[replication] ddl_nodes` does not
/// name it; empty where schema changes are allowed.
fn refusal(replication: &ReplicationConfig, node: &str) -> String {
    if replication.ddl_nodes.is_empty() || replication.ddl_nodes.iter().any(|n| n == node) {
        return String::new();
    }
    let message = format!(
        "schema changes are made on node {} ([replication] ddl_nodes); this is node {node}",
        replication.ddl_nodes.join(" or ")
    );
    format!(
        "RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = {}, HINT = {};",
        escape_literal(&message),
        escape_literal("run it there: it replicates to every node")
    )
}

/// The functions and triggers for `node`, as one script (idempotent).
pub fn capture_sql(replication: &ReplicationConfig, node: &str) -> String {
    let conflict = escape_literal(&replication.conflict_column);
    let patterns = pattern_condition(replication);
    let refuse = refusal(replication, node);
    format!(
        r#"
CREATE OR REPLACE FUNCTION pgmm.publish_new_table(rel oid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pgmm$
DECLARE s text; n text;
BEGIN
  SELECT ns.nspname, c.relname INTO s, n
  FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
  WHERE c.oid = rel AND c.relkind IN ('r', 'p') AND NOT c.relispartition
    AND c.relpersistence = 'p';
  IF n IS NULL OR s = 'pgmm' OR NOT ({patterns}) THEN RETURN; END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'pgmm')
     OR EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                WHERE p.pubname = 'pgmm' AND pr.prrelid = rel)
     OR NOT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = rel AND indisprimary)
     OR NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = rel AND attname = {conflict}
                    AND atttypid = 'timestamptz'::regtype AND NOT attisdropped) THEN
    RETURN;
  END IF;
  PERFORM set_config('{CAPTURE_SETTING}', 'off', true);
  EXECUTE format('ALTER PUBLICATION pgmm ADD TABLE ONLY %I.%I', s, n);
  PERFORM set_config('{CAPTURE_SETTING}', 'on', true);
END
$pgmm$;

CREATE OR REPLACE FUNCTION pgmm.capture_drop() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $pgmm$
BEGIN
  PERFORM set_config('pgmm.dropped',
    -- coalesce: an object outside any schema (NULL) is not local, and bool_and skips NULLs.
    CASE WHEN bool_and(d.is_temporary OR coalesce(d.schema_name = 'pgmm', false))
         THEN 'local' ELSE '' END, true)
  FROM pg_event_trigger_dropped_objects() d;
END
$pgmm$;

CREATE OR REPLACE FUNCTION pgmm.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $pgmm$
-- No SET search_path here: the message records the caller's. Hence every name qualified.
DECLARE r record; commands int := 0; local int := 0; dropped text;
BEGIN
  IF pg_catalog.current_setting('{CAPTURE_SETTING}', true) = 'off' THEN RETURN; END IF;
  IF tg_tag IN ('CREATE PUBLICATION', 'ALTER PUBLICATION', 'DROP PUBLICATION',
                'CREATE SUBSCRIPTION', 'ALTER SUBSCRIPTION', 'DROP SUBSCRIPTION') THEN
    RETURN;
  END IF;
  dropped := coalesce(pg_catalog.current_setting('pgmm.dropped', true), '');
  IF dropped <> '' THEN PERFORM pg_catalog.set_config('pgmm.dropped', '', true); END IF;
  IF dropped = 'local' THEN RETURN; END IF;
  FOR r IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() LOOP
    commands := commands + 1;
    IF r.schema_name = 'pgmm' OR pg_catalog.starts_with(r.schema_name, 'pg_temp')
       OR r.in_extension THEN
      local := local + 1;
    ELSIF r.object_type IN ('table', 'table column')
          AND r.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE') THEN
      PERFORM pgmm.publish_new_table(r.objid);
    END IF;
  END LOOP;
  IF commands > 0 AND local = commands THEN RETURN; END IF;
  {refuse}
  PERFORM pg_catalog.pg_logical_emit_message(true, '{DDL_MESSAGE_PREFIX}',
    pg_catalog.json_build_object(
      'tag', tg_tag, 'query', pg_catalog.current_query(),
      'search_path', pg_catalog.current_setting('search_path'),
      'role', current_user)::text);
END
$pgmm$;

-- The trigger runs as whoever runs the DDL, and calls into schema pgmm: every role needs to
-- look the helper up. USAGE lets it see pgmm's names, not read its tables (no grants there).
GRANT USAGE ON SCHEMA pgmm TO PUBLIC;

DO $pgmm$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgmm_ddl') THEN
    CREATE EVENT TRIGGER pgmm_ddl ON ddl_command_end EXECUTE FUNCTION pgmm.capture_ddl();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgmm_ddl_drop') THEN
    CREATE EVENT TRIGGER pgmm_ddl_drop ON sql_drop EXECUTE FUNCTION pgmm.capture_drop();
  END IF;
END $pgmm$;
"#
    )
}

/// Installs (or updates) the capture; run at start, before the front door opens, by a session
/// that does not capture its own DDL.
pub async fn install(
    client: &impl GenericClient,
    replication: &ReplicationConfig,
    node: &str,
) -> Result<(), DdlCaptureError> {
    client
        .batch_execute(&capture_sql(replication, node))
        .await
        .map_err(|e| match e.code().map(|c| c.code()) {
            Some("42501") => DdlCaptureError::NotSuperuser(e),
            _ => DdlCaptureError::Database(e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_become_one_sql_condition() {
        let replication = ReplicationConfig {
            tables: vec!["demo.*".into(), "sales.orders".into(), "*.log".into()],
            ..ReplicationConfig::default()
        };
        assert_eq!(
            pattern_condition(&replication),
            "(s = 'demo') OR (s = 'sales' AND n = 'orders') OR (n = 'log')"
        );
        assert_eq!(pattern_condition(&ReplicationConfig::default()), "false");
        let sql = capture_sql(&replication, "a");
        assert!(sql.contains("attname = 'updated_at'"));
        assert!(sql.contains("'pgmm.ddl'"));
        assert!(!sql.contains("RAISE EXCEPTION"));
    }

    #[test]
    fn only_the_ddl_nodes_may_change_the_schema() {
        let replication = ReplicationConfig {
            ddl_nodes: vec!["a".into(), "b".into()],
            ..ReplicationConfig::default()
        };
        assert_eq!(refusal(&replication, "a"), "");
        assert!(refusal(&replication, "c").contains(
            "'schema changes are made on node a or b ([replication] ddl_nodes); this is node c'"
        ));
    }
}
