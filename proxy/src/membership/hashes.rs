//! Hashes of a table's rows, computed the same way on every node so that `pgmm check` can
//! compare them: each row's key and values as the text of a row constructor (columns in name
//! order, so the physical column order, which a schema change can make differ, does not
//! matter), rendered under fixed settings (UTC, ISO dates, exact floats, hex bytea), and
//! hashed with md5. A row falls into the bucket given by the first 32 bits of its key's hash;
//! a bucket's hash is the count and the sum of its rows' 60-bit hashes, which does not depend
//! on the order rows are read in.

use tokio_postgres::Client;

use super::MembershipError;
use crate::config::table::TableName;
use crate::config::Config;
use crate::pg::quote::qualified;
use crate::replication::peer::{BucketHash, RowHash};

/// A session with the settings every node renders values under.
pub async fn session(config: &Config) -> Result<Client, MembershipError> {
    let client = crate::pg::connect(&config.postgres).await?;
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
             SET extra_float_digits = 3; SET bytea_output = 'hex'; \
             SET search_path = pg_catalog",
        )
        .await?;
    Ok(client)
}

/// `FROM`, key text, row text and bucket expressions for `table`.
fn exprs(
    table: &str,
    columns: &[String],
    key: &[String],
    buckets: u32,
) -> Result<(String, String, String, String), MembershipError> {
    let name = TableName::parse(table)
        .ok_or_else(|| MembershipError::Protocol(format!("bad table name {table:?}")))?;
    let ident = |c: &String| format!("t.{}", postgres_protocol::escape::escape_identifier(c));
    let from = format!("{} t", qualified(&name.schema, &name.name));
    let key_text = format!(
        "ROW({}, NULL)::text",
        key.iter().map(ident).collect::<Vec<_>>().join(", ")
    );
    let row_text = format!(
        "ROW({}, NULL)::text",
        columns.iter().map(ident).collect::<Vec<_>>().join(", ")
    );
    let bucket = format!(
        "((('x' || '00000000' || substr(md5({key_text}), 1, 8))::bit(64)::bigint) % {buckets})"
    );
    Ok((from, key_text, row_text, bucket))
}

/// Count and hash sum of every non-empty bucket.
pub async fn buckets(
    client: &Client,
    table: &str,
    columns: &[String],
    key: &[String],
    buckets: u32,
) -> Result<Vec<BucketHash>, MembershipError> {
    let (from, _, row_text, bucket) = exprs(table, columns, key, buckets)?;
    let rows = client
        .query(
            &format!(
                "SELECT b::int, count(*), sum(h)::text FROM ( \
                     SELECT {bucket} AS b, \
                            ('x' || '0' || substr(md5({row_text}), 1, 15))::bit(64)::bigint AS h \
                     FROM {from}) s \
                 GROUP BY b ORDER BY b"
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| BucketHash {
            bucket: r.get::<_, i32>(0) as u32,
            rows: r.get(1),
            hash: r.get(2),
        })
        .collect())
}

/// Every row of the buckets `which`: key text, row hash, and version (the conflict column's
/// value and the node whose write it is).
pub async fn rows(
    client: &Client,
    config: &Config,
    table: &str,
    columns: &[String],
    key: &[String],
    buckets: u32,
    which: &[u32],
) -> Result<Vec<RowHash>, MembershipError> {
    let (from, key_text, row_text, bucket) = exprs(table, columns, key, buckets)?;
    let which: Vec<i64> = which.iter().map(|&b| i64::from(b)).collect();
    let conflict =
        postgres_protocol::escape::escape_identifier(&config.replication.conflict_column);
    let has_conflict_column = columns.contains(&config.replication.conflict_column);
    let version = if has_conflict_column {
        format!("coalesce(t.{conflict}::text, 'null')")
    } else {
        "'-'".to_owned()
    };
    let rows = client
        .query(
            &format!(
                "SELECT {key_text}, md5({row_text}), {version} || ' by ' || coalesce( \
                     (SELECT substr(o.roname, 6) FROM pg_catalog.pg_replication_origin o \
                      WHERE o.roident = (pg_catalog.pg_xact_commit_timestamp_origin(t.xmin)).roident \
                        AND o.roname LIKE 'pgmm\\_%'), $2) \
                 FROM {from} WHERE {bucket} = ANY($1) ORDER BY 1"
            ),
            &[&which, &config.node.name],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| RowHash {
            key: r.get(0),
            hash: r.get(1),
            version: r.get(2),
        })
        .collect())
}
