//! The replication side of a running node: what must exist before clients are let in, and the
//! long-running tasks (one shipper per peer, the peer listener, enrolment, slot monitoring).
//!
//! Start-up order matters: the pgmm schema, the publication and every peer's slot exist
//! before the front door accepts its first client, so every write made through pgmm is in
//! some slot's future. Each step is idempotent, so a restart repeats them harmlessly.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::owners::OwnerRules;
use crate::config::Config;
use crate::membership::join::{JoinMetrics, Joiner};
use crate::membership::{Answerer, MembershipError};
use crate::observe::document::PeerGaugesSlot;
use crate::observe::joining::Joining;
use crate::observe::MetricsError;
use crate::pg::pg_error_text;
use crate::pg::pool::{self, Pool};
use crate::pg::sqlstate::{self, SqlState};
use crate::replication::apply::{origin_name, Receiver, ReceiverSetup};
use crate::replication::metrics::ReplicationMetrics;
use crate::replication::peer::{PeerError, PeerIdentity, PeerMetrics, PeerTls, PeerTlsError};
use crate::replication::ship::Shipper;
use crate::replication::slot::{ReplicationConn, ReplicationError, WalSenderConfig};
use crate::replication::slot_monitor;
use crate::schema::ddl::{self, DdlCaptureError};
use crate::schema::enrol::{self, EnrolError};
use crate::schema::guard::{self, GuardContext, GuardError};
use crate::schema::migrate::{self, MigrateError};

/// After DDL at the front door, how long to wait before checking enrolment: the DDL's
/// transaction usually commits within this.
const DDL_SETTLE: Duration = Duration::from_millis(300);
/// Retry delay while the local Postgres is unreachable at start-up.
const STARTUP_RETRY: Duration = Duration::from_secs(1);

/// Why the node could not start its replication side.
#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error("enrolment: {0}")]
    Enrol(#[from] EnrolError),
    #[error("creating replication slot {slot}: {source}")]
    Slot {
        slot: String,
        #[source]
        source: ReplicationError,
    },
    #[error("replication connection settings from [postgres] url: {0}")]
    WalSenderConfig(#[source] ReplicationError),
    #[error("creating replication origins: {}", pg_error_text(.0))]
    Origins(#[source] tokio_postgres::Error),
    #[error("dropping the slots of nodes that left the cluster: {}", pg_error_text(.0))]
    Leave(#[source] tokio_postgres::Error),
    #[error(
        "the local Postgres runs with track_commit_timestamp = off: pgmm needs it on to know \
         which node wrote a row (last-writer-wins and conflict detection); set \
         track_commit_timestamp = on in postgresql.conf and restart Postgres"
    )]
    CommitTimestamps,
    #[error("checking the server settings: {}", pg_error_text(.0))]
    Settings(#[source] tokio_postgres::Error),
    #[error("enrolment: {0}")]
    Guard(#[source] Box<GuardError>),
    #[error(transparent)]
    DdlCapture(#[from] DdlCaptureError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("peer TLS: {0}")]
    Tls(#[from] PeerTlsError),
    #[error("peer link: cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("joining the cluster: {0}")]
    Join(#[source] MembershipError),
    #[error("stopped before the node was ready")]
    Cancelled,
}

impl From<GuardError> for NodeError {
    fn from(e: GuardError) -> Self {
        NodeError::Guard(Box::new(e))
    }
}

impl SqlState for NodeError {
    fn sqlstate(&self) -> &str {
        match self {
            NodeError::Migrate(e) => e.sqlstate(),
            NodeError::Enrol(e) => e.sqlstate(),
            NodeError::Slot { source, .. } | NodeError::WalSenderConfig(source) => {
                source.sqlstate()
            }
            NodeError::Origins(e) | NodeError::Settings(e) | NodeError::Leave(e) => {
                sqlstate::of_pg_error(e)
            }
            NodeError::CommitTimestamps => "55000",
            NodeError::Guard(e) => e.sqlstate(),
            NodeError::DdlCapture(e) => e.sqlstate(),
            NodeError::Peer(e) => e.sqlstate(),
            NodeError::Tls(e) => e.sqlstate(),
            NodeError::Bind { .. } | NodeError::Metrics(_) => "58000",
            NodeError::Join(e) => e.sqlstate(),
            NodeError::Cancelled => "57P01",
        }
    }
}

/// The replication tasks of a running node.
pub struct ReplicationNode {
    tasks: JoinSet<()>,
}

impl ReplicationNode {
    /// Migrates, and for a node with `[peer]`: enrols, creates origins and slots, binds the
    /// peer listener and spawns the tasks. Waits (logging) while the local Postgres is down.
    pub async fn start(
        config: &Config,
        registry: &Registry,
        pool: &Pool,
        peer_gauges: &PeerGaugesSlot,
        joining: &Joining,
        ddl_seen: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> Result<ReplicationNode, NodeError> {
        let mut client = connect_when_up(config, &shutdown).await?;
        let report = migrate::migrate(&mut client).await?;
        if !report.applied.is_empty() {
            tracing::info!(%report, "pgmm schema migrated");
        }
        let mut tasks = JoinSet::new();
        let Some(peer_listen) = &config.peer else {
            return Ok(ReplicationNode { tasks });
        };
        let peers: Vec<String> = config.peers.iter().map(|p| p.name.clone()).collect();
        let metrics = ReplicationMetrics::register(registry, &peers)?;
        // Set once per process: a node is started once.
        let _ = peer_gauges.set(metrics.peer_gauges());
        let peer_metrics = PeerMetrics::register(registry)?;

        let commit_timestamps: String = client
            .query_one("SELECT current_setting('track_commit_timestamp')", &[])
            .await
            .map_err(NodeError::Settings)?
            .get(0);
        if commit_timestamps != "on" {
            return Err(NodeError::CommitTimestamps);
        }
        let rules = Arc::new(OwnerRules::from_config(config));
        let others: Vec<String> = config
            .cluster
            .nodes
            .iter()
            .filter(|n| **n != config.node.name)
            .map(|n| origin_name(n))
            .collect();
        client
            .execute(
                "SELECT pg_catalog.pg_replication_origin_create(o) FROM unnest($1::text[]) AS o \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = o)",
                &[&others],
            )
            .await
            .map_err(NodeError::Origins)?;

        let identity = PeerIdentity::from_config(config)?;
        let tls = PeerTls::from_config(peer_listen)?;
        let pg: tokio_postgres::Config = config
            .postgres
            .url
            .parse()
            .expect("config validation parsed [postgres] url");
        let mut conn =
            WalSenderConfig::from_tokio_postgres(&pg).map_err(NodeError::WalSenderConfig)?;
        // The peer port opens before the join: another node joining at the same time asks this
        // one to prepare, and waits for the answer. Replication links wait for `open`.
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let listener = TcpListener::bind(&peer_listen.listen)
            .await
            .map_err(|source| NodeError::Bind {
                addr: peer_listen.listen.clone(),
                source,
            })?;
        let wake: HashMap<String, Arc<Notify>> = config
            .peers
            .iter()
            .map(|p| (p.name.clone(), Arc::new(Notify::new())))
            .collect();
        let receiver = Arc::new(Receiver::new(ReceiverSetup {
            identity: identity.clone(),
            nodes: config.cluster.nodes.clone(),
            tls: tls.as_ref().map(|t| t.server.clone()),
            postgres: config.postgres.clone(),
            pool: pool.clone(),
            replication: config.replication.clone(),
            peer_metrics: peer_metrics.clone(),
            metrics: metrics.clone(),
            wake: wake.clone(),
            rules: rules.clone(),
            max_pending_handshakes: peer_listen.max_pending_handshakes,
            requests: Some(Arc::new(Answerer {
                config: config.clone(),
                walsender: {
                    let mut c = conn.clone();
                    c.application_name = "pgmm membership".to_owned();
                    c
                },
                started: open.clone(),
            })),
            open: open.clone(),
        }));
        tasks.spawn(receiver.serve(listener, shutdown.clone()));

        let join_metrics = JoinMetrics::register(registry)?;
        // A joining node gets its tables and rows before anything else: enrolment needs the
        // tables, and nothing may stream to or from it before its data is all there.
        Joiner {
            config,
            identity: &identity,
            tls: tls.as_ref().map(|t| &t.client),
            peer_metrics: &peer_metrics,
            metrics: &join_metrics,
            joining,
            shutdown: &shutdown,
        }
        .join_if_needed()
        .await
        .map_err(|e| match e {
            MembershipError::Cancelled => NodeError::Cancelled,
            e => NodeError::Join(e),
        })?;
        if client.is_closed() {
            // The local Postgres restarted while the node joined.
            client = connect_when_up(config, &shutdown).await?;
        }

        let (tables, change) = enrol::enrol(&mut client, &config.replication).await?;
        let ctx = GuardContext {
            node: &config.node.name,
            conflict_column: &config.replication.conflict_column,
            rules: &rules,
        };
        for table in &tables {
            guard::install(&client, table, &ctx).await?;
        }
        metrics.enrolled_tables.set(tables.len() as i64);
        tracing::info!(tables = tables.len(), %change, "tables enrolled for replication");
        // Before the front door opens and before the slots exist: every schema change from
        // now on is in the WAL the slots stream.
        ddl::install(&client, &config.replication, &config.node.name).await?;

        for peer in &config.peers {
            let slot = origin_name(&peer.name);
            conn.application_name = format!("pgmm slot setup ({slot})");
            let mut repl =
                ReplicationConn::connect(&conn)
                    .await
                    .map_err(|source| NodeError::Slot {
                        slot: slot.clone(),
                        source,
                    })?;
            match repl.create_logical_slot(&slot, "pgoutput").await {
                Ok(at) => tracing::info!(
                    %slot,
                    consistent_point = %crate::replication::pgoutput::format_lsn(at),
                    "replication slot created: changes from here on are shipped to {}",
                    peer.name
                ),
                Err(ReplicationError::SlotExists) => {}
                Err(source) => return Err(NodeError::Slot { slot, source }),
            }
            let _ = repl.close().await;
        }
        crate::membership::leave::drop_departed_slots(&client, config)
            .await
            .map_err(NodeError::Leave)?;
        // Every slot exists: the peers' changes may be applied from here on.
        open.store(true, std::sync::atomic::Ordering::Release);

        let captured_upto = Arc::new(AtomicU64::new(0));
        for peer in &config.peers {
            let mut conn = conn.clone();
            conn.application_name = format!("pgmm shipping to {}", peer.name);
            let shipper = Arc::new(Shipper {
                identity: identity.clone(),
                tls: tls.as_ref().map(|t| t.client.clone()),
                conn,
                postgres: config.postgres.clone(),
                peer_metrics: peer_metrics.clone(),
                metrics: metrics.clone(),
                captured_upto: captured_upto.clone(),
                chunk_bytes: config.replication.chunk_bytes,
            });
            tasks.spawn(shipper.run(peer.clone(), wake[&peer.name].clone(), shutdown.clone()));
        }

        drop(client);
        tasks.spawn(enrol_loop(
            config.clone(),
            pool.clone(),
            metrics.clone(),
            rules,
            ddl_seen,
            shutdown.clone(),
        ));
        tasks.spawn(tombstone_purge(
            config.clone(),
            pool.clone(),
            peers.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(slot_monitor::monitor(
            config.clone(),
            pool.clone(),
            peers,
            metrics,
            shutdown.clone(),
        ));
        Ok(ReplicationNode { tasks })
    }

    /// Waits for every task to stop (they stop on the shutdown token).
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Connects to the local Postgres, retrying while it is unreachable (it may be starting
/// beside pgmm, as in a Kubernetes pod). A session of its own rather than a pooled one: it is
/// closed once the node has started, so a node without peers (whose pool only `/readyz` uses)
/// keeps no idle backend open.
async fn connect_when_up(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Client, NodeError> {
    let mut logged = false;
    loop {
        match crate::pg::connect(&config.postgres).await {
            Ok(client) => return Ok(client),
            Err(e) => {
                if !logged {
                    tracing::warn!(error = %e, "waiting for the local Postgres");
                    logged = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(NodeError::Cancelled),
            _ = tokio::time::sleep(STARTUP_RETRY) => {}
        }
    }
}

/// Re-enrols periodically and soon after DDL, so a table created while running replicates
/// without a restart. A table that cannot replicate is reported and left out; the others go on.
async fn enrol_loop(
    config: Config,
    pool: Pool,
    metrics: ReplicationMetrics,
    rules: Arc<OwnerRules>,
    ddl_seen: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_secs(config.replication.enrol_interval_seconds);
    let mut reported: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = ddl_seen.notified() => {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(DDL_SETTLE) => {}
                }
            }
        }
        let mut pooled = match pool::get(&pool, &config.postgres).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "enrolment check skipped");
                continue;
            }
        };
        let client: &mut Client = &mut pooled;
        let checked = match enrol::checked_tables(&*client, &config.replication).await {
            Ok(checked) => checked,
            Err(e) => {
                metrics.enrolment_errors.inc();
                tracing::warn!(error = %e, "enrolment check failed");
                continue;
            }
        };
        let mut tables = Vec::new();
        let mut problems = Vec::new();
        let ctx = GuardContext {
            node: &config.node.name,
            conflict_column: &config.replication.conflict_column,
            rules: &rules,
        };
        for verdict in checked {
            match verdict {
                // A table is published only once its triggers are in place, so that every
                // write shipped from it is stamped.
                Ok(t) => match guard::install(client, &t, &ctx).await {
                    Ok(()) => tables.push(t),
                    Err(e) => problems.push(e.to_string()),
                },
                Err(e) => problems.push(e.to_string()),
            }
        }
        // Each problem is logged once, not every period.
        for problem in &problems {
            if !reported.contains(problem) {
                metrics.enrolment_errors.inc();
                tracing::error!(error = %problem, "table not enrolled");
            }
        }
        reported = problems;
        match enrol::sync_publication(client, &tables).await {
            Ok(_) => metrics.enrolled_tables.set(tables.len() as i64),
            Err(e) => {
                metrics.enrolment_errors.inc();
                tracing::warn!(error = %e, "updating publication pgmm failed");
            }
        }
    }
}

/// How often tombstones are checked for purging.
const TOMBSTONE_PURGE_INTERVAL: Duration = Duration::from_secs(600);

/// Removes tombstones once they are older than `[replication] tombstone_retention_hours` and
/// every peer's slot has confirmed this node's WAL past the point where the tombstone was
/// written; with a slot missing, nothing is purged (that peer's position is unknown).
async fn tombstone_purge(
    config: Config,
    pool: Pool,
    peers: Vec<String>,
    metrics: ReplicationMetrics,
    shutdown: CancellationToken,
) {
    let slots: Vec<String> = peers.iter().map(|p| origin_name(p)).collect();
    let retention = format!("{} hours", config.replication.tombstone_retention_hours);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TOMBSTONE_PURGE_INTERVAL) => {}
        }
        let client = match pool::get(&pool, &config.postgres).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "tombstone purge skipped");
                continue;
            }
        };
        match purge_tombstones(&client, &slots, &retention).await {
            Ok(0) => {}
            Ok(n) => {
                metrics.tombstones_purged.inc_by(n);
                tracing::info!(purged = n, "old tombstones purged");
            }
            Err(e) => tracing::warn!(error = %pg_error_text(&e), "purging tombstones failed"),
        }
    }
}

/// One purge pass; returns how many tombstones it removed.
pub async fn purge_tombstones(
    client: &Client,
    slots: &[String],
    retention: &str,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "WITH acked AS ( \
                 SELECT count(*) AS slots, min(confirmed_flush_lsn) AS lsn \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = ANY ($1::text[])) \
             DELETE FROM pgmm.tombstones t USING acked \
             WHERE acked.slots = cardinality($1::text[]) \
               AND t.deleted_at < now() - $2::text::interval \
               AND (cardinality($1::text[]) = 0 OR t.local_lsn < acked.lsn)",
            &[&slots, &retention],
        )
        .await
}
