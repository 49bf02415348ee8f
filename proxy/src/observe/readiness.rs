//! `GET /readyz`: whether this node can do its job right now, for load balancers and
//! Kubernetes readiness probes (`/healthz` only says the process is alive).
//!
//! Ready means the local Postgres answers a query and every configured peer is linked
//! (`pgmm_peer_up` = 1, kept by the shippers). A node without peers is ready when its Postgres
//! answers. Not ready comes with a short reason naming everything that is down, because the
//! person reading a failed probe wants to know where to look.

use std::time::Duration;

use crate::config::Config;
use crate::observe::document::PeerGauges;
use crate::pg::pool::Pool;

/// How long the Postgres probe may take: probes are frequent and a slow answer is a bad one.
const POSTGRES_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The outcome of one readiness check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Ready to serve clients, with these peers down (only when peers are not required).
    ReadyWithout(Vec<String>),
    /// What is down, one item per problem, e.g. `peer b: down`.
    NotReady(Vec<String>),
}

impl Readiness {
    /// Checks the local Postgres (a `SELECT 1` on a connection from pgmm's pool, which drops a
    /// connection whose server went away, so a dead server is never hidden behind it) and the
    /// peers' links.
    /// With `require_peers` false, only the local Postgres decides; down peers are still
    /// named (see [`Readiness::ReadyWithout`]).
    pub async fn check(
        config: &Config,
        pool: &Pool,
        gauges: Option<&PeerGauges>,
        require_peers: bool,
        joining: Option<String>,
    ) -> Readiness {
        let mut down = Vec::new();
        if let Err(why) = probe_postgres(config, pool).await {
            down.push(format!("postgres: {why}"));
        }
        // A joining node lacks data whatever its peers: never ready, even with peers ignored.
        if let Some(joining) = joining {
            down.push(joining);
            down.extend(down_peers(config, gauges));
            return Readiness::NotReady(down);
        }
        let peers = down_peers(config, gauges);
        if !require_peers && down.is_empty() && !peers.is_empty() {
            return Readiness::ReadyWithout(peers);
        }
        down.extend(peers);
        if down.is_empty() {
            Readiness::Ready
        } else {
            Readiness::NotReady(down)
        }
    }

    /// The plain-text body of the answer.
    pub fn body(&self) -> String {
        match self {
            Readiness::Ready => "ready\n".to_owned(),
            Readiness::ReadyWithout(down) => format!("ready; {}\n", down.join("; ")),
            Readiness::NotReady(down) => format!("not ready: {}\n", down.join("; ")),
        }
    }
}

/// The configured peers whose link is not up; before the replication side has handed over its
/// gauges, every peer is one it has not started for yet. A peer whose slot is invalidated says so: its
/// link cannot come back by itself.
pub(crate) fn down_peers(config: &Config, gauges: Option<&PeerGauges>) -> Vec<String> {
    config
        .peers
        .iter()
        .filter_map(|peer| {
            let Some(g) = gauges else {
                return Some(format!("peer {}: replication not started", peer.name));
            };
            if g.up(&peer.name) {
                return None;
            }
            Some(match g.invalidated(&peer.name) {
                Some(reason) => format!(
                    "peer {}: down, slot pgmm_{} invalidated ({reason})",
                    peer.name, peer.name
                ),
                None => format!("peer {}: down", peer.name),
            })
        })
        .collect()
}

async fn probe_postgres(config: &Config, pool: &Pool) -> Result<(), String> {
    let probe = async {
        let client = crate::pg::pool::get(pool, &config.postgres)
            .await
            .map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| crate::pg::pg_error_text(&e))?;
        Ok(())
    };
    match tokio::time::timeout(POSTGRES_PROBE_TIMEOUT, probe).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer to SELECT 1 within {POSTGRES_PROBE_TIMEOUT:?}"
        )),
    }
}
