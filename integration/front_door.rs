//! End-to-end tests of pgmm's front door: a real PostgreSQL cluster behind a real `pgmm serve`, driven by
//! psql, pgbench, tokio-postgres and raw sockets. Every test starts its own cluster and pgmm.

use crate::harness;

use std::future::Future;
use std::net::Shutdown;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastrand::Rng;
use futures_util::{SinkExt, StreamExt};
use harness::{
    run_command, run_ok, wait_until, wire, PeerOptions, PgCluster, Pgmm, PgmmOptions, MD5_USER,
    SCRAM_USER,
};
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

const OWNED_BY_B: &str =
    r#"table "public.owned_by_b" is owned by node "b"; write it through node "b""#;
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// Awaits `fut`, failing the test instead of hanging it if pgmm or Postgres stops answering.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after 30s: {what}"))
}

/// A tokio-postgres session (no TLS) whose connection is driven by a spawned task.
async fn connect(conninfo: &str) -> Client {
    let (client, conn) = within("connect", tokio_postgres::connect(conninfo, NoTls))
        .await
        .unwrap_or_else(|e| panic!("connect {conninfo}: {e}"));
    tokio::spawn(conn);
    client
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

/// Asserts that `result` is pgmm's ownership refusal for `public.owned_by_b`.
fn assert_refused<T: std::fmt::Debug>(what: &str, result: Result<T, tokio_postgres::Error>) {
    let err = result.expect_err(&format!(
        "{what}: expected the ownership refusal, got success"
    ));
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{what}: expected an ErrorResponse, got {err:?}"));
    assert_eq!(db.code().code(), "42501", "{what}: {db:?}");
    assert_eq!(db.message(), OWNED_BY_B, "{what}");
}

/// First column of the first row of a simple-protocol result.
fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_owned)),
        _ => None,
    })?
}

async fn select_one(client: &Client) {
    let v: i32 = within("select 1", client.query_one("select 1", &[]))
        .await
        .expect("select 1 on a session that must still be usable")
        .get(0);
    assert_eq!(v, 1);
}

/// Waits until a metric series reaches `expected`, failing with the value seen last.
fn wait_metric(pgmm: &Pgmm, series: &str, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = pgmm.metric_value(series);
        if seen == Some(expected) {
            return;
        }
        if Instant::now() > deadline {
            panic!("metric {series}: expected {expected}, saw {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(pg: &PgCluster) -> Pgmm {
    Pgmm::start(pg, PgmmOptions::default())
}

fn owning_b(pg: &PgCluster) -> Pgmm {
    Pgmm::start(
        pg,
        PgmmOptions {
            ownership: vec![("public.owned_by_b".into(), "b".into())],
            ..PgmmOptions::default()
        },
    )
}

/// The harness itself: roles with the right password hashes, the settings later issues rely on.
#[test]
fn harness_cluster_is_configured() {
    let pg = PgCluster::start();
    assert_eq!(pg.psql("show wal_level"), "logical");
    assert_eq!(pg.psql("show track_commit_timestamp"), "on");
    assert_eq!(pg.psql("show max_connections"), "300");
    let hash = |role: &str| {
        pg.psql(&format!(
            "select rolpassword from pg_authid where rolname = '{role}'"
        ))
    };
    assert!(hash(SCRAM_USER.0).starts_with("SCRAM-SHA-256$"));
    assert!(hash(MD5_USER.0).starts_with("md5"));
}

#[test]
fn psql_queries_and_scripts() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);

    let out = run_ok(
        pgmm.psql_command().args(["-c", "select 1"]),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.trim(), "1");

    // Several statements in one simple Query message.
    let out = run_ok(
        pgmm.psql_command().args([
            "-c",
            "create table m (i int); insert into m values (1), (2); select sum(i) from m",
        ]),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.trim().lines().last(), Some("3"), "{out}");

    let script = "\
create table s (id int primary key, v text);
begin;
insert into s values (1, 'a'), (2, 'b');
commit;
begin;
insert into s values (3, 'c');
rollback;
update s set v = 'B' where id = 2;
select string_agg(id || '=' || v, ',' order by id) from s;
\\echo done
";
    let out = run_ok(
        pgmm.psql_command().args(["-f", "-"]),
        Some(script.as_bytes()),
        CMD_TIMEOUT,
    );
    assert_eq!(out.trim().lines().collect::<Vec<_>>(), ["1=a,2=B", "done"]);
    assert_eq!(pg.psql("select count(*) from s"), "2");
    assert_eq!(pg.psql("select count(*) from m"), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_statements_and_transactions() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);
    let mut client = connect(&pgmm.conninfo("postgres", "postgres")).await;

    client
        .batch_execute("create table kv (k int primary key, v text)")
        .await
        .unwrap();
    let insert = client
        .prepare("insert into kv values ($1, $2)")
        .await
        .unwrap();
    for k in 0..10i32 {
        let n = client
            .execute(&insert, &[&k, &format!("v{k}")])
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    let lookup = client
        .prepare("select v from kv where k = $1")
        .await
        .unwrap();
    let v: String = client.query_one(&lookup, &[&3i32]).await.unwrap().get(0);
    assert_eq!(v, "v3");

    let row = client
        .query_one(
            "select $1::int8 + $2::int8, $3::text || '!', not $4::bool, $5::float8 * 2, $6::bytea",
            &[&40i64, &2i64, &"hi", &true, &1.25f64, &vec![0u8, 1, 255]],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hi!");
    assert!(!row.get::<_, bool>(2));
    assert_eq!(row.get::<_, f64>(3), 2.5);
    assert_eq!(row.get::<_, Vec<u8>>(4), vec![0u8, 1, 255]);

    let tx = client.transaction().await.unwrap();
    tx.execute(&insert, &[&100i32, &"committed"]).await.unwrap();
    // A portal read in batches: Execute with a row limit and PortalSuspended.
    let portal = tx.bind("select k from kv order by k", &[]).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 4).await.unwrap();
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
    }
    assert_eq!(seen.len(), 11);
    tx.commit().await.unwrap();

    let mut tx = client.transaction().await.unwrap();
    tx.execute(&insert, &[&200i32, &"rolled back"])
        .await
        .unwrap();
    let sp = tx.savepoint("sp").await.unwrap();
    sp.execute(&insert, &[&201i32, &"savepoint"]).await.unwrap();
    sp.rollback().await.unwrap();
    tx.rollback().await.unwrap();

    let tx = client.transaction().await.unwrap();
    tx.execute(&insert, &[&300i32, &"outer"]).await.unwrap();
    tx.commit().await.unwrap();

    let keys: Vec<i32> = client
        .query("select k from kv where k >= 100 order by k", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, [100, 300]);
    assert_eq!(pg.psql("select count(*) from kv"), "12");
    // The statements prepared before the transactions are still valid on the same backend.
    let v: String = client.query_one(&lookup, &[&300i32]).await.unwrap().get(0);
    assert_eq!(v, "outer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);
    let client = connect(&pgmm.conninfo("postgres", "postgres")).await;
    client
        .batch_execute("create table c (id int primary key, t text)")
        .await
        .unwrap();

    let data: String = (0..10_000)
        .map(|i| format!("{i}\trow {i} \\\\ tab\\there\n"))
        .collect();
    let sink = within("copy_in", client.copy_in("copy c from stdin"))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    // Chunks that do not line up with rows, as a real client's buffers would not.
    for chunk in data.as_bytes().chunks(7_777) {
        within("copy data", sink.send(Bytes::copy_from_slice(chunk)))
            .await
            .unwrap();
    }
    let copied = within("copy done", sink.finish()).await.unwrap();
    assert_eq!(copied, 10_000);
    assert_eq!(
        pg.psql("select count(*), sum(id), count(*) filter (where t like '%\\\\%') from c"),
        "10000|49995000|10000"
    );

    let stream = within(
        "copy_out",
        client.copy_out("copy (select id, t from c order by id) to stdout"),
    )
    .await
    .unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = within("copy out data", stream.next()).await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(out.len(), data.len());
    assert!(
        out == data.as_bytes(),
        "COPY TO STDOUT differs from what was copied in"
    );

    // psql's \copy (COPY ... FROM STDIN / TO STDOUT driven by libpq).
    let csv: String = (0..500).map(|i| format!("{i},\"csv, {i}\"\n")).collect();
    run_ok(
        pgmm.psql_command().args([
            "-c",
            "create table c2 (id int, t text)",
            "-c",
            "\\copy c2 from stdin with (format csv)",
        ]),
        Some(csv.as_bytes()),
        CMD_TIMEOUT,
    );
    let back = run_ok(
        pgmm.psql_command().args([
            "-c",
            "\\copy (select * from c2 order by id) to stdout with (format csv)",
        ]),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(back, csv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_reaches_an_idle_client() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);
    let conninfo = pgmm.conninfo("postgres", "postgres");

    let (listener, mut conn) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                if tx.send(n).is_err() {
                    break;
                }
            }
        }
    });
    listener.batch_execute("listen pgmm_chan").await.unwrap();

    let notifier = connect(&conninfo).await;
    let notifier_pid: i32 = notifier
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    notifier
        .batch_execute("notify pgmm_chan, 'hello'")
        .await
        .unwrap();
    // The listener sends nothing: pgmm must relay the asynchronous NotificationResponse on its own.
    let n = within("notification", rx.recv())
        .await
        .expect("listener gone");
    assert_eq!((n.channel(), n.payload()), ("pgmm_chan", "hello"));
    assert_eq!(n.process_id(), notifier_pid);

    // Notifications sent in a transaction arrive at commit, in order.
    notifier
        .batch_execute(
            "begin; select pg_notify('pgmm_chan', 'one'); select pg_notify('pgmm_chan', 'two'); commit",
        )
        .await
        .unwrap();
    let one = within("notification one", rx.recv()).await.unwrap();
    let two = within("notification two", rx.recv()).await.unwrap();
    assert_eq!((one.payload(), two.payload()), ("one", "two"));
    select_one(&listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_pg_sleep() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);
    let client = connect(&pgmm.conninfo("postgres", "postgres")).await;
    let direct = connect(&pg.conninfo("postgres", "postgres")).await;
    let backend_pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let token = client.cancel_token();

    let started = Instant::now();
    let sleeper = tokio::spawn(async move {
        let result = client.simple_query("select pg_sleep(30)").await;
        (client, result)
    });
    // A cancel that arrives before the query runs is ignored by Postgres, so wait until it runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: i64 = direct
            .query_one(
                "select count(*) from pg_stat_activity \
                 where pid = $1 and state = 'active' and query like '%pg_sleep(30)%'",
                &[&backend_pid],
            )
            .await
            .unwrap()
            .get(0);
        if running == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "pg_sleep never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The token carries pgmm's address: the CancelRequest goes through pgmm.
    within("cancel", token.cancel_query(NoTls))
        .await
        .expect("send CancelRequest through pgmm");
    let (client, result) = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("pg_sleep(30) was not cancelled within 10s")
        .unwrap();
    let err = result.expect_err("pg_sleep(30) finished instead of being cancelled");
    assert_eq!(sqlstate(&err), Some("57014"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    select_one(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_authentication_is_relayed() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);
    for (user, password) in [SCRAM_USER, MD5_USER] {
        let good = format!("{} password={password}", pgmm.conninfo(user, "postgres"));
        let client = connect(&good).await;
        let who: String = client
            .query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);

        let bad = format!(
            "{} password=not-{password}",
            pgmm.conninfo(user, "postgres")
        );
        let err = within("bad login", tokio_postgres::connect(&bad, NoTls))
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} logged in with a wrong password"));
        assert_eq!(sqlstate(&err), Some("28P01"), "{user}: {err:?}");

        // libpq too.
        let out = run_ok(
            pgmm.psql_command_with(&pgmm.conninfo(user, "postgres"))
                .env("PGPASSWORD", password)
                .args(["-c", "select current_user"]),
            None,
            CMD_TIMEOUT,
        );
        assert_eq!(out.trim(), user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_tables_owned_by_another_node_are_refused() {
    let pg = PgCluster::start();
    pg.psql("create table owned_by_b (id int primary key, v text); create table free_t (id int primary key, v text)");
    let pgmm = owning_b(&pg);
    let mut client = connect(&pgmm.conninfo("postgres", "postgres")).await;
    let mut refusals = 0.0;

    // Simple protocol, each refusal followed by a successful query on the same connection.
    for sql in [
        "insert into owned_by_b values (1, 'x')",
        "INSERT INTO public.owned_by_b (id) VALUES (2)",
        "insert into \"owned_by_b\" values (3)",
        "update owned_by_b set v = 'y'",
        "delete from owned_by_b where id = 1",
        "truncate owned_by_b",
        "merge into owned_by_b t using (select 4 as id) s on t.id = s.id \
         when not matched then insert values (s.id, 'm')",
        "with w as (insert into owned_by_b values (5) returning id) select id from w",
        // One Query message: the whole implicit transaction is refused, including the allowed write.
        "insert into free_t values (50, 'same message'); insert into owned_by_b values (6)",
    ] {
        assert_refused(sql, within(sql, client.simple_query(sql)).await);
        refusals += 1.0;
        let v = first_value(&client.simple_query("select 41 + 1").await.unwrap());
        assert_eq!(v.as_deref(), Some("42"), "after {sql}");
    }

    // Extended protocol: the Parse is refused; the next statement on the connection works.
    assert_refused(
        "extended insert",
        within(
            "extended insert",
            client.execute("insert into owned_by_b values ($1)", &[&1i32]),
        )
        .await,
    );
    refusals += 1.0;
    let v: i32 = client
        .query_one("select $1::int4 + 1", &[&6i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 7);
    assert_refused(
        "prepare update",
        within(
            "prepare update",
            client.prepare("update owned_by_b set v = $1 where id = $2"),
        )
        .await,
    );
    refusals += 1.0;
    assert_refused(
        "copy from",
        within(
            "copy from",
            client.copy_in::<_, Bytes>("copy owned_by_b from stdin"),
        )
        .await
        .map(|_| ()),
    );
    refusals += 1.0;
    select_one(&client).await;

    // Inside a transaction block: the transaction is failed exactly as if Postgres had raised the error,
    // so the allowed write before it is not committed.
    client
        .simple_query("begin; insert into free_t values (60, 'in failed tx')")
        .await
        .unwrap();
    assert_refused(
        "insert in transaction",
        client
            .simple_query("insert into owned_by_b values (10)")
            .await,
    );
    refusals += 1.0;
    let err = client
        .simple_query("select 1")
        .await
        .expect_err("a statement after the refusal must fail like in an aborted transaction");
    assert_eq!(sqlstate(&err), Some("25P02"), "{err:?}");
    // COMMIT of a failed transaction rolls back.
    let tag = client.simple_query("commit").await.unwrap();
    assert!(
        tag.iter()
            .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(_))),
        "{tag:?}"
    );
    select_one(&client).await;

    let tx = client.transaction().await.unwrap();
    tx.execute("insert into free_t values ($1, 'tx')", &[&61i32])
        .await
        .unwrap();
    assert_refused(
        "extended insert in transaction",
        tx.execute("insert into owned_by_b values ($1)", &[&11i32])
            .await,
    );
    refusals += 1.0;
    let err = tx
        .query_one("select 1", &[])
        .await
        .expect_err("statement after the refusal in a transaction");
    assert_eq!(sqlstate(&err), Some("25P02"), "{err:?}");
    tx.rollback().await.unwrap();
    select_one(&client).await;

    // Reads of the owned table and writes to other tables go through.
    let n = first_value(
        &client
            .simple_query("select count(*) from owned_by_b")
            .await
            .unwrap(),
    );
    assert_eq!(n.as_deref(), Some("0"));
    client
        .simple_query("insert into free_t values (1, 'simple')")
        .await
        .unwrap();
    client
        .execute("insert into free_t values ($1, $2)", &[&2i32, &"extended"])
        .await
        .unwrap();
    client
        .execute("update free_t set v = v || '!' where id = $1", &[&2i32])
        .await
        .unwrap();
    client
        .batch_execute("create table made_through_pgmm (i int)")
        .await
        .unwrap();

    assert_eq!(pg.psql("select count(*) from owned_by_b"), "0");
    assert_eq!(
        pg.psql("select string_agg(id || '=' || v, ',' order by id) from free_t"),
        "1=simple,2=extended!"
    );
    wait_metric(
        &pgmm,
        "pgmm_ownership_rejections_total{table=\"public.owned_by_b\"}",
        refusals,
    );
    for kind in ["read", "write", "ddl"] {
        let series = format!("pgmm_client_queries_total{{kind=\"{kind}\"}}");
        let v = pgmm.metric_value(&series).unwrap_or(0.0);
        assert!(v > 0.0, "{series} = {v}");
    }
}

/// Postgres discards everything up to Sync after an error in the extended protocol; a refused Parse in
/// the middle of a pipeline must behave the same, including rolling back the implicit transaction that
/// the earlier messages of the pipeline ran in.
#[test]
fn refused_parse_in_a_pipeline_discards_until_sync() {
    let pg = PgCluster::start();
    pg.psql(
        "create table owned_by_b (id int primary key); create table free_t (id int primary key)",
    );
    let pgmm = owning_b(&pg);
    let mut s = wire::connect(pgmm.client_port());
    wire::send(&mut s, &wire::startup_message("postgres", "postgres"));
    wire::read_until_ready(&mut s);

    let pipeline = [
        wire::parse("", "insert into free_t values (1)"),
        wire::bind("", ""),
        wire::execute(""),
        wire::parse("", "insert into owned_by_b values (1)"),
        wire::bind("", ""),
        wire::execute(""),
        wire::parse("", "select 1"),
        wire::bind("", ""),
        wire::execute(""),
        wire::sync(),
    ]
    .concat();
    wire::send(&mut s, &pipeline);
    let replies = wire::read_until_ready_for_query(&mut s);
    let tags: String = replies.iter().map(|(t, _)| *t as char).collect();
    // ParseComplete, BindComplete, CommandComplete for the first statement; then the error; the rest
    // is discarded up to Sync.
    assert_eq!(tags, "12CEZ", "{replies:?}");
    let fields = wire::error_fields(&replies[3].1);
    assert!(fields.contains(&('C', "42501".into())), "{fields:?}");
    assert!(fields.contains(&('M', OWNED_BY_B.into())), "{fields:?}");
    assert_eq!(replies[4].1, b"I", "transaction status after Sync");
    assert_eq!(
        pg.psql("select count(*) from free_t"),
        "0",
        "the implicit transaction of the failed pipeline must be rolled back"
    );

    // The connection goes on.
    wire::send(
        &mut s,
        &[
            wire::parse("", "select 7"),
            wire::bind("", ""),
            wire::execute(""),
            wire::sync(),
        ]
        .concat(),
    );
    let replies = wire::read_until_ready_for_query(&mut s);
    let tags: String = replies.iter().map(|(t, _)| *t as char).collect();
    assert_eq!(tags, "12DCZ", "{replies:?}");
}

#[test]
fn pgbench_in_every_query_mode() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);
    let port = pgmm.client_port().to_string();
    let pgbench = |args: &[&str]| {
        let mut cmd = Command::new(pg.bin("pgbench"));
        cmd.args(args)
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "postgres"])
            .env_remove("PGPASSWORD");
        run_command(&mut cmd, None, Duration::from_secs(300))
    };
    let init = pgbench(&["-i", "-s", "1"]);
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(&["-M", mode, "-c", "4", "-j", "2", "-t", "200"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "pgbench -M {mode}: {report}");
        let line = |prefix: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(str::trim)
        };
        assert_eq!(
            line("number of transactions actually processed:"),
            Some("800/800"),
            "-M {mode}: {report}"
        );
        // PostgreSQL 15+ reports failures; older pgbench aborts the client instead (exit status).
        if let Some(failed) = line("number of failed transactions:") {
            assert!(failed.starts_with("0 "), "-M {mode}: {report}");
        }
    }
    // Each run starts by truncating pgbench_history.
    assert_eq!(pg.psql("select count(*) from pgbench_history"), "800");
}

/// A CA and a server certificate for localhost/127.0.0.1, as PEM files in `dir`.
fn make_certs(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "pgmm test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = leaf
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

#[test]
fn tls_clients() {
    let pg = PgCluster::start();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(certs.path());
    let tls = Pgmm::start(
        &pg,
        PgmmOptions {
            tls: Some((cert, key)),
            ..PgmmOptions::default()
        },
    );
    let base = tls.conninfo("postgres", "postgres");
    for extra in [
        "sslmode=require".to_string(),
        format!("sslmode=verify-full sslrootcert={}", ca.display()),
    ] {
        let out = run_ok(
            tls.psql_command_with(&format!("{base} {extra}")).args([
                "-c",
                "select 1",
                "-c",
                "\\conninfo",
            ]),
            None,
            CMD_TIMEOUT,
        );
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("1"), "{extra}: {out}");
        assert!(conninfo_says_tls(&out), "{extra}: {out}");
    }
    // Plaintext is still accepted when the client does not ask for TLS.
    let out = run_ok(
        tls.psql_command_with(&format!("{base} sslmode=disable"))
            .args(["-c", "select 1", "-c", "\\conninfo"]),
        None,
        CMD_TIMEOUT,
    );
    assert!(out.starts_with('1') && !conninfo_says_tls(&out), "{out}");

    let plain = start(&pg);
    let base = plain.conninfo("postgres", "postgres");
    let out = run_command(
        plain
            .psql_command_with(&format!("{base} sslmode=require"))
            .args(["-c", "select 1"]),
        None,
        CMD_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "sslmode=require without TLS configured succeeded"
    );
    assert!(stderr.contains("does not support SSL"), "{stderr}");
    let out = run_ok(
        plain
            .psql_command_with(&format!("{base} sslmode=prefer"))
            .args(["-c", "select 1", "-c", "\\conninfo"]),
        None,
        CMD_TIMEOUT,
    );
    assert!(out.starts_with('1') && !conninfo_says_tls(&out), "{out}");
}

/// Whether psql's `\conninfo` (run with `-A -t`) reports TLS: psql 15-17 print a sentence with
/// "SSL connection (protocol: ...)", psql 18 a table with the row "SSL Connection|true".
fn conninfo_says_tls(out: &str) -> bool {
    out.contains("SSL connection (") || out.lines().any(|line| line == "SSL Connection|true")
}

/// Malformed input closes that one connection, with the reason logged and counted, while an existing
/// session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_closes_only_that_connection() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);
    let client = connect(&pgmm.conninfo("postgres", "postgres")).await;
    select_one(&client).await;

    type Attack = fn(&mut std::net::TcpStream);
    let cases: Vec<(&str, &str, Attack)> = vec![
        ("startup length 0", "startup_packet", |s| {
            wire::send(s, &[0, 0, 0, 0])
        }),
        (
            "garbage instead of a startup packet",
            "startup_packet",
            |s| wire::send(s, b"GET / HTTP/1.1\r\nHost: pgmm\r\n\r\n"),
        ),
        (
            "a CancelRequest of the wrong length",
            "startup_packet",
            |s| wire::send(s, &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2e]),
        ),
        ("an unknown protocol version", "startup_packet", |s| {
            let mut packet = wire::startup_message("postgres", "postgres");
            packet[4..8].copy_from_slice(&[0, 7, 0, 0]);
            wire::send(s, &packet)
        }),
        ("a 1 GiB message length", "message_length", |s| {
            wire::send(s, &wire::startup_message("postgres", "postgres"));
            wire::read_until_ready(s);
            wire::send(s, &[b'Q', 0x40, 0, 0, 0]);
        }),
        ("a message length below 4", "message_length", |s| {
            wire::send(s, &wire::startup_message("postgres", "postgres"));
            wire::read_until_ready(s);
            wire::send(s, &[b'Q', 0, 0, 0, 3]);
        }),
        ("a client vanishing mid-message", "unexpected_eof", |s| {
            wire::send(s, &wire::startup_message("postgres", "postgres"));
            wire::read_until_ready(s);
            wire::send(s, &[b'Q', 0, 0, 0, 100]);
            wire::send(s, b"select 1 f");
            let _ = s.shutdown(Shutdown::Write);
        }),
    ];
    let counter =
        |reason: &str| format!("pgmm_client_protocol_errors_total{{reason=\"{reason}\"}}");
    let reasons = ["startup_packet", "message_length", "unexpected_eof", "tls"];
    let total = || -> f64 {
        reasons
            .iter()
            .map(|r| pgmm.metric_value(&counter(r)).unwrap_or(0.0))
            .sum()
    };
    wait_metric(&pgmm, "pgmm_client_connections", 1.0);
    let baseline = total();
    // Connecting and closing without sending a byte is what port probes and health checks do; like
    // Postgres, pgmm must not count it as a protocol error (checked with the totals at the end).
    drop(std::net::TcpStream::connect(("127.0.0.1", pgmm.client_port())).unwrap());
    let case_count = cases.len() as f64;
    for (what, reason, attack) in cases {
        let before = pgmm.metric_value(&counter(reason)).unwrap_or(0.0);
        let mut s = wire::connect(pgmm.client_port());
        attack(&mut s);
        let closed = wire::read_until_closed(&mut s, Duration::from_secs(10));
        assert!(
            closed.messages.iter().all(|(tag, _)| *tag == b'E'),
            "{what}: only an ErrorResponse may precede the close, got {:?}",
            closed.messages
        );
        wait_metric(&pgmm, &counter(reason), before + 1.0);
        wait_until(
            &format!("pgmm to log the reason {reason} ({what})"),
            Duration::from_secs(10),
            || pgmm.log().contains(reason).then_some(()),
        );
        select_one(&client).await;
    }

    // Only the healthy session is left, in pgmm and in Postgres.
    wait_metric(&pgmm, "pgmm_client_connections", 1.0);
    wait_until(
        "backends of the closed connections to exit",
        Duration::from_secs(10),
        || {
            (pg.psql(
                "select count(*) from pg_stat_activity \
                 where backend_type = 'client backend' and pid <> pg_backend_pid()",
            ) == "1")
                .then_some(())
        },
    );
    select_one(&client).await;
    assert_eq!(
        total(),
        baseline + case_count,
        "protocol errors counted besides the malformed inputs (the byte-less connection?)"
    );
}

#[test]
fn gssenc_and_ssl_requests_are_declined_without_tls() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);
    for code in [wire::GSSENC_REQUEST, wire::SSL_REQUEST] {
        let mut s = wire::connect(pgmm.client_port());
        wire::send(&mut s, &wire::special_request(code));
        let mut answer = [0u8; 1];
        std::io::Read::read_exact(&mut s, &mut answer).unwrap();
        assert_eq!(answer[0], b'N', "request code {code}");
        wire::send(&mut s, &wire::startup_message("postgres", "postgres"));
        wire::read_until_ready(&mut s);
        wire::send(&mut s, &wire::query("select 'plain'"));
        let replies = wire::read_until_ready_for_query(&mut s);
        let tags: String = replies.iter().map(|(t, _)| *t as char).collect();
        assert_eq!(tags, "TDCZ");
        wire::send(&mut s, &wire::message(b'X', &[]));
        let closed = wire::read_until_closed(&mut s, Duration::from_secs(10));
        assert!(closed.messages.is_empty(), "{closed:?}");
    }
}

/// Statements that pgmm's SQL parser may not understand still reach Postgres unchanged, and Postgres's
/// own errors come back as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_are_forwarded_unchanged() {
    let pg = PgCluster::start();
    let pgmm = owning_b(&pg);
    let client = connect(&pgmm.conninfo("postgres", "postgres")).await;
    client
        .batch_execute("create table t (i int)")
        .await
        .unwrap();
    for sql in [
        "do $$ begin perform 1; end $$",
        "select 1 operator(pg_catalog.+) 2",
        "comment on table t is 'x'",
        "vacuum (analyze) t",
        "checkpoint",
        "create function f() returns int language sql as $$ select 1 $$",
        "select f()",
        "prepare p(int) as select $1 + 1; execute p(1); deallocate p",
        "declare c cursor with hold for select 1; fetch c; close c",
        "set application_name = 'pgmm-test'; reset application_name",
    ] {
        within(sql, client.simple_query(sql))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let err = client.simple_query("selec 1").await.unwrap_err();
    assert_eq!(sqlstate(&err), Some("42601"), "{err:?}");
    let err = client
        .simple_query("select * from no_such_table")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err), Some("42P01"), "{err:?}");
    select_one(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let pg = PgCluster::start();
    let mut pgmm = start(&pg);
    let conninfo = pgmm.conninfo("postgres", "postgres");
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    select_one(&client).await;

    pgmm.terminate();
    // New connections are no longer accepted (refused, or closed before the session starts).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_postgres::connect(&conninfo, NoTls),
        )
        .await;
        if matches!(attempt, Ok(Err(_))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pgmm still accepts sessions after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The open session may finish its work.
    select_one(&client).await;
    assert!(pgmm.is_running(), "pgmm exited with a session still open");

    drop(client);
    within("connection task", conn).await.unwrap().unwrap();
    let status = pgmm.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_peer_does_not_stop_the_front_door() {
    let pg = PgCluster::start();
    let closed_port = harness::free_port();
    let mut pgmm = Pgmm::start(
        &pg,
        PgmmOptions {
            peer: Some(PeerOptions {
                secret: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
                peers: vec![("b".into(), format!("127.0.0.1:{closed_port}"))],
                peer_toml: String::new(),
            }),
            ..PgmmOptions::default()
        },
    );
    let out = run_ok(
        pgmm.psql_command().args(["-c", "select 1"]),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.trim(), "1");
    let client = connect(&pgmm.conninfo("postgres", "postgres")).await;
    select_one(&client).await;
    assert!(pgmm.is_running());
    assert_eq!(
        harness::http_get(pgmm.metrics_port(), "/healthz").map(|(code, _)| code),
        Some(200)
    );
}

/// `with x as (select 1) select 1+1+...+1` with `n` terms: parsed by sqlparser as a chain as deep
/// as it is long, which used to overflow pgmm's stack (abort) when the tree was dropped.
fn deep_chain(n: usize, from: &str) -> String {
    format!("with x as (select 1) select 1{}{from}", "+1".repeat(n))
}

/// A statement answered by Postgres, with rows or with an ErrorResponse (such as 54001, stack
/// depth limit exceeded): anything but a broken connection.
fn assert_answered<T>(what: &str, result: Result<T, tokio_postgres::Error>) {
    if let Err(e) = result {
        assert!(
            e.as_db_error().is_some(),
            "{what}: no answer from Postgres: {e:?}"
        );
    }
}

fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("pgmm status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Issue 12 item 1: no statement crashes the node. Deep chains (which sqlparser builds by a
/// loop, past its recursion limit) and deep nesting (which it refuses at the limit), by simple
/// Query and by Parse, with and without an owned table's name (which forces the full parse):
/// each is answered by Postgres and pgmm keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_statements_are_answered_and_do_not_crash_the_node() {
    let pg = PgCluster::start();
    pg.psql("create table owned_by_b (id int primary key)");
    let mut pgmm = owning_b(&pg);
    let conninfo = pgmm.conninfo("postgres", "postgres");
    let client = connect(&conninfo).await;
    let nested = |n: usize| {
        format!(
            "with x as (select 1) select {}1{}",
            "(".repeat(n),
            ")".repeat(n)
        )
    };
    let texts = [
        ("deep chain", deep_chain(300_000, "")),
        (
            "deep chain naming an owned table",
            deep_chain(300_000, " from owned_by_b"),
        ),
        ("deep chain, small", deep_chain(20_000, " from owned_by_b")),
        ("nested parentheses", nested(2_000)),
    ];
    for (what, sql) in &texts {
        let started = Instant::now();
        assert_answered(what, within(what, client.simple_query(sql)).await);
        let simple = started.elapsed();
        let started = Instant::now();
        assert_answered(what, within(what, client.prepare(sql)).await);
        eprintln!(
            "{what} ({} bytes): simple {simple:?}, parse {:?}",
            sql.len(),
            started.elapsed()
        );
        select_one(&client).await;
        assert!(pgmm.is_running(), "pgmm died on {what}:\n{}", pgmm.log());
    }
    // The nesting is past the recursion limit, in both protocols.
    assert!(
        pgmm.metric_value(r#"pgmm_client_unparsed_total{reason="depth"}"#) >= Some(2.0),
        "{}",
        pgmm.metrics()
    );
    // Ownership is still enforced at the front door for a deep write within the limits.
    let write = format!("insert into owned_by_b select 1{}", "+1".repeat(20_000));
    assert_refused(
        "deep write",
        within("deep write", client.simple_query(&write)).await,
    );
    let fresh = connect(&conninfo).await;
    select_one(&fresh).await;
    assert!(pgmm.is_running());
}

/// Issue 12 item 2: one statement does not freeze the node. While a 4 MB statement of 2 million
/// select items (past `max_parse_bytes`: forwarded unparsed), then one just under the limit
/// (parsed off the relay threads), is handled in one session, another keeps answering
/// `SELECT 1`, each within 1 s (measured: tens of ms; before the fix the session stalled 7-13 s
/// while pgmm parsed on the thread that relays every session). pgmm's peak RSS stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_statement_does_not_stall_other_sessions() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);
    let conninfo = pgmm.conninfo("postgres", "postgres");
    let big = connect(&conninfo).await;
    let other = connect(&conninfo).await;
    select_one(&other).await;
    let items = |n: usize| format!("with q as (select 1) select 1{}", ",1".repeat(n - 1));
    let huge = items(2_000_000);
    assert!(huge.len() > 4_000_000);
    let under_limit = items(500_000);
    assert!(under_limit.len() < 1 << 20);
    let mut worst_overall = Duration::ZERO;
    for (what, sql, extended) in [
        ("huge, simple", &huge, false),
        ("huge, parse", &huge, true),
        ("under the limit, simple", &under_limit, false),
        ("under the limit, parse", &under_limit, true),
    ] {
        let started = Instant::now();
        let statement = {
            let (big, sql) = (&big, sql.as_str());
            async move {
                if extended {
                    assert_answered(what, big.prepare(sql).await);
                } else {
                    assert_answered(what, big.simple_query(sql).await);
                }
            }
        };
        tokio::pin!(statement);
        let mut worst = Duration::ZERO;
        let mut probes = 0;
        loop {
            tokio::select! {
                () = &mut statement => break,
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    let t = Instant::now();
                    select_one(&other).await;
                    worst = worst.max(t.elapsed());
                    probes += 1;
                }
            }
        }
        eprintln!(
            "{what}: statement took {:?}; other session: {probes} probes, worst {worst:?}; \
             pgmm VmHWM {} kB",
            started.elapsed(),
            vm_hwm_kb(pgmm.pid())
        );
        worst_overall = worst_overall.max(worst);
    }
    let hwm = vm_hwm_kb(pgmm.pid());
    eprintln!("other session's worst SELECT 1: {worst_overall:?}; pgmm VmHWM {hwm} kB");
    assert!(
        worst_overall < Duration::from_secs(1),
        "another session stalled {worst_overall:?}"
    );
    assert!(hwm < 1_500_000, "pgmm peak RSS {hwm} kB");
    assert!(pgmm.metric_value(r#"pgmm_client_unparsed_total{reason="size"}"#) >= Some(2.0));
    select_one(&big).await;
}

/// A StartupMessage for protocol 3.`minor` with one `_pq_.` option Postgres does not know.
fn startup_3x(minor: u16, user: &str, db: &str) -> Vec<u8> {
    let mut packet = wire::startup_message(user, db);
    packet[6..8].copy_from_slice(&minor.to_be_bytes());
    // Before the list's final NUL: one more (name, value) pair.
    packet.pop();
    packet.extend_from_slice(b"_pq_.pgmm_test_option\0on\0\0");
    let len = packet.len() as u32;
    packet[..4].copy_from_slice(&len.to_be_bytes());
    packet
}

/// Protocol minors are negotiated by Postgres, as libpq 18 asks for 3.2 when told to: pgmm
/// relays the startup unchanged and NegotiateProtocolVersion back (3.0 from a server before 18,
/// the unknown option from every server), the session works, and a cancel with the key the
/// server handed out (32 bytes in 3.2 on PostgreSQL 18, 4 in 3.0) reaches it. Then libpq 18's
/// psql with `max_protocol_version=latest`, when PostgreSQL 18 is installed here.
#[test]
fn protocol_minor_versions_are_negotiated_by_postgres() {
    let pg = PgCluster::start();
    let pgmm = start(&pg);
    let server_speaks_3_2 = harness::pg_major() >= 18;
    for minor in [1u16, 2] {
        let mut s = wire::connect(pgmm.client_port());
        wire::send(&mut s, &startup_3x(minor, "postgres", "postgres"));
        let mut negotiated = None;
        let mut key = None;
        loop {
            match wire::read_message(&mut s).expect("read during startup") {
                None => panic!("3.{minor}: connection closed during startup"),
                Some((b'E', body)) => panic!("3.{minor}: refused: {:?}", wire::error_fields(&body)),
                Some((b'v', body)) => {
                    let newest = u32::from_be_bytes(body[..4].try_into().unwrap());
                    let options = String::from_utf8_lossy(&body[8..]).into_owned();
                    negotiated = Some((newest, options));
                }
                Some((b'K', body)) => key = Some(body),
                Some((b'Z', _)) => break,
                Some(_) => {}
            }
        }
        let (newest, options) = negotiated.unwrap_or_else(|| {
            panic!("3.{minor}: no NegotiateProtocolVersion for the unknown _pq_ option")
        });
        assert!(
            options.contains("_pq_.pgmm_test_option"),
            "3.{minor}: {options:?}"
        );
        // PostgreSQL 18 accepts any minor up to 3.2 (3.1 adds nothing to 3.0); older servers
        // offer 3.0.
        let expected_minor = if server_speaks_3_2 {
            u32::from(minor)
        } else {
            0
        };
        assert_eq!(
            newest,
            (3 << 16) | expected_minor,
            "3.{minor}: newest minor offered"
        );
        let key = key.expect("BackendKeyData");
        let key_len = if expected_minor == 2 { 32 } else { 4 };
        assert_eq!(
            key.len(),
            4 + key_len,
            "3.{minor}: process id and secret key"
        );

        wire::send(&mut s, &wire::query("select 40 + 2"));
        let answer = wire::read_until_ready_for_query(&mut s);
        assert!(
            answer
                .iter()
                .any(|(tag, body)| *tag == b'D' && body.ends_with(b"42")),
            "3.{minor}: {answer:?}"
        );

        // Cancel a sleep with the key as the server gave it.
        wire::send(&mut s, &wire::query("select pg_sleep(60)"));
        let pid = i32::from_be_bytes(key[..4].try_into().unwrap());
        let watcher = harness::Db::connect(&pg.conninfo("postgres", "postgres"));
        wait_until("the sleep to run", Duration::from_secs(10), || {
            let state = watcher
                .scalar(&format!(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = {pid}"
                ))
                .ok()
                .flatten();
            (state.as_deref() == Some("PgSleep")).then_some(())
        });
        let mut cancel = ((12 + key_len) as u32).to_be_bytes().to_vec();
        cancel.extend_from_slice(&80_877_102u32.to_be_bytes());
        cancel.extend_from_slice(&key);
        let mut c = wire::connect(pgmm.client_port());
        wire::send(&mut c, &cancel);
        let _ = wire::read_until_closed(&mut c, Duration::from_secs(10));
        let answer = wire::read_until_ready_for_query(&mut s);
        let cancelled = answer.iter().any(|(tag, body)| {
            *tag == b'E'
                && wire::error_fields(body)
                    .iter()
                    .any(|(c, v)| *c == 'C' && v == "57014")
        });
        assert!(
            cancelled,
            "3.{minor}: the sleep was not cancelled: {answer:?}"
        );
    }

    match harness::bindir_of_major(18) {
        Some(bindir) => {
            let out = run_ok(
                Command::new(bindir.join("psql"))
                    .arg(format!(
                        "{} max_protocol_version=latest",
                        pgmm.conninfo("postgres", "postgres")
                    ))
                    .args(["-X", "-At", "-c", "select 6 * 7", "-c", "\\conninfo"]),
                None,
                CMD_TIMEOUT,
            );
            assert!(out.starts_with("42\n"), "{out}");
            let version = if server_speaks_3_2 { "3.2" } else { "3.0" };
            assert!(
                out.lines()
                    .any(|l| l.starts_with("Protocol Version") && l.ends_with(version)),
                "psql 18 negotiated {version}: {out}"
            );
        }
        None => {
            eprintln!("PostgreSQL 18's psql is not installed here: only raw 3.x startups tested")
        }
    }
}

/// Counts the lines of pgmm's log that contain `needle`.
fn log_lines(pgmm: &Pgmm, needle: &str) -> usize {
    pgmm.log().lines().filter(|l| l.contains(needle)).count()
}

/// A client that never finishes its start-up is dropped after `[client]
/// startup_timeout_seconds` and counted; a flood of bad connections is counted one by one but
/// logged a line per reason and interval, not a line each.
#[test]
fn startup_timeouts_are_counted_and_bad_connections_are_logged_at_a_bounded_rate() {
    let pg = PgCluster::start();
    let pgmm = Pgmm::start(
        &pg,
        PgmmOptions {
            client_toml: "startup_timeout_seconds = 1".into(),
            ..PgmmOptions::default()
        },
    );
    let timeouts = "pgmm_client_protocol_errors_total{reason=\"startup_timeout\"}";
    assert_eq!(pgmm.metric_value(timeouts), Some(0.0));
    let start = Instant::now();
    let mut silent = wire::connect(pgmm.client_port());
    // Half a startup packet, then nothing.
    wire::send(
        &mut silent,
        &wire::startup_message("postgres", "postgres")[..6],
    );
    let closed = wire::read_until_closed(&mut silent, Duration::from_secs(20));
    assert!(closed.messages.is_empty(), "{closed:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "closed before the timeout"
    );
    wait_metric(&pgmm, timeouts, 1.0);

    let probes = 300;
    for _ in 0..probes {
        let mut s = wire::connect(pgmm.client_port());
        wire::send(&mut s, b"GET / HTTP/1.1\r\n\r\n");
        let _ = wire::read_until_closed(&mut s, Duration::from_secs(10));
    }
    wait_metric(
        &pgmm,
        "pgmm_client_protocol_errors_total{reason=\"startup_packet\"}",
        probes as f64,
    );
    // The probes take well under a minute here: with one line per reason per 10 s that is a
    // handful of lines, where it used to be one per probe.
    let lines = log_lines(&pgmm, "closing client connection");
    let bound = 2 + 2 * (start.elapsed().as_secs() as usize / 10 + 1);
    assert!(
        lines <= bound,
        "{lines} WARN lines for {probes} bad connections (bound {bound})"
    );
    let client = harness::Db::connect(&pgmm.conninfo("postgres", "postgres"));
    assert_eq!(client.value("select 1"), "1", "still serving");
}

/// `n` random bytes.
fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    rng.fill(&mut v);
    v
}

/// A few random edits of `v`: flipped bytes, a cut, random bytes appended.
fn mutate(rng: &mut Rng, v: &mut Vec<u8>) {
    for _ in 0..=rng.usize(..3) {
        match rng.usize(..3) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.usize(..8);
            }
            1 if !v.is_empty() => {
                let cut = rng.usize(..v.len());
                v.truncate(cut);
            }
            _ => {
                let n = rng.usize(..32);
                v.extend(random_bytes(rng, n));
            }
        }
    }
}

/// A random message after start-up: random type byte, length and body, or a valid message
/// mutated. FunctionCall is left out: a random one could call a real function.
fn garbage_message(rng: &mut Rng) -> Vec<u8> {
    match rng.usize(..3) {
        0 => {
            let n = rng.usize(..64);
            random_bytes(rng, n)
        }
        1 => {
            let kind = *b"QPBEDSHCdcf?p".get(rng.usize(..13)).expect("in range");
            let len = match rng.usize(..4) {
                0 => rng.usize(..8) as u32,
                1 => u32::MAX - rng.usize(..4) as u32,
                _ => rng.usize(..200) as u32 + 4,
            };
            let mut m = vec![kind];
            m.extend_from_slice(&len.to_be_bytes());
            let body = rng.usize(..len.min(300) as usize + 1);
            m.extend(random_bytes(rng, body));
            m
        }
        _ => {
            let mut m = match rng.usize(..4) {
                0 => wire::query("select 1"),
                1 => wire::parse("", "select $1::int"),
                2 => wire::bind("", ""),
                _ => wire::execute(""),
            };
            mutate(rng, &mut m);
            m
        }
    }
}

/// A Bind of the two-parameter statement `ins` with random, often mangled, values.
fn random_bind(rng: &mut Rng) -> Vec<u8> {
    let mut body = b"\0ins\0".to_vec();
    let formats = rng.usize(..3) as i16;
    body.extend_from_slice(&formats.to_be_bytes());
    for _ in 0..formats {
        body.extend_from_slice(&(rng.usize(..2) as i16).to_be_bytes());
    }
    body.extend_from_slice(&2i16.to_be_bytes());
    let id = (1_000_000 + rng.usize(..1_000_000)).to_string();
    let home = ["a", "b", "c", ""][rng.usize(..4)];
    for value in [id.as_bytes(), home.as_bytes()] {
        body.extend_from_slice(&(value.len() as i32).to_be_bytes());
        body.extend_from_slice(value);
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    if rng.usize(..2) == 0 {
        mutate(rng, &mut body);
    }
    wire::message(b'B', &body)
}

/// Reads whatever the server sends until it closes the connection or `timeout` passes (a
/// connection left waiting for the rest of a message is closed by the client, as a scanner
/// would).
fn drain(s: &mut std::net::TcpStream, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match std::io::Read::read(s, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// One fuzzing connection: random startup bytes, a mutated startup packet, or a valid startup
/// followed by random messages, or by random Binds of a prepared INSERT into a row-owned table
/// (the path where pgmm decodes Bind bodies itself).
fn fuzz_connection(port: u16, rng: &mut Rng) {
    let mut s = wire::connect(port);
    match rng.usize(..4) {
        0 => {
            let n = rng.usize(..64);
            wire::send(&mut s, &random_bytes(rng, n));
        }
        1 => {
            let mut packet = wire::startup_message("postgres", "postgres");
            mutate(rng, &mut packet);
            wire::send(&mut s, &packet);
        }
        2 => {
            wire::send(&mut s, &wire::startup_message("postgres", "postgres"));
            wire::read_until_ready(&mut s);
            let mut stream = Vec::new();
            for _ in 0..=rng.usize(..6) {
                stream.extend(garbage_message(rng));
            }
            wire::send(&mut s, &stream);
        }
        _ => {
            wire::send(&mut s, &wire::startup_message("postgres", "postgres"));
            wire::read_until_ready(&mut s);
            let mut stream = wire::parse("ins", "insert into acct (id, home) values ($1, $2)");
            stream.extend(wire::sync());
            for _ in 0..=rng.usize(..4) {
                stream.extend(random_bind(rng));
                stream.extend(wire::execute(""));
                stream.extend(wire::sync());
            }
            wire::send(&mut s, &stream);
        }
    }
    drain(&mut s, Duration::from_millis(500));
}

/// Random bytes hurt only their own connection (issue 12): while hundreds of connections send
/// random startup packets, mutated ones, and garbage or mangled Binds after a valid start-up,
/// a normal session's every answer is the right one (a desynchronised relay would hand it
/// another statement's result, or none) and comes within [`ANSWER_BOUND`]; afterwards pgmm
/// is alive and serves a new session. The seed is printed; `PGMM_FUZZ_SEED` replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_never_disturb_another_session() {
    /// Per round of four statements. Measured on a shared 2-core machine, debug build: worst
    /// round 37-46 ms over 360 fuzzing connections (about 9,000 rounds).
    ///
    /// Before the fix in `Ownership::check_bound`, a random Bind whose owner value held a NUL
    /// panicked its session task (the refusal naming it could not be encoded), leaking the
    /// connection gauge; the panics also pushed the worst round to about 700 ms.
    const ANSWER_BOUND: Duration = Duration::from_secs(2);
    const FUZZERS: usize = 6;
    const CONNECTIONS_EACH: usize = 60;
    let pg = PgCluster::start();
    pg.psql(
        "create table acct (id bigint primary key, home text); create table owned_by_b (id int)",
    );
    let mut pgmm = Pgmm::start(
        &pg,
        PgmmOptions {
            ownership: vec![("public.owned_by_b".into(), "b".into())],
            extra_toml: "\n[[ownership]]\ntable = \"public.acct\"\nowner_column = \"home\"\n"
                .into(),
            ..PgmmOptions::default()
        },
    );
    let conninfo = pgmm.conninfo("postgres", "postgres");
    let normal = connect(&conninfo).await;
    let doubled = normal.prepare("select $1::bigint * 2").await.unwrap();
    let insert = normal
        .prepare("insert into acct (id, home) values ($1, $2)")
        .await
        .unwrap();

    let seed = std::env::var("PGMM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("fuzzing with PGMM_FUZZ_SEED={seed}");
    let port = pgmm.client_port();
    let fuzzers: Vec<_> = (0..FUZZERS)
        .map(|f| {
            std::thread::spawn(move || {
                let mut rng =
                    Rng::with_seed(seed ^ (f as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                for _ in 0..CONNECTIONS_EACH {
                    fuzz_connection(port, &mut rng);
                }
            })
        })
        .collect();

    let mut worst = Duration::ZERO;
    let mut rounds = 0i64;
    while !fuzzers.iter().all(|f| f.is_finished()) {
        rounds += 1;
        let t = Instant::now();
        // Simple protocol: the answer names this round.
        let tag = format!("round {rounds}");
        let answer = within(
            "simple query",
            normal.simple_query(&format!("select '{tag}'")),
        )
        .await
        .unwrap_or_else(|e| panic!("{tag}: {e}"));
        assert_eq!(first_value(&answer).as_deref(), Some(tag.as_str()));
        // Extended protocol.
        let v: i64 = within("prepared select", normal.query_one(&doubled, &[&rounds]))
            .await
            .unwrap_or_else(|e| panic!("{tag}: {e}"))
            .get(0);
        assert_eq!(v, rounds * 2, "{tag}");
        // A Bind pgmm checks itself: its own row passes, another node's is refused.
        let own = within("own row", normal.execute(&insert, &[&rounds, &"a"])).await;
        assert_eq!(own.unwrap_or_else(|e| panic!("{tag}: {e}")), 1);
        let foreign = within("foreign row", normal.execute(&insert, &[&-rounds, &"b"])).await;
        let err = foreign.expect_err("a row owned by b must be refused");
        assert_eq!(sqlstate(&err), Some("42501"), "{tag}: {err:?}");
        worst = worst.max(t.elapsed());
        assert!(
            t.elapsed() < ANSWER_BOUND,
            "{tag}: four statements took {:?}",
            t.elapsed()
        );
    }
    for f in fuzzers {
        f.join().expect("fuzzing thread");
    }
    eprintln!(
        "{} fuzzing connections; the normal session ran {rounds} rounds of four statements, \
         worst round {worst:?}",
        FUZZERS * CONNECTIONS_EACH
    );
    assert!(rounds > 0);
    let rows: i64 = normal
        .query_one(
            "select count(*) from acct where id > 0 and id <= $1",
            &[&rounds],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows, rounds,
        "every own-row insert of the normal session landed once"
    );

    assert!(pgmm.is_running(), "pgmm exited; log:\n{}", pgmm.log());
    // A panicking session task dies silently for its client and leaks its connection gauge.
    let log = pgmm.log();
    let panics: Vec<&str> = log.lines().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "pgmm panicked: {panics:#?}");
    let fresh = connect(&conninfo).await;
    select_one(&fresh).await;
    select_one(&normal).await;
    // Every fuzzing connection is closed by its client, so pgmm holds only these two.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pgmm.metric_value("pgmm_client_connections") != Some(2.0) {
        if Instant::now() > deadline {
            let log = pgmm.log();
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("WARN pgmm::frontdoor::session: closing client connection"))
                .collect();
            panic!(
                "pgmm still counts {:?} client connections, not 2; backends: {}\npgmm log, but for the closed connections:\n{}",
                pgmm.metric_value("pgmm_client_connections"),
                pg.psql(
                    "select string_agg(format('%s %s %s %L', pid, state, backend_start, query), E'\\n') \
                     from pg_stat_activity where backend_type = 'client backend'"
                ),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(pgmm.is_running(), "pgmm exited; log:\n{}", pgmm.log());
}
