//! Leaving: a node is removed from the cluster by taking it out of `[cluster] nodes` (and
//! `[[peers]]`) on every remaining node and restarting each. At start a node drops its slots
//! for nodes no longer in the cluster, so that no slot retains WAL for a node that will never
//! read it, and the tombstone purge (which waits only for the configured peers' slots) no
//! longer waits for it either.

use tokio_postgres::Client;

use crate::config::Config;
use crate::pg::pg_error_text;

/// Drops the logical slots `pgmm_<node>` of this database whose node is not in `[cluster]
/// nodes`. A slot in use is left (and logged): something still streams it.
pub async fn drop_departed_slots(
    client: &Client,
    config: &Config,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT slot_name::text, active, \
                    pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::bigint \
             FROM pg_catalog.pg_replication_slots \
             WHERE slot_type = 'logical' AND plugin = 'pgoutput' \
               AND database = pg_catalog.current_database() \
               AND slot_name LIKE 'pgmm\\_%' AND NOT substr(slot_name, 6) = ANY ($1::text[])",
            &[&config.cluster.nodes],
        )
        .await?;
    let mut dropped = Vec::new();
    for row in rows {
        let slot: String = row.get(0);
        let active: bool = row.get(1);
        let retained: Option<i64> = row.get(2);
        if active {
            tracing::warn!(%slot, "node {} is not in [cluster] nodes, but its slot is in use: left in place", &slot[5..]);
            continue;
        }
        match client
            .execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => {
                tracing::warn!(
                    %slot,
                    retained_wal_bytes = retained.unwrap_or(0),
                    "node {} has left the cluster (not in [cluster] nodes): its slot is dropped",
                    &slot[5..]
                );
                dropped.push(slot);
            }
            Err(e) => {
                tracing::warn!(%slot, error = %pg_error_text(&e), "dropping the slot of a departed node failed")
            }
        }
    }
    Ok(dropped)
}
