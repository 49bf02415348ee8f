//! The statements apply runs, as text. One text per (table, operation, column set): the apply
//! session prepares each text once and caches it by the text itself, so building the text is
//! the whole cache key.
//!
//! Every value is a parameter, sent in text format and parsed by the local server into the
//! column's own type: Postgres infers each parameter's type from the column it is compared
//! with or assigned to, so no type needs to be known here.

use std::fmt::Write as _;

use postgres_protocol::escape::{escape_identifier, escape_literal};

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", escape_identifier(schema), escape_identifier(name))
}

/// INSERT that leaves an existing row alone; the caller sees 0 rows and records the conflict.
pub fn insert(table: &str, columns: &[&str]) -> String {
    let mut sql = format!("INSERT INTO {table} (");
    list(&mut sql, columns, |sql, c, _| {
        sql.push_str(&escape_identifier(c))
    });
    sql.push_str(") VALUES (");
    list(&mut sql, columns, |sql, _, i| {
        let _ = write!(sql, "${}", i + 1);
    });
    sql.push_str(") ON CONFLICT DO NOTHING");
    sql
}

/// UPDATE of `set` columns (parameters `$1..`) of the row whose key (the next parameters) matches.
pub fn update(table: &str, set: &[&str], key: &[&str]) -> String {
    let mut sql = format!("UPDATE {table} SET ");
    list(&mut sql, set, |sql, c, i| {
        let _ = write!(sql, "{} = ${}", escape_identifier(c), i + 1);
    });
    where_key(&mut sql, key, set.len());
    sql
}

/// DELETE of the row whose key matches `$1..`.
pub fn delete(table: &str, key: &[&str]) -> String {
    let mut sql = format!("DELETE FROM {table}");
    where_key(&mut sql, key, 0);
    sql
}

/// The current local row as jsonb text, for the conflict log.
pub fn local_row(table: &str, key: &[&str]) -> String {
    let mut sql = format!("SELECT to_jsonb(t)::text FROM {table} AS t");
    where_key(&mut sql, key, 0);
    sql
}

/// TRUNCATE of already-qualified names, with the origin's options.
pub fn truncate(tables: &[String], cascade: bool, restart_identity: bool) -> String {
    let mut sql = format!("TRUNCATE {}", tables.join(", "));
    if restart_identity {
        sql.push_str(" RESTART IDENTITY");
    }
    if cascade {
        sql.push_str(" CASCADE");
    }
    sql
}

/// Where a change's conflict goes if it has one: the statements below record it in
/// `pgmm.conflicts` themselves, in the same statement as the change, so the conflict log and the
/// data commit together and the apply pipeline never waits for a row count mid-transaction.
pub struct Conflict<'a> {
    /// `schema.name` as it is logged.
    pub table: &'a str,
    /// The origin node.
    pub origin: &'a str,
}

impl Conflict<'_> {
    /// `INSERT INTO pgmm.conflicts ... SELECT ... WHERE NOT EXISTS (SELECT 1 FROM <cte>)`: logs
    /// one row when the CTE touched none. The statement's row count is then the number of
    /// conflicts it recorded (0 or 1).
    fn log(&self, cte: &str, kind: &str, resolution: &str, local: &str, remote: &str) -> String {
        format!(
            "INSERT INTO pgmm.conflicts \
             (table_name, kind, origin, local_tuple, remote_tuple, resolution) \
             SELECT {}, {}, {}, {local}, {remote}, {} WHERE NOT EXISTS (SELECT 1 FROM {cte})",
            escape_literal(self.table),
            escape_literal(kind),
            escape_literal(self.origin),
            escape_literal(resolution),
        )
    }
}

/// [`insert`] that records `insert_exists` (keeping the local row, logged as it was) instead of
/// failing on an existing key. `key` are the key columns' parameter numbers' columns, in order.
pub fn insert_logged(table: &str, columns: &[&str], key: &[usize], c: &Conflict<'_>) -> String {
    let key_names: Vec<&str> = key.iter().map(|&k| columns[k]).collect();
    let mut local = format!("(SELECT to_jsonb(l) FROM {table} AS l");
    // The key's values are the inserted row's own parameters.
    local.push_str(" WHERE ");
    for (i, (&k, name)) in key.iter().zip(&key_names).enumerate() {
        if i > 0 {
            local.push_str(" AND ");
        }
        let _ = write!(local, "l.{} = ${}", escape_identifier(name), k + 1);
    }
    local.push(')');
    let params: Vec<usize> = (1..=columns.len()).collect();
    format!(
        "WITH applied AS ({} RETURNING 1) {}",
        insert(table, columns),
        c.log(
            "applied",
            "insert_exists",
            "keep_local",
            &local,
            &json_object(columns, &params)
        )
    )
}

/// [`update`] that records `update_missing` (skipped) when no row has the key.
pub fn update_logged(table: &str, set: &[&str], key: &[&str], c: &Conflict<'_>) -> String {
    let params: Vec<usize> = (1..=set.len()).collect();
    format!(
        "WITH applied AS ({} RETURNING 1) {}",
        update(table, set, key),
        c.log(
            "applied",
            "update_missing",
            "skip",
            "NULL",
            &json_object(set, &params)
        )
    )
}

/// [`delete`] that records `delete_missing` (skipped) when no row has the key.
pub fn delete_logged(table: &str, key: &[&str], c: &Conflict<'_>) -> String {
    let params: Vec<usize> = (1..=key.len()).collect();
    format!(
        "WITH applied AS ({} RETURNING 1) {}",
        delete(table, key),
        c.log(
            "applied",
            "delete_missing",
            "skip",
            "NULL",
            &json_object(key, &params)
        )
    )
}

/// `jsonb_build_object('a', $1, ...)`, chunked under the 100-argument limit of a function call.
fn json_object(columns: &[&str], params: &[usize]) -> String {
    let pairs: Vec<String> = columns
        .iter()
        .zip(params)
        .map(|(c, p)| format!("{}, ${p}", escape_literal(c)))
        .collect();
    if pairs.is_empty() {
        return "'{}'::jsonb".into();
    }
    pairs
        .chunks(50)
        .map(|chunk| format!("jsonb_build_object({})", chunk.join(", ")))
        .collect::<Vec<_>>()
        .join(" || ")
}

fn where_key(sql: &mut String, key: &[&str], offset: usize) {
    sql.push_str(" WHERE ");
    for (i, c) in key.iter().enumerate() {
        if i > 0 {
            sql.push_str(" AND ");
        }
        let _ = write!(sql, "{} = ${}", escape_identifier(c), offset + i + 1);
    }
}

fn list(sql: &mut String, items: &[&str], mut each: impl FnMut(&mut String, &str, usize)) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        each(sql, item, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_quote_every_identifier_and_number_parameters_in_order() {
        let t = qualified("public", "Odd \"name\"");
        assert_eq!(t, "\"public\".\"Odd \"\"name\"\"\"");
        assert_eq!(
            insert("\"s\".\"t\"", &["id", "v"]),
            "INSERT INTO \"s\".\"t\" (\"id\", \"v\") VALUES ($1, $2) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            update("\"s\".\"t\"", &["v", "updated_at"], &["id", "k"]),
            "UPDATE \"s\".\"t\" SET \"v\" = $1, \"updated_at\" = $2 WHERE \"id\" = $3 AND \"k\" = $4"
        );
        assert_eq!(
            delete("\"s\".\"t\"", &["id"]),
            "DELETE FROM \"s\".\"t\" WHERE \"id\" = $1"
        );
        assert_eq!(
            local_row("\"s\".\"t\"", &["id"]),
            "SELECT to_jsonb(t)::text FROM \"s\".\"t\" AS t WHERE \"id\" = $1"
        );
        assert_eq!(
            truncate(&["\"a\".\"b\"".into(), "\"a\".\"c\"".into()], true, true),
            "TRUNCATE \"a\".\"b\", \"a\".\"c\" RESTART IDENTITY CASCADE"
        );
        assert_eq!(truncate(&["x".into()], false, false), "TRUNCATE x");
    }

    #[test]
    fn logged_statements_record_their_own_conflict() {
        let c = Conflict {
            table: "public.t",
            origin: "b",
        };
        assert_eq!(
            update_logged("T", &["v", "id"], &["id"], &c),
            "WITH applied AS (UPDATE T SET \"v\" = $1, \"id\" = $2 WHERE \"id\" = $3 RETURNING 1) \
             INSERT INTO pgmm.conflicts (table_name, kind, origin, local_tuple, remote_tuple, resolution) \
             SELECT 'public.t', 'update_missing', 'b', NULL, jsonb_build_object('v', $1, 'id', $2), 'skip' \
             WHERE NOT EXISTS (SELECT 1 FROM applied)"
        );
        let ins = insert_logged("T", &["id", "v"], &[0], &c);
        assert!(ins.contains("ON CONFLICT DO NOTHING RETURNING 1)"), "{ins}");
        assert!(
            ins.contains(
                "'insert_exists', 'b', (SELECT to_jsonb(l) FROM T AS l WHERE l.\"id\" = $1)"
            ),
            "{ins}"
        );
        let del = delete_logged("T", &["k1", "k2"], &c);
        assert!(
            del.contains("jsonb_build_object('k1', $1, 'k2', $2), 'skip'"),
            "{del}"
        );
        let wide: Vec<String> = (0..120).map(|i| format!("c{i}")).collect();
        let wide: Vec<&str> = wide.iter().map(String::as_str).collect();
        let params: Vec<usize> = (1..=120).collect();
        assert_eq!(
            json_object(&wide, &params)
                .matches("jsonb_build_object(")
                .count(),
            3
        );
    }
}
