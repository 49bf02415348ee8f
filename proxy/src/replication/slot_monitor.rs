//! The slot monitor: reads this node's replication slots (one per peer, `pgmm_<peer>`) every few
//! seconds for the lag and retained-WAL gauges, and reports the states in which a slot stops
//! working: missing (dropped by hand) and invalidated.
//!
//! An invalidated slot (`wal_status = 'lost'`) is one whose WAL Postgres removed, most often
//! because the peer stayed away until the slot retained more than `max_slot_wal_keep_size`
//! (17+ names the cause in `invalidation_reason`; 18 adds `idle_replication_slot_timeout`).
//! Such a slot can never be read again: the shipper's START_REPLICATION fails, and the changes
//! it held are gone from the WAL. It is the one replication failure a restart does not cure, so
//! it is reported everywhere an operator looks: `pgmm_slot_invalidated{peer,reason}`, the peer's
//! `slot_invalidated` in `/status` and `pgmm status`, an ERROR log line repeated while it lasts,
//! and the chart's alert `PgmmSlotInvalidated`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pg::names::origin_name;
use crate::pg::pg_error_text;
use crate::pg::pool::{self, Pool};
use crate::replication::metrics::ReplicationMetrics;

/// How often slot positions are read for the lag and retained-WAL gauges.
const SLOT_MONITOR_INTERVAL: Duration = Duration::from_secs(2);
/// While a slot stays invalidated, how often its ERROR line is logged again.
const INVALIDATED_REMINDER: Duration = Duration::from_secs(15 * 60);

/// The monitor's query for a server of `version_num` (`server_version_num`, e.g. 150004): each
/// slot's name, WAL retained, WAL not yet confirmed, `wal_status`, and why it was invalidated
/// (NULL while it is usable). `invalidation_reason` exists from 17 on. Before, `wal_status =
/// 'lost'` is the only sign, and on a primary (where pgmm runs) WAL removal past
/// `max_slot_wal_keep_size` the only cause (16's `conflicting` is true for every invalidated
/// logical slot, so it tells nothing more).
pub fn slot_query(version_num: i32) -> String {
    let reason = if version_num >= 170000 {
        "CASE WHEN invalidation_reason IS NOT NULL THEN invalidation_reason::text \
              WHEN wal_status = 'lost' THEN 'wal_removed' END"
    } else {
        "CASE WHEN wal_status = 'lost' THEN 'wal_removed' END"
    };
    format!(
        "SELECT slot_name::text, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, \
                wal_status::text, \
                {reason} \
         FROM pg_catalog.pg_replication_slots WHERE slot_name = ANY ($1::text[])"
    )
}

/// What the monitor last reported for one peer's slot, so that each change of state is logged
/// once (and an invalidated slot again every [`INVALIDATED_REMINDER`]).
#[derive(Debug, Clone, PartialEq)]
enum Reported {
    Usable,
    /// `wal_status = 'unreserved'`: past `max_slot_wal_keep_size`, lost at the next checkpoint
    /// unless the peer catches up first.
    Unreserved,
    Invalidated {
        reason: String,
        logged_at: Instant,
    },
    Missing,
}

/// The operator's instructions for an invalidated slot, in the ERROR line.
pub fn invalidated_message(slot: &str, peer: &str, reason: &str) -> String {
    format!(
        "replication slot {slot} is INVALIDATED ({reason}): Postgres has removed WAL that peer \
         {peer} never received, so this node's changes can no longer reach {peer} (the ones in \
         the removed WAL are lost to it). Replication to {peer} stays stopped until an operator \
         acts: drop the slot on this node (SELECT pg_drop_replication_slot('{slot}')), restart \
         pgmm here so that it creates the slot afresh at the current position, then re-join \
         {peer} by re-synchronising its copy of the replicated tables from this node. To keep it \
         from happening again, raise max_slot_wal_keep_size (or fix what kept {peer} away)."
    )
}

/// Keeps `pgmm_slot_retained_wal_bytes`, `pgmm_replication_lag_bytes` and
/// `pgmm_slot_invalidated` current, and says so loudly when a peer's slot has gone missing or
/// has been invalidated (changes since then cannot reach that peer).
pub async fn monitor(
    config: Config,
    pool: Pool,
    peers: Vec<String>,
    metrics: ReplicationMetrics,
    shutdown: CancellationToken,
) {
    let slots: Vec<String> = peers.iter().map(|p| origin_name(p)).collect();
    let mut query: Option<String> = None;
    let mut reported: HashMap<String, Reported> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SLOT_MONITOR_INTERVAL) => {}
        }
        let Ok(c) = pool::get(&pool, &config.postgres).await else {
            continue;
        };
        if query.is_none() {
            query = slot_query_for(&c).await;
        }
        let Some(query) = &query else { continue };
        let rows = match c.query(query.as_str(), &[&slots]).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %pg_error_text(&e), "slot monitor query failed");
                continue;
            }
        };
        for (peer, slot) in peers.iter().zip(&slots) {
            let row = rows.iter().find(|r| r.get::<_, String>(0) == *slot);
            let last = reported.get(slot);
            let now = match row {
                Some(row) => {
                    let retained: Option<i64> = row.get(1);
                    let lag: Option<i64> = row.get(2);
                    let wal_status: Option<String> = row.get(3);
                    let reason: Option<String> = row.get(4);
                    metrics
                        .slot_retained_wal_bytes
                        .with_label_values(&[peer])
                        .set(retained.unwrap_or(0).max(0));
                    metrics
                        .lag_bytes
                        .with_label_values(&[peer])
                        .set(lag.unwrap_or(0).max(0));
                    metrics.set_slot_invalidated(peer, reason.as_deref());
                    match reason {
                        Some(reason) => match last {
                            Some(Reported::Invalidated {
                                reason: r,
                                logged_at,
                            }) if *r == reason && logged_at.elapsed() < INVALIDATED_REMINDER => {
                                continue
                            }
                            _ => {
                                tracing::error!(
                                    %slot,
                                    %peer,
                                    %reason,
                                    "{}",
                                    invalidated_message(slot, peer, &reason)
                                );
                                Reported::Invalidated {
                                    reason,
                                    logged_at: Instant::now(),
                                }
                            }
                        },
                        None if wal_status.as_deref() == Some("unreserved") => {
                            if last != Some(&Reported::Unreserved) {
                                tracing::warn!(
                                    %slot,
                                    %peer,
                                    "replication slot {slot} retains more WAL than \
                                     max_slot_wal_keep_size allows: the next checkpoint \
                                     invalidates it unless {peer} catches up first"
                                );
                            }
                            Reported::Unreserved
                        }
                        None => {
                            if matches!(last, Some(Reported::Invalidated { .. })) {
                                tracing::info!(%slot, %peer, "replication slot is usable again");
                            }
                            Reported::Usable
                        }
                    }
                }
                None => {
                    metrics.set_slot_invalidated(peer, None);
                    if last != Some(&Reported::Missing) {
                        tracing::error!(
                            %slot,
                            %peer,
                            "replication slot is missing (dropped by hand?): changes made since \
                             cannot be shipped to {peer}; a restart recreates the slot from the \
                             current position, so re-synchronise {peer}'s tables first"
                        );
                    }
                    Reported::Missing
                }
            };
            reported.insert(slot.clone(), now);
        }
    }
}

/// The monitor's query for the version of the server `client` is connected to.
async fn slot_query_for(client: &Client) -> Option<String> {
    let version_num = match client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
    {
        Ok(row) => row.get::<_, i32>(0),
        Err(e) => {
            tracing::debug!(error = %pg_error_text(&e), "slot monitor: reading server_version_num failed");
            return None;
        }
    };
    Some(slot_query(version_num))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_reason_is_read_only_where_it_exists() {
        assert!(slot_query(180001).contains("invalidation_reason"));
        assert!(slot_query(170006).contains("invalidation_reason"));
        for v in [150014, 160010] {
            let q = slot_query(v);
            assert!(!q.contains("invalidation_reason"), "{q}");
            assert!(q.contains("wal_status = 'lost'"), "{q}");
        }
    }

    #[test]
    fn the_message_says_what_the_operator_must_do() {
        let m = invalidated_message("pgmm_b", "b", "wal_removed");
        for part in [
            "INVALIDATED (wal_removed)",
            "pg_drop_replication_slot('pgmm_b')",
            "restart pgmm",
            "re-join b",
            "max_slot_wal_keep_size",
        ] {
            assert!(m.contains(part), "{part} in {m}");
        }
    }
}
