//! Multi-node pgmm clusters: one [`PgCluster`] and one pgmm process per node, fully meshed.
//!
//! Every node's config names every other node's peer address, so the ports are fixed before the
//! first process starts ([`PgmmPorts`]), and a node that is killed comes back on the same ones.
//! Tables are created on every node before pgmm starts where a test's data must exist before
//! any slot ([`TestCluster::prepare`], then [`TestCluster::create_table`], then
//! [`TestCluster::start_pgmm`]); once pgmm runs, DDL on one node replicates (`ddl.rs`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use super::{wait_for, PeerOptions, PgCluster, PgOptions, Pgmm, PgmmOptions, PgmmPorts};

/// How long the waiting helpers wait by default: far more than a healthy cluster needs even on a
/// loaded 2-core CI machine, so that a timeout means something is wrong.
pub const WAIT: Duration = Duration::from_secs(60);
/// Per-statement limit of [`Db`]: a hung server fails the test instead of hanging it.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings shared by every node of a [`TestCluster`], plus per-node differences.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The shared peer secret (at least 16 bytes).
    pub secret: String,
    /// `[replication] tables`.
    pub tables: Vec<String>,
    /// `[replication] enrol_interval_seconds`: short, so that tables created behind pgmm's back
    /// are enrolled quickly.
    pub enrol_interval_seconds: u64,
    /// Extra lines for every node's `[replication]` section.
    pub replication_toml: String,
    /// Appended to every node's config (start it with a section header).
    pub extra_toml: String,
    /// Settings of every node's Postgres.
    pub pg: PgOptions,
    /// Per-node differences, by node name.
    pub overrides: BTreeMap<String, NodeOverride>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            secret: "integration-test-cluster-secret".into(),
            tables: vec!["public.*".into()],
            enrol_interval_seconds: 1,
            replication_toml: String::new(),
            extra_toml: String::new(),
            pg: PgOptions::default(),
            overrides: BTreeMap::new(),
        }
    }
}

impl ClusterOptions {
    /// These options with `node` configured differently.
    pub fn with_override(mut self, node: &str, o: NodeOverride) -> Self {
        self.overrides.insert(node.into(), o);
        self
    }

    /// These options with `node` on PostgreSQL `major` (15 from Debian, 16-18 from
    /// `.ci/install-postgres`); panics saying how to install it when it is missing.
    pub fn with_major(self, node: &str, major: u32) -> Self {
        let dir = super::bindir_of_major(major).unwrap_or_else(|| {
            panic!(
                "PostgreSQL {major} is not installed: run .ci/install-postgres (16-18) or \
                 apt-get install postgresql (15)"
            )
        });
        let mut o = self.overrides.get(node).cloned().unwrap_or_default();
        o.pg_bindir = Some(dir);
        self.with_override(node, o)
    }
}

/// What one node does differently from the rest of its cluster.
#[derive(Debug, Clone, Default)]
pub struct NodeOverride {
    /// This node's peer secret instead of [`ClusterOptions::secret`].
    pub secret: Option<String>,
    /// Appended to this node's config after [`ClusterOptions::extra_toml`].
    pub extra_toml: String,
    /// Extra lines for this node's `[peer]` section.
    pub peer_toml: String,
    /// This node's PostgreSQL binaries (another major than the rest of the cluster).
    pub pg_bindir: Option<std::path::PathBuf>,
}

struct Node {
    name: String,
    // Dropped before `pg`: pgmm goes first, so that it does not log a storm of errors about
    // its Postgres disappearing.
    db: Mutex<Option<Db>>,
    pgmm: Option<Pgmm>,
    pg: PgCluster,
}

/// n nodes named "a", "b", "c", ..., each a Postgres with a pgmm in front, in cluster "test".
pub struct TestCluster {
    nodes: Vec<Node>,
    opts: ClusterOptions,
    /// Fixed for the cluster's life: the peers' configs name them.
    ports: Vec<PgmmPorts>,
}

impl TestCluster {
    /// [`TestCluster::prepare`] and [`TestCluster::start_pgmm`]: for tests whose tables can be
    /// created after pgmm started (or that wait for their enrolment).
    pub fn start(n: usize, opts: ClusterOptions) -> TestCluster {
        let mut cluster = TestCluster::prepare(n, opts);
        cluster.start_pgmm();
        cluster
    }

    /// The nodes' Postgres servers only (started side by side), so that tables and rows can be
    /// created before any slot exists.
    pub fn prepare(n: usize, opts: ClusterOptions) -> TestCluster {
        assert!((1..=26).contains(&n), "a test cluster has 1 to 26 nodes");
        for name in opts.overrides.keys() {
            assert!(
                name.len() == 1 && (b'a'..b'a' + n as u8).contains(&name.as_bytes()[0]),
                "override for {name:?}, which is not a node of a {n}-node cluster"
            );
        }
        let pgs: Vec<PgCluster> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let mut pg = opts.pg.clone();
                    let name = ((b'a' + i as u8) as char).to_string();
                    if let Some(dir) = opts.overrides.get(&name).and_then(|o| o.pg_bindir.clone()) {
                        pg.bindir = Some(dir);
                    }
                    s.spawn(move || PgCluster::start_with(pg))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let nodes = pgs
            .into_iter()
            .enumerate()
            .map(|(i, pg)| Node {
                name: ((b'a' + i as u8) as char).to_string(),
                db: Mutex::new(None),
                pgmm: None,
                pg,
            })
            .collect();
        TestCluster {
            nodes,
            opts,
            ports: PgmmPorts::allocate(n),
        }
    }

    /// Starts pgmm on every node that is not running one, side by side, and waits until all are
    /// ready: every node's slots exist, so every write from here on is shipped.
    pub fn start_pgmm(&mut self) {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let starting: Vec<usize> = (0..self.len())
                .filter(|&i| self.nodes[i].pgmm.is_none())
                .collect();
            for &i in &starting {
                let opts = self.pgmm_options(i);
                self.nodes[i].pgmm = Some(Pgmm::launch(&self.nodes[i].pg, opts));
            }
            let mut port_taken = false;
            for &i in &starting {
                let node = &mut self.nodes[i];
                let pgmm = node.pgmm.as_mut().expect("just launched");
                if let Err(failure) = pgmm.wait_ready() {
                    if !(failure.port_taken && attempt < ATTEMPTS) {
                        panic!(
                            "pgmm of node {:?} exited during startup ({}); config:\n{}\nlog:\n{}",
                            node.name, failure.status, failure.config, failure.log
                        );
                    }
                    port_taken = true;
                }
            }
            if !port_taken {
                return;
            }
            // Another process took one of the ports: every config names every node's peer port,
            // so start over with a fresh set.
            for node in &mut self.nodes {
                node.pgmm = None;
            }
            self.ports = PgmmPorts::allocate(self.len());
        }
    }

    /// The options node `i`'s pgmm starts with: fully meshed, fixed ports.
    pub fn pgmm_options(&self, i: usize) -> PgmmOptions {
        let name = &self.nodes[i].name;
        let o = self.opts.overrides.get(name).cloned().unwrap_or_default();
        let peers = (0..self.len())
            .filter(|&j| j != i)
            .map(|j| {
                (
                    self.nodes[j].name.clone(),
                    format!("127.0.0.1:{}", self.ports[j].peer),
                )
            })
            .collect();
        let tables: Vec<String> = self
            .opts
            .tables
            .iter()
            .map(|t| format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect();
        let extra_toml = format!(
            "[replication]\ntables = [{}]\nenrol_interval_seconds = {}\n{}\n{}\n{}\n",
            tables.join(", "),
            self.opts.enrol_interval_seconds,
            self.opts.replication_toml,
            self.opts.extra_toml,
            o.extra_toml
        );
        PgmmOptions {
            node: name.clone(),
            cluster: "test".into(),
            nodes: self.nodes.iter().map(|n| n.name.clone()).collect(),
            ownership: Vec::new(),
            tls: None,
            peer: Some(PeerOptions {
                secret: o.secret.unwrap_or_else(|| self.opts.secret.clone()),
                peers,
                peer_toml: o.peer_toml,
            }),
            ports: Some(self.ports[i]),
            extra_toml,
            client_toml: String::new(),
            node_toml: String::new(),
        }
    }

    /// The options of node `i` in a cluster of only the nodes `members` (indexes; a node
    /// joining or leaving), with `[node] join_from` when `join_from` is given.
    pub fn member_options(
        &self,
        i: usize,
        members: &[usize],
        join_from: Option<&str>,
    ) -> PgmmOptions {
        let mut opts = self.pgmm_options(i);
        opts.nodes = members
            .iter()
            .map(|&j| self.nodes[j].name.clone())
            .collect();
        if let Some(peer) = opts.peer.as_mut() {
            peer.peers.retain(|(name, _)| opts.nodes.contains(name));
        }
        if let Some(donor) = join_from {
            opts.node_toml = format!("join_from = \"{donor}\"\n");
        }
        opts
    }

    /// Stops node `i`'s pgmm (if any) and launches it with `opts`, without waiting for it.
    pub fn launch_pgmm_with(&mut self, i: usize, opts: PgmmOptions) {
        if let Some(mut old) = self.nodes[i].pgmm.take() {
            if old.is_running() {
                old.terminate();
                old.wait_exit(Duration::from_secs(60));
            }
        }
        self.nodes[i].pgmm = Some(Pgmm::launch(&self.nodes[i].pg, opts));
    }

    /// [`TestCluster::launch_pgmm_with`], then waits until it serves clients.
    pub fn start_pgmm_with(&mut self, i: usize, opts: PgmmOptions) {
        self.launch_pgmm_with(i, opts);
        if let Err(failure) = self.pgmm_mut(i).wait_ready() {
            failure.panic();
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// "a", "b", ...
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s Postgres, to reach it directly (not through pgmm).
    pub fn pg(&self, i: usize) -> &PgCluster {
        &self.nodes[i].pg
    }

    pub fn pg_mut(&mut self, i: usize) -> &mut PgCluster {
        &mut self.nodes[i].pg
    }

    /// Node `i`'s pgmm; panics before [`TestCluster::start_pgmm`].
    pub fn pgmm(&self, i: usize) -> &Pgmm {
        self.nodes[i]
            .pgmm
            .as_ref()
            .unwrap_or_else(|| panic!("pgmm of node {:?} was never started", self.nodes[i].name))
    }

    /// For [`Pgmm::kill`], [`Pgmm::restart`] and friends.
    pub fn pgmm_mut(&mut self, i: usize) -> &mut Pgmm {
        let name = self.nodes[i].name.clone();
        self.nodes[i]
            .pgmm
            .as_mut()
            .unwrap_or_else(|| panic!("pgmm of node {name:?} was never started"))
    }

    /// A new session on node `i`'s Postgres directly.
    pub fn db(&self, i: usize) -> Db {
        Db::connect(&self.pg(i).conninfo("postgres", "postgres"))
    }

    /// A new session through node `i`'s pgmm front door.
    pub fn front_door(&self, i: usize) -> Db {
        Db::connect(&self.pgmm(i).conninfo("postgres", "postgres"))
    }

    /// Runs `f` on the cluster's own session to node `i`'s Postgres, opening it if needed and
    /// dropping it after an error so that the next call starts afresh.
    fn with_db<T>(&self, i: usize, f: impl FnOnce(&Db) -> Result<T, String>) -> Result<T, String> {
        let mut slot = self.nodes[i]
            .db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_none() {
            *slot = Some(Db::try_connect(
                &self.pg(i).conninfo("postgres", "postgres"),
            )?);
        }
        let result = f(slot.as_ref().expect("connected above"));
        if result.is_err() {
            *slot = None;
        }
        result
    }

    /// Runs `sql` (one or more statements) directly on node `i`'s Postgres; panics on error.
    pub fn exec(&self, i: usize, sql: &str) {
        if let Err(e) = self.with_db(i, |db| db.execute(sql)) {
            panic!("on node {:?}: {sql}\n{e}", self.name(i));
        }
    }

    /// Runs `sql` directly on every node's Postgres.
    pub fn exec_all(&self, sql: &str) {
        for i in 0..self.len() {
            self.exec(i, sql);
        }
    }

    /// The first column of the first row `sql` returns on node `i` (directly), `None` for NULL;
    /// `Err` on an error or no row.
    pub fn try_scalar(&self, i: usize, sql: &str) -> Result<Option<String>, String> {
        self.with_db(i, |db| db.scalar(sql))
    }

    /// [`TestCluster::try_scalar`] that panics on an error; NULL reads as "NULL".
    pub fn scalar(&self, i: usize, sql: &str) -> String {
        match self.try_scalar(i, sql) {
            Ok(v) => v.unwrap_or_else(|| "NULL".into()),
            Err(e) => panic!("on node {:?}: {sql}\n{e}", self.name(i)),
        }
    }

    /// Every row `sql` returns on node `i` (directly), each as its columns' text ("NULL" for NULL).
    pub fn rows(&self, i: usize, sql: &str) -> Vec<Vec<String>> {
        match self.with_db(i, |db| db.rows(sql)) {
            Ok(rows) => rows,
            Err(e) => panic!("on node {:?}: {sql}\n{e}", self.name(i)),
        }
    }

    /// Creates `table` with `columns` directly on every node (before pgmm runs nothing replicates;
    /// once it does, each node skips the others' copies as already done) and, on the nodes whose
    /// pgmm runs, waits until it is enrolled, so that writes to it are captured.
    pub fn create_table(&self, table: &str, columns: &str) {
        self.exec_all(&format!("CREATE TABLE {table} ({columns})"));
        if self.nodes.iter().any(|n| n.pgmm.is_some()) {
            self.wait_enrolled(table);
        }
    }

    /// Waits until `table` (`name` or `schema.name`, unquoted) is in publication `pgmm` on every
    /// node whose pgmm runs.
    pub fn wait_enrolled(&self, table: &str) {
        let (schema, name) = table.split_once('.').unwrap_or(("public", table));
        let sql = format!(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'pgmm' \
             AND schemaname = '{schema}' AND tablename = '{name}'"
        );
        let nodes: Vec<usize> = (0..self.len())
            .filter(|&i| self.nodes[i].pgmm.is_some())
            .collect();
        self.wait_nodes(&format!("{table} in publication pgmm"), &nodes, &sql, "1");
    }

    /// Waits until `sql` returns `expected` on every node (directly), for up to [`WAIT`].
    pub fn wait_all(&self, what: &str, sql: &str, expected: &str) {
        let all: Vec<usize> = (0..self.len()).collect();
        self.wait_nodes(what, &all, sql, expected);
    }

    /// Waits until `sql` returns `expected` on each of `nodes`; the panic shows every node's last
    /// answer.
    pub fn wait_nodes(&self, what: &str, nodes: &[usize], sql: &str, expected: &str) {
        self.wait_nodes_within(what, nodes, sql, expected, WAIT);
    }

    pub fn wait_nodes_within(
        &self,
        what: &str,
        nodes: &[usize],
        sql: &str,
        expected: &str,
        timeout: Duration,
    ) {
        wait_for(what, timeout, || {
            let seen: Vec<(usize, String)> = nodes
                .iter()
                .map(|&i| {
                    let v = match self.try_scalar(i, sql) {
                        Ok(v) => v.unwrap_or_else(|| "NULL".into()),
                        Err(e) => format!("error: {e}"),
                    };
                    (i, v)
                })
                .collect();
            if seen.iter().all(|(_, v)| v == expected) {
                return Ok(());
            }
            Err(self.describe(
                &format!("{sql}\nexpected {expected:?} on every node"),
                &seen,
            ))
        })
    }

    /// `count:md5` of `table`'s rows, each as its text form, in text order: equal on two nodes
    /// exactly when they hold the same rows (every column, `updated_at` included).
    pub fn try_checksum(&self, i: usize, table: &str) -> Result<String, String> {
        self.try_scalar(i, &checksum_sql(table))
            .map(|v| v.unwrap_or_else(|| "NULL".into()))
    }

    pub fn checksum(&self, i: usize, table: &str) -> String {
        self.try_checksum(i, table)
            .unwrap_or_else(|e| panic!("checksum of {table} on node {:?}: {e}", self.name(i)))
    }

    /// Waits until every node holds `rows` rows of `table` and the same checksum; returns it.
    pub fn wait_converged(&self, table: &str, rows: usize) -> String {
        self.wait_converged_within(table, rows, WAIT)
    }

    pub fn wait_converged_within(&self, table: &str, rows: usize, timeout: Duration) -> String {
        let all: Vec<usize> = (0..self.len()).collect();
        self.wait_converged_on(table, &all, rows, timeout)
    }

    /// [`TestCluster::wait_converged`] on some of the nodes.
    pub fn wait_converged_on(
        &self,
        table: &str,
        nodes: &[usize],
        rows: usize,
        timeout: Duration,
    ) -> String {
        let prefix = format!("{rows}:");
        wait_for(
            &format!("{table} to converge to {rows} rows"),
            timeout,
            || {
                let seen: Vec<(usize, String)> = nodes
                    .iter()
                    .map(|&i| {
                        let v = self
                            .try_checksum(i, table)
                            .unwrap_or_else(|e| format!("error: {e}"));
                        (i, v)
                    })
                    .collect();
                let first = &seen[0].1;
                if first.starts_with(&prefix) && seen.iter().all(|(_, v)| v == first) {
                    return Ok(first.clone());
                }
                Err(self.describe(
                    &format!("rows:checksum of {table}, expected {rows} rows everywhere"),
                    &seen,
                ))
            },
        )
    }

    /// `pgmm.conflicts` on node `i`, each row as "kind table_name origin resolution", oldest first.
    pub fn conflicts(&self, i: usize) -> Vec<String> {
        self.rows(
            i,
            "SELECT concat_ws(' ', kind, table_name, origin, resolution) \
             FROM pgmm.conflicts ORDER BY id",
        )
        .into_iter()
        .map(|mut r| r.remove(0))
        .collect()
    }

    /// Node `i`'s current WAL insert position, in bytes.
    /// Panics unless `pgmm.conflicts` is empty on every node.
    pub fn assert_no_conflicts(&self) {
        for i in 0..self.len() {
            assert_eq!(
                self.conflicts(i),
                Vec::<String>::new(),
                "pgmm.conflicts on node {:?}",
                self.name(i)
            );
        }
    }

    pub fn wal_lsn(&self, i: usize) -> u64 {
        self.scalar(i, "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
            .parse()
            .expect("an LSN difference is an integer")
    }

    /// A metric of node `i`'s pgmm; `None` when the series is absent.
    pub fn metric(&self, i: usize, series: &str) -> Option<f64> {
        self.pgmm(i).metric_value(series)
    }

    /// Waits until `pred` holds for a metric of node `i`'s pgmm (absent reads as `None`); returns
    /// the value.
    pub fn wait_metric(
        &self,
        i: usize,
        series: &str,
        what: &str,
        pred: impl Fn(Option<f64>) -> bool,
    ) -> Option<f64> {
        wait_for(
            &format!("{series} on node {:?}: {what}", self.name(i)),
            WAIT,
            || {
                let v = self.metric(i, series);
                if pred(v) {
                    Ok(v)
                } else {
                    Err(format!("{v:?}"))
                }
            },
        )
    }

    fn describe(&self, header: &str, seen: &[(usize, String)]) -> String {
        let mut out = header.to_string();
        for (i, v) in seen {
            out.push_str(&format!("\n  node {:?}: {v}", self.name(*i)));
        }
        out
    }
}

/// The query behind [`TestCluster::checksum`].
pub fn checksum_sql(table: &str) -> String {
    format!(
        "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '-') \
         FROM {table} AS t"
    )
}

/// A blocking tokio-postgres session (simple protocol) with its own single-threaded runtime, so
/// that synchronous tests and helper threads can talk to Postgres or pgmm without a client process
/// per statement.
pub struct Db {
    client: Option<Client>,
    conn: Option<JoinHandle<()>>,
    rt: Runtime,
}

impl Db {
    pub fn connect(conninfo: &str) -> Db {
        Db::try_connect(conninfo).unwrap_or_else(|e| panic!("connect {conninfo}: {e}"))
    }

    pub fn try_connect(conninfo: &str) -> Result<Db, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build a single-threaded tokio runtime");
        let (client, conn) = rt.block_on(async {
            match tokio::time::timeout(STATEMENT_TIMEOUT, tokio_postgres::connect(conninfo, NoTls))
                .await
            {
                Ok(r) => r.map_err(|e| pg_error(&e)),
                Err(_) => Err(format!("connect timed out after {STATEMENT_TIMEOUT:?}")),
            }
        })?;
        let conn = rt.spawn(async move {
            let _ = conn.await;
        });
        Ok(Db {
            client: Some(client),
            conn: Some(conn),
            rt,
        })
    }

    fn run<T>(
        &self,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, String> {
        self.rt.block_on(async {
            match tokio::time::timeout(STATEMENT_TIMEOUT, fut).await {
                Ok(r) => r.map_err(|e| pg_error(&e)),
                Err(_) => Err(format!("no answer within {STATEMENT_TIMEOUT:?}")),
            }
        })
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("client lives until drop")
    }

    /// Runs one or more statements (simple protocol: several statements outside an explicit
    /// transaction block commit together).
    pub fn execute(&self, sql: &str) -> Result<(), String> {
        self.run(self.client().batch_execute(sql))
    }

    /// Every row, from every statement in `sql`, each as its columns' text ("NULL" for NULL).
    pub fn rows(&self, sql: &str) -> Result<Vec<Vec<String>>, String> {
        let messages = self.run(self.client().simple_query(sql))?;
        Ok(messages
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|c| row.get(c).unwrap_or("NULL").to_string())
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }

    /// The first column of the first row; `None` for NULL, `Err` if there is no row.
    pub fn scalar(&self, sql: &str) -> Result<Option<String>, String> {
        let messages = self.run(self.client().simple_query(sql))?;
        messages
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_owned)),
                _ => None,
            })
            .ok_or_else(|| format!("no row from {sql}"))
    }

    /// [`Db::execute`] that panics on error.
    pub fn exec(&self, sql: &str) {
        if let Err(e) = self.execute(sql) {
            panic!("{sql}\n{e}");
        }
    }

    /// [`Db::scalar`] that panics on error or NULL.
    pub fn value(&self, sql: &str) -> String {
        match self.scalar(sql) {
            Ok(Some(v)) => v,
            Ok(None) => panic!("{sql} returned NULL"),
            Err(e) => panic!("{sql}\n{e}"),
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // Dropping the client makes the connection task send Terminate and finish; give it the
        // moment it needs, so that the server does not log an unexpected EOF.
        drop(self.client.take());
        if let Some(conn) = self.conn.take() {
            self.rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
            });
        }
    }
}

/// An error with what the server said (tokio-postgres's Display is just "db error").
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}
