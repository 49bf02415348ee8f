//! The node's configuration file: one TOML document, parsed and validated in full at start-up.
//!
//! Everything a later stage relies on (node names usable as slot names, owners that are real
//! nodes, peers that are members of the cluster) is checked here, once, so that the rest of pgmm
//! can trust a loaded [`Config`]. Every error names the offending key and its line, because the
//! person reading it is an operator with the file open in an editor.

pub mod owners;
pub mod table;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::table::TableName;

/// Default of `[peer] max_pending_handshakes`. A cluster's legitimate handshakes are one per
/// peer and link (re)connection, a handful at once; each pending handshake costs at most a
/// socket, a task, TLS state and a handshake-sized (8 KiB) buffer (well under 100 KiB),
/// so 64 of them cost a few MiB.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 64;
/// Longest `[cluster] name` accepted, in bytes: the cluster name travels in the handshake, whose
/// frames are limited to the peer link's handshake frame limit (8 KiB).
pub const MAX_CLUSTER_NAME_BYTES: usize = 255;
/// Default seconds a SIGTERM waits for client sessions before the process exits anyway.
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: u64 = 30;
/// Default seconds a client has to complete start-up: Postgres's `authentication_timeout`.
pub const DEFAULT_STARTUP_TIMEOUT_SECONDS: u64 = 60;
/// Statements longer than this (bytes) are not parsed at the front door; see `[client]`.
pub const DEFAULT_MAX_PARSE_BYTES: usize = 1 << 20;
/// sqlparser's recursion limit for front-door parses (its own default is 50, about 20 nested
/// subqueries; 200 allows about 100 nested parentheses). The parser grows its stack on the heap
/// as it recurses, so this bounds work, not stack use.
pub const DEFAULT_MAX_PARSE_DEPTH: usize = 200;
/// Default size of pgmm's own pool of connections to the local Postgres (apply, bookkeeping).
pub const DEFAULT_POOL_SIZE: usize = 4;
/// Default LWW column, the design's `updated_at`.
pub const DEFAULT_CONFLICT_COLUMN: &str = "updated_at";
/// Default seconds between checks for newly created tables to enrol.
pub const DEFAULT_ENROL_INTERVAL_SECONDS: u64 = 10;
/// Tombstones are kept a week: far longer than any peer should stay unreachable.
pub const DEFAULT_TOMBSTONE_RETENTION_HOURS: u64 = 7 * 24;
/// Beyond a second of skew, last-writer-wins between truly concurrent writes gets arbitrary.
pub const DEFAULT_MAX_CLOCK_SKEW_MS: u64 = 1000;
/// `[replication] chunk_bytes`: a transaction is shipped in pieces of about this size.
pub const DEFAULT_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Bounds of `chunk_bytes`: below, per-chunk costs dominate; above, a chunk (encoded with its
/// framing) could outgrow the peer link's 64 MiB frame limit.
pub const MIN_CHUNK_BYTES: usize = 64 * 1024;
pub const MAX_CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// `[replication] apply_queue_bytes`: received changes waiting to be applied, per peer.
pub const DEFAULT_APPLY_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Port libpq and tokio-postgres assume when the URL names none.
const DEFAULT_POSTGRES_PORT: u16 = 5432;

/// A validated node configuration. Build it with [`Config::load`] or [`Config::parse`]; the
/// helper methods rely on the invariants those establish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    pub client: ClientConfig,
    pub postgres: PostgresConfig,
    /// `[peer]`: where this node listens for other pgmm nodes; absent on a front-door-only node.
    pub peer: Option<PeerListenConfig>,
    /// `[[peers]]`: the other nodes this node connects to.
    pub peers: Vec<PeerEntry>,
    pub metrics: Option<MetricsConfig>,
    pub replication: ReplicationConfig,
    pub ownership: Vec<OwnershipRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// `[a-z0-9_]+`: it becomes part of slot and origin names (`pgmm_<node>`).
    pub name: String,
    /// Threads of the async runtime; 0 (the default) picks [`NodeConfig::threads`]' choice.
    pub worker_threads: usize,
    /// `[node] join_from`: the donor a node with no data copies the replicated tables from on
    /// its first start (`membership::join`); ignored once the join is done.
    pub join_from: Option<String>,
}

impl NodeConfig {
    /// The runtime's thread count: the configured one, or half the CPUs (at least one), since
    /// pgmm shares the machine with the Postgres it fronts. With one thread pgmm uses a
    /// current-thread runtime: measured here, cross-thread wake-ups cost more than a second
    /// thread gives back when the cores are busy with Postgres anyway.
    pub fn threads(&self) -> usize {
        if self.worker_threads > 0 {
            return self.worker_threads;
        }
        std::thread::available_parallelism()
            .map(|n| (n.get() / 2).max(1))
            .unwrap_or(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub name: String,
    /// Ordered: row ownership by key gives node `i` of `n` the rows with `key % n == i`.
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `host:port` of the front door.
    pub listen: String,
    /// Both or neither (checked): with both, SSLRequest is answered with TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub shutdown_grace_seconds: u64,
    /// A client that has not sent its startup packet (TLS included) by then is dropped and
    /// counted, as Postgres's `authentication_timeout` does (at least 1).
    pub startup_timeout_seconds: u64,
    /// Query and Parse texts longer than this many bytes are forwarded unparsed (at least 1).
    pub max_parse_bytes: usize,
    /// The parser's recursion limit; a deeper text is forwarded unparsed (at least 1).
    pub max_parse_depth: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// A libpq-style URL or key/value string; known to parse as a `tokio_postgres::Config`
    /// with at least one host.
    pub url: String,
    pub pool_size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerListenConfig {
    pub listen: String,
    pub secret_file: PathBuf,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// `max_pending_handshakes`: accepted peer connections that may be in their handshake at
    /// once; one more is closed on accept.
    pub max_pending_handshakes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    /// A member of `cluster.nodes` other than this node.
    pub name: String,
    /// `host:port` of that node's `[peer] listen`.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Patterns as written: `schema.table`, either part may be `*`. Match with
    /// [`ReplicationConfig::matches`], which folds case the way [`TableName::parse`] does.
    pub tables: Vec<String>,
    pub conflict_column: String,
    /// Seconds between enrolment checks; DDL seen at the front door triggers one sooner.
    pub enrol_interval_seconds: u64,
    /// Hours a tombstone is kept at least (it is also kept until every peer acknowledged past it).
    pub tombstone_retention_hours: u64,
    /// A peer whose clock is estimated further off than this (milliseconds) is warned about.
    pub max_clock_skew_ms: u64,
    /// A transaction larger than this (in value bytes) is shipped as a sequence of chunks of about
    /// this size, each a frame of its own; this is what the sender holds of a transaction.
    pub chunk_bytes: usize,
    /// At most this many bytes of received changes wait for apply, per inbound peer link; the
    /// link's reader stops reading (and TCP pushes back on the sender) until apply catches up.
    pub apply_queue_bytes: usize,
    /// The nodes on which schema changes may be made (`[replication] ddl_nodes`); empty means
    /// every node. DDL elsewhere is refused (42501) by the capture trigger.
    pub ddl_nodes: Vec<String>,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            tables: Vec::new(),
            conflict_column: DEFAULT_CONFLICT_COLUMN.to_owned(),
            enrol_interval_seconds: DEFAULT_ENROL_INTERVAL_SECONDS,
            tombstone_retention_hours: DEFAULT_TOMBSTONE_RETENTION_HOURS,
            max_clock_skew_ms: DEFAULT_MAX_CLOCK_SKEW_MS,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            apply_queue_bytes: DEFAULT_APPLY_QUEUE_BYTES,
            ddl_nodes: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnershipRule {
    pub table: TableName,
    pub owner: OwnerSpec,
}

/// Who may write a table; see design.md, "Ownership rules".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerSpec {
    /// `owner = "b"`: only node `b` writes the table.
    Node(String),
    /// `owner_column = "home_node"`: a row belongs to the node named in that column.
    Column(String),
    /// `owner_key = "id"`: node `i` of `n` owns the rows with `id % n == i`.
    Key(String),
}

/// One error for the whole configuration boundary. Every variant carries the file path, and all
/// but `Io` the 1-based line, so the operator can jump straight to the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or valid TOML that does not fit the schema (unknown or missing keys,
    /// wrong value types).
    #[error("{}:{line}:{column}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// Fits the schema but breaks a rule; `key` is the dotted key path, e.g. `ownership.owner`.
    #[error("{}:{line}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The 1-based line the error points at, when there is one.
    #[cfg(test)]
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Io { .. } => None,
            Self::Syntax { line, .. } | Self::Invalid { line, .. } => Some(*line),
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`; `origin` only names the file in error messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        validate::parse(text, origin)
    }

    /// One line for `pgmm check-config` and the start-up log.
    pub fn summary(&self) -> String {
        format!(
            "config ok: node {:?} of cluster {:?} ({}), client {}, {}, {}, {}",
            self.node.name,
            self.cluster.name,
            plural(self.cluster.nodes.len(), "node"),
            self.client.listen,
            plural(self.peers.len(), "peer"),
            plural(self.replication.tables.len(), "table pattern"),
            plural(self.ownership.len(), "ownership rule"),
        )
    }

    /// This node's position in `cluster.nodes`, the `i` of key ownership (`key % n == i`).
    #[cfg(test)]
    pub fn node_index(&self) -> usize {
        self.cluster
            .nodes
            .iter()
            .position(|n| *n == self.node.name)
            .expect("Config::parse guarantees node.name is in cluster.nodes")
    }

    /// The ownership rule for `table`, if any (at most one exists: duplicates are rejected).
    #[cfg(test)]
    pub fn owner_of_table(&self, table: &TableName) -> Option<&OwnershipRule> {
        self.ownership.iter().find(|rule| rule.table == *table)
    }
}

impl PostgresConfig {
    /// Where the relay connects: the first host (a Unix-socket directory is returned as its
    /// path) and its port, 5432 when none is given. A `hostaddr` wins over `host`, as in libpq,
    /// because it is the address actually dialled.
    pub fn host_port(&self) -> (String, u16) {
        // `url` was validated at load; a hand-built invalid one falls back to libpq defaults.
        let Ok(pg) = self.url.parse::<tokio_postgres::Config>() else {
            return ("localhost".to_owned(), DEFAULT_POSTGRES_PORT);
        };
        postgres_host_port(&pg).unwrap_or_else(|| ("localhost".to_owned(), DEFAULT_POSTGRES_PORT))
    }
}

/// First host and its port; `None` when the config names no host at all.
fn postgres_host_port(pg: &tokio_postgres::Config) -> Option<(String, u16)> {
    let host = match (pg.get_hostaddrs().first(), pg.get_hosts().first()) {
        (Some(addr), _) => addr.to_string(),
        (None, Some(tokio_postgres::config::Host::Tcp(name))) => name.clone(),
        #[cfg(unix)]
        (None, Some(tokio_postgres::config::Host::Unix(dir))) => dir.display().to_string(),
        (None, None) => return None,
    };
    // One port applies to every host; otherwise ports pair with hosts in order.
    let port = pg
        .get_ports()
        .first()
        .copied()
        .unwrap_or(DEFAULT_POSTGRES_PORT);
    Some((host, port))
}

impl ReplicationConfig {
    /// Whether `table` is covered by a `tables` pattern. Schema `pgmm` never matches: pgmm's
    /// own bookkeeping is per node and must not be replicated.
    /// The patterns as (schema, table) with `None` for `*`, for the SQL that matches them in
    /// the database (the DDL capture trigger). Validation refused any that does not parse.
    pub fn patterns(&self) -> Vec<(Option<String>, Option<String>)> {
        self.tables
            .iter()
            .filter_map(|p| validate::parse_pattern(p))
            .map(|p| (p.schema, p.name))
            .collect()
    }

    pub fn matches(&self, table: &TableName) -> bool {
        table.schema != validate::PGMM_SCHEMA
            && self.tables.iter().any(|pattern| {
                validate::plain_pattern_matches(pattern, table).unwrap_or_else(|| {
                    validate::parse_pattern(pattern).is_some_and(|p| p.matches(table))
                })
            })
    }
}

impl fmt::Display for OwnerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(node) => write!(f, "owner = {node:?}"),
            Self::Column(column) => write!(f, "owner_column = {column:?}"),
            Self::Key(key) => write!(f, "owner_key = {key:?}"),
        }
    }
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}
