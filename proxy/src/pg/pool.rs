//! pgmm's own pool of connections to the local Postgres (`[postgres] pool_size`), for the
//! short pieces of bookkeeping a node does on a timer or on request: enrolment checks, the slot
//! monitor, the tombstone purge, the progress record a peer handshake resumes from, and
//! `/readyz`. They share a few sessions instead of each holding one. The start-up migration and
//! enrolment use a session of their own, closed once the node has started. Client sessions never use it (each client gets its own backend connection), and
//! neither do the sessions that must keep their own state: apply (its replication origin and
//! `session_replication_role`), the TOAST filler and the walsender streams.

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
    let config = super::own_session(&pg.url);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that lets every client in without a password (AuthenticationOk, ReadyForQuery)
    /// and then only waits for it to leave: enough for a pooled connection to be made. Counts the
    /// connections it accepted.
    async fn trusting_server() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let len = stream.read_u32().await.unwrap() as usize;
                    let mut startup = vec![0; len - 4];
                    stream.read_exact(&mut startup).await.unwrap();
                    let mut answer = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
                    answer.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
                    stream.write_all(&answer).await.unwrap();
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest).await;
                });
            }
        });
        (port, accepted)
    }

    #[tokio::test]
    async fn never_opens_more_than_pool_size_connections() {
        let (port, accepted) = trusting_server().await;
        let pg = PostgresConfig {
            url: format!("postgres://pgmm@127.0.0.1:{port}/postgres"),
            pool_size: 2,
        };
        let pool = pool(&pg);
        let holding = Arc::new(AtomicUsize::new(0));
        let most_held = Arc::new(AtomicUsize::new(0));
        let users: Vec<_> = (0..6)
            .map(|_| {
                let (pool, pg) = (pool.clone(), pg.clone());
                let (holding, most_held) = (holding.clone(), most_held.clone());
                tokio::spawn(async move {
                    let client = get(&pool, &pg).await.expect("a pooled connection");
                    let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                    most_held.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    holding.fetch_sub(1, Ordering::SeqCst);
                    drop(client);
                })
            })
            .collect();
        for user in users {
            user.await.unwrap();
        }
        let status = pool.status();
        assert_eq!(status.max_size, 2);
        assert_eq!(status.size, 2);
        assert_eq!(most_held.load(Ordering::SeqCst), 2);
        // Six users, two connections: the other four waited for one to come back.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
