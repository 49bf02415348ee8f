//! A thin client of PostgreSQL's streaming replication protocol, for logical decoding.
//!
//! Upstream tokio-postgres has no replication support and CI cannot fetch git dependencies, so
//! pgmm speaks the protocol itself, on top of `postgres-protocol` (message serializers, backend
//! parser, SCRAM and MD5). The client stops at the CopyData boundary: it hands out the raw payloads
//! (`'w'` XLogData, `'k'` keepalive) and sends payloads built by the caller, so that everything
//! about pgoutput and the standby status update lives in one decoder module.
//!
//! TLS is not supported: the replication connection goes to the node's own, local Postgres.

mod conn;

use std::time::Duration;

use thiserror::Error;

use crate::pg::quote::{replication_ident, replication_literal};
use crate::pg::SqlState;

pub use conn::{ReplicationConn, ReplicationStream};

/// `duplicate_object`, which Postgres answers to CREATE_REPLICATION_SLOT for a name in use.
const DUPLICATE_OBJECT: &str = "42710";

/// Why a replication connection or stream failed.
#[derive(Debug, Error)]
pub enum ReplicationError {
    /// The connection settings cannot be used by this client (e.g. TLS required, no user).
    #[error("replication connection settings: {0}")]
    Config(String),
    #[error("replication connection I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something this client does not expect at that point.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// Authentication failed on our side (unsupported method, missing password, bad SCRAM proof
    /// from the server). A wrong password is reported by the server, as [`ReplicationError::Server`].
    #[error("replication authentication: {0}")]
    Auth(String),
    /// An ErrorResponse from the server.
    #[error("server error {code}: {message}")]
    Server { code: String, message: String },
    /// CREATE_REPLICATION_SLOT for a slot that already exists: an expected outcome when a node
    /// restarts, so callers match on it instead of on a SQLSTATE.
    #[error("replication slot already exists")]
    SlotExists,
}

impl SqlState for ReplicationError {
    /// The server's for [`ReplicationError::Server`], the closest class otherwise, so that logs
    /// and metrics can use one vocabulary for local and server-side failures.
    fn sqlstate(&self) -> &str {
        match self {
            // sqlclient_unable_to_establish_sqlconnection
            ReplicationError::Config(_) => "08001",
            // connection_failure
            ReplicationError::Io(_) => "08006",
            // protocol_violation
            ReplicationError::Protocol(_) => "08P01",
            // invalid_authorization_specification
            ReplicationError::Auth(_) => "28000",
            ReplicationError::Server { code, .. } => code,
            ReplicationError::SlotExists => DUPLICATE_OBJECT,
        }
    }
}

/// Where and as whom to open a replication connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalSenderConfig {
    /// A host name or IP address, or a Unix socket directory (starts with `/`).
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
    /// Bounds the TCP/Unix connect only; `None` waits as long as the OS does.
    pub connect_timeout: Option<Duration>,
}

impl WalSenderConfig {
    /// Derives the replication settings from the operator's `[postgres] url`, so that there is a
    /// single place to say where the local Postgres is. Only the first host is used.
    pub fn from_tokio_postgres(cfg: &tokio_postgres::Config) -> Result<Self, ReplicationError> {
        use tokio_postgres::config::{Host, SslMode};

        if matches!(cfg.get_ssl_mode(), SslMode::Require) {
            return Err(ReplicationError::Config(
                "sslmode=require is not supported by the replication client (it connects to the \
                 local Postgres without TLS); use sslmode=prefer or disable"
                    .into(),
            ));
        }
        let host = match (cfg.get_hostaddrs().first(), cfg.get_hosts().first()) {
            (Some(addr), _) => addr.to_string(),
            (None, Some(Host::Tcp(name))) => name.clone(),
            (None, Some(Host::Unix(dir))) => dir
                .to_str()
                .ok_or_else(|| {
                    ReplicationError::Config(format!("socket directory {dir:?} is not UTF-8"))
                })?
                .to_owned(),
            (None, None) => return Err(ReplicationError::Config("no host in the url".into())),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg
            .get_user()
            .ok_or_else(|| ReplicationError::Config("no user in the url".into()))?
            .to_owned();
        let password = cfg
            .get_password()
            .map(|pw| {
                String::from_utf8(pw.to_vec())
                    .map_err(|_| ReplicationError::Config("the password is not UTF-8".into()))
            })
            .transpose()?;
        let dbname = cfg.get_dbname().unwrap_or(&user).to_owned();
        let application_name = cfg.get_application_name().unwrap_or("pgmm").to_owned();
        Ok(WalSenderConfig {
            host,
            port,
            user,
            password,
            dbname,
            application_name,
            connect_timeout: cfg.get_connect_timeout().copied(),
        })
    }
}

/// The answer to IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemId {
    /// The cluster's system identifier, a decimal u64 kept as text (as the server sends it).
    pub systemid: String,
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: u64,
    /// The database of a `replication=database` connection.
    pub dbname: Option<String>,
}

/// `X/Y`, the upper and lower 32 bits in hex, as the replication grammar and pg_lsn want it.
fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let valid =
        |part: &str| (1..=8).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid(hi) || !valid(lo) {
        return None;
    }
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

fn create_slot_command(slot: &str, plugin: &str, export: bool) -> String {
    // NOEXPORT_SNAPSHOT unless a join copies at the slot's snapshot: an exported snapshot pins
    // the connection until its next command.
    format!(
        "CREATE_REPLICATION_SLOT {} LOGICAL {} {}",
        replication_ident(slot),
        replication_ident(plugin),
        if export {
            "EXPORT_SNAPSHOT"
        } else {
            "NOEXPORT_SNAPSHOT"
        }
    )
}

fn start_replication_command(slot: &str, start_lsn: u64, options: &[(&str, &str)]) -> String {
    let mut sql = format!(
        "START_REPLICATION SLOT {} LOGICAL {}",
        replication_ident(slot),
        format_lsn(start_lsn)
    );
    if !options.is_empty() {
        let options: Vec<String> = options
            .iter()
            .map(|(name, value)| {
                format!("{} {}", replication_ident(name), replication_literal(value))
            })
            .collect();
        sql.push_str(" (");
        sql.push_str(&options.join(", "));
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips() {
        for lsn in [0, 1, 0x16_B374_D848, u64::MAX, 0xffff_ffff, 1 << 32] {
            assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn), "{lsn:#x}");
        }
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(format_lsn(0), "0/0");
        assert_eq!(parse_lsn("0/1A2B3C4"), Some(0x1A2B3C4));
        assert_eq!(parse_lsn("a/b"), Some(0xa_0000_000b));
    }

    #[test]
    fn malformed_lsn_is_rejected() {
        for text in [
            "",
            "/",
            "1/",
            "/1",
            "12",
            "1/2/3",
            "G/0",
            "123456789/0",
            "-1/0",
            "+1/0",
        ] {
            assert_eq!(parse_lsn(text), None, "{text:?}");
        }
    }

    #[test]
    fn commands_quote_names_and_values() {
        assert_eq!(
            create_slot_command("pgmm_b", "pgoutput", false),
            r#"CREATE_REPLICATION_SLOT "pgmm_b" LOGICAL "pgoutput" NOEXPORT_SNAPSHOT"#
        );
        assert_eq!(
            start_replication_command(
                "pgmm_b",
                0x1_0000_0010,
                &[("proto_version", "1"), ("publication_names", "it's")]
            ),
            r#"START_REPLICATION SLOT "pgmm_b" LOGICAL 1/10 ("proto_version" '1', "publication_names" 'it''s')"#
        );
        assert_eq!(
            start_replication_command("a\"b", 0, &[]),
            r#"START_REPLICATION SLOT "a""b" LOGICAL 0/0"#
        );
    }

    #[test]
    fn config_comes_from_the_postgres_url() {
        let cfg: tokio_postgres::Config =
            "postgres://rep:s%40cret@db.local:5433/app?application_name=x&connect_timeout=3"
                .parse()
                .unwrap();
        let got = WalSenderConfig::from_tokio_postgres(&cfg).unwrap();
        assert_eq!(
            got,
            WalSenderConfig {
                host: "db.local".into(),
                port: 5433,
                user: "rep".into(),
                password: Some("s@cret".into()),
                dbname: "app".into(),
                application_name: "x".into(),
                connect_timeout: Some(Duration::from_secs(3)),
            }
        );

        let cfg: tokio_postgres::Config = "host=/run/pg user=postgres".parse().unwrap();
        let got = WalSenderConfig::from_tokio_postgres(&cfg).unwrap();
        assert_eq!((got.host.as_str(), got.port), ("/run/pg", 5432));
        assert_eq!(got.dbname, "postgres", "dbname defaults to the user");
        assert_eq!(got.application_name, "pgmm");
        assert_eq!(got.password, None);
    }

    #[test]
    fn unusable_urls_are_refused() {
        let no_user: tokio_postgres::Config = "host=localhost".parse().unwrap();
        let tls: tokio_postgres::Config = "host=localhost user=u sslmode=require".parse().unwrap();
        for cfg in [no_user, tls] {
            let err = WalSenderConfig::from_tokio_postgres(&cfg).unwrap_err();
            assert!(matches!(err, ReplicationError::Config(_)), "{err}");
            assert_eq!(err.sqlstate(), "08001");
        }
    }
}
