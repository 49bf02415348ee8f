//! The front door: the client listener and the state every session shares.
//!
//! A session ([`session`]) reads the startup packet, negotiates TLS ([`tls`]) and relays bytes
//! 1:1 to one backend connection, framing them ([`wire`]); only Query and Parse are held and
//! classified ([`classify`]) against the ownership rules ([`ownership`]), and a foreign write is
//! replaced by a refusal that Postgres raises itself ([`refusal`]). [`metrics`] are the front
//! door's.
//!
//! Sessions share only read-mostly things: the backend address, the TLS acceptor, the
//! statement classifier (whose cache is the one lock on the hot path, held for a lookup) and
//! the ownership rules. Shutdown is a token: the accept loop stops at once, sessions are given
//! a grace period to finish on their own, then dropped.

pub mod classify;
pub mod metrics;
pub mod ownership;
pub mod refusal;
pub mod session;
pub mod tls;
pub mod wire;

use std::fmt;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::owners::OwnerRules;
use crate::config::{Config, OwnerSpec};
use crate::frontdoor::metrics::FrontDoorMetrics;
use crate::frontdoor::ownership::Ownership;
use crate::observe::last_hour::LastHour;
use crate::observe::log_limit::LogLimiter;
use crate::pg::SqlState;
use classify::Classifier;
use tls::TlsError;

/// Statements whose classification is remembered; enough for any application's working set
/// of distinct statement texts, small enough (a few MB) to never matter.
const CLASSIFIER_CACHE: usize = 4096;

/// Large statements parsed at once, off the relay threads (each can hold hundreds of MB while
/// it is parsed); sessions with more wait their turn, the others are not affected.
const LARGE_PARSES: usize = 1;

/// At most one WARN line per reason this often for client connections closed on bad input.
const BAD_CLIENT_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum FrontDoorError {
    #[error("front door: cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl SqlState for FrontDoorError {
    fn sqlstate(&self) -> &str {
        match self {
            FrontDoorError::Bind { .. } => "58000",
            FrontDoorError::Tls(e) => e.sqlstate(),
        }
    }
}

/// Where the local Postgres listens.
#[derive(Debug, Clone)]
pub enum BackendAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A connection to the local Postgres.
pub type Backend = Either<TcpStream, UnixStream>;

impl BackendAddr {
    /// From `[postgres] url`: a host starting with `/` is a socket directory, as in libpq.
    pub fn from_config(config: &Config) -> Self {
        let (host, port) = config.postgres.host_port();
        if host.starts_with('/') {
            BackendAddr::Unix(PathBuf::from(host).join(format!(".s.PGSQL.{port}")))
        } else {
            BackendAddr::Tcp { host, port }
        }
    }

    pub async fn connect(&self) -> std::io::Result<Backend> {
        match self {
            BackendAddr::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Ok(Either::Left(s))
            }
            BackendAddr::Unix(path) => Ok(Either::Right(UnixStream::connect(path).await?)),
        }
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            BackendAddr::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// What every session of this node shares.
pub struct FrontDoor {
    pub backend: BackendAddr,
    pub tls: Option<TlsAcceptor>,
    pub classifier: Classifier,
    pub ownership: Ownership,
    pub metrics: FrontDoorMetrics,
    pub startup_timeout: Duration,
    /// `[client] max_parse_bytes`: longer statements are not parsed.
    pub max_parse_bytes: usize,
    /// Parses running off the relay threads; bounds the memory large parses hold at once.
    pub large_parses: Arc<Semaphore>,
    /// Signalled when a session runs DDL, so that enrolment looks for new tables at once
    /// instead of at its next period.
    pub ddl_seen: Arc<Notify>,
    /// Writes refused here in the last hour, for `pgmm status` (the counter
    /// `pgmm_ownership_rejections_total` has no notion of "recent").
    pub refusals: Arc<LastHour>,
    /// The WARN line for a client connection closed on bad input, limited per reason.
    pub bad_client_log: LogLimiter,
}

impl FrontDoor {
    pub fn from_config(config: &Config, metrics: FrontDoorMetrics) -> Result<Self, FrontDoorError> {
        let tls = match (&config.client.tls_cert, &config.client.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let table_owners = config
            .ownership
            .iter()
            .filter_map(|rule| match &rule.owner {
                OwnerSpec::Node(node) => Some((rule.table.clone(), node.clone())),
                OwnerSpec::Column(_) | OwnerSpec::Key(_) => None,
            });
        Ok(Self {
            backend: BackendAddr::from_config(config),
            tls,
            classifier: Classifier::new(NonZeroUsize::new(CLASSIFIER_CACHE).expect("non-zero"))
                .with_max_depth(config.client.max_parse_depth),
            max_parse_bytes: config.client.max_parse_bytes,
            large_parses: Arc::new(Semaphore::new(LARGE_PARSES)),
            ownership: Ownership::new(&config.node.name, table_owners)
                .with_rows(OwnerRules::from_config(config)),
            metrics,
            startup_timeout: Duration::from_secs(config.client.startup_timeout_seconds),
            ddl_seen: Arc::new(Notify::new()),
            refusals: Arc::new(LastHour::new()),
            bad_client_log: LogLimiter::new(BAD_CLIENT_LOG_INTERVAL),
        })
    }
}

/// Binds the client listener (so a bad or busy address fails start-up at once).
pub async fn bind(addr: &str) -> Result<TcpListener, FrontDoorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| FrontDoorError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Accepts clients until `shutdown` fires, then waits up to `grace` for open sessions.
pub async fn serve(
    door: Arc<FrontDoor>,
    listener: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let sessions = TaskTracker::new();
    tracing::info!(addr = ?listener.local_addr().ok(), backend = %door.backend, "front door listening");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    sessions.spawn(session::run(door.clone(), stream, peer));
                }
                Err(e) => {
                    // Typically EMFILE: keep serving the sessions we have, retry shortly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    sessions.close();
    let open = sessions.len();
    if open > 0 {
        tracing::info!(
            open,
            ?grace,
            "front door closed; waiting for open sessions to finish"
        );
    }
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        tracing::warn!(
            open = sessions.len(),
            "grace period over; closing the remaining sessions"
        );
    }
}
