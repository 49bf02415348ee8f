//! pgmm's own pool of connections to the local Postgres (`[postgres] pool_size`), for the
//! short pieces of bookkeeping a node does on a timer or on request: enrolment checks, the slot
//! monitor, the tombstone purge, the progress record a peer handshake resumes from, and
//! `/readyz`. They share a few sessions instead of each holding one. The start-up migration and
//! enrolment use a session of their own, closed once the node has started. Client sessions never use it (each client gets its own backend connection), and
//! neither do the sessions that must keep their own state: apply (its replication origin and
//! `session_replication_role`), the TOAST filler and the walsender streams.

use std::str::FromStr;
use std::time::Duration;

pub use deadpool_postgres::Pool;
use deadpool_postgres::{Manager, ManagerConfig, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::ConnectError;
use crate::config::PostgresConfig;

/// How long a caller waits for a connection to come free or be made; the work done on pooled
/// connections is short, so a longer wait means the pool is too small or Postgres is stuck.
const WAIT: Duration = Duration::from_secs(10);

/// The pool, sized by `[postgres] pool_size`. Connections are made on first use (so a node can
/// start while its Postgres is still coming up) and checked for a closed socket before reuse.
pub fn pool(pg: &PostgresConfig) -> Pool {
    // The url was parsed by the same function when the config was validated.
    let config = tokio_postgres::Config::from_str(&pg.url).expect("[postgres] url is validated");
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(pg.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(WAIT))
        .create_timeout(Some(WAIT))
        .build()
        .expect("a pool with a runtime and a size of at least 1 builds")
}

/// A pooled connection, with the same error as [`super::connect`] when Postgres cannot be
/// reached, so callers and operators see one message for one cause.
pub async fn get(
    pool: &Pool,
    pg: &PostgresConfig,
) -> Result<deadpool_postgres::Object, ConnectError> {
    pool.get().await.map_err(|e| {
        let (host, port) = pg.host_port();
        match e {
            PoolError::Backend(source) => ConnectError::Refused { host, port, source },
            other => ConnectError::Pool {
                host,
                port,
                detail: other.to_string(),
            },
        }
    })
}
