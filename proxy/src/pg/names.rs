//! The names pgmm gives what it creates, shared by the parts that create them and the parts
//! that use them (a slot is created by the node, read by capture, watched by the slot monitor).

/// The replication origin (and slot) name pgmm uses for `node`.
pub fn origin_name(node: &str) -> String {
    format!("pgmm_{node}")
}

/// The publication every capture slot reads.
pub const PUBLICATION: &str = "pgmm";

/// The prefix of the logical message that the trigger writes just before each local UPDATE
/// and DELETE: `<relation oid> <old stamp>` for an update, `<relation oid> <old stamp>
/// <delete stamp>` for a delete, stamps in microseconds since 2000-01-01 UTC (`-` for NULL).
/// pgoutput sends only the key of the old row, and apply needs the version a change replaced
/// (to tell a conflict from an update made after seeing the local version) and a delete's
/// stamp (to order it against other writes).
pub const VERSION_MESSAGE_PREFIX: &str = "pgmm.version";

/// The prefix of the logical message pgmm's event trigger writes after each DDL command (JSON:
/// command tag, the client's text, its `search_path` and role; see `schema::ddl`). Capture turns
/// it into a schema change that peers replay in the same place among the data changes.
pub const DDL_MESSAGE_PREFIX: &str = "pgmm.ddl";

/// The setting pgmm's own sessions turn `off` so that the DDL they run (guard triggers, the
/// publication) is not captured (see `pg::own_session`); anything else means on.
pub const CAPTURE_SETTING: &str = "pgmm.capture_ddl";
