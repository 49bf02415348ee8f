//! `pgmm status --config FILE [--json]`: one node's view of the cluster, for an operator at a
//! terminal (a table) or a script (`--json`).
//!
//! It reads the running node, never guesses: the peers' links, lag and retained WAL come from
//! the node's `GET /status` document (`document`, served beside `/metrics`), and what is
//! recorded in the database (conflicts, the pgmm schema version) from `[postgres] url`. A node
//! whose endpoint does not answer is reported as not running (exit 3), which is what a script
//! polling a node it just started wants to tell apart from a failure (exit 1) or a bad config
//! (exit 2).

pub(crate) mod http;
pub(crate) mod render;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{Config, ConfigError};
use crate::observe::document::{NodeStatus, PeerStatus};
use crate::pg::pg_error_text;

/// How long the node's endpoint and database may take to answer: they are local and a status
/// command that hangs is worse than one that says "no answer".
const TIMEOUT: Duration = Duration::from_secs(5);
/// The conflict kind of a change refused at apply because its origin may not write the row.
const OWNERSHIP_VIOLATION: &str = "ownership_violation";

/// Why `pgmm status` could not report.
#[derive(Debug, Error)]
pub enum StatusError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "{}: no [metrics] section: pgmm status reads the node through its [metrics] listen \
         endpoint; add one and restart the node",
        path.display()
    )]
    NoMetrics { path: PathBuf },
    #[error("node {node:?} is not running: nothing answers on its [metrics] listen address {addr} ({reason})")]
    NotRunning {
        node: String,
        addr: String,
        reason: String,
    },
    #[error("the endpoint {addr} ([metrics] listen) {reason}")]
    Endpoint { addr: String, reason: String },
    #[error("database ([postgres] url): {0}")]
    Database(String),
}

impl StatusError {
    /// 2: fix the config; 3: the node is not running; 1: it runs but could not be read.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::NoMetrics { .. } => 2,
            Self::NotRunning { .. } => 3,
            Self::Endpoint { .. } | Self::Database(_) => 1,
        }
    }
}

/// What `pgmm status` prints (`--json` prints exactly this).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    pub cluster: String,
    /// The `[metrics] listen` endpoint that answered.
    pub endpoint: String,
    pub peers: Vec<PeerStatus>,
    /// `None` when the database could not be read (`database_error` says why).
    pub conflicts_last_hour: Option<Conflicts>,
    pub ownership_refusals_last_hour: Refusals,
    /// The highest applied version in `pgmm.schema_version`.
    pub schema_version: Option<i32>,
    pub database_error: Option<String>,
}

/// Rows of `pgmm.conflicts` detected in the last hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflicts {
    pub total: u64,
    pub by_kind: BTreeMap<String, u64>,
}

/// Writes refused for ownership in the last hour: by this node's front door (before Postgres
/// saw them), and at apply (a peer's change its origin may not make, logged as conflict kind
/// `ownership_violation`; `None` when the database could not be read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusals {
    pub front_door: u64,
    pub apply: Option<u64>,
}

/// `pgmm status`: prints the report, or the error; see the module doc for the exit codes.
pub fn main(config_path: &Path, json: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pgmm status: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match runtime.block_on(report(config_path)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("pgmm status: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let text = if json {
        let mut text = serde_json::to_string_pretty(&report).expect("a report serialises");
        text.push('\n');
        text
    } else {
        render::table(&report)
    };
    print!("{text}");
    match &report.database_error {
        Some(e) => {
            let e = StatusError::Database(e.clone());
            eprintln!("pgmm status: {e}");
            ExitCode::from(e.exit_code())
        }
        None => ExitCode::SUCCESS,
    }
}

/// Reads the node configured in `config_path`. A database that cannot be read is reported in
/// [`Report::database_error`], not as an error: the node's own view is still worth printing.
pub async fn report(config_path: &Path) -> Result<Report, StatusError> {
    let config = Config::load(config_path)?;
    let listen = config
        .metrics
        .as_ref()
        .map(|m| m.listen.clone())
        .ok_or_else(|| StatusError::NoMetrics {
            path: config_path.to_path_buf(),
        })?;
    let addr = dial_address(&listen);
    let node = fetch_node_status(&config, &addr).await?;
    let (conflicts, schema_version, database_error) = match read_database(&config).await {
        Ok((conflicts, version)) => (Some(conflicts), version, None),
        Err(e) => (None, None, Some(e)),
    };
    Ok(Report {
        node: node.node,
        cluster: node.cluster,
        endpoint: addr,
        peers: node.peers,
        ownership_refusals_last_hour: Refusals {
            front_door: node.front_door_refusals_last_hour,
            apply: conflicts
                .as_ref()
                .map(|c| c.by_kind.get(OWNERSHIP_VIOLATION).copied().unwrap_or(0)),
        },
        conflicts_last_hour: conflicts,
        schema_version,
        database_error,
    })
}

/// The address to connect to for a listen address: a wildcard (`0.0.0.0`, `[::]`) is
/// reached on loopback.
pub(crate) fn dial_address(listen: &str) -> String {
    match listen.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        Ok(SocketAddr::V6(a)) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
        _ => listen.to_owned(),
    }
}

/// `GET /status` from the node at `addr`.
pub async fn fetch(addr: &str) -> Result<NodeStatus, StatusError> {
    let endpoint = |reason: String| StatusError::Endpoint {
        addr: addr.to_owned(),
        reason,
    };
    let (code, body) = match http::get(addr, "/status", TIMEOUT).await {
        Ok(answer) => answer,
        Err(http::HttpError::Connect(e)) => {
            return Err(StatusError::NotRunning {
                node: String::new(),
                addr: addr.to_owned(),
                reason: e.to_string(),
            })
        }
        Err(http::HttpError::Response(e)) => return Err(endpoint(format!("failed: {e}"))),
    };
    if code != 200 {
        return Err(endpoint(format!(
            "answered GET /status with {code} (is it a pgmm node of this version?): {}",
            body.trim()
        )));
    }
    serde_json::from_str(&body).map_err(|e| {
        endpoint(format!(
            "answered GET /status with an unexpected document: {e}"
        ))
    })
}

async fn fetch_node_status(config: &Config, addr: &str) -> Result<NodeStatus, StatusError> {
    let status = fetch(addr).await.map_err(|e| match e {
        StatusError::NotRunning { addr, reason, .. } => StatusError::NotRunning {
            node: config.node.name.clone(),
            addr,
            reason,
        },
        e => e,
    })?;
    if status.node != config.node.name {
        return Err(StatusError::Endpoint {
            addr: addr.to_owned(),
            reason: format!(
                "belongs to node {:?}, not to node {:?} of this config",
                status.node, config.node.name
            ),
        });
    }
    Ok(status)
}

/// Conflicts of the last hour by kind, and the schema version.
async fn read_database(config: &Config) -> Result<(Conflicts, Option<i32>), String> {
    let read = async {
        let client = crate::pg::connect(&config.postgres)
            .await
            .map_err(|e| e.to_string())?;
        let version: Option<i32> = client
            .query_one("SELECT max(version) FROM pgmm.schema_version", &[])
            .await
            .map_err(|e| pg_error_text(&e))?
            .get(0);
        let rows = client
            .query(
                "SELECT kind, count(*) FROM pgmm.conflicts \
                 WHERE detected_at > now() - interval '1 hour' GROUP BY kind",
                &[],
            )
            .await
            .map_err(|e| pg_error_text(&e))?;
        let by_kind: BTreeMap<String, u64> = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
            .collect();
        let conflicts = Conflicts {
            total: by_kind.values().sum(),
            by_kind,
        };
        Ok((conflicts, version))
    };
    match tokio::time::timeout(TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
    }
}
