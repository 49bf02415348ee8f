//! The statements apply runs, as text. One text per (table, operation, column set): the apply
//! session prepares each text once and caches it by the text itself, so building the text is
//! the whole cache key.
//!
//! Every value is a parameter, sent in text format and parsed by the local server into the
//! column's own type. Postgres infers a parameter's type where it first meets it, so each
//! statement is written so that every parameter first appears next to its column (compared
//! with a key, assigned in SET, inserted in VALUES); later uses cast from that type.
//!
//! [`Lww`] builds the last-writer-wins statement of each operation: CTEs that lock the local
//! row and read its version, look up the key's tombstone, decide an action, perform it, and log
//! the conflict (returning `(kind, resolution)` rows), in one statement, so the decision, the
//! data and the log commit together. It also builds each operation's fast path: a plain
//! statement that applies the change only in the no-conflict case.

use std::fmt::Write as _;

use postgres_protocol::escape::{escape_identifier, escape_literal};

pub use crate::pg::quote::qualified;

/// TRUNCATE of already-qualified names, with the origin's options.
pub fn truncate(tables: &[String], cascade: bool, restart_identity: bool) -> String {
    let mut sql = format!("TRUNCATE {}", tables.join(", "));
    if restart_identity {
        sql.push_str(" RESTART IDENTITY");
    }
    if cascade {
        sql.push_str(" CASCADE");
    }
    sql
}

/// Who is applying what to which table: everything a last-writer-wins statement needs besides
/// the columns of the change. Literals are already escaped.
pub struct Lww<'a> {
    /// `"schema"."name"`.
    pub table: &'a str,
    /// `schema.name` as it is logged.
    pub label: &'a str,
    /// The origin node of the change.
    pub origin: &'a str,
    /// This node.
    pub here: &'a str,
    /// The conflict column.
    pub conflict_column: &'a str,
    /// For row-owned tables: an SQL expression over the local row `l` that names its owner
    /// node, so that a change to a row its origin does not own is refused.
    pub row_owner: Option<String>,
    /// The replication origins of the cluster's nodes, by id.
    pub origins: &'a Origins,
}

/// The replication origins `pgmm_<node>` of this database, by id (`pg_replication_origin`),
/// read when an apply session opens. Row versions are attributed by origin id, which the
/// commit timestamp records, so the common comparison ("was the local row written by the
/// change's origin?") is one integer comparison; names are needed only to break ties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins(pub Vec<(u32, String)>);

impl Origins {
    pub fn id_of(&self, node: &str) -> Option<u32> {
        self.0.iter().find(|(_, n)| n == node).map(|(id, _)| *id)
    }

    /// The node whose origin id is `expr`: `here` for 0 (a local transaction) and for origins
    /// that are not pgmm's.
    fn name_sql(&self, expr: &str, here: &str) -> String {
        let mut sql = format!("(CASE {expr}");
        for (id, name) in &self.0 {
            let _ = write!(sql, " WHEN {id} THEN {}", escape_literal(name));
        }
        let _ = write!(sql, " ELSE {} END)", escape_literal(here));
        sql
    }
}

/// How a change ended up, by the action its statement chose: (action, kind, resolution).
/// Actions not listed are no conflict.
const INSERT_OUTCOMES: &str = "('apply_remote', 'insert_exists', 'apply_remote'), \
     ('keep_local', 'insert_exists', 'keep_local'), \
     ('deleted', 'update_deleted', 'skip'), \
     ('violation', 'ownership_violation', 'skip')";
const UPDATE_OUTCOMES: &str = "('apply_remote', 'update_origin_differs', 'apply_remote'), \
     ('keep_local', 'update_origin_differs', 'keep_local'), \
     ('insert', 'update_missing', 'apply_remote'), \
     ('missing', 'update_missing', 'skip'), \
     ('deleted', 'update_deleted', 'skip'), \
     ('violation', 'ownership_violation', 'skip')";
const DELETE_OUTCOMES: &str = "('apply_remote', 'delete_origin_differs', 'apply_remote'), \
     ('keep_local', 'delete_origin_differs', 'keep_local'), \
     ('missing', 'delete_missing', 'skip'), \
     ('violation', 'ownership_violation', 'skip')";

impl Lww<'_> {
    fn origin_lit(&self) -> String {
        escape_literal(self.origin)
    }

    /// The origin's id; 0 (never a row's origin but a local one) if it is unknown.
    fn origin_id(&self) -> u32 {
        self.origins.id_of(self.origin).unwrap_or(0)
    }

    /// `(ru > cu OR (ru = cu AND origin > co))` in the byte order of node names: whether the
    /// remote version `(ru, origin)` is newer than `(cu, co)`.
    fn newer(&self, ru: &str, cu: &str, co: &str) -> String {
        format!(
            "({ru} > {cu} OR ({ru} = {cu} AND {} COLLATE \"C\" > {co} COLLATE \"C\"))",
            self.origin_lit()
        )
    }

    /// The local row's version (and owner), locked: `cur(found, u, o[, owner])`, where `o` is
    /// the id of the replication origin that wrote it (0: this node). The commit timestamp has
    /// no origin for a version too old to be tracked (written here, as far as anyone knows) or
    /// for one written by the transaction running now (this apply transaction: its origin).
    fn cur(&self, key: &[&str], params: &[usize]) -> String {
        let mut sql = format!(
            "cur AS (SELECT true AS found, coalesce(l.{u}, '-infinity'::timestamptz) AS u, \
             coalesce((pg_catalog.pg_xact_commit_timestamp_origin(l.xmin)).roident, \
             CASE WHEN l.xmin = pg_catalog.pg_current_xact_id_if_assigned()::text::xid \
             THEN {id}::oid ELSE 0::oid END) AS o",
            u = escape_identifier(self.conflict_column),
            id = self.origin_id(),
        );
        if let Some(owner) = &self.row_owner {
            let _ = write!(sql, ", {owner} AS owner");
        }
        let _ = write!(sql, " FROM {} AS l", self.table);
        where_key_params(&mut sql, "l", key, params);
        sql.push_str(" FOR UPDATE)");
        sql
    }

    /// `jsonb_build_array($a::text, ...)`: the tombstone key (see `guard::key_json`).
    fn key_json(params: &[usize]) -> String {
        let parts: Vec<String> = params.iter().map(|p| format!("${p}::text")).collect();
        format!("pg_catalog.jsonb_build_array({})", parts.join(", "))
    }

    /// The decision of an INSERT or UPDATE: `d(action, found, tomb_u, tomb_o)`.
    fn decide_write(
        &self,
        u_param: usize,
        old_param: Option<usize>,
        missing_action: &str,
        check_owner: bool,
    ) -> String {
        let origin = self.origin_lit();
        let mut sql = format!(
            "d AS (SELECT CASE \
             WHEN c.found IS NULL AND t.u IS NOT NULL AND NOT {tomb_newer} THEN 'deleted' \
             WHEN c.found IS NULL THEN '{missing_action}' ",
            tomb_newer = self.newer("r.u", "t.u", "t.o"),
        );
        if check_owner && self.row_owner.is_some() {
            let _ = write!(
                sql,
                "WHEN c.owner IS DISTINCT FROM {origin} THEN 'violation' "
            );
        }
        let _ = write!(
            sql,
            "WHEN {sequential} THEN 'apply' \
             WHEN {newer} THEN 'apply_remote' ELSE 'keep_local' END AS action, \
             c.found, t.u AS tomb_u, t.o AS tomb_o \
             FROM (SELECT coalesce(${u_param}, '-infinity'::timestamptz) AS u) AS r \
             LEFT JOIN cur AS c ON true LEFT JOIN tomb AS t ON true)",
            newer = self.newer("r.u", "c.u", &self.origins.name_sql("c.o", self.here)),
            sequential = self.sequential(old_param),
        );
        sql
    }

    /// Whether the change follows the local version without a conflict: the local row was
    /// last written by the change's origin, or the change replaced exactly the local version
    /// (its writer had seen it). `old_param` holds the replaced version's stamp in
    /// microseconds, when the origin's trigger announced it.
    fn sequential(&self, old_param: Option<usize>) -> String {
        let mut sql = format!("c.o = {}", self.origin_id());
        if let Some(p) = old_param {
            let _ = write!(sql, " OR c.u = {}", micros_param(p));
        }
        sql
    }

    fn tomb(&self, params: &[usize]) -> String {
        format!(
            "tomb AS (SELECT t.deleted_at AS u, t.origin AS o FROM pgmm.tombstones AS t \
             WHERE t.table_name = {} AND t.key = {} AND NOT EXISTS (SELECT 1 FROM cur))",
            escape_literal(self.label),
            Self::key_json(params)
        )
    }

    /// The conflict log and the statement's result: one `(kind, resolution)` row per conflict.
    fn log(&self, outcomes: &str, key: &[&str], params: &[usize], remote: &str) -> String {
        let mut local = format!("(SELECT pg_catalog.to_jsonb(l) FROM {} AS l", self.table);
        where_key_params(&mut local, "l", key, params);
        local.push(')');
        format!(
            "log AS (INSERT INTO pgmm.conflicts \
             (table_name, kind, origin, local_tuple, remote_tuple, resolution) \
             SELECT {label}, k.kind, {origin}, \
             CASE WHEN d.found THEN {local} \
             WHEN d.tomb_u IS NOT NULL THEN pg_catalog.jsonb_build_object('deleted_at', d.tomb_u, 'origin', d.tomb_o) END, \
             {remote}, k.resolution \
             FROM d JOIN (VALUES {outcomes}) AS k(action, kind, resolution) USING (action) \
             RETURNING kind, resolution) \
             SELECT kind, resolution FROM log",
            label = escape_literal(self.label),
            origin = self.origin_lit(),
        )
    }

    /// A remote INSERT of `columns` (parameters `$1..` in column order; `key` and `u` index
    /// them): inserted when the key is free and no newer tombstone holds it; over an existing
    /// row, the newer version wins (`insert_exists`).
    pub fn insert(&self, columns: &[&str], key: &[usize], u: usize) -> String {
        let key_names: Vec<&str> = key.iter().map(|&k| columns[k]).collect();
        let key_params: Vec<usize> = key.iter().map(|k| k + 1).collect();
        let cur = self.cur(&key_names, &key_params);
        let tomb = self.tomb(&key_params);
        let params: Vec<usize> = (1..=columns.len()).collect();
        let values: Vec<String> = params.iter().map(|p| format!("${p}")).collect();
        let mut set = String::new();
        list(&mut set, columns, |sql, c, i| {
            let _ = write!(sql, "{} = ${}", escape_identifier(c), i + 1);
        });
        let mut upd = format!("upd AS (UPDATE {} AS l SET {set}", self.table);
        where_key_params(&mut upd, "l", &key_names, &key_params);
        upd.push_str(
            " AND EXISTS (SELECT 1 FROM d WHERE d.action IN ('apply', 'apply_remote')) RETURNING 1)",
        );
        let log = self.log(
            INSERT_OUTCOMES,
            &key_names,
            &key_params,
            &json_object(columns, &params),
        );
        format!(
            "WITH {cur}, {tomb}, {d}, \
             ins AS (INSERT INTO {table} ({cols}) SELECT {values} FROM d WHERE d.action = 'insert' \
             ON CONFLICT DO NOTHING RETURNING 1), {upd}, {log}",
            d = self.decide_write(u + 1, None, "insert", false),
            table = self.table,
            cols = column_list(columns),
            values = values.join(", "),
        )
    }

    /// A remote UPDATE of the `set` columns (`$1..`; `u` indexes them) of the row whose key
    /// (`key`, the next parameters) matches; the last parameter is the replaced version's stamp
    /// (microseconds as text, or NULL). A missing row is inserted when `set` is the whole
    /// row (`insert_missing`) and no newer tombstone holds the key; a row its origin does not
    /// own is refused.
    pub fn update(&self, set: &[&str], key: &[&str], u: usize, insert_missing: bool) -> String {
        let key_params: Vec<usize> = (set.len() + 1..=set.len() + key.len()).collect();
        let cur = self.cur(key, &key_params);
        let tomb = self.tomb(&key_params);
        let params: Vec<usize> = (1..=set.len()).collect();
        let mut assignments = String::new();
        list(&mut assignments, set, |sql, c, i| {
            let _ = write!(sql, "{} = ${}", escape_identifier(c), i + 1);
        });
        let mut upd = format!("upd AS (UPDATE {} AS l SET {assignments}", self.table);
        where_key_params(&mut upd, "l", key, &key_params);
        upd.push_str(
            " AND EXISTS (SELECT 1 FROM d WHERE d.action IN ('apply', 'apply_remote')) RETURNING 1)",
        );
        let ins = if insert_missing {
            let values: Vec<String> = params.iter().map(|p| format!("${p}")).collect();
            format!(
                ", ins AS (INSERT INTO {} ({}) SELECT {} FROM d WHERE d.action = 'insert' \
                 ON CONFLICT DO NOTHING RETURNING 1)",
                self.table,
                column_list(set),
                values.join(", ")
            )
        } else {
            String::new()
        };
        let missing = if insert_missing { "insert" } else { "missing" };
        format!(
            "WITH {cur}, {tomb}, {d}, {upd}{ins}, {log}",
            d = self.decide_write(u + 1, Some(set.len() + key.len() + 1), missing, true),
            log = self.log(
                UPDATE_OUTCOMES,
                key,
                &key_params,
                &json_object(set, &params)
            ),
        )
    }

    /// A remote DELETE of the row whose key matches `$1..`; `$<key.len() + 1>` is the delete's
    /// stamp and `$<key.len() + 2>` the deleted version's (or NULL), in microseconds since
    /// 2000-01-01 UTC as text. The newer version wins against a
    /// row another node wrote; a tombstone records the delete either way it is applied (and
    /// when the row is already gone), so a late older write cannot bring the row back.
    pub fn delete(&self, key: &[&str]) -> String {
        let origin = self.origin_lit();
        let stamp = key.len() + 1;
        let key_params: Vec<usize> = (1..=key.len()).collect();
        let cur = self.cur(key, &key_params);
        let mut d = String::from("d AS (SELECT CASE WHEN c.found IS NULL THEN 'missing' ");
        if self.row_owner.is_some() {
            let _ = write!(
                d,
                "WHEN c.owner IS DISTINCT FROM {origin} THEN 'violation' "
            );
        }
        let _ = write!(
            d,
            "WHEN {sequential} THEN 'apply' \
             WHEN {newer} THEN 'apply_remote' ELSE 'keep_local' END AS action, \
             c.found, NULL::timestamptz AS tomb_u, NULL::text AS tomb_o, r.u AS ru \
             FROM (SELECT {stamp} AS u) AS r LEFT JOIN cur AS c ON true)",
            newer = self.newer("r.u", "c.u", &self.origins.name_sql("c.o", self.here)),
            sequential = self.sequential(Some(key.len() + 2)),
            stamp = micros_param(stamp),
        );
        let mut del = format!("del AS (DELETE FROM {} AS l", self.table);
        where_key_params(&mut del, "l", key, &key_params);
        del.push_str(
            " AND EXISTS (SELECT 1 FROM d WHERE d.action IN ('apply', 'apply_remote')) RETURNING 1)",
        );
        let tombstone = format!(
            "tombstone AS (INSERT INTO pgmm.tombstones AS x (table_name, key, deleted_at, origin) \
             SELECT {label}, {key_json}, d.ru, {origin} FROM d \
             WHERE d.action IN ('apply', 'apply_remote', 'missing') {TOMBSTONE_UPSERT})",
            label = escape_literal(self.label),
            key_json = Self::key_json(&key_params),
        );
        let remote = format!(
            "{} || pg_catalog.jsonb_build_object('deleted_at', d.ru)",
            json_object(key, &key_params)
        );
        format!(
            "WITH {cur}, {d}, {del}, {tombstone}, {log}",
            log = self.log(DELETE_OUTCOMES, key, &key_params, &remote),
        )
    }

    /// The origin id of the local row `l`, as in [`Lww::cur`].
    fn row_origin_id(&self) -> String {
        format!(
            "coalesce((pg_catalog.pg_xact_commit_timestamp_origin(l.xmin)).roident, \
             CASE WHEN l.xmin = pg_catalog.pg_current_xact_id_if_assigned()::text::xid \
             THEN {id}::oid ELSE 0::oid END)",
            id = self.origin_id()
        )
    }

    /// ` AND (<sequential>)[ AND <owner> = origin]` over the local row `l`: the row follows
    /// from the change without a conflict (see [`Lww::sequential`]), and its origin owns it.
    /// `old` is the SQL text of the replaced version's stamp (microseconds as text).
    fn fast_condition(&self, old: Option<&str>) -> String {
        let mut sql = format!(" AND ({} = {}", self.row_origin_id(), self.origin_id());
        if let Some(old) = old {
            let _ = write!(
                sql,
                " OR l.{} = {}",
                escape_identifier(self.conflict_column),
                micros(old)
            );
        }
        sql.push(')');
        if let Some(owner) = &self.row_owner {
            let _ = write!(sql, " AND {owner} = {}", self.origin_lit());
        }
        sql
    }

    /// The fast path of [`Lww::insert`], with the same parameters (`u` indexes the conflict
    /// column): it inserts when the key was free and no tombstone of it is as new as the
    /// insert, i.e. exactly when the full statement would insert without a conflict, and
    /// otherwise fails (see [`all_applied`]); the caller then falls back to the full statement.
    pub fn insert_fast(&self, columns: &[&str], key: &[usize], u: usize) -> String {
        let values: Vec<String> = (1..=columns.len()).map(|p| format!("${p}")).collect();
        let key_params: Vec<usize> = key.iter().map(|k| k + 1).collect();
        format!(
            "WITH ins AS (INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING RETURNING 1) \
             {} WHERE NOT {}",
            self.table,
            column_list(columns),
            values.join(", "),
            all_applied("ins", "1"),
            self.held_by_tombstone(&Self::key_json(&key_params), &format!("${}", u + 1)),
        )
    }

    /// `EXISTS (...)`: whether a tombstone of the key `key_json` is at least as new as an
    /// insert stamped `u` (which the full statement would skip as `update_deleted`).
    fn held_by_tombstone(&self, key_json: &str, u: &str) -> String {
        format!(
            "EXISTS (SELECT 1 FROM pgmm.tombstones AS t \
             WHERE t.table_name = {} AND t.key = {key_json} AND NOT {})",
            escape_literal(self.label),
            self.newer(
                &format!("coalesce({u}, '-infinity'::timestamptz)"),
                "t.deleted_at",
                "t.origin"
            ),
        )
    }

    /// The fast path of [`Lww::update`], with the same parameters: it updates the row when
    /// it follows from the change without a conflict, and otherwise fails.
    pub fn update_fast(&self, set: &[&str], key: &[&str]) -> String {
        let key_params: Vec<usize> = (set.len() + 1..=set.len() + key.len()).collect();
        let mut sql = format!("WITH upd AS (UPDATE {} AS l SET ", self.table);
        list(&mut sql, set, |sql, c, i| {
            let _ = write!(sql, "{} = ${}", escape_identifier(c), i + 1);
        });
        where_key_params(&mut sql, "l", key, &key_params);
        sql.push_str(&self.fast_condition(Some(&format!("${}", set.len() + key.len() + 1))));
        let _ = write!(sql, " RETURNING 1) {}", all_applied("upd", "1"));
        sql
    }

    /// The fast path of [`Lww::delete`], with the same parameters: it deletes the row (and
    /// records its tombstone) when it follows from the change without a conflict, and
    /// otherwise fails.
    pub fn delete_fast(&self, key: &[&str]) -> String {
        let key_params: Vec<usize> = (1..=key.len()).collect();
        let mut del = format!("WITH del AS (DELETE FROM {} AS l", self.table);
        where_key_params(&mut del, "l", key, &key_params);
        del.push_str(&self.fast_condition(Some(&format!("${}", key.len() + 2))));
        del.push_str(" RETURNING 1)");
        format!(
            "{del}, tombstone AS (INSERT INTO pgmm.tombstones AS x (table_name, key, deleted_at, origin) \
             SELECT {label}, {key_json}, {stamp}, {origin} FROM del {TOMBSTONE_UPSERT}) \
             {applied}",
            applied = all_applied("del", "1"),
            label = escape_literal(self.label),
            key_json = Self::key_json(&key_params),
            stamp = micros_param(key.len() + 1),
            origin = self.origin_lit(),
        )
    }

    /// The bulk form of [`Lww::insert_fast`], for a group of inserts into the same columns:
    /// parameter `$i` is the `text[]` of parameter `$i` of every change of the group, and
    /// `types` are the columns' types, which each value is cast to (a single statement's
    /// parameter gets its column's type by inference; an array element of text does not).
    /// It fails unless it inserted a row for every change of the group.
    pub fn insert_bulk(&self, columns: &[&str], key: &[usize], u: usize, types: &[&str]) -> String {
        let key_json = json_array(key.iter().map(|&k| cast_text(k + 1, types[k])));
        format!(
            "WITH ins AS (INSERT INTO {} ({}) SELECT {} FROM {} WHERE NOT {} \
             ON CONFLICT DO NOTHING RETURNING 1) {}",
            self.table,
            column_list(columns),
            casts(types, 1),
            rows_from(columns.len()),
            self.held_by_tombstone(&key_json, &cast(u + 1, types[u])),
            all_applied("ins", BULK_ROWS),
        )
    }

    /// The bulk form of [`Lww::update_fast`], parameters as in [`Lww::insert_bulk`]; `types`
    /// are those of the `set` columns, then of the `key` columns. A key twice in one group
    /// would be updated once and miss the count, so groups hold distinct keys.
    pub fn update_bulk(&self, set: &[&str], key: &[&str], types: &[&str]) -> String {
        let mut sql = format!("WITH upd AS (UPDATE {} AS l SET ", self.table);
        list(&mut sql, set, |sql, c, i| {
            let _ = write!(sql, "{} = {}", escape_identifier(c), cast(i + 1, types[i]));
        });
        let _ = write!(sql, " FROM {}", rows_from(set.len() + key.len() + 1));
        where_key_casts(&mut sql, key, set.len() + 1, &types[set.len()..]);
        sql.push_str(&self.fast_condition(Some(&format!("v.p{}", set.len() + key.len() + 1))));
        let _ = write!(sql, " RETURNING 1) {}", all_applied("upd", BULK_ROWS));
        sql
    }

    /// The bulk form of [`Lww::delete_fast`], parameters as in [`Lww::insert_bulk`]; `types`
    /// are the key columns'.
    pub fn delete_bulk(&self, key: &[&str], types: &[&str]) -> String {
        let mut sql = format!(
            "WITH del AS (DELETE FROM {} AS l USING {}",
            self.table,
            rows_from(key.len() + 2)
        );
        where_key_casts(&mut sql, key, 1, types);
        sql.push_str(&self.fast_condition(Some(&format!("v.p{}", key.len() + 2))));
        let key_json = json_array(
            key.iter()
                .map(|c| format!("l.{}::text", escape_identifier(c))),
        );
        let _ = write!(
            sql,
            " RETURNING {key_json} AS key, v.p{} AS stamp), \
             tombstone AS (INSERT INTO pgmm.tombstones AS x (table_name, key, deleted_at, origin) \
             SELECT {}, del.key, {}, {} FROM del {TOMBSTONE_UPSERT}) {}",
            key.len() + 1,
            escape_literal(self.label),
            micros("del.stamp"),
            self.origin_lit(),
            all_applied("del", BULK_ROWS),
        );
        sql
    }

    /// Records a change refused before it ran (its origin may not make it): the remote tuple's
    /// `columns` are `$1..` as text.
    pub fn violation(&self, columns: &[&str]) -> String {
        let pairs: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{}, ${}::text", escape_literal(c), i + 1))
            .collect();
        let remote = if pairs.is_empty() {
            "'{}'::jsonb".to_owned()
        } else {
            pairs
                .chunks(50)
                .map(|chunk| format!("pg_catalog.jsonb_build_object({})", chunk.join(", ")))
                .collect::<Vec<_>>()
                .join(" || ")
        };
        format!(
            "INSERT INTO pgmm.conflicts \
             (table_name, kind, origin, local_tuple, remote_tuple, resolution) \
             VALUES ({}, 'ownership_violation', {}, NULL, {remote}, 'skip') \
             RETURNING kind, resolution",
            escape_literal(self.label),
            self.origin_lit()
        )
    }
}

/// `SELECT` over the CTE `cte` that fails with division by zero (22012) unless it holds exactly
/// `expected` rows: a fast statement that did not apply all its changes aborts the transaction
/// by itself, so the fast attempt can be sent with its COMMIT in one pipeline, and a miss turns
/// that COMMIT into a rollback.
fn all_applied(cte: &str, expected: &str) -> String {
    format!("SELECT 1 / (count(*) = {expected})::int FROM {cte}")
}

/// The number of changes of a bulk statement: the length of its arrays.
const BULK_ROWS: &str = "pg_catalog.cardinality($1::text[])";

/// `"a", "b"`: the column names, quoted.
fn column_list(columns: &[&str]) -> String {
    columns
        .iter()
        .map(|c| escape_identifier(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How a tombstone upsert keeps the newer of two tombstones of a key.
const TOMBSTONE_UPSERT: &str = "ON CONFLICT (table_name, key) DO UPDATE \
     SET deleted_at = EXCLUDED.deleted_at, origin = EXCLUDED.origin, local_lsn = EXCLUDED.local_lsn \
     WHERE EXCLUDED.deleted_at > x.deleted_at OR (EXCLUDED.deleted_at = x.deleted_at \
     AND EXCLUDED.origin COLLATE \"C\" > x.origin COLLATE \"C\") RETURNING 1";

/// `ROWS FROM (unnest($1::text[]), ...) AS v(p1, ...)`: the rows of a bulk statement, one per
/// change, from its `n` array parameters.
fn rows_from(n: usize) -> String {
    let arrays: Vec<String> = (1..=n).map(|p| format!("unnest(${p}::text[])")).collect();
    let names: Vec<String> = (1..=n).map(|p| format!("p{p}")).collect();
    format!(
        "ROWS FROM ({}) AS v({})",
        arrays.join(", "),
        names.join(", ")
    )
}

/// Column `p` of the bulk rows `v`, as a value of `ty`.
fn cast(p: usize, ty: &str) -> String {
    format!("CAST(v.p{p} AS {ty})")
}

/// Column `p` of the bulk rows `v` in the text form of `ty`: what the tombstone key holds.
fn cast_text(p: usize, ty: &str) -> String {
    format!("{}::text", cast(p, ty))
}

/// Columns `first..` of the bulk rows `v`, each cast to its type.
fn casts(types: &[&str], first: usize) -> String {
    types
        .iter()
        .enumerate()
        .map(|(i, ty)| cast(first + i, ty))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `jsonb_build_array(...)` of the items.
fn json_array(items: impl Iterator<Item = String>) -> String {
    format!(
        "pg_catalog.jsonb_build_array({})",
        items.collect::<Vec<_>>().join(", ")
    )
}

/// `$p` (microseconds since 2000-01-01 UTC, as text) as a timestamptz.
fn micros_param(p: usize) -> String {
    micros(&format!("${p}"))
}

/// The SQL text `expr` (microseconds since 2000-01-01 UTC, as text) as a timestamptz.
fn micros(expr: &str) -> String {
    format!(
        "(timestamptz '2000-01-01 00:00:00+00' + {expr}::text::bigint * interval '1 microsecond')"
    )
}

/// `jsonb_build_object('a', $1, ...)`, chunked under the 100-argument limit of a function call.
fn json_object(columns: &[&str], params: &[usize]) -> String {
    let pairs: Vec<String> = columns
        .iter()
        .zip(params)
        .map(|(c, p)| format!("{}, ${p}", escape_literal(c)))
        .collect();
    if pairs.is_empty() {
        return "'{}'::jsonb".into();
    }
    pairs
        .chunks(50)
        .map(|chunk| format!("jsonb_build_object({})", chunk.join(", ")))
        .collect::<Vec<_>>()
        .join(" || ")
}

/// ` WHERE l."k1" = CAST(v.p<first> AS <type>) AND ...`: the key columns matched against the
/// bulk rows `v`, from column `first` on.
fn where_key_casts(sql: &mut String, key: &[&str], first: usize, types: &[&str]) {
    sql.push_str(" WHERE ");
    for (j, (c, ty)) in key.iter().zip(types).enumerate() {
        if j > 0 {
            sql.push_str(" AND ");
        }
        let _ = write!(sql, "l.{} = {}", escape_identifier(c), cast(first + j, ty));
    }
}

/// ` WHERE alias."k1" = $p1 AND ...` for key columns and their parameter numbers.
fn where_key_params(sql: &mut String, alias: &str, key: &[&str], params: &[usize]) {
    sql.push_str(" WHERE ");
    for (i, (c, p)) in key.iter().zip(params).enumerate() {
        if i > 0 {
            sql.push_str(" AND ");
        }
        let _ = write!(sql, "{alias}.{} = ${p}", escape_identifier(c));
    }
}

fn list(sql: &mut String, items: &[&str], mut each: impl FnMut(&mut String, &str, usize)) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        each(sql, item, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static ORIGINS: std::sync::LazyLock<Origins> =
        std::sync::LazyLock::new(|| Origins(vec![(1, "b".into()), (2, "c".into())]));

    fn lww(row_owner: Option<String>) -> Lww<'static> {
        Lww {
            origins: &ORIGINS,
            table: "\"public\".\"t\"",
            label: "public.t",
            origin: "b",
            here: "a",
            conflict_column: "updated_at",
            row_owner,
        }
    }

    #[test]
    fn identifiers_are_quoted_and_truncate_keeps_its_options() {
        let t = qualified("public", "Odd \"name\"");
        assert_eq!(t, "\"public\".\"Odd \"\"name\"\"\"");
        assert_eq!(
            truncate(&["\"a\".\"b\"".into(), "\"a\".\"c\"".into()], true, true),
            "TRUNCATE \"a\".\"b\", \"a\".\"c\" RESTART IDENTITY CASCADE"
        );
        assert_eq!(truncate(&["x".into()], false, false), "TRUNCATE x");
    }

    #[test]
    fn an_insert_looks_up_its_key_where_it_is_among_the_columns() {
        let sql = lww(None).insert(&["v", "id", "updated_at"], &[1], 2);
        assert!(
            sql.contains("FROM \"public\".\"t\" AS l WHERE l.\"id\" = $2 FOR UPDATE"),
            "{sql}"
        );
        assert!(sql.contains("jsonb_build_array($2::text)"), "{sql}");
        assert!(
            sql.contains("coalesce($3, '-infinity'::timestamptz)"),
            "{sql}"
        );
        assert!(
            sql.contains("SELECT $1, $2, $3 FROM d WHERE d.action = 'insert'"),
            "{sql}"
        );
        assert!(sql.contains("'insert_exists', 'keep_local'"), "{sql}");
        assert!(
            sql.contains("'b' COLLATE \"C\" > (CASE c.o WHEN 1 THEN 'b' WHEN 2 THEN 'c' ELSE 'a' END) COLLATE \"C\""),
            "{sql}"
        );
        assert!(!sql.contains("violation' WHEN"), "{sql}");
    }

    #[test]
    fn an_update_numbers_its_key_after_the_set_columns_and_checks_the_row_owner() {
        let sql =
            lww(Some("l.\"home\"::text".into())).update(&["v", "updated_at"], &["id"], 1, false);
        assert!(
            sql.contains("SET \"v\" = $1, \"updated_at\" = $2 WHERE l.\"id\" = $3"),
            "{sql}"
        );
        assert!(sql.contains("l.\"home\"::text AS owner"), "{sql}");
        assert!(
            sql.contains("WHEN c.owner IS DISTINCT FROM 'b' THEN 'violation'"),
            "{sql}"
        );
        assert!(sql.contains("THEN 'missing'"), "{sql}");
        assert!(!sql.contains("ins AS"), "{sql}");
        let whole = lww(None).update(&["id", "v", "updated_at"], &["id"], 2, true);
        assert!(whole.contains("ins AS (INSERT INTO"), "{whole}");
        assert!(whole.contains("WHERE l.\"id\" = $4"), "{whole}");
    }

    #[test]
    fn fast_paths_apply_only_what_follows_from_the_local_row() {
        let l = lww(Some("l.\"home\"::text".into()));
        let upd = l.update_fast(&["v", "updated_at"], &["id"]);
        assert!(upd.starts_with("WITH upd AS (UPDATE \"public\".\"t\" AS l SET \"v\" = $1, \"updated_at\" = $2 WHERE l.\"id\" = $3 AND ("), "{upd}");
        assert!(upd.contains("THEN 1::oid ELSE 0::oid END) = 1 OR l.\"updated_at\" = (timestamptz '2000-01-01 00:00:00+00' + $4::text::bigint"), "{upd}");
        assert!(
            upd.ends_with(
                "AND l.\"home\"::text = 'b' RETURNING 1) SELECT 1 / (count(*) = 1)::int FROM upd"
            ),
            "{upd}"
        );
        let ins = lww(None).insert_fast(&["v", "id", "updated_at"], &[1], 2);
        assert!(
            ins.contains("VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING 1)"),
            "{ins}"
        );
        assert!(
            ins.contains("t.key = pg_catalog.jsonb_build_array($2::text) AND NOT (coalesce($3, '-infinity'::timestamptz) > t.deleted_at OR"),
            "{ins}"
        );
        let del = lww(None).delete_fast(&["id"]);
        assert!(del.contains("$3::text::bigint"), "{del}");
        assert!(
            del.ends_with("SELECT 1 / (count(*) = 1)::int FROM del"),
            "{del}"
        );
    }

    #[test]
    fn bulk_statements_cast_each_array_column_to_its_local_type() {
        let l = lww(Some("l.\"home\"::text".into()));
        let ins = l.insert_bulk(
            &["v", "id", "updated_at"],
            &[1],
            2,
            &["numeric", "bigint", "timestamp with time zone"],
        );
        assert!(ins.starts_with("WITH ins AS (INSERT INTO \"public\".\"t\" (\"v\", \"id\", \"updated_at\") SELECT CAST(v.p1 AS numeric), CAST(v.p2 AS bigint), CAST(v.p3 AS timestamp with time zone) FROM ROWS FROM (unnest($1::text[]), unnest($2::text[]), unnest($3::text[])) AS v(p1, p2, p3) WHERE NOT EXISTS"), "{ins}");
        assert!(ins.contains("t.key = pg_catalog.jsonb_build_array(CAST(v.p2 AS bigint)::text) AND NOT (coalesce(CAST(v.p3 AS timestamp with time zone), '-infinity'::timestamptz) > t.deleted_at"), "{ins}");
        assert!(
            ins.ends_with("ON CONFLICT DO NOTHING RETURNING 1) SELECT 1 / (count(*) = pg_catalog.cardinality($1::text[]))::int FROM ins"),
            "{ins}"
        );

        let upd = l.update_bulk(
            &["v", "updated_at"],
            &["id", "k2"],
            &["text", "timestamp with time zone", "integer", "uuid"],
        );
        assert!(upd.contains("SET \"v\" = CAST(v.p1 AS text), \"updated_at\" = CAST(v.p2 AS timestamp with time zone) FROM ROWS FROM (unnest($1::text[]), unnest($2::text[]), unnest($3::text[]), unnest($4::text[]), unnest($5::text[])) AS v(p1, p2, p3, p4, p5) WHERE l.\"id\" = CAST(v.p3 AS integer) AND l.\"k2\" = CAST(v.p4 AS uuid) AND ("), "{upd}");
        assert!(
            upd.contains(
                "OR l.\"updated_at\" = (timestamptz '2000-01-01 00:00:00+00' + v.p5::text::bigint"
            ),
            "{upd}"
        );
        assert!(
            upd.ends_with("AND l.\"home\"::text = 'b' RETURNING 1) SELECT 1 / (count(*) = pg_catalog.cardinality($1::text[]))::int FROM upd"),
            "{upd}"
        );

        let del = lww(None).delete_bulk(&["id"], &["integer"]);
        assert!(del.starts_with("WITH del AS (DELETE FROM \"public\".\"t\" AS l USING ROWS FROM (unnest($1::text[]), unnest($2::text[]), unnest($3::text[])) AS v(p1, p2, p3) WHERE l.\"id\" = CAST(v.p1 AS integer) AND ("), "{del}");
        assert!(del.contains("v.p3::text::bigint"), "{del}");
        assert!(
            del.contains(
                "RETURNING pg_catalog.jsonb_build_array(l.\"id\"::text) AS key, v.p2 AS stamp)"
            ),
            "{del}"
        );
        assert!(del.contains("SELECT 'public.t', del.key, (timestamptz '2000-01-01 00:00:00+00' + del.stamp::text::bigint * interval '1 microsecond'), 'b' FROM del ON CONFLICT (table_name, key) DO UPDATE"), "{del}");
        assert!(
            del.ends_with("RETURNING 1) SELECT 1 / (count(*) = pg_catalog.cardinality($1::text[]))::int FROM del"),
            "{del}"
        );
    }

    #[test]
    fn a_delete_leaves_a_tombstone_stamped_by_its_origin() {
        let sql = lww(None).delete(&["k1", "k2"]);
        assert!(
            sql.contains("$3::text::bigint * interval '1 microsecond'"),
            "{sql}"
        );
        assert!(
            sql.contains("jsonb_build_array($1::text, $2::text), d.ru, 'b'"),
            "{sql}"
        );
        assert!(sql.contains("'delete_missing', 'skip'"), "{sql}");
        let v = lww(None).violation(&["id", "v"]);
        assert!(
            v.contains("jsonb_build_object('id', $1::text, 'v', $2::text)"),
            "{v}"
        );
        let wide: Vec<String> = (0..120).map(|i| format!("c{i}")).collect();
        let wide: Vec<&str> = wide.iter().map(String::as_str).collect();
        let params: Vec<usize> = (1..=120).collect();
        assert_eq!(
            json_object(&wide, &params)
                .matches("jsonb_build_object(")
                .count(),
            3
        );
    }
}
