//! The front door's metrics: connections, statements by kind, refusals, protocol errors.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::classify::QueryKind;
use crate::observe::MetricsError;

/// The front door's metrics.
#[derive(Clone)]
pub struct FrontDoorMetrics {
    pub client_connections: IntGauge,
    queries: [IntCounter; 4],
    pub ownership_rejections: IntCounterVec,
    pub protocol_errors: IntCounterVec,
    /// Statements forwarded without a parse, by reason: `size` (over `[client]
    /// max_parse_bytes`) or `depth` (over `max_parse_depth`).
    pub unparsed: IntCounterVec,
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
        let unparsed = IntCounterVec::new(
            Opts::new(
                "pgmm_client_unparsed_total",
                "Statements forwarded to Postgres without a parse at the front door, because \
                 they are longer (size) or nest deeper (depth) than the [client] limits.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(unparsed.clone()))?;
        for reason in ["size", "depth"] {
            unparsed.with_label_values(&[reason]);
        }
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
        for reason in [
            "startup_packet",
            "message_length",
            "unexpected_eof",
            "tls",
            "startup_timeout",
        ] {
            protocol_errors.with_label_values(&[reason]);
        }
        Ok(Self {
            client_connections,
            queries,
            ownership_rejections,
            protocol_errors,
            unparsed,
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
