//! End-to-end test of `pgmm demo`: the freshly built binary starts a 2-node demo, each printed URL
//! answers through pgmm, ownership is enforced per node, and SIGTERM leaves neither a process nor
//! the temporary directory behind. Self-contained on purpose: it drives the binary the way a
//! newcomer (or a script) would, reading only what the demo prints.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use tokio_postgres::{Client, NoTls};

/// Generous: a debug build initdb's and starts two clusters on a shared 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const HINT_PREFIX: &str = "Ctrl-C stops the demo and removes ";
const OWNED_BY_B: &str =
    r#"table "demo.owned_by_b" is owned by node "b"; write it through node "b""#;

/// A running `pgmm demo`; dropping it (say, when an assertion fails) stops it so that no
/// Postgres outlives the test.
struct Demo {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Demo {
    fn start(nodes: usize) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgmm"))
            .args(["demo", "--nodes", &nodes.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pgmm demo");
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Demo {
            child,
            stdout,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Reads stdout up to the hint line: the `(name, url)` lines and the directory.
    fn endpoints(&self) -> (Vec<(String, String)>, PathBuf) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut urls = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.stdout.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no hint line within {START_TIMEOUT:?}; stderr:\n{}",
                    self.stderr()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "pgmm demo closed stdout before printing its URLs; stderr:\n{}",
                    self.stderr()
                ),
            };
            if let Some(dir) = line.strip_prefix(HINT_PREFIX) {
                return (urls, PathBuf::from(dir.trim_end()));
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [name, url] = words[..] {
                if url.starts_with("postgres://") {
                    urls.push((name.to_owned(), url.to_owned()));
                }
            }
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        kill_process(Pid::from_child(&self.child), Signal::TERM).expect("send SIGTERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for pgmm demo") {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pgmm demo still running {STOP_TIMEOUT:?} after SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill_process(Pid::from_child(&self.child), Signal::TERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn connect(url: &str) -> Client {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(30), tokio_postgres::connect(url, NoTls))
            .await
            .unwrap_or_else(|_| panic!("connect {url}: timed out"))
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(connection);
    client
}

async fn select_one(client: &Client, url: &str) {
    let one: i32 = client
        .query_one("select 1", &[])
        .await
        .unwrap_or_else(|e| panic!("select 1 through {url}: {e}"))
        .get(0);
    assert_eq!(one, 1);
}

/// Processes whose command line names `dir` or whose working directory is inside it: the
/// postmaster shows its `-D`, and its backends, which retitle themselves, keep the data
/// directory as their working directory.
fn processes_in(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if cmdline.contains(&needle) || cwd.starts_with(&needle) {
            found.push(format!("{pid}: {cmdline} (cwd {cwd})"));
        }
    }
    found
}

#[test]
fn demo_serves_every_node_enforces_ownership_and_cleans_up_on_sigterm() {
    let mut demo = Demo::start(2);
    let (urls, dir) = demo.endpoints();
    let names: Vec<&str> = urls.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "URL lines: {urls:?}");
    assert!(
        dir.is_dir(),
        "{} should exist while the demo runs",
        dir.display()
    );
    let (url_a, url_b) = (&urls[0].1, &urls[1].1);

    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    // Kept open across SIGTERM: an idle psql left behind must not keep the demo from stopping.
    let _idle = runtime.block_on(async {
        let a = connect(url_a).await;
        let b = connect(url_b).await;
        select_one(&a, url_a).await;
        select_one(&b, url_b).await;

        let refused = a
            .batch_execute("insert into demo.owned_by_b (id, v) values (1, 'through a')")
            .await
            .expect_err("a write to b's table through node a must be refused");
        let db = refused.as_db_error().expect("an ErrorResponse");
        assert_eq!(db.code().code(), "42501", "{db:?}");
        assert_eq!(db.message(), OWNED_BY_B);
        select_one(&a, url_a).await;

        b.batch_execute("insert into demo.owned_by_b (id, v) values (1, 'through b')")
            .await
            .expect("node b writes its own table");
        a.batch_execute("insert into demo.owned_by_a (id, v) values (1, 'through a')")
            .await
            .expect("node a writes its own table");
        a.batch_execute("insert into demo.items (id, v) values (1, 'shared')")
            .await
            .expect("any node writes the shared table");
        let v: String = b
            .query_one("select v from demo.owned_by_b where id = 1", &[])
            .await
            .expect("read back")
            .get(0);
        assert_eq!(v, "through b");
        a
    });

    let status = demo.terminate();
    assert!(
        status.success(),
        "pgmm demo exited with {status} after SIGTERM; stderr:\n{}",
        demo.stderr()
    );
    assert!(
        !dir.exists(),
        "{} still exists after the demo stopped",
        dir.display()
    );
    let left = processes_in(&dir);
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}
