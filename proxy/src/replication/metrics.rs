//! The replication pipeline's metrics (capture, shipping, apply, slots).

use prometheus::core::Collector;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::observe::document::{ApplyStalls, PeerGauges};
use crate::observe::{label, MetricsError};

/// The failures apply rolls back and runs again in the same session: a local write raced with
/// it (serialization failure under repeatable read, or a deadlock). Anything else is a reason
/// to stop and report.
pub const RETRIED_SQLSTATES: [&str; 2] = ["40001", "40P01"];

/// The replication pipeline's metrics (capture, shipping, apply, slots); `peer` is the other
/// node's name: the receiving peer on the sending side, the origin on the applying side.
#[derive(Clone)]
pub struct ReplicationMetrics {
    pub changes_captured: IntCounter,
    pub changes_shipped: IntCounterVec,
    pub changes_applied: IntCounterVec,
    pub transactions_applied: IntCounterVec,
    pub apply_errors: IntCounterVec,
    /// Apply attempts rolled back by a serialization failure or deadlock and run again in the
    /// same session, by peer and SQLSTATE (40001, 40P01).
    pub apply_retries: IntCounterVec,
    pub apply_batches: IntCounterVec,
    pub replication_errors: IntCounterVec,
    pub conflicts: IntCounterVec,
    pub lag_seconds: GaugeVec,
    pub lag_bytes: IntGaugeVec,
    pub peer_up: IntGaugeVec,
    pub slot_retained_wal_bytes: IntGaugeVec,
    /// One series per peer: `reason=""` at 0 while the slot is usable, else the reason at 1;
    /// set it with [`ReplicationMetrics::set_slot_invalidated`].
    slot_invalidated: IntGaugeVec,
    /// One series per peer: `table=""` at 0 while its changes apply, else the failing change's
    /// table at 1; set it with [`ReplicationMetrics::set_apply_stalled`].
    apply_stalled: IntGaugeVec,
    /// What `/status` shows of each stall.
    pub stalls: ApplyStalls,
    pub enrolled_tables: IntGauge,
    pub enrolment_errors: IntCounter,
    pub peer_clock_skew: GaugeVec,
    pub tombstones_purged: IntCounter,
}

impl ReplicationMetrics {
    /// Registers every series; the per-peer ones are created for `peers` at once, so a
    /// dashboard sees a peer that never connected as down rather than as missing.
    pub fn register(registry: &Registry, peers: &[String]) -> Result<Self, MetricsError> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let m = ReplicationMetrics {
            changes_captured: IntCounter::new(
                "pgmm_changes_captured_total",
                "Row changes (insert, update, delete, truncate) made on this node and read from \
                 its WAL for replication; changes applied from peers are not counted.",
            )?,
            changes_shipped: counter(
                "pgmm_changes_shipped_total",
                "Row changes sent to a peer.",
                &["peer"],
            )?,
            changes_applied: counter(
                "pgmm_changes_applied_total",
                "Row changes from a peer (the origin) applied to the local database.",
                &["peer"],
            )?,
            transactions_applied: counter(
                "pgmm_transactions_applied_total",
                "Transactions from a peer (the origin) applied to the local database.",
                &["peer"],
            )?,
            apply_errors: counter(
                "pgmm_apply_errors_total",
                "Transactions from a peer that failed to apply (the link is dropped and the \
                 transaction retried); the log says why.",
                &["peer"],
            )?,
            apply_retries: counter(
                "pgmm_apply_retries_total",
                "Batches of a peer's transactions rolled back by a serialization failure (40001) \
                 or a deadlock (40P01) with a local write, and applied again in the same session \
                 without dropping the link.",
                &["peer", "sqlstate"],
            )?,
            apply_batches: counter(
                "pgmm_apply_batches_total",
                "Batches of a peer's transactions committed here, by path: fast (plain and bulk \
                 statements, no conflict anywhere in the batch) or full (after the fast attempt \
                 missed, every change by its last-writer-wins statement).",
                &["peer", "path"],
            )?,
            replication_errors: counter(
                "pgmm_replication_errors_total",
                "Failures of the outbound stream to a peer (slot, link), by stage; the log says why.",
                &["peer", "stage"],
            )?,
            conflicts: counter(
                "pgmm_conflicts_total",
                "Conflicts detected while applying peers' changes, as recorded in pgmm.conflicts.",
                &["table", "kind", "resolution"],
            )?,
            lag_seconds: GaugeVec::new(
                Opts::new(
                    "pgmm_replication_lag_seconds",
                    "Age of the oldest change shipped to a peer and not yet acknowledged as \
                     applied (0 when the peer is caught up); while the link is down, seconds \
                     since it went down.",
                ),
                &["peer"],
            )?,
            lag_bytes: IntGaugeVec::new(
                Opts::new(
                    "pgmm_replication_lag_bytes",
                    "Local WAL written since the position the peer has confirmed as applied.",
                ),
                &["peer"],
            )?,
            peer_up: IntGaugeVec::new(
                Opts::new(
                    "pgmm_peer_up",
                    "1 while the link shipping this node's changes to the peer is established.",
                ),
                &["peer"],
            )?,
            slot_retained_wal_bytes: IntGaugeVec::new(
                Opts::new(
                    "pgmm_slot_retained_wal_bytes",
                    "WAL kept on disk for the peer's replication slot (pgmm_<peer>).",
                ),
                &["peer"],
            )?,
            slot_invalidated: IntGaugeVec::new(
                Opts::new(
                    "pgmm_slot_invalidated",
                    "1 while the peer's replication slot (pgmm_<peer>) is invalidated \
                     (wal_status lost): Postgres removed WAL the peer never received, and \
                     nothing reaches the peer until the slot is dropped and recreated and the \
                     peer re-synchronised. reason is the slot's invalidation_reason \
                     (PostgreSQL 17+; wal_removed before); 0 with an empty reason while the slot \
                     is usable.",
                ),
                &["peer", "reason"],
            )?,
            apply_stalled: IntGaugeVec::new(
                Opts::new(
                    "pgmm_apply_stalled",
                    "1 while a peer's changes cannot be applied here (a missing table or column, \
                     a type that does not fit, a failed schema change): they wait, retried with \
                     backoff, until the schema is fixed; the table label names the failing \
                     change's table, pgmm status and the log say why.",
                ),
                &["peer", "table"],
            )?,
            stalls: ApplyStalls::default(),
            enrolled_tables: IntGauge::new(
                "pgmm_enrolled_tables",
                "Tables in publication pgmm, i.e. replicated from this node.",
            )?,
            enrolment_errors: IntCounter::new(
                "pgmm_enrolment_errors_total",
                "Enrolment checks that found a matching table which cannot replicate (no \
                 primary key or conflict column), or failed; the log names the table.",
            )?,
            peer_clock_skew: GaugeVec::new(
                Opts::new(
                    "pgmm_peer_clock_skew_seconds",
                    "Estimated offset of the peer's clock from this node's (positive: the peer \
                     runs ahead), from the send times in its heartbeats; includes one-way \
                     network delay.",
                ),
                &["peer"],
            )?,
            tombstones_purged: IntCounter::new(
                "pgmm_tombstones_purged_total",
                "Tombstones removed from pgmm.tombstones: older than the retention, and every \
                 peer has acknowledged this node's changes past them.",
            )?,
        };
        registry.register(Box::new(m.changes_captured.clone()))?;
        registry.register(Box::new(m.changes_shipped.clone()))?;
        registry.register(Box::new(m.changes_applied.clone()))?;
        registry.register(Box::new(m.transactions_applied.clone()))?;
        registry.register(Box::new(m.apply_errors.clone()))?;
        registry.register(Box::new(m.apply_retries.clone()))?;
        registry.register(Box::new(m.apply_batches.clone()))?;
        registry.register(Box::new(m.replication_errors.clone()))?;
        registry.register(Box::new(m.conflicts.clone()))?;
        registry.register(Box::new(m.lag_seconds.clone()))?;
        registry.register(Box::new(m.lag_bytes.clone()))?;
        registry.register(Box::new(m.peer_up.clone()))?;
        registry.register(Box::new(m.slot_retained_wal_bytes.clone()))?;
        registry.register(Box::new(m.slot_invalidated.clone()))?;
        registry.register(Box::new(m.apply_stalled.clone()))?;
        registry.register(Box::new(m.enrolled_tables.clone()))?;
        registry.register(Box::new(m.enrolment_errors.clone()))?;
        registry.register(Box::new(m.peer_clock_skew.clone()))?;
        registry.register(Box::new(m.tombstones_purged.clone()))?;
        for peer in peers {
            let l = [peer.as_str()];
            m.changes_shipped.with_label_values(&l);
            m.changes_applied.with_label_values(&l);
            m.transactions_applied.with_label_values(&l);
            m.apply_errors.with_label_values(&l);
            for path in ["fast", "full"] {
                m.apply_batches.with_label_values(&[peer.as_str(), path]);
            }
            for sqlstate in RETRIED_SQLSTATES {
                m.apply_retries
                    .with_label_values(&[peer.as_str(), sqlstate]);
            }
            m.lag_seconds.with_label_values(&l);
            m.lag_bytes.with_label_values(&l);
            m.peer_up.with_label_values(&l);
            m.slot_retained_wal_bytes.with_label_values(&l);
            m.slot_invalidated.with_label_values(&[peer.as_str(), ""]);
            m.apply_stalled.with_label_values(&[peer.as_str(), ""]);
            m.peer_clock_skew.with_label_values(&l);
        }
        Ok(m)
    }
}

impl ReplicationMetrics {
    /// The handles `/status` and `/readyz` read.
    pub fn peer_gauges(&self) -> PeerGauges {
        PeerGauges {
            up: self.peer_up.clone(),
            lag_seconds: self.lag_seconds.clone(),
            lag_bytes: self.lag_bytes.clone(),
            slot_retained_wal_bytes: self.slot_retained_wal_bytes.clone(),
            slot_invalidated: self.slot_invalidated.clone(),
            stalls: self.stalls.clone(),
        }
    }

    /// `pgmm_slot_invalidated` of `peer`: `Some(reason)` while its slot is invalidated.
    pub fn set_slot_invalidated(&self, peer: &str, reason: Option<&str>) {
        set_one_series(&self.slot_invalidated, peer, "reason", reason);
    }

    /// `pgmm_apply_stalled` of `peer`: `Some(table)` while its changes cannot be applied.
    pub fn set_apply_stalled(&self, peer: &str, table: Option<&str>) {
        set_one_series(&self.apply_stalled, peer, "table", table);
    }
}

/// Sets `gauge{peer, <what>}` to 1 with `value`, or to 0 with `""`, keeping exactly one series
/// for the peer, so that a value that changes does not leave a stale 1.
fn set_one_series(gauge: &IntGaugeVec, peer: &str, what: &str, value: Option<&str>) {
    let wanted = value.unwrap_or("");
    for family in gauge.collect() {
        for metric in family.get_metric() {
            if label(metric, "peer").as_deref() == Some(peer) {
                let other = label(metric, what).unwrap_or_default();
                if other != wanted {
                    let _ = gauge.remove_label_values(&[peer, &other]);
                }
            }
        }
    }
    gauge
        .with_label_values(&[peer, wanted])
        .set(i64::from(value.is_some()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::render;

    #[test]
    fn an_invalidated_slot_keeps_one_series_per_peer() {
        let registry = Registry::new();
        let m = ReplicationMetrics::register(&registry, &["b".to_owned()]).unwrap();
        let series = || -> Vec<String> {
            render(&registry)
                .lines()
                .filter(|l| l.starts_with("pgmm_slot_invalidated{"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            series(),
            ["pgmm_slot_invalidated{peer=\"b\",reason=\"\"} 0"]
        );
        m.set_slot_invalidated("b", Some("wal_removed"));
        assert_eq!(
            series(),
            ["pgmm_slot_invalidated{peer=\"b\",reason=\"wal_removed\"} 1"]
        );
        m.set_slot_invalidated("b", Some("idle_timeout"));
        assert_eq!(
            series(),
            ["pgmm_slot_invalidated{peer=\"b\",reason=\"idle_timeout\"} 1"]
        );
        m.set_slot_invalidated("b", None);
        assert_eq!(
            series(),
            ["pgmm_slot_invalidated{peer=\"b\",reason=\"\"} 0"]
        );
    }
}
