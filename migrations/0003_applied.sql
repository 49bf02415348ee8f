-- Exactly once on every supported PostgreSQL (design.md, "Exactly once"): where each origin's
-- stream is applied up to. Apply updates its origin's row inside every apply transaction, so the
-- row commits and aborts with the data. The replication origin cannot be that record: from
-- PostgreSQL 16 on, a transaction that wrote under an origin set up with
-- pg_replication_origin_xact_setup advances the origin even when it rolls back.
CREATE TABLE pgmm.applied (
    origin      text PRIMARY KEY,            -- the node the changes came from
    end_lsn     pg_lsn NOT NULL,             -- end of its last transaction applied here
    commit_time timestamptz,                 -- that transaction's commit time on the origin
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- A node upgraded from a pgmm that kept progress only in its replication origins starts from
-- them: the best record there is (exact on 15, possibly past an aborted batch on 16+).
INSERT INTO pgmm.applied (origin, end_lsn)
SELECT substr(roname, 6), pg_catalog.pg_replication_origin_progress(roname, false)
FROM pg_catalog.pg_replication_origin
WHERE roname LIKE 'pgmm\_%' AND pg_catalog.pg_replication_origin_progress(roname, false) IS NOT NULL;
