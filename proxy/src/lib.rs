//! pgmm: a multi-master replication proxy for PostgreSQL.
//!
//! See `docs/ARCHITECTURE.md` for the map of the modules and the data flow.

pub mod admin;
pub mod apply;
pub mod capture;
pub mod changeset;
pub mod classify;
pub mod cli;
pub mod config;
pub mod demo;
pub mod enrol;
pub mod frontdoor;
pub mod guard;
pub mod last_hour;
pub mod log_limit;
pub mod metrics;
pub mod migrate;
pub mod node;
pub mod output;
pub mod owners;
pub mod ownership;
pub mod peer;
pub mod pgoutput;
pub mod readiness;
pub mod refusal;
pub mod replication;
pub mod session;
pub mod slots;
pub mod status;
pub mod table;
pub mod tls;
pub mod toast_fill;
pub mod wire;
