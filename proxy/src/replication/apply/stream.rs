//! Apply of a transaction that arrives in chunks (`TxBegin`, `TxChunk`s, `TxCommit`): one
//! local transaction opened with the first chunk and committed with the progress record at the
//! end, so exactly once holds as for a batch; nothing of the transaction is held here beyond the
//! chunk being applied.
//!
//! Each chunk gets the fast path a batch gets (layers, bulk statements), under a savepoint: a
//! fast attempt that misses rolls back to it, not to the start of the transaction, and the chunk
//! is applied again by the full statements. A savepoint costs a subtransaction id per chunk
//! that wrote, so a transaction of N chunks holds N subtransactions while it applies (past 64
//! the server's snapshots of concurrent sessions overflow their subtransaction cache, which
//! slows them a little until the commit); with the default 4 MiB chunks a 5M-row insert is about
//! a hundred.
//!
//! A serialization failure in the middle cannot be retried here (the earlier chunks are gone
//! from memory): the transaction is rolled back and the link dropped, and the sender sends it
//! again from its start, as after any failure.

use super::{Applied, Applier, ApplyError, Path, Step};
use crate::replication::changeset::ChangeSet;
use crate::replication::pgoutput::Lsn;

/// The transaction being applied in chunks.
pub(super) struct Stream {
    commit_time: i64,
    /// The progress record when the transaction began: where its commit moves it from.
    start: Lsn,
    /// Already applied here (its commit LSN is below the progress): its chunks are skipped.
    pub(super) duplicate: bool,
    /// Whether BEGIN has been sent.
    pub(super) begun: bool,
    changes: usize,
    /// Whether every chunk went by the fast path.
    all_fast: bool,
    /// Conflicts recorded so far, counted once the transaction commits.
    conflicts: Vec<(String, String, String)>,
}

impl Applier {
    /// Opens a chunked transaction whose commit record is at `commit_lsn` on the origin. One
    /// that began before is dropped: its link ended in the middle of it, and its local
    /// transaction was rolled back when the sender reconnected.
    pub fn stream_begin(&mut self, commit_lsn: Lsn, commit_time: i64) {
        // Progress is the end LSN of a transaction applied here; a transaction is applied iff
        // its end is at or below it, and every transaction committed after the applied one
        // has its commit record past that end. So: applied iff its commit LSN is below it.
        self.stream = Some(Stream {
            commit_time,
            start: self.progress,
            duplicate: commit_lsn < self.progress,
            begun: false,
            changes: 0,
            all_fast: true,
            conflicts: Vec::new(),
        });
    }

    /// Rolls back the chunked transaction left open by a link that ended in its middle.
    pub async fn abandon_stream(&mut self) {
        if self.stream.is_some() {
            tracing::info!(origin = %self.origin_node, "a transaction that came in chunks was cut off by the link; rolled back, the peer sends it again");
            self.reset().await;
        }
    }

    /// Applies the next chunk of the open transaction. On error the transaction is rolled back
    /// and closed.
    pub async fn stream_chunk(&mut self, changes: &ChangeSet) -> Result<(), ApplyError> {
        let result = self.chunk(changes).await;
        if result.is_err() {
            self.reset().await;
        }
        result
    }

    /// The last chunk and the commit, with the progress record moved to `end_lsn` (synchronous
    /// with `sync`). A duplicate commits nothing and counts as one.
    pub async fn stream_commit(
        &mut self,
        end_lsn: Lsn,
        changes: &ChangeSet,
        sync: bool,
    ) -> Result<Applied, ApplyError> {
        let result = self.commit_stream(end_lsn, changes, sync).await;
        if result.is_err() {
            self.reset().await;
        }
        result
    }

    pub(super) async fn commit_stream(
        &mut self,
        end_lsn: Lsn,
        changes: &ChangeSet,
        sync: bool,
    ) -> Result<Applied, ApplyError> {
        let Some(stream) = &self.stream else {
            return Err(ApplyError::Malformed("TxCommit without a TxBegin".into()));
        };
        if stream.duplicate {
            self.stream = None;
            return Ok(Applied {
                duplicates: 1,
                ..Applied::default()
            });
        }
        if !changes.is_empty() {
            self.chunk(changes).await?;
        }
        let stream = self.stream.take().expect("checked above");
        let mut steps = Vec::new();
        if !stream.begun {
            steps.push(self.step_begin());
        }
        steps.extend(self.commit_steps(end_lsn, stream.commit_time, stream.start, sync));
        self.run_full(Vec::new(), &[], steps, Vec::new()).await?;
        self.progress = end_lsn;
        let applied = Applied {
            transactions: 1,
            changes: stream.changes,
            conflicts: stream.conflicts.len(),
            duplicates: 0,
            path: Some(if stream.all_fast {
                Path::Fast
            } else {
                Path::Full
            }),
        };
        self.count_conflicts(stream.conflicts);
        Ok(applied)
    }

    pub(super) async fn chunk(&mut self, changes: &ChangeSet) -> Result<(), ApplyError> {
        if super::has_ddl(changes) {
            self.chunk_with_ddl(changes).await
        } else {
            self.chunk_rows(changes).await
        }
    }

    /// Applies a chunk of row changes (no schema change among them).
    pub(super) async fn chunk_rows(&mut self, changes: &ChangeSet) -> Result<(), ApplyError> {
        let Some(stream) = &self.stream else {
            return Err(ApplyError::Malformed("TxChunk without a TxBegin".into()));
        };
        if stream.duplicate || changes.is_empty() {
            return Ok(());
        }
        let (begun, commit_time) = (stream.begun, stream.commit_time);
        let (planned, table_names) = self.plan_sets(&[(changes, commit_time)]).await?;
        let mut before = Vec::with_capacity(2);
        if !begun {
            before.push(self.step_begin());
        }
        before.push((self.savepoint.clone(), Vec::new(), Step::Savepoint));
        let release = vec![(self.release.clone(), Vec::new(), Step::Release)];
        let fast = self.try_fast(&planned, &before, &release).await?;
        let mut conflicts = Vec::new();
        if !fast {
            // The BEGIN (if it was sent) and the savepoint ran before whatever failed.
            let mut before = Vec::with_capacity(2);
            if !begun {
                before.push(self.step_begin());
            }
            before.push((self.savepoint.clone(), Vec::new(), Step::Savepoint));
            // After a fast attempt that missed, the transaction is open and aborted after the
            // savepoint; when a change had no fast path nothing was sent yet.
            if planned.iter().all(|p| !matches!(p.fast, super::Fast::No)) {
                self.client
                    .execute(&self.rollback_to, &[])
                    .await
                    .map_err(ApplyError::db("rolling a chunk back to its savepoint"))?;
                before.clear();
            }
            conflicts = self
                .run_full(planned, &table_names, before, release)
                .await?;
        }
        let stream = self.stream.as_mut().expect("checked above");
        stream.begun = true;
        stream.changes += changes.changes.len();
        stream.all_fast &= fast;
        stream.conflicts.extend(conflicts);
        Ok(())
    }
}
