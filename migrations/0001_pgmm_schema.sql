-- pgmm's own per-node bookkeeping. Schema pgmm is never replicated: enrolment skips it and the
-- publication never contains it, because conflicts and tombstones describe what this node saw.
CREATE SCHEMA IF NOT EXISTS pgmm;

-- One row per applied migration; the runner inserts it in the migration's own transaction.
CREATE TABLE pgmm.schema_version (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Every conflict the apply side detected and how it was resolved (design.md, "LWW, precisely").
CREATE TABLE pgmm.conflicts (
    id           bigserial PRIMARY KEY,
    detected_at  timestamptz NOT NULL DEFAULT now(),
    table_name   text NOT NULL,
    kind         text NOT NULL,
    origin       text NOT NULL,
    local_tuple  jsonb,
    remote_tuple jsonb,
    resolution   text NOT NULL
);

-- Operators read recent conflicts first, and old ones are pruned by age.
CREATE INDEX conflicts_detected_at_idx ON pgmm.conflicts (detected_at);

-- Deleted rows, so that a late UPDATE from a peer cannot resurrect a row unless it is newer.
CREATE TABLE pgmm.tombstones (
    table_name text NOT NULL,
    key        jsonb NOT NULL,
    deleted_at timestamptz NOT NULL,
    origin     text NOT NULL,
    PRIMARY KEY (table_name, key)
);

-- Tombstones only matter until every peer has caught up past them; pruning goes by age.
CREATE INDEX tombstones_deleted_at_idx ON pgmm.tombstones (deleted_at);
