//! pgmm: a multi-master replication proxy for PostgreSQL. Each node is one stock Postgres with
//! one pgmm in front of it; this crate is that pgmm. The map (docs/ARCHITECTURE.md has a line
//! per module, the data flow and the invariants):
//!
//! - [`cli`]: the command line (clap types, dispatch), called by `main.rs`.
//! - [`commands`]: process glue for each subcommand (`serve`, `check-config`, `migrate`,
//!   `status`, `check`, `resync`, `demo`): config, runtime, exit codes.
//! - [`node`]: a running node: starts the parts below in the order that loses no write, runs
//!   its background tasks, stops them together.
//! - The parts of a node:
//!   - [`frontdoor`]: the client listener and the 1:1 session relay that refuses writes this
//!     node does not own.
//!   - [`replication`]: local changes (rows and schema changes) read from a slot and shipped to
//!     every peer; the peers' changes applied exactly once, conflicts resolved.
//!   - [`schema`]: what pgmm installs in the local database (its schema, the publication, the
//!     guard triggers, the event triggers that capture DDL).
//!   - [`observe`]: metrics registry, `/metrics`, `/healthz`, `/readyz`, `/status`.
//! - [`membership`]: a node joining with its data copied from a donor (before the parts above
//!   start), the slots of departed nodes dropped, and the tables compared (`pgmm check`) or
//!   copied again (`pgmm resync`) across nodes, over the peer links' request purpose.
//! - Shared by all of them: [`pg`] (connecting, error text, quoting, object names) and
//!   [`config`] (the validated config file, table names, ownership rules).
//!
//! Dependencies point one way: `cli -> commands -> node -> {frontdoor, replication, schema} ->
//! observe -> pg -> config`, with `replication -> schema` (apply enrols the tables a replicated
//! schema change made) and `{commands, node} -> membership -> replication` (membership speaks
//! over the peer link; replication hands request links to it through a trait it defines). Modules are private; what the integration tests drive directly is
//! re-exported at the end.

mod cli;
mod commands;
mod config;
mod frontdoor;
mod membership;
mod node;
mod observe;
mod pg;
mod replication;
mod schema;

pub use cli::main;

/// What the integration tests (`integration/`) call without going through the `pgmm` binary:
/// the walsender client, the migrations and enrolment against a real Postgres, the purge, and
/// the trait their errors' SQLSTATEs are read through.
#[doc(hidden)]
pub mod testing {
    pub use crate::commands::demo::ports::free_ports;
    pub use crate::config::table::TableName;
    pub use crate::config::ReplicationConfig;
    pub use crate::node::replication::purge_tombstones;
    pub use crate::pg::SqlState;
    pub use crate::replication::slot as walsender;
    pub use crate::schema::{enrol, migrate};
}
