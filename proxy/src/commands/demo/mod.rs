//! `pgmm demo`: a local cluster in one command, for someone trying pgmm for the first time.
//!
//! It initdb's one Postgres per node in a temporary directory (with the settings replication
//! needs: `wal_level = logical`, `track_commit_timestamp = on`, a slot and WAL sender per
//! peer), starts them, runs one pgmm node in front of each Postgres, fully meshed with a
//! generated shared secret, creates the `demo` schema once through the first node's front door
//! (schema changes replicate), waits until every node publishes its tables, then prints the
//! URLs to connect to.
//!
//! The schema shows each way a table can be written: `demo.items` is shared (any node writes;
//! colliding writes are conflicts, logged in `pgmm.conflicts`), `demo.owned_by_<node>` is
//! owned by one node (the others' front doors refuse writes to it), and `demo.accounts` is
//! owned row by row through its `home_node` column. `--workload` (module `workload`) keeps every node writing and prints a
//! line per second, so replication, lag and conflicts can be watched without typing SQL.
//!
//! Design note: the pgmm nodes run inside this process (with [`crate::node::run_node`], one
//! shared cancellation token) rather than as `pgmm serve` child processes, so that there is
//! exactly one process to stop. One Ctrl-C (or SIGTERM) reaches one process, which stops the
//! nodes, then stops every Postgres it started and removes the directory, in that order;
//! there are no pgmm children to orphan, to find again, or to signal one by one, and a failure
//! anywhere during start-up unwinds through the same guard (`postgres::Workspace`).

pub(crate) mod ports;
mod postgres;
mod workload;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::commands::output;
use crate::commands::status::http;
use crate::config::{Config, ConfigError};
use crate::node::{run_node, ServeError};
use postgres::{Server, Workspace};

/// The most nodes the demo starts: node names are single letters, and each node is a whole
/// Postgres server on a laptop.
pub const MAX_NODES: usize = 9;
/// Seconds open client sessions get to finish when the demo stops; short, because the person
/// who pressed Ctrl-C wants the prompt back.
const CLIENT_GRACE_SECONDS: u64 = 2;
/// How long the pgmm nodes may take to start listening, to link to each other, and to stop.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);
/// Random bytes in the generated peer secret (written hex-encoded; pgmm wants at least 16).
const SECRET_BYTES: usize = 32;
/// Ports each node listens on: Postgres, the front door, metrics, the peer link.
const PORTS_PER_NODE: usize = 4;

/// Why the demo could not start, or stopped abnormally.
#[derive(Debug, Error)]
pub enum DemoError {
    #[error("--nodes must be between 1 and {MAX_NODES}, not {0}")]
    NodeCount(usize),
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found: \
         install them with 'apt-get install -y postgresql'"
    )]
    BinariesNotFound,
    #[error(
        "running as root, and Postgres refuses to run as root, but there is no `postgres` system \
         user to run it as; create one (apt-get install -y postgresql does) or run the demo as \
         an ordinary user"
    )]
    NoPostgresUser,
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("initdb for node {node} failed ({status}); {log}")]
    Initdb {
        node: String,
        status: ExitStatus,
        log: String,
    },
    #[error("postgres of node {node} exited during start-up ({status}); {log}")]
    PostgresExited {
        node: String,
        status: ExitStatus,
        log: String,
    },
    #[error("timed out waiting for {what}; {log}")]
    Timeout { what: String, log: String },
    #[error("cannot create schema demo on node {node}: {source}")]
    Schema {
        node: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the generated config of node {node} is invalid: {source}")]
    Config {
        node: String,
        #[source]
        source: ConfigError,
    },
    #[error("pgmm node {node} failed: {source}")]
    Node {
        node: String,
        #[source]
        source: ServeError,
    },
    #[error("pgmm node {node} stopped unexpectedly{detail}")]
    NodeStopped { node: String, detail: String },
    #[error("pgmm node {node} did not answer a query on {addr} within {NODE_TIMEOUT:?}")]
    NotServing { node: String, addr: String },
    #[error("cannot generate the cluster secret: the system random source failed")]
    Random,
    #[error("cleaning up: {0}")]
    Cleanup(String),
}

impl DemoError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// 2 for what the user fixes before trying again (arguments, missing software), 1 for a
    /// failure while running.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NodeCount(_) | Self::BinariesNotFound | Self::NoPostgresUser => 2,
            _ => 1,
        }
    }
}

/// `pgmm demo --nodes N [--workload]`: runs the demo until SIGINT or SIGTERM.
pub fn main(nodes: usize, workload: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            output::err(format_args!(
                "pgmm demo: cannot start the tokio runtime: {e}"
            ));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(nodes, workload)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::err(format_args!("pgmm demo: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}

/// Starts the demo, prints how to reach it, and runs until SIGINT or SIGTERM; everything
/// started is stopped and the directory removed before this returns, also on error.
pub async fn run(nodes: usize, workload: bool) -> Result<(), DemoError> {
    let names = node_names(nodes)?;
    let server = Server::locate()?;
    let stop = CancellationToken::new();
    let signals = watch_signals(stop.clone())?;
    let result = run_until(&names, server, workload, &stop).await;
    signals.abort();
    result
}

/// One node's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodePorts {
    pub(crate) postgres: u16,
    pub(crate) client: u16,
    pub(crate) metrics: u16,
    pub(crate) peer: u16,
}

/// The running pgmm nodes.
struct Running {
    tasks: JoinSet<Result<(), ServeError>>,
    /// Node name of each task, to name the node whose task panicked.
    names: HashMap<tokio::task::Id, String>,
    shutdown: CancellationToken,
}

/// What one node task ended with.
type Joined = Result<(tokio::task::Id, Result<(), ServeError>), JoinError>;

async fn run_until(
    names: &[String],
    server: Server,
    workload: bool,
    stop: &CancellationToken,
) -> Result<(), DemoError> {
    progress(format_args!(
        "using the Postgres server binaries in {}",
        server.bindir().display()
    ));
    let mut workspace = Workspace::create(server)?;
    let ports = pick_ports(names.len())?;
    let started = tokio::select! {
        started = start(&mut workspace, names, &ports) => Some(started),
        () = stop.cancelled() => None,
    };
    let mut running = match started {
        Some(Ok(running)) => running,
        Some(Err(e)) => {
            progress(format_args!("start-up failed; stopping what was started"));
            if let Err(cleanup) = workspace.teardown() {
                output::err(format_args!("pgmm demo: {cleanup}"));
            }
            return Err(e);
        }
        None => {
            progress(format_args!(
                "interrupted during start-up; stopping what was started"
            ));
            return workspace.teardown();
        }
    };
    print_endpoints(names, &ports, workspace.root());
    let workload_stop = stop.child_token();
    let workload = workload.then(|| {
        progress(format_args!(
            "starting the workload: every node writes, a line per second"
        ));
        tokio::spawn(workload::run(
            names.to_vec(),
            ports.clone(),
            workload_stop.clone(),
        ))
    });

    let failure = tokio::select! {
        () = stop.cancelled() => None,
        Some(joined) = running.tasks.join_next_with_id() => Some(node_stopped(&running.names, joined)),
    };
    if let Some(workload) = workload {
        // Its sessions close before the nodes go, so that it does not report their shutdown
        // as write errors.
        workload_stop.cancel();
        if tokio::time::timeout(NODE_TIMEOUT, workload).await.is_err() {
            output::err(format_args!(
                "pgmm demo: the workload did not stop within {NODE_TIMEOUT:?}"
            ));
        }
    }
    progress(format_args!("stopping the pgmm nodes"));
    running.shutdown.cancel();
    let drained = tokio::time::timeout(NODE_TIMEOUT, async {
        while let Some(joined) = running.tasks.join_next_with_id().await {
            if let Err(e) = flatten(&running.names, joined) {
                output::err(format_args!("pgmm demo: {e}"));
            }
        }
    })
    .await;
    if drained.is_err() {
        output::err(format_args!(
            "pgmm demo: the pgmm nodes did not stop within {NODE_TIMEOUT:?}; aborting them"
        ));
        running.tasks.abort_all();
    }
    progress(format_args!(
        "stopping postgres and removing {}",
        workspace.root().display()
    ));
    let cleaned = workspace.teardown();
    match failure {
        Some(e) => {
            if let Err(cleanup) = cleaned {
                output::err(format_args!("pgmm demo: {cleanup}"));
            }
            Err(e)
        }
        None => {
            cleaned?;
            progress(format_args!("demo stopped"));
            Ok(())
        }
    }
}

async fn start(
    workspace: &mut Workspace,
    names: &[String],
    ports: &[NodePorts],
) -> Result<Running, DemoError> {
    progress(format_args!(
        "creating {} (nodes {}) in {} ...",
        plural(names.len(), "Postgres cluster"),
        names.join(", "),
        workspace.root().display()
    ));
    for name in names {
        workspace.prepare_node(name)?;
    }
    let secret_file = write_secret(workspace.root())?;
    workspace.initdb(names).await?;

    let mut postmasters = Vec::with_capacity(names.len());
    for (name, ports) in names.iter().zip(ports) {
        progress(format_args!(
            "starting postgres for node {name} on 127.0.0.1:{} ...",
            ports.postgres
        ));
        workspace.configure(name, ports.postgres, names.len() - 1)?;
        postmasters.push(workspace.start_postgres(name)?);
    }
    for ((name, ports), postmaster) in names.iter().zip(ports).zip(postmasters) {
        progress(format_args!(
            "waiting for postgres of node {name} to accept connections ..."
        ));
        workspace.wait_ready(postmaster, ports.postgres).await?;
    }

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut task_names = HashMap::new();
    for (name, node_ports) in names.iter().zip(ports) {
        progress(format_args!("starting pgmm for node {name} ..."));
        let text = node_config(name, names, ports, node_ports, &secret_file);
        let path = workspace.node_dir(name).join("pgmm.toml");
        std::fs::write(&path, &text)
            .map_err(|e| DemoError::io(format!("write {}", path.display()), e))?;
        let config = Config::parse(&text, &path).map_err(|source| DemoError::Config {
            node: name.clone(),
            source,
        })?;
        let task = tasks.spawn(run_node(config, shutdown.clone()));
        task_names.insert(task.id(), name.clone());
    }

    let listening = async {
        for (name, ports) in names.iter().zip(ports) {
            wait_serving(name, ports).await?;
        }
        Ok::<(), DemoError>(())
    };
    tokio::select! {
        ready = listening => ready?,
        Some(joined) = tasks.join_next_with_id() => return Err(node_stopped(&task_names, joined)),
    }
    if names.len() > 1 {
        progress(format_args!(
            "waiting for the nodes to link to each other ..."
        ));
        tokio::select! {
            () = wait_linked(names, ports) => {}
            Some(joined) = tasks.join_next_with_id() => return Err(node_stopped(&task_names, joined)),
        }
    }
    // Once, through the first node's front door: the schema replicates to the others.
    let first = &names[0];
    progress(format_args!(
        "creating schema demo through node {first} (schema changes replicate to every node) ..."
    ));
    tokio::select! {
        created = create_schema(names, ports) => created?,
        Some(joined) = tasks.join_next_with_id() => return Err(node_stopped(&task_names, joined)),
    }
    Ok(Running {
        tasks,
        names: task_names,
        shutdown,
    })
}

/// Runs [`schema_sql`] through the first node's front door, then waits until every node has
/// the tables in its publication (they replicated and were enrolled), so that the workload and
/// the newcomer's first writes replicate.
async fn create_schema(names: &[String], ports: &[NodePorts]) -> Result<(), DemoError> {
    let schema_error = |node: &str| {
        let node = node.to_owned();
        move |source| DemoError::Schema { node, source }
    };
    let (client, connection) =
        tokio_postgres::connect(&client_url(&ports[0]), tokio_postgres::NoTls)
            .await
            .map_err(schema_error(&names[0]))?;
    tokio::spawn(connection);
    client
        .batch_execute(&schema_sql(names))
        .await
        .map_err(schema_error(&names[0]))?;
    let tables = (2 + names.len()) as i64;
    let deadline = Instant::now() + NODE_TIMEOUT;
    for (name, ports) in names.iter().zip(ports) {
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", ports.postgres);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .map_err(schema_error(name))?;
        tokio::spawn(connection);
        let mut pause = Duration::from_millis(10);
        loop {
            let published: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_catalog.pg_publication_tables \
                     WHERE pubname = 'pgmm' AND schemaname = 'demo'",
                    &[],
                )
                .await
                .map_err(schema_error(name))?
                .get(0);
            if published >= tables {
                break;
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout {
                    what: format!(
                        "schema demo to replicate to node {name} ({published} of {tables} tables)"
                    ),
                    log: "the node log lines above say why".into(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Node names `a`, `b`, ... for `--nodes`.
pub(crate) fn node_names(nodes: usize) -> Result<Vec<String>, DemoError> {
    if !(1..=MAX_NODES).contains(&nodes) {
        return Err(DemoError::NodeCount(nodes));
    }
    Ok((b'a'..)
        .take(nodes)
        .map(|b| char::from(b).to_string())
        .collect())
}

/// Four free loopback ports per node, outside the ephemeral range (see [`ports`]).
fn pick_ports(nodes: usize) -> Result<Vec<NodePorts>, DemoError> {
    let ports = ports::free_ports(nodes * PORTS_PER_NODE)
        .map_err(|e| DemoError::io("find free ports on 127.0.0.1", e))?;
    Ok(ports
        .chunks(PORTS_PER_NODE)
        .map(|p| NodePorts {
            postgres: p[0],
            client: p[1],
            metrics: p[2],
            peer: p[3],
        })
        .collect())
}

/// Writes a fresh random cluster secret to `<dir>/cluster.secret`, readable by this user only
/// (pgmm refuses a secret file that group or others can read). Every node of the demo runs in
/// this process and reads the same file.
fn write_secret(dir: &Path) -> Result<PathBuf, DemoError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; SECRET_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| DemoError::Random)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join("cluster.secret");
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(hex.as_bytes()))
        .map_err(|e| DemoError::io(format!("write {}", path.display()), e))?;
    Ok(path)
}

/// The `demo` schema, identical on every node: the shared `demo.items`, one
/// `demo.owned_by_<node>` per node, which the generated configs give to that node, and
/// `demo.accounts`, whose rows belong to the node named in `home_node`. Every table has what
/// replication needs: a primary key and the conflict column `updated_at`.
pub(crate) fn schema_sql(names: &[String]) -> String {
    const COLUMNS: &str =
        "(id bigint primary key, v text, updated_at timestamptz not null default now())";
    let mut sql = format!(
        "create schema if not exists demo;\n\
         create table if not exists demo.items {COLUMNS};\n\
         comment on table demo.items is 'shared: write it through any node';\n\
         create table if not exists demo.accounts (id bigint primary key, \
         home_node text not null, balance int, \
         updated_at timestamptz not null default now());\n\
         comment on table demo.accounts is \
         'row-owned: a row belongs to the node named in home_node';\n"
    );
    for name in names {
        sql.push_str(&format!(
            "create table if not exists demo.owned_by_{name} {COLUMNS};\n\
             comment on table demo.owned_by_{name} is \
             'owned by node {name}: pgmm refuses writes to it through the other nodes';\n"
        ));
    }
    sql
}

/// The config file of node `name`: fully meshed with every other node, replicating schema
/// `demo`, each `demo.owned_by_<node>` owned by its node and `demo.accounts` row by row.
pub(crate) fn node_config(
    name: &str,
    names: &[String],
    all_ports: &[NodePorts],
    ports: &NodePorts,
    secret_file: &Path,
) -> String {
    let nodes = names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        "# Generated by `pgmm demo` for node {name:?} of {count}.\n\
         [node]\n\
         name = {name:?}\n\
         \n\
         [cluster]\n\
         name = \"demo\"\n\
         nodes = [{nodes}]\n\
         \n\
         [client]\n\
         listen = \"127.0.0.1:{client}\"\n\
         shutdown_grace_seconds = {CLIENT_GRACE_SECONDS}\n\
         \n\
         [postgres]\n\
         url = \"postgres://postgres@127.0.0.1:{postgres}/postgres\"\n\
         \n\
         [metrics]\n\
         listen = \"127.0.0.1:{metrics}\"\n\
         \n\
         [replication]\n\
         tables = [\"demo.*\"]\n",
        count = all_ports.len(),
        client = ports.client,
        postgres = ports.postgres,
        metrics = ports.metrics,
    );
    if names.len() > 1 {
        text.push_str(&format!(
            "\n[peer]\nlisten = \"127.0.0.1:{}\"\nsecret_file = {}\n",
            ports.peer,
            toml_string(&secret_file.display().to_string())
        ));
        for (peer, peer_ports) in names.iter().zip(all_ports) {
            if peer != name {
                text.push_str(&format!(
                    "\n[[peers]]\nname = {peer:?}\naddress = \"127.0.0.1:{}\"\n",
                    peer_ports.peer
                ));
            }
        }
    }
    text.push_str("\n[[ownership]]\ntable = \"demo.accounts\"\nowner_column = \"home_node\"\n");
    for owner in names {
        text.push_str(&format!(
            "\n[[ownership]]\ntable = \"demo.owned_by_{owner}\"\nowner = {owner:?}\n"
        ));
    }
    text
}

/// A TOML basic string: paths may hold quotes or backslashes (TMPDIR is the user's).
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The client URL of a node: through its pgmm front door, not to Postgres directly.
pub(crate) fn client_url(ports: &NodePorts) -> String {
    format!("postgres://postgres@127.0.0.1:{}/postgres", ports.client)
}

/// What the newcomer needs, on stdout: one `<name> <url>` line per node (a stable format that
/// scripts and tests read), metrics, something to try, and how to stop.
fn print_endpoints(names: &[String], ports: &[NodePorts], root: &Path) {
    let mut text = format!(
        "pgmm demo: {} running, each its own Postgres behind pgmm{}\n",
        plural(names.len(), "node"),
        if names.len() > 1 {
            ", replicating schema demo to each other"
        } else {
            ""
        }
    );
    for (name, ports) in names.iter().zip(ports) {
        text.push_str(&format!("{name} {}\n", client_url(ports)));
        text.push_str(&format!(
            "  metrics: http://127.0.0.1:{0}/metrics  (also /readyz, /status)\n",
            ports.metrics
        ));
    }
    text.push_str(&try_it(names, ports, root));
    text.push_str(&format!(
        "Ctrl-C stops the demo and removes {}\n",
        root.display()
    ));
    // Nothing useful to do if stdout is gone (e.g. piped into a closed `head`); keep running.
    output::out_text(&text);
}

/// Commands that show replication, a conflict and an ownership refusal in a minute.
fn try_it(names: &[String], ports: &[NodePorts], root: &Path) -> String {
    let (Some(first), Some(last)) = (names.first(), names.last()) else {
        return String::new();
    };
    let url = |i: usize| client_url(&ports[i]);
    let (a, z) = (url(0), url(names.len() - 1));
    if names.len() == 1 {
        return format!(
            "try: psql {a} -c \"insert into demo.items (id, v) values (1, 'hello')\"\n"
        );
    }
    let b = url(1);
    let second = &names[1];
    format!(
        "try:\n\
         \x20 replication:  psql {a} -c \"insert into demo.items (id, v) values (1, 'hello from {first}')\"\n\
         \x20               psql {z} -c \"select * from demo.items\"\n\
         \x20 refusal:      psql {a} -c \"insert into demo.owned_by_{last} (id, v) values (1, 'x')\"   \
         (node {last} owns that table)\n\
         \x20 conflict:     psql {b} -c \"begin; insert into demo.items (id, v) values (2, '{second}'); \
         select pg_sleep(2); commit\" & sleep 0.5\n\
         \x20               psql {a} -c \"insert into demo.items (id, v) values (2, '{first}')\"; wait\n\
         \x20               psql {a} -c \"select kind, table_name, resolution from pgmm.conflicts\"\n\
         \x20 row owners:   psql {a} -c \"insert into demo.accounts (id, home_node, balance) values (1, '{first}', 100)\"\n\
         \x20               psql {a} -c \"insert into demo.accounts (id, home_node, balance) values (2, '{second}', 5)\"   \
         (refused: that row would belong to {second})\n\
         \x20 node status:  {pgmm} status --config {config}   (add --json for scripts)\n",
        pgmm = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "pgmm".to_owned()),
        config = root.join(first).join("pgmm.toml").display(),
    )
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Start-up progress, on stderr so that stdout carries only the result; lost without harm when
/// stderr is closed (see [`crate::commands::output`]).
fn progress(message: std::fmt::Arguments<'_>) {
    output::err(format_args!("pgmm demo: {message}"));
}

/// Polls until a query goes through the node's front door to its Postgres. A bare TCP probe
/// would do to see the listener, but pgmm rightly counts a connection closed before its
/// startup packet as a protocol error; a real session is both clean and a stronger check.
async fn wait_serving(name: &str, ports: &NodePorts) -> Result<(), DemoError> {
    let url = format!("{}?connect_timeout=5", client_url(ports));
    let deadline = Instant::now() + NODE_TIMEOUT;
    let mut pause = Duration::from_millis(5);
    loop {
        let attempt = async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            let driver = tokio::spawn(connection);
            let answered = client.simple_query("select 1").await;
            drop(client);
            let _ = driver.await;
            answered
        };
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(DemoError::NotServing {
                node: name.to_owned(),
                addr: format!("127.0.0.1:{}", ports.client),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Waits until every node's `/readyz` answers 200: its Postgres answers and all its peer links
/// are up. Only a progress step: if a link stays down the demo still runs (the nodes retry),
/// and the person is told which one.
async fn wait_linked(names: &[String], ports: &[NodePorts]) {
    let deadline = Instant::now() + NODE_TIMEOUT;
    for (name, ports) in names.iter().zip(ports) {
        let addr = format!("127.0.0.1:{}", ports.metrics);
        let mut pause = Duration::from_millis(10);
        loop {
            let answer = http::get(&addr, "/readyz", Duration::from_secs(5)).await;
            let why = match answer {
                Ok((200, _)) => break,
                Ok((_, body)) => body.trim().to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                progress(format_args!(
                    "node {name} is not linked to all its peers after {NODE_TIMEOUT:?} ({why}); \
                     it keeps retrying"
                ));
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

/// A node task's outcome as an error: a node never stops on its own while the demo runs.
fn node_stopped(names: &HashMap<tokio::task::Id, String>, joined: Joined) -> DemoError {
    match flatten(names, joined) {
        Err(e) => e,
        Ok(node) => DemoError::NodeStopped {
            node,
            detail: String::new(),
        },
    }
}

/// The node a task ran, or why it failed.
fn flatten(names: &HashMap<tokio::task::Id, String>, joined: Joined) -> Result<String, DemoError> {
    let name = |id| names.get(&id).cloned().unwrap_or_else(|| "?".to_owned());
    match joined {
        Ok((id, Ok(()))) => Ok(name(id)),
        Ok((id, Err(source))) => Err(DemoError::Node {
            node: name(id),
            source,
        }),
        Err(e) => Err(DemoError::NodeStopped {
            node: name(e.id()),
            detail: format!(": {e}"),
        }),
    }
}

fn watch_signals(stop: CancellationToken) -> Result<tokio::task::JoinHandle<()>, DemoError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(DemoError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DemoError::Signal)?;
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => progress(format_args!("SIGTERM: stopping")),
            _ = int.recv() => progress(format_args!("SIGINT: stopping")),
        }
        stop.cancel();
    }))
}
