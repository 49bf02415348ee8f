//! The HTTP endpoint on `[metrics] listen`: `/metrics` and `/healthz` (from `metrics`), plus
//! `/readyz` (see `readiness`) and `/status` (the JSON document `pgmm status` reads, see
//! `status::document`).
//!
//! One listener for all of them, because operators already expose and firewall that port for
//! scraping; everything served is read-only and holds no secrets.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::observe::document::{NodeStatus, PeerGaugesSlot};
use crate::observe::joining::Joining;
use crate::observe::last_hour::LastHour;
use crate::observe::readiness::Readiness;
use crate::pg::pool::Pool;

/// What `/readyz` and `/status` read; owned by the node and passed in, never global.
#[derive(Clone)]
pub struct Admin {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    /// The front door's refusals (`FrontDoor::refusals`).
    pub refusals: Arc<LastHour>,
    /// pgmm's own connections to the local Postgres, for the `/readyz` probe.
    pub pool: Pool,
    /// The replication gauges, once the replication side has registered them.
    pub peer_gauges: PeerGaugesSlot,
    /// Set while the node joins the cluster.
    pub joining: Joining,
}

/// `/readyz`: the local Postgres and every peer. `/readyz?peers=ignore`: the local Postgres
/// only (down peers are still named in the body), for a load balancer that should keep
/// sending clients to a node while a peer is away: its writes wait in the slots meanwhile.
async fn readyz(State(admin): State<Admin>, uri: axum::http::Uri) -> impl IntoResponse {
    let require_peers = !uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "peers=ignore"));
    let readiness = Readiness::check(
        &admin.config,
        &admin.pool,
        admin.peer_gauges.get(),
        require_peers,
        admin.joining.get(),
    )
    .await;
    let code = match readiness {
        Readiness::Ready | Readiness::ReadyWithout(_) => StatusCode::OK,
        Readiness::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, readiness.body())
}

async fn status(State(admin): State<Admin>) -> impl IntoResponse {
    let doc = NodeStatus::read(
        &admin.config,
        admin.peer_gauges.get(),
        admin.refusals.count(),
    );
    let body = serde_json::to_string(&doc).expect("the status document always serialises");
    ([(header::CONTENT_TYPE, "application/json")], body)
}

/// Serves the endpoint until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    admin: Admin,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = super::routes(admin.registry.clone()).merge(
        Router::new()
            .route("/readyz", get(readyz))
            .route("/status", get(status))
            .with_state(admin),
    );
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(addr = ?local, "metrics endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
