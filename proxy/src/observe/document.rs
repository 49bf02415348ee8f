//! The document a running node serves at `GET /status`: its own view of its peers, read from
//! the replication side's gauges, plus what only the process knows (front-door refusals of the last
//! hour). `pgmm status` fetches it and adds what the database knows.
//!
//! Why a JSON endpoint rather than parsing `/metrics`: the figures `pgmm status` needs are not
//! all metrics (a per-hour count is not a Prometheus counter), and one typed document shared by
//! the server and the command cannot drift the way two parsers of a text format can.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus::core::Collector;
use prometheus::{GaugeVec, IntGaugeVec};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::observe::label;

/// `GET /status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub cluster: String,
    /// One entry per `[[peers]]`, in config order.
    pub peers: Vec<PeerStatus>,
    /// Writes refused at this node's front door (SQLSTATE 42501) in the last hour.
    pub front_door_refusals_last_hour: u64,
}

/// One peer as this node sees it. The figures are `None` until the replication side has
/// started and registered them (the node is still waiting for its Postgres).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub address: String,
    /// `pgmm_peer_up`: the link shipping this node's changes to the peer is established.
    pub up: bool,
    pub lag_seconds: Option<f64>,
    pub lag_bytes: Option<i64>,
    pub slot_retained_wal_bytes: Option<i64>,
    /// `pgmm_slot_invalidated`: why the peer's slot was invalidated (`wal_removed`, or 17+'s
    /// `invalidation_reason`), `None` while it is usable or not read yet. An invalidated slot
    /// never works again: the operator must drop and recreate it and re-synchronise the peer.
    #[serde(default)]
    pub slot_invalidated: Option<String>,
    /// The peer's changes cannot be applied here (a table or column missing, a type that does
    /// not fit, a schema change that failed): everything from that peer waits behind the
    /// change, retried with backoff, until the operator fixes it. `None` while it applies.
    #[serde(default)]
    pub apply_stalled: Option<ApplyStall>,
}

/// A peer whose changes wait behind one that fails to apply here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyStall {
    /// The table of the failing change (`schema.name`), or `(schema change)`, or empty when
    /// the failure is not about one table.
    pub table: String,
    pub sqlstate: String,
    pub error: String,
    /// Seconds since the first failure of this stall.
    pub seconds: f64,
    /// Failed attempts so far.
    pub attempts: u64,
}

/// The apply side's stalls by origin peer: written by the receiver, read by `/status` (the
/// error text is not a metric label, hence a shared map rather than a gauge).
#[derive(Clone, Default)]
pub struct ApplyStalls(Arc<Mutex<HashMap<String, Stalled>>>);

struct Stalled {
    table: String,
    sqlstate: String,
    error: String,
    since: Instant,
    attempts: u64,
}

impl ApplyStalls {
    /// Records a failed attempt at `peer`'s changes; true when it is news (the first failure,
    /// or another error than the last), which the caller logs in full.
    pub fn failed(&self, peer: &str, table: &str, sqlstate: &str, error: &str) -> bool {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get_mut(peer) {
            Some(s) if s.table == table && s.sqlstate == sqlstate && s.error == error => {
                s.attempts += 1;
                false
            }
            _ => {
                let since = map.get(peer).map_or_else(Instant::now, |s| s.since);
                let attempts = map.get(peer).map_or(0, |s| s.attempts) + 1;
                map.insert(
                    peer.to_owned(),
                    Stalled {
                        table: table.to_owned(),
                        sqlstate: sqlstate.to_owned(),
                        error: error.to_owned(),
                        since,
                        attempts,
                    },
                );
                true
            }
        }
    }

    /// `peer`'s changes apply again: how long they were stalled, if they were.
    pub fn resumed(&self, peer: &str) -> Option<(std::time::Duration, u64)> {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.remove(peer).map(|s| (s.since.elapsed(), s.attempts))
    }

    /// Whether `peer`'s stall is the apply session failing to open (`08006` no connection,
    /// `55006` its origin still held), which a session that opens ends, rather than a change
    /// that fails, which only its own success ends.
    pub fn opening(&self, peer: &str) -> bool {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(peer)
            .is_some_and(|s| s.table.is_empty() && matches!(s.sqlstate.as_str(), "08006" | "55006"))
    }

    pub fn get(&self, peer: &str) -> Option<ApplyStall> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(peer).map(|s| ApplyStall {
            table: s.table.clone(),
            sqlstate: s.sqlstate.clone(),
            error: s.error.clone(),
            seconds: s.since.elapsed().as_secs_f64(),
            attempts: s.attempts,
        })
    }
}

/// The replication gauges `/status` and `/readyz` read, as handles to the series themselves:
/// the replication side hands them over once it has registered them ([`PeerGaugesSlot`]), so
/// nothing here looks a metric up by its name.
#[derive(Clone)]
pub struct PeerGauges {
    pub up: IntGaugeVec,
    pub lag_seconds: GaugeVec,
    pub lag_bytes: IntGaugeVec,
    pub slot_retained_wal_bytes: IntGaugeVec,
    /// `pgmm_slot_invalidated{peer,reason}`: one series per peer, 1 with the reason while the
    /// slot is invalidated.
    pub slot_invalidated: IntGaugeVec,
    pub stalls: ApplyStalls,
}

/// Where the replication side puts its [`PeerGauges`] once they exist; empty while the node
/// still waits for its Postgres (or has no peers), which `/readyz` reports as "replication not
/// started".
pub type PeerGaugesSlot = Arc<OnceLock<PeerGauges>>;

impl PeerGauges {
    /// `pgmm_peer_up{peer}`.
    pub fn up(&self, peer: &str) -> bool {
        self.up.with_label_values(&[peer]).get() >= 1
    }

    /// The `reason` of `peer`'s `pgmm_slot_invalidated` while it is 1.
    pub fn invalidated(&self, peer: &str) -> Option<String> {
        self.slot_invalidated
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .find(|m| label(m, "peer").as_deref() == Some(peer) && m.get_gauge().get_value() >= 1.0)
            .map(|m| label(m, "reason").unwrap_or_default())
    }
}

impl NodeStatus {
    /// This node's status now.
    pub fn read(
        config: &Config,
        gauges: Option<&PeerGauges>,
        front_door_refusals: u64,
    ) -> NodeStatus {
        let peers = config
            .peers
            .iter()
            .map(|p| {
                let peer = [p.name.as_str()];
                PeerStatus {
                    name: p.name.clone(),
                    address: p.address.clone(),
                    up: gauges.is_some_and(|g| g.up(&p.name)),
                    lag_seconds: gauges.map(|g| g.lag_seconds.with_label_values(&peer).get()),
                    lag_bytes: gauges.map(|g| g.lag_bytes.with_label_values(&peer).get()),
                    slot_retained_wal_bytes: gauges
                        .map(|g| g.slot_retained_wal_bytes.with_label_values(&peer).get()),
                    slot_invalidated: gauges.and_then(|g| g.invalidated(&p.name)),
                    apply_stalled: gauges.and_then(|g| g.stalls.get(&p.name)),
                }
            })
            .collect();
        NodeStatus {
            node: config.node.name.clone(),
            cluster: config.cluster.name.clone(),
            peers,
            front_door_refusals_last_hour: front_door_refusals,
        }
    }
}

#[cfg(test)]
mod stall_tests {
    use super::ApplyStalls;

    #[test]
    fn a_stall_is_news_once_per_error_counts_attempts_and_ends_on_resume() {
        let stalls = ApplyStalls::default();
        assert!(stalls.get("a").is_none());
        assert!(stalls.failed("a", "public.t", "42P01", "missing"));
        assert!(!stalls.failed("a", "public.t", "42P01", "missing"));
        let stall = stalls.get("a").unwrap();
        assert_eq!((stall.table.as_str(), stall.attempts), ("public.t", 2));
        // Another error is news again; the stall keeps its start and its count.
        assert!(stalls.failed("a", "public.t", "42703", "column"));
        assert_eq!(stalls.get("a").unwrap().attempts, 3);
        assert!(!stalls.opening("a"));
        assert!(stalls.get("b").is_none());
        assert_eq!(stalls.resumed("a").map(|(_, n)| n), Some(3));
        assert!(stalls.get("a").is_none() && stalls.resumed("a").is_none());
        // A session that could not open is over once one opens.
        stalls.failed("b", "", "55006", "origin busy");
        assert!(stalls.opening("b"));
    }
}
