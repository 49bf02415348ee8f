//! `pgmm check`: every replicated table compared across the nodes while writes go on. Each
//! node hashes its rows into buckets by key ([`super::hashes`]); buckets that differ are
//! narrowed down to rows; a row that differs is read again a few times, a second apart, so
//! that a change still in flight (replication lag) is not reported as a divergence. What still
//! differs is reported with each node's version of it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use prometheus::Registry;
use tokio_postgres::Client;

use super::{catalog, hashes, MembershipError};
use crate::config::Config;
use crate::replication::peer::{
    self, BucketHash, Member, PeerConnection, PeerIdentity, PeerMetrics, PeerTls, RowHash,
};

/// Buckets per table: a differing bucket costs reading its rows on every node.
const BUCKETS: u32 = 1024;
/// The most rows (by the buckets' counts) read to narrow differing buckets down to rows: the
/// checker holds a hash per row it reads, so a table that differs nearly everywhere (a node
/// without it) has its first buckets listed and the rest counted.
const ROW_BUDGET: i64 = 100_000;
/// How many times a differing row is read before it is reported, and the pause between.
const ROUNDS: usize = 4;
const ROUND_PAUSE: Duration = Duration::from_secs(1);

/// One row that differs: its key, and each node's hash and version of it (`None`: missing).
#[derive(Debug, Clone)]
pub struct RowDiff {
    pub key: String,
    pub versions: Vec<(String, Option<(String, String)>)>,
}

#[derive(Debug, Clone)]
pub struct TableReport {
    pub table: String,
    /// Rows per node.
    pub rows: Vec<(String, i64)>,
    pub differing: Vec<RowDiff>,
    /// Differing buckets past [`ROW_BUDGET`], not narrowed down, and their rows (the largest
    /// count among the nodes).
    pub unlisted_buckets: usize,
    pub unlisted_rows: i64,
}

impl TableReport {
    pub fn agrees(&self) -> bool {
        self.differing.is_empty() && self.unlisted_buckets == 0
    }
}

#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub tables: Vec<TableReport>,
}

impl CheckReport {
    pub fn agree(&self) -> bool {
        self.tables.iter().all(TableReport::agrees)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            let counts: Vec<String> = t.rows.iter().map(|(n, r)| format!("{n} {r}")).collect();
            if t.agrees() {
                let _ = writeln!(
                    out,
                    "{}: identical on every node (rows: {})",
                    t.table,
                    counts.join(", ")
                );
                continue;
            }
            let _ = writeln!(
                out,
                "{}: {} row(s) DIFFER (rows: {})",
                t.table,
                t.differing.len(),
                counts.join(", ")
            );
            if t.unlisted_buckets > 0 {
                let _ = writeln!(
                    out,
                    "  and {} more key bucket(s) differ (about {} rows), not listed: more than \
                     {ROW_BUDGET} rows to compare; `pgmm resync` copies the table again",
                    t.unlisted_buckets, t.unlisted_rows
                );
            }
            for d in &t.differing {
                let _ = writeln!(out, "  key {}", d.key);
                for (node, v) in &d.versions {
                    match v {
                        Some((hash, version)) => {
                            let _ = writeln!(out, "    {node}: version {version}, row hash {hash}");
                        }
                        None => {
                            let _ = writeln!(out, "    {node}: missing");
                        }
                    }
                }
            }
        }
        let differ = self.tables.iter().filter(|t| !t.agrees()).count();
        if differ == 0 {
            let _ = writeln!(out, "all {} table(s) agree", self.tables.len());
        } else {
            let _ = writeln!(
                out,
                "{differ} of {} table(s) differ; `pgmm resync` copies a table again from a node that has it right",
                self.tables.len()
            );
        }
        out
    }
}

/// One node's view: this node's own Postgres, or a peer over a request link.
enum Node {
    Local(Client),
    Peer(PeerConnection),
}

impl Node {
    async fn buckets(
        &mut self,
        table: &str,
        columns: &[String],
        key: &[String],
    ) -> Result<Vec<BucketHash>, MembershipError> {
        match self {
            Node::Local(client) => hashes::buckets(client, table, columns, key, BUCKETS).await,
            Node::Peer(conn) => {
                conn.send_member(Member::HashBuckets {
                    table: table.to_owned(),
                    columns: columns.to_vec(),
                    key: key.to_vec(),
                    buckets: BUCKETS,
                })
                .await?;
                match conn.recv_member().await? {
                    Member::BucketHashes { hashes } => Ok(hashes),
                    other => Err(MembershipError::Protocol(format!("unexpected {other:?}"))),
                }
            }
        }
    }

    async fn rows(
        &mut self,
        config: &Config,
        table: &str,
        columns: &[String],
        key: &[String],
        which: &[u32],
    ) -> Result<Vec<RowHash>, MembershipError> {
        match self {
            Node::Local(client) => {
                hashes::rows(client, config, table, columns, key, BUCKETS, which).await
            }
            Node::Peer(conn) => {
                conn.send_member(Member::HashRows {
                    table: table.to_owned(),
                    columns: columns.to_vec(),
                    key: key.to_vec(),
                    buckets: BUCKETS,
                    which: which.to_vec(),
                })
                .await?;
                let mut out = Vec::new();
                loop {
                    match conn.recv_member().await? {
                        Member::RowHashes { rows, last } => {
                            out.extend(rows);
                            if last {
                                return Ok(out);
                            }
                        }
                        other => {
                            return Err(MembershipError::Protocol(format!("unexpected {other:?}")))
                        }
                    }
                }
            }
        }
    }
}

/// Keeps in `buckets` those whose rows, added up in order, stay within `budget` (at least the
/// first), and returns the rest.
fn split_at_budget(buckets: &mut Vec<u32>, rows: &impl Fn(&u32) -> i64, budget: i64) -> Vec<u32> {
    let mut used = 0i64;
    let keep = buckets
        .iter()
        .enumerate()
        .take_while(|(i, b)| {
            used += rows(b);
            *i == 0 || used <= budget
        })
        .count();
    buckets.split_off(keep)
}

/// Compares every replicated table of this node with every peer.
pub async fn check(config: &Config) -> Result<CheckReport, MembershipError> {
    let local = hashes::session(config).await?;
    let tables = catalog::tables(&local, &[]).await?;
    let mut keys = Vec::new();
    for t in &tables {
        let key: Vec<String> = local
            .query(
                "SELECT a.attname::text FROM pg_catalog.pg_index i \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&t.oid],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        keys.push(key);
    }
    let mut nodes: Vec<(String, Node)> = vec![(config.node.name.clone(), Node::Local(local))];
    if let Some(listen) = &config.peer {
        let identity = PeerIdentity::from_config(config)
            .map_err(|e| MembershipError::Refused(e.to_string()))?;
        let tls =
            PeerTls::from_config(listen).map_err(|e| MembershipError::Refused(e.to_string()))?;
        let metrics = PeerMetrics::register(&Registry::new())
            .map_err(|e| MembershipError::Refused(e.to_string()))?;
        for p in &config.peers {
            let conn = peer::connect_for_request(
                &p.address,
                &identity,
                &p.name,
                tls.as_ref().map(|t| &t.client),
                &metrics,
            )
            .await
            .map_err(|e| MembershipError::Refused(format!("node {}: {e}", p.name)))?;
            nodes.push((p.name.clone(), Node::Peer(conn)));
        }
    }

    let mut report = CheckReport::default();
    for (t, key) in tables.iter().zip(&keys) {
        let mut columns = t.columns.clone();
        columns.sort();
        let mut per_node: Vec<BTreeMap<u32, (i64, String)>> = Vec::new();
        for (_, node) in nodes.iter_mut() {
            let hashes = node.buckets(&t.label, &columns, key).await?;
            per_node.push(
                hashes
                    .into_iter()
                    .map(|b| (b.bucket, (b.rows, b.hash)))
                    .collect(),
            );
        }
        let rows: Vec<(String, i64)> = nodes
            .iter()
            .zip(&per_node)
            .map(|((name, _), b)| (name.clone(), b.values().map(|(r, _)| r).sum()))
            .collect();
        let all: BTreeSet<u32> = per_node.iter().flat_map(|m| m.keys().copied()).collect();
        let mut differing: Vec<u32> = all
            .into_iter()
            .filter(|b| per_node.iter().any(|m| m.get(b) != per_node[0].get(b)))
            .collect();
        let bucket_rows = |b: &u32| {
            per_node
                .iter()
                .filter_map(|m| m.get(b).map(|(r, _)| *r))
                .max()
                .unwrap_or(0)
        };
        let unlisted = split_at_budget(&mut differing, &bucket_rows, ROW_BUDGET);
        let unlisted_rows = unlisted.iter().map(bucket_rows).sum();
        let mut suspects: Option<BTreeSet<String>> = None;
        let mut last: BTreeMap<String, Vec<Option<(String, String)>>> = BTreeMap::new();
        for round in 0..ROUNDS {
            if differing.is_empty() || suspects.as_ref().is_some_and(BTreeSet::is_empty) {
                break;
            }
            if round > 0 {
                tokio::time::sleep(ROUND_PAUSE).await;
            }
            let mut by_key: BTreeMap<String, Vec<Option<(String, String)>>> = BTreeMap::new();
            let n = nodes.len();
            for (i, (_, node)) in nodes.iter_mut().enumerate() {
                for r in node
                    .rows(config, &t.label, &columns, key, &differing)
                    .await?
                {
                    by_key.entry(r.key).or_insert_with(|| vec![None; n])[i] =
                        Some((r.hash, r.version));
                }
            }
            let differ: BTreeSet<String> = by_key
                .iter()
                .filter(|(_, v)| {
                    v.iter()
                        .any(|x| x.as_ref().map(|h| &h.0) != v[0].as_ref().map(|h| &h.0))
                })
                .map(|(k, _)| k.clone())
                .collect();
            suspects = Some(match suspects {
                None => differ,
                Some(prev) => prev.intersection(&differ).cloned().collect(),
            });
            last = by_key;
        }
        let differing: Vec<RowDiff> = suspects
            .unwrap_or_default()
            .into_iter()
            .map(|k| RowDiff {
                versions: nodes
                    .iter()
                    .map(|(n, _)| n.clone())
                    .zip(last.get(&k).cloned().unwrap_or_default())
                    .collect(),
                key: k,
            })
            .collect();
        report.tables.push(TableReport {
            table: t.label.clone(),
            rows,
            differing,
            unlisted_buckets: unlisted.len(),
            unlisted_rows,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_past_the_row_budget_are_counted_not_listed() {
        let rows = |b: &u32| i64::from(*b) * 10;
        let mut buckets = vec![1, 2, 3, 4, 5];
        let rest = split_at_budget(&mut buckets, &rows, 60);
        assert_eq!((buckets, rest), (vec![1, 2, 3], vec![4, 5]));
        // The first bucket is always read, however many rows it has.
        let mut buckets = vec![9, 1];
        let rest = split_at_budget(&mut buckets, &rows, 5);
        assert_eq!((buckets, rest), (vec![9], vec![1]));
    }

    #[test]
    fn a_table_with_unlisted_buckets_does_not_agree() {
        let report = CheckReport {
            tables: vec![TableReport {
                table: "public.t".into(),
                rows: vec![("a".into(), 500_000), ("b".into(), 0)],
                differing: Vec::new(),
                unlisted_buckets: 1000,
                unlisted_rows: 490_000,
            }],
        };
        assert!(!report.agree());
        let text = report.render();
        assert!(text.contains("public.t: 0 row(s) DIFFER"), "{text}");
        assert!(
            text.contains("1000 more key bucket(s) differ (about 490000 rows)"),
            "{text}"
        );
        assert!(text.contains("1 of 1 table(s) differ"), "{text}");
    }
}
