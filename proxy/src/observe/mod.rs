//! What an operator sees of a node: the metrics registry and its `/metrics` and `/healthz`
//! routes (here), the admin endpoint that serves them beside `/readyz` and `/status`
//! ([`admin`], [`readiness`]), the `/status` document ([`document`], which `pgmm status` reads), and the
//! bounded helpers they use ([`last_hour`], [`log_limit`]). Each subsystem defines its own
//! metrics (`frontdoor::metrics`, `replication::metrics`) and registers them here.
//!
//! Every metric lives in a [`prometheus::Registry`] owned by the running node and passed down
//! explicitly (never the crate's global default registry), so several nodes can run in one
//! test process. Hot-path counters are resolved to handles once, at start, so a query costs
//! one atomic add rather than a label lookup.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use thiserror::Error;
use tokio::net::TcpListener;

use crate::pg::SqlState;

pub mod admin;
pub mod document;
pub mod joining;
pub mod last_hour;
pub mod log_limit;
pub mod readiness;

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("metrics: cannot register {0}")]
    Register(#[from] prometheus::Error),
    #[error("metrics: cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

impl SqlState for MetricsError {
    fn sqlstate(&self) -> &str {
        "58000"
    }
}

/// The value of label `name` of a gathered series.
pub fn label(metric: &prometheus::proto::Metric, name: &str) -> Option<String> {
    metric
        .get_label()
        .iter()
        .find(|l| l.name() == name)
        .map(|l| l.value().to_owned())
}

/// A registry with the process collector (CPU, RSS, file descriptors) already in it.
pub fn new_registry() -> Result<Registry, MetricsError> {
    let registry = Registry::new();
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(registry)
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("text encoding into memory cannot fail");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}

async fn metrics(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            TextEncoder::new().format_type().to_string(),
        )],
        render(&registry),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

/// Binds the metrics listener (so a bad address fails start-up, not later).
pub async fn bind(addr: &str) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// The `/metrics` and `/healthz` routes; `admin::serve` serves them beside `/readyz` and
/// `/status`.
pub fn routes(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(registry)
}
