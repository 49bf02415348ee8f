-- Joining a running cluster (docs/MEMBERSHIP.md): where this node's join from its donor stands.
-- At most one row. A node whose join is recorded but not done copies again at its next start
-- (its front door stays closed until then); 'done' is set in the transaction that records
-- where each peer's stream begins (pgmm.applied).
CREATE TABLE pgmm.join_state (
    one          boolean PRIMARY KEY DEFAULT true CHECK (one),
    donor        text NOT NULL,
    state        text NOT NULL CHECK (state IN ('copying', 'done')),
    snapshot_lsn pg_lsn,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
