//! Free loopback ports for the demo's servers (and the integration tests' clusters).
//!
//! A port found by binding port 0 comes from the kernel's ephemeral range, which is also where
//! every outgoing connection takes its source port. Between choosing such a port and the server
//! binding it (initdb alone takes seconds), any connection on the machine may take it: on a busy
//! machine the server then fails with "address in use". Ports below the ephemeral range are never
//! handed out that way, so only another process choosing listen ports can collide with us, and
//! starting at a random offset makes even that unlikely.

use std::net::TcpListener;

/// The lowest port chosen; below it sit well-known and registered services.
const LOWEST: u16 = 10_000;

/// `n` distinct ports that were free a moment ago. Every candidate's listener is held until all
/// are chosen, so that no port is returned twice.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let (low, high) = below_ephemeral_range().unwrap_or((0, 0));
    let span = u32::from(high.saturating_sub(low));
    let mut held = Vec::with_capacity(n);
    if span as usize >= n.saturating_mul(4) {
        let mut candidate = std::process::id()
            .wrapping_mul(2_654_435_761)
            .wrapping_add(clock_noise())
            % span;
        for _ in 0..span {
            if held.len() == n {
                break;
            }
            // Ports that do not fit a u16 are impossible here: low + span = high < 65536.
            let port = low + u16::try_from(candidate).unwrap_or(0);
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
                held.push(listener);
            }
            candidate = (candidate + 1) % span;
        }
    }
    // No room below the ephemeral range (or all of it taken): let the kernel choose.
    while held.len() < n {
        held.push(TcpListener::bind("127.0.0.1:0")?);
    }
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// `[LOWEST, start of the ephemeral range)` on Linux; `None` elsewhere or when unreadable.
fn below_ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let start: u16 = text.split_whitespace().next()?.parse().ok()?;
    (start > LOWEST).then_some((LOWEST, start))
}

fn clock_noise() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports = free_ports(12).unwrap();
        assert_eq!(ports.len(), 12);
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 12, "{ports:?}");
        if let Some((low, high)) = below_ephemeral_range() {
            assert!(ports.iter().all(|p| (low..high).contains(p)), "{ports:?}");
        }
        for port in ports {
            TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
