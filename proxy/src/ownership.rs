//! Front-door ownership: refuse, before Postgres sees it, a write to a table that another node
//! owns. Refusing early keeps the client's error synchronous and the owned table free of writes
//! that replication would otherwise have to reject (or silently lose) on the other nodes.
//!
//! Only table ownership (`owner = "b"`) is enforced here; row ownership needs the row values and
//! is enforced in the database.

use std::collections::HashMap;

use crate::classify::contains_ignore_ascii_case;
use crate::table::TableName;

/// Which tables this node may not write, and who may.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    local: String,
    /// Owner of each owned table, including the tables this node owns itself (they are simply
    /// allowed), so that the rules stay inspectable as configured.
    tables: HashMap<TableName, String>,
    /// How each table owned by another node can appear in statement text (lower case, with
    /// `"` doubled as inside a quoted identifier): a statement containing none of them cannot
    /// write such a table, so the front door need not parse it.
    foreign_spellings: Vec<String>,
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
        }
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

    /// First written table this node may not write, as an error, or Ok.
    pub fn check(&self, written: &[TableName]) -> Result<(), OwnershipError> {
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
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("table \"{table}\" is owned by node \"{owner}\"; write it through node \"{owner}\"")]
    TableOwned { table: TableName, owner: String },
}

impl OwnershipError {
    /// `insufficient_privilege`: the client may retry through the owner, not here.
    pub fn sqlstate(&self) -> &'static str {
        "42501"
    }

    /// The refused table, for the `pgmm_ownership_rejections_total{table}` label (bounded:
    /// only configured tables can be refused).
    pub fn table(&self) -> &TableName {
        match self {
            OwnershipError::TableOwned { table, .. } => table,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Classification;

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
        ownership().check(&classification.written)
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

    #[test]
    fn first_foreign_table_in_written_order_is_reported() {
        let own = ownership();
        let written = Classification::of("TRUNCATE sales.\"Orders\", owned_by_b, mine").written;
        // `written` is sorted: public.* before sales.*.
        assert_eq!(
            own.check(&written).unwrap_err().table(),
            &TableName::new("public", "owned_by_b")
        );
    }

    #[test]
    fn empty_rules_allow_everything() {
        let own = Ownership::new("a", []);
        assert!(own.is_empty());
        assert!(!ownership().is_empty());
        assert!(own.check(&[TableName::new("public", "owned_by_b")]).is_ok());
        // The owner itself may write.
        let own_b = Ownership::new("b", [(TableName::new("public", "owned_by_b"), "b".into())]);
        assert!(own_b
            .check(&[TableName::new("public", "owned_by_b")])
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
