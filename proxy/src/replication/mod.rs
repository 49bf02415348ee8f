//! Replication: local changes read through logical decoding and shipped to every peer, and the
//! peers' changes applied here.
//!
//! Outbound: [`slot`] (the walsender client) streams pgoutput ([`pgoutput`]), [`changeset`]
//! assembles each transaction (schema changes cut out of their client's text by [`ddl`]),
//! [`toast_fill`] completes unchanged large values, and [`ship`] ships it over a [`peer`] link.
//! Inbound: [`apply`] receives and writes each transaction exactly once, resolving conflicts. [`slot_monitor`] watches the slots' health;
//! [`metrics`] are the pipeline's.

pub mod apply;
pub mod changeset;
pub mod ddl;
pub mod metrics;
pub mod peer;
pub mod pgoutput;
pub mod ship;
pub mod slot;
pub mod slot_monitor;
pub mod toast_fill;
