//! Schema changes replicate: DDL through any front door, or straight to a node's Postgres (a
//! migration tool), reaches every node in its place among the data changes, exactly once,
//! with no conflict logged; tables it creates are enrolled everywhere.

use crate::harness;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use harness::{ClusterOptions, TestCluster};

fn assert_no_apply_errors(c: &TestCluster) {
    for i in 0..c.len() {
        for j in (0..c.len()).filter(|&j| j != i) {
            let series = format!("pgmm_apply_errors_total{{peer=\"{}\"}}", c.name(j));
            assert_eq!(
                c.metric(i, &series).unwrap_or(0.0),
                0.0,
                "{series} on node {:?}",
                c.name(i)
            );
        }
    }
}

const COUNT_USERS: &str = "SELECT count(*) FROM public.users";

#[test]
fn ddl_through_any_node_reaches_every_node_in_order_with_the_data() {
    let c = TestCluster::start(3, ClusterOptions::default());
    let b = c.front_door(1);
    // Created through b, with rows in the same transaction: they follow the table everywhere.
    b.execute(
        "BEGIN; \
         CREATE TABLE users (id int PRIMARY KEY, email text, \
                             updated_at timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO users (id, email) SELECT g, 'u' || g || '@x' FROM generate_series(1, 10) g; \
         COMMIT",
    )
    .unwrap();
    c.wait_enrolled("users");
    c.wait_all("the rows written with the table", COUNT_USERS, "10");

    // Writes on a and b go on while c adds a column with a default.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|i| {
            let db = c.front_door(i);
            let stop = stop.clone();
            let written = written.clone();
            thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) || n < 20 {
                    let id = 1000 * (i as i32 + 1) + n;
                    db.execute(&format!(
                        "INSERT INTO users (id, email) VALUES ({id}, 'w{id}@x')"
                    ))
                    .unwrap();
                    written.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                n as usize
            })
        })
        .collect();
    let c_db = c.front_door(2);
    harness::wait_for(
        "writers under way",
        std::time::Duration::from_secs(60),
        || {
            (written.load(Ordering::Relaxed) >= 10)
                .then_some(())
                .ok_or_else(|| "fewer than 10 rows written".to_owned())
        },
    );
    c_db.execute("ALTER TABLE users ADD COLUMN phone text NOT NULL DEFAULT 'none'")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let total: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    c.wait_all(
        "every row written around the ALTER",
        COUNT_USERS,
        &(10 + total).to_string(),
    );
    c.wait_all(
        "the new column with its default everywhere",
        "SELECT count(*) FROM users WHERE phone = 'none'",
        &(10 + total).to_string(),
    );

    // A rename through a, then rows written with the new name through c.
    c.front_door(0)
        .execute("ALTER TABLE users RENAME COLUMN email TO mail")
        .unwrap();
    c.wait_all(
        "the renamed column",
        "SELECT count(*) FROM information_schema.columns \
         WHERE table_name = 'users' AND column_name = 'mail'",
        "1",
    );
    c_db.execute("UPDATE users SET mail = 'new@x', phone = '555' WHERE id = 1")
        .unwrap();
    c.wait_all(
        "an update by the new name",
        "SELECT mail || ' ' || phone FROM users WHERE id = 1",
        "new@x 555",
    );
    c.wait_converged("users", 10 + total);

    // Dropped through b: gone everywhere, and out of every publication.
    b.execute("DROP TABLE users").unwrap();
    c.wait_all(
        "users dropped everywhere",
        "SELECT count(*) FROM pg_class WHERE relname = 'users'",
        "0",
    );
    c.assert_no_conflicts();
    assert_no_apply_errors(&c);
}

#[test]
fn ddl_sent_straight_to_postgres_replicates_once_with_its_own_statements() {
    let c = TestCluster::start(2, ClusterOptions::default());
    // A migration tool on a direct connection, several statements in one simple Query, and a
    // DO block: each schema change once, each row once (by its row change, not the text).
    c.exec(
        0,
        "CREATE TABLE m (id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO m (id, v) VALUES (1, 'one'), (2, 'two'); \
         CREATE INDEX m_v ON m (v); \
         DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_type WHERE typname = 'mood') THEN \
             CREATE TYPE mood AS ENUM ('ok', 'meh'); END IF; END $$; \
         COMMENT ON TABLE m IS 'made by a migration; it replicates'",
    );
    c.wait_all(
        "the index, the type and the comment on b",
        "SELECT (SELECT count(*) FROM pg_indexes WHERE indexname = 'm_v') || ' ' || \
                (SELECT count(*) FROM pg_type WHERE typname = 'mood') || ' ' || \
                coalesce(obj_description('public.m'::regclass, 'pg_class'), '-')",
        "1 1 made by a migration; it replicates",
    );
    c.wait_converged("m", 2);
    // CONCURRENTLY, which cannot run in the apply transaction, is applied without it.
    c.exec(0, "CREATE INDEX CONCURRENTLY m_id_v ON m (id, v)");
    c.wait_all(
        "the concurrently built index on b",
        "SELECT count(*) FROM pg_indexes WHERE indexname = 'm_id_v'",
        "1",
    );
    // The way schema changes were rolled out before: the same DDL on every node. Each node's
    // copy reaches the other, which already has it and skips it.
    let b_session = c.db(1);
    b_session
        .execute("BEGIN; ALTER TABLE m ADD COLUMN note text")
        .unwrap();
    c.exec(0, "ALTER TABLE m ADD COLUMN note text");
    b_session.execute("COMMIT").unwrap();
    c.exec(
        1,
        "INSERT INTO m (id, v, note) VALUES (3, 'three', 'from b')",
    );
    c.wait_converged("m", 3);
    // An application role, not a superuser, changes the schema through the front door: its
    // table and rows replicate, owned by it on every node (roles do not replicate: made on each).
    c.exec_all("CREATE ROLE app LOGIN PASSWORD 'app_pw'");
    c.exec(0, "GRANT CREATE ON SCHEMA public TO app");
    let app = harness::Db::connect(&format!(
        "{} password=app_pw",
        c.pgmm(0).conninfo("app", "postgres")
    ));
    app.execute(
        "BEGIN; CREATE TABLE app_t (id int PRIMARY KEY, updated_at timestamptz NOT NULL \
         DEFAULT now()); INSERT INTO app_t (id) VALUES (1); COMMIT",
    )
    .unwrap();
    c.wait_converged("app_t", 1);
    assert_eq!(
        c.scalar(
            1,
            "SELECT tableowner FROM pg_tables WHERE tablename = 'app_t'"
        ),
        "app"
    );
    // Temporary objects and pgmm's own schema stay local.
    c.exec(0, "CREATE TEMP TABLE scratch (x int)");
    c.exec(
        0,
        "CREATE TABLE mark (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now())",
    );
    c.wait_all(
        "the table created after the temporary one",
        "SELECT count(*) FROM pg_class WHERE relname = 'mark'",
        "1",
    );
    assert_eq!(
        c.scalar(1, "SELECT count(*) FROM pg_class WHERE relname = 'scratch'"),
        "0"
    );
    c.assert_no_conflicts();
    assert_no_apply_errors(&c);
}

/// `/status` of node `i`: the `apply_stalled` entry of peer `peer`, `Null` when it applies.
fn stall_of(c: &TestCluster, i: usize, peer: &str) -> serde_json::Value {
    let status: serde_json::Value = serde_json::from_str(&c.pgmm(i).status()).unwrap();
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == peer)
        .map(|p| p["apply_stalled"].clone())
        .unwrap()
}

#[test]
fn a_change_that_cannot_apply_waits_visibly_backs_off_and_applies_after_the_fix() {
    let c = TestCluster::start(3, ClusterOptions::default());
    let columns = "id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now()";
    let a = c.front_door(0);
    a.execute(&format!(
        "CREATE TABLE s ({columns}); CREATE TABLE other ({columns})"
    ))
    .unwrap();
    c.wait_enrolled("s");
    c.wait_enrolled("other");
    // Behind pgmm's back on b (replica role: no event trigger, nothing replicated).
    c.exec(
        1,
        "SET session_replication_role = replica; DROP TABLE s; RESET session_replication_role",
    );
    a.execute("INSERT INTO s (id, v) VALUES (1, 'x'); INSERT INTO other (id, v) VALUES (1, 'y')")
        .unwrap();

    // b reports it: the metric names the peer and the table, /status the error.
    c.wait_metric(
        1,
        "pgmm_apply_stalled{peer=\"a\",table=\"public.s\"}",
        "== 1",
        |v| v == Some(1.0),
    );
    // Retried with backoff (1 s, 2 s, ...), not as fast as the link reconnects: by the third
    // attempt at least 3 s have passed.
    let stall = harness::wait_for(
        "a third attempt",
        std::time::Duration::from_secs(60),
        || {
            let stall = stall_of(&c, 1, "a");
            if stall["attempts"].as_u64().unwrap_or(0) >= 3 {
                Ok(stall)
            } else {
                Err(stall.to_string())
            }
        },
    );
    assert_eq!(stall["table"], "public.s", "{stall}");
    assert_eq!(stall["sqlstate"], "42P01", "{stall}");
    assert!(stall["seconds"].as_f64().unwrap() >= 2.9, "{stall}");
    let errors = c
        .metric(1, "pgmm_apply_errors_total{peer=\"a\"}")
        .unwrap_or(0.0);
    assert!(errors <= 4.0, "{errors} apply errors by the third attempt");
    // Only what must stop stops: c has a's changes, and c's changes still reach b.
    c.wait_nodes("a's rows on c", &[0, 2], "SELECT count(*) FROM s", "1");
    c.front_door(2)
        .execute("INSERT INTO other (id, v) VALUES (2, 'from c')")
        .unwrap();
    c.wait_all(
        "c's row everywhere, b included",
        "SELECT count(*) FROM other WHERE id = 2",
        "1",
    );
    assert!(
        c.pgmm(1)
            .log()
            .contains("the table is missing here: create it"),
        "b's log says what to do"
    );

    // The fix, on b: the table as it is on a. Everything waiting applies, nothing was lost.
    c.exec(
        1,
        &format!(
            "SET session_replication_role = replica; CREATE TABLE s ({columns}); \
             RESET session_replication_role"
        ),
    );
    c.wait_converged("s", 1);
    c.wait_converged("other", 2);
    c.wait_metric(
        1,
        "pgmm_apply_stalled{peer=\"a\",table=\"\"}",
        "== 0",
        |v| v == Some(0.0),
    );
    assert_eq!(
        c.metric(1, "pgmm_apply_stalled{peer=\"a\",table=\"public.s\"}"),
        None
    );
    assert!(stall_of(&c, 1, "a").is_null());
    c.assert_no_conflicts();
}

#[test]
fn concurrent_ddl_on_two_nodes_converges_and_ddl_nodes_refuse_it_elsewhere() {
    // By default any node changes the schema; two nodes at the same moment: each applies the
    // other's change after its own, and changes that commute converge.
    let c = TestCluster::start(2, ClusterOptions::default());
    let (a, b) = (c.front_door(0), c.front_door(1));
    a.execute("CREATE TABLE t (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now())")
        .unwrap();
    c.wait_enrolled("t");
    a.execute("BEGIN; ALTER TABLE t ADD COLUMN x int").unwrap();
    b.execute("BEGIN; ALTER TABLE t ADD COLUMN y text").unwrap();
    a.execute("COMMIT").unwrap();
    b.execute("COMMIT").unwrap();
    let columns = "SELECT string_agg(column_name, ',' ORDER BY column_name) \
                   FROM information_schema.columns WHERE table_name = 't'";
    c.wait_all("both columns on both nodes", columns, "id,updated_at,x,y");
    a.execute("INSERT INTO t (id, x) VALUES (1, 10)").unwrap();
    b.execute("INSERT INTO t (id, y) VALUES (2, 'b')").unwrap();
    // Column order may differ between the nodes (each added its own first): compare by name.
    c.wait_all(
        "rows written through either column",
        "SELECT string_agg(id || ':' || coalesce(x::text, '-') || ':' || coalesce(y, '-'), ',' \
         ORDER BY id) FROM t",
        "1:10:-,2:-:b",
    );
    c.assert_no_conflicts();
    assert_no_apply_errors(&c);
    drop(c);

    // With [replication] ddl_nodes, schema changes happen on those nodes only: elsewhere they
    // are refused, through pgmm or straight to Postgres.
    let c = TestCluster::start(
        3,
        ClusterOptions {
            replication_toml: "ddl_nodes = [\"a\"]\n".into(),
            ..ClusterOptions::default()
        },
    );
    let create =
        "CREATE TABLE u (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now())";
    let refused = c.front_door(1).execute(create).unwrap_err();
    assert!(refused.contains("42501"), "{refused}");
    assert!(
        refused.contains(
            "schema changes are made on node a ([replication] ddl_nodes); this is node b"
        ),
        "{refused}"
    );
    let direct = c.db(2).execute(create).unwrap_err();
    assert!(direct.contains("this is node c"), "{direct}");
    c.db(1)
        .execute("CREATE TEMP TABLE scratch (x int); DROP TABLE scratch")
        .unwrap();
    c.front_door(0).execute(create).unwrap();
    c.wait_enrolled("u");
    c.front_door(2)
        .execute("INSERT INTO u (id) VALUES (1)")
        .unwrap();
    c.wait_converged("u", 1);
}
