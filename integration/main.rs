//! The end-to-end tests, one binary: real PostgreSQL clusters (initdb into a temp dir, a free
//! port, `wal_level=logical`) with real `pgmm` processes in front of them, driven by psql,
//! pgbench, tokio-postgres and raw sockets. One binary links once, and the harness's lock
//! (`harness::heavy_lock`) serialises the heaviest tests across every file.
//!
//! `cargo test --test integration front_door::` runs one file's tests.

mod harness;

mod conflicts;
mod ddl;
mod demo;
mod front_door;
mod large_transactions;
mod membership;
mod migrate;
mod peer_port;
mod replication;
mod replication_conn;
mod status;
