//! End-to-end tests of `pgmm demo`: the freshly built binary starts a 3-node demo, each printed
//! URL answers through pgmm, ownership is enforced per node, a row written through the first
//! node is read through the last, and SIGTERM leaves neither a process nor the temporary
//! directory behind; `--workload` prints live lines showing every node's rows; and the cleanup
//! still happens on Ctrl-C once whatever read the demo's output has gone. Self-contained on
//! purpose: they drive the binary the way a newcomer (or a script) would, reading only what the
//! demo prints.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rustix::pipe::{pipe_with, PipeFlags};
use rustix::process::{kill_process, Pid, Signal};
use tokio_postgres::{Client, NoTls};

/// Generous: a debug build initdb's and starts two clusters on a shared 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a replicated row or a workload line may take to show up.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(60);
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
    fn start(args: &[&str]) -> Demo {
        // The demo's own log filter, as a newcomer gets it.
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgmm"))
            .arg("demo")
            .args(args)
            .env_remove("RUST_LOG")
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

    /// The next stdout line after the URLs (the workload's live lines), or `None` at the
    /// deadline.
    fn next_line(&self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.stdout.recv_timeout(left) {
            Ok(line) => Some(line),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                panic!("pgmm demo closed stdout; stderr:\n{}", self.stderr())
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

/// Polls `sql` through `client` until it returns `expected` as text, or panics after
/// [`REPLICATION_TIMEOUT`] with what it saw last.
async fn wait_value(client: &Client, url: &str, sql: &str, expected: &str) {
    let deadline = Instant::now() + REPLICATION_TIMEOUT;
    let mut pause = Duration::from_millis(5);
    loop {
        let seen = match client.simple_query(sql).await {
            Ok(messages) => messages
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some(row.get(0).unwrap_or("NULL").to_owned())
                    }
                    _ => None,
                })
                .unwrap_or_else(|| "no row".to_owned()),
            Err(e) => format!("error: {e}"),
        };
        if seen == expected {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{sql} through {url} still gives {seen:?}, not {expected:?}, after \
                 {REPLICATION_TIMEOUT:?}"
            );
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

#[test]
fn demo_replicates_enforces_ownership_and_cleans_up_on_sigterm() {
    let mut demo = Demo::start(&["--nodes", "3"]);
    let (urls, dir) = demo.endpoints();
    let names: Vec<&str> = urls.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "URL lines: {urls:?}");
    assert!(
        dir.is_dir(),
        "{} should exist while the demo runs",
        dir.display()
    );
    let (url_a, url_b, url_c) = (&urls[0].1, &urls[1].1, &urls[2].1);

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

        // Written through the first node, read through the last: the nodes replicate.
        let c = connect(url_c).await;
        a.batch_execute("insert into demo.items (id, v) values (2, 'replicated')")
            .await
            .expect("write through node a");
        wait_value(
            &c,
            url_c,
            "select v from demo.items where id = 2",
            "replicated",
        )
        .await;
        wait_value(
            &c,
            url_c,
            "select v from demo.owned_by_b where id = 1",
            "through b",
        )
        .await;
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

/// The rows per node of a workload line (`[  3s] demo.items rows: a 16 b 17 | lag: ...`).
fn workload_rows(line: &str) -> Option<Vec<(String, u64)>> {
    let rows = line.split_once("demo.items rows:")?.1.split('|').next()?;
    let words: Vec<&str> = rows.split_whitespace().collect();
    words
        .chunks(2)
        .map(|pair| match pair {
            [name, count] => Some((name.to_string(), count.parse().ok()?)),
            _ => None,
        })
        .collect()
}

#[test]
fn demo_workload_writes_on_every_node_and_prints_live_lines() {
    let mut demo = Demo::start(&["--nodes", "2", "--workload"]);
    let (urls, dir) = demo.endpoints();
    assert_eq!(urls.len(), 2, "URL lines: {urls:?}");
    // Each node inserts about five rows a second; wait for lines showing both nodes' counts
    // growing with no link down.
    let deadline = Instant::now() + REPLICATION_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let Some(line) = demo.next_line(deadline) else {
            panic!(
                "no workload line with every node's rows past 40 within {REPLICATION_TIMEOUT:?}; \
                 lines: {seen:#?}\nstderr:\n{}",
                demo.stderr()
            );
        };
        let rows = workload_rows(&line);
        seen.push(line.clone());
        let Some(rows) = rows else { continue };
        assert_eq!(
            rows.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a", "b"],
            "{line}"
        );
        assert!(
            line.contains(" | lag: a ") && line.contains(" | conflicts: a "),
            "{line}"
        );
        if rows.iter().all(|(_, count)| *count > 40) && !line.contains("links down") {
            break;
        }
    }
    // And what node a's workload wrote is read through node b.
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let url_b = &urls[1].1;
        let b = connect(url_b).await;
        wait_value(
            &b,
            url_b,
            "select count(*) > 0 from demo.items where v like 'from a, round %'",
            "t",
        )
        .await;
        // The README's walkthrough: a column added through node a while the workload writes
        // reaches b, and a's rows keep arriving after it.
        let url_a = &urls[0].1;
        let a = connect(url_a).await;
        a.batch_execute("alter table demo.items add column note text default 'walkthrough'")
            .await
            .expect("add a column through node a");
        wait_value(
            &b,
            url_b,
            "select count(*) from information_schema.columns \
             where table_schema = 'demo' and table_name = 'items' and column_name = 'note'",
            "1",
        )
        .await;
        let before: i64 = b
            .query_one(
                "select count(*) from demo.items where v like 'from a, round %'",
                &[],
            )
            .await
            .expect("count a's rows on b")
            .get(0);
        wait_value(
            &b,
            url_b,
            &format!(
                "select count(*) > {before} from demo.items where v like 'from a, round %' \
                 and note = 'walkthrough'"
            ),
            "t",
        )
        .await;
    });
    let status = demo.terminate();
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}",
        demo.stderr()
    );
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(processes_in(&dir).is_empty());
}

/// Whether process `pid` exists and is not a zombie (a zombie has exited; only its exit status
/// waits to be collected).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The postmaster pid of each node, from `<dir>/<node>/data/postmaster.pid` (first line).
fn postmasters(dir: &Path, nodes: &[&str]) -> Vec<(String, u32)> {
    nodes
        .iter()
        .map(|node| {
            let file = dir.join(node).join("data").join("postmaster.pid");
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
            let pid = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or_else(|| panic!("no pid in {}: {text:?}", file.display()));
            (node.to_string(), pid)
        })
        .collect()
}

/// What a demo that failed to clean up leaves: stopped by the test when it fails, so that a
/// failing run (today's code, say) does not leave Postgres servers running on the machine.
struct Leftovers {
    child: Child,
    postmasters: Vec<(String, u32)>,
    dir: Option<PathBuf>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for (_, pid) in &self.postmasters {
            if alive(*pid) {
                // Immediate shutdown: the postmaster takes its backends with it.
                if let Some(pid) = Pid::from_raw(*pid as i32) {
                    let _ = kill_process(pid, Signal::QUIT);
                }
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.postmasters.iter().any(|(_, pid)| alive(*pid)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `./demo 2>&1 | tee log`, then Ctrl-C: the terminal sends SIGINT to the whole foreground
/// job, `tee` exits first, and every later write of the demo to stdout or stderr fails with
/// EPIPE. The demo must keep running while its output is gone, and on SIGINT still stop its
/// Postgres servers and remove its directory. Here one pipe carries both stdout and stderr (as
/// `2>&1 |` does), the test plays `tee`: it reads up to the hint line, then closes the only
/// read end. Before the fix the workload task died at its next line (`println!` panics on
/// EPIPE, so the nodes stopped writing), and SIGINT did nothing at all: the signal watcher
/// panicked on its `eprintln!` before it could cancel anything, leaving every Postgres running.
#[test]
fn demo_cleans_up_on_sigint_after_its_output_pipe_closed() {
    // CLOEXEC: another test's child spawned meanwhile must not inherit an end of this pipe (a
    // stray read end would keep the pipe open, a stray write end would keep it from ending).
    let (read_end, write_end) = pipe_with(PipeFlags::CLOEXEC).expect("pipe");
    let stderr_end = write_end.try_clone().expect("dup the pipe's write end");
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgmm"));
    command
        .args(["demo", "--nodes", "2", "--workload"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(stderr_end));
    let child = command.spawn().expect("start pgmm demo");
    // The command holds this process's copies of the write end; only the demo keeps one now.
    drop(command);
    let pid = Pid::from_child(&child);
    let mut leftovers = Leftovers {
        child,
        postmasters: Vec::new(),
        dir: None,
    };

    // The `tee`: forwards lines until the hint line, then exits, closing the read end.
    let (tx, lines) = mpsc::channel::<String>();
    let tee = thread::spawn(move || {
        for line in BufReader::new(File::from(read_end)).lines() {
            let Ok(line) = line else { break };
            let last = line.starts_with(HINT_PREFIX);
            if tx.send(line).is_err() || last {
                break;
            }
        }
    });
    let deadline = Instant::now() + START_TIMEOUT;
    let mut seen = Vec::new();
    let mut urls = Vec::new();
    let dir = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => panic!("no hint line ({e:?}); output so far:\n{}", seen.join("\n")),
        };
        seen.push(line.clone());
        if let Some(dir) = line.strip_prefix(HINT_PREFIX) {
            break PathBuf::from(dir.trim_end());
        }
        if let [name, url] = line.split_whitespace().collect::<Vec<_>>()[..] {
            if url.starts_with("postgres://") {
                urls.push((name.to_owned(), url.to_owned()));
            }
        }
    };
    tee.join().expect("the reader thread");
    // The read end is closed: every write the demo makes from here fails with EPIPE.
    leftovers.dir = Some(dir.clone());
    let names: Vec<&str> = urls.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "output:\n{}", seen.join("\n"));
    leftovers.postmasters = postmasters(&dir, &names);
    for (node, pid) in &leftovers.postmasters {
        assert!(
            alive(*pid),
            "postgres of node {node} (pid {pid}) is not running"
        );
    }

    // The demo goes on without its output: the workload keeps writing through node a for a few
    // of its once-a-second report lines (each of which now fails), and the node answers.
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let demo_state = |leftovers: &mut Leftovers| {
        let postgres: Vec<_> = leftovers
            .postmasters
            .iter()
            .map(|(node, pid)| format!("postgres of {node} running: {}", alive(*pid)))
            .collect();
        format!(
            "demo exit status: {:?}; {}; {} exists: {}",
            leftovers.child.try_wait(),
            postgres.join(", "),
            dir.display(),
            dir.exists()
        )
    };
    runtime.block_on(async {
        let url_a = &urls[0].1;
        let a = connect(url_a).await;
        let mut count = async || match a.query_one("select count(*) from demo.items", &[]).await {
            Ok(row) => row.get::<_, i64>(0),
            Err(e) => panic!(
                "count demo.items through {url_a}: {e:?}; {}",
                demo_state(&mut leftovers)
            ),
        };
        let first = count().await;
        // About ten rows a second (five rounds a second per node, at most two more contested
        // ones), so 40 more take over three seconds: three report lines written into the void.
        let deadline = Instant::now() + REPLICATION_TIMEOUT;
        loop {
            let now = count().await;
            if now >= first + 40 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the workload stopped writing once its output closed: demo.items went from \
                 {first} to {now} rows in {REPLICATION_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        select_one(&a, url_a).await;
    });
    drop(runtime);

    // Ctrl-C.
    let interrupted = Instant::now();
    kill_process(pid, Signal::INT).expect("send SIGINT");
    let status = loop {
        if let Some(status) = leftovers.child.try_wait().expect("wait for pgmm demo") {
            break status;
        }
        let running: Vec<_> = leftovers
            .postmasters
            .iter()
            .filter(|(_, pid)| alive(*pid))
            .collect();
        assert!(
            interrupted.elapsed() < STOP_TIMEOUT,
            "pgmm demo still running {STOP_TIMEOUT:?} after SIGINT with its output closed; \
             postmasters still running: {running:?}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let took = interrupted.elapsed();
    eprintln!("pgmm demo exited {took:?} after SIGINT with its output closed ({status})");
    assert!(
        status.success(),
        "pgmm demo exited with {status} after SIGINT"
    );
    for (node, pid) in &leftovers.postmasters {
        assert!(
            !alive(*pid),
            "postgres of node {node} (pid {pid}) still running after the demo exited"
        );
    }
    let left = processes_in(&dir);
    assert!(left.is_empty(), "processes left behind: {left:#?}");
    assert!(
        !dir.exists(),
        "{} still exists after the demo stopped",
        dir.display()
    );
}
