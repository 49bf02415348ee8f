//! Joining, leaving, checking and resyncing, on real nodes: a database with data becomes a
//! cluster by joining empty nodes while it takes writes; a join killed mid-copy (the joining
//! pgmm, its Postgres, the donor's pgmm) starts over and ends identical; two nodes join at
//! once; a node on PostgreSQL 18 joins from one on 15;
//! a removed node's slots go; `pgmm check` finds a row changed behind replication's back and
//! `pgmm resync` repairs it.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{
    self, heavy_lock, http_get, run_command, wait_until, ClusterOptions, Db, TestCluster,
};

const TABLES: [&str; 3] = ["accounts", "orders", "docs"];

/// The three tables: row-owned accounts, orders with a sequence and an index, docs with
/// large values.
const SCHEMA: &str = "\
    CREATE TABLE accounts (id int PRIMARY KEY, home_node text NOT NULL, balance numeric(12,2), \
                           updated_at timestamptz NOT NULL DEFAULT now()); \
    CREATE TABLE orders (id bigserial PRIMARY KEY, item text NOT NULL, qty int CHECK (qty > 0), \
                         updated_at timestamptz NOT NULL DEFAULT now()); \
    CREATE INDEX orders_item_idx ON orders (item); \
    CREATE TABLE docs (id int PRIMARY KEY, body text, blob bytea, \
                       updated_at timestamptz NOT NULL DEFAULT now());";

/// The tables with rows on node a's Postgres, before pgmm exists.
fn load_existing_database(c: &TestCluster, accounts: i32, orders: i32, docs: i32) {
    c.exec(
        0,
        &format!(
            "{SCHEMA}
             INSERT INTO accounts SELECT g, 'a', g * 1.5 FROM generate_series(1, {accounts}) g;
             INSERT INTO orders (item, qty) SELECT 'item ' || g, 1 + g % 9 FROM generate_series(1, {orders}) g;
             INSERT INTO docs SELECT g, repeat(md5(g::text), 2000), decode(repeat(md5(g::text), 500), 'hex') \
                 FROM generate_series(1, {docs}) g;"
        ),
    );
}

fn ownership_toml() -> String {
    "[[ownership]]\ntable = \"public.accounts\"\nowner_column = \"home_node\"\n".to_owned()
}

/// Writes through one node's front door until stopped, reconnecting across restarts: orders
/// with ids from `base` on, and updates of the accounts that node owns. Counts the commits.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(conninfo: String, node: &'static str, base: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (s, d) = (stop.clone(), done.clone());
        let handle = std::thread::spawn(move || {
            let mut db: Option<Db> = None;
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                if db.is_none() {
                    db = Db::try_connect(&conninfo).ok();
                }
                let Some(conn) = &db else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                n += 1;
                let sql = format!(
                    "INSERT INTO orders (id, item, qty) VALUES ({}, 'live {n} via {node}', 1); \
                     UPDATE accounts SET balance = balance + 1 WHERE id = {} AND home_node = '{node}';",
                    base + n,
                    1 + n % 500
                );
                match conn.execute(&sql) {
                    Ok(()) => {
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => db = None,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Writer {
            stop,
            done,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("writer thread");
        }
        self.done.load(Ordering::Relaxed)
    }
}

/// Updates rows 1000-1999 of `t` through a front door until stopped; counts the commits.
struct Updater {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl Updater {
    fn start(conninfo: String) -> Updater {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let db = Db::connect(&conninfo);
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                db.exec(&format!(
                    "UPDATE t SET v = 'w{n}' WHERE id = {}",
                    1000 + n % 1000
                ));
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        });
        Updater { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("updater thread")
    }
}

/// Launches node `i` joining from a, and returns once it serves clients; asserts that
/// `/readyz` said "joining" meanwhile.
fn join(c: &mut TestCluster, i: usize, members: &[usize]) {
    let mut opts = c.member_options(i, members, Some("a"));
    opts.extra_toml.push_str(&ownership_toml());
    c.launch_pgmm_with(i, opts);
    let port = c.pgmm(i).metrics_port();
    let name = c.name(i).to_owned();
    let said = wait_until(
        &format!("{name}'s /readyz to say joining"),
        harness::WAIT,
        || {
            http_get(port, "/readyz")
                .filter(|(code, body)| *code == 503 && body.contains("joining from a"))
        },
    );
    assert!(
        said.1.starts_with("not ready: joining from a"),
        "{}",
        said.1
    );
    if let Err(failure) = c.pgmm_mut(i).wait_ready() {
        failure.panic();
    }
}

/// Waits until every table is the same on `nodes` as on a (which takes no more writes).
fn converge(c: &TestCluster, nodes: &[usize]) {
    for table in TABLES {
        let rows: usize = c
            .scalar(0, &format!("SELECT count(*) FROM {table}"))
            .parse()
            .unwrap();
        c.wait_converged_on(table, nodes, rows, harness::WAIT);
    }
}

/// [`converge`] on every node of the cluster.
fn converge_all(c: &TestCluster) {
    let all: Vec<usize> = (0..c.len()).collect();
    converge(c, &all);
}

fn pgmm_command(c: &TestCluster, i: usize, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgmm"));
    cmd.args(args).arg("--config").arg(c.pgmm(i).config_path());
    run_command(&mut cmd, None, Duration::from_secs(120))
}

fn assert_check_agrees(c: &TestCluster, i: usize) -> String {
    let out = pgmm_command(c, i, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgmm check failed ({:?}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The recommended path from one database to a cluster: pgmm in front of the existing
/// Postgres (a, with data), b joined empty while a takes writes, then c joined while a and b
/// take writes. All three end identical (checksums and `pgmm check`), with no conflict logged,
/// copied rows keep their versions, the sequence carries over, and writes through b and c
/// replicate everywhere.
#[test]
fn an_existing_database_becomes_a_three_node_cluster_by_joining_empty_nodes_under_writes() {
    let _heavy = heavy_lock();
    let mut c = TestCluster::prepare(3, ClusterOptions::default());
    load_existing_database(&c, 60_000, 60_000, 300);
    let stamp_before = c.scalar(0, "SELECT updated_at::text FROM accounts WHERE id = 4242");

    let mut a = c.member_options(0, &[0, 1], None);
    a.extra_toml.push_str(&ownership_toml());
    c.start_pgmm_with(0, a);
    let writer = Writer::start(c.pgmm(0).conninfo("postgres", "postgres"), "a", 50_000_000);
    join(&mut c, 1, &[0, 1]);
    assert!(
        c.pgmm(1)
            .metric_value("pgmm_join_rows_copied_total{table=\"public.accounts\"}")
            == Some(60_000.0),
        "{}",
        c.pgmm(1).metrics()
    );
    assert_eq!(c.pgmm(1).metric_value("pgmm_joining"), Some(0.0));
    assert!(
        c.pgmm(1).log().contains("joined the cluster"),
        "{}",
        c.pgmm(1).log()
    );

    // c joins: a and b learn of it (restarted with the new node list) and both take writes.
    for i in [0, 1] {
        let mut o = c.member_options(i, &[0, 1, 2], None);
        o.extra_toml.push_str(&ownership_toml());
        c.start_pgmm_with(i, o);
    }
    let writer2 = Writer::start(c.pgmm(1).conninfo("postgres", "postgres"), "b", 60_000_000);
    join(&mut c, 2, &[0, 1, 2]);
    let (by_a, by_b) = (writer.stop(), writer2.stop());
    assert!(
        by_a > 0 && by_b > 0,
        "the writers committed {by_a} and {by_b}"
    );

    // Writes through the joined nodes reach everyone.
    c.front_door(1)
        .exec("INSERT INTO orders (id, item, qty) VALUES (1000001, 'from b', 2)");
    c.front_door(2)
        .exec("INSERT INTO accounts (id, home_node, balance) VALUES (1000002, 'c', 7)");
    c.wait_all(
        "b's order everywhere",
        "SELECT count(*) FROM orders WHERE id = 1000001",
        "1",
    );
    c.wait_all(
        "c's account everywhere",
        "SELECT count(*) FROM accounts WHERE id = 1000002",
        "1",
    );
    converge_all(&c);
    c.assert_no_conflicts();
    // Copied rows keep their versions; the sequence is past every copied id.
    for i in [1, 2] {
        assert_eq!(
            c.scalar(i, "SELECT updated_at::text FROM accounts WHERE id = 4242"),
            stamp_before
        );
        let last: i64 = c
            .scalar(i, "SELECT last_value FROM orders_id_seq")
            .parse()
            .unwrap();
        assert!(last >= 60_000, "orders_id_seq on {} at {last}", c.name(i));
        assert_eq!(
            c.scalar(
                i,
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'orders_item_idx'"
            ),
            "1"
        );
    }
    // A's own rows on c are attributed to a, as they are on b.
    assert_eq!(
        c.scalar(
            2,
            "SELECT roname FROM pg_replication_origin WHERE roident = \
             (pg_xact_commit_timestamp_origin((SELECT xmin FROM accounts WHERE id = 4242))).roident"
        ),
        "pgmm_a"
    );
    // An order b wrote as c joined is b's on c too, whether it came in a's copy (b's writes
    // before c's Prepare are there) or in b's stream.
    assert_eq!(
        c.scalar(
            2,
            "SELECT roname FROM pg_replication_origin WHERE roident = \
             (pg_xact_commit_timestamp_origin((SELECT xmin FROM orders WHERE id = 60000001))).roident"
        ),
        "pgmm_b"
    );
    let report = assert_check_agrees(&c, 2);
    assert!(report.contains("all 3 table(s) agree"), "{report}");
}

/// Gives node `i` the schema beforehand (the "schema only" join) with one addition: a trigger
/// that fires even for the join's copy (ENABLE ALWAYS) and waits on advisory lock 4242, which
/// the returned session holds. The copy of docs (after accounts: the donor sends the tables
/// with the most rows first, in name order when it has no estimate) then stops at its first
/// row until the session lets go, with accounts copied and most of docs (about 30 MB) not yet
/// sent: the join is caught mid-copy without depending on its speed.
fn pause_copy_at_docs(c: &TestCluster, i: usize) -> Db {
    c.exec(
        i,
        &format!(
            "{SCHEMA}
             CREATE FUNCTION public.hold_copy() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_advisory_lock_shared(4242); PERFORM pg_advisory_unlock_shared(4242);
                   RETURN NEW; END $$;
             CREATE TRIGGER hold_copy BEFORE INSERT ON docs FOR EACH ROW EXECUTE FUNCTION public.hold_copy();
             ALTER TABLE docs ENABLE ALWAYS TRIGGER hold_copy;"
        ),
    );
    let db = c.db(i);
    db.exec("SELECT pg_advisory_lock(4242)");
    db
}

/// Waits until node `i` has copied all of accounts (and so waits in docs).
fn wait_mid_copy(c: &TestCluster, i: usize, accounts: f64) {
    let port = c.pgmm(i).metrics_port();
    let series = "pgmm_join_rows_copied_total{table=\"public.accounts\"}";
    wait_until(
        &format!("{} to be copying", c.name(i)),
        harness::WAIT,
        || {
            http_get(port, "/metrics")
                .and_then(|(_, m)| harness::metric_value(&m, series))
                .filter(|&v| v >= accounts)
        },
    );
    assert_eq!(c.scalar(i, "SELECT state FROM pgmm.join_state"), "copying");
    let (code, body) = http_get(port, "/readyz").expect("/readyz answers");
    assert!(
        code == 503 && body.contains("joining from a"),
        "{code} {body}"
    );
}

/// A join killed mid-copy, the joining pgmm and then its Postgres, starts over and ends
/// identical: never a half-joined node that serves clients.
#[test]
fn a_join_interrupted_by_killing_the_joining_pgmm_or_its_postgres_starts_over_and_ends_identical() {
    let _heavy = heavy_lock();
    let mut c = TestCluster::prepare(2, ClusterOptions::default());
    load_existing_database(&c, 50_000, 1_000, 400);
    let mut a = c.member_options(0, &[0, 1], None);
    a.extra_toml.push_str(&ownership_toml());
    c.start_pgmm_with(0, a);

    // The joiner's pgmm killed mid-copy (its front door never opened), then its Postgres
    // killed mid-copy of the next attempt: each time the join starts over, and ends whole.
    let lock = pause_copy_at_docs(&c, 1);
    let mut opts = c.member_options(1, &[0, 1], Some("a"));
    opts.extra_toml.push_str(&ownership_toml());
    c.launch_pgmm_with(1, opts.clone());
    wait_mid_copy(&c, 1, 50_000.0);
    assert!(
        Db::try_connect(&c.pgmm(1).conninfo("postgres", "postgres")).is_err(),
        "a joining node's front door is open"
    );
    c.pgmm_mut(1).kill();
    // The killed pgmm's COPY session finds its client gone once it reads on; the lock is
    // taken again only after, or that session would wait on it for ever.
    lock.exec("SELECT pg_advisory_unlock(4242)");
    wait_until("the killed joiner's COPY to end", harness::WAIT, || {
        (c.scalar(
            1,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY %'",
        ) == "0")
            .then_some(())
    });
    lock.exec("SELECT pg_advisory_lock(4242)");
    c.front_door(0)
        .exec("UPDATE accounts SET balance = -1 WHERE id = 7");
    c.launch_pgmm_with(1, opts);
    wait_mid_copy(&c, 1, 50_000.0);
    // The lock's session goes with the server.
    c.pg_mut(1).crash_and_restart();
    drop(lock);
    if let Err(failure) = c.pgmm_mut(1).wait_ready() {
        failure.panic();
    }
    converge(&c, &[0, 1]);
    assert_eq!(
        c.scalar(1, "SELECT balance FROM accounts WHERE id = 7"),
        "-1.00"
    );
    let log = c.pgmm(1).log();
    assert!(
        log.contains("join attempt failed") && log.contains("joined the cluster"),
        "{log}"
    );
    assert!(
        c.pgmm(1).metric_value("pgmm_join_failures_total") >= Some(1.0),
        "{}",
        c.pgmm(1).metrics()
    );
    c.assert_no_conflicts();
    assert_check_agrees(&c, 1);
}

/// A join whose donor's pgmm is killed mid-copy retries until the donor is back, and ends
/// identical, with a write made on a third node meanwhile.
#[test]
fn a_join_interrupted_by_killing_the_donors_pgmm_retries_and_ends_identical() {
    let _heavy = heavy_lock();
    let mut c = TestCluster::prepare(3, ClusterOptions::default());
    load_existing_database(&c, 50_000, 1_000, 400);
    let mut a = c.member_options(0, &[0, 1], None);
    a.extra_toml.push_str(&ownership_toml());
    c.start_pgmm_with(0, a);
    join(&mut c, 1, &[0, 1]);

    // The donor's pgmm killed while c copies from it: c retries until the donor is back.
    for i in [0, 1] {
        let mut o = c.member_options(i, &[0, 1, 2], None);
        o.extra_toml.push_str(&ownership_toml());
        c.start_pgmm_with(i, o);
    }
    let lock = pause_copy_at_docs(&c, 2);
    let mut opts = c.member_options(2, &[0, 1, 2], Some("a"));
    opts.extra_toml.push_str(&ownership_toml());
    c.launch_pgmm_with(2, opts);
    wait_mid_copy(&c, 2, 50_000.0);
    c.pgmm_mut(0).kill();
    lock.exec("SELECT pg_advisory_unlock(4242)");
    let port = c.pgmm(2).metrics_port();
    wait_until("c to retry", harness::WAIT, || {
        http_get(port, "/readyz").filter(|(code, body)| *code == 503 && body.contains("retrying"))
    });
    c.front_door(1)
        .exec("INSERT INTO orders (id, item, qty) VALUES (700001, 'b while c joins', 1)");
    c.pgmm_mut(0).restart();
    if let Err(failure) = c.pgmm_mut(2).wait_ready() {
        failure.panic();
    }
    c.front_door(2)
        .exec("INSERT INTO docs (id, body) VALUES (100001, 'after the joins')");
    c.wait_all(
        "c's doc everywhere",
        "SELECT count(*) FROM docs WHERE id = 100001",
        "1",
    );
    c.wait_all(
        "b's order everywhere",
        "SELECT count(*) FROM orders WHERE id = 700001",
        "1",
    );
    converge_all(&c);
    c.assert_no_conflicts();
    let report = assert_check_agrees(&c, 2);
    assert!(report.contains("all 3 table(s) agree"), "{report}");
}

/// Two empty nodes joining at the same time ask each other to prepare: each answers that it
/// is joining too (it has written nothing yet), so neither waits for the other, and both end
/// identical to the donor with writes through each reaching everyone.
#[test]
fn two_nodes_joining_at_once_do_not_wait_for_each_other() {
    let _heavy = heavy_lock();
    let mut c = TestCluster::prepare(3, ClusterOptions::default());
    load_existing_database(&c, 5_000, 5_000, 20);
    let mut a = c.member_options(0, &[0, 1, 2], None);
    a.extra_toml.push_str(&ownership_toml());
    c.start_pgmm_with(0, a);
    for i in [1, 2] {
        let mut o = c.member_options(i, &[0, 1, 2], Some("a"));
        o.extra_toml.push_str(&ownership_toml());
        c.launch_pgmm_with(i, o);
    }
    for i in [1, 2] {
        if let Err(failure) = c.pgmm_mut(i).wait_ready() {
            failure.panic();
        }
    }
    // Neither can finish before the other answered, so the first answer comes from a node
    // still joining.
    assert!(
        (1..=2).any(|i| c.pgmm(i).log().contains("this node is joining too")),
        "{}\n{}",
        c.pgmm(1).log(),
        c.pgmm(2).log()
    );
    c.front_door(1)
        .exec("INSERT INTO orders (id, item, qty) VALUES (800001, 'from b', 1)");
    c.front_door(2)
        .exec("INSERT INTO accounts (id, home_node, balance) VALUES (800002, 'c', 1)");
    c.wait_all(
        "b's order everywhere",
        "SELECT count(*) FROM orders WHERE id = 800001",
        "1",
    );
    c.wait_all(
        "c's account everywhere",
        "SELECT count(*) FROM accounts WHERE id = 800002",
        "1",
    );
    converge_all(&c);
    c.assert_no_conflicts();
}

/// The zero-downtime major upgrade: a node on PostgreSQL 18 joins from one on 15, ends
/// identical, and writes go both ways.
#[test]
fn a_node_on_postgres_18_joins_from_a_donor_on_15() {
    let _heavy = heavy_lock();
    let opts = ClusterOptions::default()
        .with_major("a", 15)
        .with_major("b", 18);
    let mut c = TestCluster::prepare(2, opts);
    assert!(c.pg(1).version().contains(" 18."), "{}", c.pg(1).version());
    load_existing_database(&c, 5_000, 5_000, 20);
    // And what the schema copy must rebuild beyond plain tables: an enum, a partitioned table
    // with its partitions and a key on the parent, identity and generated columns.
    c.exec(
        0,
        "CREATE TYPE mood AS ENUM ('calm', 'busy'); \
         CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY, day date NOT NULL, \
                              m mood NOT NULL DEFAULT 'calm', n int, twice int GENERATED ALWAYS AS (n * 2) STORED, \
                              updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (id, day)) \
             PARTITION BY RANGE (day); \
         CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); \
         CREATE TABLE events_rest PARTITION OF events DEFAULT; \
         INSERT INTO events (day, m, n) SELECT date '2026-06-01' + (g % 400), \
             (CASE WHEN g % 2 = 0 THEN 'busy' ELSE 'calm' END)::mood, g FROM generate_series(1, 3000) g;",
    );
    let mut a = c.member_options(0, &[0, 1], None);
    a.extra_toml.push_str(&ownership_toml());
    c.start_pgmm_with(0, a);
    join(&mut c, 1, &[0, 1]);
    let events = "SELECT count(*), sum(twice), count(*) FILTER (WHERE m = 'busy') FROM events";
    assert_eq!(c.rows(1, events), c.rows(0, events));
    assert_eq!(
        c.scalar(1, "SELECT count(*) FROM events_rest"),
        c.scalar(0, "SELECT count(*) FROM events_rest")
    );
    c.front_door(1)
        .exec("INSERT INTO events (day, n) VALUES ('2026-07-01', 21)");
    c.wait_nodes(
        "18's event on 15",
        &[0],
        "SELECT twice FROM events WHERE n = 21 AND day = '2026-07-01'",
        "42",
    );
    c.front_door(1)
        .exec("INSERT INTO orders (id, item, qty) VALUES (900001, 'from 18', 3)");
    c.front_door(0)
        .exec("UPDATE docs SET body = 'from 15' WHERE id = 1");
    c.wait_all(
        "18's order everywhere",
        "SELECT count(*) FROM orders WHERE id = 900001",
        "1",
    );
    c.wait_all(
        "15's update everywhere",
        "SELECT body FROM docs WHERE id = 1",
        "from 15",
    );
    converge_all(&c);
    c.assert_no_conflicts();
    assert_check_agrees(&c, 1);
}

/// `join_from` only affects a node's first start: set on a node that has replicated (as a
/// chart that sets it on every node but the donor does on upgrade), it changes nothing.
#[test]
fn join_from_on_a_node_that_has_replicated_has_no_effect() {
    let _heavy = heavy_lock();
    let mut c = TestCluster::start(2, ClusterOptions::default());
    c.create_table(
        "t",
        "id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now()",
    );
    c.front_door(1).exec("INSERT INTO t (id) VALUES (1)");
    c.wait_converged("t", 1);
    let o = c.member_options(1, &[0, 1], Some("a"));
    c.start_pgmm_with(1, o);
    assert!(
        c.pgmm(1).log().contains("has replicated before"),
        "{}",
        c.pgmm(1).log()
    );
    c.front_door(1).exec("INSERT INTO t (id) VALUES (2)");
    c.wait_converged("t", 2);
    assert_eq!(c.scalar(1, "SELECT count(*) FROM pgmm.join_state"), "0");
}

/// Leaving: a node removed from `[cluster] nodes` loses its slot on the others at their
/// restart, and the log says so.
#[test]
fn a_node_removed_from_the_cluster_loses_its_slots() {
    let _heavy = heavy_lock();
    let mut c = TestCluster::start(3, ClusterOptions::default());
    let slot = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgmm_c'";
    assert_eq!(c.scalar(0, slot), "1");
    c.pgmm_mut(2).terminate();
    c.pgmm_mut(2).wait_exit(Duration::from_secs(60));
    for i in [0, 1] {
        let o = c.member_options(i, &[0, 1], None);
        c.start_pgmm_with(i, o);
        assert_eq!(c.scalar(i, slot), "0", "node {}", c.name(i));
        assert!(
            c.pgmm(i).log().contains("node c has left the cluster"),
            "{}",
            c.pgmm(i).log()
        );
    }
    // The two go on replicating.
    c.create_table(
        "t",
        "id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now()",
    );
    c.front_door(0).exec("INSERT INTO t (id) VALUES (1)");
    c.wait_nodes("a's row on b", &[1], "SELECT count(*) FROM t", "1");
}

/// `pgmm check` reports a row changed on one node behind replication's back (triggers off, no
/// capture),
/// with each node's version, and exits 1; `pgmm resync` copies the table again from a node
/// that has it right, and check exits 0.
#[test]
fn check_reports_a_diverged_row_and_resync_repairs_it() {
    let _heavy = heavy_lock();
    let c = TestCluster::start(2, ClusterOptions::default());
    c.create_table(
        "t",
        "id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now()",
    );
    c.front_door(0)
        .exec("INSERT INTO t (id, v) SELECT g, 'v' || g FROM generate_series(1, 5000) g");
    c.wait_converged("t", 5000);
    // Checks run while a takes writes: rows in flight are not divergence.
    let writer = Updater::start(c.pgmm(0).conninfo("postgres", "postgres"));
    assert_check_agrees(&c, 0);

    // Behind replication's back: triggers off, and under a replication origin of its own so that b does not
    // ship the change (as a lost apply or a hand-made fix would leave it).
    c.exec(
        1,
        "SELECT pg_replication_origin_create('tamper'); \
         SELECT pg_replication_origin_session_setup('tamper'); \
         SET session_replication_role = replica; UPDATE t SET v = 'tampered' WHERE id = 77; \
         DELETE FROM t WHERE id = 78",
    );
    let out = pgmm_command(&c, 1, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("public.t: 2 row(s) DIFFER"), "{text}");
    assert!(
        text.contains("key (77,)") && text.contains("key (78,)"),
        "{text}"
    );
    assert!(text.contains("b: missing"), "{text}");
    assert!(writer.stop() > 0, "the writer committed nothing");
    // Resync is run once replication is caught up (docs/MEMBERSHIP.md).
    let written =
        "SELECT md5(string_agg(v, ',' ORDER BY id)) FROM t WHERE id BETWEEN 1000 AND 1999";
    wait_until("b to have a's writes", harness::WAIT, || {
        (c.scalar(0, written) == c.scalar(1, written)).then_some(())
    });

    let out = pgmm_command(&c, 1, &["resync", "--table", "t", "--from", "a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("public.t resynchronised from a: 5000 rows received, 2 rows written"),
        "{said}"
    );
    assert_eq!(c.scalar(1, "SELECT v FROM t WHERE id = 77"), "v77");
    c.wait_converged("t", 5000);
    assert_check_agrees(&c, 1);
}
