-- Last-writer-wins support (design.md, "LWW, precisely"): the clock local writes are stamped
-- with, which node wrote a row version, and where each tombstone was written in this node's WAL.

-- The clock that stamps local writes (through the triggers pgmm installs on enrolled tables).
-- One function, so that every stamp comes from the same place; the tests replace it on one node
-- to simulate a clock that runs behind.
CREATE FUNCTION pgmm.clock() RETURNS timestamptz
    LANGUAGE sql VOLATILE PARALLEL SAFE
    AS $$ SELECT pg_catalog.clock_timestamp() $$;

-- The node that wrote a row version, from the transaction that wrote it (its xmin):
-- `current_origin` when it is the transaction running now (an apply transaction of that
-- origin's changes), the origin node when the transaction was applied from a peer under
-- replication origin pgmm_<node>, and `here` for local writes and for versions too old for
-- track_commit_timestamp to remember (which is what they were on this node: not applied since).
CREATE FUNCTION pgmm.row_origin(x xid, here text, current_origin text) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
    SELECT CASE
        WHEN x = pg_catalog.pg_current_xact_id_if_assigned()::text::xid THEN current_origin
        ELSE coalesce(
            (SELECT pg_catalog.substr(o.roname, 6)
               FROM pg_catalog.pg_replication_origin o
              WHERE o.roident = (pg_catalog.pg_xact_commit_timestamp_origin(x)).roident
                AND o.roname LIKE 'pgmm\_%'),
            here)
    END
    $$;

-- Where this node's WAL was when the tombstone was written: a tombstone may only be purged once
-- every peer has acknowledged this node's changes past that point (and it is old enough).
ALTER TABLE pgmm.tombstones
    ADD COLUMN local_lsn pg_lsn NOT NULL DEFAULT pg_catalog.pg_current_wal_insert_lsn();
