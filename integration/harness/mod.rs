//! Harness for the end-to-end tests: throwaway PostgreSQL clusters, pgmm processes started from the
//! freshly built binary, and small helpers for raw wire-protocol clients.
//!
//! Everything here panics with a descriptive message instead of returning errors: a harness failure is a
//! test failure, and the message is what the person reading the CI log needs.

mod cluster;
mod pgmm_process;
mod postgres;
pub mod wire;

use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub use cluster::{ClusterOptions, Db, NodeOverride, TestCluster, WAIT};
pub use pgmm_process::{http_get, metric_value, PeerOptions, Pgmm, PgmmOptions, PgmmPorts};
pub use postgres::{
    bindir_of_major, pg_bindir, pg_major, PgCluster, PgOptions, MD5_USER, SCRAM_USER,
};

/// Serialises the tests of one binary that push many transactions through a cluster or restart
/// nodes a lot: on a 2-core machine two of them side by side would mostly measure each other.
pub fn heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A TCP port that was free a moment ago, below the ephemeral range so that no outgoing
/// connection takes it in between (see `pgmm::testing::free_ports`). Callers that bind it later
/// still retry on "address in use": another test may choose the same port.
pub fn free_port() -> u16 {
    pgmm::testing::free_ports(1).expect("find a free port on 127.0.0.1")[0]
}

/// Polls `probe` until it yields a value or `timeout` passes (then panics naming `what`). The pause
/// between probes grows from 5 ms to 100 ms so that fast conditions are seen quickly without spinning.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Like [`wait_until`], for conditions whose "not yet" deserves explaining: `probe` says why it is
/// not satisfied, and the panic after `timeout` quotes its last answer (the values seen, an error).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        let why = match probe() {
            Ok(v) => return v,
            Err(why) => why,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last seen:\n{why}");
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Runs a command to completion with `input` on its stdin, killing it and panicking if it is still
/// running after `timeout`, so that a hung client never hangs the test run.
pub fn run_command(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let writer = input.map(|bytes| {
        let bytes = bytes.to_vec();
        let mut stdin = child.stdin.take().expect("piped stdin");
        thread::spawn(move || {
            use std::io::Write;
            // The command may exit before reading everything; that shows up in its exit status.
            let _ = stdin.write_all(&bytes);
        })
    });
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));
    let Some(status) = wait_child(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        let stderr = err.join().unwrap_or_default();
        panic!(
            "{cmd:?} still running after {timeout:?}; killed it. stderr:\n{}",
            String::from_utf8_lossy(&stderr)
        );
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Like [`run_command`], and panics with the command's output unless it exits 0.
pub fn run_ok(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> String {
    let out = run_command(cmd, input, timeout);
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` to exit, up to `timeout`; `None` if it is still running.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on a child process") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The last `n` lines of `text`, for failure messages that should not drown the CI log.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
