//! pgmm processes started from the binary Cargo built for this test run, in front of a [`PgCluster`].

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};
use tempfile::TempDir;

use super::postgres::{conninfo, psql_command};
use super::{tail, wait_child, wait_until, PgCluster};

/// How pgmm is configured; `Default` is node "a" of cluster "test" with nodes ["a", "b"], no ownership
/// rules, no TLS and no peers.
#[derive(Debug, Clone)]
pub struct PgmmOptions {
    pub node: String,
    pub cluster: String,
    pub nodes: Vec<String>,
    /// `[[ownership]]` rules: (table, owner node).
    pub ownership: Vec<(String, String)>,
    /// `[client] tls_cert`, `tls_key`.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub peer: Option<PeerOptions>,
    /// Ports decided by the caller, for a node that other nodes' configs name before it starts.
    /// `None` picks free ports and, if one is taken before pgmm binds it, retries with others;
    /// fixed ports get a single attempt.
    pub ports: Option<PgmmPorts>,
    /// Appended verbatim to the generated config, for sections the options above do not cover.
    pub extra_toml: String,
    /// Lines added verbatim to `[client]` (`startup_timeout_seconds = 1`, ...).
    pub client_toml: String,
    /// Lines added verbatim to `[node]` (`join_from = "a"`).
    pub node_toml: String,
}

impl Default for PgmmOptions {
    fn default() -> Self {
        PgmmOptions {
            node: "a".into(),
            cluster: "test".into(),
            nodes: vec!["a".into(), "b".into()],
            ownership: Vec::new(),
            tls: None,
            peer: None,
            ports: None,
            extra_toml: String::new(),
            client_toml: String::new(),
            node_toml: String::new(),
        }
    }
}

/// `[peer]` (listening on a free port, or [`PgmmPorts::peer`], with `secret` written to a secret file)
/// and `[[peers]]`.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    pub secret: String,
    /// (name, address) of each peer.
    pub peers: Vec<(String, String)>,
    /// Extra lines for the `[peer]` section (e.g. `max_pending_handshakes = 4`).
    pub peer_toml: String,
}

/// The three ports of one pgmm node, chosen before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgmmPorts {
    pub client: u16,
    pub metrics: u16,
    /// `[peer] listen`; unused by a node without [`PgmmOptions::peer`].
    pub peer: u16,
}

impl PgmmPorts {
    /// Ports for `n` nodes, all distinct and free a moment ago (see [`super::free_port`]).
    pub fn allocate(n: usize) -> Vec<PgmmPorts> {
        let ports = pgmm::testing::free_ports(3 * n).expect("find free ports on 127.0.0.1");
        ports
            .chunks(3)
            .map(|p| PgmmPorts {
                client: p[0],
                metrics: p[1],
                peer: p[2],
            })
            .collect()
    }
}

/// Why a pgmm process did not become ready: it exited during startup.
#[derive(Debug)]
pub struct StartFailure {
    pub status: ExitStatus,
    /// The log says a listen address was in use: worth another attempt on other ports.
    pub port_taken: bool,
    pub config: String,
    pub log: String,
}

impl StartFailure {
    pub fn panic(self) -> ! {
        panic!(
            "pgmm exited during startup ({}); config:\n{}\nlog:\n{}",
            self.status, self.config, self.log
        )
    }
}

/// A running `pgmm serve`; dropping it kills the process (and prints its log if the test failed).
/// The line the harness writes into a node's log before restarting it.
const RESTART_MARK: &str = "---- restarted by the test harness ----";

pub struct Pgmm {
    child: Child,
    exit: Option<ExitStatus>,
    node: String,
    client_port: u16,
    metrics_port: u16,
    peer_port: Option<u16>,
    dir: TempDir,
}

/// TOML basic string.
fn q(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Starts `pgmm serve --config config_path`, appending its stdout and stderr to `log_path`.
fn spawn_serve(config_path: &Path, log_path: &Path) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("open pgmm.log");
    Command::new(env!("CARGO_BIN_EXE_pgmm"))
        .arg("serve")
        .arg("--config")
        .arg(config_path)
        .env(
            "RUST_LOG",
            std::env::var("PGMM_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", env!("CARGO_BIN_EXE_pgmm")))
}

impl Pgmm {
    /// Writes a config for `opts` (free ports unless [`PgmmOptions::ports`] fixes them), starts
    /// `pgmm serve`, and waits until both the client port and `/healthz` answer.
    pub fn start(pg: &PgCluster, opts: PgmmOptions) -> Pgmm {
        let attempts = if opts.ports.is_some() { 1 } else { 3 };
        for attempt in 1..=attempts {
            let mut pgmm = Pgmm::launch(pg, opts.clone());
            match pgmm.wait_ready() {
                Ok(()) => return pgmm,
                Err(failure) if failure.port_taken && attempt < attempts => {}
                Err(failure) => failure.panic(),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Writes the config and spawns `pgmm serve` without waiting for it, so that the nodes of a
    /// cluster can start side by side; follow with [`Pgmm::wait_ready`].
    pub fn launch(pg: &PgCluster, opts: PgmmOptions) -> Pgmm {
        let dir = tempfile::Builder::new()
            .prefix("pgmm-it-proxy-")
            .tempdir()
            .expect("create a temporary directory for pgmm");
        // Three ports held at once: three separate free_port() calls can get one port twice.
        let ports = opts.ports.unwrap_or_else(|| PgmmPorts::allocate(1)[0]);
        let peer_port = opts.peer.as_ref().map(|_| ports.peer);
        let config = Self::config_text(
            pg,
            &opts,
            dir.path(),
            ports.client,
            ports.metrics,
            peer_port,
        );
        let config_path = dir.path().join("pgmm.toml");
        fs::write(&config_path, &config).expect("write pgmm.toml");
        let child = spawn_serve(&config_path, &dir.path().join("pgmm.log"));
        Pgmm {
            child,
            exit: None,
            node: opts.node,
            client_port: ports.client,
            metrics_port: ports.metrics,
            peer_port,
            dir,
        }
    }

    /// Waits until the client port and `/healthz` answer (pgmm opens its client port last, once
    /// its replication side is set up), or reports why the process exited first.
    pub fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let (client_port, metrics_port) = (self.client_port, self.metrics_port);
        // Connecting and closing without a byte is what health checkers do; like Postgres, pgmm
        // must treat it as a clean disconnect, so it is a fair readiness probe.
        let ready = wait_until("pgmm to listen", Duration::from_secs(60), || {
            if let Some(status) = self.child.try_wait().expect("try_wait pgmm") {
                return Some(Err(status));
            }
            // The port answering is not enough: another test's process may hold it (pgmm then
            // fails to bind and exits), so pgmm must also have said it listens.
            // Only this run's part of the log counts (a restart appends to it).
            let client = TcpStream::connect(("127.0.0.1", client_port)).is_ok() && {
                let log = self.log();
                log.rsplit(RESTART_MARK)
                    .next()
                    .is_some_and(|run| run.contains("front door listening"))
            };
            let health = http_get(metrics_port, "/healthz").is_some_and(|(code, _)| code == 200);
            (client && health).then_some(Ok(()))
        });
        ready.map_err(|status| {
            self.exit = Some(status);
            let log = self.log();
            StartFailure {
                status,
                port_taken: log.contains("in use") || log.contains("AddrInUse"),
                config: fs::read_to_string(self.config_path()).unwrap_or_default(),
                log,
            }
        })
    }

    /// SIGKILL, and waits for the process to be gone: a crash, with no chance to flush, ack or
    /// close anything.
    pub fn kill(&mut self) {
        if !self.is_running() {
            return;
        }
        kill_process(Pid::from_child(&self.child), Signal::KILL).expect("send SIGKILL to pgmm");
        let status = wait_child(&mut self.child, Duration::from_secs(30))
            .expect("pgmm still running 30s after SIGKILL");
        self.exit = Some(status);
    }

    /// Starts the same node again (same config file, same ports, log appended) after it exited
    /// ([`Pgmm::kill`], or [`Pgmm::terminate`] and [`Pgmm::wait_exit`]), and waits until it is
    /// ready. Panics if it is still running.
    pub fn restart(&mut self) {
        assert!(
            !self.is_running(),
            "restart of pgmm node {:?} while it still runs: stop it first",
            self.node
        );
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let log_path = self.dir.path().join("pgmm.log");
            if let Ok(mut log) = fs::OpenOptions::new().append(true).open(&log_path) {
                let _ = writeln!(log, "{RESTART_MARK}");
            }
            self.child = spawn_serve(&self.config_path(), &log_path);
            self.exit = None;
            match self.wait_ready() {
                Ok(()) => return,
                // The previous process's sockets may take a moment to be released.
                Err(failure) if failure.port_taken && attempt < ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(failure) => failure.panic(),
            }
        }
    }

    fn config_text(
        pg: &PgCluster,
        opts: &PgmmOptions,
        dir: &Path,
        client_port: u16,
        metrics_port: u16,
        peer_port: Option<u16>,
    ) -> String {
        let mut c = String::new();
        let nodes: Vec<String> = opts.nodes.iter().map(|n| q(n)).collect();
        let _ = writeln!(c, "[node]\nname = {}\n{}", q(&opts.node), opts.node_toml);
        let _ = writeln!(
            c,
            "[cluster]\nname = {}\nnodes = [{}]\n",
            q(&opts.cluster),
            nodes.join(", ")
        );
        let _ = writeln!(c, "[client]\nlisten = \"127.0.0.1:{client_port}\"");
        let _ = writeln!(c, "{}", opts.client_toml);
        if let Some((cert, key)) = &opts.tls {
            let _ = writeln!(c, "tls_cert = {}", q(&cert.to_string_lossy()));
            let _ = writeln!(c, "tls_key = {}", q(&key.to_string_lossy()));
        }
        let _ = writeln!(
            c,
            "\n[postgres]\nurl = {}\n",
            q(&pg.url("postgres", "postgres"))
        );
        let _ = writeln!(c, "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
        if let (Some(peer), Some(port)) = (&opts.peer, peer_port) {
            let secret_file = dir.join("peer.secret");
            fs::write(&secret_file, &peer.secret).expect("write peer secret");
            let _ = writeln!(
                c,
                "[peer]\nlisten = \"127.0.0.1:{port}\"\nsecret_file = {}\n{}",
                q(&secret_file.to_string_lossy()),
                peer.peer_toml
            );
            for (name, address) in &peer.peers {
                let _ = writeln!(
                    c,
                    "[[peers]]\nname = {}\naddress = {}\n",
                    q(name),
                    q(address)
                );
            }
        }
        for (table, owner) in &opts.ownership {
            let _ = writeln!(
                c,
                "[[ownership]]\ntable = {}\nowner = {}\n",
                q(table),
                q(owner)
            );
        }
        c.push_str(&opts.extra_toml);
        c
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    pub fn peer_port(&self) -> Option<u16> {
        self.peer_port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("pgmm.toml")
    }

    /// libpq key/value connection string (also understood by tokio-postgres) through pgmm.
    pub fn conninfo(&self, user: &str, db: &str) -> String {
        conninfo(self.client_port, user, db)
    }

    /// psql connecting through pgmm as `postgres` (see [`PgCluster::psql_command`] for the flags).
    pub fn psql_command(&self) -> Command {
        psql_command(&self.conninfo("postgres", "postgres"))
    }

    /// psql with an arbitrary connection string (e.g. with `sslmode=...` appended to [`Pgmm::conninfo`]).
    pub fn psql_command_with(&self, conninfo: &str) -> Command {
        psql_command(conninfo)
    }

    /// The body of `GET /metrics`; panics if the endpoint does not answer 200.
    pub fn metrics(&self) -> String {
        match http_get(self.metrics_port, "/metrics") {
            Some((200, body)) => body,
            Some((code, body)) => panic!("GET /metrics answered {code}:\n{body}"),
            None => panic!("GET /metrics on 127.0.0.1:{} failed", self.metrics_port),
        }
    }

    /// The body of `GET /status` (JSON); panics if the endpoint does not answer 200.
    pub fn status(&self) -> String {
        match http_get(self.metrics_port, "/status") {
            Some((200, body)) => body,
            Some((code, body)) => panic!("GET /status answered {code}:\n{body}"),
            None => panic!("GET /status on 127.0.0.1:{} failed", self.metrics_port),
        }
    }

    /// The value of one series, e.g. `pgmm_client_queries_total{kind="write"}` (label order does not
    /// matter; a series without labels is named bare). `None` when the series is absent.
    pub fn metric_value(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics(), series)
    }

    /// Everything pgmm wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.dir.path().join("pgmm.log")).unwrap_or_default())
            .into_owned()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        kill_process(Pid::from_child(&self.child), Signal::TERM).expect("send SIGTERM to pgmm");
    }

    /// Waits for pgmm to exit; panics (with the log) if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        match wait_child(&mut self.child, timeout) {
            Some(status) => {
                self.exit = Some(status);
                status
            }
            None => panic!(
                "pgmm still running {timeout:?} after being asked to stop; log:\n{}",
                tail(&self.log(), 60)
            ),
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait pgmm");
        }
        self.exit.is_none()
    }
}

impl Drop for Pgmm {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- pgmm log (node {:?}, client port {}), last lines ----\n{}\n----",
                self.node,
                self.client_port,
                tail(&self.log(), 80)
            );
        }
    }
}

/// A minimal HTTP/1.1 GET (no client crate needed for two endpoints): `(status, body)`, or `None` if the
/// connection or the response failed.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    // No half-close after the request: hyper treats EOF on the read side as the client going away.
    s.write_all(request.as_bytes()).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Some((code, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Splits `name{a="x",b="y"}` into the name and its sorted labels.
fn parse_series(series: &str) -> Option<(String, Vec<(String, String)>)> {
    let series = series.trim();
    let Some(open) = series.find('{') else {
        return Some((series.to_string(), Vec::new()));
    };
    let name = series[..open].to_string();
    let mut rest = series[open + 1..].chars().peekable();
    let mut labels = Vec::new();
    loop {
        while rest.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            rest.next();
        }
        match rest.peek() {
            Some('}') => break,
            None => return None,
            _ => {}
        }
        let key: String = rest.by_ref().take_while(|c| *c != '=').collect();
        if rest.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match rest.next()? {
                '\\' => match rest.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key.trim().to_string(), value));
    }
    labels.sort();
    Some((name, labels))
}

/// Finds `series` in a Prometheus text exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    let wanted = parse_series(series).unwrap_or_else(|| panic!("malformed series {series:?}"));
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            // The value follows the last space (labels may contain spaces; values never do).
            let (lhs, value) = line.trim().rsplit_once(' ')?;
            (parse_series(lhs)? == wanted).then(|| value.parse().ok())?
        })
}
