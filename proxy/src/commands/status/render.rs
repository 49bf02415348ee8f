//! The human form of a status report: a header line, one row per peer, then the last hour.

use std::fmt::Write as _;

use super::Report;

/// The report as aligned text.
pub(crate) fn table(report: &Report) -> String {
    let mut out = format!(
        "node {} of cluster {} (endpoint {}, pgmm schema version {})\n",
        report.node,
        report.cluster,
        report.endpoint,
        report
            .schema_version
            .map_or_else(|| "unknown".to_owned(), |v| v.to_string()),
    );
    if report.peers.is_empty() {
        out.push_str("\nno peers configured: this node does not replicate\n");
    } else {
        let mut rows = vec![[
            "PEER".to_owned(),
            "ADDRESS".to_owned(),
            "LINK".to_owned(),
            "LAG".to_owned(),
            "LAG WAL".to_owned(),
            "SLOT WAL RETAINED".to_owned(),
        ]];
        for p in &report.peers {
            rows.push([
                p.name.clone(),
                p.address.clone(),
                if p.up { "up" } else { "DOWN" }.to_owned(),
                p.lag_seconds
                    .map_or_else(|| "-".to_owned(), |s| format!("{s:.3} s")),
                p.lag_bytes.map_or_else(|| "-".to_owned(), bytes),
                match &p.slot_invalidated {
                    Some(reason) => format!("LOST ({reason})"),
                    None => p
                        .slot_retained_wal_bytes
                        .map_or_else(|| "-".to_owned(), bytes),
                },
            ]);
        }
        let mut widths = [0usize; 6];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        out.push('\n');
        for row in &rows {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<w$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for p in &report.peers {
            if let Some(stall) = &p.apply_stalled {
                let table = if stall.table.is_empty() {
                    String::new()
                } else {
                    format!(" at {}", stall.table)
                };
                let _ = write!(
                    out,
                    "\nAPPLY STALLED: changes from peer {peer} wait here{table} for {secs:.0} s \
                     ({attempts} attempts, retried with backoff; nothing is skipped): {error} \
                     ({sqlstate}). Fix this node's schema (the log says how) and they apply by \
                     themselves.\n",
                    peer = p.name,
                    secs = stall.seconds,
                    attempts = stall.attempts,
                    error = stall.error,
                    sqlstate = stall.sqlstate,
                );
            }
            if let Some(reason) = &p.slot_invalidated {
                let _ = write!(
                    out,
                    "\nSLOT INVALIDATED: slot pgmm_{peer} of peer {peer} was invalidated ({reason}): \
                     this node's changes can no longer reach {peer}. Drop the slot here \
                     (SELECT pg_drop_replication_slot('pgmm_{peer}')), restart pgmm on this node \
                     to recreate it, then re-synchronise {peer}'s tables from this node.\n",
                    peer = p.name
                );
            }
        }
    }
    out.push('\n');
    match &report.conflicts_last_hour {
        Some(c) if c.total == 0 => out.push_str("conflicts in the last hour: none\n"),
        Some(c) => {
            let kinds: Vec<String> = c.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(
                out,
                "conflicts in the last hour: {} ({})",
                c.total,
                kinds.join(", ")
            );
        }
        None => out.push_str("conflicts in the last hour: unknown (database unreadable)\n"),
    }
    let refusals = &report.ownership_refusals_last_hour;
    let _ = writeln!(
        out,
        "ownership refusals in the last hour: {} at the front door, {} at apply",
        refusals.front_door,
        refusals
            .apply
            .map_or_else(|| "unknown".to_owned(), |n| n.to_string())
    );
    if let Some(e) = &report.database_error {
        let _ = writeln!(out, "database: {e}");
    }
    out
}

/// Bytes in binary units, e.g. `0 B`, `24.0 KiB`, `1.2 MiB`.
pub(crate) fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
