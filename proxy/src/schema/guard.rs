//! What pgmm installs on every enrolled table: one row trigger that guards ownership, stamps
//! the conflict column with the node's hybrid logical clock, and leaves a tombstone for every
//! delete; plus, for tables this node may not truncate, a statement trigger that refuses it;
//! and, for `owner_key` tables, a sequence aligned so that this node hands out only its keys.
//!
//! Why triggers: they see every local write whatever its SQL shape (functions, CTEs, direct
//! connections that bypass pgmm), and they do not fire for applied changes, which run with
//! `session_replication_role = replica`. Each table gets its own generated function (no
//! dynamic column access per row), SECURITY DEFINER so that an application role needs no
//! rights on schema `pgmm`, with a pinned search_path. A function is only replaced when its
//! text changed, since replacing one invalidates every session's cached plans.
//!
//! The stamp is `greatest(pgmm.clock(), old stamp + 1 µs)` (and, for an insert, past the key's
//! tombstone): a write made after seeing a version, local or applied, is always newer than it,
//! however far the clocks of the nodes disagree. The version an update or delete replaced, and
//! a delete's stamp, travel to the peers in a transactional logical message (prefix
//! [`VERSION_MESSAGE_PREFIX`]) just before the change in the same transaction, since pgoutput
//! sends only the key of the old row.

use postgres_protocol::escape::{escape_identifier, escape_literal};
use thiserror::Error;
use tokio_postgres::GenericClient;

use crate::config::owners::{row_message, table_message, OwnerRules};
use crate::config::table::TableName;
use crate::config::OwnerSpec;
use crate::pg::pg_error_text;
use crate::pg::quote::qualified;
use crate::pg::SqlState;
use crate::schema::enrol::EnrolledTable;

pub use crate::pg::names::VERSION_MESSAGE_PREFIX;
/// Name of the row trigger on every enrolled table.
pub const ROW_TRIGGER: &str = "pgmm_write";
/// Name of the statement trigger that refuses TRUNCATE.
pub const TRUNCATE_TRIGGER: &str = "pgmm_truncate";

#[derive(Debug, Error)]
pub enum GuardError {
    #[error("installing pgmm's triggers on {table} failed: {}", pg_error_text(.source))]
    Install {
        table: TableName,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "table {table}: owner_key column {column} is {found}; it must be an integer column \
         (smallint, integer or bigint)"
    )]
    KeyType {
        table: TableName,
        column: String,
        found: String,
    },
    #[error("table {table}: ownership column {column} does not exist")]
    NoOwnerColumn { table: TableName, column: String },
    #[error("aligning the key sequence of {table} failed: {}", pg_error_text(.source))]
    Sequence {
        table: TableName,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl SqlState for GuardError {
    /// `55000` for a table the operator must fix, `58000` for a failed statement.
    fn sqlstate(&self) -> &str {
        match self {
            GuardError::KeyType { .. } | GuardError::NoOwnerColumn { .. } => "55000",
            GuardError::Install { .. } | GuardError::Sequence { .. } => "58000",
        }
    }
}

/// Everything the generated functions depend on, besides the table itself.
pub struct GuardContext<'a> {
    pub node: &'a str,
    pub conflict_column: &'a str,
    pub rules: &'a OwnerRules,
}

/// The SQL objects of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableGuard {
    pub row_function: String,
    /// The function's body (what `pg_proc.prosrc` holds once created).
    pub row_body: String,
    /// The TRUNCATE refusal's function and body, when this node may not truncate the table.
    pub truncate: Option<(String, String)>,
}

fn function_name(kind: &str, oid: u32) -> String {
    format!("{kind}_{oid}")
}

/// `'(' || 'id, k' || ')=(' || concat_ws(', ', ROW."id", ROW."k") || ')'`: the key of the
/// row `row` (NEW or OLD) in the format Postgres uses in its own key errors.
fn key_text(table: &EnrolledTable, row: &str) -> String {
    let names = table.key_columns.join(", ");
    let values = table
        .key_columns
        .iter()
        .map(|c| format!("{row}.{}", escape_identifier(c)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "'(' || {} || ')=(' || concat_ws(', ', {values}) || ')'",
        escape_literal(&names)
    )
}

/// `jsonb_build_array(ROW."k1"::text, ...)`: the tombstone key, the same text forms apply
/// builds from the values pgoutput sends.
pub fn key_json(table: &EnrolledTable, row: &str) -> String {
    let parts = table
        .key_columns
        .iter()
        .map(|c| format!("{row}.{}::text", escape_identifier(c)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("pg_catalog.jsonb_build_array({parts})")
}

fn raise(message_sql: &str) -> String {
    format!("RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = {message_sql};")
}

/// The row-ownership check of one row (`NEW` or `OLD`), as PL/pgSQL statements.
fn row_guard(
    table: &EnrolledTable,
    spec: &OwnerSpec,
    ctx: &GuardContext<'_>,
    row: &str,
) -> Result<String, GuardError> {
    let name = &table.name;
    let no_owner = |column: &str| {
        raise(&escape_literal(&format!(
            "a row of \"{name}\" must name its owner node in {column}; write it as node \"{}\"",
            ctx.node
        )))
    };
    match spec {
        OwnerSpec::Node(_) => Ok(String::new()),
        OwnerSpec::Column(column) => {
            if !table.columns.iter().any(|(c, _)| c == column) {
                return Err(GuardError::NoOwnerColumn {
                    table: name.clone(),
                    column: column.clone(),
                });
            }
            let value = format!("{row}.{}::text", escape_identifier(column));
            // The message is built in SQL from the row's owner, with the same wording as
            // `row_message` (checked by a test).
            let message = format!(
                "format({}, {}, {value}, {value})",
                escape_literal(&row_message("%s", name, "%s")),
                key_text(table, row)
            );
            Ok(format!(
                "IF {value} IS NULL THEN {} END IF;\n    \
                 IF {value} <> {} THEN {} END IF;",
                no_owner(column),
                escape_literal(ctx.node),
                raise(&message)
            ))
        }
        OwnerSpec::Key(column) => {
            let Some((_, ty)) = table.columns.iter().find(|(c, _)| c == column) else {
                return Err(GuardError::NoOwnerColumn {
                    table: name.clone(),
                    column: column.clone(),
                });
            };
            if !matches!(ty.as_str(), "smallint" | "integer" | "bigint") {
                return Err(GuardError::KeyType {
                    table: name.clone(),
                    column: column.clone(),
                    found: ty.clone(),
                });
            }
            let nodes = ctx.rules.nodes();
            let n = nodes.len();
            let me = nodes.iter().position(|x| x == ctx.node).unwrap_or(0);
            let value = format!("{row}.{}", escape_identifier(column));
            let position =
                format!("pg_catalog.mod(pg_catalog.mod({value}::numeric, {n}) + {n}, {n})::int");
            let array = nodes
                .iter()
                .map(|x| escape_literal(x))
                .collect::<Vec<_>>()
                .join(", ");
            let message = format!(
                "format({}, {}, (ARRAY[{array}])[{position} + 1], (ARRAY[{array}])[{position} + 1])",
                escape_literal(&row_message("%s", name, "%s")),
                key_text(table, row)
            );
            Ok(format!(
                "IF {value} IS NULL THEN {} END IF;\n    \
                 IF {position} <> {me} THEN {} END IF;",
                no_owner(column),
                raise(&message)
            ))
        }
    }
}

/// The SQL objects pgmm wants on `table`.
pub fn table_guard(
    table: &EnrolledTable,
    ctx: &GuardContext<'_>,
) -> Result<TableGuard, GuardError> {
    let name = &table.name;
    let label = escape_literal(&name.to_string());
    let u = escape_identifier(ctx.conflict_column);
    let here = escape_literal(ctx.node);
    let spec = ctx.rules.rule(name);
    let mut body = String::from("\nBEGIN\n");
    let truncate = match spec {
        Some(OwnerSpec::Node(owner)) if owner != ctx.node => {
            let refuse = raise(&escape_literal(&table_message(name, owner)));
            body.push_str(&format!("    {refuse}\nEND\n"));
            Some(refuse)
        }
        Some(OwnerSpec::Column(c) | OwnerSpec::Key(c)) => {
            let new_guard = row_guard(table, spec.expect("matched"), ctx, "NEW")?;
            let old_guard = row_guard(table, spec.expect("matched"), ctx, "OLD")?;
            body.push_str(&row_body(table, &label, &u, &here, &new_guard, &old_guard));
            Some(raise(&escape_literal(&format!(
                "table \"{name}\" is owned row by row ({c}): TRUNCATE would remove other nodes' \
                 rows; delete this node's rows instead"
            ))))
        }
        _ => {
            body.push_str(&row_body(table, &label, &u, &here, "", ""));
            None
        }
    };
    Ok(TableGuard {
        row_function: function_name("write", table.oid),
        row_body: body,
        truncate: truncate.map(|refuse| {
            (
                function_name("truncate", table.oid),
                format!("\nBEGIN\n    {refuse}\nEND\n"),
            )
        }),
    })
}

fn row_body(
    table: &EnrolledTable,
    label: &str,
    u: &str,
    here: &str,
    new_guard: &str,
    old_guard: &str,
) -> String {
    let old_key = key_json(table, "OLD");
    let new_key = key_json(table, "NEW");
    let prefix = escape_literal(VERSION_MESSAGE_PREFIX);
    let micros = |e: &str| {
        format!(
            "coalesce(((extract(epoch FROM {e}) * 1000000)::bigint - 946684800000000)::text, '-')"
        )
    };
    let old_micros = micros(&format!("OLD.{u}"));
    let stamp_micros = micros("stamp");
    format!(
        "    IF TG_OP = 'DELETE' THEN
    {old_guard}
    stamp := greatest(pgmm.clock(), OLD.{u} + interval '1 microsecond');
    INSERT INTO pgmm.tombstones AS d (table_name, key, deleted_at, origin)
        VALUES ({label}, {old_key}, stamp, {here})
        ON CONFLICT (table_name, key) DO UPDATE
        SET deleted_at = EXCLUDED.deleted_at, origin = EXCLUDED.origin, local_lsn = EXCLUDED.local_lsn;
    PERFORM pg_catalog.pg_logical_emit_message(true, {prefix},
        TG_RELID::text || ' ' || {old_micros} || ' ' || {stamp_micros});
    RETURN OLD;
    END IF;
    {new_guard}
    IF TG_OP = 'UPDATE' THEN
    {old_guard}
    NEW.{u} := greatest(pgmm.clock(), OLD.{u} + interval '1 microsecond');
    PERFORM pg_catalog.pg_logical_emit_message(true, {prefix}, TG_RELID::text || ' ' || {old_micros});
    ELSE
    NEW.{u} := greatest(pgmm.clock(),
        (SELECT d.deleted_at + interval '1 microsecond' FROM pgmm.tombstones d
          WHERE d.table_name = {label} AND d.key = {new_key}));
    END IF;
    RETURN NEW;
END
"
    )
}

/// Creates or updates pgmm's triggers on `table`, and for an `owner_key` table aligns its key
/// sequence. Idempotent; changes nothing when everything is already as wanted.
pub async fn install(
    client: &impl GenericClient,
    table: &EnrolledTable,
    ctx: &GuardContext<'_>,
) -> Result<(), GuardError> {
    let guard = table_guard(table, ctx)?;
    let fail = |source| GuardError::Install {
        table: table.name.clone(),
        source,
    };
    let quoted = qualified(&table.name.schema, &table.name.name);
    let mut wanted = vec![(
        guard.row_function.clone(),
        guard.row_body.clone(),
        "DECLARE stamp timestamptz;",
        ROW_TRIGGER,
        "BEFORE INSERT OR UPDATE OR DELETE",
        "FOR EACH ROW",
    )];
    if let Some((f, b)) = &guard.truncate {
        wanted.push((
            f.clone(),
            b.clone(),
            "",
            TRUNCATE_TRIGGER,
            "BEFORE TRUNCATE",
            "FOR EACH STATEMENT",
        ));
    }
    for (function, body, declare, trigger, when, each) in &wanted {
        let full_body = format!("{declare}{body}");
        let current: Option<String> = client
            .query_opt(
                "SELECT p.prosrc FROM pg_catalog.pg_proc p \
                 JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = 'pgmm' AND p.proname = $1",
                &[function],
            )
            .await
            .map_err(fail)?
            .map(|r| r.get(0));
        if current.as_deref() != Some(full_body.as_str()) {
            client
                .batch_execute(&format!(
                    "CREATE OR REPLACE FUNCTION pgmm.{}() RETURNS trigger LANGUAGE plpgsql \
                     SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS {}",
                    escape_identifier(function),
                    escape_literal(&full_body)
                ))
                .await
                .map_err(fail)?;
        }
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = $1 AND tgname = $2",
                &[&table.oid, trigger],
            )
            .await
            .map_err(fail)?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!(
                    "CREATE TRIGGER {} {when} ON {quoted} {each} EXECUTE FUNCTION pgmm.{}()",
                    escape_identifier(trigger),
                    escape_identifier(function)
                ))
                .await
                .map_err(fail)?;
            tracing::info!(table = %table.name, trigger, "pgmm trigger installed");
        }
    }
    if guard.truncate.is_none() {
        // The rule changed: this node may truncate the table now.
        let has_trigger = client
            .execute(
                "SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = $1 AND tgname = $2",
                &[&table.oid, &TRUNCATE_TRIGGER],
            )
            .await
            .map_err(fail)?;
        if has_trigger > 0 {
            client
                .batch_execute(&format!(
                    "DROP TRIGGER {} ON {quoted}",
                    escape_identifier(TRUNCATE_TRIGGER)
                ))
                .await
                .map_err(fail)?;
        }
    }
    if let Some(OwnerSpec::Key(column)) = ctx.rules.rule(&table.name) {
        align_sequence(client, table, column, ctx).await?;
    }
    Ok(())
}

/// Makes the sequence behind an `owner_key` column hand out only this node's keys: INCREMENT n,
/// next value the first one above the current that this node owns. Logged when it changes.
async fn align_sequence(
    client: &impl GenericClient,
    table: &EnrolledTable,
    column: &str,
    ctx: &GuardContext<'_>,
) -> Result<(), GuardError> {
    let fail = |source| GuardError::Sequence {
        table: table.name.clone(),
        source,
    };
    let quoted = qualified(&table.name.schema, &table.name.name);
    let Some(row) = client
        .query_opt(
            "SELECT s.seqrelid::regclass::text, s.seqincrement FROM pg_catalog.pg_sequence s \
             WHERE s.seqrelid = pg_catalog.pg_get_serial_sequence($1, $2)::regclass",
            &[&quoted, &column],
        )
        .await
        .map_err(fail)?
    else {
        return Ok(());
    };
    let sequence: String = row.get(0);
    let increment: i64 = row.get(1);
    let state = client
        .query_one(
            &format!("SELECT last_value::numeric::text, is_called FROM {sequence}"),
            &[],
        )
        .await
        .map_err(fail)?;
    let last: i128 = state.get::<_, String>(0).parse().unwrap_or(0);
    let is_called: bool = state.get(1);
    let nodes = ctx.rules.nodes();
    let n = nodes.len() as i128;
    let me = nodes.iter().position(|x| x == ctx.node).unwrap_or(0) as i128;
    if n <= 1 {
        return Ok(());
    }
    // The value the next nextval() hands out, before and after aligning.
    let upcoming = if is_called {
        last + increment as i128
    } else {
        last
    };
    if increment as i128 == n && upcoming.rem_euclid(n) == me {
        return Ok(());
    }
    let base = if is_called { last + 1 } else { last };
    let next = base + (me - base.rem_euclid(n)).rem_euclid(n);
    client
        .batch_execute(&format!(
            "ALTER SEQUENCE {sequence} INCREMENT BY {n}; SELECT pg_catalog.setval({}, {next}, false)",
            escape_literal(&sequence)
        ))
        .await
        .map_err(fail)?;
    tracing::info!(
        table = %table.name,
        %sequence,
        increment = %n,
        next = %next,
        "aligned the owner_key sequence: node {} owns {column} % {n} == {me}",
        ctx.node
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(columns: &[(&str, &str)]) -> EnrolledTable {
        EnrolledTable {
            name: TableName::new("public", "t"),
            oid: 4242,
            key_columns: vec!["id".into()],
            columns: columns
                .iter()
                .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
                .collect(),
        }
    }

    fn ctx<'a>(rules: &'a OwnerRules) -> GuardContext<'a> {
        GuardContext {
            node: "a",
            conflict_column: "updated_at",
            rules,
        }
    }

    #[test]
    fn a_shared_table_gets_the_clock_and_tombstones_but_no_guard() {
        let rules = OwnerRules::new(vec!["a".into(), "b".into()], []);
        let g = table_guard(&table(&[("id", "integer")]), &ctx(&rules)).unwrap();
        assert_eq!(g.row_function, "write_4242");
        assert!(g.truncate.is_none());
        assert!(!g.row_body.contains("42501"), "{}", g.row_body);
        assert!(g.row_body.contains("pgmm.clock()"));
        assert!(g.row_body.contains(
            "VALUES ('public.t', pg_catalog.jsonb_build_array(OLD.\"id\"::text), stamp, 'a')"
        ));
        assert!(g.row_body.contains("'pgmm.version'"));
    }

    #[test]
    fn a_table_owned_elsewhere_refuses_everything_with_the_one_message() {
        let rules = OwnerRules::new(
            vec!["a".into(), "b".into()],
            [(TableName::new("public", "t"), OwnerSpec::Node("b".into()))],
        );
        let g = table_guard(&table(&[("id", "integer")]), &ctx(&rules)).unwrap();
        let msg = table_message(&TableName::new("public", "t"), "b");
        assert!(g.row_body.contains(&escape_literal(&msg)), "{}", g.row_body);
        assert!(g.truncate.unwrap().1.contains(&escape_literal(&msg)));
        // The owner itself only gets the clock.
        let own = GuardContext {
            node: "b",
            ..ctx(&rules)
        };
        let g = table_guard(&table(&[("id", "integer")]), &own).unwrap();
        assert!(!g.row_body.contains("42501") && g.truncate.is_none());
    }

    #[test]
    fn row_rules_check_their_column_and_refuse_a_bad_key_type() {
        let rules = OwnerRules::new(
            vec!["a".into(), "b".into(), "c".into()],
            [(TableName::new("public", "t"), OwnerSpec::Key("id".into()))],
        );
        let g = table_guard(&table(&[("id", "bigint")]), &ctx(&rules)).unwrap();
        assert!(g.row_body.contains("<> 0 THEN"), "{}", g.row_body);
        assert!(g.row_body.contains("ARRAY['a', 'b', 'c']"));
        assert!(matches!(
            table_guard(&table(&[("id", "text")]), &ctx(&rules)),
            Err(GuardError::KeyType { .. })
        ));
        let rules = OwnerRules::new(
            vec!["a".into(), "b".into()],
            [(
                TableName::new("public", "t"),
                OwnerSpec::Column("home".into()),
            )],
        );
        assert!(matches!(
            table_guard(&table(&[("id", "bigint")]), &ctx(&rules)),
            Err(GuardError::NoOwnerColumn { .. })
        ));
        let g = table_guard(&table(&[("id", "bigint"), ("home", "text")]), &ctx(&rules)).unwrap();
        assert!(
            g.row_body.contains("NEW.\"home\"::text <> 'a'"),
            "{}",
            g.row_body
        );
        assert!(g.row_body.contains("OLD.\"home\"::text <> 'a'"));
        assert!(g.truncate.is_some());
    }
}
