//! The demo's throwaway Postgres servers: finding the server binaries, one temporary directory
//! holding every cluster, and a guard that stops whatever was started and removes the directory
//! however the demo ends (Ctrl-C, a failed start-up, an early return, a panic).
//!
//! Postgres refuses to run as root, and the one-command demo is often run as root (containers,
//! fresh VMs), so as root `initdb` and `postgres` run as the `postgres` system user, set directly
//! on the child (uid/gid) rather than through `su`: the child we hold is then the postmaster
//! itself, which is what we signal and wait for.
//!
//! Each server runs in its own process group, so a Ctrl-C typed in the terminal reaches only
//! pgmm, which then stops things in order (pgmm nodes first, then Postgres) instead of every
//! process racing to exit at once.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use super::DemoError;
use crate::commands::output;

/// How long a cluster may take to accept connections, and the servers to stop.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Where Debian and Ubuntu install each major version's server binaries, side by side.
const DEBIAN_LIB_DIR: &str = "/usr/lib/postgresql";
/// Lines of a server or initdb log shown when it fails.
const LOG_TAIL_LINES: usize = 15;

/// The Postgres server installation to use, and who to run it as.
#[derive(Debug, Clone)]
pub(super) struct Server {
    bindir: PathBuf,
    /// uid/gid of the `postgres` system user when we are root; `None` runs as ourselves.
    run_as: Option<(u32, u32)>,
}

impl Server {
    /// Finds `initdb` and `postgres` and, when running as root, the user to run them as.
    pub(super) fn locate() -> Result<Server, DemoError> {
        let bindir = find_bindir(candidate_dirs()).ok_or(DemoError::BinariesNotFound)?;
        let run_as = server_user()?;
        Ok(Server { bindir, run_as })
    }

    pub(super) fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A command for one of the server binaries, as the server user, in its own process group.
    fn command(&self, program: &str, cwd: &Path) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        cmd.current_dir(cwd)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .stdin(Stdio::null())
            .process_group(0);
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Hands `path` to the server user, so that initdb and postgres can write there.
    fn give(&self, path: &Path) -> Result<(), DemoError> {
        match self.run_as {
            Some((uid, gid)) => chown(path, Some(uid), Some(gid))
                .map_err(|e| DemoError::io(format!("chown {} to postgres", path.display()), e)),
            None => Ok(()),
        }
    }

    /// Asks a postmaster for a fast shutdown (SIGINT: roll back open transactions, disconnect
    /// clients, checkpoint, exit). Sending a signal from safe Rust needs a helper process:
    /// `pg_ctl kill` ships with the server binaries; `kill` is the fallback.
    fn fast_shutdown(&self, pid: u32, cwd: &Path) -> io::Result<()> {
        let pid = pid.to_string();
        let mut cmd = if self.bindir.join("pg_ctl").is_file() {
            let mut cmd = self.command("pg_ctl", cwd);
            cmd.args(["kill", "INT", &pid]);
            cmd
        } else {
            let mut cmd = Command::new("kill");
            cmd.args(["-s", "INT", &pid]);
            cmd
        };
        let status = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "signal sender exited with {status}"
            )))
        }
    }
}

/// Where to look, best first: `$PG_BINDIR` (what the tests and CI use to pick a major version),
/// `pg_config --bindir`, the newest `/usr/lib/postgresql/*/bin`, then each `PATH` entry.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    dirs.extend(versioned_bindirs(Path::new(DEBIAN_LIB_DIR)));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs
}

/// `<root>/<version>/bin` for every version-named directory, newest first ("16" before "15",
/// "10" before "9.6").
pub(super) fn versioned_bindirs(root: &Path) -> Vec<PathBuf> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// The first directory holding both `initdb` and `postgres`.
pub(super) fn find_bindir(candidates: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    candidates
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
}

/// `Some((uid, gid))` of the `postgres` user when we are root, `None` otherwise.
fn server_user() -> Result<Option<(u32, u32)>, DemoError> {
    let me = id(&["-u"]).ok_or_else(|| {
        DemoError::io(
            "find out the current user with `id -u`",
            io::Error::other("`id -u` failed"),
        )
    })?;
    if me != 0 {
        return Ok(None);
    }
    match (id(&["-u", "postgres"]), id(&["-g", "postgres"])) {
        (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
        _ => Err(DemoError::NoPostgresUser),
    }
}

/// Runs `id <args>` and parses the number it prints.
fn id(args: &[&str]) -> Option<u32> {
    let out = Command::new("id").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The lines appended to a cluster's `postgresql.conf`: its own port on loopback only, its Unix
/// socket inside the demo directory (so it never collides with a system Postgres in
/// `/var/run/postgresql`), and the settings replication needs: logical decoding, commit
/// timestamps (last-writer-wins needs to know when and where a row was written; `pgmm serve`
/// with peers refuses to start without them), and a slot and WAL sender per peer, plus
/// headroom for pgmm's short slot-setup sessions and a curious `pg_recvlogical`.
pub(super) fn server_settings(port: u16, socket_dir: &Path, peers: usize) -> String {
    let socket_dir = socket_dir.display().to_string().replace('\'', "''");
    format!(
        "\n# Added by `pgmm demo`.\n\
         port = {port}\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{socket_dir}'\n\
         wal_level = logical\n\
         track_commit_timestamp = on\n\
         max_replication_slots = {senders}\n\
         max_wal_senders = {senders}\n\
         max_connections = 100\n",
        senders = peers + 4,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Initdb,
    Postgres,
}

/// A process the workspace started and must stop.
struct Spawned {
    node: String,
    role: Role,
    child: Child,
    log: PathBuf,
}

/// The demo's temporary directory and every process started in it. Dropping it stops them and
/// removes the directory; [`Workspace::teardown`] does the same and reports problems.
pub(super) struct Workspace {
    root: PathBuf,
    server: Server,
    children: Vec<Spawned>,
    torn_down: bool,
}

impl Workspace {
    /// Creates a fresh directory under the system temporary directory.
    pub(super) fn create(server: Server) -> Result<Workspace, DemoError> {
        let base = std::env::temp_dir();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        for attempt in 0..100u32 {
            let root = base.join(format!(
                "pgmm-demo-{}-{:x}",
                std::process::id(),
                stamp.wrapping_add(attempt)
            ));
            match fs::create_dir(&root) {
                Ok(()) => {
                    let workspace = Workspace {
                        root,
                        server,
                        children: Vec::new(),
                        torn_down: false,
                    };
                    workspace.server.give(&workspace.root)?;
                    return Ok(workspace);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(DemoError::io(
                        format!("create a directory in {}", base.display()),
                        e,
                    ))
                }
            }
        }
        Err(DemoError::io(
            format!("create a directory in {}", base.display()),
            io::Error::from(io::ErrorKind::AlreadyExists),
        ))
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<node>`: the node's socket directory, logs and pgmm config; its data directory
    /// is `data` inside.
    pub(super) fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join(node)
    }

    fn data_dir(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("data")
    }

    /// Creates the node directory, owned by the server user.
    pub(super) fn prepare_node(&self, node: &str) -> Result<(), DemoError> {
        let dir = self.node_dir(node);
        fs::create_dir(&dir).map_err(|e| DemoError::io(format!("create {}", dir.display()), e))?;
        self.server.give(&dir)
    }

    fn spawn(
        &mut self,
        node: &str,
        role: Role,
        mut cmd: Command,
        log: PathBuf,
    ) -> Result<usize, DemoError> {
        let file = File::create(&log)
            .map_err(|e| DemoError::io(format!("create {}", log.display()), e))?;
        let err = file
            .try_clone()
            .map_err(|e| DemoError::io(format!("open {}", log.display()), e))?;
        let what = match role {
            Role::Initdb => "initdb",
            Role::Postgres => "postgres",
        };
        let child = cmd.stdout(file).stderr(err).spawn().map_err(|e| {
            let hint = match (self.server.run_as, e.kind()) {
                (Some(_), io::ErrorKind::PermissionDenied) => format!(
                    " as the postgres user, who cannot enter {}; point TMPDIR at a \
                         directory every user can enter, such as /tmp",
                    self.root.display()
                ),
                _ => String::new(),
            };
            DemoError::io(format!("run {what} for node {node}{hint}"), e)
        })?;
        self.children.push(Spawned {
            node: node.to_owned(),
            role,
            child,
            log,
        });
        Ok(self.children.len() - 1)
    }

    /// Runs initdb for every node at once (it is mostly I/O and fsync-free here), and waits
    /// for all of them.
    pub(super) async fn initdb(&mut self, nodes: &[String]) -> Result<(), DemoError> {
        let mut started = Vec::with_capacity(nodes.len());
        for node in nodes {
            let mut cmd = self.server.command("initdb", &self.node_dir(node));
            cmd.arg("-D")
                .arg(self.data_dir(node))
                .args(["-A", "trust", "-U", "postgres", "--no-sync"])
                .args(["--encoding=UTF8", "--locale=C"]);
            let log = self.node_dir(node).join("initdb.log");
            started.push(self.spawn(node, Role::Initdb, cmd, log)?);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        for index in started {
            let status = poll(deadline, || self.exited(index)).await;
            let spawned = &self.children[index];
            match status {
                Some(status) if status.success() => {}
                Some(status) => {
                    return Err(DemoError::Initdb {
                        node: spawned.node.clone(),
                        status,
                        log: log_tail(&spawned.log),
                    })
                }
                None => {
                    return Err(DemoError::Timeout {
                        what: format!("initdb for node {}", spawned.node),
                        log: log_tail(&spawned.log),
                    })
                }
            }
        }
        Ok(())
    }

    /// Appends the demo's settings to the node's `postgresql.conf`.
    pub(super) fn configure(&self, node: &str, port: u16, peers: usize) -> Result<(), DemoError> {
        let conf = self.data_dir(node).join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| {
                f.write_all(server_settings(port, &self.node_dir(node), peers).as_bytes())
            })
            .map_err(|e| DemoError::io(format!("write {}", conf.display()), e))
    }

    /// Starts the node's postmaster; returns a handle for [`Workspace::wait_ready`].
    pub(super) fn start_postgres(&mut self, node: &str) -> Result<usize, DemoError> {
        let mut cmd = self.server.command("postgres", &self.node_dir(node));
        cmd.arg("-D").arg(self.data_dir(node));
        let log = self.node_dir(node).join("postgres.log");
        self.spawn(node, Role::Postgres, cmd, log)
    }

    /// Polls until the postmaster `index` accepts a connection on `port`, and returns that
    /// connection; fails early, with its log, if the server exits.
    pub(super) async fn wait_ready(
        &mut self,
        index: usize,
        port: u16,
    ) -> Result<Client, DemoError> {
        let conninfo = format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres \
             application_name=pgmm-demo connect_timeout=5"
        );
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(status) = self.exited(index) {
                let spawned = &self.children[index];
                return Err(DemoError::PostgresExited {
                    node: spawned.node.clone(),
                    status,
                    log: log_tail(&spawned.log),
                });
            }
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_postgres::connect(&conninfo, NoTls),
            );
            if let Ok(Ok((client, connection))) = attempt.await {
                tokio::spawn(connection);
                return Ok(client);
            }
            if Instant::now() >= deadline {
                let spawned = &self.children[index];
                return Err(DemoError::Timeout {
                    what: format!("postgres of node {} to accept connections", spawned.node),
                    log: log_tail(&spawned.log),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// The exit status of child `index`, if it has exited.
    fn exited(&mut self, index: usize) -> Option<ExitStatus> {
        self.children[index].child.try_wait().ok().flatten()
    }

    /// Stops every process still running (postmasters by fast shutdown, anything else killed),
    /// waits for them, then removes the directory. Idempotent.
    pub(super) fn teardown(&mut self) -> Result<(), DemoError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut problems = Vec::new();
        for spawned in &mut self.children {
            if matches!(spawned.child.try_wait(), Ok(Some(_))) {
                continue;
            }
            let asked = match spawned.role {
                Role::Postgres => self.server.fast_shutdown(spawned.child.id(), &self.root),
                Role::Initdb => spawned.child.kill(),
            };
            if let Err(e) = asked {
                problems.push(format!(
                    "stop {:?} of node {}: {e}",
                    spawned.role, spawned.node
                ));
                let _ = spawned.child.kill();
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for spawned in &mut self.children {
            if !wait_blocking(&mut spawned.child, deadline) {
                problems.push(format!(
                    "{:?} of node {} did not stop within {STOP_TIMEOUT:?}; killed it",
                    spawned.role, spawned.node
                ));
                let _ = spawned.child.kill();
                let _ = spawned.child.wait();
            }
        }
        if let Err(e) = remove_dir(&self.root) {
            problems.push(format!("remove {}: {e}", self.root.display()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DemoError::Cleanup(problems.join("; ")))
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            output::err(format_args!("pgmm demo: {e}"));
        }
    }
}

/// Removes `dir`, retrying for a moment: a process we could not wait for (initdb's single-user
/// backend, when initdb itself was killed) may still be writing there as it exits.
fn remove_dir(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Polls `probe` (growing pauses, 5 ms to 100 ms) until it yields a value or `deadline` passes.
async fn poll<T>(deadline: Instant, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Waits for `child` to exit until `deadline`; teardown runs from `Drop`, where nothing can be
/// awaited, hence the blocking poll.
fn wait_blocking(child: &mut Child, deadline: Instant) -> bool {
    let mut pause = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) => {}
            // Not our child any more (already reaped): nothing to wait for.
            Err(_) => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The last lines of a log file, indented, for an error message.
pub(super) fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    let name = path
        .file_name()
        .unwrap_or(path.as_os_str())
        .to_string_lossy();
    let mut out = format!("last lines of {name}:");
    for line in &lines[start..] {
        out.push_str("\n    ");
        out.push_str(line);
    }
    if lines.is_empty() {
        out.push_str(" (empty)");
    }
    out
}
