//! `pgmm resync --table T --from NODE`: one table copied again from a node that has it right,
//! the repair for a table that diverged (what `pgmm check` reports). The donor sends the table
//! at a snapshot; it lands in a staging table in schema `pgmm`, and is merged into the table
//! in one transaction with triggers off:
//!
//! - a donor row replaces the local one unless the local one is newer (a later write still on
//!   its way to the donor), and is inserted where the local one is missing;
//! - a local row the donor does not have is deleted, unless it was written after the resync
//!   began (an insert not yet at the donor).
//!
//! Run it while replication is caught up (`pgmm status`): a change in flight between other
//! nodes and the donor during the resync is judged by those two rules only. The rows it
//! changes replicate to the other nodes as this node's writes (the running node's apply
//! session holds the donor's replication origin), with the donor's values and stamps.

use futures_util::SinkExt;
use prometheus::Registry;

use super::{MembershipError, TOMBSTONES};
use crate::config::table::TableName;
use crate::config::Config;
use crate::pg::quote::qualified;
use crate::replication::peer::{self, Member, PeerIdentity, PeerMetrics, PeerTls};

/// What a resync changed.
#[derive(Debug, Default)]
pub struct ResyncReport {
    pub table: String,
    pub donor: String,
    pub received: u64,
    pub written: u64,
    pub deleted: u64,
}

impl std::fmt::Display for ResyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} resynchronised from {}: {} rows received, {} rows written, {} deleted",
            self.table, self.donor, self.received, self.written, self.deleted
        )
    }
}

pub async fn resync(
    config: &Config,
    table: &str,
    donor: &str,
) -> Result<ResyncReport, MembershipError> {
    let name = TableName::parse(table)
        .ok_or_else(|| MembershipError::Refused(format!("{table:?} is not a table name")))?;
    let sql_name = qualified(&name.schema, &name.name);
    let listen = config
        .peer
        .as_ref()
        .ok_or_else(|| MembershipError::Refused("this node has no [peer] section".to_owned()))?;
    let address = config
        .peers
        .iter()
        .find(|p| p.name == donor)
        .map(|p| p.address.clone())
        .ok_or_else(|| MembershipError::Refused(format!("node {donor} is not in [[peers]]")))?;
    let identity =
        PeerIdentity::from_config(config).map_err(|e| MembershipError::Refused(e.to_string()))?;
    let tls = PeerTls::from_config(listen).map_err(|e| MembershipError::Refused(e.to_string()))?;
    let metrics = PeerMetrics::register(&Registry::new())
        .map_err(|e| MembershipError::Refused(e.to_string()))?;

    let client = crate::pg::connect(&config.postgres).await?;
    let started: String = client
        .query_one("SELECT pg_catalog.clock_timestamp()::text", &[])
        .await?
        .get(0);
    let mut conn = peer::connect_for_request(
        &address,
        &identity,
        donor,
        tls.as_ref().map(|t| &t.client),
        &metrics,
    )
    .await?;
    conn.send_member(Member::Copy {
        tables: vec![name.to_string()],
        slot: false,
    })
    .await?;
    match conn.recv_member().await? {
        Member::Schema { .. } => {}
        other => return Err(unexpected(&other)),
    }
    let columns = match conn.recv_member().await? {
        Member::Table { columns, .. } => columns,
        other => return Err(unexpected(&other)),
    };
    let key: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary",
            &[&sql_name],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if key.is_empty() {
        return Err(MembershipError::Refused(format!(
            "{table} has no primary key here"
        )));
    }
    let ident = postgres_protocol::escape::escape_identifier;
    let cols: Vec<String> = columns.iter().map(|c| ident(c)).collect();
    let stage = format!("pgmm.{}", ident(&format!("resync_{}", name.name)));
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {stage}; \
             CREATE UNLOGGED TABLE {stage} AS SELECT {} FROM {sql_name} WITH NO DATA",
            cols.join(", ")
        ))
        .await?;
    let sink = client
        .copy_in::<_, bytes::Bytes>(&format!("COPY {stage} FROM STDIN"))
        .await?;
    futures_util::pin_mut!(sink);
    let received = loop {
        match conn.recv_member().await? {
            Member::Rows { data, .. } => sink.send(data).await?,
            Member::TableDone { rows } => break rows,
            other => return Err(unexpected(&other)),
        }
    };
    sink.as_mut().finish().await?;
    // The tombstones and the end of the copy: not needed here.
    loop {
        match conn.recv_member().await? {
            Member::Done { .. } => break,
            Member::Table { table, .. } if table == TOMBSTONES => {}
            Member::Rows { .. } | Member::TableDone { .. } => {}
            other => return Err(unexpected(&other)),
        }
    }
    drop(conn);

    let conflict = ident(&config.replication.conflict_column);
    let key_match: Vec<String> = key
        .iter()
        .map(|k| format!("s.{0} = t.{0}", ident(k)))
        .collect();
    let key_cols: Vec<String> = key.iter().map(|k| ident(k)).collect();
    let set: Vec<String> = cols.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
    let t_row: Vec<String> = cols.iter().map(|c| format!("t.{c}")).collect();
    let ex_row: Vec<String> = cols.iter().map(|c| format!("EXCLUDED.{c}")).collect();
    let mut report = ResyncReport {
        table: name.to_string(),
        donor: donor.to_owned(),
        received,
        ..ResyncReport::default()
    };
    // One transaction, triggers off. Not under the donor's replication origin: the running
    // node's apply session holds it. So the repaired rows go out to the other nodes as this
    // node's writes, with the donor's values and stamps.
    client
        .batch_execute("BEGIN; SET LOCAL session_replication_role = replica")
        .await?;
    report.written = client
        .execute(
            &format!(
                "INSERT INTO {sql_name} AS t ({cols}) SELECT {cols} FROM {stage} s \
                 ON CONFLICT ({key}) DO UPDATE SET {set} \
                 WHERE t.{conflict} <= EXCLUDED.{conflict} AND ROW({t_row}) IS DISTINCT FROM ROW({ex_row})",
                cols = cols.join(", "),
                key = key_cols.join(", "),
                set = set.join(", "),
                t_row = t_row.join(", "),
                ex_row = ex_row.join(", "),
            ),
            &[],
        )
        .await?;
    report.deleted = client
        .execute(
            &format!(
                "DELETE FROM {sql_name} t WHERE NOT EXISTS (SELECT 1 FROM {stage} s WHERE {}) \
                 AND t.{conflict} < $1::text::timestamptz",
                key_match.join(" AND ")
            ),
            &[&started],
        )
        .await?;
    client.batch_execute("COMMIT").await?;
    client.batch_execute(&format!("DROP TABLE {stage}")).await?;
    Ok(report)
}

fn unexpected(m: &Member) -> MembershipError {
    MembershipError::Protocol(format!("unexpected {m:?}").chars().take(200).collect())
}
