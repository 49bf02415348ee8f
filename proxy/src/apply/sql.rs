//! The statements apply runs, as text. One text per (table, operation, column set): the apply
//! session prepares each text once and caches it by the text itself, so building the text is
//! the whole cache key.
//!
//! Every value is a parameter, sent in text format and parsed by the local server into the
//! column's own type: Postgres infers each parameter's type from the column it is compared
//! with or assigned to, so no type needs to be known here.

use std::fmt::Write as _;

use postgres_protocol::escape::escape_identifier;

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
}
