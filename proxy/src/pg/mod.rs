//! Postgres plumbing every part of pgmm shares: connecting to the local server, the text of a
//! server error, the [`SqlState`] of every error enum ([`sqlstate`]), quoting ([`quote`]) and the
//! names pgmm gives its objects ([`names`]).

use std::str::FromStr;

use thiserror::Error;
use tokio_postgres::{Client, NoTls};

use crate::config::PostgresConfig;
use names::CAPTURE_SETTING;

pub mod names;
pub mod pool;
pub mod quote;
pub mod sqlstate;

pub use sqlstate::SqlState;

/// No connection to the local Postgres.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// Postgres refused or could not be reached.
    #[error("cannot connect to PostgreSQL at {host}:{port}: {}", pg_error_text(.source))]
    Refused {
        host: String,
        port: u16,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No pooled connection came free in time (see [`pool`]).
    #[error("no connection to PostgreSQL at {host}:{port} from pgmm's pool: {detail}")]
    Pool {
        host: String,
        port: u16,
        detail: String,
    },
}

impl SqlState for ConnectError {
    /// connection_failure, whether Postgres refused or the pool had no connection to give.
    fn sqlstate(&self) -> &str {
        "08006"
    }
}

/// Connects to `[postgres] url` (without TLS; the local Postgres is reached over loopback or a
/// Unix socket) and drives the connection on a spawned task.
pub async fn connect(pg: &PostgresConfig) -> Result<Client, ConnectError> {
    let (client, connection) = own_session(&pg.url)
        .connect(NoTls)
        .await
        .map_err(|source| {
            let (host, port) = pg.host_port();
            ConnectError::Refused { host, port, source }
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %pg_error_text(&e), "connection to the local Postgres ended");
        }
    });
    Ok(client)
}

/// The connection settings of `url` for one of pgmm's own sessions: DDL they run (guard
/// triggers, the publication) is pgmm's bookkeeping on this node, so the DDL capture trigger
/// (`schema::ddl`) must not ship it to the peers.
pub fn own_session(url: &str) -> tokio_postgres::Config {
    // The url was parsed by the same function when the config was validated.
    let mut config = tokio_postgres::Config::from_str(url).expect("[postgres] url is validated");
    let options = match config.get_options() {
        Some(given) if !given.is_empty() => format!("{given} -c {CAPTURE_SETTING}=off"),
        _ => format!("-c {CAPTURE_SETTING}=off"),
    };
    config.options(&options);
    config
}

/// tokio-postgres displays a server error as just "db error"; the operator needs the server's
/// message, code, detail and hint.
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}
