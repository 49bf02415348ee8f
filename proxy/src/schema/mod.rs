//! What pgmm installs in the local database: its own schema and its migrations ([`migrate`]),
//! the publication of the replicated tables ([`enrol`]), and the triggers that stamp versions
//! and refuse foreign writes on every connection ([`guard`]), and the event triggers that put
//! every schema change into the WAL for the peers ([`ddl`]).

pub mod ddl;
pub mod enrol;
pub mod guard;
pub mod migrate;
