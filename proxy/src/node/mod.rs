//! A running node: the front door, replication and the admin endpoint, started in the order
//! that lets no write escape capture, and stopped together.
//!
//! [`run_node`] is separate from signal handling ([`serve`]) so that the demo and tests can run
//! several nodes in one process; [`replication`] is the replication side and its background
//! tasks.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::frontdoor::metrics::FrontDoorMetrics;
use crate::frontdoor::{self, FrontDoor, FrontDoorError};
use crate::observe::admin::{self, Admin};
use crate::observe::document::PeerGaugesSlot;
use crate::observe::joining::Joining;
use crate::observe::{self, MetricsError};
use crate::pg::SqlState;

pub mod replication;

pub use replication::{NodeError, ReplicationNode};

/// Why `serve` could not start or stopped abnormally.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    FrontDoor(#[from] FrontDoorError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
}

impl SqlState for ServeError {
    fn sqlstate(&self) -> &str {
        match self {
            ServeError::Config(e) => e.sqlstate(),
            ServeError::FrontDoor(e) => e.sqlstate(),
            ServeError::Metrics(e) => e.sqlstate(),
            ServeError::Node(e) => e.sqlstate(),
            ServeError::Signal(_) => "58000",
        }
    }
}

/// Runs a node until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let shutdown = CancellationToken::new();
    let signals = watch_signals(shutdown.clone())?;
    let result = run_node(config, shutdown).await;
    signals.abort();
    result
}

/// Everything a node runs, stopped by `shutdown`; separate from signal handling so that a
/// test can run several nodes in one process.
pub async fn run_node(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let registry = Arc::new(observe::new_registry()?);
    let pool = crate::pg::pool::pool(&config.postgres);
    let peer_gauges = PeerGaugesSlot::default();
    let joining = Joining::default();
    let door_metrics = FrontDoorMetrics::register(&registry)?;
    let door = Arc::new(FrontDoor::from_config(&config, door_metrics)?);
    // Metrics first: while the node waits for its Postgres, /healthz shows the process is up
    // (and /readyz says what it waits for).
    let metrics_task = match &config.metrics {
        Some(m) => {
            let listener = observe::bind(&m.listen).await?;
            let admin = Admin {
                config: Arc::new(config.clone()),
                registry: registry.clone(),
                refusals: door.refusals.clone(),
                pool: pool.clone(),
                peer_gauges: peer_gauges.clone(),
                joining: joining.clone(),
            };
            Some(tokio::spawn(admin::serve(
                listener,
                admin,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    // Schema, publication and slots exist before the first client gets in, so every write
    // made through pgmm is captured.
    let replication = match ReplicationNode::start(
        &config,
        &registry,
        &pool,
        &peer_gauges,
        &joining,
        door.ddl_seen.clone(),
        shutdown.clone(),
    )
    .await
    {
        Ok(node) => node,
        Err(NodeError::Cancelled) => {
            if let Some(task) = metrics_task {
                let _ = task.await;
            }
            return Ok(());
        }
        Err(e) => {
            shutdown.cancel();
            return Err(e.into());
        }
    };
    let listener = match frontdoor::bind(&config.client.listen).await {
        Ok(l) => l,
        Err(e) => {
            shutdown.cancel();
            replication.join().await;
            return Err(e.into());
        }
    };
    tracing::info!(node = %config.node.name, cluster = %config.cluster.name, "pgmm started");
    let grace = Duration::from_secs(config.client.shutdown_grace_seconds);
    frontdoor::serve(door, listener, shutdown.clone(), grace).await;
    shutdown.cancel();
    replication.join().await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("pgmm stopped");
    Ok(())
}

fn watch_signals(shutdown: CancellationToken) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    }))
}
