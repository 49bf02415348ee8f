//! `pgmm demo --workload`: every node writes through its own front door, and one line per
//! second shows what replication does with it.
//!
//! Each node, five times a second: inserts a fresh row into the shared `demo.items` (ids
//! interleaved by node, so these never collide), upserts one of a few rows of its own table
//! `demo.owned_by_<node>` and its own row of `demo.accounts` (`home_node` = itself). Once a
//! second every node also upserts the same `demo.items` row, keyed by the current second: those
//! writes race across nodes, which is what a conflict is, so the conflict count moves too.
//!
//! The line reads each node's row count of `demo.items` and its conflict log straight from its
//! Postgres (equal counts mean the nodes converged), and the replication lag from each node's
//! `/status` document (the `pgmm_replication_lag_*` gauges, worst peer).

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::task::JoinSet;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use super::{client_url, NodePorts};
use crate::commands::output;
use crate::commands::status;
use crate::observe::document::NodeStatus;

/// Pause between one node's rounds of writes: a visible stream on a laptop, not a benchmark.
const WRITE_INTERVAL: Duration = Duration::from_millis(200);
/// Rounds per contested write (one a second).
const CONTESTED_EVERY: u64 = 5;
/// First id of the rows the nodes insert without colliding (clear of ids typed by hand).
const FRESH_BASE: i64 = 1_000_000;
/// First id of the contested rows: this plus the Unix second.
const CONTESTED_BASE: i64 = 1_000_000_000_000;
/// Rows of its own table each node keeps updating.
const OWN_ROWS: u64 = 10;
/// Limit on any one connection attempt or statement, so a stuck node shows as an error line
/// instead of freezing the workload.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the writers and the per-second report until `stop`.
pub(super) async fn run(names: Vec<String>, ports: Vec<NodePorts>, stop: CancellationToken) {
    let mut writers = JoinSet::new();
    for (index, name) in names.iter().enumerate() {
        writers.spawn(writer(
            index,
            names.len(),
            name.clone(),
            client_url(&ports[index]),
            stop.clone(),
        ));
    }
    let started = Instant::now();
    let mut monitors: Vec<Option<Client>> = names.iter().map(|_| None).collect();
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    second.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = second.tick() => {}
        }
        let line = report_line(&names, &ports, &mut monitors, started.elapsed()).await;
        output::out(format_args!("{line}"));
    }
    while writers.join_next().await.is_some() {}
}

/// One node's writes, every [`WRITE_INTERVAL`], through its front door; reconnects after an
/// error, reporting each distinct error once.
async fn writer(index: usize, nodes: usize, name: String, url: String, stop: CancellationToken) {
    let mut round: u64 = 0;
    let mut session: Option<Client> = None;
    let mut last_error = String::new();
    let mut pace = tokio::time::interval(WRITE_INTERVAL);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = pace.tick() => {}
        }
        let written = async {
            if session.as_ref().is_none_or(Client::is_closed) {
                session = Some(connect(&url).await?);
            }
            let client = session.as_ref().expect("connected above");
            write_round(client, &name, index, nodes, round).await
        };
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout(STATEMENT_TIMEOUT, written) => r
                .unwrap_or_else(|_| Err(format!("no answer within {STATEMENT_TIMEOUT:?}"))),
        };
        match result {
            Ok(()) => last_error.clear(),
            Err(e) => {
                if e != last_error {
                    output::err(format_args!(
                        "pgmm demo: workload on node {name}: {e} (retrying)"
                    ));
                    last_error = e;
                }
                session = None;
            }
        }
        round += 1;
    }
}

async fn connect(url: &str) -> Result<Client, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| crate::pg::pg_error_text(&e))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn write_round(
    client: &Client,
    name: &str,
    index: usize,
    nodes: usize,
    round: u64,
) -> Result<(), String> {
    let err = |e: tokio_postgres::Error| crate::pg::pg_error_text(&e);
    let fresh = FRESH_BASE + (round * nodes as u64 + index as u64) as i64;
    client
        .execute(
            "insert into demo.items (id, v) values ($1, $2)",
            &[&fresh, &format!("from {name}, round {round}")],
        )
        .await
        .map_err(err)?;
    let own = (round % OWN_ROWS) as i64;
    client
        .execute(
            &format!(
                "insert into demo.owned_by_{name} (id, v) values ($1, $2) \
                 on conflict (id) do update set v = excluded.v"
            ),
            &[&own, &format!("round {round}")],
        )
        .await
        .map_err(err)?;
    let account = index as i64 + 1;
    client
        .execute(
            "insert into demo.accounts (id, home_node, balance) values ($1, $2, 0) \
             on conflict (id) do update set balance = demo.accounts.balance + 1",
            &[&account, &name],
        )
        .await
        .map_err(err)?;
    if round % CONTESTED_EVERY == 0 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        client
            .execute(
                "insert into demo.items (id, v) values ($1, $2) \
                 on conflict (id) do update set v = excluded.v",
                &[&(CONTESTED_BASE + now), &format!("contested, from {name}")],
            )
            .await
            .map_err(err)?;
    }
    Ok(())
}

/// What one node reports for the line; `None` where it could not be read this second.
struct NodeFigures {
    rows: Option<i64>,
    conflicts: Option<i64>,
    status: Option<NodeStatus>,
}

async fn report_line(
    names: &[String],
    ports: &[NodePorts],
    monitors: &mut [Option<Client>],
    elapsed: Duration,
) -> String {
    let mut figures = Vec::with_capacity(names.len());
    for (ports, monitor) in ports.iter().zip(monitors.iter_mut()) {
        figures.push(read_node(ports, monitor).await);
    }
    format_line(names, &figures, elapsed)
}

/// Counts straight from the node's Postgres (not through pgmm, so the workload's statement
/// metrics stay the workload's), and its `/status`.
async fn read_node(ports: &NodePorts, monitor: &mut Option<Client>) -> NodeFigures {
    let counts = async {
        if monitor.as_ref().is_none_or(Client::is_closed) {
            let url = format!(
                "postgres://postgres@127.0.0.1:{}/postgres?application_name=pgmm-demo-workload",
                ports.postgres
            );
            *monitor = Some(connect(&url).await?);
        }
        let client = monitor.as_ref().expect("connected above");
        let row = client
            .query_one(
                "select (select count(*) from demo.items), (select count(*) from pgmm.conflicts)",
                &[],
            )
            .await
            .map_err(|e| crate::pg::pg_error_text(&e))?;
        Ok::<_, String>((row.get::<_, i64>(0), row.get::<_, i64>(1)))
    };
    let (rows, conflicts) = match tokio::time::timeout(STATEMENT_TIMEOUT, counts).await {
        Ok(Ok((rows, conflicts))) => (Some(rows), Some(conflicts)),
        _ => {
            *monitor = None;
            (None, None)
        }
    };
    let status = status::fetch(&format!("127.0.0.1:{}", ports.metrics))
        .await
        .ok();
    NodeFigures {
        rows,
        conflicts,
        status,
    }
}

/// `[  12s] demo.items rows: a 120  b 118 | lag: a 0.004s 0 B  b ... | conflicts: a 1  b 0`,
/// plus the links that are down, if any.
fn format_line(names: &[String], figures: &[NodeFigures], elapsed: Duration) -> String {
    let number = |v: Option<i64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
    let mut line = format!("[{:>4}s] demo.items rows:", elapsed.as_secs());
    for (name, f) in names.iter().zip(figures) {
        let _ = write!(line, " {name} {}", number(f.rows));
    }
    line.push_str(" | lag:");
    let mut down = Vec::new();
    for (name, f) in names.iter().zip(figures) {
        match &f.status {
            Some(s) => {
                let seconds = s
                    .peers
                    .iter()
                    .filter_map(|p| p.lag_seconds)
                    .fold(0.0_f64, f64::max);
                let bytes = s
                    .peers
                    .iter()
                    .filter_map(|p| p.lag_bytes)
                    .max()
                    .unwrap_or(0);
                let _ = write!(
                    line,
                    " {name} {seconds:.3}s {}",
                    status::render::bytes(bytes)
                );
                down.extend(
                    s.peers
                        .iter()
                        .filter(|p| !p.up)
                        .map(|p| format!("{name}->{}", p.name)),
                );
            }
            None => {
                let _ = write!(line, " {name} ?");
            }
        }
    }
    line.push_str(" | conflicts:");
    for (name, f) in names.iter().zip(figures) {
        let _ = write!(line, " {name} {}", number(f.conflicts));
    }
    if !down.is_empty() {
        let _ = write!(line, " | links down: {}", down.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::document::PeerStatus;

    fn peer(name: &str, up: bool, lag: f64, bytes: i64) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            address: String::new(),
            up,
            lag_seconds: Some(lag),
            lag_bytes: Some(bytes),
            slot_retained_wal_bytes: Some(0),
            slot_invalidated: None,
            apply_stalled: None,
        }
    }

    #[test]
    fn the_line_shows_rows_worst_lag_conflicts_and_down_links_per_node() {
        let names = vec!["a".to_owned(), "b".to_owned()];
        let figures = [
            NodeFigures {
                rows: Some(120),
                conflicts: Some(1),
                status: Some(NodeStatus {
                    node: "a".into(),
                    cluster: "demo".into(),
                    peers: vec![peer("b", false, 2.5, 4096)],
                    front_door_refusals_last_hour: 0,
                }),
            },
            NodeFigures {
                rows: None,
                conflicts: None,
                status: None,
            },
        ];
        assert_eq!(
            format_line(&names, &figures, Duration::from_secs(12)),
            "[  12s] demo.items rows: a 120 b ? | lag: a 2.500s 4.0 KiB b ? | \
             conflicts: a 1 b ? | links down: a->b"
        );
    }
}
