//! End-to-end tests of replication: clusters of 2 or 3 real PostgreSQL servers, each with a
//! `pgmm serve` child process in front, fully meshed. Every test starts its own cluster.
//!
//! Tables are created on every node before pgmm starts where the test allows it, so the start-up
//! enrolment publishes them before the first write (schema changes made later replicate: see
//! `ddl.rs`).

use crate::harness;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use harness::{heavy_lock, wait_for, ClusterOptions, NodeOverride, TestCluster};

/// The usual replicated table: a primary key and the conflict column.
const COLUMNS: &str = "id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now()";

/// A cluster of `n` nodes with `COLUMNS` table `table` on each, created before pgmm starts.
fn cluster_with(n: usize, table: &str, opts: ClusterOptions) -> TestCluster {
    let mut c = TestCluster::prepare(n, opts);
    c.create_table(table, COLUMNS);
    c.start_pgmm();
    c
}

fn cluster(n: usize, table: &str) -> TestCluster {
    cluster_with(n, table, ClusterOptions::default())
}

/// `id=v,...` in key order: the whole content of a `COLUMNS` table but `updated_at`.
const CONTENT: &str = "SELECT coalesce(string_agg(id || '=' || v, ',' ORDER BY id), '') FROM t";

fn content_of(model: &BTreeMap<i32, String>) -> String {
    model
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Waits until every node's `t` holds exactly `model`, and the same `updated_at`s too.
fn expect_everywhere(c: &TestCluster, model: &BTreeMap<i32, String>, step: &str) {
    c.wait_all(
        &format!("t after {step} on every node"),
        CONTENT,
        &content_of(model),
    );
    c.wait_converged("t", model.len());
}

fn metric(c: &TestCluster, i: usize, series: &str) -> f64 {
    c.metric(i, series).unwrap_or(0.0)
}

/// Waits until a metric of node `i` equals `expected` (absent reads as 0).
fn wait_metric_eq(c: &TestCluster, i: usize, series: &str, expected: f64) {
    c.wait_metric(i, series, &format!("== {expected}"), |v| {
        v.unwrap_or(0.0) == expected
    });
}

#[test]
fn inserts_updates_deletes_and_truncates_reach_the_other_node() {
    let c = cluster(2, "t");
    let (a, b) = (c.front_door(0), c.front_door(1));
    let mut model = BTreeMap::new();

    a.exec("INSERT INTO t (id, v) SELECT g, 'a' || g FROM generate_series(1, 50) g");
    b.exec("INSERT INTO t (id, v) SELECT g, 'b' || g FROM generate_series(101, 150) g");
    for id in 1..=50 {
        model.insert(id, format!("a{id}"));
    }
    for id in 101..=150 {
        model.insert(id, format!("b{id}"));
    }
    expect_everywhere(&c, &model, "inserts");

    // Each node updates rows of both origins; the two sets are disjoint, so nothing conflicts.
    a.exec("UPDATE t SET v = v || '-ua', updated_at = now() WHERE id % 10 = 0");
    b.exec("UPDATE t SET v = v || '-ub', updated_at = now() WHERE id % 10 = 5");
    for (id, v) in model.iter_mut() {
        match id % 10 {
            0 => v.push_str("-ua"),
            5 => v.push_str("-ub"),
            _ => {}
        }
    }
    expect_everywhere(&c, &model, "updates");

    a.exec("DELETE FROM t WHERE id % 10 = 1");
    b.exec("DELETE FROM t WHERE id % 10 = 2");
    model.retain(|id, _| id % 10 != 1 && id % 10 != 2);
    expect_everywhere(&c, &model, "deletes");

    b.exec("TRUNCATE t");
    model.clear();
    expect_everywhere(&c, &model, "TRUNCATE on b");

    a.exec("INSERT INTO t (id, v) SELECT g, 'a' || g FROM generate_series(201, 210) g");
    for id in 201..=210 {
        model.insert(id, format!("a{id}"));
    }
    expect_everywhere(&c, &model, "inserts after the truncate");

    a.exec("TRUNCATE t");
    model.clear();
    expect_everywhere(&c, &model, "TRUNCATE on a");

    b.exec("INSERT INTO t (id, v) VALUES (301, 'b301')");
    model.insert(301, "b301".into());
    expect_everywhere(&c, &model, "an insert after the second truncate");
    c.assert_no_conflicts();
}

/// Rows written on node `i` of a 3-node test: 10 transactions of 10 inserts, then one
/// transaction updating 20 of them: 120 row changes.
fn write_own_rows(c: &TestCluster, i: usize, round: i32) {
    let db = c.front_door(i);
    let base = (i as i32 + 1) * 10_000 + round * 1_000;
    for k in 0..10 {
        let first = base + k * 10 + 1;
        db.exec(&format!(
            "INSERT INTO t (id, v) SELECT g, '{}' || g FROM generate_series({first}, {}) g",
            c.name(i),
            first + 9
        ));
    }
    db.exec(&format!(
        "UPDATE t SET v = v || '!', updated_at = now() WHERE id BETWEEN {} AND {}",
        base + 1,
        base + 20
    ));
}
const CHANGES_PER_ROUND: f64 = 120.0;

/// Every node writes its own rows at the same time.
fn write_everywhere(c: &TestCluster, round: i32) {
    thread::scope(|s| {
        for i in 0..c.len() {
            s.spawn(move || write_own_rows(c, i, round));
        }
    });
}

#[test]
fn three_nodes_converge_and_count_what_they_ship_and_apply() {
    let c = cluster(3, "t");
    write_everywhere(&c, 0);
    c.wait_converged("t", 300);

    for x in 0..3 {
        assert_eq!(
            metric(&c, x, "pgmm_changes_captured_total"),
            CHANGES_PER_ROUND,
            "changes captured on {:?}",
            c.name(x)
        );
        for y in (0..3).filter(|&y| y != x) {
            let peer = c.name(y);
            // Applied rows are visible a moment before the counter moves.
            wait_metric_eq(
                &c,
                x,
                &format!("pgmm_changes_applied_total{{peer=\"{peer}\"}}"),
                CHANGES_PER_ROUND,
            );
            assert_eq!(
                metric(
                    &c,
                    x,
                    &format!("pgmm_changes_shipped_total{{peer=\"{peer}\"}}")
                ),
                CHANGES_PER_ROUND,
                "changes {:?} shipped to {peer:?}",
                c.name(x)
            );
            assert_eq!(
                metric(&c, x, &format!("pgmm_peer_up{{peer=\"{peer}\"}}")),
                1.0,
                "link from {:?} to {peer:?}",
                c.name(x)
            );
        }
    }
    c.assert_no_conflicts();
}

#[test]
fn a_transaction_is_never_seen_half_applied() {
    const STATEMENTS: usize = 10;
    const ROWS_PER_STATEMENT: usize = 500;
    const TOTAL: usize = STATEMENTS * ROWS_PER_STATEMENT;
    let mut c = TestCluster::prepare(2, ClusterOptions::default());
    c.create_table(
        "tx",
        "id int PRIMARY KEY, batch int NOT NULL, v text, \
         updated_at timestamptz NOT NULL DEFAULT now()",
    );
    c.start_pgmm();
    let writer = c.front_door(0);
    let peer = c.db(1);
    let mut polls_in_flight = 0;
    for round in 0..5usize {
        let count = format!("SELECT count(*) FROM tx WHERE batch = {round}");
        let committed = AtomicBool::new(false);
        let (seen, in_flight) = thread::scope(|s| {
            // The peer is polled as fast as it answers from before the commit until the whole
            // transaction is there: every count it ever shows must be all or nothing.
            let poller = s.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut seen = BTreeMap::new();
                // Polls between the origin's commit and the transaction's arrival: the window
                // a half-applied transaction would show in.
                let mut in_flight = 0usize;
                loop {
                    let after_commit = committed.load(Ordering::Acquire);
                    let n: usize = peer.value(&count).parse().expect("a count");
                    *seen.entry(n).or_insert(0usize) += 1;
                    if n == TOTAL {
                        return (seen, in_flight);
                    }
                    in_flight += usize::from(after_commit);
                    assert!(
                        Instant::now() < deadline,
                        "round {round}: the transaction did not arrive within 60s; counts seen \
                         (count: times): {seen:?}"
                    );
                }
            });
            writer.exec("BEGIN");
            for k in 0..STATEMENTS {
                let first = round * TOTAL + k * ROWS_PER_STATEMENT + 1;
                writer.exec(&format!(
                    "INSERT INTO tx (id, batch, v) SELECT g, {round}, md5(g::text) \
                     FROM generate_series({first}, {}) g",
                    first + ROWS_PER_STATEMENT - 1
                ));
            }
            writer.exec("COMMIT");
            committed.store(true, Ordering::Release);
            poller
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        });
        assert!(
            seen.keys().all(|&n| n == 0 || n == TOTAL),
            "round {round}: the peer showed part of a {STATEMENTS}-statement transaction; \
             counts seen (count: times): {seen:?}"
        );
        polls_in_flight += in_flight;
    }
    // Otherwise the polls all happened before the commit or after the arrival, and proved nothing.
    assert!(
        polls_in_flight > 0,
        "no poll of the peer fell between a commit on the origin and its arrival"
    );
    c.wait_converged("tx", 5 * TOTAL);
}

/// Waits for a window of `WINDOW` in which no node's WAL grows by `LIMIT` bytes or more (Postgres
/// alone may log a small running-transactions record). A node that echoed applied changes back
/// would keep every window busy.
fn wait_wal_quiet(c: &TestCluster) {
    const WINDOW: Duration = Duration::from_secs(3);
    const LIMIT: u64 = 1024;
    wait_for(
        "an idle cluster's WAL to stop growing",
        Duration::from_secs(30),
        || {
            let before: Vec<u64> = (0..c.len()).map(|i| c.wal_lsn(i)).collect();
            thread::sleep(WINDOW);
            let growth: Vec<u64> = (0..c.len()).map(|i| c.wal_lsn(i) - before[i]).collect();
            if growth.iter().all(|&g| g < LIMIT) {
                return Ok(());
            }
            Err((0..c.len())
                .map(|i| {
                    format!(
                        "node {:?}: WAL grew {} bytes in {WINDOW:?}",
                        c.name(i),
                        growth[i]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"))
        },
    );
}

#[test]
fn nothing_echoes() {
    let c = cluster(3, "t");
    write_everywhere(&c, 0);
    c.wait_converged("t", 300);
    wait_wal_quiet(&c);

    for x in 0..3 {
        // What a node ships to each peer is exactly what it captured: none of what it applied.
        let captured = metric(&c, x, "pgmm_changes_captured_total");
        assert_eq!(captured, CHANGES_PER_ROUND, "captured on {:?}", c.name(x));
        for y in (0..3).filter(|&y| y != x) {
            let (to, from) = (c.name(y), c.name(x));
            assert_eq!(
                metric(
                    &c,
                    x,
                    &format!("pgmm_changes_shipped_total{{peer=\"{to}\"}}")
                ),
                captured,
                "changes {from:?} shipped to {to:?}"
            );
            assert_eq!(
                metric(
                    &c,
                    y,
                    &format!("pgmm_changes_applied_total{{peer=\"{from}\"}}")
                ),
                captured,
                "changes from {from:?} applied on {to:?}"
            );
        }
    }
    c.assert_no_conflicts();
    assert_eq!(c.wait_converged("t", 300), c.checksum(0, "t"));
}

/// 20,000 single-row transactions written straight into node a's Postgres (pgmm is not in the
/// write path, so the writes go on while it is dead), while the pgmm of node `victim` is
/// SIGKILLed twice in mid-stream and restarted: every row must reach b and c exactly once. A
/// transaction applied on b whose ack was lost comes again after the restart; applying it twice
/// would show as an `insert_exists` conflict, losing it as a missing row.
fn sigkill_mid_stream(victim: usize) {
    const ROWS: usize = 20_000;
    /// Rows on b at which the victim is killed.
    const KILL_AT: [usize; 2] = [2_000, 9_000];
    let _turn = heavy_lock();
    let mut c = cluster(3, "t");
    let sender = c.db(0);
    let written = AtomicUsize::new(0);
    let kills: Vec<(usize, usize)> = thread::scope(|s| {
        let writer = s.spawn(|| {
            for id in 1..=ROWS {
                sender.exec(&format!("INSERT INTO t (id, v) VALUES ({id}, 'row {id}')"));
                written.store(id, Ordering::Relaxed);
            }
        });
        let mut kills = Vec::new();
        for kill_at in KILL_AT {
            let arrived = wait_for(
                &format!("{kill_at} rows on b"),
                Duration::from_secs(120),
                || {
                    let n: usize = c.scalar(1, "SELECT count(*) FROM t").parse().unwrap();
                    if n >= kill_at {
                        Ok(n)
                    } else {
                        Err(format!(
                            "{n} rows on b, {} written on a",
                            written.load(Ordering::Relaxed)
                        ))
                    }
                },
            );
            c.pgmm_mut(victim).kill();
            let at_kill = written.load(Ordering::Relaxed);
            kills.push((at_kill, arrived));
            // Rows keep coming while the victim is down.
            wait_for(
                "rows written on a while pgmm is down",
                Duration::from_secs(120),
                || {
                    let n = written.load(Ordering::Relaxed);
                    if n >= (at_kill + 3_000).min(ROWS) {
                        Ok(())
                    } else {
                        Err(format!("{n} written"))
                    }
                },
            );
            c.pgmm_mut(victim).restart();
        }
        writer
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        kills
    });
    eprintln!(
        "killed {:?}'s pgmm at (rows written on a, rows on b): {kills:?}",
        c.name(victim)
    );
    for (_, arrived) in &kills {
        assert!(
            *arrived < ROWS,
            "all rows had arrived on b before a kill: nothing was in flight ({kills:?})"
        );
    }
    let sum = c.wait_converged_within("t", ROWS, Duration::from_secs(240));
    for i in 1..3 {
        assert_eq!(
            c.scalar(
                i,
                "SELECT count(DISTINCT id) || ':' || min(id) || ':' || max(id) FROM t"
            ),
            format!("{ROWS}:1:{ROWS}"),
            "rows on {:?}",
            c.name(i)
        );
    }
    assert_eq!(sum, c.checksum(0, "t"));
    c.assert_no_conflicts();
}

#[test]
fn sigkill_of_the_sending_pgmm_mid_stream_loses_and_repeats_nothing() {
    sigkill_mid_stream(0);
}

#[test]
fn sigkill_of_the_receiving_pgmm_mid_stream_loses_and_repeats_nothing() {
    sigkill_mid_stream(1);
}

#[test]
fn a_peer_down_for_a_while_catches_up() {
    const C: usize = 2;
    let mut c = cluster(3, "t");
    c.pgmm_mut(C).terminate();
    c.pgmm_mut(C).wait_exit(Duration::from_secs(30));

    // a and b write through pgmm; c's own rows go straight into its Postgres (its slots still
    // capture them) while its pgmm is down.
    for (i, first) in [(0usize, 1), (1, 1001)] {
        let db = c.front_door(i);
        for k in 0..100 {
            let lo = first + k * 10;
            db.exec(&format!(
                "INSERT INTO t (id, v) SELECT g, 'x' || g FROM generate_series({lo}, {}) g",
                lo + 9
            ));
        }
    }
    c.exec(
        C,
        "INSERT INTO t (id, v) SELECT g, 'c' || g FROM generate_series(2001, 2500) g",
    );
    c.wait_converged_on("t", &[0, 1], 2000, Duration::from_secs(60));
    for i in 0..2 {
        wait_metric_eq(&c, i, "pgmm_peer_up{peer=\"c\"}", 0.0);
    }
    assert_eq!(c.scalar(C, "SELECT count(*) FROM t"), "500");
    assert_eq!(
        c.scalar(0, "SELECT count(*) FROM t WHERE id > 2000"),
        "0",
        "c's rows reached a while c's pgmm was down"
    );

    c.pgmm_mut(C).restart();
    c.wait_converged("t", 2500);
    for i in 0..2 {
        wait_metric_eq(&c, i, "pgmm_peer_up{peer=\"c\"}", 1.0);
    }
    c.assert_no_conflicts();
}

/// A catch-up applies many transactions per batch, each batch first as bulk statements: the
/// values of all changes of one shape travel as text arrays and are cast to the local column
/// types, and changes within a run of distinct rows may be reordered. So: types that need
/// their cast (a typmod, varchar, arrays, jsonb, bytea, uuid, an enum in a schema that needs
/// quoting, NULLs), a composite key, a key that changes, and rows changed again and again in
/// one transaction and across transactions. The peer must end identical (checksums include
/// `updated_at`), with no conflict, and every batch applied on the fast path.
#[test]
fn a_catch_up_in_bulk_keeps_every_type_and_the_order_of_each_rows_changes() {
    let mut c = TestCluster::prepare(2, ClusterOptions::default());
    c.exec_all("CREATE SCHEMA \"Odd s\"; CREATE TYPE \"Odd s\".mood AS ENUM ('ok', 'sad')");
    c.create_table(
        "t",
        "k1 int, k2 text, n numeric(10, 2), s varchar(8), a int[], j jsonb, b bytea, u uuid, \
         m \"Odd s\".mood, updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (k1, k2)",
    );
    c.start_pgmm();
    c.pgmm_mut(1).terminate();
    c.pgmm_mut(1).wait_exit(Duration::from_secs(30));

    c.exec(
        0,
        "INSERT INTO t (k1, k2, n, s, a, j, b, u, m) \
         SELECT g, 'k' || g % 3, CASE WHEN g % 11 > 0 THEN g * 1.25 END, \
                CASE WHEN g % 11 > 0 THEN 'r' || g END, CASE WHEN g % 11 > 0 THEN ARRAY[g, g + 1] END, \
                CASE WHEN g % 11 > 0 THEN jsonb_build_object('k', g, 'q', 'a\"b') END, \
                CASE WHEN g % 11 > 0 THEN decode(md5(g::text), 'hex') END, \
                CASE WHEN g % 11 > 0 THEN md5(g::text)::uuid END, \
                CASE WHEN g % 11 > 0 THEN (CASE WHEN g % 2 = 0 THEN 'ok' ELSE 'sad' END)::\"Odd s\".mood END \
         FROM generate_series(1, 200) g",
    );
    c.exec(
        0,
        "BEGIN; \
         UPDATE t SET n = n + 1, s = left(s || 'u', 8) WHERE k1 % 3 = 0; \
         DELETE FROM t WHERE k1 % 5 = 0; \
         INSERT INTO t (k1, k2, n, s) SELECT g, 'k' || g % 3, g, 'again' FROM generate_series(5, 200, 5) g; \
         UPDATE t SET k1 = k1 + 1000 WHERE k1 % 7 = 0; \
         UPDATE t SET m = 'sad', a = a || 0 WHERE k1 > 1000; \
         COMMIT",
    );
    for i in 0..10 {
        c.exec(
            0,
            &format!(
                "UPDATE t SET j = coalesce(j, '{{}}') || '{{\"r\": {i}}}' WHERE k1 % 10 = {i}"
            ),
        );
    }
    c.pgmm_mut(1).restart();
    c.wait_converged("t", 200);
    c.assert_no_conflicts();
    assert_eq!(
        metric(&c, 1, "pgmm_apply_batches_total{path=\"full\",peer=\"a\"}"),
        0.0,
        "a batch fell back to the full statements (the fast attempt missed or failed)"
    );
    assert!(
        metric(&c, 1, "pgmm_apply_batches_total{path=\"fast\",peer=\"a\"}") >= 1.0,
        "no batch took the fast path"
    );
}

/// The fast path may apply changes to distinct rows out of the origin's order. A secondary
/// unique constraint can make that order fail where the origin's succeeded: here row 1 gives up
/// an e-mail address that row 2 then takes, and an earlier change to row 1 in the same
/// transaction puts row 1's second change after row 2's. The attempt must then be rolled back
/// and the batch applied in order by the full statements, with nothing lost and no conflict.
#[test]
fn a_unique_constraint_the_fast_order_violates_falls_back_to_the_origin_order() {
    let mut c = TestCluster::prepare(2, ClusterOptions::default());
    c.create_table(
        "t",
        "id int PRIMARY KEY, email text UNIQUE, n int, updated_at timestamptz NOT NULL DEFAULT now()",
    );
    c.start_pgmm();
    c.exec(
        0,
        "INSERT INTO t (id, email, n) VALUES (1, 'x', 0), (2, 'z', 0)",
    );
    c.wait_converged("t", 2);
    c.exec(
        0,
        "BEGIN; UPDATE t SET n = 1 WHERE id = 1; UPDATE t SET email = 'y' WHERE id = 1; \
         UPDATE t SET email = 'x' WHERE id = 2; COMMIT",
    );
    c.wait_converged("t", 2);
    assert_eq!(
        c.scalar(
            1,
            "SELECT string_agg(id || '=' || email || '/' || n, ',' ORDER BY id) FROM t"
        ),
        "1=y/1,2=x/0"
    );
    c.assert_no_conflicts();
    assert_eq!(
        metric(&c, 1, "pgmm_apply_batches_total{path=\"full\",peer=\"a\"}"),
        1.0,
        "the transaction should have needed the full statements"
    );
}

#[test]
fn a_wrong_secret_is_refused() {
    let c = cluster_with(
        3,
        "t",
        ClusterOptions::default().with_override(
            "c",
            NodeOverride {
                secret: Some("not-the-cluster-secret-at-all".into()),
                ..NodeOverride::default()
            },
        ),
    );
    let failures = |i: usize| {
        metric(
            &c,
            i,
            "pgmm_peer_handshake_failures_total{reason=\"authentication\"}",
        )
    };
    write_everywhere(&c, 0);
    c.wait_converged_on("t", &[0, 1], 200, Duration::from_secs(60));
    wait_for(
        "a handshake refused for authentication",
        Duration::from_secs(60),
        || {
            let seen: Vec<f64> = (0..3).map(failures).collect();
            if seen.iter().sum::<f64>() > 0.0 {
                Ok(())
            } else {
                Err(format!("failures on a, b, c: {seen:?}"))
            }
        },
    );
    // Written after refusals were seen: had c been let in, these would flow too.
    write_everywhere(&c, 1);
    c.wait_converged_on("t", &[0, 1], 400, Duration::from_secs(60));
    assert_eq!(
        c.scalar(2, "SELECT count(*) FROM t WHERE id < 30000"),
        "0",
        "rows of a or b reached c"
    );
    assert_eq!(c.scalar(2, "SELECT count(*) FROM t"), "200");
    for i in 0..2 {
        assert_eq!(
            c.scalar(i, "SELECT count(*) FROM t WHERE id >= 30000"),
            "0",
            "rows of c reached {:?}",
            c.name(i)
        );
        assert_eq!(metric(&c, i, "pgmm_peer_up{peer=\"c\"}"), 0.0);
        assert_eq!(metric(&c, i, "pgmm_changes_applied_total{peer=\"c\"}"), 0.0);
        assert_eq!(
            metric(&c, 2, &format!("pgmm_peer_up{{peer=\"{}\"}}", c.name(i))),
            0.0
        );
    }
    assert_eq!(metric(&c, 0, "pgmm_peer_up{peer=\"b\"}"), 1.0);
    assert!(
        (0..3).any(|i| c.pgmm(i).log().contains("authentication")),
        "no pgmm logged the refusal's reason"
    );
    c.assert_no_conflicts();
}

#[test]
fn an_update_of_a_small_column_keeps_a_toasted_value() {
    let mut c = TestCluster::prepare(2, ClusterOptions::default());
    c.create_table(
        "doc",
        "id int PRIMARY KEY, small int NOT NULL, big text, \
         updated_at timestamptz NOT NULL DEFAULT now()",
    );
    // Out of line and uncompressed, whatever the value's compressibility.
    c.exec_all("ALTER TABLE doc ALTER COLUMN big SET STORAGE EXTERNAL");
    c.start_pgmm();
    let (a, b) = (c.front_door(0), c.front_door(1));
    a.exec(
        "INSERT INTO doc (id, small, big) \
         SELECT 1, 1, string_agg(md5(random()::text), '') FROM generate_series(1, 3200)",
    );
    let toast_bytes: u64 = c
        .scalar(
            0,
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE oid = 'doc'::regclass",
        )
        .parse()
        .unwrap();
    assert!(
        toast_bytes >= 100_000,
        "the value is not stored out of line ({toast_bytes} bytes of TOAST)"
    );
    let md5 = c.scalar(0, "SELECT md5(big) FROM doc WHERE id = 1");
    let row = "SELECT small || ':' || md5(big) || ':' || length(big) FROM doc WHERE id = 1";
    c.wait_all(
        "the 100 kB row on every node",
        row,
        &format!("1:{md5}:102400"),
    );

    // The UPDATE's WAL record carries `big` as "unchanged TOAST": the peer must keep its value.
    a.exec("UPDATE doc SET small = 2, updated_at = now() WHERE id = 1");
    c.wait_all(
        "the small column's update on every node, with the big value kept",
        row,
        &format!("2:{md5}:102400"),
    );
    b.exec("UPDATE doc SET small = 3, updated_at = now() WHERE id = 1");
    c.wait_all(
        "b's update of the small column on every node, with the big value kept",
        row,
        &format!("3:{md5}:102400"),
    );
    c.wait_converged("doc", 1);
    c.assert_no_conflicts();
}

#[test]
fn a_table_created_while_running_is_enrolled() {
    let c = TestCluster::start(2, ClusterOptions::default());
    // Through the front door: pgmm sees the DDL.
    for i in 0..2 {
        c.front_door(i)
            .exec(&format!("CREATE TABLE late ({COLUMNS})"));
    }
    c.wait_enrolled("late");
    c.front_door(0)
        .exec("INSERT INTO late (id, v) SELECT g, 'a' FROM generate_series(1, 100) g");
    c.front_door(1)
        .exec("INSERT INTO late (id, v) SELECT g, 'b' FROM generate_series(101, 200) g");
    c.wait_converged("late", 200);

    // Behind pgmm's back: only the periodic check can find it.
    c.create_table("later", COLUMNS);
    c.exec(0, "INSERT INTO later (id, v) VALUES (1, 'a')");
    c.exec(1, "INSERT INTO later (id, v) VALUES (2, 'b')");
    c.wait_converged("later", 2);
    c.assert_no_conflicts();
}

#[test]
fn an_update_or_delete_of_a_row_missing_on_the_peer_is_recorded() {
    let mut c = TestCluster::prepare(2, ClusterOptions::default());
    c.create_table("t", COLUMNS);
    // Before pgmm starts there is no slot: these rows stay on a alone.
    c.exec(
        0,
        "INSERT INTO t (id, v) VALUES (1, 'only on a'), (3, 'only on a')",
    );
    c.start_pgmm();
    let a = c.front_door(0);

    // An update of a row b lacks brings the whole row to b.
    a.exec("UPDATE t SET v = 'changed' WHERE id = 1");
    c.wait_nodes(
        "update_missing recorded on b",
        &[1],
        "SELECT string_agg(concat_ws(' ', kind, table_name, origin, resolution), ',' ORDER BY id) \
         FROM pgmm.conflicts",
        "update_missing public.t a apply_remote",
    );
    assert_eq!(c.scalar(1, "SELECT v FROM t WHERE id = 1"), "changed");
    a.exec("DELETE FROM t WHERE id = 3");
    c.wait_nodes(
        "delete_missing recorded on b",
        &[1],
        "SELECT string_agg(kind || ' ' || resolution, ',' ORDER BY id) FROM pgmm.conflicts",
        "update_missing apply_remote,delete_missing skip",
    );
    let remote: String = c.scalar(
        1,
        "SELECT remote_tuple->>'v' FROM pgmm.conflicts WHERE kind = 'update_missing'",
    );
    assert_eq!(remote, "changed");
    // The delete left a tombstone on b all the same.
    assert_eq!(
        c.scalar(1, "SELECT key::text || ' ' || origin FROM pgmm.tombstones"),
        "[\"3\"] a"
    );

    // The stream goes on, and the two tables are equal again.
    a.exec("INSERT INTO t (id, v) VALUES (2, 'after')");
    c.wait_converged("t", 2);
    assert_eq!(c.conflicts(0), Vec::<String>::new());
    assert_eq!(c.conflicts(1).len(), 2);
}

/// The upgrade path multi-master exists for: a node on the old major (15) and one on the new
/// (18) in one cluster, both taking writes, replicating both ways live and after a catch-up,
/// a conflict resolved alike on both, and every row (types, large values, `updated_at`)
/// byte-identical. `.ci/install-postgres` installs both.
#[test]
fn a_node_on_15_and_a_node_on_18_replicate_both_ways_while_both_take_writes() {
    let _heavy = heavy_lock();
    let opts = ClusterOptions::default()
        .with_major("a", 15)
        .with_major("b", 18);
    let mut c = TestCluster::prepare(2, opts);
    assert!(c.pg(0).version().contains(" 15."), "{}", c.pg(0).version());
    assert!(c.pg(1).version().contains(" 18."), "{}", c.pg(1).version());
    c.create_table(
        "t",
        "id int PRIMARY KEY, v text, n numeric(12, 3), j jsonb, a int[], b bytea, \
         ts timestamptz, big text, updated_at timestamptz NOT NULL DEFAULT now()",
    );
    c.start_pgmm();
    let rows = |lo: i32, hi: i32, from: &str| {
        format!(
            "INSERT INTO t (id, v, n, j, a, b, ts, big) \
             SELECT g, '{from}' || g, g / 7.0, jsonb_build_object('g', g, 's', 'x\"y'), \
                    ARRAY[g, -g], decode(md5(g::text), 'hex'), \
                    timestamptz '2024-02-29 12:00:00+00' + g * interval '1 hour', \
                    CASE WHEN g % 10 = 0 THEN (SELECT string_agg(md5(g::text || i), '') \
                                               FROM generate_series(1, 300) i) END \
             FROM generate_series({lo}, {hi}) g"
        )
    };
    let (a, b) = (c.front_door(0), c.front_door(1));
    a.exec(&rows(1, 100, "a"));
    b.exec(&rows(101, 200, "b"));
    c.wait_converged("t", 200);

    // Live: each updates and deletes the other's rows.
    a.exec("UPDATE t SET v = v || ' by a', n = n + 1 WHERE id BETWEEN 101 AND 120");
    b.exec("UPDATE t SET v = v || ' by b', j = j || '{\"b\": true}' WHERE id BETWEEN 1 AND 20");
    a.exec("DELETE FROM t WHERE id BETWEEN 191 AND 200");
    b.exec("DELETE FROM t WHERE id BETWEEN 91 AND 100");
    c.wait_converged("t", 180);
    c.assert_no_conflicts();

    // Catch-up in both directions across a cut, with one conflicting row (b's update is the
    // later one and wins on both) and large values left unchanged by the updates.
    c.pgmm_mut(1).kill();
    c.exec(0, &rows(201, 300, "a"));
    c.exec(0, "UPDATE t SET v = 'a cut' WHERE id IN (10, 50, 150)");
    c.exec(1, &rows(301, 400, "b"));
    c.exec(1, "UPDATE t SET v = 'b cut' WHERE id = 50");
    c.pgmm_mut(1).restart();
    c.wait_all(
        "the conflicting row on both nodes",
        "SELECT v FROM t WHERE id = 50",
        "b cut",
    );
    c.wait_converged("t", 380);
    for i in 0..2 {
        assert_eq!(
            c.conflicts(i).len(),
            1,
            "node {:?} recorded exactly the one conflict: {:?}",
            c.name(i),
            c.conflicts(i)
        );
    }
}

/// While a link is down, a peer's lag is the time since it last had everything (plus the lag it
/// had then), not the time since the shipper started: a node up for a day whose link blips
/// must not report a day of lag. It grows while the link stays down and falls back once the
/// peer is back.
#[test]
fn lag_while_a_link_is_down_counts_from_the_drop() {
    const SERIES: &str = "pgmm_replication_lag_seconds{peer=\"b\"}";
    let mut c = cluster(2, "t");
    wait_metric_eq(&c, 0, "pgmm_peer_up{peer=\"b\"}", 1.0);
    c.front_door(0)
        .exec("INSERT INTO t (id, v) VALUES (1, 'x')");
    c.wait_converged("t", 1);
    // Not a wait for a condition: the shipper must have been running for a while before the
    // drop, so that counting from its start would show.
    thread::sleep(Duration::from_secs(6));
    c.pgmm_mut(1).kill();
    wait_metric_eq(&c, 0, "pgmm_peer_up{peer=\"b\"}", 0.0);
    let first = metric(&c, 0, SERIES);
    assert!(
        first < 4.0,
        "lag right after the link dropped should count from the drop, not from the shipper's start: {first}"
    );
    c.wait_metric(0, SERIES, "growing while b is down", |v| {
        v.unwrap_or(0.0) >= first + 1.0
    });
    c.pgmm_mut(1).restart();
    wait_metric_eq(&c, 0, "pgmm_peer_up{peer=\"b\"}", 1.0);
    c.wait_metric(0, SERIES, "back near zero", |v| v.unwrap_or(99.0) < 1.0);
}
