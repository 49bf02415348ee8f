use std::collections::BTreeMap;

use super::http::parse_response;
use super::render::{bytes, table};
use super::*;
use crate::observe::document::PeerStatus;

fn report() -> Report {
    Report {
        node: "a".into(),
        cluster: "shop".into(),
        endpoint: "127.0.0.1:9187".into(),
        peers: vec![
            PeerStatus {
                name: "b".into(),
                address: "10.0.0.2:7432".into(),
                up: true,
                lag_seconds: Some(0.0125),
                lag_bytes: Some(0),
                slot_retained_wal_bytes: Some(24 * 1024),
                slot_invalidated: None,
                apply_stalled: None,
            },
            PeerStatus {
                name: "charlie".into(),
                address: "10.0.0.3:7432".into(),
                up: false,
                lag_seconds: None,
                lag_bytes: None,
                slot_retained_wal_bytes: None,
                slot_invalidated: None,
                apply_stalled: None,
            },
        ],
        conflicts_last_hour: Some(Conflicts {
            total: 3,
            by_kind: BTreeMap::from([
                ("insert_exists".to_owned(), 2),
                ("ownership_violation".to_owned(), 1),
            ]),
        }),
        ownership_refusals_last_hour: Refusals {
            front_door: 4,
            apply: Some(1),
        },
        schema_version: Some(1),
        database_error: None,
    }
}

#[test]
fn the_table_names_every_peer_with_its_link_and_aligns_the_columns() {
    let text = table(&report());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "node a of cluster shop (endpoint 127.0.0.1:9187, pgmm schema version 1)"
    );
    assert_eq!(
        &lines[2..5],
        [
            "PEER     ADDRESS        LINK  LAG      LAG WAL  SLOT WAL RETAINED",
            "b        10.0.0.2:7432  up    0.013 s  0 B      24.0 KiB",
            "charlie  10.0.0.3:7432  DOWN  -        -        -",
        ]
    );
    assert!(
        text.contains("conflicts in the last hour: 3 (insert_exists 2, ownership_violation 1)\n")
    );
    assert!(text.contains("ownership refusals in the last hour: 4 at the front door, 1 at apply\n"));
}

#[test]
fn an_invalidated_slot_is_shown_lost_with_what_to_do() {
    let mut r = report();
    r.peers[1].up = false;
    r.peers[1].slot_retained_wal_bytes = Some(0);
    r.peers[1].slot_invalidated = Some("wal_removed".into());
    let text = table(&r);
    assert!(
        text.lines()
            .any(|l| l.starts_with("charlie ") && l.ends_with("LOST (wal_removed)")),
        "{text}"
    );
    assert!(
        text.contains(
            "SLOT INVALIDATED: slot pgmm_charlie of peer charlie was invalidated (wal_removed)"
        ),
        "{text}"
    );
    assert!(
        text.contains("SELECT pg_drop_replication_slot('pgmm_charlie')"),
        "{text}"
    );
    assert!(!text.contains("pgmm_b of peer b"), "{text}");
    let json = serde_json::to_string(&r).unwrap();
    assert!(
        json.contains("\"slot_invalidated\":\"wal_removed\""),
        "{json}"
    );
    // A document from a pgmm that predates the field still reads.
    let old = json.replace(",\"slot_invalidated\":null", "");
    let old = old.replace(",\"slot_invalidated\":\"wal_removed\"", "");
    assert!(!old.contains("slot_invalidated"), "{old}");
    assert!(serde_json::from_str::<Report>(&old).is_ok());
}

#[test]
fn a_stalled_apply_is_shown_with_its_table_error_and_fix() {
    let mut r = report();
    r.peers[0].apply_stalled = Some(crate::observe::document::ApplyStall {
        table: "public.users".into(),
        sqlstate: "42P01".into(),
        error: "apply: INSERT on public.users failed: relation does not exist".into(),
        seconds: 42.4,
        attempts: 6,
    });
    let text = table(&r);
    assert!(
        text.contains(
            "APPLY STALLED: changes from peer b wait here at public.users for 42 s (6 attempts, \
             retried with backoff; nothing is skipped): apply: INSERT on public.users failed: \
             relation does not exist (42P01)."
        ),
        "{text}"
    );
    assert!(!text.contains("from peer charlie"), "{text}");
    // A document from a pgmm that predates the field still reads.
    let json = serde_json::to_string(&report()).unwrap();
    let old = json.replace(",\"apply_stalled\":null", "");
    assert!(!old.contains("apply_stalled"), "{old}");
    assert!(serde_json::from_str::<Report>(&old).is_ok());
}

#[test]
fn the_table_says_when_the_database_could_not_be_read() {
    let mut r = report();
    r.conflicts_last_hour = None;
    r.schema_version = None;
    r.ownership_refusals_last_hour.apply = None;
    r.database_error = Some("cannot connect".into());
    let text = table(&r);
    assert!(text.contains("pgmm schema version unknown"), "{text}");
    assert!(text.contains("conflicts in the last hour: unknown (database unreadable)"));
    assert!(
        text.contains("4 at the front door, unknown at apply"),
        "{text}"
    );
    assert!(text.ends_with("database: cannot connect\n"), "{text}");
}

#[test]
fn the_json_report_round_trips_with_stable_field_names() {
    let r = report();
    let text = serde_json::to_string(&r).unwrap();
    for key in [
        "\"peers\"",
        "\"up\":true",
        "\"lag_seconds\"",
        "\"lag_bytes\"",
        "\"slot_retained_wal_bytes\"",
        "\"conflicts_last_hour\"",
        "\"ownership_refusals_last_hour\"",
        "\"front_door\":4",
        "\"schema_version\":1",
    ] {
        assert!(text.contains(key), "{key} in {text}");
    }
    assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), r);
}

#[test]
fn bytes_use_binary_units() {
    assert_eq!(bytes(0), "0 B");
    assert_eq!(bytes(1023), "1023 B");
    assert_eq!(bytes(1536), "1.5 KiB");
    assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
}

#[test]
fn a_wildcard_listen_address_is_dialled_on_loopback() {
    assert_eq!(dial_address("0.0.0.0:9187"), "127.0.0.1:9187");
    assert_eq!(dial_address("[::]:9187"), "[::1]:9187");
    assert_eq!(dial_address("10.0.0.1:9187"), "10.0.0.1:9187");
    assert_eq!(dial_address("node-a:9187"), "node-a:9187");
}

#[test]
fn http_responses_are_parsed_plain_or_chunked() {
    let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
    assert_eq!(parse_response(plain).unwrap(), (200, "{}".to_owned()));
    let chunked =
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n";
    assert_eq!(
        parse_response(chunked).unwrap(),
        (503, "not ready".to_owned())
    );
    assert!(parse_response(b"SSH-2.0-OpenSSH\r\n").is_err());
}

#[test]
fn exit_codes_tell_a_bad_config_from_a_stopped_node() {
    let stopped = StatusError::NotRunning {
        node: "a".into(),
        addr: "127.0.0.1:1".into(),
        reason: "Connection refused (os error 111)".into(),
    };
    assert_eq!(stopped.exit_code(), 3);
    assert_eq!(
        stopped.to_string(),
        "node \"a\" is not running: nothing answers on its [metrics] listen address \
         127.0.0.1:1 (Connection refused (os error 111))"
    );
    let no_metrics = StatusError::NoMetrics {
        path: "a.toml".into(),
    };
    assert_eq!(no_metrics.exit_code(), 2);
    assert_eq!(StatusError::Database("x".into()).exit_code(), 1);
}
