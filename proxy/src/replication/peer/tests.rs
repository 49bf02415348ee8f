//! Loopback tests of the peer link: real sockets, real TLS, no Postgres.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::Registry;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::frame::{
    decode_envelope, encode_envelope, Envelope, FrameReader, FrameWriter, RefusalKind, WIRE_VERSION,
};
use super::handshake::MIN_PROTOCOL_VERSION;
use super::*;
use crate::config::DEFAULT_MAX_PENDING_HANDSHAKES;

const SECRET: &[u8] = b"correct horse battery staple 0123456789";
const CLUSTER: &str = "test-cluster";

fn identity(node: &str, cluster: &str, secret: &[u8]) -> PeerIdentity {
    PeerIdentity {
        cluster: cluster.to_owned(),
        node: node.to_owned(),
        secret: Secret::new(secret).unwrap(),
    }
}

fn nodes() -> Vec<String> {
    ["a", "b", "c"].map(String::from).to_vec()
}

fn metrics() -> PeerMetrics {
    PeerMetrics::register(&Registry::new()).unwrap()
}

type ServerResult = Result<(PeerConnection, String), PeerError>;

/// Node `me` accepting one connection; `resume_from` answers 42 for every origin.
struct Server {
    addr: String,
    metrics: PeerMetrics,
    task: JoinHandle<ServerResult>,
}

async fn start_server(me: PeerIdentity, tls: Option<ServerTls>, timeout: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let metrics = metrics();
    let task_metrics = metrics.clone();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        accept_with(
            stream,
            &me,
            &nodes(),
            tls.as_ref(),
            &task_metrics,
            &|_: &str| 42u64,
            timeout,
        )
        .await
    });
    Server {
        addr,
        metrics,
        task,
    }
}

async fn plain_server(me: PeerIdentity) -> Server {
    start_server(me, None, HANDSHAKE_TIMEOUT).await
}

fn handshake_err(result: Result<impl Sized, PeerError>) -> HandshakeError {
    match result {
        Err(PeerError::Handshake { source, .. }) => source,
        Err(other) => panic!("expected a handshake error, got {other}"),
        Ok(_) => panic!("expected a handshake error, got success"),
    }
}

fn transaction(size: usize) -> Body {
    Body::Transaction {
        origin: "a".into(),
        commit_lsn: 0x1_0000_0010,
        end_lsn: 0x1_0000_0100,
        commit_time: 1_700_000_000_000_000,
        changes: crate::replication::changeset::ChangeSet {
            tables: vec![crate::replication::changeset::TableDesc {
                schema: "public".into(),
                name: "t".into(),
                columns: vec!["id".into(), "payload".into()],
                key: vec![0],
            }],
            changes: vec![crate::replication::changeset::Change::Insert {
                table: 0,
                new: vec![
                    crate::replication::pgoutput::Datum::Text(bytes::Bytes::from_static(b"1")),
                    crate::replication::pgoutput::Datum::Text(
                        (0..size)
                            .map(|i| b'a' + (i % 26) as u8)
                            .collect::<Vec<u8>>()
                            .into(),
                    ),
                ],
            }],
        },
    }
}

#[tokio::test]
async fn handshake_and_round_trip_without_tls() {
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let client_metrics = metrics();
    let (mut client, welcome) = connect(
        &srv.addr,
        &identity("a", CLUSTER, SECRET),
        "b",
        None,
        &client_metrics,
    )
    .await
    .unwrap();
    assert_eq!(welcome, Welcome { resume_from: 42 });
    assert_eq!(client.peer(), "b");
    assert_eq!(client.protocol(), PROTOCOL_VERSION);

    let (mut server, peer) = srv.task.await.unwrap().unwrap();
    assert_eq!(peer, "a");
    assert_eq!(server.peer(), "a");

    // A 1 MiB transaction each way, and the small messages, arrive intact.
    let big = transaction(1024 * 1024);
    client.send(&big).await.unwrap();
    assert_eq!(server.recv().await.unwrap(), Some(big.clone()));
    server.send(&big).await.unwrap();
    assert_eq!(client.recv().await.unwrap(), Some(big));
    for body in [
        Body::Heartbeat {
            sent_at_micros: -17,
        },
        Body::Ack {
            applied_lsn: u64::MAX,
        },
        transaction(0),
    ] {
        server.send(&body).await.unwrap();
        assert_eq!(client.recv().await.unwrap(), Some(body));
    }
    assert_eq!(srv.metrics.handshake_failures("authentication"), 0);

    // Split halves work concurrently: a batch queued and flushed at once, read on the far side
    // while the near side reads an ack.
    let (mut tx, mut rx) = client.into_split();
    for i in 0..100u64 {
        tx.queue(&Body::Ack { applied_lsn: i }).unwrap();
    }
    tx.flush().await.unwrap();
    for i in 0..100u64 {
        assert_eq!(
            server.recv().await.unwrap(),
            Some(Body::Ack { applied_lsn: i })
        );
    }
    server.send(&Body::Ack { applied_lsn: 7 }).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), Some(Body::Ack { applied_lsn: 7 }));

    // A clean close reads as None, not as an error.
    tx.shutdown().await.unwrap();
    assert_eq!(server.recv().await.unwrap(), None);
}

#[tokio::test]
async fn a_message_right_after_welcome_is_not_lost() {
    // The server speaks first after the handshake; its frame may arrive in the same read as
    // Welcome and must survive the hand-over from handshake to connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let srv = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let me = identity("b", CLUSTER, SECRET);
        let (mut conn, _) = accept(stream, &me, &nodes(), None, &metrics(), &|_: &str| 0u64)
            .await
            .unwrap();
        conn.send(&Body::Heartbeat { sent_at_micros: 1 })
            .await
            .unwrap();
        conn
    });
    let (mut client, _) = connect(
        &addr,
        &identity("a", CLUSTER, SECRET),
        "b",
        None,
        &metrics(),
    )
    .await
    .unwrap();
    let _server = srv.await.unwrap();
    assert_eq!(
        client.recv().await.unwrap(),
        Some(Body::Heartbeat { sent_at_micros: 1 })
    );
}

/// A TCP relay that records every byte, both directions, before forwarding it.
async fn recording_relay(target: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let wire = Arc::new(Mutex::new(Vec::new()));
    let record = wire.clone();
    tokio::spawn(async move {
        let (inbound, _) = listener.accept().await.unwrap();
        let outbound = TcpStream::connect(target).await.unwrap();
        let (in_rd, in_wr) = inbound.into_split();
        let (out_rd, out_wr) = outbound.into_split();
        async fn pump(
            mut rd: tokio::net::tcp::OwnedReadHalf,
            mut wr: tokio::net::tcp::OwnedWriteHalf,
            record: Arc<Mutex<Vec<u8>>>,
        ) {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if wr.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = wr.shutdown().await;
        }
        tokio::join!(
            pump(in_rd, out_wr, record.clone()),
            pump(out_rd, in_wr, record)
        );
    });
    (addr, wire)
}

#[tokio::test]
async fn the_secret_never_travels() {
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let (relay, wire) = recording_relay(srv.addr.clone()).await;
    let (mut client, _) = connect(
        &relay,
        &identity("a", CLUSTER, SECRET),
        "b",
        None,
        &metrics(),
    )
    .await
    .unwrap();
    let (mut server, _) = srv.task.await.unwrap().unwrap();
    client.send(&transaction(4096)).await.unwrap();
    assert!(server.recv().await.unwrap().is_some());

    let wire = wire.lock().unwrap().clone();
    // The capture is real: the cluster name went by in Hello and Challenge...
    assert!(contains(&wire, CLUSTER.as_bytes()));
    // ...but not the secret, whole or in part.
    assert!(!contains(&wire, SECRET));
    assert!(!contains(&wire, &SECRET[..MIN_SECRET_LEN / 2]));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn wrong_secret_is_refused_on_both_sides() {
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let client_metrics = metrics();
    let result = connect(
        &srv.addr,
        &identity("a", CLUSTER, b"another secret of enough length"),
        "b",
        None,
        &client_metrics,
    )
    .await;
    // The server proves first, so the client notices first and says so.
    let client_err = handshake_err(result);
    assert!(
        matches!(&client_err, HandshakeError::AuthenticationFailed { peer } if peer == "b"),
        "{client_err}"
    );
    assert_eq!(client_err.sqlstate(), "28000");
    let server_err = handshake_err(srv.task.await.unwrap());
    assert!(
        matches!(
            &server_err,
            HandshakeError::RefusedByPeer { kind: RefusalKind::Authentication, reason }
                if reason == "authentication failed"
        ),
        "{server_err}"
    );
    assert_eq!(server_err.sqlstate(), "28000");
    assert_eq!(client_metrics.handshake_failures("authentication"), 1);
    assert_eq!(srv.metrics.handshake_failures("authentication"), 1);
}

#[tokio::test]
async fn a_client_with_a_bad_proof_gets_a_generic_refusal() {
    // A client that cannot verify the server's proof and sends a made-up one anyway: the
    // server catches it, and says no more than "authentication failed".
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let (mut reader, mut writer) = raw_client(&srv.addr).await;
    writer
        .send(&Body::Hello {
            protocol: PROTOCOL_VERSION,
            cluster: CLUSTER.into(),
            node: "a".into(),
            nonce: [7; 32],
            purpose: Purpose::Replicate,
        })
        .await
        .unwrap();
    assert!(matches!(
        reader.recv_required().await.unwrap(),
        Body::Challenge { .. }
    ));
    writer
        .send(&Body::Proof { proof: vec![0; 32] })
        .await
        .unwrap();
    assert_eq!(
        reader.recv_required().await.unwrap(),
        Body::Refused {
            reason: "authentication failed".into(),
            kind: RefusalKind::Authentication,
        }
    );
    let err = handshake_err(srv.task.await.unwrap());
    assert!(
        matches!(&err, HandshakeError::AuthenticationFailed { peer } if peer == "a"),
        "{err}"
    );
    assert_eq!(srv.metrics.handshake_failures("authentication"), 1);
}

async fn raw_client(
    addr: &str,
) -> (
    FrameReader<tokio::net::tcp::OwnedReadHalf>,
    FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
) {
    let (rd, wr) = TcpStream::connect(addr).await.unwrap().into_split();
    (
        FrameReader::new(rd, MAX_FRAME_BYTES),
        FrameWriter::new(wr, MAX_FRAME_BYTES),
    )
}

/// Runs one refused handshake and returns (client error, server error, client metrics).
async fn refused(
    client_me: PeerIdentity,
    server_me: PeerIdentity,
    expected_peer: &str,
    offered_protocol: u16,
) -> (HandshakeError, HandshakeError, PeerMetrics, PeerMetrics) {
    let srv = plain_server(server_me).await;
    let client_metrics = metrics();
    let result = connect_with(
        &srv.addr,
        &client_me,
        expected_peer,
        None,
        &client_metrics,
        Dial {
            purpose: Purpose::Replicate,
            protocol: offered_protocol,
            timeout: HANDSHAKE_TIMEOUT,
        },
    )
    .await;
    let client_err = handshake_err(result);
    let server_err = handshake_err(srv.task.await.unwrap());
    (client_err, server_err, client_metrics, srv.metrics)
}

#[tokio::test]
async fn unknown_node_is_refused() {
    let (client_err, server_err, cm, sm) = refused(
        identity("z", CLUSTER, SECRET),
        identity("b", CLUSTER, SECRET),
        "b",
        PROTOCOL_VERSION,
    )
    .await;
    assert!(
        matches!(&server_err, HandshakeError::UnknownNode { node } if node == "z"),
        "{server_err}"
    );
    assert_eq!(server_err.sqlstate(), "28000");
    let HandshakeError::RefusedByPeer { kind, reason } = &client_err else {
        panic!("{client_err}");
    };
    assert_eq!(*kind, RefusalKind::UnknownNode);
    assert!(
        reason.contains("\"z\"") && reason.contains("\"b\""),
        "{reason}"
    );
    assert_eq!(sm.handshake_failures("unknown_node"), 1);
    assert_eq!(cm.handshake_failures("unknown_node"), 1);

    // A node dialling itself (its own name in the Hello) is no peer either.
    let (_, server_err, _, _) = refused(
        identity("b", CLUSTER, SECRET),
        identity("b", CLUSTER, SECRET),
        "b",
        PROTOCOL_VERSION,
    )
    .await;
    assert!(matches!(server_err, HandshakeError::UnknownNode { .. }));
}

#[tokio::test]
async fn other_cluster_is_refused() {
    let (client_err, server_err, cm, sm) = refused(
        identity("a", "other-cluster", SECRET),
        identity("b", CLUSTER, SECRET),
        "b",
        PROTOCOL_VERSION,
    )
    .await;
    assert!(
        matches!(&server_err, HandshakeError::ClusterMismatch { ours, theirs }
            if ours == CLUSTER && theirs == "other-cluster"),
        "{server_err}"
    );
    let HandshakeError::RefusedByPeer { kind, reason } = &client_err else {
        panic!("{client_err}");
    };
    assert_eq!(*kind, RefusalKind::Cluster);
    assert!(reason.contains(CLUSTER), "{reason}");
    assert_eq!(sm.handshake_failures("cluster"), 1);
    assert_eq!(cm.handshake_failures("cluster"), 1);
}

#[tokio::test]
async fn unsupported_protocol_is_refused_and_a_newer_one_negotiated_down() {
    let (client_err, server_err, cm, sm) = refused(
        identity("a", CLUSTER, SECRET),
        identity("b", CLUSTER, SECRET),
        "b",
        MIN_PROTOCOL_VERSION - 1,
    )
    .await;
    assert!(
        matches!(server_err, HandshakeError::UnsupportedProtocol { theirs } if theirs == MIN_PROTOCOL_VERSION - 1),
        "{server_err}"
    );
    assert_eq!(server_err.sqlstate(), "08P01");
    assert!(
        matches!(
            client_err,
            HandshakeError::RefusedByPeer {
                kind: RefusalKind::Protocol,
                ..
            }
        ),
        "{client_err}"
    );
    assert_eq!(sm.handshake_failures("protocol"), 1);
    assert_eq!(cm.handshake_failures("protocol"), 1);

    // A newer node offering a version this one does not know yet settles on ours.
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let (conn, _) = connect_with(
        &srv.addr,
        &identity("a", CLUSTER, SECRET),
        "b",
        None,
        &metrics(),
        Dial {
            protocol: PROTOCOL_VERSION + 5,
            ..Dial::new(Purpose::Replicate)
        },
    )
    .await
    .unwrap();
    assert_eq!(conn.protocol(), PROTOCOL_VERSION);
    let (server_conn, _) = srv.task.await.unwrap().unwrap();
    assert_eq!(server_conn.protocol(), PROTOCOL_VERSION);
}

#[tokio::test]
async fn wrong_node_at_the_address_is_refused_by_the_client() {
    let (client_err, server_err, cm, _) = refused(
        identity("a", CLUSTER, SECRET),
        identity("b", CLUSTER, SECRET),
        "c",
        PROTOCOL_VERSION,
    )
    .await;
    assert!(
        matches!(&client_err, HandshakeError::WrongPeer { expected, actual }
            if expected == "c" && actual == "b"),
        "{client_err}"
    );
    assert!(matches!(
        server_err,
        HandshakeError::RefusedByPeer {
            kind: RefusalKind::WrongPeer,
            ..
        }
    ));
    assert_eq!(cm.handshake_failures("wrong_peer"), 1);
}

#[tokio::test]
async fn resume_lookup_failure_refuses_with_unavailable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    struct Down;
    impl ResumeSource for Down {
        async fn resume_from(
            &self,
            _origin: &str,
        ) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
            Err("connection to the local Postgres refused".into())
        }
    }
    let srv = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let me = identity("b", CLUSTER, SECRET);
        accept(stream, &me, &nodes(), None, &metrics(), &Down).await
    });
    let client_err = handshake_err(
        connect(
            &addr,
            &identity("a", CLUSTER, SECRET),
            "b",
            None,
            &metrics(),
        )
        .await,
    );
    let HandshakeError::RefusedByPeer { kind, reason } = &client_err else {
        panic!("{client_err}");
    };
    assert_eq!(*kind, RefusalKind::Unavailable);
    // The local cause stays local.
    assert!(!reason.contains("Postgres"), "{reason}");
    assert_eq!(client_err.sqlstate(), "57P03");
    let server_err = handshake_err(srv.await.unwrap());
    assert!(server_err.to_string().contains("Postgres"), "{server_err}");
}

#[tokio::test]
async fn garbage_instead_of_hello_is_dropped_cleanly() {
    // An HTTP request: its first four bytes read as a length far beyond the limit.
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let mut raw = TcpStream::connect(&srv.addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let err = handshake_err(srv.task.await.unwrap());
    assert!(
        matches!(err, HandshakeError::Frame(FrameError::TooLarge { len: Some(n), .. }) if n == 0x4745_5420),
        "{err}"
    );
    assert_eq!(err.sqlstate(), "08P01");
    assert_eq!(srv.metrics.handshake_failures("frame_too_large"), 1);

    // A well-formed frame around bytes that are not MessagePack.
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let mut raw = TcpStream::connect(&srv.addr).await.unwrap();
    raw.write_all(&[0, 0, 0, 5, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1])
        .await
        .unwrap();
    let err = handshake_err(srv.task.await.unwrap());
    assert!(
        matches!(err, HandshakeError::Frame(FrameError::Malformed(_))),
        "{err}"
    );
    assert_eq!(srv.metrics.handshake_failures("protocol_violation"), 1);

    // A valid message, but not the one the handshake starts with.
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let (mut reader, mut writer) = raw_client(&srv.addr).await;
    writer.send(&Body::Ack { applied_lsn: 1 }).await.unwrap();
    assert!(matches!(
        reader.recv_required().await.unwrap(),
        Body::Refused {
            kind: RefusalKind::ProtocolViolation,
            ..
        }
    ));
    let err = handshake_err(srv.task.await.unwrap());
    assert!(matches!(
        err,
        HandshakeError::Unexpected {
            expected: "Hello",
            got: "Ack"
        }
    ));

    // A peer that vanishes mid-frame.
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let mut raw = TcpStream::connect(&srv.addr).await.unwrap();
    raw.write_all(&[0, 0, 0, 100, 1, 2]).await.unwrap();
    drop(raw);
    let err = handshake_err(srv.task.await.unwrap());
    assert!(
        matches!(err, HandshakeError::Frame(FrameError::UnexpectedEof)),
        "{err}"
    );
    assert_eq!(srv.metrics.handshake_failures("closed"), 1);
}

#[tokio::test]
async fn before_authentication_only_a_handshake_sized_frame_is_read() {
    // An unauthenticated client announces a 64 MiB frame (the post-handshake limit) and starts
    // streaming it: refused at the header, before any of the body is buffered.
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let mut raw = TcpStream::connect(&srv.addr).await.unwrap();
    let announced = u32::try_from(MAX_FRAME_BYTES).unwrap();
    raw.write_all(&announced.to_be_bytes()).await.unwrap();
    // Best effort: the server may already have closed.
    let _ = raw.write_all(&[0x80; 64 * 1024]).await;
    let err = handshake_err(srv.task.await.unwrap());
    assert!(
        matches!(err, HandshakeError::Frame(FrameError::TooLarge { len: Some(n), max })
            if n == MAX_FRAME_BYTES && max == HANDSHAKE_MAX_FRAME_BYTES),
        "{err}"
    );
    assert_eq!(err.label(), "frame_too_large");
    assert_eq!(srv.metrics.handshake_failures("frame_too_large"), 1);
    assert_eq!(srv.metrics.handshake_failures("protocol_violation"), 0);

    // One byte over the handshake limit is refused the same way...
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let mut raw = TcpStream::connect(&srv.addr).await.unwrap();
    let over = u32::try_from(HANDSHAKE_MAX_FRAME_BYTES + 1).unwrap();
    raw.write_all(&over.to_be_bytes()).await.unwrap();
    let err = handshake_err(srv.task.await.unwrap());
    assert!(
        matches!(err, HandshakeError::Frame(FrameError::TooLarge { len: Some(n), .. }) if n == HANDSHAKE_MAX_FRAME_BYTES + 1),
        "{err}"
    );

    // ...while a frame of exactly the limit is read (and then fails as the garbage it is).
    let srv = plain_server(identity("b", CLUSTER, SECRET)).await;
    let mut raw = TcpStream::connect(&srv.addr).await.unwrap();
    let at = u32::try_from(HANDSHAKE_MAX_FRAME_BYTES).unwrap();
    raw.write_all(&at.to_be_bytes()).await.unwrap();
    raw.write_all(&vec![0xc1; HANDSHAKE_MAX_FRAME_BYTES])
        .await
        .unwrap();
    let err = handshake_err(srv.task.await.unwrap());
    assert!(
        matches!(err, HandshakeError::Frame(FrameError::Malformed(_))),
        "{err}"
    );
    assert_eq!(srv.metrics.handshake_failures("protocol_violation"), 1);
}

#[tokio::test]
async fn a_dialled_node_is_held_to_the_handshake_limit_until_it_has_proved_itself() {
    // Something at a peer's address answers the Hello with a huge frame: the dialling node
    // refuses it at the header too (the server is unauthenticated until its Challenge
    // verified).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let announced = u32::try_from(MAX_FRAME_BYTES).unwrap();
        stream.write_all(&announced.to_be_bytes()).await.unwrap();
        // Hold the connection until the client has given up.
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
    });
    let m = metrics();
    let err = connect(&addr, &identity("a", CLUSTER, SECRET), "b", None, &m)
        .await
        .err()
        .unwrap();
    let err = handshake_err(Err::<(), _>(err));
    assert!(
        matches!(err, HandshakeError::Frame(FrameError::TooLarge { max, .. }) if max == HANDSHAKE_MAX_FRAME_BYTES),
        "{err}"
    );
    assert_eq!(m.handshake_failures("frame_too_large"), 1);
    fake.await.unwrap();
}

#[test]
fn handshake_limit_closes_what_it_cannot_admit_and_frees_slots() {
    let m = metrics();
    let limit = HandshakeLimit::new(2, &m);
    let first = limit.try_acquire(None).expect("a free slot");
    let second = limit.try_acquire(None).expect("a free slot");
    assert_eq!(m.handshakes_in_progress(), 2);
    assert!(limit.try_acquire(None).is_none());
    assert!(limit.try_acquire(None).is_none());
    assert_eq!(m.handshake_failures("too_many_handshakes"), 2);
    drop(first);
    assert_eq!(m.handshakes_in_progress(), 1);
    let third = limit.try_acquire(None).expect("the freed slot");
    assert_eq!(m.handshake_failures("too_many_handshakes"), 2);
    drop((second, third));
    assert_eq!(m.handshakes_in_progress(), 0);
    // A limit of 0 would refuse every peer forever: it is raised to 1.
    let one = HandshakeLimit::new(0, &m);
    assert!(one.try_acquire(None).is_some());
}

#[tokio::test]
async fn a_silent_peer_times_out() {
    let srv = start_server(
        identity("b", CLUSTER, SECRET),
        None,
        Duration::from_millis(200),
    )
    .await;
    let _silent = TcpStream::connect(&srv.addr).await.unwrap();
    let err = handshake_err(srv.task.await.unwrap());
    assert!(matches!(err, HandshakeError::Timeout(_)), "{err}");
    assert_eq!(srv.metrics.handshake_failures("timeout"), 1);
}

#[tokio::test]
async fn oversized_frames_are_rejected_cleanly() {
    // Receiving: a header announcing more than the limit fails at once, before any body.
    let (mut near, far) = tokio::io::duplex(1024);
    let mut reader = FrameReader::new(far, MAX_FRAME_BYTES);
    let too_big = u32::try_from(MAX_FRAME_BYTES + 1).unwrap();
    near.write_all(&too_big.to_be_bytes()).await.unwrap();
    let err = reader.recv().await.unwrap_err();
    assert!(
        matches!(err, FrameError::TooLarge { len: Some(n), max } if n == MAX_FRAME_BYTES + 1 && max == MAX_FRAME_BYTES),
        "{err}"
    );
    assert_eq!(err.sqlstate(), "08P01");

    // Sending: refused before anything is queued; the link stays usable.
    let (near, far) = tokio::io::duplex(64 * 1024);
    let mut writer = FrameWriter::new(near, 1024);
    let mut reader = FrameReader::new(far, 1024);
    let err = writer.send(&transaction(2048)).await.unwrap_err();
    assert!(
        matches!(err, FrameError::TooLarge { len: Some(n), max: 1024 } if n > 2048),
        "{err}"
    );
    writer.send(&Body::Ack { applied_lsn: 3 }).await.unwrap();
    assert_eq!(
        reader.recv().await.unwrap(),
        Some(Body::Ack { applied_lsn: 3 })
    );
}

#[tokio::test]
async fn queued_frames_are_the_length_delimited_envelopes() {
    // The writer serializes in place; the wire must stay "4-byte big-endian length, then the
    // envelope", also around a refused message.
    let (near, mut far) = tokio::io::duplex(64 * 1024);
    let mut writer = FrameWriter::new(near, 1024);
    let sent = [Body::Ack { applied_lsn: 7 }, transaction(100)];
    writer.queue(&sent[0]).unwrap();
    assert!(writer.queue(&transaction(2048)).is_err());
    writer.queue(&sent[1]).unwrap();
    writer.shutdown().await.unwrap();
    let mut wire = Vec::new();
    far.read_to_end(&mut wire).await.unwrap();
    let mut expected = Vec::new();
    for body in &sent {
        let payload = encode_envelope(body).unwrap();
        expected.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        expected.extend_from_slice(&payload);
    }
    assert_eq!(wire, expected);
}

/// What a newer pgmm might send: a message kind we do not know, and a known one with an
/// added field.
#[derive(Serialize)]
enum NewerBody {
    Gossip {
        members: Vec<String>,
    },
    Hello {
        protocol: u16,
        cluster: String,
        node: String,
        #[serde(with = "serde_bytes")]
        nonce: [u8; 32],
        schema_fingerprints: Vec<String>,
    },
    Bye,
}

#[derive(Serialize)]
struct NewerEnvelope {
    version: u16,
    body: NewerBody,
}

fn newer(version: u16, body: NewerBody) -> Vec<u8> {
    rmp_serde::to_vec_named(&NewerEnvelope { version, body }).unwrap()
}

#[test]
fn envelopes_from_a_newer_peer() {
    // An added field is skipped.
    let hello = newer(
        WIRE_VERSION,
        NewerBody::Hello {
            protocol: 2,
            cluster: "c".into(),
            node: "n".into(),
            nonce: [1; 32],
            schema_fingerprints: vec!["x".into()],
        },
    );
    assert_eq!(
        decode_envelope(&hello).unwrap(),
        Body::Hello {
            protocol: 2,
            cluster: "c".into(),
            node: "n".into(),
            nonce: [1; 32],
            purpose: Purpose::Replicate,
        }
    );
    // An unknown message kind is named, with or without payload.
    let gossip = newer(
        WIRE_VERSION,
        NewerBody::Gossip {
            members: vec!["a".into()],
        },
    );
    assert!(matches!(
        decode_envelope(&gossip),
        Err(FrameError::UnknownMessage { name, version: WIRE_VERSION }) if name == "Gossip"
    ));
    assert!(matches!(
        decode_envelope(&newer(WIRE_VERSION, NewerBody::Bye)),
        Err(FrameError::UnknownMessage { name, .. }) if name == "Bye"
    ));
    // Another major version is refused as such, whatever it carries.
    assert!(matches!(
        decode_envelope(&newer(WIRE_VERSION + 1, NewerBody::Bye)),
        Err(FrameError::IncompatibleVersion { theirs, ours: WIRE_VERSION }) if theirs == WIRE_VERSION + 1
    ));
    let ack_v2 = rmp_serde::to_vec_named(&Envelope {
        version: WIRE_VERSION + 1,
        body: Body::Ack { applied_lsn: 1 },
    })
    .unwrap();
    assert!(matches!(
        decode_envelope(&ack_v2),
        Err(FrameError::IncompatibleVersion { .. })
    ));
    // An unknown refusal kind reads as Other.
    #[derive(Serialize)]
    enum NewerRefused {
        Refused { reason: String, kind: String },
    }
    #[derive(Serialize)]
    struct E {
        version: u16,
        body: NewerRefused,
    }
    let refused = rmp_serde::to_vec_named(&E {
        version: WIRE_VERSION,
        body: NewerRefused::Refused {
            reason: "r".into(),
            kind: "quota".into(),
        },
    })
    .unwrap();
    assert_eq!(
        decode_envelope(&refused).unwrap(),
        Body::Refused {
            reason: "r".into(),
            kind: RefusalKind::Other
        }
    );
    // Garbage is malformed, not a panic.
    for junk in [&b""[..], b"\xc1", b"\x81\xa7version", b"\x92\x01\x02"] {
        assert!(matches!(
            decode_envelope(junk),
            Err(FrameError::Malformed(_))
        ));
    }
}

#[tokio::test]
async fn an_unknown_message_on_a_live_link_can_be_skipped() {
    let (mut near, far) = tokio::io::duplex(64 * 1024);
    let mut reader = FrameReader::new(far, MAX_FRAME_BYTES);
    let mut frames = Vec::new();
    for payload in [
        newer(WIRE_VERSION, NewerBody::Gossip { members: vec![] }),
        encode_envelope(&Body::Ack { applied_lsn: 9 }).unwrap(),
    ] {
        frames.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        frames.extend_from_slice(&payload);
    }
    near.write_all(&frames).await.unwrap();
    assert!(matches!(
        reader.recv().await,
        Err(FrameError::UnknownMessage { .. })
    ));
    assert_eq!(
        reader.recv().await.unwrap(),
        Some(Body::Ack { applied_lsn: 9 })
    );
}

/// A CA, and for each node a certificate for 127.0.0.1/localhost usable as TLS server and
/// client, as PEM files. Returns the directory and the [`PeerTls`] of each node.
struct Pki {
    _dir: tempfile::TempDir,
    a: PeerTls,
    b: PeerTls,
    /// Node `a`'s certificate and key under `[peer]`, but another CA's, to trust.
    a_other_ca: PeerTls,
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        let path = dir.path().join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        (params, key, path)
    };
    let (ca_params, ca_key, ca_path) = ca("cluster-ca");
    let (_, _, other_ca_path) = ca("other-ca");
    let node = |name: &str| -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &Issuer::from_params(&ca_params, &ca_key))
            .unwrap();
        let cert_path = dir.path().join(format!("{name}.pem"));
        let key_path = dir.path().join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    };
    let (a_cert, a_key) = node("a");
    let (b_cert, b_key) = node("b");
    let config = |cert: &PathBuf, key: &PathBuf, ca: &PathBuf| crate::config::PeerListenConfig {
        listen: "127.0.0.1:0".into(),
        secret_file: dir.path().join("secret"),
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        tls_ca: Some(ca.clone()),
        max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
    };
    let load = |cfg| PeerTls::from_config(&cfg).unwrap().unwrap();
    Pki {
        a: load(config(&a_cert, &a_key, &ca_path)),
        b: load(config(&b_cert, &b_key, &ca_path)),
        a_other_ca: load(config(&a_cert, &a_key, &other_ca_path)),
        _dir: dir,
    }
}

#[tokio::test]
async fn handshake_and_round_trip_with_mutual_tls() {
    let pki = pki();
    let srv = start_server(
        identity("b", CLUSTER, SECRET),
        Some(pki.b.server.clone()),
        HANDSHAKE_TIMEOUT,
    )
    .await;
    let (mut client, welcome) = connect(
        &srv.addr,
        &identity("a", CLUSTER, SECRET),
        "b",
        Some(&pki.a.client),
        &metrics(),
    )
    .await
    .unwrap();
    assert_eq!(welcome.resume_from, 42);
    let (mut server, peer) = srv.task.await.unwrap().unwrap();
    assert_eq!(peer, "a");
    let big = transaction(1024 * 1024);
    client.send(&big).await.unwrap();
    assert_eq!(server.recv().await.unwrap(), Some(big));
    server.send(&Body::Ack { applied_lsn: 5 }).await.unwrap();
    assert_eq!(
        client.recv().await.unwrap(),
        Some(Body::Ack { applied_lsn: 5 })
    );

    // The secret handshake still runs inside TLS: a wrong secret is refused there too.
    let srv = start_server(
        identity("b", CLUSTER, SECRET),
        Some(pki.b.server.clone()),
        HANDSHAKE_TIMEOUT,
    )
    .await;
    let err = handshake_err(
        connect(
            &srv.addr,
            &identity("a", CLUSTER, b"0123456789abcdef-wrong"),
            "b",
            Some(&pki.a.client),
            &metrics(),
        )
        .await,
    );
    assert!(matches!(err, HandshakeError::AuthenticationFailed { .. }));
    assert!(matches!(
        handshake_err(srv.task.await.unwrap()),
        HandshakeError::RefusedByPeer { .. }
    ));
}

#[tokio::test]
async fn tls_peers_of_another_ca_are_refused() {
    let pki = pki();
    // Node a trusts another CA: it rejects b's certificate.
    let srv = start_server(
        identity("b", CLUSTER, SECRET),
        Some(pki.b.server.clone()),
        HANDSHAKE_TIMEOUT,
    )
    .await;
    let client_metrics = metrics();
    let err = handshake_err(
        connect(
            &srv.addr,
            &identity("a", CLUSTER, SECRET),
            "b",
            Some(&pki.a_other_ca.client),
            &client_metrics,
        )
        .await,
    );
    assert!(matches!(err, HandshakeError::Tls(_)), "{err}");
    assert_eq!(client_metrics.handshake_failures("tls"), 1);
    let server_err = handshake_err(srv.task.await.unwrap());
    assert!(matches!(server_err, HandshakeError::Tls(_)), "{server_err}");
    assert_eq!(srv.metrics.handshake_failures("tls"), 1);

    // A plain-TCP client at a TLS server is not let in either.
    let srv = start_server(
        identity("b", CLUSTER, SECRET),
        Some(pki.b.server.clone()),
        Duration::from_secs(5),
    )
    .await;
    let result = connect(
        &srv.addr,
        &identity("a", CLUSTER, SECRET),
        "b",
        None,
        &metrics(),
    )
    .await;
    assert!(result.is_err());
    assert!(matches!(
        handshake_err(srv.task.await.unwrap()),
        HandshakeError::Tls(_)
    ));
}

#[test]
fn partial_tls_configuration_is_an_error() {
    let cfg = crate::config::PeerListenConfig {
        listen: "127.0.0.1:0".into(),
        secret_file: "/nonexistent".into(),
        tls_cert: Some("/c.pem".into()),
        tls_key: Some("/k.pem".into()),
        tls_ca: None,
        max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
    };
    let err = PeerTls::from_config(&cfg).err().unwrap();
    assert!(err.to_string().contains("tls_ca"), "{err}");
    let none = crate::config::PeerListenConfig {
        tls_cert: None,
        tls_key: None,
        ..cfg
    };
    assert!(PeerTls::from_config(&none).unwrap().is_none());
}

#[test]
fn secret_file_rules() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, content: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    };
    // One trailing newline is not part of the secret: same key as without it.
    let with_nl = Secret::from_file(&write("nl", b"0123456789abcdef\n")).unwrap();
    let without = Secret::new(b"0123456789abcdef").unwrap();
    let with_crlf = Secret::from_file(&write("crlf", b"0123456789abcdef\r\n")).unwrap();
    let tag = |s: &Secret| ring::hmac::sign(s.key(), b"x").as_ref().to_vec();
    assert_eq!(tag(&with_nl), tag(&without));
    assert_eq!(tag(&with_crlf), tag(&without));
    // Empty (even as a lone newline) and short secrets are refused, naming the file.
    for (name, content) in [("empty", &b""[..]), ("lone_nl", b"\n")] {
        let path = write(name, content);
        let err = Secret::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert_eq!(err.sqlstate(), "F0000");
    }
    let err = Secret::from_file(&write("short", b"hunter2\n")).unwrap_err();
    assert!(
        err.to_string().contains("shorter than the minimum of 16"),
        "{err}"
    );
    let err = Secret::from_file(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(err, PeerError::Secret { .. }));
    // Never printed.
    assert_eq!(format!("{without:?}"), "Secret(..)");
}

#[tokio::test]
async fn unreachable_peer_is_a_connect_error_not_a_handshake_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let m = metrics();
    let err = connect(&addr, &identity("a", CLUSTER, SECRET), "b", None, &m)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, PeerError::Connect { .. }), "{err}");
    assert_eq!(err.sqlstate(), "08001");
    for label in handshake::LABELS {
        assert_eq!(m.handshake_failures(label), 0);
    }
}

#[test]
fn metric_is_registered_in_the_given_registry() {
    let registry = Registry::new();
    let m = PeerMetrics::register(&registry).unwrap();
    m.count(&HandshakeError::UnknownNode { node: "z".into() });
    let families = registry.gather();
    let family = families
        .iter()
        .find(|f| f.name() == "pgmm_peer_handshake_failures_total")
        .unwrap();
    let unknown = family
        .get_metric()
        .iter()
        .find(|m| m.get_label()[0].value() == "unknown_node")
        .unwrap();
    assert_eq!(unknown.get_counter().get_value(), 1.0);
    // Every reason is present from the start.
    assert_eq!(family.get_metric().len(), handshake::LABELS.len());
    // A second registration in the same registry is an error, not a silent duplicate.
    assert!(PeerMetrics::register(&registry).is_err());
}
