//! Throwaway PostgreSQL clusters.
//!
//! `initdb` is slow (about a second) and identical for every test, so it runs once into a template data
//! directory cached under Cargo's `CARGO_TARGET_TMPDIR`, and each cluster starts from a copy of it.
//! CI runs as root and PostgreSQL refuses to run as root, so as root the server binaries run as the
//! `postgres` system user — directly (`CommandExt::uid`), not through `su`, so that the child we hold is
//! the postmaster itself and dropping the cluster can signal it.

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{chown, DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};
use tempfile::TempDir;

use super::{free_port, run_command, run_ok, tail, wait_child, wait_until};

/// Bumped whenever the template's contents change (roles, pg_hba), so that a stale cached template
/// from an older harness is never reused.
const TEMPLATE_REVISION: u32 = 1;

/// The password roles created in every cluster. `md5_user`'s password is stored as an MD5 hash, so the
/// server really runs the MD5 exchange for it.
pub const SCRAM_USER: (&str, &str) = ("scram_user", "scram_pw");
pub const MD5_USER: (&str, &str) = ("md5_user", "md5_pw");

const DEFAULT_HBA: &str = "\
# TYPE  DATABASE     USER        ADDRESS       METHOD
local   all          all                       trust
host    all          postgres    127.0.0.1/32  trust
host    replication  postgres    127.0.0.1/32  trust
host    all          scram_user  127.0.0.1/32  scram-sha-256
host    all          md5_user    127.0.0.1/32  md5
host    all          all         127.0.0.1/32  scram-sha-256
host    replication  all         127.0.0.1/32  scram-sha-256
";

/// Per-cluster settings on top of the harness defaults.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// Lines appended to `postgresql.conf` after the harness's own (so they win).
    pub extra_conf: Vec<String>,
    /// Replaces the whole `pg_hba.conf`; `None` keeps the default (trust for `postgres` on 127.0.0.1,
    /// SCRAM for `scram_user`, MD5 for `md5_user`, SCRAM for everyone else).
    pub hba: Option<String>,
    /// The server binaries of this cluster (a mixed-major cluster); `None`: the harness's own
    /// ($PG_BINDIR, `pg_config`, the newest Debian install, PATH).
    pub bindir: Option<PathBuf>,
}

/// The bin directory of PostgreSQL `major` on this machine, when it is installed: Debian's
/// (`/usr/lib/postgresql/N/bin`) or the relocatable build `.ci/install-postgres` puts under
/// `$PGMM_POSTGRES_ROOT` (default `/opt/pgmm-postgres/N/bin`).
pub fn bindir_of_major(major: u32) -> Option<PathBuf> {
    let root =
        std::env::var_os("PGMM_POSTGRES_ROOT").unwrap_or_else(|| "/opt/pgmm-postgres".into());
    [
        PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
        PathBuf::from(root).join(major.to_string()).join("bin"),
    ]
    .into_iter()
    .find(|d| d.join("initdb").is_file() && d.join("postgres").is_file())
}

/// A running PostgreSQL server in its own temporary directory; dropping it stops the server and
/// removes the directory.
pub struct PgCluster {
    port: u16,
    child: Child,
    dir: TempDir,
    inst: &'static Install,
}

struct Install {
    bindir: PathBuf,
    /// `postgres --version`, e.g. "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)".
    version: String,
    /// uid/gid to run the server binaries as, when we are root.
    run_as: Option<(u32, u32)>,
    /// The template data directory (see [`template`]), made on first use.
    template: OnceLock<PathBuf>,
}

fn install() -> &'static Install {
    static INSTALL: OnceLock<&'static Install> = OnceLock::new();
    INSTALL.get_or_init(|| {
        let bindir = find_bindir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries not found (looked at $PG_BINDIR, `pg_config --bindir`, \
                 /usr/lib/postgresql/*/bin and PATH for initdb + postgres): apt-get install postgresql"
            )
        });
        install_at(&bindir)
    })
}

/// The install in `bindir`, looked at once per test process (each has its own template).
fn install_at(bindir: &Path) -> &'static Install {
    static INSTALLS: OnceLock<Mutex<HashMap<PathBuf, &'static Install>>> = OnceLock::new();
    let mut installs = INSTALLS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    installs.entry(bindir.to_path_buf()).or_insert_with(|| {
        let version = run_ok(
            Command::new(bindir.join("postgres")).arg("--version"),
            None,
            Duration::from_secs(30),
        )
        .trim()
        .to_string();
        Box::leak(Box::new(Install {
            bindir: bindir.to_path_buf(),
            version,
            run_as: server_user(),
            template: OnceLock::new(),
        }))
    })
}

/// The harness's default server binaries (psql and pgbench included; a cluster may ask for others
/// with [`PgOptions::bindir`]): `$PG_BINDIR` when it holds
/// `initdb` and `postgres`, else `pg_config --bindir`, the newest `/usr/lib/postgresql/*/bin`, then
/// `PATH`. CI runs the suites once per PostgreSQL major by setting `$PG_BINDIR`.
pub fn pg_bindir() -> &'static Path {
    &install().bindir
}

/// The major version of those binaries: 15 for "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)".
pub fn pg_major() -> u32 {
    let version = &install().version;
    version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("no major version in `postgres --version`: {version:?}"))
}

fn find_bindir() -> Option<PathBuf> {
    let complete = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("PG_BINDIR") {
        candidates.push(d.into());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            candidates.push(String::from_utf8_lossy(&out.stdout).trim().into());
        }
    }
    // Debian installs each major version side by side; prefer the newest.
    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    versioned.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    candidates.extend(versioned.into_iter().map(|(_, p)| p));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates.into_iter().find(|d| complete(d))
}

/// As root, the uid/gid of the `postgres` system user; otherwise `None` (run as ourselves).
fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(look_up_server_user)
}

fn look_up_server_user() -> Option<(u32, u32)> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run `id`");
        if !out.status.success() {
            panic!(
                "running as root, and initdb/postgres refuse to run as root, but there is no `postgres` \
                 system user to run them as: apt-get install postgresql (it creates the user)"
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    Some((id("-u"), id("-g")))
}

fn server_command(inst: &Install, program: &str, cwd: &Path) -> Command {
    let mut cmd = Command::new(inst.bindir.join(program));
    cmd.current_dir(cwd).env("LC_ALL", "C").env_remove("PGDATA");
    if let Some((uid, gid)) = inst.run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Starts the server of the cluster in `dir` (data in `dir/data`), appending to
/// `dir/postgres.log`.
fn spawn_server(inst: &Install, dir: &Path) -> Child {
    let log = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("postgres.log"))
        .expect("open postgres.log");
    server_command(inst, "postgres", dir)
        .arg("-D")
        .arg(dir.join("data"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn postgres: {e}"))
}

/// Waits until the server accepts connections (postmaster.pid names it and its 8th line turns
/// "ready", what pg_ctl polls), or returns how it exited first.
fn wait_server_ready(child: &mut Child, data: &Path) -> Result<(), std::process::ExitStatus> {
    let pid_file = data.join("postmaster.pid");
    wait_until(
        "postgres to accept connections",
        Duration::from_secs(60),
        || {
            if let Some(status) = child.try_wait().expect("try_wait postgres") {
                return Some(Err(status));
            }
            let pid = fs::read_to_string(&pid_file).ok()?;
            // The file of a killed postmaster says "ready" too: only this child's counts.
            let ours = pid.lines().next().map(str::trim) == Some(&child.id().to_string());
            (ours && pid.lines().nth(7).map(str::trim) == Some("ready")).then_some(Ok(()))
        },
    )
}

fn chown_to_server_user(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
    }
}

/// The template data directory: initdb'd once per harness revision and server version, with the
/// test roles created and the default pg_hba.conf.
fn template(inst: &'static Install) -> &'static Path {
    inst.template.get_or_init(|| {
        let slug: String = inst
            .version
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("pg-template-r{TEMPLATE_REVISION}-{slug}"));
        if cache.join("PG_VERSION").is_file() {
            return cache;
        }
        // initdb runs as `postgres`, which may not be able to write inside the target directory, so
        // build in a fresh temporary directory and copy the result into the cache.
        let staging = tempfile::Builder::new()
            .prefix("pgmm-it-initdb-")
            .tempdir()
            .expect("create a temporary directory for initdb");
        chown_to_server_user(staging.path());
        let data = staging.path().join("data");
        run_ok(
            server_command(inst, "initdb", staging.path())
                .arg("-D")
                .arg(&data)
                .args([
                    "--username=postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]),
            None,
            Duration::from_secs(120),
        );
        let roles = format!(
            "SET password_encryption = 'scram-sha-256'\n\
             CREATE ROLE {} LOGIN PASSWORD '{}'\n\
             SET password_encryption = 'md5'\n\
             CREATE ROLE {} LOGIN PASSWORD '{}'\n",
            SCRAM_USER.0, SCRAM_USER.1, MD5_USER.0, MD5_USER.1
        );
        let out = run_command(
            server_command(inst, "postgres", staging.path())
                .arg("--single")
                .arg("-D")
                .arg(&data)
                .args(["-c", "fsync=off", "postgres"]),
            Some(roles.as_bytes()),
            Duration::from_secs(60),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || text.contains("ERROR") || text.contains("FATAL") {
            panic!(
                "creating the test roles in single-user mode failed ({}):\n{text}",
                out.status
            );
        }
        fs::write(data.join("pg_hba.conf"), DEFAULT_HBA).expect("write template pg_hba.conf");

        let partial = cache.with_extension(format!("partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&partial);
        copy_tree(&data, &partial, None);
        if let Err(e) = fs::rename(&partial, &cache) {
            // Another test process finished first: its template is as good as ours.
            let _ = fs::remove_dir_all(&partial);
            if !cache.join("PG_VERSION").is_file() {
                panic!("install template data directory {}: {e}", cache.display());
            }
        }
        cache
    })
}

/// Copies a data directory, keeping modes (PostgreSQL insists on 0700/0750 for the directory) and
/// giving every entry to `owner` when set.
fn copy_tree(src: &Path, dst: &Path, owner: Option<(u32, u32)>) {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dst)
        .unwrap_or_else(|e| panic!("create {}: {e}", dst.display()));
    for entry in fs::read_dir(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display())) {
        let entry = entry.expect("read_dir entry");
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            copy_tree(&from, &to, owner);
            fs::set_permissions(&to, fs::metadata(&from).expect("stat").permissions())
                .expect("chmod copied directory");
        } else if kind.is_file() {
            fs::copy(&from, &to)
                .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from).expect("readlink"), &to)
                .expect("copy symlink");
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&to, Some(uid), Some(gid)).expect("chown copied entry");
        }
    }
    if let Some((uid, gid)) = owner {
        chown(dst, Some(uid), Some(gid)).expect("chown copied directory");
    }
}

impl PgCluster {
    /// A cluster with the harness defaults (see [`PgOptions`]).
    pub fn start() -> PgCluster {
        PgCluster::start_with(PgOptions::default())
    }

    pub fn start_with(opts: PgOptions) -> PgCluster {
        const ATTEMPTS: usize = 3;
        let inst = opts.bindir.as_deref().map_or_else(install, install_at);
        let template = template(inst);
        for attempt in 1..=ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("pgmm-it-pg-")
                .tempdir()
                .expect("create a temporary directory for a cluster");
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
            chown_to_server_user(dir.path());
            let data = dir.path().join("data");
            copy_tree(template, &data, inst.run_as);
            let port = free_port();
            let mut conf = vec![
                format!("port = {port}"),
                "listen_addresses = '127.0.0.1'".to_string(),
                format!("unix_socket_directories = '{}'", dir.path().display()),
                "wal_level = logical".to_string(),
                "track_commit_timestamp = on".to_string(),
                "max_connections = 300".to_string(),
                // Tests never survive a crash of their cluster, so durability is wasted time.
                "fsync = off".to_string(),
                "full_page_writes = off".to_string(),
                "synchronous_commit = off".to_string(),
            ];
            conf.extend(opts.extra_conf.iter().cloned());
            let conf_path = data.join("postgresql.conf");
            let mut text = fs::read_to_string(&conf_path).expect("read postgresql.conf");
            text.push_str("\n# pgmm test harness\n");
            for line in &conf {
                text.push_str(line);
                text.push('\n');
            }
            fs::write(&conf_path, text).expect("write postgresql.conf");
            if let Some(hba) = &opts.hba {
                fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
            }
            let log_path = dir.path().join("postgres.log");
            fs::File::create(&log_path).expect("create postgres.log");
            let mut child = spawn_server(inst, dir.path());
            match wait_server_ready(&mut child, &data) {
                Ok(()) => {
                    return PgCluster {
                        port,
                        child,
                        dir,
                        inst,
                    }
                }
                Err(status) => {
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    let port_taken =
                        log.contains("could not bind") || log.contains("already in use");
                    if !(port_taken && attempt < ATTEMPTS) {
                        panic!("postgres exited during startup ({status}):\n{log}");
                    }
                }
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// SIGKILL to the postmaster (a crash: backends go with it, nothing is flushed or shut
    /// down), then the server started again on the same data directory and port, after its
    /// crash recovery. Sessions open before are gone.
    pub fn crash_and_restart(&mut self) {
        let _ = kill_process(Pid::from_child(&self.child), Signal::KILL);
        let _ = self.child.wait();
        let data = self.data_dir();
        // Until the killed postmaster's backends notice and exit, the shared memory is theirs
        // and a new postmaster refuses to start: try again until one does.
        self.child = wait_until(
            "the server to start again after a crash",
            Duration::from_secs(60),
            || {
                let mut child = spawn_server(self.inst, self.dir.path());
                wait_server_ready(&mut child, &data).ok().map(|()| child)
            },
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bin(&self, program: &str) -> PathBuf {
        self.inst.bindir.join(program)
    }

    /// `postgres --version` of this cluster's server.
    pub fn version(&self) -> &'static str {
        &self.inst.version
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.dir.path().join("postgres.log")).unwrap_or_default())
            .into_owned()
    }

    /// `postgres://user@127.0.0.1:port/db`, connecting to this server directly.
    pub fn url(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    /// libpq key/value connection string (also understood by tokio-postgres), connecting directly.
    pub fn conninfo(&self, user: &str, db: &str) -> String {
        conninfo(self.port, user, db)
    }

    /// A psql command connecting to this server directly as `postgres`, with no psqlrc, no password
    /// prompt, tuples only, unaligned, stopping at the first error.
    pub fn psql_command(&self) -> Command {
        psql_command(&self.conninfo("postgres", "postgres"))
    }

    /// Runs `sql` through psql directly on the server (not through pgmm) and returns its trimmed
    /// output; panics if psql fails.
    pub fn psql(&self, sql: &str) -> String {
        run_ok(
            self.psql_command().arg("-c").arg(sql),
            None,
            Duration::from_secs(60),
        )
        .trim_end()
        .to_string()
    }
}

/// libpq key/value connection string for 127.0.0.1:`port`.
pub(super) fn conninfo(port: u16, user: &str, db: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} dbname={db} connect_timeout=10")
}

/// psql with no psqlrc, never prompting for a password, tuples only, unaligned, stopping at the first
/// error, connecting with `conninfo`.
pub(super) fn psql_command(conninfo: &str) -> Command {
    let mut cmd = Command::new(install().bindir.join("psql"));
    cmd.args(["-X", "-w", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(conninfo)
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .env_remove("PGSSLMODE")
        .env("PGCONNECT_TIMEOUT", "10");
    cmd
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Immediate shutdown: the data directory is about to be deleted, nothing needs to be flushed.
        let _ = kill_process(Pid::from_child(&self.child), Signal::QUIT);
        if wait_child(&mut self.child, Duration::from_secs(30)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- postgres log (port {}), last lines ----\n{}\n----",
                self.port,
                tail(&self.log(), 40)
            );
        }
        // A directory that cannot be removed must not turn a passing test into a failure.
        if let Err(e) = fs::remove_dir_all(self.dir.path()) {
            if e.kind() != ErrorKind::NotFound {
                eprintln!("could not remove {}: {e}", self.dir.path().display());
            }
        }
    }
}
