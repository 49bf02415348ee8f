//! The peer port against connections that never authenticate: big frames announced and streamed
//! before the handshake, and more handshakes at once than `[peer] max_pending_handshakes`. The
//! node must hold next to no memory for them, count what it refused, and keep replicating.

use crate::harness;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use harness::{wait_for, ClusterOptions, NodeOverride, TestCluster};

/// `[peer] max_pending_handshakes` of the attacked node.
const CAP: usize = 4;
/// Unauthenticated connections opened at once, each announcing a 64 MiB frame (the
/// post-handshake limit) and streaming [`STREAMED`] bytes of it.
const CONNECTIONS: usize = 16;
const ANNOUNCED: u32 = 64 * 1024 * 1024;
/// Bytes each connection tries to send: before the pre-authentication limit, the node buffered
/// all of them, 16 × 32 MiB = 512 MiB in all.
const STREAMED: usize = 32 * 1024 * 1024;
/// Growth of the node's peak RSS the attack may cause: a fraction of what a single connection
/// could make it hold before, and far above what the bounded handshakes hold (at most
/// `CAP` × 8 KiB of frame buffers).
const RSS_BOUND_BYTES: u64 = 100 * 1024 * 1024;

const FRAME_TOO_LARGE: &str = r#"pgmm_peer_handshake_failures_total{reason="frame_too_large"}"#;
const TOO_MANY: &str = r#"pgmm_peer_handshake_failures_total{reason="too_many_handshakes"}"#;
const IN_PROGRESS: &str = "pgmm_peer_handshakes_in_progress";

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`: given there in kB).
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unreadable {line:?}"));
    kb * 1024
}

/// Connects, announces a 64 MiB frame and streams up to [`STREAMED`] bytes of it, stopping when
/// the node closes the connection. Returns the connection (still open on our side) and how many
/// body bytes were written.
fn flood(port: u16) -> (TcpStream, usize) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the peer port");
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let chunk = vec![0x80u8; 1024 * 1024];
    let mut sent = 0;
    if stream.write_all(&ANNOUNCED.to_be_bytes()).is_ok() {
        while sent < STREAMED {
            match stream.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => sent += n,
            }
        }
    }
    (stream, sent)
}

fn metric(c: &TestCluster, i: usize, series: &str) -> f64 {
    c.metric(i, series)
        .unwrap_or_else(|| panic!("{series} is missing"))
}

#[test]
fn unauthenticated_connections_hold_no_memory_and_handshakes_are_capped() {
    let opts = ClusterOptions::default().with_override(
        "b",
        NodeOverride {
            peer_toml: format!("max_pending_handshakes = {CAP}\n"),
            ..NodeOverride::default()
        },
    );
    let mut c = TestCluster::prepare(2, opts);
    c.create_table(
        "t",
        "id int PRIMARY KEY, v text, updated_at timestamptz NOT NULL DEFAULT now()",
    );
    c.start_pgmm();
    // Both links up before the attack, so that what follows is about the attack alone.
    c.wait_metric(0, r#"pgmm_peer_up{peer="b"}"#, "a's link to b up", |v| {
        v == Some(1.0)
    });
    c.wait_metric(1, r#"pgmm_peer_up{peer="a"}"#, "b's link to a up", |v| {
        v == Some(1.0)
    });

    let pid = c.pgmm(1).pid();
    let port = c.pgmm(1).peer_port().expect("b has a peer port");
    let rss_before = proc_status_bytes(pid, "VmRSS");
    let refused_before = metric(&c, 1, FRAME_TOO_LARGE) + metric(&c, 1, TOO_MANY);

    // 1. Sixteen connections at once, each announcing 64 MiB and streaming 32 MiB of it.
    let started = Instant::now();
    let floods: Vec<_> = (0..CONNECTIONS)
        .map(|_| thread::spawn(move || flood(port)))
        .collect();
    let held: Vec<(TcpStream, usize)> = floods.into_iter().map(|t| t.join().unwrap()).collect();
    // Measured while every connection is still open on our side: whatever the node buffered
    // for them it still holds (or held at its peak, VmHWM).
    let rss_during = proc_status_bytes(pid, "VmRSS");
    let hwm = proc_status_bytes(pid, "VmHWM");
    let streamed: usize = held.iter().map(|(_, n)| n).sum();
    let growth = hwm.saturating_sub(rss_before);
    eprintln!(
        "RSS of b: {} KiB before, {} KiB with {CONNECTIONS} flooding connections open, peak {} KiB \
         (growth {} KiB); {} KiB streamed in {:?}",
        rss_before / 1024,
        rss_during / 1024,
        hwm / 1024,
        growth / 1024,
        streamed / 1024,
        started.elapsed()
    );
    assert!(
        growth < RSS_BOUND_BYTES,
        "b's peak RSS grew by {} MiB under {CONNECTIONS} unauthenticated 64 MiB frames \
         (bound {} MiB)",
        growth >> 20,
        RSS_BOUND_BYTES >> 20
    );
    // Every connection was refused: at its first header, or on accept for lack of a slot.
    let refused = wait_for(
        "every flooding connection counted as refused",
        Duration::from_secs(30),
        || {
            let now = metric(&c, 1, FRAME_TOO_LARGE) + metric(&c, 1, TOO_MANY);
            if now - refused_before >= CONNECTIONS as f64 {
                Ok(now - refused_before)
            } else {
                Err(format!("{} refused so far", now - refused_before))
            }
        },
    );
    assert!(metric(&c, 1, FRAME_TOO_LARGE) >= 1.0);
    eprintln!(
        "refused: {refused} ({} frame_too_large, {} too_many_handshakes)",
        metric(&c, 1, FRAME_TOO_LARGE),
        metric(&c, 1, TOO_MANY)
    );
    drop(held);

    // 2. The cap: CAP silent connections hold every handshake slot (until the 10 s handshake
    // timeout); one more is closed at once, before the node reads anything from it.
    c.wait_metric(1, IN_PROGRESS, "no handshake running", |v| v == Some(0.0));
    let silent: Vec<TcpStream> = (0..CAP)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    c.wait_metric(1, IN_PROGRESS, "every slot taken", |v| {
        v == Some(CAP as f64)
    });
    let too_many_before = metric(&c, 1, TOO_MANY);
    let mut extra = TcpStream::connect(("127.0.0.1", port)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut byte = [0u8; 1];
    match extra.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the connection over the cap was not closed at once: {other:?}"),
    }
    c.wait_metric(1, TOO_MANY, "the extra connection counted", |v| {
        v.is_some_and(|v| v > too_many_before)
    });
    drop(silent);
    c.wait_metric(1, IN_PROGRESS, "the slots freed", |v| v == Some(0.0));

    // 3. The cluster still replicates, both ways.
    c.exec(0, "INSERT INTO t (id, v) VALUES (1, 'from a')");
    c.wait_nodes(
        "a's row on b",
        &[1],
        "SELECT v FROM t WHERE id = 1",
        "from a",
    );
    c.exec(1, "INSERT INTO t (id, v) VALUES (2, 'from b')");
    c.wait_nodes(
        "b's row on a",
        &[0],
        "SELECT v FROM t WHERE id = 2",
        "from b",
    );
}
