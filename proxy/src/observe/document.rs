//! The document a running node serves at `GET /status`: its own view of its peers, read from
//! the replication side's gauges, plus what only the process knows (front-door refusals of the last
//! hour). `pgmm status` fetches it and adds what the database knows.
//!
//! Why a JSON endpoint rather than parsing `/metrics`: the figures `pgmm status` needs are not
//! all metrics (a per-hour count is not a Prometheus counter), and one typed document shared by
//! the server and the command cannot drift the way two parsers of a text format can.

use std::sync::{Arc, OnceLock};

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
