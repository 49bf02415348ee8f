//! End-to-end tests of conflict resolution and ownership: clusters of real PostgreSQL servers,
//! each with a `pgmm serve` child process, fully meshed. A node is cut off by stopping its pgmm
//! (its Postgres keeps taking writes, which its slots keep for the peers); healing is starting
//! it again.

use crate::harness;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harness::{heavy_lock, wait_for, ClusterOptions, TestCluster};

const COLUMNS: &str = "id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now()";

fn cluster_with(n: usize, opts: ClusterOptions, tables: &[(&str, &str)]) -> TestCluster {
    let mut c = TestCluster::prepare(n, opts);
    for (table, columns) in tables {
        c.create_table(table, columns);
    }
    c.start_pgmm();
    c
}

/// `id=v,...` in key order.
fn content(c: &TestCluster, i: usize, table: &str) -> String {
    c.scalar(
        i,
        &format!("SELECT coalesce(string_agg(id || '=' || v, ',' ORDER BY id), '') FROM {table}"),
    )
}

/// The conflicts node `i` recorded, as "kind resolution" sorted (their order depends on timing
/// only where it does not matter).
fn conflict_set(c: &TestCluster, i: usize) -> Vec<String> {
    let mut v: Vec<String> = c
        .rows(
            i,
            "SELECT kind || ' ' || resolution || ' ' || \
                    coalesce(remote_tuple->>'id', local_tuple->>'id', '?') \
             FROM pgmm.conflicts",
        )
        .into_iter()
        .map(|mut r| r.remove(0))
        .collect();
    v.sort();
    v
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Waits until node `i` has recorded exactly `expected` conflicts.
fn wait_conflicts(c: &TestCluster, i: usize, expected: &[&str]) {
    let expected = sorted(expected);
    wait_for(
        &format!("conflicts on node {:?}", c.name(i)),
        Duration::from_secs(60),
        || {
            let seen = conflict_set(c, i);
            if seen == expected {
                Ok(())
            } else {
                Err(format!("expected {expected:?}, seen {seen:?}"))
            }
        },
    );
}

/// `pgmm_conflicts_total` of node `i`, summed over its series.
fn conflicts_counted(c: &TestCluster, i: usize) -> f64 {
    c.pgmm(i)
        .metrics()
        .lines()
        .filter(|l| l.starts_with("pgmm_conflicts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn conflicting_writes_during_a_partition_resolve_by_last_writer_wins_everywhere() {
    let _heavy = heavy_lock();
    let mut c = cluster_with(3, ClusterOptions::default(), &[("t", COLUMNS)]);
    let a = c.front_door(0);
    a.exec("INSERT INTO t (id, v) VALUES (1, 'v1'), (2, 'v2'), (3, 'v3'), (4, 'v4')");
    c.wait_converged("t", 4);

    // c is cut off; both sides write the same rows, the side named first writes first.
    c.pgmm_mut(2).kill();
    c.exec(2, "UPDATE t SET v = 'c1' WHERE id = 1"); // update vs update: a's later one wins
    c.exec(2, "INSERT INTO t (id, v) VALUES (10, 'c10')"); // insert vs insert: a's wins
    c.exec(2, "UPDATE t SET v = 'c3' WHERE id = 3"); // update vs delete: a's later delete wins
    c.exec(2, "DELETE FROM t WHERE id = 4"); // delete vs update: a's later update wins
    a.exec("UPDATE t SET v = 'a2' WHERE id = 2"); // update vs update: c's later one wins
    a.exec("UPDATE t SET v = 'a1' WHERE id = 1");
    a.exec("INSERT INTO t (id, v) VALUES (10, 'a10')");
    a.exec("DELETE FROM t WHERE id = 3");
    a.exec("UPDATE t SET v = 'a4' WHERE id = 4");
    c.exec(2, "UPDATE t SET v = 'c2' WHERE id = 2");
    // b has a's writes before c's arrive (otherwise b sees them in either order).
    c.wait_converged_on("t", &[0, 1], 4, Duration::from_secs(60));

    c.pgmm_mut(2).restart();
    let expected = "1=a1,2=c2,4=a4,10=a10";
    c.wait_all(
        "t after healing",
        "SELECT coalesce(string_agg(id || '=' || v, ',' ORDER BY id), '') FROM t",
        expected,
    );
    c.wait_converged("t", 4);

    // a and b see c's writes arrive late: every one of them is a conflict, and only c's newer
    // update of row 2 wins.
    let late = [
        "update_origin_differs keep_local 1",
        "update_origin_differs apply_remote 2",
        "update_deleted skip 3",
        "delete_origin_differs keep_local 4",
        "insert_exists keep_local 10",
    ];
    wait_conflicts(&c, 0, &late);
    wait_conflicts(&c, 1, &late);
    // c sees a's writes arrive over its own.
    wait_conflicts(
        &c,
        2,
        &[
            "update_origin_differs apply_remote 1",
            "update_origin_differs keep_local 2",
            "delete_origin_differs apply_remote 3",
            "update_missing apply_remote 4",
            "insert_exists apply_remote 10",
        ],
    );
    for i in 0..3 {
        assert_eq!(
            conflicts_counted(&c, i),
            5.0,
            "pgmm_conflicts_total on node {i}"
        );
        // A conflict is never decided on the fast path: its batch went the full way.
        let full: f64 = c
            .pgmm(i)
            .metrics()
            .lines()
            .filter(|l| l.starts_with("pgmm_apply_batches_total{path=\"full\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(
            full >= 1.0,
            "pgmm_apply_batches_total{{path=\"full\"}} on node {i}: {full}"
        );
    }
    // Both tuples are logged: the local one as it was, the remote one as it came.
    assert_eq!(
        c.scalar(
            0,
            "SELECT (local_tuple->>'v') || ' ' || (remote_tuple->>'v') FROM pgmm.conflicts \
             WHERE kind = 'insert_exists'"
        ),
        "a10 c10"
    );
    // The deleted row left a tombstone on every node, from the delete that won.
    for i in 0..3 {
        assert_eq!(
            c.scalar(
                i,
                "SELECT key::text || ' ' || origin FROM pgmm.tombstones ORDER BY key::text LIMIT 1"
            ),
            "[\"3\"] a",
            "tombstone on node {i}"
        );
    }
}

/// The reproduction of a data loss on PostgreSQL 16+: a batch that mixes conflict-free changes
/// with conflicting ones misses on the fast path and is rolled back, which on 16+ advanced the
/// replication origin past it; progress kept there then refused the batch for good, and
/// neither side's new rows ever reached the other. Progress kept in `pgmm.applied` commits and
/// aborts with the data.
#[test]
fn a_batch_of_new_rows_and_conflicting_updates_is_applied_after_its_fast_attempt_rolls_back() {
    let _heavy = heavy_lock();
    let mut c = cluster_with(2, ClusterOptions::default(), &[("t", COLUMNS)]);
    let a = c.front_door(0);
    a.exec("INSERT INTO t (id, v) SELECT g, 'base' FROM generate_series(1, 40) g");
    c.wait_converged("t", 40);

    c.pgmm_mut(1).kill();
    for i in 1..=40 {
        c.exec(
            1,
            &format!(
                "BEGIN; INSERT INTO t (id, v) VALUES ({}, 'new from b'); \
                 UPDATE t SET v = 'b' WHERE id = {i}; COMMIT",
                1000 + i
            ),
        );
    }
    // a's updates come after b's, so they win everywhere.
    a.exec("UPDATE t SET v = 'a' WHERE id <= 40");
    c.pgmm_mut(1).restart();

    let expected = "40 a, 40 new from b";
    c.wait_all(
        "every row on both nodes",
        "SELECT string_agg(n || ' ' || v, ', ' ORDER BY v) FROM \
         (SELECT v, count(*) n FROM t GROUP BY v) s",
        expected,
    );
    c.wait_converged("t", 80);
    for i in 0..2 {
        // The progress record and the replication origin agree once apply is idle.
        let peer = c.name(1 - i).to_owned();
        c.wait_nodes(
            "the origin's progress at the progress record",
            &[i],
            &format!(
                "SELECT (end_lsn = coalesce(pg_replication_origin_progress('pgmm_{peer}', false), \
                 '0/0'))::text FROM pgmm.applied WHERE origin = '{peer}'"
            ),
            "true",
        );
    }
    // Each of a's updates conflicted with b's on both sides, and nothing else did.
    assert_eq!(conflicts_counted(&c, 0), 40.0, "conflicts on a");
    assert_eq!(conflicts_counted(&c, 1), 40.0, "conflicts on b");
}

/// A value large enough to be stored out of line even after compression (md5 hex of random
/// numbers compresses little).
const BIG: &str = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400))";

/// An update that leaves a TOASTed column untouched carries no value for it (pgoutput's
/// "unchanged"). Where it wins over a version the receiver wrote itself, the receiver must not
/// keep its own large value under the winner's stamp, nor fail to insert the winner over its
/// own delete: the origin ships the value, and every node ends byte-identical.
#[test]
fn an_update_that_leaves_a_large_value_unchanged_wins_whole_over_a_concurrent_version() {
    let _heavy = heavy_lock();
    let big_columns =
        "id int PRIMARY KEY, v text, big text, updated_at timestamptz NOT NULL DEFAULT now()";
    let mut c = cluster_with(2, ClusterOptions::default(), &[("t", big_columns)]);
    let a = c.front_door(0);
    a.exec(&format!(
        "INSERT INTO t (id, v, big) SELECT g, 'base', {BIG} FROM generate_series(1, 3) g"
    ));
    c.wait_converged("t", 3);
    let original = |c: &TestCluster, i: usize, id: i32| {
        c.scalar(i, &format!("SELECT md5(big) FROM t WHERE id = {id}"))
    };
    let (big1, big2) = (original(&c, 0, 1), original(&c, 0, 2));

    // b is cut off: it rewrites row 1's large value and deletes row 2; then a updates only the
    // small column of both (later, so a wins), and of row 3 where b did nothing.
    c.pgmm_mut(1).kill();
    c.exec(
        1,
        &format!("UPDATE t SET v = 'b', big = {BIG} WHERE id = 1"),
    );
    c.exec(1, "DELETE FROM t WHERE id = 2");
    a.exec("UPDATE t SET v = 'a' WHERE id IN (1, 2, 3)");
    c.pgmm_mut(1).restart();

    c.wait_all(
        "a's updates everywhere",
        "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t",
        "1=a,2=a,3=a",
    );
    c.wait_converged("t", 3);
    for i in 0..2 {
        assert_eq!(original(&c, i, 1), big1, "row 1's large value on node {i}");
        assert_eq!(original(&c, i, 2), big2, "row 2's large value on node {i}");
    }
    assert_eq!(
        conflict_set(&c, 1),
        sorted(&[
            "update_origin_differs apply_remote 1",
            "update_missing apply_remote 2"
        ]),
        "b applies a's versions whole"
    );
}

#[test]
fn sequential_writes_through_different_nodes_are_not_conflicts() {
    let c = cluster_with(3, ClusterOptions::default(), &[("t", COLUMNS)]);
    let nodes: Vec<_> = (0..3).map(|i| c.front_door(i)).collect();
    nodes[0].exec("INSERT INTO t (id, v) VALUES (1, 'a')");
    c.wait_all("row 1", "SELECT string_agg(v, ',') FROM t", "a");
    nodes[1].exec("UPDATE t SET v = 'b' WHERE id = 1");
    c.wait_all("row 1", "SELECT string_agg(v, ',') FROM t", "b");
    nodes[2].exec("UPDATE t SET v = 'c' WHERE id = 1");
    c.wait_all("row 1", "SELECT string_agg(v, ',') FROM t", "c");
    nodes[0].exec("DELETE FROM t WHERE id = 1");
    c.wait_converged("t", 0);
    nodes[1].exec("INSERT INTO t (id, v) VALUES (1, 'again')");
    c.wait_converged("t", 1);
    for i in 0..3 {
        assert_eq!(
            c.conflicts(i),
            Vec::<String>::new(),
            "conflicts on node {i}"
        );
    }
}

#[test]
fn a_clock_running_behind_does_not_lose_a_causally_later_write() {
    let c = cluster_with(3, ClusterOptions::default(), &[("t", COLUMNS)]);
    // Node c's stamps run 5 s behind the others'.
    c.exec(
        2,
        "CREATE OR REPLACE FUNCTION pgmm.clock() RETURNS timestamptz LANGUAGE sql VOLATILE \
         AS $$ SELECT clock_timestamp() - interval '5 seconds' $$",
    );
    let (a, cc) = (c.front_door(0), c.front_door(2));
    a.exec("INSERT INTO t (id, v) VALUES (1, 'from a')");
    c.wait_all(
        "row 1 everywhere",
        "SELECT string_agg(v, ',') FROM t",
        "from a",
    );
    // c writes after having seen a's version: with its clock alone it would look 5 s older.
    cc.exec("UPDATE t SET v = 'from c, later' WHERE id = 1");
    c.wait_all(
        "c's later write everywhere",
        "SELECT string_agg(v, ',') FROM t",
        "from c, later",
    );
    c.wait_converged("t", 1);
    // Its stamp is just past a's, not 5 s behind it.
    let gap: f64 = c
        .scalar(
            0,
            "SELECT extract(epoch FROM updated_at - now())::float8 FROM t",
        )
        .parse()
        .unwrap();
    assert!(
        gap > -4.0,
        "c's stamp should follow a's, not its own clock: {gap}"
    );
    // A delete from c after that is later too.
    cc.exec("DELETE FROM t WHERE id = 1");
    c.wait_converged("t", 0);
    for i in 0..3 {
        assert_eq!(
            c.conflicts(i),
            Vec::<String>::new(),
            "conflicts on node {i}"
        );
    }
}

/// The newest write made to a key: (stamp, node), and the row it left (`None`: deleted).
type Newest = BTreeMap<i32, ((String, String), Option<String>)>;

/// Seeded (the seed is printed; replay with PGMM_TEST_SEED), on whatever PostgreSQL the suite
/// runs on: three nodes write random transactions (single changes, and ones that mix
/// conflict-free changes with conflicting ones), rows carry a large value that most updates leave
/// untouched (unchanged TOAST), and between rounds a pgmm is SIGKILLed or healed and a node's
/// Postgres crashes (a backend SIGKILLed, so the server resets every session mid-batch, apply
/// included). In the end every node holds, for every key, the newest acknowledged write
/// (last-writer-wins on (updated_at, node)), large values included, byte-identical.
#[test]
fn random_writes_with_random_link_drops_converge_to_the_newest_write() {
    let _heavy = heavy_lock();
    let seed = std::env::var("PGMM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("random_writes seed: {seed} (replay with PGMM_TEST_SEED={seed})");
    let result = std::panic::catch_unwind(|| random_run(seed));
    if let Err(panic) = result {
        eprintln!("random_writes FAILED with seed {seed} (replay with PGMM_TEST_SEED={seed})");
        std::panic::resume_unwind(panic);
    }
}

/// Crashes node `i`'s Postgres: one backend is SIGKILLed, which makes the postmaster end every
/// session and recover, as after a crash (pgmm's apply session first, when it has one). Waits
/// until it accepts connections again.
fn crash_postgres(c: &TestCluster, i: usize) {
    // Every child of the postmaster starts anew after a crash, the checkpointer too: its start
    // time tells a recovered server from one that has not noticed the crash yet.
    const CHECKPOINTER: &str =
        "SELECT backend_start::text FROM pg_stat_activity WHERE backend_type = 'checkpointer'";
    let before = c.scalar(i, CHECKPOINTER);
    let pid: i32 = c
        .scalar(
            i,
            "SELECT coalesce((SELECT pid FROM pg_stat_activity \
             WHERE application_name LIKE 'pgmm apply%' LIMIT 1), pg_backend_pid())",
        )
        .parse()
        .expect("a pid");
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).expect("a positive pid"),
        rustix::process::Signal::KILL,
    );
    wait_for(
        &format!("node {:?}'s Postgres back after its crash", c.name(i)),
        Duration::from_secs(60),
        || match c.try_scalar(i, CHECKPOINTER) {
            Ok(Some(now)) if now != before => Ok(()),
            other => Err(format!(
                "checkpointer started at {other:?}, before the crash {before}"
            )),
        },
    );
}

fn random_run(seed: u64) {
    const KEYS: u64 = 12;
    const ROUNDS: usize = 8;
    const WRITES: usize = 16;
    // Stamps as text in UTC at microsecond precision sort like the timestamps themselves.
    const STAMP: &str = "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')";
    // A row as the oracle and the check see it: the small value and a digest of the large one.
    const ROW: &str = "id, v || ':' || coalesce(md5(big), '-')";
    // Seeded, so a failure can be replayed from its seed.
    let mut rng = fastrand::Rng::with_seed(seed);
    let columns =
        "id int PRIMARY KEY, v text, big text, updated_at timestamptz NOT NULL DEFAULT now()";
    // Postgres crashes below: a commit must be durable when it is acknowledged (the harness's
    // default of asynchronous commit would lose the last moments of writes in a crash, in
    // Postgres itself). pgmm's apply commits asynchronously and acknowledges only after a
    // synchronous commit, whatever this says.
    let mut opts = ClusterOptions::default();
    opts.pg.extra_conf.push("synchronous_commit = on".into());
    let mut c = cluster_with(3, opts, &[("t", columns)]);
    let mut newest: Newest = BTreeMap::new();
    let mut record = |key: i32, stamp: String, node: &str, row: Option<String>| {
        let version = (stamp, node.to_owned());
        match newest.get(&key) {
            Some((v, _)) if *v >= version => {}
            _ => {
                newest.insert(key, (version, row));
            }
        }
    };
    let mut down: Option<usize> = None;
    for round in 0..ROUNDS {
        // Cut one node off, or heal, at random; now and then crash a node's Postgres.
        match (down, rng.u64(..3)) {
            (None, 0) | (None, 1) => {
                let victim = rng.u64(..3) as usize;
                c.pgmm_mut(victim).kill();
                down = Some(victim);
            }
            (Some(victim), 0) => {
                c.pgmm_mut(victim).restart();
                down = None;
            }
            _ => {}
        }
        for w in 0..WRITES {
            let node = rng.u64(..3) as usize;
            let key = rng.u64(..KEYS) as i32 + 1;
            let name = c.name(node).to_owned();
            let value = format!("{name}{round}.{w}");
            // A new large value now and then; most writes leave it as it is.
            let big = if rng.u64(..3) == 0 {
                format!(
                    "(SELECT string_agg(md5('{value}' || i), '') FROM generate_series(1, 200) i)"
                )
            } else {
                "t.big".to_owned()
            };
            let upsert = |key: i32, value: &str| {
                format!(
                    "INSERT INTO t AS t (id, v, big) VALUES ({key}, '{value}', NULL) \
                     ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, big = {big} \
                     RETURNING {ROW}, {STAMP}"
                )
            };
            let written: Vec<Vec<String>> = match rng.u64(..5) {
                0 => {
                    let deleted = c.rows(
                        node,
                        &format!("DELETE FROM t WHERE id = {key} RETURNING id"),
                    );
                    if !deleted.is_empty() {
                        let stamp = c.scalar(
                            node,
                            &format!(
                                "SELECT to_char(deleted_at AT TIME ZONE 'UTC', \
                                 'YYYY-MM-DD HH24:MI:SS.US') FROM pgmm.tombstones \
                                 WHERE table_name = 'public.t' AND key = jsonb_build_array('{key}')"
                            ),
                        );
                        record(key, stamp, &name, None);
                    }
                    Vec::new()
                }
                1 => c.rows(
                    node,
                    &format!(
                        "UPDATE t SET v = '{value}' WHERE id = {key} RETURNING {ROW}, {STAMP}"
                    ),
                ),
                2 => {
                    // One transaction: a fresh key of this node's own (never a conflict) and a
                    // shared one (often a conflict), so that a batch mixes both.
                    let own = 1000 * (node as i32 + 1) + (round * WRITES + w) as i32;
                    c.rows(
                        node,
                        &format!(
                            "BEGIN; {}; {}; COMMIT",
                            upsert(own, &value),
                            upsert(key, &value)
                        ),
                    )
                }
                _ => c.rows(node, &upsert(key, &value)),
            };
            for row in written {
                record(
                    row[0].parse().expect("an id"),
                    row[2].clone(),
                    &name,
                    Some(row[1].clone()),
                );
            }
        }
        if rng.u64(..3) == 0 {
            crash_postgres(&c, rng.u64(..3) as usize);
        }
    }
    if let Some(victim) = down {
        c.pgmm_mut(victim).restart();
    }
    let expected: String = newest
        .iter()
        .filter_map(|(k, (_, v))| v.as_ref().map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(",");
    let rows = newest.values().filter(|(_, v)| v.is_some()).count();
    let content = format!(
        "SELECT coalesce(string_agg(id || '=' || r, ',' ORDER BY id), '') FROM \
         (SELECT {ROW} AS r FROM t) s"
    );
    // Two minutes: the last restart's peers may be deep in their reconnect backoff, on a loaded
    // machine. On a timeout, every node's rows and conflicts are printed with the seed.
    wait_for(
        "every row equal to its newest write",
        Duration::from_secs(120),
        || {
            let seen: Vec<String> = (0..3)
                .map(|i| {
                    c.try_scalar(i, &content)
                        .map(|v| v.unwrap_or_default())
                        .unwrap_or_else(|e| format!("error: {e}"))
                })
                .collect();
            if seen.iter().all(|v| *v == expected) {
                Ok(())
            } else {
                let conflicts: Vec<Vec<String>> = (0..3).map(|i| c.conflicts(i)).collect();
                Err(format!(
                    "seed {seed}: expected {expected}\nseen {seen:#?}\nnewest {newest:?}\nconflicts {conflicts:#?}"
                ))
            }
        },
    );
    // Byte-identical, `updated_at` and the large values included.
    c.wait_converged_within("t", rows, Duration::from_secs(90));
}

/// Ownership rules for the guard and apply tests: `owned` belongs to b, `acct` rows to the node
/// in `home`, `ord` rows by `id % 3` over [a, b, c].
fn owned_cluster() -> TestCluster {
    let opts = ClusterOptions {
        extra_toml: "[[ownership]]\ntable = \"owned\"\nowner = \"b\"\n\n\
                     [[ownership]]\ntable = \"acct\"\nowner_column = \"home\"\n\n\
                     [[ownership]]\ntable = \"ord\"\nowner_key = \"id\"\n"
            .into(),
        ..ClusterOptions::default()
    };
    cluster_with(
        3,
        opts,
        &[
            ("owned", COLUMNS),
            ("free", COLUMNS),
            (
                "acct",
                "id int PRIMARY KEY, home text NOT NULL, v text, updated_at timestamptz",
            ),
            (
                "ord",
                "id bigserial PRIMARY KEY, v text, updated_at timestamptz",
            ),
        ],
    )
}

fn refused(db: &harness::Db, sql: &str) -> String {
    match db.execute(sql) {
        Ok(()) => panic!("{sql} was not refused"),
        Err(e) => e,
    }
}

#[test]
fn guard_triggers_refuse_writes_that_bypass_the_front_door() {
    let c = owned_cluster();
    // Direct connections to node a's Postgres: pgmm's front door never sees these.
    let a = c.db(0);
    let msg_b = "table \"public.owned\" is owned by node \"b\"; write it through node \"b\"";
    for sql in [
        "INSERT INTO owned (id, v) VALUES (1, 'x')",
        "WITH w AS (INSERT INTO owned (id, v) VALUES (2, 'x') RETURNING 1) SELECT count(*) FROM w",
        "DO $$ BEGIN INSERT INTO owned (id, v) VALUES (3, 'x'); END $$",
        "TRUNCATE owned",
    ] {
        let e = refused(&a, sql);
        assert!(e.contains("42501") && e.contains(msg_b), "{sql}: {e}");
    }
    // The owner writes it; a may not change what it received.
    c.front_door(1)
        .exec("INSERT INTO owned (id, v) VALUES (1, 'by b')");
    c.wait_converged("owned", 1);
    let e = refused(&a, "UPDATE owned SET v = 'by a' WHERE id = 1");
    assert!(e.contains(msg_b), "{e}");
    let e = refused(&a, "DELETE FROM owned");
    assert!(e.contains(msg_b), "{e}");

    // Row ownership by column.
    a.exec("INSERT INTO acct (id, home, v) VALUES (1, 'a', 'mine')");
    let e = refused(
        &a,
        "INSERT INTO acct (id, home, v) VALUES (2, 'b', 'theirs')",
    );
    assert!(
        e.contains("42501")
            && e.contains("row (id)=(2) of \"public.acct\" is owned by node \"b\"; write it through node \"b\""),
        "{e}"
    );
    let e = refused(&a, "UPDATE acct SET home = 'c' WHERE id = 1");
    assert!(e.contains("owned by node \"c\""), "{e}");
    c.front_door(1)
        .exec("INSERT INTO acct (id, home, v) VALUES (3, 'b', 'b''s')");
    c.wait_converged("acct", 2);
    assert!(refused(&a, "UPDATE acct SET v = 'x' WHERE id = 3").contains("owned by node \"b\""));
    assert!(refused(&a, "DELETE FROM acct WHERE id = 3").contains("owned by node \"b\""));
    assert!(refused(&a, "TRUNCATE acct").contains("42501"));

    // Through the front door, an INSERT whose owner is a literal is refused before Postgres
    // sees it (the message names the owner column, where the trigger's names the key), and
    // counted; one with a bound parameter is left to the trigger.
    let fd = c.front_door(0);
    let e = refused(&fd, "INSERT INTO acct (id, home, v) VALUES (5, 'b', 'x')");
    assert!(
        e.contains("42501")
            && e.contains("row (home)=(b) of \"public.acct\" is owned by node \"b\""),
        "{e}"
    );
    assert_eq!(
        c.metric(0, "pgmm_ownership_rejections_total{table=\"public.acct\"}"),
        Some(1.0)
    );
    let e = refused(&fd, "INSERT INTO ord (id, v) VALUES (4, 'x')");
    assert!(
        e.contains("row (id)=(4) of \"public.ord\" is owned by node \"b\""),
        "{e}"
    );

    // Prepared statements with the owner as a bound parameter (tokio-postgres sends them in
    // binary): refused at the Bind, counted, and the session goes on.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            &c.pgmm(0).conninfo("postgres", "postgres"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let insert = client
            .prepare("INSERT INTO acct (id, home, v) VALUES ($1, $2, $3)")
            .await
            .unwrap();
        let e = client
            .execute(&insert, &[&6i32, &"c", &"x"])
            .await
            .unwrap_err();
        let db = e.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "42501");
        assert_eq!(
            db.message(),
            "row (home)=(c) of \"public.acct\" is owned by node \"c\"; write it through node \"c\""
        );
        assert_eq!(
            client
                .execute(&insert, &[&6i32, &"a", &"mine too"])
                .await
                .unwrap(),
            1
        );
        let ord = client
            .prepare("INSERT INTO ord (id, v) VALUES ($1, $2)")
            .await
            .unwrap();
        let e = client.execute(&ord, &[&5i64, &"x"]).await.unwrap_err();
        assert!(
            e.as_db_error()
                .unwrap()
                .message()
                .starts_with("row (id)=(5) of \"public.ord\" is owned by node \"c\""),
            "{e:?}"
        );
        drop(client);
        let _ = conn.await;
    });
    assert_eq!(
        c.metric(0, "pgmm_ownership_rejections_total{table=\"public.acct\"}"),
        Some(2.0)
    );

    // Row ownership by key: a is node 0 of 3, its sequence hands out only multiples of 3.
    let ids = c.rows(0, "INSERT INTO ord (v) VALUES ('x'), ('y') RETURNING id");
    let ids: Vec<i64> = ids.iter().map(|r| r[0].parse().unwrap()).collect();
    assert!(ids.iter().all(|id| id % 3 == 0), "node a's keys: {ids:?}");
    let b_ids = c.rows(1, "INSERT INTO ord (v) VALUES ('z') RETURNING id");
    assert_eq!(b_ids[0][0].parse::<i64>().unwrap() % 3, 1);
    let e = refused(&a, "INSERT INTO ord (id, v) VALUES (7, 'b''s key')");
    assert!(
        e.contains("row (id)=(7) of \"public.ord\" is owned by node \"b\""),
        "{e}"
    );
    c.wait_converged("ord", 3);
    // Nothing refused was written anywhere, and nothing is recorded as a violation.
    c.wait_converged("owned", 1);
    for i in 0..3 {
        assert_eq!(c.conflicts(i), Vec::<String>::new(), "node {i}");
    }
}

#[test]
fn a_change_its_origin_may_not_make_is_refused_by_every_peer() {
    let c = owned_cluster();
    c.front_door(1)
        .exec("INSERT INTO acct (id, home, v) VALUES (3, 'b', 'b''s')");
    c.wait_converged("acct", 1);
    // A rogue node a: a session that turns pgmm's guard triggers off (what a superuser can do)
    // writes a table owned by b, a row owned by b, a key owned by c, and b's existing row.
    c.exec(
        0,
        "SET session_replication_role = replica; \
         INSERT INTO owned (id, v) VALUES (1, 'rogue'); \
         INSERT INTO acct (id, home, v) VALUES (2, 'b', 'rogue'); \
         INSERT INTO ord (id, v) VALUES (2, 'rogue'); \
         UPDATE acct SET v = 'rogue' WHERE id = 3; \
         SET session_replication_role = origin;",
    );
    // The stream goes on: a's next legitimate write arrives everywhere.
    c.front_door(0)
        .exec("INSERT INTO free (id, v) VALUES (1, 'after')");
    c.wait_converged("free", 1);
    for i in [1, 2] {
        wait_conflicts(
            &c,
            i,
            &[
                "ownership_violation skip 1",
                "ownership_violation skip 2",
                "ownership_violation skip 2",
                "ownership_violation skip 3",
            ],
        );
        assert_eq!(c.scalar(i, "SELECT count(*) FROM owned"), "0");
        assert_eq!(content(&c, i, "acct"), "3=b's");
        assert_eq!(c.scalar(i, "SELECT count(*) FROM ord"), "0");
        assert_eq!(
            c.metric(
                i,
                "pgmm_conflicts_total{kind=\"ownership_violation\",resolution=\"skip\",table=\"public.acct\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            c.scalar(i, "SELECT DISTINCT origin FROM pgmm.conflicts"),
            "a"
        );
    }
}

#[test]
fn tombstones_are_purged_only_when_old_enough_and_every_peer_has_passed_them() {
    let c = cluster_with(2, ClusterOptions::default(), &[("t", COLUMNS)]);
    let a = c.front_door(0);
    a.exec("INSERT INTO t (id, v) VALUES (1, 'x')");
    c.wait_converged("t", 1);
    a.exec("DELETE FROM t WHERE id = 1");
    c.wait_converged("t", 0);
    // b has applied the delete; wait until a's slot for b has confirmed past the tombstone.
    c.wait_nodes(
        "a's slot for b past the tombstone",
        &[0],
        "SELECT count(*) FROM pgmm.tombstones t, pg_replication_slots s \
         WHERE s.slot_name = 'pgmm_b' AND s.confirmed_flush_lsn > t.local_lsn",
        "1",
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let purged = |slots: &[&str], retention: &str| -> u64 {
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(
                &c.pg(0).conninfo("postgres", "postgres"),
                tokio_postgres::NoTls,
            )
            .await
            .unwrap();
            let conn = tokio::spawn(conn);
            let slots: Vec<String> = slots.iter().map(|s| s.to_string()).collect();
            let n = pgmm::testing::purge_tombstones(&client, &slots, retention)
                .await
                .unwrap();
            drop(client);
            let _ = conn.await;
            n
        })
    };
    // Too young for a one-hour retention.
    assert_eq!(purged(&["pgmm_b"], "1 hour"), 0);
    // A peer whose slot is missing may not have seen it.
    assert_eq!(purged(&["pgmm_b", "pgmm_gone"], "0 seconds"), 0);
    assert_eq!(purged(&["pgmm_b"], "0 seconds"), 1);
    assert_eq!(c.scalar(0, "SELECT count(*) FROM pgmm.tombstones"), "0");
}

/// A local write that commits while apply waits on its row makes the apply transaction fail
/// with 40001 (it runs under repeatable read, so that it never decides on a stale version).
/// That is retried inside the apply session: the link stays up, nothing is resent, and the
/// retry is counted. Two local transactions hold the two rows a remote transaction updates, and
/// the test commits whichever one apply is waiting on: the first aborts the fast attempt, the
/// second the full one, whatever order apply takes the rows in.
#[test]
fn a_serialization_failure_during_apply_is_retried_without_dropping_the_link() {
    let _heavy = heavy_lock();
    let c = cluster_with(2, ClusterOptions::default(), &[("t", COLUMNS)]);
    c.front_door(0)
        .exec("INSERT INTO t (id, v) VALUES (1, 'base'), (2, 'base')");
    c.wait_converged("t", 2);
    let retried = "pgmm_apply_retries_total{peer=\"a\",sqlstate=\"40001\"}";
    assert_eq!(c.metric(1, retried), Some(0.0), "{retried} before");
    let link_drops = "pgmm_replication_errors_total{peer=\"b\",stage=\"link\"}";
    let drops_before = c.metric(0, link_drops).unwrap_or(0.0);

    let holders: Vec<(harness::Db, String)> = (1..=2)
        .map(|id| {
            let db = c.db(1);
            let pid = db.value("SELECT pg_backend_pid()::text");
            db.exec(&format!("BEGIN; UPDATE t SET v = 'b' WHERE id = {id}"));
            (db, pid)
        })
        .collect();
    // Stamped after b's two updates, so a's version wins everywhere.
    c.front_door(0)
        .exec("UPDATE t SET v = 'a' WHERE id IN (1, 2)");
    let mut open: Vec<&(harness::Db, String)> = holders.iter().collect();
    while !open.is_empty() {
        let blocker = wait_for(
            "apply on b waiting on a local row lock",
            Duration::from_secs(60),
            || {
                let blocking = c.scalar(
                    1,
                    "SELECT coalesce(string_agg(b::text, ','), '') FROM pg_stat_activity, \
                 unnest(pg_blocking_pids(pid)) AS b WHERE wait_event_type = 'Lock'",
                );
                open.iter()
                    .position(|(_, pid)| blocking.split(',').any(|b| b == pid))
                    .ok_or(format!("blocking pids: {blocking:?}"))
            },
        );
        open.remove(blocker).0.exec("COMMIT");
    }

    c.wait_all(
        "a's update on both nodes",
        "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM t",
        "1=a,2=a",
    );
    c.wait_converged("t", 2);
    assert!(
        c.metric(1, retried).unwrap_or(0.0) >= 1.0,
        "the full attempt's serialization failure is counted as a retry: {:?}",
        c.metric(1, retried)
    );
    assert_eq!(
        c.metric(1, "pgmm_apply_errors_total{peer=\"a\"}"),
        Some(0.0),
        "no apply error, so no link drop"
    );
    assert_eq!(
        c.metric(0, link_drops).unwrap_or(0.0),
        drops_before,
        "a's link to b never dropped"
    );
}
