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
use super::{free_port, tail, wait_child, wait_until, PgCluster};

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
    /// Appended verbatim to the generated config, for sections the options above do not cover.
    pub extra_toml: String,
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
            extra_toml: String::new(),
        }
    }
}

/// `[peer]` (listening on a free port, with `secret` written to a secret file) and `[[peers]]`.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    pub secret: String,
    /// (name, address) of each peer.
    pub peers: Vec<(String, String)>,
}

/// A running `pgmm serve`; dropping it kills the process (and prints its log if the test failed).
pub struct Pgmm {
    child: Child,
    exit: Option<ExitStatus>,
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

impl Pgmm {
    /// Writes a config for `opts` with free ports, starts `pgmm serve`, and waits until both the client
    /// port and `/healthz` answer.
    pub fn start(pg: &PgCluster, opts: PgmmOptions) -> Pgmm {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("pgmm-it-proxy-")
                .tempdir()
                .expect("create a temporary directory for pgmm");
            let (client_port, metrics_port) = (free_port(), free_port());
            let peer_port = opts.peer.as_ref().map(|_| free_port());
            let config =
                Self::config_text(pg, &opts, dir.path(), client_port, metrics_port, peer_port);
            let config_path = dir.path().join("pgmm.toml");
            fs::write(&config_path, &config).expect("write pgmm.toml");
            let log_path = dir.path().join("pgmm.log");
            let log = fs::File::create(&log_path).expect("create pgmm.log");
            let child = Command::new(env!("CARGO_BIN_EXE_pgmm"))
                .arg("serve")
                .arg("--config")
                .arg(&config_path)
                .env(
                    "RUST_LOG",
                    std::env::var("PGMM_TEST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", env!("CARGO_BIN_EXE_pgmm")));
            let mut pgmm = Pgmm {
                child,
                exit: None,
                client_port,
                metrics_port,
                peer_port,
                dir,
            };
            // Connecting and closing without a byte is what health checkers do; like Postgres, pgmm
            // must treat it as a clean disconnect, so it is a fair readiness probe.
            let ready = wait_until("pgmm to listen", Duration::from_secs(60), || {
                if let Some(status) = pgmm.child.try_wait().expect("try_wait pgmm") {
                    return Some(Err(status));
                }
                let client = TcpStream::connect(("127.0.0.1", client_port)).is_ok();
                let health =
                    http_get(metrics_port, "/healthz").is_some_and(|(code, _)| code == 200);
                (client && health).then_some(Ok(()))
            });
            match ready {
                Ok(()) => return pgmm,
                Err(status) => {
                    pgmm.exit = Some(status);
                    let log = pgmm.log();
                    let port_taken = log.contains("in use") || log.contains("AddrInUse");
                    if !(port_taken && attempt < ATTEMPTS) {
                        panic!(
                            "pgmm exited during startup ({status}); config:\n{config}\nlog:\n{log}"
                        );
                    }
                }
            }
        }
        unreachable!("the last attempt either returns or panics")
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
        let _ = writeln!(c, "[node]\nname = {}\n", q(&opts.node));
        let _ = writeln!(
            c,
            "[cluster]\nname = {}\nnodes = [{}]\n",
            q(&opts.cluster),
            nodes.join(", ")
        );
        let _ = writeln!(c, "[client]\nlisten = \"127.0.0.1:{client_port}\"");
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
                "[peer]\nlisten = \"127.0.0.1:{port}\"\nsecret_file = {}\n",
                q(&secret_file.to_string_lossy())
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

    /// `postgres://user@127.0.0.1:client_port/db`, connecting through pgmm.
    pub fn url(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.client_port)
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
                "---- pgmm log (client port {}), last lines ----\n{}\n----",
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
