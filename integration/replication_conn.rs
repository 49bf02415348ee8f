//! The replication client against a real PostgreSQL (the harness's server binaries, `$PG_BINDIR`
//! first): startup in `replication=database` mode with each password method, replication commands,
//! and a pgoutput stream whose confirmed position the server records. Each test starts its own
//! throwaway cluster.

use crate::harness;

use std::fs;
use std::future::Future;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pgmm::testing::walsender::{
    ReplicationConn, ReplicationError, ReplicationStream, WalSenderConfig,
};
use pgmm::testing::SqlState;
use rustix::process::{kill_process, Pid, Signal};
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

const DEADLINE: Duration = Duration::from_secs(30);
const PGOUTPUT_OPTIONS: [(&str, &str); 2] = [("proto_version", "1"), ("publication_names", "pgmm")];

/// A PostgreSQL server in its own temporary directory, stopped and removed on drop.
///
/// A local stand-in for the shared harness (to be unified): as root, the binaries run as the
/// `postgres` user directly (`CommandExt::uid`), so the child we hold is the postmaster itself.
struct TestPg {
    port: u16,
    child: Child,
    dir: TempDir,
}

impl TestPg {
    /// initdb, then start with `hba` as pg_hba.conf, on a free port.
    fn start(hba: &str) -> TestPg {
        let run_as = run_as();
        let dir = tempfile::Builder::new()
            .prefix("pgmm-replconn-")
            .tempdir()
            .unwrap();
        if let Some((uid, gid)) = run_as {
            chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(harness::pg_bindir().join("initdb"));
        initdb
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ])
            .arg(&data);
        let output = as_user(&mut initdb, run_as).output().unwrap();
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        fs::write(data.join("pg_hba.conf"), hba).unwrap();

        // A port picked free can be taken before the postmaster binds it: retry with another.
        for _ in 0..5 {
            let port = harness::free_port();
            let log_path = dir.path().join(format!("postgres-{port}.log"));
            let log = fs::File::create(&log_path).unwrap();
            let mut postgres = Command::new(harness::pg_bindir().join("postgres"));
            postgres
                .arg("-D")
                .arg(&data)
                .args(["-c", &format!("port={port}")])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", dir.path().display()))
                .args(["-c", "wal_level=logical"])
                .args(["-c", "max_wal_senders=8"])
                .args(["-c", "max_replication_slots=8"])
                .args(["-c", "fsync=off"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            let mut child = as_user(&mut postgres, run_as).spawn().unwrap();
            match wait_ready(&mut child, &data, &log_path) {
                Ok(()) => return TestPg { port, child, dir },
                // The postmaster exited: nothing to stop, try another port.
                Err(log) if log.contains("Address already in use") => {}
                Err(log) => panic!("postgres did not start:\n{log}"),
            }
        }
        panic!("postgres could not bind a free port in 5 attempts");
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn config(&self, user: &str, password: Option<&str>) -> WalSenderConfig {
        WalSenderConfig {
            host: "127.0.0.1".into(),
            port: self.port,
            user: user.into(),
            password: password.map(str::to_owned),
            dbname: "postgres".into(),
            application_name: "replication_conn_test".into(),
            connect_timeout: Some(Duration::from_secs(10)),
        }
    }

    /// An ordinary (non-replication) session as the superuser.
    async fn client(&self) -> Client {
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        let (client, conn) = within("connect", tokio_postgres::connect(&url, NoTls))
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // Immediate shutdown: the postmaster takes its children down with it (SIGKILL would
        // orphan them).
        let _ = kill_process(Pid::from_child(&self.child), Signal::QUIT);
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls postmaster.pid for "ready" (what pg_ctl waits for); the log if the server exited.
fn wait_ready(child: &mut Child, data: &Path, log: &Path) -> Result<(), String> {
    let pid_file = data.join("postmaster.pid");
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let log = fs::read_to_string(log).unwrap_or_default();
            return Err(format!("exited with {status}:\n{log}"));
        }
        let ready = fs::read_to_string(&pid_file)
            .map(|text| text.lines().nth(7).map(str::trim) == Some("ready"))
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = kill_process(Pid::from_child(child), Signal::QUIT);
            let _ = child.wait();
            let log = fs::read_to_string(log).unwrap_or_default();
            panic!("postgres not ready after {DEADLINE:?}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `postgres` user's uid/gid when we are root (initdb and postgres refuse to run as root).
fn run_as() -> Option<(u32, u32)> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        assert!(out.status.success(), "no `postgres` system user");
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    Some((id("-u"), id("-g")))
}

fn as_user(cmd: &mut Command, run_as: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    cmd
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?}: {what}"))
}

/// An LSN as a number, from a query that yields one pg_lsn (or NULL) in its first column.
async fn query_lsn(client: &Client, sql: &str) -> Option<u64> {
    let wrapped = format!("SELECT ((x) - '0/0'::pg_lsn)::text FROM ({sql}) AS q(x)");
    let row = client.query_one(&wrapped, &[]).await.unwrap();
    row.get::<_, Option<String>>(0)
        .map(|text| text.parse().unwrap())
}

async fn confirmed_flush(client: &Client, slot: &str) -> u64 {
    let sql =
        format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'");
    query_lsn(client, &sql)
        .await
        .expect("slot has a confirmed_flush_lsn")
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().unwrap())
}

/// A standby status update ('r'): write, flush and apply positions, the client clock, no reply
/// requested.
fn status_update(lsn: u64) -> Vec<u8> {
    const PG_EPOCH_OFFSET_US: u64 = 946_684_800_000_000;
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let mut out = vec![b'r'];
    for _ in 0..3 {
        out.extend_from_slice(&lsn.to_be_bytes());
    }
    out.extend_from_slice(&((now_us - PG_EPOCH_OFFSET_US) as i64).to_be_bytes());
    out.push(0);
    out
}

/// What a test needs to know of the stream: the pgoutput messages of XLogData, in order.
struct Received {
    /// (first byte of the pgoutput message, whole CopyData payload)
    messages: Vec<(u8, Bytes)>,
}

impl Received {
    fn contains(&self, needle: &str) -> bool {
        self.messages.iter().any(|(_, payload)| {
            payload
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        })
    }
}

/// Reads the stream until a pgoutput Commit follows a message containing `last_marker`; returns
/// what was received and that Commit's end LSN. Keepalives asking for a reply are answered with
/// `confirm`, as the real capture does.
async fn receive_until(
    stream: &mut ReplicationStream,
    last_marker: &str,
    confirm: u64,
) -> (Received, u64) {
    let mut received = Received {
        messages: Vec::new(),
    };
    let mut marker_seen = false;
    loop {
        let payload = within("next CopyData", stream.next())
            .await
            .unwrap()
            .expect("stream ended early");
        match payload[0] {
            b'w' => {
                assert!(payload.len() > 25, "XLogData without data: {payload:?}");
                let data = &payload[25..];
                let kind = data[0];
                marker_seen |= data
                    .windows(last_marker.len())
                    .any(|w| w == last_marker.as_bytes());
                received.messages.push((kind, payload.clone()));
                if kind == b'C' && marker_seen {
                    // Commit: flags (1), commit LSN (8), end LSN (8), timestamp (8).
                    return (received, be_u64(&data[10..]));
                }
            }
            b'k' => {
                if payload[17] == 1 {
                    stream.send_status(&status_update(confirm)).await.unwrap();
                }
            }
            other => panic!("unexpected CopyData kind {:?}", other as char),
        }
    }
}

/// START_REPLICATION, retried while the slot is still held by a walsender that is going away.
async fn start_when_slot_free(pg: &TestPg, slot: &str) -> ReplicationStream {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let conn = ReplicationConn::connect(&pg.config("postgres", None))
            .await
            .unwrap();
        match conn.start_logical(slot, 0, &PGOUTPUT_OPTIONS).await {
            Ok(stream) => return stream,
            // object_in_use: "replication slot ... is active for PID ..."
            Err(e) if e.sqlstate() == "55006" && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("START_REPLICATION: {e}"),
        }
    }
}

const TRUST_HBA: &str = "\
local all         all                trust
host  all         all  127.0.0.1/32  trust
host  replication all  127.0.0.1/32  trust
";

#[tokio::test]
async fn logical_stream_is_received_and_confirmed() {
    let pg = TestPg::start(TRUST_HBA);
    let client = pg.client().await;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);
             CREATE PUBLICATION pgmm FOR TABLE items;",
        )
        .await
        .unwrap();

    // The config comes from the operator's url, application_name included.
    let url: tokio_postgres::Config = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?application_name=pgmm-it&connect_timeout=10",
        pg.port
    )
    .parse()
    .unwrap();
    let cfg = WalSenderConfig::from_tokio_postgres(&url).unwrap();
    let mut conn = within("connect", ReplicationConn::connect(&cfg))
        .await
        .unwrap();
    let major = harness::pg_major();
    assert!(
        conn.parameter("server_version")
            .unwrap_or("")
            .starts_with(&format!("{major}.")),
        "server_version {:?}, expected PostgreSQL {major}",
        conn.parameter("server_version")
    );
    let activity = client
        .query_one(
            "SELECT application_name, backend_type FROM pg_stat_activity WHERE pid = $1",
            &[&conn.backend_pid()],
        )
        .await
        .unwrap();
    assert_eq!(activity.get::<_, &str>(0), "pgmm-it");
    assert_eq!(activity.get::<_, &str>(1), "walsender");

    let id = conn.identify_system().await.unwrap();
    let current = query_lsn(&client, "SELECT pg_current_wal_lsn()")
        .await
        .unwrap();
    assert_eq!(id.dbname.as_deref(), Some("postgres"));
    assert_eq!(id.timeline, 1);
    assert!(
        id.xlogpos > 0 && id.xlogpos <= current,
        "{id:?} vs current {current}"
    );
    let system_identifier = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(id.systemid, system_identifier.get::<_, &str>(0));

    // Plain SQL works on a replication=database connection too, NULLs included.
    let rows = conn
        .simple_query("SELECT 1 AS one, NULL::text AS nothing, 'x''y' AS quoted")
        .await
        .unwrap();
    assert_eq!(rows, vec![vec![Some("1".into()), None, Some("x'y".into())]]);

    let consistent_point = conn
        .create_logical_slot("pgmm_b", "pgoutput")
        .await
        .unwrap();
    assert!(
        consistent_point >= id.xlogpos,
        "{consistent_point} < {}",
        id.xlogpos
    );
    assert_eq!(confirmed_flush(&client, "pgmm_b").await, consistent_point);

    let again = conn
        .create_logical_slot("pgmm_b", "pgoutput")
        .await
        .unwrap_err();
    assert!(matches!(again, ReplicationError::SlotExists), "{again}");
    assert_eq!(again.sqlstate(), "42710");
    // A server error leaves the connection usable.
    let err = conn
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), "42P01");
    assert_eq!(
        conn.simple_query("SELECT 2").await.unwrap(),
        vec![vec![Some("2".into())]]
    );

    client
        .batch_execute(
            "INSERT INTO items VALUES (1, 'alpha-marker'), (2, 'beta-marker');
             INSERT INTO items VALUES (3, 'gamma-marker');",
        )
        .await
        .unwrap();

    let mut stream = within(
        "START_REPLICATION",
        conn.start_logical("pgmm_b", consistent_point, &PGOUTPUT_OPTIONS),
    )
    .await
    .unwrap();
    let (received, end_lsn) = receive_until(&mut stream, "gamma-marker", consistent_point).await;
    for marker in ["alpha-marker", "beta-marker", "gamma-marker"] {
        assert!(received.contains(marker), "{marker} not streamed");
    }
    assert!(received.messages.iter().all(|(_, p)| p[0] == b'w'));
    let kinds: Vec<u8> = received.messages.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(
        kinds.first(),
        Some(&b'B'),
        "a transaction starts with Begin: {kinds:?}"
    );
    assert!(kinds.contains(&b'R') && kinds.contains(&b'I'), "{kinds:?}");
    assert!(end_lsn > consistent_point);

    // Nothing is confirmed until we say so; then the slot moves to what we confirmed.
    assert_eq!(confirmed_flush(&client, "pgmm_b").await, consistent_point);
    stream.send_status(&status_update(end_lsn)).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let confirmed = confirmed_flush(&client, "pgmm_b").await;
        if confirmed >= end_lsn {
            assert_eq!(confirmed, end_lsn);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "confirmed_flush_lsn stuck at {confirmed}, want {end_lsn}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A new session on the slot resumes after the confirmed transaction: the next thing it
    // streams is a later one.
    stream.close().await.unwrap();
    client
        .batch_execute("INSERT INTO items VALUES (4, 'delta-marker')")
        .await
        .unwrap();
    let mut resumed = start_when_slot_free(&pg, "pgmm_b").await;
    let (received, _) = receive_until(&mut resumed, "delta-marker", end_lsn).await;
    for marker in ["alpha-marker", "beta-marker", "gamma-marker"] {
        assert!(
            !received.contains(marker),
            "{marker} streamed again after confirmation"
        );
    }

    // The same over the Unix socket, with a slot dropped by name.
    let mut local = ReplicationConn::connect(&WalSenderConfig {
        host: pg.socket_dir().to_str().unwrap().to_owned(),
        ..pg.config("postgres", None)
    })
    .await
    .unwrap();
    assert_eq!(
        local.identify_system().await.unwrap().dbname.as_deref(),
        Some("postgres")
    );
    local
        .create_logical_slot("pgmm_tmp", "pgoutput")
        .await
        .unwrap();
    local.drop_slot("pgmm_tmp").await.unwrap();
    let gone = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgmm_tmp'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(gone.get::<_, i64>(0), 0);
    local.close().await.unwrap();
}

#[tokio::test]
async fn password_methods_authenticate_and_wrong_passwords_are_refused() {
    let hba = "\
local all                  all         trust
host  all                  postgres    127.0.0.1/32  trust
host  replication,all      scram_repl  127.0.0.1/32  scram-sha-256
host  all                  md5_repl    127.0.0.1/32  md5
host  all                  clear_repl  127.0.0.1/32  password
";
    let pg = TestPg::start(hba);
    let client = pg.client().await;
    client
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE scram_repl REPLICATION LOGIN PASSWORD 'scram-secret';
             CREATE ROLE clear_repl REPLICATION LOGIN PASSWORD 'clear-secret';
             SET password_encryption = 'md5';
             CREATE ROLE md5_repl REPLICATION LOGIN PASSWORD 'md5-secret';",
        )
        .await
        .unwrap();
    // The stored verifiers decide the exchange: make sure each method is the one exercised.
    for (role, prefix) in [("scram_repl", "SCRAM-SHA-256$"), ("md5_repl", "md5")] {
        let row = client
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&role],
            )
            .await
            .unwrap();
        assert!(row.get::<_, &str>(0).starts_with(prefix), "{role}");
    }

    for (user, password) in [
        ("scram_repl", "scram-secret"),
        ("md5_repl", "md5-secret"),
        ("clear_repl", "clear-secret"),
    ] {
        let mut conn = within(
            user,
            ReplicationConn::connect(&pg.config(user, Some(password))),
        )
        .await
        .unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(
            conn.identify_system().await.unwrap().dbname.as_deref(),
            Some("postgres"),
            "{user}"
        );
        assert_eq!(
            conn.simple_query("SELECT current_user").await.unwrap(),
            vec![vec![Some(user.to_owned())]]
        );
        conn.close().await.unwrap();

        let wrong = within(
            user,
            ReplicationConn::connect(&pg.config(user, Some("wrong"))),
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{user} logged in with a wrong password"));
        assert!(
            matches!(&wrong, ReplicationError::Server { code, .. } if code == "28P01"),
            "{user}: {wrong}"
        );

        let missing = within(user, ReplicationConn::connect(&pg.config(user, None)))
            .await
            .err()
            .unwrap_or_else(|| panic!("{user} logged in without a password"));
        assert!(
            matches!(missing, ReplicationError::Auth(_)),
            "{user}: {missing}"
        );
    }
}
