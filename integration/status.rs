//! End-to-end tests of a node's operational view: `pgmm status` (table and `--json`) and
//! `GET /readyz`, against a 3-node cluster of real Postgres servers and `pgmm serve` processes.
//! They assert what an operator sees: every peer named, a killed peer reported down by the
//! nodes still running, a conflict and a refusal counted, and a stopped node reported as not
//! running with exit code 3.

use crate::harness;

use std::process::{Command, Output};
use std::time::Duration;

use harness::{
    http_get, run_command, wait_for, ClusterOptions, PgCluster, Pgmm, PgmmOptions, TestCluster,
};
use rustix::process::{kill_process, Pid, Signal};
use serde_json::Value;

const COLUMNS: &str = "id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now()";
/// Far more than a healthy cluster needs on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

fn status(cluster: &TestCluster, i: usize, json: bool) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgmm"));
    cmd.arg("status")
        .arg("--config")
        .arg(cluster.pgmm(i).config_path());
    if json {
        cmd.arg("--json");
    }
    run_command(&mut cmd, None, COMMAND_TIMEOUT)
}

/// `pgmm status --json` of node `i`, which must succeed.
fn status_json(cluster: &TestCluster, i: usize) -> Result<Value, String> {
    let out = status(cluster, i, true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "exit {}; stdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_str(&stdout).map_err(|e| format!("not JSON ({e}):\n{stdout}"))
}

/// The `up` flag of each peer in a JSON report, in report order.
fn links(report: &Value) -> Vec<(String, bool)> {
    report["peers"]
        .as_array()
        .map(|peers| {
            peers
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or("?").to_owned(),
                        p["up"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn readyz(cluster: &TestCluster, i: usize) -> Option<(u16, String)> {
    http_get(cluster.pgmm(i).metrics_port(), "/readyz")
}

#[test]
fn status_and_readyz_report_peers_conflicts_refusals_and_a_killed_peer() {
    let opts = ClusterOptions {
        extra_toml: "[[ownership]]\ntable = \"public.owned_by_b\"\nowner = \"b\"\n".into(),
        ..ClusterOptions::default()
    };
    let mut c = TestCluster::prepare(3, opts);
    c.create_table("items", COLUMNS);
    c.create_table("owned_by_b", COLUMNS);
    c.start_pgmm();

    wait_for(
        "node a ready (its Postgres and both links)",
        WAIT,
        || match readyz(&c, 0) {
            Some((200, body)) if body == "ready\n" => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let report = wait_for("node a to see both peers up", WAIT, || {
        let report = status_json(&c, 0)?;
        let seen = links(&report);
        (seen == [("b".to_owned(), true), ("c".to_owned(), true)])
            .then_some(report.clone())
            .ok_or(format!("{report:#}"))
    });
    assert_eq!(report["node"], "a");
    assert_eq!(report["cluster"], "test");
    assert!(
        report["schema_version"].as_i64().is_some_and(|v| v >= 1),
        "{report:#}"
    );
    for peer in report["peers"].as_array().unwrap() {
        for figure in ["lag_seconds", "lag_bytes", "slot_retained_wal_bytes"] {
            assert!(peer[figure].is_number(), "{figure} of {peer}");
        }
    }
    assert_eq!(report["conflicts_last_hour"]["total"], 0, "{report:#}");

    // The human form names every peer, with its link.
    let out = status(&c, 0, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("node a of cluster test "), "{text}");
    for peer in ["b", "c"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{peer} "))
                    && l.split_whitespace().nth(2) == Some("up")),
            "a row for peer {peer} in:\n{text}"
        );
    }
    assert!(text.contains("conflicts in the last hour: none"), "{text}");

    // A refusal at a's front door and an insert/insert conflict: b's insert of key 7 is still
    // uncommitted when a's commits, so each node then receives a key it already has.
    let refused = c
        .front_door(0)
        .execute("INSERT INTO owned_by_b (id, v) VALUES (1, 'through a')")
        .expect_err("node b owns owned_by_b");
    assert!(
        refused.contains("42501") || refused.contains("owned by node"),
        "{refused}"
    );
    let b = c.front_door(1);
    b.exec("BEGIN; INSERT INTO items (id, v) VALUES (7, 'b')");
    c.front_door(0)
        .exec("INSERT INTO items (id, v) VALUES (7, 'a')");
    b.exec("COMMIT");
    let report = wait_for("node a to count the conflict and the refusal", WAIT, || {
        let report = status_json(&c, 0)?;
        let counted = report["conflicts_last_hour"]["by_kind"]["insert_exists"].as_u64() >= Some(1)
            && report["ownership_refusals_last_hour"]["front_door"] == 1;
        counted
            .then_some(report.clone())
            .ok_or(format!("{report:#}"))
    });
    assert_eq!(
        report["ownership_refusals_last_hour"]["apply"], 0,
        "{report:#}"
    );
    let text = String::from_utf8_lossy(&status(&c, 0, false).stdout).into_owned();
    assert!(
        text.contains("ownership refusals in the last hour: 1 at the front door, 0 at apply"),
        "{text}"
    );
    assert!(text.contains("insert_exists "), "{text}");

    // Kill c's pgmm: a and b report it down, a is no longer ready and says why.
    c.pgmm_mut(2).kill();
    for i in 0..2 {
        wait_for(
            &format!("node {} to report c down", c.name(i)),
            WAIT,
            || {
                let report = status_json(&c, i)?;
                let seen = links(&report);
                let c_down = seen.iter().any(|(name, up)| name == "c" && !up);
                let others_up = seen
                    .iter()
                    .filter(|(name, _)| name != "c")
                    .all(|(_, up)| *up);
                (c_down && others_up)
                    .then_some(())
                    .ok_or(format!("{report:#}"))
            },
        );
    }
    let text = String::from_utf8_lossy(&status(&c, 0, false).stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("c ") && l.split_whitespace().nth(2) == Some("DOWN")),
        "{text}"
    );
    match readyz(&c, 0) {
        Some((503, body)) => assert_eq!(body, "not ready: peer c: down\n"),
        other => panic!("/readyz of a with c killed: {other:?}"),
    }
    // A load balancer that should keep a serving while c is away asks without the peers.
    assert_eq!(
        http_get(c.pgmm(0).metrics_port(), "/readyz?peers=ignore"),
        Some((200, "ready; peer c: down\n".to_owned()))
    );

    // The killed node itself: not running, exit 3, and a message that says so.
    let out = status(&c, 2, false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.starts_with("pgmm status: node \"c\" is not running: nothing answers on its [metrics] listen address 127.0.0.1:"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_node_without_peers_is_ready_while_its_postgres_answers() {
    let pg = PgCluster::start();
    let pgmm = Pgmm::start(&pg, PgmmOptions::default());
    let port = pgmm.metrics_port();
    assert_eq!(http_get(port, "/readyz"), Some((200, "ready\n".to_owned())));

    // Stop its Postgres (fast shutdown of the postmaster named in postmaster.pid).
    let pid_file =
        std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).expect("read postmaster.pid");
    let pid: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    kill_process(Pid::from_raw(pid).unwrap(), Signal::INT).expect("signal the postmaster");
    let body = wait_for("/readyz to turn 503", WAIT, || {
        match http_get(port, "/readyz") {
            Some((503, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(body.starts_with("not ready: postgres: "), "{body}");

    // `pgmm status` still prints the node's own view, says the database is unreadable, and
    // exits 1.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgmm"));
    cmd.arg("status").arg("--config").arg(pgmm.config_path());
    let out = run_command(&mut cmd, None, COMMAND_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("no peers configured"), "{stdout}");
    assert!(
        stdout.contains("conflicts in the last hour: unknown (database unreadable)"),
        "{stdout}"
    );
    assert!(
        stderr.starts_with("pgmm status: database ([postgres] url): cannot connect"),
        "{stderr}"
    );
}

/// The metric names and help texts pgmm exposes pass Prometheus's own linter, on a node whose
/// every family has series (a peer linked, changes shipped and applied, a conflict counted).
#[test]
fn metrics_pass_promtool_check_metrics() {
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("promtool not found: install it (apt-get install -y prometheus; .ci/run does)");
    let mut c = TestCluster::prepare(2, ClusterOptions::default());
    c.create_table("t", COLUMNS);
    c.exec(1, "INSERT INTO t (id, v) VALUES (1, 'only on b')");
    c.start_pgmm();
    c.front_door(0)
        .exec("INSERT INTO t (id, v) VALUES (1, 'a')");
    // b's row is older than a's insert, so a's wins there.
    c.wait_metric(
        1,
        "pgmm_conflicts_total{kind=\"insert_exists\",resolution=\"apply_remote\",table=\"public.t\"}",
        "== 1",
        |v| v == Some(1.0),
    );
    let exposition = c.pgmm(1).metrics();
    assert!(
        exposition.contains("pgmm_peer_up{peer=\"a\"}"),
        "{exposition}"
    );
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `wal_status` of node `i`'s slot for `peer`.
fn slot_wal_status(cluster: &TestCluster, i: usize, peer: &str) -> String {
    cluster.scalar(
        i,
        &format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pgmm_{peer}'"),
    )
}

/// A slot Postgres invalidates (its peer stayed away past `max_slot_wal_keep_size`) is reported
/// as the operator's problem it is: `pgmm_slot_invalidated`, `/status`, `pgmm status`, `/readyz`
/// and an ERROR line saying what to do. Doing it (drop the slot, restart pgmm) brings the link
/// back; what the removed WAL held never reaches the peer, which is why the message says to
/// re-synchronise it.
#[test]
fn an_invalidated_slot_is_reported_until_it_is_dropped_and_recreated() {
    let mut c = TestCluster::prepare(2, ClusterOptions::default());
    c.create_table("t", COLUMNS);
    c.start_pgmm();
    let usable = "pgmm_slot_invalidated{peer=\"b\",reason=\"\"}";
    let lost = "pgmm_slot_invalidated{peer=\"b\",reason=\"wal_removed\"}";
    c.wait_metric(0, usable, "== 0", |v| v == Some(0.0));
    c.front_door(0)
        .exec("INSERT INTO t (id, v) VALUES (1, 'before')");
    c.wait_converged("t", 1);

    // b's pgmm goes away, so nothing reads a's slot for b; a keeps at most 1 MB of WAL for it.
    c.pgmm_mut(1).kill();
    c.wait_metric(0, "pgmm_peer_up{peer=\"b\"}", "== 0", |v| v == Some(0.0));
    c.exec(0, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'");
    c.exec(0, "SELECT pg_reload_conf()");
    let mut id = 1;
    wait_for("a's slot for b to be invalidated", WAIT, || {
        id += 1;
        c.exec(
            0,
            &format!("INSERT INTO t (id, v) VALUES ({id}, 'while b is away')"),
        );
        c.exec(0, "SELECT pg_switch_wal()");
        c.exec(0, "CHECKPOINT");
        match slot_wal_status(&c, 0, "b") {
            s if s == "lost" => Ok(()),
            s => Err(format!("wal_status {s}")),
        }
    });
    // Nothing else should lose its slot: the setting goes back to unlimited.
    c.exec(0, "ALTER SYSTEM RESET max_slot_wal_keep_size");
    c.exec(0, "SELECT pg_reload_conf()");

    c.wait_metric(0, lost, "== 1", |v| v == Some(1.0));
    assert_eq!(c.metric(0, usable), None, "one series per peer");
    let report = wait_for("/status of a to show the slot invalidated", WAIT, || {
        let report = status_json(&c, 0)?;
        (report["peers"][0]["slot_invalidated"] == "wal_removed")
            .then_some(report.clone())
            .ok_or(format!("{report:#}"))
    });
    assert_eq!(report["peers"][0]["name"], "b", "{report:#}");
    assert_eq!(report["peers"][0]["up"], false, "{report:#}");
    let text = String::from_utf8_lossy(&status(&c, 0, false).stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("b ") && l.ends_with("LOST (wal_removed)")),
        "{text}"
    );
    assert!(
        text.contains("SLOT INVALIDATED: slot pgmm_b of peer b was invalidated (wal_removed)"),
        "{text}"
    );
    assert_eq!(
        readyz(&c, 0),
        Some((
            503,
            "not ready: peer b: down, slot pgmm_b invalidated (wal_removed)\n".to_owned()
        ))
    );
    let log = c.pgmm(0).log();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("replication slot pgmm_b is INVALIDATED (wal_removed)")
            && l.contains("pg_drop_replication_slot('pgmm_b')")
            && l.contains("re-synchronising")),
        "{log}"
    );

    // b comes back: the slot cannot be read, the link stays down, and the report stays.
    c.pgmm_mut(1).restart();
    c.wait_metric(
        0,
        "pgmm_replication_errors_total{peer=\"b\",stage=\"slot\"}",
        ">= 1",
        |v| v >= Some(1.0),
    );
    assert_eq!(c.metric(0, "pgmm_peer_up{peer=\"b\"}"), Some(0.0));
    assert_eq!(c.metric(0, lost), Some(1.0));

    // What the message says to do: drop the slot, restart pgmm here.
    c.exec(0, "SELECT pg_drop_replication_slot('pgmm_b')");
    c.pgmm_mut(0).kill();
    c.pgmm_mut(0).restart();
    c.wait_metric(0, "pgmm_peer_up{peer=\"b\"}", "== 1", |v| v == Some(1.0));
    c.wait_metric(0, usable, "== 0", |v| v == Some(0.0));
    assert_eq!(c.metric(0, lost), None);
    assert!(
        status_json(&c, 0).unwrap()["peers"][0]["slot_invalidated"].is_null(),
        "the report is cleared"
    );
    c.front_door(0)
        .exec("INSERT INTO t (id, v) VALUES (1000, 'after')");
    c.wait_nodes(
        "the row written after the slot was recreated on b",
        &[1],
        "SELECT count(*) FROM t WHERE id = 1000",
        "1",
    );
    // The rows written while the slot was being lost never reach b: hence the re-sync.
    assert_eq!(
        c.scalar(1, "SELECT count(*) FROM t WHERE v = 'while b is away'"),
        "0"
    );
}
