//! Prometheus metrics and the HTTP endpoint that serves them.
//!
//! Every metric lives in a [`prometheus::Registry`] owned by the running node and passed down
//! explicitly (never the crate's global default registry), so several nodes can run in one
//! test process. Hot-path counters are resolved to handles once, at start, so a query costs
//! one atomic add rather than a label lookup.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::classify::QueryKind;

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

impl MetricsError {
    pub fn sqlstate(&self) -> &'static str {
        "58000"
    }
}

/// The front door's metrics.
#[derive(Clone)]
pub struct FrontDoorMetrics {
    pub client_connections: IntGauge,
    queries: [IntCounter; 4],
    pub ownership_rejections: IntCounterVec,
    pub protocol_errors: IntCounterVec,
}

impl FrontDoorMetrics {
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        let client_connections = IntGauge::new(
            "pgmm_client_connections",
            "Client sessions currently open through this node's front door.",
        )?;
        let queries_vec = IntCounterVec::new(
            Opts::new(
                "pgmm_client_queries_total",
                "Statements (Query and Parse messages) seen at the front door, by kind.",
            ),
            &["kind"],
        )?;
        let ownership_rejections = IntCounterVec::new(
            Opts::new(
                "pgmm_ownership_rejections_total",
                "Writes refused at the front door because another node owns the table.",
            ),
            &["table"],
        )?;
        let protocol_errors = IntCounterVec::new(
            Opts::new(
                "pgmm_client_protocol_errors_total",
                "Client connections closed for malformed wire-protocol input, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(client_connections.clone()))?;
        registry.register(Box::new(queries_vec.clone()))?;
        registry.register(Box::new(ownership_rejections.clone()))?;
        registry.register(Box::new(protocol_errors.clone()))?;
        let queries = [
            QueryKind::Read,
            QueryKind::Write,
            QueryKind::Ddl,
            QueryKind::Other,
        ]
        .map(|k| queries_vec.with_label_values(&[k.as_str()]));
        for reason in ["startup_packet", "message_length", "unexpected_eof", "tls"] {
            protocol_errors.with_label_values(&[reason]);
        }
        Ok(Self {
            client_connections,
            queries,
            ownership_rejections,
            protocol_errors,
        })
    }

    pub fn query(&self, kind: QueryKind) -> &IntCounter {
        &self.queries[match kind {
            QueryKind::Read => 0,
            QueryKind::Write => 1,
            QueryKind::Ddl => 2,
            QueryKind::Other => 3,
        }]
    }
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

/// Serves `/metrics` and `/healthz` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(registry);
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?local, "metrics endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
