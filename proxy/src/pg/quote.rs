//! Quoting for the SQL pgmm generates, in one place: SQL identifiers, the replication
//! protocol's grammar (which has SQL's quoting rules but no `E''` strings), and the readable
//! form used in DDL an operator reads.

use postgres_protocol::escape::escape_identifier;

use crate::config::table::TableName;

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", escape_identifier(schema), escape_identifier(name))
}

/// A double-quoted identifier for the replication grammar, which has the SQL quoting rules.
pub fn replication_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A single-quoted string constant; the replication scanner knows no backslash escapes.
pub fn replication_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// An identifier as a person would write it: bare when Postgres would read it back unchanged,
/// quoted otherwise (publication DDL that an operator reads in logs and `\dRp+`).
pub fn readable_ident(ident: &str) -> String {
    let simple = ident
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && ident
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if simple && !RESERVED.contains(&ident) {
        ident.to_owned()
    } else {
        escape_identifier(ident)
    }
}

/// `schema.name`, each part as [`readable_ident`] writes it.
pub fn readable_table(table: &TableName) -> String {
    format!(
        "{}.{}",
        readable_ident(&table.schema),
        readable_ident(&table.name)
    )
}

/// Keywords that cannot name a table or column unquoted (PostgreSQL's "reserved" and "reserved
/// (can be function or type)" categories).
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "binary",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "group",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "intersect",
    "into",
    "is",
    "isnull",
    "join",
    "lateral",
    "leading",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "natural",
    "not",
    "notnull",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "outer",
    "overlaps",
    "placing",
    "primary",
    "references",
    "returning",
    "right",
    "select",
    "session_user",
    "similar",
    "some",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_quote_only_when_needed() {
        assert_eq!(readable_ident("orders"), "orders");
        assert_eq!(readable_ident("_a$1"), "_a$1");
        assert_eq!(readable_ident("Orders"), "\"Orders\"");
        assert_eq!(readable_ident("user"), "\"user\"");
        assert_eq!(readable_ident("a b"), "\"a b\"");
        assert_eq!(readable_ident("1x"), "\"1x\"");
        assert_eq!(readable_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            readable_table(&TableName::new("Sales", "order")),
            "\"Sales\".\"order\""
        );
    }
}
