//! What a donor tells a joining node about the replicated tables: which they are, their
//! columns, and their schema as statements the joiner runs (read from the donor's catalog
//! inside the copy's snapshot, with `search_path = pg_catalog` so that every name the catalog
//! functions print is qualified).
//!
//! The statements cover what a replicated table needs to work: its schema, the enum types and
//! sequences its columns use, the table (columns, types, collations, defaults, identity,
//! generated columns, NOT NULL, partitioning and partitions), its constraints, indexes and
//! owner. Triggers, policies, grants, comments and other types (domains, composites) are not
//! copied: a joiner that needs them is given its schema first (the "schema only" join).
//! `pre` runs before the rows, `post` (keys, indexes, foreign keys, owners) after them, as
//! `pg_restore` does, because building an index once is faster than maintaining it per row.

use tokio_postgres::Client;

use crate::config::table::TableName;
use crate::pg::names::PUBLICATION;

/// A table the donor copies.
#[derive(Debug, Clone)]
pub struct CopiedTable {
    pub oid: u32,
    /// `"schema"."name"`, as SQL takes it.
    pub sql_name: String,
    /// `schema.name`, for people and metrics.
    pub label: String,
    pub partitioned: bool,
    /// The columns a COPY carries: not dropped, not generated; in the table's order.
    pub columns: Vec<String>,
    /// Its keys, checks and indexes (set by [`schema`] for a table that is not partitioned).
    pub post: Vec<String>,
    /// `pg_class.reltuples` of the table and its partitions (-1 or 0: unknown).
    pub estimated_rows: f32,
}

/// The replicated tables (publication `pgmm`), or those of them named in `only`.
pub async fn tables(
    client: &Client,
    only: &[String],
) -> Result<Vec<CopiedTable>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.oid, n.nspname, c.relname, c.relkind = 'p', \
                    pg_catalog.format('%I.%I', n.nspname, c.relname) \
             FROM pg_catalog.pg_publication_rel pr \
             JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid AND p.pubname = $1 \
             JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             ORDER BY n.nspname, c.relname",
            &[&PUBLICATION],
        )
        .await?;
    let wanted: Vec<TableName> = only.iter().filter_map(|t| TableName::parse(t)).collect();
    let mut out = Vec::new();
    for row in rows {
        let schema: String = row.get(1);
        let name: String = row.get(2);
        let table = TableName::new(schema.clone(), name.clone());
        if !wanted.is_empty() && !wanted.contains(&table) {
            continue;
        }
        let oid: u32 = row.get(0);
        let columns = client
            .query(
                "SELECT attname FROM pg_catalog.pg_attribute \
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' \
                 ORDER BY attnum",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let estimated_rows: f32 = client
            .query_one(
                "SELECT greatest(sum(c.reltuples), 0)::real FROM pg_catalog.pg_class c \
                 WHERE c.oid = $1 \
                    OR c.oid IN (SELECT relid FROM pg_catalog.pg_partition_tree($1::oid::regclass))",
                &[&oid],
            )
            .await?
            .get::<_, Option<f32>>(0)
            .unwrap_or(0.0);
        out.push(CopiedTable {
            oid,
            sql_name: row.get(4),
            label: table.to_string(),
            partitioned: row.get(3),
            columns,
            post: Vec::new(),
            estimated_rows,
        });
    }
    // The largest first: the joiner builds a table's indexes while the next ones stream, so
    // the one left to build after the last rows should be small.
    out.sort_by(|a, b| b.estimated_rows.total_cmp(&a.estimated_rows));
    Ok(out)
}

/// The schema of `tables` as `(pre, post)` statements. Every statement either creates what is
/// missing or fails with an "already exists" error, which the joiner skips: a joiner given the
/// schema beforehand keeps its own.
pub async fn schema(
    client: &Client,
    tables: &mut [CopiedTable],
) -> Result<(Vec<String>, Vec<String>), tokio_postgres::Error> {
    let roots: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    // The tables and all their partitions, parents first.
    let rels: Vec<(u32, String, bool, Option<u32>)> = client
        .query(
            "SELECT c.oid, pg_catalog.format('%I.%I', n.nspname, c.relname), c.relkind = 'p', \
                    CASE WHEN t.level > 0 THEN t.parentrelid::oid END \
             FROM unnest($1::oid[]) AS r(oid), \
                  LATERAL (SELECT p.relid, p.parentrelid, p.level \
                           FROM pg_catalog.pg_partition_tree(r.oid) p \
                           UNION SELECT r.oid::regclass, NULL::regclass, 0) t \
             JOIN pg_catalog.pg_class c ON c.oid = t.relid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             ORDER BY t.level, c.oid",
            &[&roots],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let all: Vec<u32> = rels.iter().map(|r| r.0).collect();
    let mut pre = Vec::new();
    let mut post = Vec::new();

    // Schemas of the tables and of the types they use.
    for row in client
        .query(
            "SELECT DISTINCT pg_catalog.format('%I', n.nspname) FROM pg_catalog.pg_namespace n \
             WHERE n.oid IN (SELECT relnamespace FROM pg_catalog.pg_class WHERE oid = ANY($1) \
                             UNION SELECT t.typnamespace FROM pg_catalog.pg_attribute a \
                               JOIN pg_catalog.pg_type t ON t.oid = a.atttypid OR t.typarray = a.atttypid \
                               WHERE a.attrelid = ANY($1) AND t.typtype = 'e') \
             ORDER BY 1",
            &[&all],
        )
        .await?
    {
        pre.push(format!("CREATE SCHEMA IF NOT EXISTS {}", row.get::<_, String>(0)));
    }

    // Enum types.
    for row in client
        .query(
            "SELECT pg_catalog.format('%I.%I', n.nspname, t.typname), \
                    (SELECT pg_catalog.string_agg(pg_catalog.quote_literal(e.enumlabel), ', ' \
                                                  ORDER BY e.enumsortorder) \
                     FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid) \
             FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace \
             WHERE t.typtype = 'e' AND t.oid IN ( \
                 SELECT t2.oid FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_type t2 ON t2.oid = a.atttypid OR t2.typarray = a.atttypid \
                 WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped) \
             ORDER BY 1",
            &[&all],
        )
        .await?
    {
        let labels: Option<String> = row.get(1);
        pre.push(format!(
            "CREATE TYPE {} AS ENUM ({})",
            row.get::<_, String>(0),
            labels.unwrap_or_default()
        ));
    }

    // Sequences the columns use (owned, or named in a default), but identity sequences, which
    // the column definition creates.
    for row in client
        .query(
            "SELECT DISTINCT pg_catalog.format('%I.%I', n.nspname, c.relname), \
                    pg_catalog.format_type(s.seqtypid, NULL), s.seqincrement, s.seqmin, s.seqmax, \
                    s.seqstart, s.seqcache, s.seqcycle \
             FROM pg_catalog.pg_sequence s \
             JOIN pg_catalog.pg_class c ON c.oid = s.seqrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE s.seqrelid IN (SELECT objid FROM pg_catalog.pg_depend \
                                  WHERE classid = 'pg_catalog.pg_class'::regclass \
                                    AND refclassid = 'pg_catalog.pg_class'::regclass \
                                    AND refobjid = ANY($1) AND deptype = 'a' \
                                  UNION \
                                  SELECT d.refobjid FROM pg_catalog.pg_depend d \
                                  JOIN pg_catalog.pg_attrdef ad ON ad.oid = d.objid \
                                  WHERE d.classid = 'pg_catalog.pg_attrdef'::regclass \
                                    AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                                    AND ad.adrelid = ANY($1)) \
             ORDER BY 1",
            &[&all],
        )
        .await?
    {
        let (inc, min, max, start, cache): (i64, i64, i64, i64, i64) =
            (row.get(2), row.get(3), row.get(4), row.get(5), row.get(6));
        pre.push(format!(
            "CREATE SEQUENCE IF NOT EXISTS {} AS {} INCREMENT BY {inc} MINVALUE {min} \
             MAXVALUE {max} START WITH {start} CACHE {cache}{}",
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            if row.get::<_, bool>(7) { " CYCLE" } else { "" }
        ));
    }

    // Tables, parents before partitions.
    for (oid, name, partitioned, parent) in &rels {
        let mut sql = match parent {
            Some(parent) => {
                let row = client
                    .query_one(
                        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), \
                                pg_catalog.pg_get_expr(r.relpartbound, r.oid) \
                         FROM pg_catalog.pg_class r, pg_catalog.pg_class c \
                         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                         WHERE r.oid = $1 AND c.oid = $2",
                        &[oid, parent],
                    )
                    .await?;
                format!(
                    "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {} {}",
                    row.get::<_, String>(0),
                    row.get::<_, String>(1)
                )
            }
            None => {
                let columns = column_definitions(client, *oid).await?;
                format!(
                    "CREATE TABLE IF NOT EXISTS {name} (\n    {}\n)",
                    columns.join(",\n    ")
                )
            }
        };
        if *partitioned {
            let key: String = client
                .query_one("SELECT pg_catalog.pg_get_partkeydef($1)", &[oid])
                .await?
                .get(0);
            sql.push_str(&format!(" PARTITION BY {key}"));
        }
        pre.push(sql);
    }

    // Constraints (foreign keys last: they may name another copied table), indexes, owners.
    // A statement on a copied table that is not partitioned goes with that table (foreign keys
    // excepted); the rest, in order, after every table.
    let mut own = |relid: u32, sql: String, post: &mut Vec<String>| match tables
        .iter_mut()
        .find(|t| t.oid == relid && !t.partitioned)
    {
        Some(t) => t.post.push(sql),
        None => post.push(sql),
    };
    for row in client
        .query(
            "SELECT pg_catalog.format('ALTER TABLE %s ADD CONSTRAINT %I %s', \
                        pg_catalog.format('%I.%I', n.nspname, c.relname), k.conname, \
                        pg_catalog.pg_get_constraintdef(k.oid)), k.conrelid, k.contype = 'f' \
             FROM pg_catalog.pg_constraint k \
             JOIN pg_catalog.pg_class c ON c.oid = k.conrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE k.conrelid = ANY($1) AND k.contype IN ('p', 'u', 'x', 'c', 'f') \
               AND k.conparentid = 0 AND k.conislocal \
             ORDER BY k.contype = 'f', k.contype <> 'p', k.conrelid, k.conname",
            &[&all],
        )
        .await?
    {
        if row.get::<_, bool>(2) {
            post.push(row.get(0));
        } else {
            own(row.get(1), row.get(0), &mut post);
        }
    }
    for row in client
        .query(
            "SELECT pg_catalog.pg_get_indexdef(i.indexrelid), i.indrelid FROM pg_catalog.pg_index i \
             WHERE i.indrelid = ANY($1) \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k \
                               WHERE k.conindid = i.indexrelid AND k.contype IN ('p', 'u', 'x')) \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits h \
                               WHERE h.inhrelid = i.indexrelid) \
             ORDER BY i.indexrelid",
            &[&all],
        )
        .await?
    {
        // On a partitioned parent the definition says ON ONLY, which would leave the index
        // invalid until each partition's is attached; here the partitions exist already.
        own(
            row.get(1),
            row.get::<_, String>(0).replacen(" ON ONLY ", " ON ", 1),
            &mut post,
        );
    }
    for row in client
        .query(
            "SELECT pg_catalog.format('ALTER SEQUENCE %I.%I OWNED BY %I.%I.%I', sn.nspname, \
                        s.relname, n.nspname, c.relname, a.attname) \
             FROM pg_catalog.pg_depend d \
             JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
             JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace \
             JOIN pg_catalog.pg_class c ON c.oid = d.refobjid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid \
             WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.deptype = 'a' \
               AND d.refobjid = ANY($1) \
             UNION ALL \
             SELECT pg_catalog.format('ALTER TABLE %I.%I OWNER TO %I', n.nspname, c.relname, \
                        pg_catalog.pg_get_userbyid(c.relowner)) \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = ANY($1)",
            &[&all],
        )
        .await?
    {
        post.push(row.get(0));
    }
    Ok((pre, post))
}

/// `name type [COLLATE c] [identity | generated] [NOT NULL] [DEFAULT e]` for each column.
async fn column_definitions(
    client: &Client,
    oid: u32,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT pg_catalog.format('%I', a.attname), \
                    pg_catalog.format_type(a.atttypid, a.atttypmod), \
                    CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0 THEN \
                         (SELECT pg_catalog.format('%I.%I', cn.nspname, co.collname) \
                          FROM pg_catalog.pg_collation co \
                          JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace \
                          WHERE co.oid = a.attcollation) END, \
                    a.attnotnull, a.attidentity::text, a.attgenerated::text, \
                    pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), \
                    (SELECT pg_catalog.format(' (SEQUENCE NAME %I.%I INCREMENT BY %s MINVALUE %s \
                                  MAXVALUE %s START WITH %s CACHE %s%s)', sn.nspname, sc.relname, \
                                  s.seqincrement, s.seqmin, s.seqmax, s.seqstart, s.seqcache, \
                                  CASE WHEN s.seqcycle THEN ' CYCLE' ELSE '' END) \
                     FROM pg_catalog.pg_depend d \
                     JOIN pg_catalog.pg_sequence s ON s.seqrelid = d.objid \
                     JOIN pg_catalog.pg_class sc ON sc.oid = s.seqrelid \
                     JOIN pg_catalog.pg_namespace sn ON sn.oid = sc.relnamespace \
                     WHERE d.refobjid = a.attrelid AND d.refobjsubid = a.attnum AND d.deptype = 'i' \
                       AND d.classid = 'pg_catalog.pg_class'::regclass) \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut def = format!("{} {}", r.get::<_, String>(0), r.get::<_, String>(1));
            if let Some(collation) = r.get::<_, Option<String>>(2) {
                def.push_str(&format!(" COLLATE {collation}"));
            }
            let identity: String = r.get(4);
            let generated: String = r.get(5);
            let default: Option<String> = r.get(6);
            match identity.as_str() {
                "a" | "d" => {
                    def.push_str(if identity == "a" {
                        " GENERATED ALWAYS AS IDENTITY"
                    } else {
                        " GENERATED BY DEFAULT AS IDENTITY"
                    });
                    def.push_str(&r.get::<_, Option<String>>(7).unwrap_or_default());
                }
                _ if generated == "s" => {
                    def.push_str(&format!(
                        " GENERATED ALWAYS AS ({}) STORED",
                        default.clone().unwrap_or_default()
                    ));
                }
                _ => {}
            }
            if r.get::<_, bool>(3) {
                def.push_str(" NOT NULL");
            }
            if let (Some(default), "", "") = (default, identity.as_str(), generated.as_str()) {
                def.push_str(&format!(" DEFAULT {default}"));
            }
            def
        })
        .collect())
}

/// The current value of every sequence of `tables` (owned, identity, or named in a default).
pub async fn sequences(
    client: &Client,
    tables: &[CopiedTable],
) -> Result<Vec<crate::replication::peer::SequenceValue>, tokio_postgres::Error> {
    let roots: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let names: Vec<String> = client
        .query(
            "SELECT DISTINCT pg_catalog.format('%I.%I', n.nspname, c.relname) \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'S' AND c.oid IN ( \
                 SELECT objid FROM pg_catalog.pg_depend \
                 WHERE classid = 'pg_catalog.pg_class'::regclass \
                   AND refclassid = 'pg_catalog.pg_class'::regclass \
                   AND deptype IN ('a', 'i') \
                   AND refobjid IN (SELECT r.oid FROM unnest($1::oid[]) r(oid) UNION \
                                    SELECT relid FROM unnest($1::oid[]) r(oid), \
                                    LATERAL pg_catalog.pg_partition_tree(r.oid)) \
                 UNION \
                 SELECT d.refobjid FROM pg_catalog.pg_depend d \
                 JOIN pg_catalog.pg_attrdef ad ON ad.oid = d.objid \
                 WHERE d.classid = 'pg_catalog.pg_attrdef'::regclass \
                   AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                   AND ad.adrelid IN (SELECT r.oid FROM unnest($1::oid[]) r(oid) UNION \
                                      SELECT relid FROM unnest($1::oid[]) r(oid), \
                                      LATERAL pg_catalog.pg_partition_tree(r.oid))) \
             ORDER BY 1",
            &[&roots],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = Vec::new();
    for name in names {
        let row = client
            .query_one(&format!("SELECT last_value, is_called FROM {name}"), &[])
            .await?;
        out.push(crate::replication::peer::SequenceValue {
            name,
            last_value: row.get(0),
            is_called: row.get(1),
        });
    }
    Ok(out)
}
