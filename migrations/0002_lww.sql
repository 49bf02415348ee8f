-- Last-writer-wins support (design.md, "LWW, precisely"): the clock local writes are stamped
-- with, and where each tombstone was written in this node's WAL.

-- The clock that stamps local writes (through the triggers pgmm installs on enrolled tables).
-- One function, so that every stamp comes from the same place; the tests replace it on one node
-- to simulate a clock that runs behind.
CREATE FUNCTION pgmm.clock() RETURNS timestamptz
    LANGUAGE sql VOLATILE PARALLEL SAFE
    AS $$ SELECT pg_catalog.clock_timestamp() $$;

-- Where this node's WAL was when the tombstone was written: a tombstone may only be purged once
-- every peer has acknowledged this node's changes past that point (and it is old enough).
ALTER TABLE pgmm.tombstones
    ADD COLUMN local_lsn pg_lsn NOT NULL DEFAULT pg_catalog.pg_current_wal_insert_lsn();
