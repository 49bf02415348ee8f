//! One committed transaction as it travels from the capturing node to its peers, and the
//! assembler that builds it from a slot's pgoutput messages.
//!
//! A [`ChangeSet`] is self-contained: it names each table it touches and that table's columns,
//! so the receiver needs no state from earlier transactions or from the sender's session (a
//! pgoutput stream announces a table only once per session, and a transaction the sender skips
//! may be the one that carried the announcement). Values stay in Postgres's text output form
//! and are parsed by the receiving server itself, so no type needs to be known here.
//! A column the change did not touch because its value is TOASTed out of line travels as
//! [`Datum::UnchangedToast`], distinct from NULL, and the receiver leaves it alone.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::table::TableName;
use crate::pg::names::{DDL_MESSAGE_PREFIX, VERSION_MESSAGE_PREFIX};
use crate::pg::SqlState;
use crate::replication::ddl::{DdlMessage, Picked, Statements};
use crate::replication::pgoutput::{Begin, Datum, Lsn, Message, Relation, RelationCache, Tuple};

/// A table as the origin described it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDesc {
    pub schema: String,
    pub name: String,
    /// Column names in the origin's attribute order: the order of every tuple's datums.
    pub columns: Vec<String>,
    /// Positions in `columns` of the primary key, in key order.
    pub key: Vec<usize>,
}

impl TableDesc {
    pub fn table_name(&self) -> TableName {
        TableName::new(self.schema.clone(), self.name.clone())
    }

    fn from_relation(rel: &Relation) -> TableDesc {
        TableDesc {
            schema: rel.namespace.clone(),
            name: rel.name.clone(),
            columns: rel.columns.iter().map(|c| c.name.clone()).collect(),
            key: rel.key_positions().collect(),
        }
    }
}

/// One row change; `table` indexes [`ChangeSet::tables`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    Insert {
        table: u32,
        new: Vec<Datum>,
    },
    Update {
        table: u32,
        /// The key before the update, in key order, when the update changed it; otherwise the
        /// key is read from `new`.
        old_key: Option<Vec<Datum>>,
        new: Vec<Datum>,
        /// The conflict column's value the update replaced, as announced by the origin's clock
        /// trigger (see [`Stamps`]).
        #[serde(default)]
        old_stamp: Option<i64>,
    },
    Delete {
        table: u32,
        /// The deleted row's key, in key order.
        key: Vec<Datum>,
        /// The delete's stamp from the origin's clock trigger (see [`Stamps`]).
        #[serde(default)]
        deleted_at: Option<i64>,
        /// The conflict column's value of the deleted row.
        #[serde(default)]
        old_stamp: Option<i64>,
    },
    Truncate {
        tables: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A schema change, replayed by the receiver where it stands among the row changes, with
    /// the origin session's `search_path` and role (see [`crate::replication::ddl`]).
    Ddl {
        statement: String,
        search_path: String,
        role: String,
    },
}

impl Change {
    /// About what the change costs in memory once decoded: each value's bytes, its allocation
    /// and its `Datum`, plus the change itself. What [`Assembler`] cuts chunks by and the
    /// receiver's queue is bounded by, so it errs on the high side: for a row of small values
    /// the bookkeeping is most of the memory, several times the bytes on the link.
    pub fn approx_bytes(&self) -> usize {
        const DATUM: usize = std::mem::size_of::<Datum>();
        let value = |d: &Datum| DATUM + if d.len() > 0 { d.len() + 32 } else { 0 };
        let values = |d: &[Datum]| 24 + d.iter().map(value).sum::<usize>();
        std::mem::size_of::<Change>()
            + match self {
                Change::Insert { new, .. } => values(new),
                Change::Update { old_key, new, .. } => {
                    values(new) + old_key.as_deref().map_or(0, values)
                }
                Change::Delete { key, .. } => values(key),
                Change::Truncate { tables, .. } => 4 * tables.len(),
                Change::Ddl {
                    statement,
                    search_path,
                    role,
                } => statement.len() + search_path.len() + role.len() + 96,
            }
    }

    /// Row changes a TRUNCATE stands for are unknown; it counts as one change.
    pub fn tables(&self) -> impl Iterator<Item = u32> + '_ {
        let (one, many): (Option<u32>, &[u32]) = match self {
            Change::Insert { table, .. }
            | Change::Update { table, .. }
            | Change::Delete { table, .. } => (Some(*table), &[]),
            Change::Truncate { tables, .. } => (None, tables),
            Change::Ddl { .. } => (None, &[]),
        };
        one.into_iter().chain(many.iter().copied())
    }
}

/// The changes of one transaction, in the order they were made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSet {
    pub tables: Vec<TableDesc>,
    pub changes: Vec<Change>,
}

impl ChangeSet {
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The sum of [`Change::approx_bytes`] and of the table descriptions.
    pub fn approx_bytes(&self) -> usize {
        let tables: usize = self
            .tables
            .iter()
            .map(|t| 64 + t.columns.iter().map(|c| c.len() + 8).sum::<usize>())
            .sum();
        tables + self.changes.iter().map(Change::approx_bytes).sum::<usize>()
    }
}

/// What [`Assembler::push`] completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembled {
    /// The next changes of the open transaction (a local one), which has outgrown the chunk
    /// size: they are handed out now so that no transaction is ever held whole. The
    /// transaction's start is [`Assembler::open_begin`].
    Chunk(ChangeSet),
    /// A committed transaction. When chunks of it were handed out before, `changes` holds only
    /// the changes after the last one.
    Commit(CapturedTx),
}

/// A whole transaction read from the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedTx {
    pub xid: u32,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position a peer's replication origin records once applied.
    pub end_lsn: Lsn,
    /// Microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    /// The replication origin that made the transaction, when it was applied from a peer.
    /// Such a transaction is never shipped (that would echo it back), so its changes are
    /// dropped while assembling and `changes` is empty.
    pub origin: Option<String>,
    /// DDL ran inside another statement (replayed whole on the peers) in a transaction that
    /// also changed rows: if that statement made the row changes, peers make them twice.
    pub enclosed_ddl_with_rows: bool,
    pub changes: ChangeSet,
}

/// Why the message stream does not make a well-formed transaction. Any of these means the
/// stream cannot be trusted: drop it and restart from the slot's confirmed position.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AssembleError {
    #[error("pgoutput: {0} outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("pgoutput: Begin inside transaction {0}")]
    NestedBegin(u32),
    #[error("pgoutput: a change refers to relation {0}, which was never announced")]
    UnknownRelation(u32),
    #[error("pgoutput: a change to {table} has {got} values for {want} columns")]
    ColumnCount {
        table: String,
        got: usize,
        want: usize,
    },
    #[error("pgoutput: {table} has no replica identity key; it cannot be replicated")]
    NoKey { table: String },
    #[error("pgoutput: Commit at {commit} does not end the transaction that began for {begin}")]
    CommitMismatch { begin: Lsn, commit: Lsn },
    #[error("a {DDL_MESSAGE_PREFIX} message is not the JSON pgmm's event trigger writes")]
    BadDdlMessage,
}

impl SqlState for AssembleError {
    /// `08P01` (protocol_violation): the decoder's output broke the protocol's framing.
    fn sqlstate(&self) -> &str {
        "08P01"
    }
}

struct Open {
    begin: Begin,
    origin: Option<String>,
    /// Relation oid → the stamps pgmm's trigger announced for the next change of it (which
    /// follows the message directly), not yet matched.
    stamps: HashMap<u32, Stamps>,
    /// Relation oid → index in `set.tables`.
    index: HashMap<u32, u32>,
    set: ChangeSet,
    /// [`ChangeSet::approx_bytes`] of `set`, kept as changes are added.
    bytes: usize,
    /// Which statement of the client's text each DDL message stands for.
    statements: Statements,
    /// A DDL message came from inside another statement (a DO block, a function).
    enclosing_ddl: bool,
    /// A row change was seen (in any chunk).
    rows: bool,
}

/// Turns one slot session's pgoutput messages into transactions, handed out in chunks of at most
/// about `chunk_bytes` (plus one change) as they are decoded. Keep one per session: it remembers
/// the relations the session announced.
pub struct Assembler {
    relations: RelationCache,
    open: Option<Open>,
    chunk_bytes: usize,
}

impl Assembler {
    /// Chunks of about `chunk_bytes`; `usize::MAX` hands out every transaction whole.
    pub fn new(chunk_bytes: usize) -> Self {
        Assembler {
            relations: RelationCache::default(),
            open: None,
            chunk_bytes,
        }
    }

    /// The open transaction's commit LSN and commit time (pgoutput's Begin announces both).
    pub fn open_begin(&self) -> Option<(Lsn, i64)> {
        self.open
            .as_ref()
            .map(|o| (o.begin.final_lsn, o.begin.commit_time))
    }

    /// Whether a transaction has begun and not yet committed.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Whether [`Assembler::push`] would drop the pgoutput message `payload` unread: a row change,
    /// truncate or logical message inside a transaction that came from a peer. The caller may
    /// then skip decoding it (a malformed one is not noticed, as it is dropped anyway); the
    /// outcome is the same as pushing it. Relation and Type messages are never dropped: the
    /// session's later transactions refer to them.
    pub fn drops(&self, payload: &[u8]) -> bool {
        self.open.as_ref().is_some_and(|open| open.origin.is_some())
            && matches!(payload.first(), Some(b'I' | b'U' | b'D' | b'T' | b'M'))
    }

    /// Feeds one message; returns the chunk or the transaction it completes.
    pub fn push(&mut self, msg: Message) -> Result<Option<Assembled>, AssembleError> {
        let chunk_bytes = self.chunk_bytes;
        let done = self.push_message(msg)?;
        if done.is_some() {
            return Ok(done);
        }
        Ok(self.open.as_mut().and_then(|open| {
            (open.bytes >= chunk_bytes && !open.set.changes.is_empty()).then(|| {
                open.index.clear();
                open.bytes = 0;
                Assembled::Chunk(std::mem::take(&mut open.set))
            })
        }))
    }

    fn push_message(&mut self, msg: Message) -> Result<Option<Assembled>, AssembleError> {
        match msg {
            Message::Begin(begin) => {
                if let Some(open) = &self.open {
                    return Err(AssembleError::NestedBegin(open.begin.xid));
                }
                self.open = Some(Open {
                    begin,
                    origin: None,
                    stamps: HashMap::new(),
                    index: HashMap::new(),
                    set: ChangeSet::default(),
                    bytes: 0,
                    statements: Statements::default(),
                    enclosing_ddl: false,
                    rows: false,
                });
                Ok(None)
            }
            Message::Commit(commit) => {
                let open = self
                    .open
                    .take()
                    .ok_or(AssembleError::OutsideTransaction("Commit"))?;
                if open.begin.final_lsn != commit.commit_lsn {
                    return Err(AssembleError::CommitMismatch {
                        begin: open.begin.final_lsn,
                        commit: commit.commit_lsn,
                    });
                }
                Ok(Some(Assembled::Commit(CapturedTx {
                    xid: open.begin.xid,
                    commit_lsn: commit.commit_lsn,
                    end_lsn: commit.end_lsn,
                    commit_time: commit.commit_time,
                    origin: open.origin,
                    enclosed_ddl_with_rows: open.enclosing_ddl && open.rows,
                    changes: open.set,
                })))
            }
            Message::Origin(origin) => {
                let open = self
                    .open
                    .as_mut()
                    .ok_or(AssembleError::OutsideTransaction("Origin"))?;
                open.origin = Some(origin.name);
                open.set = ChangeSet::default();
                open.index.clear();
                open.bytes = 0;
                Ok(None)
            }
            Message::Relation(_) => {
                self.relations.apply(&msg);
                Ok(None)
            }
            Message::Logical(m) if m.transactional() && m.prefix == VERSION_MESSAGE_PREFIX => {
                let open = self
                    .open
                    .as_mut()
                    .ok_or(AssembleError::OutsideTransaction("Message"))?;
                if let Some((oid, stamps)) = Stamps::parse(&m.content) {
                    open.stamps.insert(oid, stamps);
                }
                Ok(None)
            }
            Message::Logical(m) if m.transactional() && m.prefix == DDL_MESSAGE_PREFIX => {
                let open = self
                    .open
                    .as_mut()
                    .ok_or(AssembleError::OutsideTransaction("Message"))?;
                if open.origin.is_some() {
                    return Ok(None);
                }
                let ddl = DdlMessage::parse(&m.content).ok_or(AssembleError::BadDdlMessage)?;
                let statement = match open.statements.pick(&ddl.tag, &ddl.query) {
                    Picked::Own(s) => s,
                    Picked::Enclosing(s) => {
                        open.enclosing_ddl = true;
                        s
                    }
                    Picked::Again => return Ok(None),
                };
                open.add(Change::Ddl {
                    statement,
                    search_path: ddl.search_path,
                    role: ddl.role,
                });
                Ok(None)
            }
            Message::Type(_) | Message::Logical(_) => Ok(None),
            Message::Insert(ins) => {
                let Some((open, rel)) = self.target("Insert", ins.relation)? else {
                    return Ok(None);
                };
                let table = open.table_index(rel);
                let new = row(rel, ins.new)?;
                open.add(Change::Insert { table, new });
                Ok(None)
            }
            Message::Update(upd) => {
                let Some((open, rel)) = self.target("Update", upd.relation)? else {
                    return Ok(None);
                };
                let table = open.table_index(rel);
                let old_key = match upd.key.or(upd.old) {
                    Some(old) => Some(key_of(rel, row(rel, old)?)?),
                    None => None,
                };
                let new = row(rel, upd.new)?;
                let old_stamp = open.stamps.remove(&upd.relation).and_then(|s| s.old);
                open.add(Change::Update {
                    table,
                    old_key,
                    new,
                    old_stamp,
                });
                Ok(None)
            }
            Message::Delete(del) => {
                let Some((open, rel)) = self.target("Delete", del.relation)? else {
                    return Ok(None);
                };
                let table = open.table_index(rel);
                let identity = del.key.or(del.old).ok_or_else(|| AssembleError::NoKey {
                    table: qualified(rel),
                })?;
                let key = key_of(rel, row(rel, identity)?)?;
                let stamps = open.stamps.remove(&del.relation).unwrap_or_default();
                open.add(Change::Delete {
                    table,
                    key,
                    deleted_at: stamps.deleted,
                    old_stamp: stamps.old,
                });
                Ok(None)
            }
            Message::Truncate(tr) => {
                let open = self
                    .open
                    .as_mut()
                    .ok_or(AssembleError::OutsideTransaction("Truncate"))?;
                if open.origin.is_some() {
                    return Ok(None);
                }
                let mut tables = Vec::with_capacity(tr.relations.len());
                for oid in &tr.relations {
                    let rel = self
                        .relations
                        .get(*oid)
                        .ok_or(AssembleError::UnknownRelation(*oid))?;
                    tables.push(open.table_index(rel));
                }
                open.add(Change::Truncate {
                    tables,
                    cascade: tr.cascade(),
                    restart_identity: tr.restart_identity(),
                });
                Ok(None)
            }
        }
    }

    /// The open transaction and the change's relation; `None` when the transaction came from a
    /// peer and its changes are being dropped.
    fn target(
        &mut self,
        what: &'static str,
        oid: u32,
    ) -> Result<Option<(&mut Open, &Relation)>, AssembleError> {
        let open = self
            .open
            .as_mut()
            .ok_or(AssembleError::OutsideTransaction(what))?;
        if open.origin.is_some() {
            return Ok(None);
        }
        let rel = self
            .relations
            .get(oid)
            .ok_or(AssembleError::UnknownRelation(oid))?;
        Ok(Some((open, rel)))
    }
}

impl Open {
    fn table_index(&mut self, rel: &Relation) -> u32 {
        let next = self.set.tables.len() as u32;
        *self.index.entry(rel.oid).or_insert_with(|| {
            let desc = TableDesc::from_relation(rel);
            self.bytes += 64 + desc.columns.iter().map(|c| c.len() + 8).sum::<usize>();
            self.set.tables.push(desc);
            next
        })
    }

    fn add(&mut self, change: Change) {
        self.rows |= !matches!(change, Change::Ddl { .. });
        self.bytes += change.approx_bytes();
        self.set.changes.push(change);
    }
}

/// What the origin's clock trigger says about the change that follows its message (see
/// `guard::VERSION_MESSAGE_PREFIX`): the version the change replaced and, for a delete, the
/// delete's own stamp, in microseconds since 2000-01-01 UTC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamps {
    pub old: Option<i64>,
    pub deleted: Option<i64>,
}

impl Stamps {
    /// `<oid> <old> [<deleted>]`, `-` for NULL.
    fn parse(content: &[u8]) -> Option<(u32, Stamps)> {
        let text = std::str::from_utf8(content).ok()?;
        let mut parts = text.split(' ');
        let oid = parts.next()?.parse().ok()?;
        let stamp = |p: Option<&str>| p.and_then(|p| p.parse::<i64>().ok());
        let old = stamp(parts.next());
        let deleted = stamp(parts.next());
        Some((oid, Stamps { old, deleted }))
    }
}

fn qualified(rel: &Relation) -> String {
    TableName::new(rel.namespace.clone(), rel.name.clone()).to_string()
}

fn row(rel: &Relation, tuple: Tuple) -> Result<Vec<Datum>, AssembleError> {
    if tuple.0.len() != rel.columns.len() {
        return Err(AssembleError::ColumnCount {
            table: qualified(rel),
            got: tuple.0.len(),
            want: rel.columns.len(),
        });
    }
    Ok(tuple.0)
}

fn key_of(rel: &Relation, mut datums: Vec<Datum>) -> Result<Vec<Datum>, AssembleError> {
    let key: Vec<Datum> = rel
        .key_positions()
        .map(|i| std::mem::replace(&mut datums[i], Datum::Null))
        .collect();
    if key.is_empty() {
        return Err(AssembleError::NoKey {
            table: qualified(rel),
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::replication::pgoutput::{
        Column, Commit, Delete, Insert, LogicalMessage, Origin, Truncate, Update,
    };

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn relation(oid: u32, name: &str) -> Message {
        Message::Relation(Relation {
            oid,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: b'd',
            columns: ["id", "v", "updated_at"]
                .iter()
                .enumerate()
                .map(|(i, n)| Column {
                    flags: u8::from(i == 0),
                    name: (*n).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn begin(lsn: Lsn) -> Message {
        Message::Begin(Begin {
            final_lsn: lsn,
            commit_time: 7,
            xid: 42,
        })
    }

    fn commit(lsn: Lsn) -> Message {
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: lsn,
            end_lsn: lsn + 8,
            commit_time: 7,
        })
    }

    fn insert(oid: u32, id: &str) -> Message {
        Message::Insert(Insert {
            relation: oid,
            new: Tuple(vec![text(id), Datum::Null, text("t")]),
        })
    }

    fn committed(done: Option<Assembled>) -> CapturedTx {
        match done {
            Some(Assembled::Commit(tx)) => tx,
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    #[test]
    fn a_large_transaction_is_handed_out_in_self_contained_chunks() {
        // Each insert is a few hundred bytes (see approx_bytes).
        let one = Change::Insert {
            table: 0,
            new: vec![text("1"), Datum::Null, text("t")],
        }
        .approx_bytes();
        let mut a = Assembler::new(3 * one);
        a.push(relation(1, "x")).unwrap();
        a.push(relation(2, "y")).unwrap();
        a.push(begin(100)).unwrap();
        assert_eq!(a.open_begin(), Some((100, 7)));
        let mut chunks = Vec::new();
        for i in 0..10 {
            let oid = if i % 2 == 0 { 1 } else { 2 };
            if let Some(done) = a.push(insert(oid, &i.to_string())).unwrap() {
                match done {
                    Assembled::Chunk(set) => chunks.push(set),
                    other => panic!("{other:?}"),
                }
            }
        }
        let tx = committed(a.push(commit(100)).unwrap());
        assert!(chunks.len() >= 2, "{chunks:?}");
        chunks.push(tx.changes);
        let mut ids = Vec::new();
        for set in &chunks {
            assert!(
                set.changes.len() <= 3,
                "a chunk is cut once it is full: {set:?}"
            );
            for change in &set.changes {
                let Change::Insert { table, new } = change else {
                    panic!()
                };
                // The chunk names its own tables: the index points into its own list.
                let desc = &set.tables[*table as usize];
                let id: u32 = new[0].as_str().unwrap().parse().unwrap();
                assert_eq!(desc.name, if id % 2 == 0 { "x" } else { "y" });
                ids.push(id);
            }
        }
        assert_eq!(
            ids,
            (0..10).collect::<Vec<_>>(),
            "every change once, in order"
        );
    }

    #[test]
    fn a_transaction_carries_its_tables_once_in_first_use_order() {
        let mut a = Assembler::new(usize::MAX);
        for m in [relation(1, "x"), relation(2, "y"), begin(100)] {
            assert_eq!(a.push(m).unwrap(), None);
        }
        a.push(insert(2, "1")).unwrap();
        a.push(insert(1, "2")).unwrap();
        a.push(insert(2, "3")).unwrap();
        a.push(Message::Truncate(Truncate {
            options: Truncate::CASCADE,
            relations: vec![1, 2],
        }))
        .unwrap();
        let tx = committed(a.push(commit(100)).unwrap());
        assert_eq!((tx.commit_lsn, tx.end_lsn, tx.xid), (100, 108, 42));
        assert_eq!(tx.origin, None);
        let names: Vec<&str> = tx.changes.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["y", "x"]);
        assert_eq!(tx.changes.tables[0].key, [0]);
        let tables: Vec<Vec<u32>> = tx
            .changes
            .changes
            .iter()
            .map(|c| c.tables().collect())
            .collect();
        assert_eq!(tables, [vec![0], vec![1], vec![0], vec![1, 0]]);
        assert_eq!(
            tx.changes.changes[3],
            Change::Truncate {
                tables: vec![1, 0],
                cascade: true,
                restart_identity: false
            }
        );
        assert!(!a.in_transaction());
    }

    #[test]
    fn a_transaction_applied_from_a_peer_keeps_no_changes() {
        let mut a = Assembler::new(usize::MAX);
        a.push(relation(1, "x")).unwrap();
        a.push(begin(200)).unwrap();
        a.push(Message::Origin(Origin {
            lsn: 5,
            name: "pgmm_b".into(),
        }))
        .unwrap();
        a.push(insert(1, "1")).unwrap();
        // Even an unknown relation does not matter: the change is dropped unread.
        a.push(insert(9, "1")).unwrap();
        let tx = committed(a.push(commit(200)).unwrap());
        assert_eq!(tx.origin.as_deref(), Some("pgmm_b"));
        assert!(tx.changes.is_empty());
    }

    #[test]
    fn only_the_contents_of_a_peers_transaction_are_dropped_unread() {
        let mut a = Assembler::new(usize::MAX);
        let change = [b'I', 0, 0, 0, 1];
        assert!(
            !a.drops(&change),
            "outside a transaction: push reports the error"
        );
        a.push(begin(200)).unwrap();
        assert!(!a.drops(&change), "a local transaction keeps its changes");
        a.push(Message::Origin(Origin {
            lsn: 5,
            name: "pgmm_b".into(),
        }))
        .unwrap();
        for tag in [b'I', b'U', b'D', b'T', b'M'] {
            assert!(a.drops(&[tag, 0, 0, 0, 1]), "{}", char::from(tag));
        }
        for tag in [b'R', b'Y', b'C', b'B', b'O'] {
            assert!(!a.drops(&[tag]), "{}", char::from(tag));
        }
        assert!(!a.drops(&[]));
        committed(a.push(commit(200)).unwrap());
        assert!(!a.drops(&change));
    }

    #[test]
    fn keys_are_cut_from_key_and_old_tuples_and_unchanged_toast_survives() {
        let mut a = Assembler::new(usize::MAX);
        a.push(relation(1, "x")).unwrap();
        a.push(begin(300)).unwrap();
        a.push(Message::Update(Update {
            relation: 1,
            key: Some(Tuple(vec![text("1"), Datum::Null, Datum::Null])),
            old: None,
            new: Tuple(vec![text("2"), Datum::UnchangedToast, text("t")]),
        }))
        .unwrap();
        a.push(Message::Logical(LogicalMessage {
            flags: 1,
            lsn: 1,
            prefix: VERSION_MESSAGE_PREFIX.into(),
            content: Bytes::from_static(b"1 77"),
        }))
        .unwrap();
        a.push(Message::Update(Update {
            relation: 1,
            key: None,
            old: None,
            new: Tuple(vec![text("2"), text("v"), text("t")]),
        }))
        .unwrap();
        // The clock trigger's stamp for the delete that follows; another table's and a
        // non-transactional message are not it.
        for (flags, prefix, content) in [
            (1, VERSION_MESSAGE_PREFIX, "1 - 123"),
            (1, VERSION_MESSAGE_PREFIX, "2 999 999"),
            (0, VERSION_MESSAGE_PREFIX, "1 555 555"),
            (1, "other", "1 777"),
        ] {
            a.push(Message::Logical(LogicalMessage {
                flags,
                lsn: 1,
                prefix: prefix.into(),
                content: Bytes::from_static(content.as_bytes()),
            }))
            .unwrap();
        }
        a.push(Message::Delete(Delete {
            relation: 1,
            key: None,
            old: Some(Tuple(vec![text("2"), text("v"), text("t")])),
        }))
        .unwrap();
        let tx = committed(a.push(commit(300)).unwrap());
        assert_eq!(
            tx.changes.changes,
            [
                Change::Update {
                    table: 0,
                    old_key: Some(vec![text("1")]),
                    new: vec![text("2"), Datum::UnchangedToast, text("t")],
                    old_stamp: None,
                },
                Change::Update {
                    table: 0,
                    old_key: None,
                    new: vec![text("2"), text("v"), text("t")],
                    old_stamp: Some(77),
                },
                Change::Delete {
                    table: 0,
                    key: vec![text("2")],
                    deleted_at: Some(123),
                    old_stamp: None,
                },
            ]
        );
    }

    #[test]
    fn broken_streams_are_errors() {
        let mut a = Assembler::new(usize::MAX);
        assert_eq!(
            a.push(insert(1, "1")),
            Err(AssembleError::OutsideTransaction("Insert"))
        );
        a.push(begin(10)).unwrap();
        assert_eq!(
            a.push(insert(1, "1")),
            Err(AssembleError::UnknownRelation(1))
        );
        assert_eq!(a.push(begin(11)), Err(AssembleError::NestedBegin(42)));
        a.push(relation(1, "x")).unwrap();
        assert!(matches!(
            a.push(Message::Insert(Insert {
                relation: 1,
                new: Tuple(vec![text("1")]),
            })),
            Err(AssembleError::ColumnCount {
                got: 1,
                want: 3,
                ..
            })
        ));
        assert_eq!(
            a.push(commit(12)),
            Err(AssembleError::CommitMismatch {
                begin: 10,
                commit: 12
            })
        );
    }
}
