//! Front-door ownership: refuse, before Postgres sees it, a write to a table that another node
//! owns. Refusing early keeps the client's error synchronous and the owned table free of writes
//! that replication would otherwise have to reject (or silently lose) on the other nodes.
//!
//! Table ownership (`owner = "b"`) is enforced for every write. Row ownership is enforced here
//! where the statement itself tells the row's owner: an `INSERT ... VALUES` whose owner column
//! (or key) is a literal, checked at Parse or Query, or a parameter, checked at each Bind of the
//! prepared statement. Anything else (expressions, INSERT ... SELECT, UPDATE and DELETE, which
//! need the stored row) is left to the guard trigger in the database, which has the values.

use std::collections::HashMap;

use crate::config::owners::{row_message, table_message, OwnerRules, Verdict};
use crate::config::table::TableName;
use crate::frontdoor::classify::{contains_ignore_ascii_case, Classification, InsertedValue};
use crate::pg::SqlState;

/// Which tables this node may not write, and who may.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    local: String,
    /// Owner of each owned table, including the tables this node owns itself (they are simply
    /// allowed), so that the rules stay inspectable as configured.
    tables: HashMap<TableName, String>,
    /// How each table owned by another node can appear in statement text (lower case, with
    /// `"` doubled as inside a quoted identifier): a statement containing none of them cannot
    /// write such a table, so the front door need not parse it. Row-owned tables are in it too.
    foreign_spellings: Vec<String>,
    /// Row ownership rules (and the node list), for INSERTs with literal or bound owners.
    rows: OwnerRules,
    /// Whether `rows` has any rule: checked for every Parse, so kept at hand.
    any_row_rules: bool,
}

impl Ownership {
    pub fn new(
        local_node: &str,
        table_owners: impl IntoIterator<Item = (TableName, String)>,
    ) -> Self {
        let tables: HashMap<TableName, String> = table_owners.into_iter().collect();
        let mut foreign_spellings: Vec<String> = tables
            .iter()
            .filter(|(_, owner)| owner.as_str() != local_node)
            .map(|(table, _)| table.name.to_lowercase().replace('"', "\"\""))
            .collect();
        foreign_spellings.sort();
        foreign_spellings.dedup();
        Self {
            local: local_node.to_owned(),
            tables,
            foreign_spellings,
            rows: OwnerRules::default(),
            any_row_rules: false,
        }
    }

    /// These rules plus the row ownership rules of `rules` (its `owner_column` and `owner_key`
    /// entries).
    pub fn with_rows(mut self, rules: OwnerRules) -> Self {
        for table in rules.row_owned_tables() {
            self.foreign_spellings
                .push(table.name.to_lowercase().replace('"', "\"\""));
        }
        self.foreign_spellings.sort();
        self.foreign_spellings.dedup();
        self.any_row_rules = rules.row_owned_tables().next().is_some();
        self.rows = rules;
        self
    }

    /// Whether `sql` might write a table another node owns, judged by a substring scan: false
    /// only when no such table's name appears in the text at all (any case, quoted or not).
    /// Non-ASCII text and Unicode-escaped identifiers (`U&"..."`) always answer true, since
    /// their spelling of a name may differ from the stored one.
    pub fn may_write_foreign(&self, sql: &str) -> bool {
        if self.foreign_spellings.is_empty() {
            return false;
        }
        if !sql.is_ascii() {
            return true;
        }
        contains_ignore_ascii_case(sql, "u&")
            || self
                .foreign_spellings
                .iter()
                .any(|name| contains_ignore_ascii_case(sql, name))
    }

    /// First written table this node may not write, or row it may not insert, as an error.
    pub fn check(&self, class: &Classification) -> Result<(), OwnershipError> {
        self.check_tables(&class.written)?;
        for (table, column, value) in self.owner_values(class) {
            if let InsertedValue::Literal(value) = value {
                self.check_row(table, column, value)?;
            }
        }
        Ok(())
    }

    /// Each inserted row's value for its table's owner column (or key), with the table and
    /// the column: what row ownership can be judged by before the database sees the row.
    fn owner_values<'c>(
        &'c self,
        class: &'c Classification,
    ) -> impl Iterator<Item = (&'c TableName, &'c str, &'c InsertedValue)> + 'c {
        class.inserted.iter().flat_map(move |insert| {
            let column = self.rows.owner_column(&insert.table);
            let position =
                column.and_then(|column| insert.columns.iter().position(|c| c == column));
            insert
                .rows
                .iter()
                .filter_map(move |row| Some((&insert.table, column?, row.get(position?)?)))
        })
    }

    fn check_row(
        &self,
        table: &TableName,
        column: &str,
        value: &str,
    ) -> Result<(), OwnershipError> {
        match self.rows.row_verdict(&self.local, table, Some(value)) {
            Verdict::RowOwned { owner } => Err(OwnershipError::RowOwned {
                table: table.clone(),
                row: format!("({column})=({value})"),
                owner,
            }),
            _ => Ok(()),
        }
    }

    /// Whether any table is owned row by row: only then can a Bind need a look.
    pub fn has_row_rules(&self) -> bool {
        self.any_row_rules
    }

    /// The parameters whose bound values decide the owner of a row the statement inserts, for
    /// [`Ownership::check_bound`] at each Bind; empty for most statements.
    pub fn bound_checks(&self, class: &Classification) -> Vec<BoundCheck> {
        self.owner_values(class)
            .filter_map(|(table, column, value)| match value {
                InsertedValue::Param(n) => Some(BoundCheck {
                    table: table.clone(),
                    column: column.to_owned(),
                    param: n - 1,
                    key: self.rows.is_key_owned(table),
                }),
                _ => None,
            })
            .collect()
    }

    /// Checks a Bind's parameter values (bytes, binary format?) against `checks`.
    pub fn check_bound(
        &self,
        checks: &[BoundCheck],
        params: &[crate::frontdoor::wire::BoundParam<'_>],
    ) -> Result<(), OwnershipError> {
        for check in checks {
            let Some((Some(bytes), binary)) = params.get(check.param) else {
                continue;
            };
            let value = match (binary, check.key) {
                // Text with a NUL byte is no value Postgres accepts (it refuses the Bind with
                // 22021), so there is no row to judge; and a refusal naming it could not be
                // raised, since the SQL that raises it cannot carry a NUL.
                (false, _) | (true, false) => match std::str::from_utf8(bytes) {
                    Ok(text) if !text.contains('\0') => text.to_owned(),
                    _ => continue,
                },
                // Binary integers of the key's type: int2, int4 or int8, big-endian.
                (true, true) => match **bytes {
                    [a, b] => i16::from_be_bytes([a, b]).to_string(),
                    [a, b, c, d] => i32::from_be_bytes([a, b, c, d]).to_string(),
                    [a, b, c, d, e, f, g, h] => {
                        i64::from_be_bytes([a, b, c, d, e, f, g, h]).to_string()
                    }
                    _ => continue,
                },
            };
            self.check_row(&check.table, &check.column, &value)?;
        }
        Ok(())
    }

    /// First written table this node may not write, as an error, or Ok.
    pub fn check_tables(&self, written: &[TableName]) -> Result<(), OwnershipError> {
        if self.tables.is_empty() {
            return Ok(());
        }
        for table in written {
            if let Some(owner) = self.tables.get(table) {
                if *owner != self.local {
                    return Err(OwnershipError::TableOwned {
                        table: table.clone(),
                        owner: owner.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// True when no table has an owner, so the front door can skip the check altogether.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && !self.any_row_rules
    }
}

/// A parameter of a prepared INSERT whose bound value names the row's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundCheck {
    pub table: TableName,
    pub column: String,
    /// 0-based parameter index.
    pub param: usize,
    /// `owner_key` (an integer) rather than `owner_column` (a node name).
    pub key: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("{}", table_message(.table, .owner))]
    TableOwned { table: TableName, owner: String },
    #[error("{}", row_message(.row, .table, .owner))]
    RowOwned {
        table: TableName,
        /// `(column)=(value)`.
        row: String,
        owner: String,
    },
}

impl SqlState for OwnershipError {
    /// `insufficient_privilege`: the client may retry through the owner, not here.
    fn sqlstate(&self) -> &str {
        "42501"
    }
}

impl OwnershipError {
    /// The refused table, for the `pgmm_ownership_rejections_total{table}` label (bounded:
    /// only configured tables can be refused).
    pub fn table(&self) -> &TableName {
        match self {
            OwnershipError::TableOwned { table, .. } | OwnershipError::RowOwned { table, .. } => {
                table
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OwnerSpec;

    fn ownership() -> Ownership {
        Ownership::new(
            "a",
            [
                (
                    TableName::parse("public.owned_by_b").unwrap(),
                    "b".to_owned(),
                ),
                (
                    TableName::parse("sales.\"Orders\"").unwrap(),
                    "c".to_owned(),
                ),
                (TableName::parse("mine").unwrap(), "a".to_owned()),
            ],
        )
    }

    fn check_sql(sql: &str) -> Result<(), OwnershipError> {
        let classification = Classification::of(sql);
        assert!(classification.parsed, "{sql}");
        ownership().check(&classification)
    }

    #[test]
    fn refusal_message_and_sqlstate() {
        let err = check_sql("INSERT INTO owned_by_b VALUES (1)").unwrap_err();
        assert_eq!(
            err.to_string(),
            "table \"public.owned_by_b\" is owned by node \"b\"; write it through node \"b\""
        );
        assert_eq!(err.sqlstate(), "42501");
        assert_eq!(err.table(), &TableName::new("public", "owned_by_b"));
    }

    #[test]
    fn writes_to_foreign_tables_are_refused() {
        for sql in [
            "INSERT INTO owned_by_b VALUES (1)",
            "insert into PUBLIC.OWNED_BY_B values (1)",
            "UPDATE owned_by_b SET x = 1",
            "DELETE FROM public.owned_by_b",
            "MERGE INTO owned_by_b t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
            "COPY owned_by_b FROM STDIN",
            "TRUNCATE shared, owned_by_b",
            "WITH x AS (DELETE FROM owned_by_b RETURNING *) SELECT * FROM x",
            "EXPLAIN ANALYZE UPDATE owned_by_b SET x = 1",
            "PREPARE p AS INSERT INTO owned_by_b VALUES ($1)",
            "BEGIN; INSERT INTO shared VALUES (1); INSERT INTO owned_by_b VALUES (1); COMMIT",
        ] {
            let err = check_sql(sql).expect_err(sql);
            assert_eq!(
                err.table(),
                &TableName::new("public", "owned_by_b"),
                "{sql}"
            );
        }
        let err = check_sql("UPDATE Sales.\"Orders\" SET x = 1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "table \"sales.Orders\" is owned by node \"c\"; write it through node \"c\""
        );
    }

    #[test]
    fn reads_own_and_shared_tables_pass() {
        for sql in [
            "SELECT * FROM owned_by_b",
            "COPY owned_by_b TO STDOUT",
            "EXPLAIN UPDATE owned_by_b SET x = 1",
            "UPDATE shared SET x = o.x FROM owned_by_b o WHERE shared.id = o.id",
            "INSERT INTO shared SELECT * FROM owned_by_b",
            "INSERT INTO mine VALUES (1)",
            "INSERT INTO public.\"OWNED_BY_B\" VALUES (1)",
            "INSERT INTO other_schema.owned_by_b VALUES (1)",
            "UPDATE sales.orders SET x = 1",
            "BEGIN",
        ] {
            assert!(check_sql(sql).is_ok(), "{sql}");
        }
    }

    /// Node a of [a, b, c]; `acct` rows belong to the node in `home`, `ord` rows by `id % 3`.
    fn row_owned() -> Ownership {
        Ownership::new("a", []).with_rows(OwnerRules::new(
            vec!["a".into(), "b".into(), "c".into()],
            [
                (
                    TableName::new("public", "acct"),
                    OwnerSpec::Column("home".into()),
                ),
                (TableName::new("public", "ord"), OwnerSpec::Key("id".into())),
            ],
        ))
    }

    #[test]
    fn inserts_with_a_literal_owner_of_another_node_are_refused() {
        let own = row_owned();
        assert!(own.may_write_foreign("insert into ACCT values (1)"));
        assert!(!own.is_empty());
        let check = |sql: &str| own.check(&Classification::of(sql));
        let err = check("INSERT INTO acct (id, home) VALUES (1, 'a'), (2, 'b')").unwrap_err();
        assert_eq!(
            err.to_string(),
            "row (home)=(b) of \"public.acct\" is owned by node \"b\"; write it through node \"b\""
        );
        assert_eq!(err.sqlstate(), "42501");
        assert!(check("INSERT INTO acct (id, home) VALUES (1, 'a')").is_ok());
        // Parameters and expressions are the database's to judge.
        assert!(check("INSERT INTO acct (id, home) VALUES ($1, $2)").is_ok());
        assert!(check("INSERT INTO acct (id, home) VALUES (1, lower('B'))").is_ok());
        // No column list: the position of the owner column is unknown here.
        assert!(check("INSERT INTO acct VALUES (1, 'b')").is_ok());
        let err = check("insert into ord (id, v) values (-2, 'x')").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("row (id)=(-2) of \"public.ord\" is owned by node \"b\""),
            "{err}"
        );
        assert!(check("insert into ord (id, v) values (3, 'x'), (6, 'y')").is_ok());
    }

    #[test]
    fn bound_owner_parameters_are_checked_at_bind() {
        let own = row_owned();
        assert!(own.has_row_rules());
        let checks = own.bound_checks(&Classification::of(
            "INSERT INTO acct (id, home) VALUES ($1, $2), (3, $4)",
        ));
        assert_eq!(checks.iter().map(|c| c.param).collect::<Vec<_>>(), [1, 3]);
        let text = |s: &'static str| (Some(s.as_bytes()), false);
        assert!(own
            .check_bound(&checks, &[text("1"), text("a"), text("x"), text("a")])
            .is_ok());
        let err = own
            .check_bound(&checks, &[text("1"), text("a"), text("x"), text("c")])
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("row (home)=(c) of \"public.acct\""),
            "{err}"
        );
        // NULL owners are the database's to refuse; binary text is its bytes.
        assert!(own
            .check_bound(&checks, &[text("1"), (None, false)])
            .is_ok());
        assert!(own
            .check_bound(&checks, &[text("1"), (Some(b"b".as_slice()), true)])
            .is_err());
        // A NUL in the owner is Postgres's to refuse (found by random Binds: the refusal
        // naming it could not be raised and panicked the session).
        for value in [b"b\0".as_slice(), b"\0", b"c\0c"] {
            for binary in [false, true] {
                assert!(own
                    .check_bound(&checks, &[text("1"), (Some(value), binary)])
                    .is_ok());
            }
        }
        // Binary integer keys of every width.
        let key = own.bound_checks(&Classification::of(
            "insert into ord (id, v) values ($1, $2)",
        ));
        assert_eq!(key.len(), 1);
        for (bytes, refused) in [
            (3i64.to_be_bytes().to_vec(), false),
            (4i64.to_be_bytes().to_vec(), true),
            (7i32.to_be_bytes().to_vec(), true),
            (6i16.to_be_bytes().to_vec(), false),
        ] {
            let r = own.check_bound(&key, &[(Some(bytes.as_slice()), true)]);
            assert_eq!(r.is_err(), refused, "{bytes:?}");
        }
        assert!(own
            .bound_checks(&Classification::of(
                "INSERT INTO acct (id, home) VALUES (1, 'a')"
            ))
            .is_empty());
    }

    #[test]
    fn first_foreign_table_in_written_order_is_reported() {
        let own = ownership();
        let written = Classification::of("TRUNCATE sales.\"Orders\", owned_by_b, mine").written;
        // `written` is sorted: public.* before sales.*.
        assert_eq!(
            own.check_tables(&written).unwrap_err().table(),
            &TableName::new("public", "owned_by_b")
        );
    }

    #[test]
    fn empty_rules_allow_everything() {
        let own = Ownership::new("a", []);
        assert!(own.is_empty());
        assert!(!ownership().is_empty());
        assert!(own
            .check_tables(&[TableName::new("public", "owned_by_b")])
            .is_ok());
        // The owner itself may write.
        let own_b = Ownership::new("b", [(TableName::new("public", "owned_by_b"), "b".into())]);
        assert!(own_b
            .check_tables(&[TableName::new("public", "owned_by_b")])
            .is_ok());
    }

    #[test]
    fn foreign_names_prefilter() {
        let o = Ownership::new(
            "a",
            [
                (TableName::new("public", "owned_by_b"), "b".to_string()),
                (TableName::new("public", "Mine"), "a".to_string()),
                (TableName::new("s", "We\"ird"), "c".to_string()),
            ],
        );
        assert!(o.may_write_foreign("INSERT INTO Owned_By_B VALUES (1)"));
        assert!(o.may_write_foreign("update s.\"We\"\"ird\" set x = 1"));
        assert!(o.may_write_foreign("insert into U&\"\\0061\" values (1)"));
        assert!(o.may_write_foreign("insert into café values (1)"));
        assert!(!o.may_write_foreign("insert into \"Mine\" values (1)"));
        assert!(!o.may_write_foreign("select * from pgbench_accounts"));
        assert!(!Ownership::new("a", []).may_write_foreign("insert into owned_by_b values (1)"));
    }
}
