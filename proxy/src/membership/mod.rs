//! Membership: a node joining a running cluster with its data copied from a donor, a node
//! leaving, and the tables compared across nodes (`pgmm check`). docs/MEMBERSHIP.md is the
//! operator's account; this is the map.
//!
//! - `join` — the joining node (`[node] join_from`): before anything else starts, it asks
//!   every other node to `Prepare` (have the joiner's slot, and wait until the donor has
//!   acknowledged that node's changes up to the slot's start), then asks the donor to `Copy`:
//!   the donor creates its slot for the joiner anew with an exported snapshot and sends the
//!   schema and every replicated table's rows at that snapshot. Rows keep their versions: each
//!   carries the node that wrote it and is written here under that node's replication origin,
//!   with triggers off, so last-writer-wins judges later changes exactly as on the donor. The
//!   join ends by recording, in one transaction, where each node's stream begins (the donor's
//!   snapshot, each other node's slot start) and that the join is done. Changes that arrive
//!   both in the copy and in a stream are equal versions, applied idempotently.
//! - `answer` — what a running node answers on request links: `Prepare`, `Copy`, hashes.
//! - `catalog` — the replicated tables, their columns and schema as statements, sequences.
//! - `hashes` — row and bucket hashes, computed alike on every node.
//! - `check` — `pgmm check`: buckets compared across nodes, narrowed down to rows.
//! - `leave` — at start, the slots of nodes no longer in `[cluster] nodes` are dropped.

mod answer;
mod catalog;
pub mod check;
mod hashes;
pub mod join;
pub mod leave;
pub mod resync;

pub use answer::Answerer;

use thiserror::Error;

use crate::pg::ConnectError;
use crate::pg::SqlState;
use crate::replication::peer::{FrameError, MemberError};
use crate::replication::slot::ReplicationError;

/// The name under which tombstones travel in a copy.
const TOMBSTONES: &str = "pgmm.tombstones";

/// Why a membership operation failed.
#[derive(Debug, Error)]
pub enum MembershipError {
    /// Text and SQLSTATE of a failed statement.
    #[error("{0}")]
    Postgres(String, String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("replication connection: {0}")]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Member(#[from] MemberError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Refused(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The joining node has data of its own: copying would destroy it.
    #[error("{0}")]
    NotEmpty(String),
    #[error("stopped")]
    Cancelled,
}

impl SqlState for MembershipError {
    fn sqlstate(&self) -> &str {
        match self {
            MembershipError::Postgres(_, code) => code,
            MembershipError::Connect(e) => e.sqlstate(),
            MembershipError::Replication(e) => e.sqlstate(),
            MembershipError::Member(e) => e.sqlstate(),
            MembershipError::Frame(e) => e.sqlstate(),
            MembershipError::Refused(_) | MembershipError::NotEmpty(_) => "55000",
            MembershipError::Protocol(_) => "08P01",
            MembershipError::Cancelled => "57P01",
        }
    }
}
