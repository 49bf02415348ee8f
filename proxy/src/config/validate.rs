//! From TOML text to a checked [`Config`]: serde reads a span-carrying mirror of the file, then
//! each rule is checked against it so that an error can point at the exact line.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{
    postgres_host_port, ClientConfig, ClusterConfig, Config, ConfigError, MetricsConfig,
    NodeConfig, OwnerSpec, OwnershipRule, PeerEntry, PeerListenConfig, PostgresConfig,
    ReplicationConfig, DEFAULT_APPLY_QUEUE_BYTES, DEFAULT_CHUNK_BYTES, DEFAULT_CONFLICT_COLUMN,
    DEFAULT_ENROL_INTERVAL_SECONDS, DEFAULT_MAX_CLOCK_SKEW_MS, DEFAULT_MAX_PARSE_BYTES,
    DEFAULT_MAX_PARSE_DEPTH, DEFAULT_POOL_SIZE, DEFAULT_SHUTDOWN_GRACE_SECONDS,
    DEFAULT_STARTUP_TIMEOUT_SECONDS, DEFAULT_TOMBSTONE_RETENTION_HOURS, MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
};
use crate::config::table::TableName;

/// pgmm's own schema (conflicts, tombstones, schema version): per node, never replicated.
pub(super) const PGMM_SCHEMA: &str = "pgmm";

/// Postgres identifiers are at most 63 bytes and node names are used as `pgmm_<node>`.
const MAX_NODE_NAME_LEN: usize = 63 - "pgmm_".len();

/// Upper bound of `[peer] max_pending_handshakes`: past this, the cap no longer bounds memory
/// in any useful sense (each pending handshake is a socket, a task and up to ~100 KiB).
const MAX_PENDING_HANDSHAKES: usize = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    cluster: RawCluster,
    client: RawClient,
    postgres: RawPostgres,
    peer: Option<RawPeerListen>,
    #[serde(default)]
    peers: Vec<Spanned<RawPeerEntry>>,
    metrics: Option<RawMetrics>,
    replication: Option<RawReplication>,
    #[serde(default)]
    ownership: Vec<Spanned<RawOwnership>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    worker_threads: Option<usize>,
    join_from: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    nodes: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    listen: Spanned<String>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    shutdown_grace_seconds: Option<u64>,
    startup_timeout_seconds: Option<Spanned<u64>>,
    max_parse_bytes: Option<Spanned<usize>>,
    max_parse_depth: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url: Spanned<String>,
    pool_size: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeerListen {
    listen: Spanned<String>,
    secret_file: Spanned<String>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    tls_ca: Option<Spanned<String>>,
    max_pending_handshakes: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeerEntry {
    name: Spanned<String>,
    address: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    #[serde(default)]
    tables: Vec<Spanned<String>>,
    conflict_column: Option<Spanned<String>>,
    enrol_interval_seconds: Option<Spanned<u64>>,
    tombstone_retention_hours: Option<Spanned<u64>>,
    max_clock_skew_ms: Option<Spanned<u64>>,
    chunk_bytes: Option<Spanned<u64>>,
    apply_queue_bytes: Option<Spanned<u64>>,
    ddl_nodes: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOwnership {
    table: Spanned<String>,
    owner: Option<Spanned<String>>,
    owner_column: Option<Spanned<String>>,
    owner_key: Option<Spanned<String>>,
}

/// The text being validated, for turning byte spans into lines.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Source<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }

    fn invalid(&self, span: &Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line(span),
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

pub(super) fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    let src = Source { text, path: origin };
    let raw: RawConfig = toml::from_str(text).map_err(|err| syntax_error(&src, &err))?;
    build(&src, raw)
}

fn build(src: &Source<'_>, raw: RawConfig) -> Result<Config, ConfigError> {
    let node = check_node_name(src, "node.name", &raw.node.name)?;
    let node_threads = raw.node.worker_threads.unwrap_or(0);

    let cluster_name = non_empty(src, "cluster.name", &raw.cluster.name)?;
    if cluster_name.len() > crate::config::MAX_CLUSTER_NAME_BYTES {
        return Err(src.invalid(
            &raw.cluster.name.span(),
            "cluster.name",
            format!(
                "is {} bytes, longer than {} (the name travels in the peer handshake, whose \
                 messages are size-limited)",
                cluster_name.len(),
                crate::config::MAX_CLUSTER_NAME_BYTES
            ),
        ));
    }
    let nodes = check_cluster_nodes(src, &raw.cluster.nodes)?;
    if !nodes.contains(&node) {
        return Err(src.invalid(
            &raw.node.name.span(),
            "node.name",
            format!(
                "node {node:?} is not in cluster.nodes {nodes:?} (line {}); \
                 add it to the list or fix the name",
                src.line(&raw.cluster.nodes.span())
            ),
        ));
    }

    let client = check_client(src, raw.client)?;
    let postgres = check_postgres(src, raw.postgres)?;

    let peer = raw
        .peer
        .map(|peer| check_peer_listen(src, peer))
        .transpose()?;
    if let (None, Some(first)) = (&peer, raw.peers.first()) {
        return Err(src.invalid(
            &first.span(),
            "peer",
            "[[peers]] are configured but the [peer] section is missing; \
             add [peer] with listen and secret_file so that peers can connect",
        ));
    }
    let peers = check_peers(src, &node, &nodes, raw.peers)?;
    let join_from = match &raw.node.join_from {
        None => None,
        Some(donor) => {
            let name = donor.get_ref();
            if *name == node {
                return Err(src.invalid(
                    &donor.span(),
                    "node.join_from",
                    "names this node itself; name the node to copy the data from",
                ));
            }
            if !peers.iter().any(|p| p.name == *name) {
                return Err(src.invalid(
                    &donor.span(),
                    "node.join_from",
                    format!(
                        "node {name:?} has no [[peers]] entry: the donor must be a peer, \
                         reached at its [peer] listen address"
                    ),
                ));
            }
            Some(name.clone())
        }
    };

    let metrics = raw
        .metrics
        .map(|m| {
            check_listen(src, "metrics.listen", &m.listen).map(|listen| MetricsConfig { listen })
        })
        .transpose()?;

    let replication = raw
        .replication
        .map(|r| check_replication(src, &nodes, r))
        .transpose()?
        .unwrap_or_default();

    let ownership = check_ownership(src, &nodes, raw.ownership)?;

    Ok(Config {
        node: NodeConfig {
            name: node,
            worker_threads: node_threads,
            join_from,
        },
        cluster: ClusterConfig {
            name: cluster_name,
            nodes,
        },
        client,
        postgres,
        peer,
        peers,
        metrics,
        replication,
        ownership,
    })
}

fn check_node_name(
    src: &Source<'_>,
    key: &str,
    name: &Spanned<String>,
) -> Result<String, ConfigError> {
    let value = name.get_ref();
    let problem = if value.is_empty() {
        Some("a node name must not be empty".to_owned())
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Some(format!(
            "node name {value:?} may only contain a-z, 0-9 and _, \
             because it becomes part of slot and origin names (pgmm_<node>)"
        ))
    } else if value.len() > MAX_NODE_NAME_LEN {
        Some(format!(
            "node name {value:?} is longer than {MAX_NODE_NAME_LEN} characters, \
             too long for a Postgres slot name pgmm_<node>"
        ))
    } else {
        None
    };
    match problem {
        Some(message) => Err(src.invalid(&name.span(), key, message)),
        None => Ok(value.clone()),
    }
}

fn check_cluster_nodes(
    src: &Source<'_>,
    nodes: &Spanned<Vec<Spanned<String>>>,
) -> Result<Vec<String>, ConfigError> {
    if nodes.get_ref().is_empty() {
        return Err(src.invalid(
            &nodes.span(),
            "cluster.nodes",
            "the cluster needs at least one node (this one)",
        ));
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut names = Vec::with_capacity(nodes.get_ref().len());
    for entry in nodes.get_ref() {
        let name = check_node_name(src, "cluster.nodes", entry)?;
        let line = src.line(&entry.span());
        if let Some(first) = seen.insert(entry.get_ref(), line) {
            return Err(src.invalid(
                &entry.span(),
                "cluster.nodes",
                format!("node {name:?} is listed twice (lines {first} and {line})"),
            ));
        }
        names.push(name);
    }
    Ok(names)
}

fn check_client(src: &Source<'_>, raw: RawClient) -> Result<ClientConfig, ConfigError> {
    let listen = check_listen(src, "client.listen", &raw.listen)?;
    let (tls_cert, tls_key) = check_tls_pair(src, "client", raw.tls_cert, raw.tls_key)?;
    let at_least_one = |v: Option<Spanned<usize>>, key: &str, default: usize| match v {
        Some(v) if *v.get_ref() == 0 => Err(src.invalid(&v.span(), key, "must be at least 1")),
        Some(v) => Ok(v.into_inner()),
        None => Ok(default),
    };
    let max_parse_bytes = at_least_one(
        raw.max_parse_bytes,
        "client.max_parse_bytes",
        DEFAULT_MAX_PARSE_BYTES,
    )?;
    let max_parse_depth = at_least_one(
        raw.max_parse_depth,
        "client.max_parse_depth",
        DEFAULT_MAX_PARSE_DEPTH,
    )?;
    let startup_timeout_seconds = match raw.startup_timeout_seconds {
        Some(v) if *v.get_ref() == 0 => {
            return Err(src.invalid(
                &v.span(),
                "client.startup_timeout_seconds",
                "must be at least 1",
            ))
        }
        Some(v) => v.into_inner(),
        None => DEFAULT_STARTUP_TIMEOUT_SECONDS,
    };
    Ok(ClientConfig {
        startup_timeout_seconds,
        max_parse_bytes,
        max_parse_depth,
        listen,
        tls_cert,
        tls_key,
        shutdown_grace_seconds: raw
            .shutdown_grace_seconds
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECONDS),
    })
}

fn check_postgres(src: &Source<'_>, raw: RawPostgres) -> Result<PostgresConfig, ConfigError> {
    let url = raw.url.get_ref();
    let pg = url.parse::<tokio_postgres::Config>().map_err(|err| {
        src.invalid(
            &raw.url.span(),
            "postgres.url",
            format!("not a valid Postgres connection string: {err}"),
        )
    })?;
    if postgres_host_port(&pg).is_none() {
        return Err(src.invalid(
            &raw.url.span(),
            "postgres.url",
            "names no host; give one, e.g. postgres://user@127.0.0.1:5432/db \
             or host=/var/run/postgresql for a Unix socket",
        ));
    }
    let pool_size = match raw.pool_size {
        Some(size) if *size.get_ref() == 0 => {
            return Err(src.invalid(&size.span(), "postgres.pool_size", "must be at least 1"))
        }
        Some(size) => size.into_inner(),
        None => DEFAULT_POOL_SIZE,
    };
    Ok(PostgresConfig {
        url: url.clone(),
        pool_size,
    })
}

fn check_peer_listen(
    src: &Source<'_>,
    raw: RawPeerListen,
) -> Result<PeerListenConfig, ConfigError> {
    let listen = check_listen(src, "peer.listen", &raw.listen)?;
    let secret_file = check_path(src, "peer.secret_file", &raw.secret_file)?;
    let (tls_cert, tls_key) = check_tls_pair(src, "peer", raw.tls_cert, raw.tls_key)?;
    let tls_ca = raw
        .tls_ca
        .map(|ca| check_path(src, "peer.tls_ca", &ca))
        .transpose()?;
    let max_pending_handshakes = match raw.max_pending_handshakes {
        None => crate::config::DEFAULT_MAX_PENDING_HANDSHAKES,
        Some(v) => match usize::try_from(*v.get_ref()) {
            Ok(n) if (1..=MAX_PENDING_HANDSHAKES).contains(&n) => n,
            _ => {
                return Err(src.invalid(
                    &v.span(),
                    "peer.max_pending_handshakes",
                    format!(
                        "must be between 1 and {MAX_PENDING_HANDSHAKES} (handshakes running at \
                         once on the peer port)"
                    ),
                ))
            }
        },
    };
    Ok(PeerListenConfig {
        listen,
        secret_file,
        tls_cert,
        tls_key,
        tls_ca,
        max_pending_handshakes,
    })
}

fn check_peers(
    src: &Source<'_>,
    node: &str,
    nodes: &[String],
    raw: Vec<Spanned<RawPeerEntry>>,
) -> Result<Vec<PeerEntry>, ConfigError> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut peers = Vec::with_capacity(raw.len());
    for entry in raw {
        let entry = entry.into_inner();
        let name_span = entry.name.span();
        let name = entry.name.into_inner();
        let line = src.line(&name_span);
        if name == node {
            return Err(src.invalid(
                &name_span,
                "peers.name",
                format!("{name:?} is this node (node.name); list only the other nodes"),
            ));
        }
        if !nodes.contains(&name) {
            return Err(src.invalid(
                &name_span,
                "peers.name",
                format!("{name:?} is not in cluster.nodes {nodes:?}"),
            ));
        }
        if let Some(first) = seen.insert(name.clone(), line) {
            return Err(src.invalid(
                &name_span,
                "peers.name",
                format!("peer {name:?} is listed twice (lines {first} and {line})"),
            ));
        }
        let address = check_listen(src, "peers.address", &entry.address)?;
        peers.push(PeerEntry { name, address });
    }
    Ok(peers)
}

fn check_replication(
    src: &Source<'_>,
    nodes: &[String],
    raw: RawReplication,
) -> Result<ReplicationConfig, ConfigError> {
    let mut ddl_nodes = Vec::new();
    if let Some(list) = &raw.ddl_nodes {
        if list.get_ref().is_empty() {
            return Err(src.invalid(
                &list.span(),
                "replication.ddl_nodes",
                "must name at least one node (leave the key out to allow schema changes on \
                 every node)",
            ));
        }
        for name in list.get_ref() {
            if !nodes.contains(name.get_ref()) {
                return Err(src.invalid(
                    &name.span(),
                    "replication.ddl_nodes",
                    format!(
                        "{:?} is not a node of cluster.nodes ({})",
                        name.get_ref(),
                        nodes.join(", ")
                    ),
                ));
            }
            ddl_nodes.push(name.get_ref().clone());
        }
    }
    let mut tables = Vec::with_capacity(raw.tables.len());
    for pattern in raw.tables {
        let text = pattern.get_ref();
        match parse_pattern(text) {
            None => {
                return Err(src.invalid(
                    &pattern.span(),
                    "replication.tables",
                    format!(
                        "{text:?} is not a table pattern; write schema.table, \
                         where either part may be * (e.g. \"public.*\", \"sales.orders\")"
                    ),
                ))
            }
            Some(p) if p.schema.as_deref() == Some(PGMM_SCHEMA) => {
                return Err(src.invalid(
                    &pattern.span(),
                    "replication.tables",
                    format!(
                        "{text:?} names schema pgmm, pgmm's own per-node bookkeeping, \
                         which is never replicated"
                    ),
                ))
            }
            Some(_) => tables.push(pattern.into_inner()),
        }
    }
    let conflict_column = match raw.conflict_column {
        Some(column) => non_empty(src, "replication.conflict_column", &column)?,
        None => DEFAULT_CONFLICT_COLUMN.to_owned(),
    };
    let enrol_interval_seconds = match raw.enrol_interval_seconds {
        Some(v) if *v.get_ref() == 0 => {
            return Err(src.invalid(
                &v.span(),
                "replication.enrol_interval_seconds",
                "must be at least 1 (seconds between checks for new tables to replicate)"
                    .to_owned(),
            ))
        }
        Some(v) => v.into_inner(),
        None => DEFAULT_ENROL_INTERVAL_SECONDS,
    };
    let tombstone_retention_hours =
        match raw.tombstone_retention_hours {
            Some(v) if *v.get_ref() == 0 => return Err(src.invalid(
                &v.span(),
                "replication.tombstone_retention_hours",
                "must be at least 1: a tombstone must outlive any change still on its way from \
                 a peer"
                    .to_owned(),
            )),
            Some(v) => v.into_inner(),
            None => DEFAULT_TOMBSTONE_RETENTION_HOURS,
        };
    let max_clock_skew_ms = match raw.max_clock_skew_ms {
        Some(v) if *v.get_ref() == 0 => {
            return Err(src.invalid(
                &v.span(),
                "replication.max_clock_skew_ms",
                "must be at least 1 (milliseconds of clock offset before a warning)".to_owned(),
            ))
        }
        Some(v) => v.into_inner(),
        None => DEFAULT_MAX_CLOCK_SKEW_MS,
    };
    let chunk_bytes = match raw.chunk_bytes {
        Some(v) if !(MIN_CHUNK_BYTES as u64..=MAX_CHUNK_BYTES as u64).contains(v.get_ref()) => {
            return Err(src.invalid(
                &v.span(),
                "replication.chunk_bytes",
                format!(
                    "must be between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES} (bytes of a \
                     transaction shipped as one piece)"
                ),
            ))
        }
        Some(v) => v.into_inner() as usize,
        None => DEFAULT_CHUNK_BYTES,
    };
    let apply_queue_bytes = match raw.apply_queue_bytes {
        Some(v) if *v.get_ref() < 2 * chunk_bytes as u64 => {
            return Err(src.invalid(
                &v.span(),
                "replication.apply_queue_bytes",
                format!(
                    "must be at least twice replication.chunk_bytes ({chunk_bytes}), so that a \
                     chunk can be read while the one before it is applied"
                ),
            ))
        }
        Some(v) => usize::try_from(v.into_inner()).unwrap_or(usize::MAX),
        None => DEFAULT_APPLY_QUEUE_BYTES.max(2 * chunk_bytes),
    };
    Ok(ReplicationConfig {
        tables,
        conflict_column,
        enrol_interval_seconds,
        tombstone_retention_hours,
        max_clock_skew_ms,
        chunk_bytes,
        apply_queue_bytes,
        ddl_nodes,
    })
}

fn check_ownership(
    src: &Source<'_>,
    nodes: &[String],
    raw: Vec<Spanned<RawOwnership>>,
) -> Result<Vec<OwnershipRule>, ConfigError> {
    let mut seen: HashMap<TableName, usize> = HashMap::new();
    let mut rules = Vec::with_capacity(raw.len());
    for rule in raw {
        let rule_span = rule.span();
        let rule = rule.into_inner();
        let table_span = rule.table.span();
        let text = rule.table.get_ref();
        let table = TableName::parse(text).ok_or_else(|| {
            src.invalid(
                &table_span,
                "ownership.table",
                format!(
                    "{text:?} is not a table name; write table, schema.table or \
                     \"Quoted\".table"
                ),
            )
        })?;
        if table.schema == PGMM_SCHEMA {
            return Err(src.invalid(
                &table_span,
                "ownership.table",
                format!("{text:?} is in schema pgmm, pgmm's own bookkeeping; it has no owner"),
            ));
        }
        let line = src.line(&table_span);
        if let Some(first) = seen.insert(table.clone(), line) {
            return Err(src.invalid(
                &table_span,
                "ownership.table",
                format!("two ownership rules for table {table} (lines {first} and {line})"),
            ));
        }

        let given: Vec<(&str, Spanned<String>)> = [
            ("owner", rule.owner),
            ("owner_column", rule.owner_column),
            ("owner_key", rule.owner_key),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| (key, v)))
        .collect();
        let owner = match given.as_slice() {
            [] => {
                return Err(src.invalid(
                    &rule_span,
                    "ownership.owner",
                    format!(
                        "the rule for table {table} needs exactly one of owner, owner_column \
                         or owner_key, and has none"
                    ),
                ))
            }
            [(key, value)] => owner_spec(src, nodes, key, value)?,
            [_, (second, value), ..] => {
                let keys: Vec<&str> = given.iter().map(|(k, _)| *k).collect();
                return Err(src.invalid(
                    &value.span(),
                    &format!("ownership.{second}"),
                    format!(
                        "the rule for table {table} needs exactly one of owner, owner_column \
                         or owner_key, and has {}",
                        keys.join(" and ")
                    ),
                ));
            }
        };
        rules.push(OwnershipRule { table, owner });
    }
    Ok(rules)
}

fn owner_spec(
    src: &Source<'_>,
    nodes: &[String],
    key: &str,
    value: &Spanned<String>,
) -> Result<OwnerSpec, ConfigError> {
    let full_key = format!("ownership.{key}");
    let text = non_empty(src, &full_key, value)?;
    Ok(match key {
        "owner" => {
            if !nodes.contains(&text) {
                return Err(src.invalid(
                    &value.span(),
                    &full_key,
                    format!("owner {text:?} is not a node of the cluster {nodes:?}"),
                ));
            }
            OwnerSpec::Node(text)
        }
        "owner_column" => OwnerSpec::Column(text),
        _ => OwnerSpec::Key(text),
    })
}

/// `host:port` with a numeric port; IPv6 hosts in brackets, as in `[::1]:6432`.
fn check_listen(
    src: &Source<'_>,
    key: &str,
    value: &Spanned<String>,
) -> Result<String, ConfigError> {
    let text = value.get_ref();
    let host_ok = |host: &str| {
        if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty() && !host.contains(':') && !host.contains(char::is_whitespace)
        }
    };
    match text.rsplit_once(':') {
        Some((host, port)) if host_ok(host) && port.parse::<u16>().is_ok() => Ok(text.clone()),
        _ => Err(src.invalid(
            &value.span(),
            key,
            format!(
                "{text:?} is not host:port with a numeric port \
                 (e.g. \"127.0.0.1:6432\", \"[::1]:6432\")"
            ),
        )),
    }
}

fn check_tls_pair(
    src: &Source<'_>,
    section: &str,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
) -> Result<(Option<PathBuf>, Option<PathBuf>), ConfigError> {
    let cert_key = format!("{section}.tls_cert");
    let key_key = format!("{section}.tls_key");
    match (cert, key) {
        (Some(cert), Some(key)) => Ok((
            Some(check_path(src, &cert_key, &cert)?),
            Some(check_path(src, &key_key, &key)?),
        )),
        (None, None) => Ok((None, None)),
        (Some(cert), None) => Err(src.invalid(
            &cert.span(),
            &key_key,
            format!("{cert_key} is set but {key_key} is not; TLS needs both, set both or neither"),
        )),
        (None, Some(key)) => Err(src.invalid(
            &key.span(),
            &cert_key,
            format!("{key_key} is set but {cert_key} is not; TLS needs both, set both or neither"),
        )),
    }
}

fn check_path(
    src: &Source<'_>,
    key: &str,
    value: &Spanned<String>,
) -> Result<PathBuf, ConfigError> {
    non_empty(src, key, value).map(PathBuf::from)
}

fn non_empty(src: &Source<'_>, key: &str, value: &Spanned<String>) -> Result<String, ConfigError> {
    if value.get_ref().trim().is_empty() {
        Err(src.invalid(&value.span(), key, "must not be empty"))
    } else {
        Ok(value.get_ref().clone())
    }
}

/// A `replication.tables` pattern; `None` in a part is the wildcard `*`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TablePattern {
    pub(super) schema: Option<String>,
    pub(super) name: Option<String>,
}

impl TablePattern {
    pub(super) fn matches(&self, table: &TableName) -> bool {
        self.schema.as_ref().is_none_or(|s| *s == table.schema)
            && self.name.as_ref().is_none_or(|n| *n == table.name)
    }
}

/// Parses `schema.table` where either part may be a bare `*`; identifiers fold as in
/// [`TableName::parse`].
pub(super) fn parse_pattern(text: &str) -> Option<TablePattern> {
    let (schema, name) = split_qualified(text.trim())?;
    Some(TablePattern {
        schema: pattern_part(schema)?,
        name: pattern_part(name)?,
    })
}

/// [`parse_pattern`] and [`TablePattern::matches`] in one, without allocating, for the usual
/// pattern of plain lower-case identifiers (`public.orders`, `sales.*`), which fold to
/// themselves. The receiver checks every applied transaction's tables against the patterns,
/// and parsing them each time allocated several strings per table. `None` when the pattern
/// needs the full parser (quotes, upper case, anything else).
pub(super) fn plain_pattern_matches(text: &str, table: &TableName) -> Option<bool> {
    let plain = |part: &str| {
        part == "*"
            || (!part.is_empty()
                && part.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'$'
                }))
    };
    let (schema, name) = text.trim().split_once('.')?;
    if !plain(schema) || !plain(name) {
        return None;
    }
    Some((schema == "*" || schema == table.schema) && (name == "*" || name == table.name))
}

/// `Some(None)` for the wildcard. A `*` is only a wildcard on its own: `sales*` is rejected
/// rather than silently taken as a literal name.
fn pattern_part(part: &str) -> Option<Option<String>> {
    if part == "*" {
        Some(None)
    } else if !part.starts_with('"') && part.contains('*') {
        None
    } else {
        single_identifier(part).map(Some)
    }
}

/// Splits at the one dot outside double quotes (quoted identifiers may contain dots).
fn split_qualified(text: &str) -> Option<(&str, &str)> {
    let mut quoted = false;
    let mut dot = None;
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '.' if !quoted && dot.replace(i).is_some() => return None,
            _ => {}
        }
    }
    let dot = dot?;
    Some((&text[..dot], &text[dot + 1..]))
}

/// One folded identifier, or `None` if `part` is empty or has more than one part.
fn single_identifier(part: &str) -> Option<String> {
    TableName::parse(&format!("{part}.x")).map(|t| t.schema)
}

/// Turns a toml/serde error into one naming the full key (`client.bar`, not just `bar`) and
/// its line, since serde only knows the innermost field name.
fn syntax_error(src: &Source<'_>, err: &toml::de::Error) -> ConfigError {
    let span = err.span().unwrap_or(0..0);
    let (line, column) = line_col(src.text, span.start);
    ConfigError::Syntax {
        path: src.path.to_path_buf(),
        line,
        column,
        message: describe(src.text, &span, err.message()),
    }
}

fn describe(text: &str, span: &Range<usize>, message: &str) -> String {
    let context = KeyContext::at(text, span);
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let expected = expected.trim_start_matches(',').trim();
            let key = match &context.header {
                // An unknown table name inside a header: the header up to the span says it all.
                Some(h) if context.in_header => h.clone(),
                Some(h) => format!("{h}.{field}"),
                None => field.to_owned(),
            };
            return format!("unknown key `{key}` ({expected})");
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some((field, _)) = rest.split_once('`') {
            return match &context.header {
                Some(h) => format!("missing required key `{h}.{field}`"),
                None if span.is_empty() => format!("missing required section [{field}]"),
                None => format!("missing required key `{field}`"),
            };
        }
    }
    if message == "duplicate key" {
        if let Some(key) = text.get(span.clone()) {
            return match &context.header {
                Some(h) if !context.in_header => format!("duplicate key `{h}.{key}`"),
                _ => format!("duplicate key `{key}`"),
            };
        }
    }
    match (&context.header, &context.key) {
        (Some(h), Some(k)) => format!("`{h}.{k}`: {message}"),
        (None, Some(k)) => format!("`{k}`: {message}"),
        _ => message.to_owned(),
    }
}

/// Where in the document a span sits, recovered from the text by looking at table headers.
/// Good for the plain `[section]` / `key = value` layout a config file has; with exotic layouts
/// it gives up (no prefix) rather than guess.
struct KeyContext {
    /// Dotted name of the enclosing table; when `in_header`, the header text up to the span.
    header: Option<String>,
    in_header: bool,
    /// The `key` of a `key = value` line when the span is in the value.
    key: Option<String>,
}

impl KeyContext {
    fn at(text: &str, span: &Range<usize>) -> Self {
        let start = span.start.min(text.len());
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = &text[line_start..line_end];
        if line.trim_start().starts_with('[') {
            let end = span.end.clamp(start, line_end);
            let header = header_name(&text[line_start..end]);
            return Self {
                header: (!header.is_empty()).then_some(header),
                in_header: true,
                key: None,
            };
        }
        let header = text[..line_start]
            .lines()
            .rev()
            .map(str::trim_start)
            .find(|l| l.starts_with('['))
            .map(|l| header_name(l.split('#').next().unwrap_or(l)))
            .filter(|h| !h.is_empty());
        let key = text[line_start..start]
            .split_once('=')
            .map(|(k, _)| k.trim().to_owned())
            .filter(|k| !k.is_empty() && !k.contains(['{', '[', ',']));
        Self {
            header,
            in_header: false,
            key,
        }
    }
}

/// `[[peers]]` -> `peers`, ` [ client ]` -> `client`, `[client.extra` -> `client.extra`.
fn header_name(header: &str) -> String {
    header
        .trim()
        .trim_start_matches('[')
        .trim_end()
        .trim_end_matches(']')
        .split('.')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(".")
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}
