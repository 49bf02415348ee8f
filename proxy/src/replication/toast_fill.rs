//! Unchanged TOAST values filled in before a transaction is shipped.
//!
//! When an UPDATE leaves an out-of-line (TOASTed) column untouched, the WAL does not carry the
//! value and pgoutput sends the column as [`Datum::UnchangedToast`]: "keep what you have". That
//! is right only on a receiver whose row is the very version the update replaced. Under
//! multi-master it often is not: a node cut off during a partition wrote its own version, or a
//! third node's earlier change has not arrived yet. If the update wins there, the receiver
//! would keep its own large value under the winner's `updated_at` (a row nobody wrote), or,
//! with no row at all, could not insert the winner (`update_missing skip`), and the nodes would
//! never agree again.
//!
//! The origin cannot know whether a receiver has the replaced version, so before shipping it
//! reads every such column from its own table by the row's key and ships the value. That value
//! is the column's value as of now, which is the transaction's value or a later one; a later
//! one comes from a later transaction that changed that column, and that transaction ships
//! the column itself (a changed column is never "unchanged"), so every receiver converges to
//! the newest version whole. A row no longer there (deleted since, or its key changed) keeps
//! the marker: a later change of it is on its way. A table that cannot be read any more
//! (dropped since) keeps it too, rather than stopping the stream.
//!
//! The price is a read of the large values of updated rows on the origin and their bytes on the
//! link, only for updates that leave a TOASTed column untouched.

use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::replication::changeset::{Change, ChangeSet};
use crate::replication::pgoutput::Datum;

/// Rows looked up per query: one query of `UNION ALL` branches, each an index lookup.
const ROWS_PER_QUERY: usize = 100;

/// Why filling failed (the local connection broke, or the server failed the read for another
/// reason than a missing table or column), so the transaction cannot be shipped as it must be;
/// the shipper reconnects and reads it again.
#[derive(Debug, thiserror::Error)]
#[error("reading unchanged TOAST values from the local table: {0}")]
pub struct FillError(#[source] pub tokio_postgres::Error);

/// One update to fill: its position in the change set, and the positions of its unchanged
/// columns.
struct Wanted {
    change: usize,
    columns: Vec<usize>,
}

/// Whether any update of `set` carries an unchanged TOAST value.
pub fn needs_fill(set: &ChangeSet) -> bool {
    set.changes.iter().any(|c| match c {
        Change::Update { new, .. } => new.contains(&Datum::UnchangedToast),
        _ => false,
    })
}

/// Replaces the unchanged TOAST values of `set`'s updates by the rows' values in the local
/// table, where the row is still there (module docs).
pub async fn fill(client: &Client, set: &mut ChangeSet) -> Result<(), FillError> {
    let mut wanted: Vec<Wanted> = Vec::new();
    for (i, change) in set.changes.iter().enumerate() {
        let Change::Update { table, new, .. } = change else {
            continue;
        };
        let Some(desc) = set.tables.get(*table as usize) else {
            continue;
        };
        let columns: Vec<usize> = (0..new.len())
            .filter(|&j| new[j] == Datum::UnchangedToast)
            .collect();
        let key_known = desc
            .key
            .iter()
            .all(|&k| matches!(new.get(k), Some(Datum::Text(_))));
        if !columns.is_empty() && key_known {
            wanted.push(Wanted { change: i, columns });
        }
    }
    for chunk in wanted.chunks(ROWS_PER_QUERY) {
        let sql = lookup_sql(set, chunk);
        let messages = match client.simple_query(&sql).await {
            Ok(m) => m,
            // Only a table or column that is gone (or not readable) leaves the markers; any
            // other failure is retried with the transaction, never shipped unfilled.
            Err(e) if !e.code().is_some_and(|c| c.code().starts_with("42")) => {
                return Err(FillError(e))
            }
            Err(e) => {
                tracing::debug!(error = %e, "unchanged TOAST values could not be read; shipping the markers");
                continue;
            }
        };
        for message in messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            let Some(index) = row.get(0).and_then(|s| s.parse::<usize>().ok()) else {
                continue;
            };
            let Some(w) = chunk.get(index) else {
                continue;
            };
            if let Change::Update { new, .. } = &mut set.changes[w.change] {
                for (n, &j) in w.columns.iter().enumerate() {
                    new[j] = match row.get(n + 1) {
                        Some(v) => Datum::Text(bytes::Bytes::copy_from_slice(v.as_bytes())),
                        None => Datum::Null,
                    };
                }
            }
        }
    }
    Ok(())
}

/// One query for `chunk`: a branch per row, tagged with its index in the chunk, reading the
/// row's unchanged columns by its key. Keys are literals of the origin's text output, which
/// the server reads back as the key columns' types.
fn lookup_sql(set: &ChangeSet, chunk: &[Wanted]) -> String {
    let mut branches: Vec<String> = Vec::with_capacity(chunk.len());
    for (index, w) in chunk.iter().enumerate() {
        let Change::Update { table, new, .. } = &set.changes[w.change] else {
            unreachable!("only updates are wanted");
        };
        let desc = &set.tables[*table as usize];
        let columns: Vec<String> = w
            .columns
            .iter()
            .map(|&j| escape_identifier(&desc.columns[j]))
            .collect();
        let key: Vec<String> = desc
            .key
            .iter()
            .map(|&k| {
                let value = new[k].as_str().unwrap_or_default();
                format!(
                    "{} = {}",
                    escape_identifier(&desc.columns[k]),
                    escape_literal(value)
                )
            })
            .collect();
        branches.push(format!(
            "(SELECT {index}, {} FROM ONLY {}.{} WHERE {})",
            columns.join(", "),
            escape_identifier(&desc.schema),
            escape_identifier(&desc.name),
            key.join(" AND ")
        ));
    }
    branches.join(" UNION ALL ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::changeset::TableDesc;

    fn text(s: &str) -> Datum {
        Datum::Text(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }

    fn set(changes: Vec<Change>) -> ChangeSet {
        ChangeSet {
            tables: vec![TableDesc {
                schema: "Odd s".into(),
                name: "t".into(),
                columns: vec!["id".into(), "big".into(), "v".into()],
                key: vec![0],
            }],
            changes,
        }
    }

    #[test]
    fn only_updates_with_an_unchanged_value_need_filling() {
        let plain = set(vec![Change::Update {
            table: 0,
            old_key: None,
            new: vec![text("1"), text("x"), text("v")],
            old_stamp: None,
        }]);
        assert!(!needs_fill(&plain));
        let toast = set(vec![Change::Update {
            table: 0,
            old_key: None,
            new: vec![text("1"), Datum::UnchangedToast, text("v")],
            old_stamp: None,
        }]);
        assert!(needs_fill(&toast));
    }

    #[test]
    fn the_lookup_reads_each_rows_unchanged_columns_by_its_quoted_key() {
        let s = set(vec![
            Change::Update {
                table: 0,
                old_key: None,
                new: vec![text("it's"), Datum::UnchangedToast, text("v")],
                old_stamp: None,
            },
            Change::Update {
                table: 0,
                old_key: None,
                new: vec![text("2"), Datum::UnchangedToast, Datum::UnchangedToast],
                old_stamp: None,
            },
        ]);
        let wanted = vec![
            Wanted {
                change: 0,
                columns: vec![1],
            },
            Wanted {
                change: 1,
                columns: vec![1, 2],
            },
        ];
        assert_eq!(
            lookup_sql(&s, &wanted),
            "(SELECT 0, \"big\" FROM ONLY \"Odd s\".\"t\" WHERE \"id\" = 'it''s') UNION ALL \
             (SELECT 1, \"big\", \"v\" FROM ONLY \"Odd s\".\"t\" WHERE \"id\" = '2')"
        );
    }
}
