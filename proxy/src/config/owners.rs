//! Who owns what: the `[[ownership]]` rules evaluated for a table, a row or a remote change.
//!
//! The same rules are enforced in three places, so they live here once: the front door refuses
//! table-owned writes before Postgres sees them (`ownership`), the guard triggers pgmm installs
//! refuse any local write the node may not make whatever its SQL shape (`guard`), and apply
//! refuses a change its origin may not have made (`apply`), which is what protects the cluster
//! from a node whose guards were bypassed. All three speak the one message format of
//! [`table_message`] and [`row_message`].

use std::collections::HashMap;

use crate::config::table::TableName;
use crate::config::{Config, OwnerSpec};

/// `table "public.x" is owned by node "b"; write it through node "b"`.
pub fn table_message(table: &TableName, owner: &str) -> String {
    format!("table \"{table}\" is owned by node \"{owner}\"; write it through node \"{owner}\"")
}

/// `row (id)=(5) of "public.x" is owned by node "b"; write it through node "b"`.
pub fn row_message(key: &str, table: &TableName, owner: &str) -> String {
    format!(
        "row {key} of \"{table}\" is owned by node \"{owner}\"; write it through node \"{owner}\""
    )
}

/// The ownership rules of a cluster, with the ordered node list that `owner_key` needs.
#[derive(Debug, Clone, Default)]
pub struct OwnerRules {
    nodes: Vec<String>,
    rules: HashMap<TableName, OwnerSpec>,
}

/// What a rule says about one row write by one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The whole table belongs to this node.
    TableOwned {
        owner: String,
    },
    /// The row belongs to this node (by its owner column or key).
    RowOwned {
        owner: String,
    },
    /// The row names no owner (NULL or unparsable owner column or key).
    NoOwner,
}

impl OwnerRules {
    pub fn new(
        nodes: Vec<String>,
        rules: impl IntoIterator<Item = (TableName, OwnerSpec)>,
    ) -> Self {
        OwnerRules {
            nodes,
            rules: rules.into_iter().collect(),
        }
    }

    pub fn from_config(config: &Config) -> Self {
        OwnerRules::new(
            config.cluster.nodes.clone(),
            config
                .ownership
                .iter()
                .map(|r| (r.table.clone(), r.owner.clone())),
        )
    }

    /// The cluster's nodes in configured order (`owner_key` positions).
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    pub fn rule(&self, table: &TableName) -> Option<&OwnerSpec> {
        self.rules.get(table)
    }

    /// The node that owns rows whose `owner_key` value is `key` (its text form): node `i` of
    /// `n` owns `key % n == i` (a mathematical modulo, so negative keys have an owner too).
    /// `None` when the value is not an integer.
    pub fn key_owner(&self, key: &str) -> Option<&str> {
        let value: i128 = key.trim().parse().ok()?;
        let n = i128::try_from(self.nodes.len()).ok().filter(|n| *n > 0)?;
        let i = usize::try_from(value.rem_euclid(n)).ok()?;
        self.nodes.get(i).map(String::as_str)
    }

    /// Whether `node` may write a row of `table` whose owner column (for `owner_column`) or
    /// key (for `owner_key`) has the text value `row_owner_value` (`None` for NULL). Table
    /// ownership ignores the value.
    pub fn row_verdict(
        &self,
        node: &str,
        table: &TableName,
        row_owner_value: Option<&str>,
    ) -> Verdict {
        match self.rules.get(table) {
            None => Verdict::Allowed,
            Some(OwnerSpec::Node(owner)) if owner == node => Verdict::Allowed,
            Some(OwnerSpec::Node(owner)) => Verdict::TableOwned {
                owner: owner.clone(),
            },
            Some(OwnerSpec::Column(_)) => match row_owner_value {
                Some(v) if v == node => Verdict::Allowed,
                Some(v) => Verdict::RowOwned {
                    owner: v.to_owned(),
                },
                None => Verdict::NoOwner,
            },
            Some(OwnerSpec::Key(_)) => match row_owner_value.and_then(|v| self.key_owner(v)) {
                Some(owner) if owner == node => Verdict::Allowed,
                Some(owner) => Verdict::RowOwned {
                    owner: owner.to_owned(),
                },
                None => Verdict::NoOwner,
            },
        }
    }

    /// Tables owned row by row (`owner_column` or `owner_key`).
    pub fn row_owned_tables(&self) -> impl Iterator<Item = &TableName> + '_ {
        self.rules
            .iter()
            .filter(|(_, spec)| !matches!(spec, OwnerSpec::Node(_)))
            .map(|(t, _)| t)
    }

    /// Whether the table is owned by key (`owner_key`).
    pub fn is_key_owned(&self, table: &TableName) -> bool {
        matches!(self.rules.get(table), Some(OwnerSpec::Key(_)))
    }

    /// The column whose value decides a row's owner, for row-owned tables.
    pub fn owner_column(&self, table: &TableName) -> Option<&str> {
        match self.rules.get(table) {
            Some(OwnerSpec::Column(c)) | Some(OwnerSpec::Key(c)) => Some(c),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> OwnerRules {
        OwnerRules::new(
            vec!["a".into(), "b".into(), "c".into()],
            [
                (TableName::new("public", "cat"), OwnerSpec::Node("b".into())),
                (
                    TableName::new("public", "acct"),
                    OwnerSpec::Column("home".into()),
                ),
                (TableName::new("public", "ord"), OwnerSpec::Key("id".into())),
            ],
        )
    }

    #[test]
    fn key_ownership_is_a_mathematical_modulo_over_the_ordered_nodes() {
        let r = rules();
        assert_eq!(r.key_owner("0"), Some("a"));
        assert_eq!(r.key_owner("4"), Some("b"));
        assert_eq!(r.key_owner(" 5"), Some("c"));
        assert_eq!(r.key_owner("-1"), Some("c"));
        assert_eq!(r.key_owner("-3"), Some("a"));
        assert_eq!(r.key_owner("99999999999999999999"), Some("a"));
        assert_eq!(r.key_owner("1.5"), None);
        assert_eq!(r.key_owner("x"), None);
        assert_eq!(OwnerRules::new(vec![], []).key_owner("1"), None);
    }

    #[test]
    fn verdicts_name_the_owner() {
        let r = rules();
        let t = |n: &str| TableName::new("public", n);
        assert_eq!(r.row_verdict("a", &t("free"), None), Verdict::Allowed);
        assert_eq!(r.row_verdict("b", &t("cat"), None), Verdict::Allowed);
        assert_eq!(
            r.row_verdict("a", &t("cat"), Some("a")),
            Verdict::TableOwned { owner: "b".into() }
        );
        assert_eq!(r.row_verdict("a", &t("acct"), Some("a")), Verdict::Allowed);
        assert_eq!(
            r.row_verdict("a", &t("acct"), Some("c")),
            Verdict::RowOwned { owner: "c".into() }
        );
        assert_eq!(r.row_verdict("a", &t("acct"), None), Verdict::NoOwner);
        assert_eq!(r.row_verdict("b", &t("ord"), Some("7")), Verdict::Allowed);
        assert_eq!(
            r.row_verdict("a", &t("ord"), Some("7")),
            Verdict::RowOwned { owner: "b".into() }
        );
        assert_eq!(r.row_verdict("a", &t("ord"), Some("x")), Verdict::NoOwner);
        assert_eq!(r.owner_column(&t("acct")), Some("home"));
        assert_eq!(r.owner_column(&t("ord")), Some("id"));
        assert_eq!(r.owner_column(&t("cat")), None);
    }

    #[test]
    fn messages_have_one_format() {
        let t = TableName::new("public", "x");
        assert_eq!(
            table_message(&t, "b"),
            "table \"public.x\" is owned by node \"b\"; write it through node \"b\""
        );
        assert_eq!(
            row_message("(id)=(5)", &t, "b"),
            "row (id)=(5) of \"public.x\" is owned by node \"b\"; write it through node \"b\""
        );
    }
}
