//! The document a running node serves at `GET /status`: its own view of its peers, read from
//! its metrics registry, plus what only the process knows (front-door refusals of the last
//! hour). `pgmm status` fetches it and adds what the database knows.
//!
//! Why a JSON endpoint rather than parsing `/metrics`: the figures `pgmm status` needs are not
//! all metrics (a per-hour count is not a Prometheus counter), and one typed document shared by
//! the server and the command cannot drift the way two parsers of a text format can.

use std::collections::HashMap;

use prometheus::Registry;
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
}

/// The per-peer gauges of a registry, by metric name and then peer.
pub(crate) struct PeerGauges(HashMap<String, HashMap<String, f64>>);

impl PeerGauges {
    /// Reads every gauge that has a `peer` label.
    pub(crate) fn read(registry: &Registry) -> PeerGauges {
        let mut gauges: HashMap<String, HashMap<String, f64>> = HashMap::new();
        for family in registry.gather() {
            for metric in family.get_metric() {
                let Some(peer) = metric.get_label().iter().find(|l| l.name() == "peer") else {
                    continue;
                };
                gauges
                    .entry(family.name().to_owned())
                    .or_default()
                    .insert(peer.value().to_owned(), metric.get_gauge().get_value());
            }
        }
        PeerGauges(gauges)
    }

    /// The `reason` of each peer whose `pgmm_slot_invalidated` is 1.
    pub(crate) fn invalidated_slots(registry: &Registry) -> HashMap<String, String> {
        let mut slots = HashMap::new();
        for family in registry.gather() {
            if family.name() != "pgmm_slot_invalidated" {
                continue;
            }
            for metric in family.get_metric() {
                if metric.get_gauge().get_value() < 1.0 {
                    continue;
                }
                if let Some(peer) = label(metric, "peer") {
                    slots.insert(peer, label(metric, "reason").unwrap_or_default());
                }
            }
        }
        slots
    }

    pub(crate) fn get(&self, metric: &str, peer: &str) -> Option<f64> {
        self.0.get(metric)?.get(peer).copied()
    }

    /// `pgmm_peer_up{peer}`: `None` when the series does not exist (yet).
    pub(crate) fn up(&self, peer: &str) -> Option<bool> {
        self.get("pgmm_peer_up", peer).map(|v| v >= 1.0)
    }
}

impl NodeStatus {
    /// This node's status now.
    pub fn read(config: &Config, registry: &Registry, front_door_refusals: u64) -> NodeStatus {
        let gauges = PeerGauges::read(registry);
        let mut invalidated = PeerGauges::invalidated_slots(registry);
        let peers = config
            .peers
            .iter()
            .map(|p| PeerStatus {
                name: p.name.clone(),
                address: p.address.clone(),
                up: gauges.up(&p.name).unwrap_or(false),
                lag_seconds: gauges.get("pgmm_replication_lag_seconds", &p.name),
                lag_bytes: gauges
                    .get("pgmm_replication_lag_bytes", &p.name)
                    .map(|v| v as i64),
                slot_retained_wal_bytes: gauges
                    .get("pgmm_slot_retained_wal_bytes", &p.name)
                    .map(|v| v as i64),
                slot_invalidated: invalidated.remove(&p.name),
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
