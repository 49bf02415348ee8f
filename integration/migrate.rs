//! The pgmm schema migrations and table enrolment against a real PostgreSQL: the runner through
//! the library and through `pgmm migrate`, and publication `pgmm` following `[replication]
//! tables`. Every test starts its own cluster.

use crate::harness;

use std::collections::BTreeSet;
use std::future::Future;
use std::process::Command;
use std::time::Duration;

use harness::{run_command, PgCluster};
use pgmm::testing::enrol::{self, EnrolError};
use pgmm::testing::migrate::{self, MigrateError, LATEST, MIGRATIONS};
use pgmm::testing::ReplicationConfig;
use pgmm::testing::SqlState;
use pgmm::testing::TableName;
use tokio_postgres::{Client, NoTls};

const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// Awaits `fut`, failing the test instead of hanging it if Postgres stops answering.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after 60s: {what}"))
}

async fn connect(pg: &PgCluster) -> Client {
    let url = pg.url("postgres", "postgres");
    let (client, conn) = within("connect", tokio_postgres::connect(&url, NoTls))
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

async fn strings(client: &Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn replication(patterns: &[&str]) -> ReplicationConfig {
    ReplicationConfig {
        tables: patterns.iter().map(|p| p.to_string()).collect(),
        conflict_column: "updated_at".into(),
        ..ReplicationConfig::default()
    }
}

/// `schema.table` of every table publication `pgmm` publishes, as Postgres reports it.
async fn published(client: &Client) -> BTreeSet<String> {
    strings(
        client,
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'pgmm'",
    )
    .await
    .into_iter()
    .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn t(schema: &str, name: &str) -> TableName {
    TableName::new(schema, name)
}

#[tokio::test]
async fn migrate_creates_the_schema_once() {
    let pg = PgCluster::start();
    let mut client = connect(&pg).await;

    let report = within("migrate", migrate::migrate(&mut client))
        .await
        .expect("first migrate");
    let all: Vec<(i32, &str)> = MIGRATIONS.iter().map(|m| (m.version, m.name)).collect();
    assert_eq!(report.applied, all);
    assert_eq!(report.current, LATEST);

    let tables = strings(
        &client,
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'pgmm' ORDER BY 1",
    )
    .await;
    assert_eq!(
        tables,
        [
            "applied",
            "conflicts",
            "join_state",
            "schema_version",
            "tombstones"
        ]
    );
    let conflict_columns = strings(
        &client,
        "SELECT attname || ' ' || format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = 'pgmm.conflicts'::regclass AND attnum > 0 ORDER BY attnum",
    )
    .await;
    assert_eq!(
        conflict_columns,
        [
            "id bigint",
            "detected_at timestamp with time zone",
            "table_name text",
            "kind text",
            "origin text",
            "local_tuple jsonb",
            "remote_tuple jsonb",
            "resolution text",
        ]
    );
    let recorded = strings(
        &client,
        "SELECT version || ' ' || name FROM pgmm.schema_version ORDER BY version",
    )
    .await;
    let expected: Vec<String> = MIGRATIONS
        .iter()
        .map(|m| format!("{} {}", m.version, m.name))
        .collect();
    assert_eq!(recorded, expected);
    // The tables are usable as the apply side will use them.
    client
        .batch_execute(
            "INSERT INTO pgmm.conflicts (table_name, kind, origin, local_tuple, resolution) \
             VALUES ('public.t', 'update_missing', 'b', '{\"id\": 1}', 'skipped'); \
             INSERT INTO pgmm.tombstones VALUES ('public.t', '{\"id\": 1}', now(), 'b')",
        )
        .await
        .expect("use the new tables");

    let again = within("migrate again", migrate::migrate(&mut client))
        .await
        .expect("second migrate");
    assert!(again.applied.is_empty(), "{again:?}");
    assert_eq!(again.current, LATEST);
    assert_eq!(
        strings(&client, "SELECT count(*)::text FROM pgmm.schema_version").await,
        [MIGRATIONS.len().to_string()]
    );
}

#[tokio::test]
async fn concurrent_runners_apply_each_migration_once() {
    let pg = PgCluster::start();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(&pg).await);
    }
    let runs = clients.iter_mut().map(migrate::migrate);
    let reports = within("concurrent migrate", futures_util::future::join_all(runs)).await;
    let mut applied = Vec::new();
    for report in reports {
        let report = report.expect("every runner succeeds");
        assert_eq!(report.current, LATEST);
        applied.extend(report.applied);
    }
    applied.sort();
    let all: Vec<(i32, &str)> = MIGRATIONS.iter().map(|m| (m.version, m.name)).collect();
    assert_eq!(applied, all, "each migration applied by exactly one runner");
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let pg = PgCluster::start();
    let mut client = connect(&pg).await;
    migrate::migrate(&mut client).await.expect("migrate");
    client
        .batch_execute("INSERT INTO pgmm.schema_version (version, name) VALUES (999, 'future')")
        .await
        .expect("insert a future version");
    let err = migrate::migrate(&mut client)
        .await
        .expect_err("a schema newer than the binary must be refused");
    assert!(
        matches!(err, MigrateError::NewerSchema { found: 999, known } if known == LATEST),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("999") && text.contains(&format!("version {LATEST}")),
        "{text}"
    );
    assert_eq!(err.sqlstate(), "55000");
}

fn write_config(dir: &std::path::Path, url: &str) -> std::path::PathBuf {
    let path = dir.join("pgmm.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\nname = \"a\"\n[cluster]\nname = \"test\"\nnodes = [\"a\", \"b\"]\n\
             [client]\nlisten = \"127.0.0.1:0\"\n[postgres]\nurl = \"{url}\"\n"
        ),
    )
    .expect("write config");
    path
}

fn pgmm_migrate(config: &std::path::Path) -> (bool, String, String) {
    let out = run_command(
        Command::new(env!("CARGO_BIN_EXE_pgmm"))
            .arg("migrate")
            .arg("--config")
            .arg(config),
        None,
        CMD_TIMEOUT,
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn pgmm_migrate_command() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &pg.url("postgres", "postgres"));

    let (ok, stdout, stderr) = pgmm_migrate(&config);
    assert!(ok, "pgmm migrate failed:\n{stdout}\n{stderr}");
    for m in MIGRATIONS {
        let line = format!("applied migration {:04}_{}", m.version, m.name);
        assert!(stdout.contains(&line), "missing {line:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains(&format!("now at version {LATEST}")),
        "{stdout}"
    );
    assert_eq!(
        pg.psql("SELECT max(version) FROM pgmm.schema_version"),
        LATEST.to_string()
    );

    let (ok, stdout, stderr) = pgmm_migrate(&config);
    assert!(ok, "second pgmm migrate failed:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("applied migration"), "{stdout}");
    assert!(stdout.contains("nothing to apply"), "{stdout}");

    pg.psql("INSERT INTO pgmm.schema_version (version, name) VALUES (999, 'future')");
    let (ok, stdout, stderr) = pgmm_migrate(&config);
    assert!(!ok, "a newer schema must fail:\n{stdout}\n{stderr}");
    assert!(stderr.contains("999"), "{stderr}");

    // Nothing listens on this port any more once the cluster is dropped.
    let port = pg.port();
    drop(pg);
    let gone = write_config(
        dir.path(),
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    );
    let (ok, stdout, stderr) = pgmm_migrate(&gone);
    assert!(
        !ok,
        "an unreachable database must fail:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("cannot connect to PostgreSQL at 127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[tokio::test]
async fn enrolment_follows_the_patterns() {
    let pg = PgCluster::start();
    let mut client = connect(&pg).await;
    migrate::migrate(&mut client).await.expect("migrate");
    let public = replication(&["public.*"]);

    client
        .batch_execute(
            "CREATE TABLE public.good (id int PRIMARY KEY, v text, \
                 updated_at timestamptz NOT NULL DEFAULT now()); \
             CREATE SCHEMA other; \
             CREATE TABLE other.elsewhere (id int PRIMARY KEY, updated_at timestamptz); \
             CREATE UNLOGGED TABLE public.scratch (id int);",
        )
        .await
        .expect("create tables");

    let tables = enrol::enrolled_tables(&client, &public)
        .await
        .expect("enrol");
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert_eq!(tables[0].name, t("public", "good"));
    assert_eq!(tables[0].key_columns, ["id"]);
    let columns: Vec<(&str, &str)> = tables[0]
        .columns
        .iter()
        .map(|(n, ty)| (n.as_str(), ty.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("id", "integer"),
            ("v", "text"),
            ("updated_at", "timestamp with time zone")
        ]
    );
    let oid: u32 = client
        .query_one("SELECT 'public.good'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables[0].oid, oid);

    let change = enrol::sync_publication(&mut client, &tables)
        .await
        .expect("create the publication");
    assert!(change.created);
    assert_eq!(change.added, [t("public", "good")]);
    assert_eq!(published(&client).await, set(&["public.good"]));
    let unchanged = enrol::sync_publication(&mut client, &tables)
        .await
        .expect("sync again");
    assert!(unchanged.is_empty(), "{unchanged:?}");

    // A matching table created later is added by the next check.
    client
        .batch_execute(
            "CREATE TABLE public.\"Later Table\" (a int, b text, \
                 updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (b, a))",
        )
        .await
        .unwrap();
    let (tables, change) = enrol::enrol(&mut client, &public)
        .await
        .expect("enrol with the new table");
    assert_eq!(
        tables
            .iter()
            .find(|t| t.name.name == "Later Table")
            .map(|t| &t.key_columns),
        Some(&vec!["b".to_string(), "a".to_string()])
    );
    assert!(!change.created);
    assert_eq!(change.added, [t("public", "Later Table")]);
    assert!(change.removed.is_empty());
    assert_eq!(
        published(&client).await,
        set(&["public.good", "public.Later Table"])
    );

    // A renamed table stays enrolled; narrowing the patterns removes the others.
    client
        .batch_execute("ALTER TABLE public.good RENAME TO renamed")
        .await
        .unwrap();
    let (_, change) = enrol::enrol(&mut client, &replication(&["public.renamed"]))
        .await
        .expect("narrow the patterns");
    assert!(change.added.is_empty(), "{change:?}");
    assert_eq!(change.removed, [t("public", "Later Table")]);
    assert_eq!(published(&client).await, set(&["public.renamed"]));

    // Every schema but pgmm's own: pgmm.* is never enrolled, and is dropped if put there by hand.
    client
        .batch_execute("ALTER PUBLICATION pgmm ADD TABLE pgmm.conflicts")
        .await
        .unwrap();
    let (tables, change) = enrol::enrol(&mut client, &replication(&["*.*"]))
        .await
        .expect("enrol everything");
    let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    assert_eq!(
        names,
        ["other.elsewhere", "public.Later Table", "public.renamed"]
    );
    assert_eq!(change.removed, [t("pgmm", "conflicts")]);
    assert_eq!(
        published(&client).await,
        set(&["other.elsewhere", "public.Later Table", "public.renamed"])
    );
    let pgmm_published = strings(
        &client,
        "SELECT tablename::text FROM pg_publication_tables \
         WHERE pubname = 'pgmm' AND schemaname = 'pgmm'",
    )
    .await;
    assert!(pgmm_published.is_empty(), "{pgmm_published:?}");
}

#[tokio::test]
async fn enrolment_refuses_tables_it_cannot_replicate() {
    let pg = PgCluster::start();
    let mut client = connect(&pg).await;
    migrate::migrate(&mut client).await.expect("migrate");
    let public = replication(&["public.*"]);

    client
        .batch_execute("CREATE TABLE public.nopk (id int, updated_at timestamptz)")
        .await
        .unwrap();
    let err = enrol::enrolled_tables(&client, &public)
        .await
        .expect_err("no primary key");
    assert!(
        matches!(&err, EnrolError::NoPrimaryKey { table } if *table == t("public", "nopk")),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("public.nopk") && text.contains("ADD PRIMARY KEY"),
        "{text}"
    );
    client
        .batch_execute("DROP TABLE public.nopk")
        .await
        .unwrap();

    client
        .batch_execute("CREATE TABLE public.nocol (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let err = enrol::enrolled_tables(&client, &public)
        .await
        .expect_err("no conflict column");
    assert!(
        matches!(&err, EnrolError::MissingConflictColumn { table, column }
            if *table == t("public", "nocol") && column == "updated_at"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(
            "ALTER TABLE public.nocol ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now()"
        ),
        "{text}"
    );
    // The suggested fix works.
    client
        .batch_execute(
            "ALTER TABLE public.nocol ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now()",
        )
        .await
        .unwrap();
    let tables = enrol::enrolled_tables(&client, &public)
        .await
        .expect("fixed");
    assert_eq!(tables.len(), 1);

    client
        .batch_execute("CREATE TABLE public.naive (id int PRIMARY KEY, updated_at timestamp)")
        .await
        .unwrap();
    let err = enrol::enrolled_tables(&client, &public)
        .await
        .expect_err("timestamp without time zone");
    assert!(
        matches!(&err, EnrolError::WrongConflictColumnType { table, found, .. }
            if *table == t("public", "naive") && found == "timestamp without time zone"),
        "{err:?}"
    );
    assert!(err.to_string().contains("must be timestamptz"), "{err}");
    // Excluding the table is the other way out.
    let tables = enrol::enrolled_tables(&client, &replication(&["public.nocol"]))
        .await
        .expect("excluded");
    assert_eq!(tables.len(), 1);
}

#[tokio::test]
async fn partitioned_tables_are_published_through_their_root() {
    let pg = PgCluster::start();
    let mut client = connect(&pg).await;
    migrate::migrate(&mut client).await.expect("migrate");
    client
        .batch_execute(
            "CREATE TABLE public.parted (id int, updated_at timestamptz NOT NULL, \
                 PRIMARY KEY (id)) PARTITION BY RANGE (id); \
             CREATE TABLE public.parted_low PARTITION OF public.parted FOR VALUES FROM (0) TO (100); \
             CREATE TABLE public.parted_high PARTITION OF public.parted FOR VALUES FROM (100) TO (200);",
        )
        .await
        .unwrap();
    let (tables, change) = enrol::enrol(&mut client, &replication(&["public.*"]))
        .await
        .expect("enrol");
    let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    assert_eq!(names, ["public.parted"]);
    assert_eq!(change.added, [t("public", "parted")]);
    // pgoutput publishes partition changes under the leaf names by default.
    assert_eq!(
        published(&client).await,
        set(&["public.parted_high", "public.parted_low"])
    );
    let again = enrol::enrol(&mut client, &replication(&["public.*"]))
        .await
        .expect("enrol again");
    assert!(again.1.is_empty(), "{:?}", again.1);
}

#[tokio::test]
async fn no_tables_gives_an_empty_publication() {
    let pg = PgCluster::start();
    let mut client = connect(&pg).await;
    migrate::migrate(&mut client).await.expect("migrate");
    let (tables, change) = enrol::enrol(&mut client, &replication(&["public.*"]))
        .await
        .expect("enrol");
    assert!(tables.is_empty());
    assert!(change.created && change.added.is_empty());
    assert_eq!(
        strings(&client, "SELECT pubname::text FROM pg_publication").await,
        ["pgmm"]
    );
    assert!(published(&client).await.is_empty());

    client
        .batch_execute("DROP PUBLICATION pgmm; CREATE PUBLICATION pgmm FOR ALL TABLES")
        .await
        .unwrap();
    let err = enrol::enrol(&mut client, &replication(&["public.*"]))
        .await
        .expect_err("FOR ALL TABLES would publish schema pgmm");
    assert!(
        matches!(err, EnrolError::PublicationForAllTables),
        "{err:?}"
    );
}
