//! Transactions of any size: a transaction travels in chunks while it is decoded and is applied
//! chunk by chunk inside one local transaction, a value larger than a frame in pieces. Each
//! test crosses the old limit (one frame of at most 64 MiB per transaction, which stopped
//! replication for good) and checks what a user would: every row on every node, byte for byte,
//! nothing doubled, bounded memory, conflicts resolved as in a small transaction.

use crate::harness;

use std::time::Duration;

use harness::{heavy_lock, wait_for, ClusterOptions, TestCluster};

const COLUMNS: &str = "id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now()";

fn cluster_with(n: usize, replication_toml: &str) -> TestCluster {
    let mut c = TestCluster::prepare(
        n,
        ClusterOptions {
            replication_toml: replication_toml.into(),
            ..ClusterOptions::default()
        },
    );
    c.create_table("t", COLUMNS);
    c.start_pgmm();
    c
}

/// Peak resident memory of a process, in MiB (`VmHWM`).
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024
}

fn metric(c: &TestCluster, i: usize, series: &str) -> f64 {
    c.metric(i, series).unwrap_or(0.0)
}

/// Two million rows in one transaction: with one frame per transaction this was a 90 MB frame,
/// refused by the link forever. Both nodes' pgmm stay within a bound set by configuration
/// (chunks of 4 MiB, 16 MiB of queue), far below the transaction's size.
#[test]
fn a_two_million_row_transaction_replicates_in_bounded_memory() {
    const ROWS: usize = 2_000_000;
    let _turn = heavy_lock();
    let c = cluster_with(2, "");
    c.exec(
        0,
        &format!("INSERT INTO t (id) SELECT g FROM generate_series(1, {ROWS}) g"),
    );
    let sum = c.wait_converged_within("t", ROWS, Duration::from_secs(600));
    assert_eq!(sum, c.checksum(0, "t"));
    assert_eq!(
        metric(&c, 1, "pgmm_transactions_applied_total{peer=\"a\"}"),
        1.0,
        "one transaction, applied once"
    );
    assert_eq!(
        metric(&c, 1, "pgmm_changes_applied_total{peer=\"a\"}"),
        ROWS as f64
    );
    assert!(c.conflicts(1).is_empty(), "{:?}", c.conflicts(1));
    for i in 0..2 {
        let peak = peak_rss_mib(c.pgmm(i).pid());
        eprintln!("peak RSS of {:?}'s pgmm: {peak} MiB", c.name(i));
        assert!(
            peak < 128,
            "{:?}'s pgmm peaked at {peak} MiB for a transaction of about 90 MB",
            c.name(i)
        );
    }
}

/// A value of 80 MiB: more than a frame. It travels in pieces and arrives byte for byte, and
/// the small rows of the same transaction with it.
#[test]
fn a_value_larger_than_a_frame_replicates() {
    let _turn = heavy_lock();
    let c = cluster_with(2, "");
    // Random-looking text, so that neither TOAST compression nor a shortcut hides the size.
    c.exec(
        0,
        "BEGIN; \
         INSERT INTO t (id, v) SELECT 1, string_agg(md5(g::text), '') \
           FROM generate_series(1, 80 * 1024 * 1024 / 32) g; \
         INSERT INTO t (id, v) SELECT g, 'small ' || g FROM generate_series(2, 100) g; \
         COMMIT",
    );
    c.wait_converged_within("t", 100, Duration::from_secs(300));
    let digest = "SELECT length(v) || ':' || md5(v) FROM t WHERE id = 1";
    // A row of twenty values just under a chunk each: 70 MiB, more than a frame, with no value
    // larger than a chunk.
    let columns: Vec<String> = (1..=20).map(|i| format!("c{i} text")).collect();
    c.exec_all(&format!(
        "CREATE TABLE w (id int PRIMARY KEY, {}, updated_at timestamptz NOT NULL DEFAULT now())",
        columns.join(", ")
    ));
    c.wait_enrolled("w");
    let names: Vec<String> = (1..=20).map(|i| format!("c{i}")).collect();
    c.exec(
        0,
        &format!(
            "WITH v AS (SELECT string_agg(md5(g::text), '') AS s                FROM generate_series(1, 3500 * 1024 / 32) g)              INSERT INTO w (id, {}) SELECT 1, {} FROM v",
            names.join(", "),
            (1..=20).map(|i| format!("{i} || s")).collect::<Vec<_>>().join(", ")
        ),
    );
    c.wait_converged_within("w", 1, Duration::from_secs(300));
    assert_eq!(c.scalar(1, digest), c.scalar(0, digest));
    assert_eq!(
        c.scalar(1, "SELECT length(v) FROM t WHERE id = 1"),
        (80 * 1024 * 1024).to_string()
    );
}

/// SIGKILL of the receiving pgmm while it is applying a chunked transaction: its local
/// transaction dies with it, the sender sends the transaction again from its start, and every
/// row arrives exactly once.
#[test]
fn sigkill_of_the_receiver_in_the_middle_of_a_chunked_transaction_loses_and_doubles_nothing() {
    const ROWS: usize = 300_000;
    let _turn = heavy_lock();
    let mut c = cluster_with(2, "chunk_bytes = 65536\napply_queue_bytes = 131072");
    c.exec(
        0,
        &format!("INSERT INTO t (id, v) SELECT g, 'row ' || g FROM generate_series(1, {ROWS}) g"),
    );
    // The apply session has written (it has an xid) and not committed: mid-transaction.
    wait_for(
        "b's apply session inside the transaction",
        Duration::from_secs(120),
        || {
            let n = c.scalar(
                1,
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'pgmm apply from a' AND backend_xid IS NOT NULL",
            );
            let rows = c.scalar(1, "SELECT count(*) FROM t");
            match (n.as_str(), rows.as_str()) {
                ("1", "0") => Ok(()),
                (_, "0") => Err(format!("{n} apply sessions in a transaction")),
                _ => Err(format!(
                    "the transaction committed ({rows} rows) before the kill"
                )),
            }
        },
    );
    c.pgmm_mut(1).kill();
    // Postgres notices the dead client and rolls its transaction back.
    wait_for(
        "the killed pgmm's apply session to end",
        Duration::from_secs(60),
        || {
            let n = c.scalar(
                1,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgmm apply from a'",
            );
            if n == "0" {
                Ok(())
            } else {
                Err(format!("{n} sessions"))
            }
        },
    );
    assert_eq!(c.scalar(1, "SELECT count(*) FROM t"), "0");
    c.pgmm_mut(1).restart();
    let sum = c.wait_converged_within("t", ROWS, Duration::from_secs(300));
    assert_eq!(sum, c.checksum(0, "t"));
    assert_eq!(
        c.scalar(
            1,
            "SELECT count(DISTINCT id) || ':' || min(id) || ':' || max(id) FROM t"
        ),
        format!("{ROWS}:1:{ROWS}")
    );
    assert!(c.conflicts(1).is_empty(), "{:?}", c.conflicts(1));
}

/// Conflicts inside a chunked transaction are found and resolved as in a small one: a's big
/// transaction updates a row b changed earlier (a's later write wins) and a row b changes later
/// (b's wins), in the middle of many inserts. Every node ends the same, and b records both.
#[test]
fn conflicts_inside_a_chunked_transaction_are_resolved_by_last_writer_wins() {
    let _turn = heavy_lock();
    let mut c = cluster_with(2, "chunk_bytes = 65536");
    c.exec(
        0,
        "INSERT INTO t (id, v) SELECT g, 'start' FROM generate_series(1, 1000) g",
    );
    c.wait_converged("t", 1000);
    c.pgmm_mut(1).terminate();
    c.pgmm_mut(1).wait_exit(Duration::from_secs(30));
    // b's writes go straight to its Postgres (its slot keeps them) while its pgmm is down.
    c.exec(1, "UPDATE t SET v = 'b early' WHERE id = 500");
    c.exec(
        0,
        "BEGIN; \
         INSERT INTO t (id, v) SELECT g, 'bulk ' || g FROM generate_series(1001, 30000) g; \
         UPDATE t SET v = 'a' WHERE id IN (500, 700); \
         INSERT INTO t (id, v) SELECT g, 'bulk ' || g FROM generate_series(30001, 60000) g; \
         COMMIT",
    );
    c.exec(1, "UPDATE t SET v = 'b late' WHERE id = 700");
    c.pgmm_mut(1).restart();
    c.wait_converged_within("t", 60_000, Duration::from_secs(300));
    for i in 0..2 {
        assert_eq!(
            c.scalar(
                i,
                "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t WHERE id IN (500, 700)"
            ),
            "500=a,700=b late",
            "on {:?}",
            c.name(i)
        );
    }
    let conflicts = c.conflicts(1);
    assert_eq!(conflicts.len(), 2, "b's conflicts: {conflicts:?}");
    assert!(
        metric(&c, 1, "pgmm_apply_batches_total{path=\"full\",peer=\"a\"}") >= 1.0,
        "the transaction with conflicts went by the full statements"
    );
}
