//! The peer handshake: mutual proof of the shared secret, without sending it.
//!
//! ```text
//! client                                   server
//!   Hello{protocol, cluster, node, Nc}  →
//!                                       ←  Challenge{protocol', cluster, node, Ns, server proof}
//!   Proof{client proof}                 →
//!                                       ←  Welcome{resume_from} | Refused{reason, kind}
//! ```
//!
//! Proofs are HMAC-SHA256 under the secret over a transcript: a role label (`pgmm-server` or
//! `pgmm-client`, so one side's proof never passes as the other's), both nonces (the verifier's
//! own fresh nonce defeats replay), both node names, the cluster name, the negotiated protocol
//! (no silent downgrade) and, under TLS, 32 bytes of TLS exported keying material (so a proof
//! is only valid on the TLS session it was made on: it cannot be relayed). Every variable-length
//! field is length-prefixed, so no two transcripts concatenate to the same bytes.
//!
//! The server proves first: a client never sends its proof to a node that does not know the
//! secret. The flip side is that anyone who can open a TCP connection obtains one server proof
//! and can guess the secret offline: the secret must be high-entropy (at least 16 bytes are
//! enforced; `openssl rand -hex 32` is the advice), and TLS with a CA narrows who can try.
//!
//! What a refused peer is told: cluster, node and protocol mismatches get a specific reason,
//! because they are configuration mistakes an operator fixes from the message, and node names
//! are not secret. A proof mismatch only ever reads "authentication failed", on the wire, and
//! comes after all the identity checks; the detailed reason is in the refusing node's log.

use std::future::Future;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use super::frame::{Body, FrameError, FrameReader, FrameWriter, Purpose, RefusalKind, Welcome};
use super::PeerIdentity;
use crate::pg::SqlState;

/// Peer protocol version this build speaks at most; the handshake settles on
/// `min(client's, server's)` if both support it.
///
/// 1: one `Transaction` frame per transaction (at most 64 MiB). 2: a transaction larger than
/// `[replication] chunk_bytes` travels as `TxBegin`, `TxChunk`s, `TxCommit`, a value larger
/// than a frame as `TxValue` pieces. 3: a change set may hold schema changes (`Change::Ddl`).
/// 4: links opened for a request ([`Purpose::Request`]: join, check) and the `Member`
/// messages.
pub const PROTOCOL_VERSION: u16 = 4;
/// The first version that answers membership requests.
pub const MEMBER_PROTOCOL_VERSION: u16 = 4;
/// The first version with chunked transactions.
pub const CHUNKED_PROTOCOL_VERSION: u16 = 2;
/// The first version whose change sets may carry schema changes; an older peer cannot decode
/// them, so a transaction with DDL waits (the shipper reports it) until that peer is upgraded.
pub const DDL_PROTOCOL_VERSION: u16 = 3;
/// Oldest peer protocol version this build still speaks. A link with a node of the previous
/// release settles on 1, where transactions travel whole as they did (so a rolling upgrade keeps
/// replicating; only transactions over the 64 MiB frame limit wait for both ends to speak 2).
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The only reason text sent for a proof mismatch, on purpose (see the module docs).
const AUTHENTICATION_FAILED: &str = "authentication failed";

const NONCE_LEN: usize = 32;
const SERVER_LABEL: &[u8] = b"pgmm-server";
const CLIENT_LABEL: &[u8] = b"pgmm-client";

/// Why a handshake failed, on either side. [`HandshakeError::label`] is the `reason` label of
/// `pgmm_peer_handshake_failures_total`.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The peer's proof did not verify: the two nodes hold different secrets (or the peer is
    /// not who it claims to be).
    #[error("authentication of node {peer:?} failed: its proof does not match the shared secret (check [peer] secret_file on both nodes)")]
    AuthenticationFailed { peer: String },
    /// The peer refused us; `reason` is its words.
    #[error("the peer refused the handshake: {reason}")]
    RefusedByPeer { kind: RefusalKind, reason: String },
    #[error("node {node:?} is not a peer of this node (not in [cluster] nodes, or this node's own name)")]
    UnknownNode { node: String },
    #[error("the peer belongs to cluster {theirs:?}, this node to cluster {ours:?}")]
    ClusterMismatch { ours: String, theirs: String },
    #[error("the peer speaks protocol version {theirs}, this node versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}")]
    UnsupportedProtocol { theirs: u16 },
    /// The address configured for one node answered as another.
    #[error("expected node {expected:?} at this address, but node {actual:?} answered")]
    WrongPeer { expected: String, actual: String },
    #[error("expected a {expected} message during the handshake, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    /// The server could not determine where the client should resume (e.g. its Postgres is
    /// down); the client retries later.
    #[error("cannot determine the resume position for node {node:?}: {message}")]
    Unavailable { node: String, message: String },
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("the handshake did not complete within {0:?}")]
    Timeout(std::time::Duration),
    /// `[peer] max_pending_handshakes` handshakes were already running: the connection was
    /// closed as soon as it was accepted, before reading anything from it.
    #[error("{0} peer handshakes were already in progress ([peer] max_pending_handshakes); connection closed")]
    TooManyHandshakes(usize),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl HandshakeError {
    /// The metric label: a small closed set, so the counter's cardinality stays bounded.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::AuthenticationFailed { .. } => "authentication",
            HandshakeError::RefusedByPeer { kind, .. } => kind_label(*kind),
            HandshakeError::UnknownNode { .. } => "unknown_node",
            HandshakeError::ClusterMismatch { .. } => "cluster",
            HandshakeError::UnsupportedProtocol { .. } => "protocol",
            HandshakeError::WrongPeer { .. } => "wrong_peer",
            HandshakeError::Unavailable { .. } => "unavailable",
            HandshakeError::Tls(_) => "tls",
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::TooManyHandshakes(_) => "too_many_handshakes",
            HandshakeError::Frame(FrameError::TooLarge { .. }) => "frame_too_large",
            HandshakeError::Frame(FrameError::Io(_) | FrameError::Closed)
            | HandshakeError::Frame(FrameError::UnexpectedEof) => "closed",
            HandshakeError::Unexpected { .. } | HandshakeError::Frame(_) => "protocol_violation",
        }
    }
}

impl SqlState for HandshakeError {
    fn sqlstate(&self) -> &str {
        match self {
            // invalid_authorization_specification: who the peer is, or its credentials
            HandshakeError::AuthenticationFailed { .. }
            | HandshakeError::UnknownNode { .. }
            | HandshakeError::ClusterMismatch { .. }
            | HandshakeError::WrongPeer { .. }
            | HandshakeError::Tls(_) => "28000",
            HandshakeError::RefusedByPeer { kind, .. } => match kind {
                RefusalKind::Protocol | RefusalKind::ProtocolViolation => "08P01",
                RefusalKind::Unavailable => "57P03",
                _ => "28000",
            },
            // protocol_violation
            HandshakeError::UnsupportedProtocol { .. } | HandshakeError::Unexpected { .. } => {
                "08P01"
            }
            // cannot_connect_now
            HandshakeError::Unavailable { .. } => "57P03",
            // connection_failure
            HandshakeError::Timeout(_) => "08006",
            // too_many_connections
            HandshakeError::TooManyHandshakes(_) => "53300",
            HandshakeError::Frame(e) => e.sqlstate(),
        }
    }
}

impl HandshakeError {
    /// What the other side is told, if anything, phrased from the refusing node `me`'s side.
    /// `None` for failures where the stream is unusable or the peer itself ended the exchange.
    fn refusal(&self, me: &str) -> Option<(RefusalKind, String)> {
        Some(match self {
            HandshakeError::AuthenticationFailed { .. } => (
                RefusalKind::Authentication,
                AUTHENTICATION_FAILED.to_owned(),
            ),
            HandshakeError::UnknownNode { node } => (
                RefusalKind::UnknownNode,
                format!(
                    "node {me:?} does not accept node {node:?}: not in its [cluster] nodes, \
                     or its own name"
                ),
            ),
            HandshakeError::ClusterMismatch { ours, theirs } => (
                RefusalKind::Cluster,
                format!("node {me:?} belongs to cluster {ours:?}, not {theirs:?}"),
            ),
            HandshakeError::UnsupportedProtocol { theirs } => (
                RefusalKind::Protocol,
                format!(
                    "node {me:?} speaks peer protocol versions {MIN_PROTOCOL_VERSION} to \
                     {PROTOCOL_VERSION}, not {theirs}"
                ),
            ),
            HandshakeError::WrongPeer { expected, actual } => (
                RefusalKind::WrongPeer,
                format!(
                    "node {me:?} has node {expected:?} configured at this address, \
                     not {actual:?}"
                ),
            ),
            HandshakeError::Unexpected { expected, got } => (
                RefusalKind::ProtocolViolation,
                format!("node {me:?} expected a {expected} message, got {got}"),
            ),
            // The local cause (e.g. a database error) stays in the local log.
            HandshakeError::Unavailable { node, .. } => (
                RefusalKind::Unavailable,
                format!(
                    "node {me:?} cannot determine where node {node:?} should resume; \
                     retry later"
                ),
            ),
            HandshakeError::RefusedByPeer { .. }
            | HandshakeError::Tls(_)
            | HandshakeError::Timeout(_)
            | HandshakeError::TooManyHandshakes(_)
            | HandshakeError::Frame(_) => return None,
        })
    }
}

fn kind_label(kind: RefusalKind) -> &'static str {
    match kind {
        RefusalKind::Authentication => "authentication",
        RefusalKind::UnknownNode => "unknown_node",
        RefusalKind::Cluster => "cluster",
        RefusalKind::Protocol => "protocol",
        RefusalKind::WrongPeer => "wrong_peer",
        RefusalKind::ProtocolViolation => "protocol_violation",
        RefusalKind::Unavailable => "unavailable",
        RefusalKind::Other => "refused",
    }
}

/// Every value [`HandshakeError::label`] can take, to pre-create the metric's series.
pub(crate) const LABELS: &[&str] = &[
    "authentication",
    "unknown_node",
    "cluster",
    "protocol",
    "wrong_peer",
    "protocol_violation",
    "unavailable",
    "refused",
    "tls",
    "timeout",
    "closed",
    "frame_too_large",
    "too_many_handshakes",
];

/// Where the server wants a connecting node's changes to start from: in pgmm, that node's
/// progress record (its row of `pgmm.applied`, which commits with every applied batch).
/// Any `Fn(&str) -> u64` is one, for tests and fixed positions.
pub trait ResumeSource: Sync {
    fn resume_from(
        &self,
        origin: &str,
    ) -> impl Future<Output = Result<u64, Box<dyn std::error::Error + Send + Sync>>> + Send;
}

impl<F> ResumeSource for F
where
    F: Fn(&str) -> u64 + Sync,
{
    fn resume_from(
        &self,
        origin: &str,
    ) -> impl Future<Output = Result<u64, Box<dyn std::error::Error + Send + Sync>>> + Send {
        std::future::ready(Ok(self(origin)))
    }
}

/// What the handshake settled, besides the resume position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    pub peer: String,
    pub protocol: u16,
    pub purpose: Purpose,
}

/// Everything both proofs cover, in one place so the two sides cannot drift apart.
struct Transcript<'a> {
    cluster: &'a str,
    client_node: &'a str,
    server_node: &'a str,
    client_nonce: &'a [u8; NONCE_LEN],
    server_nonce: &'a [u8; NONCE_LEN],
    protocol: u16,
    /// TLS exported keying material, empty without TLS.
    binding: &'a [u8],
}

impl Transcript<'_> {
    fn message(&self, label: &[u8]) -> Vec<u8> {
        // The verifier's own nonce comes first: Nc in the server's proof, Ns in the client's.
        let (first, second) = if label == SERVER_LABEL {
            (self.client_nonce, self.server_nonce)
        } else {
            (self.server_nonce, self.client_nonce)
        };
        let mut out = Vec::with_capacity(256);
        for part in [
            label,
            first.as_slice(),
            second.as_slice(),
            self.client_node.as_bytes(),
            self.server_node.as_bytes(),
            self.cluster.as_bytes(),
            &self.protocol.to_be_bytes(),
            self.binding,
        ] {
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn sign(&self, key: &hmac::Key, label: &[u8]) -> Vec<u8> {
        hmac::sign(key, &self.message(label)).as_ref().to_vec()
    }

    /// Constant-time comparison (`ring::hmac::verify`).
    fn verify(&self, key: &hmac::Key, label: &[u8], proof: &[u8]) -> bool {
        hmac::verify(key, &self.message(label), proof).is_ok()
    }
}

fn nonce() -> Result<[u8; NONCE_LEN], HandshakeError> {
    let mut out = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut out).map_err(|_| {
        HandshakeError::Frame(FrameError::Io(std::io::Error::other(
            "the system random number generator failed",
        )))
    })?;
    Ok(out)
}

/// Sends the refusal that `err` calls for, best effort: the error is what matters.
async fn refuse<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    me: &PeerIdentity,
    err: HandshakeError,
) -> HandshakeError {
    if let Some((kind, reason)) = err.refusal(&me.node) {
        let _ = writer.send(&Body::Refused { reason, kind }).await;
    }
    err
}

fn unexpected(expected: &'static str, got: &Body) -> HandshakeError {
    match got {
        Body::Refused { reason, kind } => HandshakeError::RefusedByPeer {
            kind: *kind,
            reason: reason.clone(),
        },
        other => HandshakeError::Unexpected {
            expected,
            got: other.name(),
        },
    }
}

/// The client's half. `expected_peer` is the node name configured for the address dialled;
/// `offered` is the highest protocol version offered ([`PROTOCOL_VERSION`] but in tests).
pub(crate) async fn client<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    me: &PeerIdentity,
    expected_peer: &str,
    binding: &[u8],
    offered: u16,
    purpose: Purpose,
) -> Result<(Agreed, Welcome), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let client_nonce = nonce()?;
    writer
        .send(&Body::Hello {
            protocol: offered,
            cluster: me.cluster.clone(),
            node: me.node.clone(),
            nonce: client_nonce,
            purpose,
        })
        .await?;

    let (protocol, cluster, node, server_nonce, proof) = match reader.recv_required().await? {
        Body::Challenge {
            protocol,
            cluster,
            node,
            nonce,
            proof,
        } => (protocol, cluster, node, nonce, proof),
        other => return Err(unexpected("Challenge", &other)),
    };
    let transcript = Transcript {
        cluster: &me.cluster,
        client_node: &me.node,
        server_node: &node,
        client_nonce: &client_nonce,
        server_nonce: &server_nonce,
        protocol,
        binding,
    };
    let check = if !(MIN_PROTOCOL_VERSION..=offered.min(PROTOCOL_VERSION)).contains(&protocol) {
        Err(HandshakeError::UnsupportedProtocol { theirs: protocol })
    } else if cluster != me.cluster {
        Err(HandshakeError::ClusterMismatch {
            ours: me.cluster.clone(),
            theirs: cluster,
        })
    } else if node != expected_peer {
        Err(HandshakeError::WrongPeer {
            expected: expected_peer.to_owned(),
            actual: node.clone(),
        })
    } else if !transcript.verify(me.secret.key(), SERVER_LABEL, &proof) {
        Err(HandshakeError::AuthenticationFailed { peer: node.clone() })
    } else {
        Ok(())
    };
    if let Err(err) = check {
        return Err(refuse(writer, me, err).await);
    }

    writer
        .send(&Body::Proof {
            proof: transcript.sign(me.secret.key(), CLIENT_LABEL),
        })
        .await?;
    match reader.recv_required().await? {
        Body::Welcome(welcome) => Ok((
            Agreed {
                peer: node,
                protocol,
                purpose,
            },
            welcome,
        )),
        other => Err(unexpected("Welcome", &other)),
    }
}

/// The server's half. `known_nodes` is `[cluster] nodes`; this node's own name in it is not a
/// valid peer.
pub(crate) async fn server<R, W, S>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    me: &PeerIdentity,
    known_nodes: &[String],
    binding: &[u8],
    resume: &S,
) -> Result<(Agreed, Welcome), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: ResumeSource + ?Sized,
{
    let (offered, cluster, node, client_nonce, purpose) = match reader.recv_required().await? {
        Body::Hello {
            protocol,
            cluster,
            node,
            nonce,
            purpose,
        } => (protocol, cluster, node, nonce, purpose),
        other => return Err(refuse(writer, me, unexpected("Hello", &other)).await),
    };
    let check = if offered < MIN_PROTOCOL_VERSION {
        Err(HandshakeError::UnsupportedProtocol { theirs: offered })
    } else if cluster != me.cluster {
        Err(HandshakeError::ClusterMismatch {
            ours: me.cluster.clone(),
            theirs: cluster,
        })
    } else if node == me.node || !known_nodes.contains(&node) {
        Err(HandshakeError::UnknownNode { node: node.clone() })
    } else if purpose == Purpose::Unknown {
        Err(HandshakeError::UnsupportedProtocol { theirs: offered })
    } else {
        Ok(())
    };
    if let Err(err) = check {
        return Err(refuse(writer, me, err).await);
    }

    let protocol = offered.min(PROTOCOL_VERSION);
    let server_nonce = nonce()?;
    let transcript = Transcript {
        cluster: &me.cluster,
        client_node: &node,
        server_node: &me.node,
        client_nonce: &client_nonce,
        server_nonce: &server_nonce,
        protocol,
        binding,
    };
    writer
        .send(&Body::Challenge {
            protocol,
            cluster: me.cluster.clone(),
            node: me.node.clone(),
            nonce: server_nonce,
            proof: transcript.sign(me.secret.key(), SERVER_LABEL),
        })
        .await?;

    let proof = match reader.recv_required().await? {
        Body::Proof { proof } => proof,
        other => return Err(refuse(writer, me, unexpected("Proof", &other)).await),
    };
    if !transcript.verify(me.secret.key(), CLIENT_LABEL, &proof) {
        return Err(refuse(
            writer,
            me,
            HandshakeError::AuthenticationFailed { peer: node },
        )
        .await);
    }

    let resume_from = match resume.resume_from(&node).await {
        Ok(lsn) => lsn,
        Err(e) => {
            let err = HandshakeError::Unavailable {
                node,
                message: e.to_string(),
            };
            return Err(refuse(writer, me, err).await);
        }
    };
    let welcome = Welcome { resume_from };
    writer.send(&Body::Welcome(welcome)).await?;
    Ok((
        Agreed {
            peer: node,
            protocol,
            purpose,
        },
        welcome,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_a_pre_created_label() {
        let io = || std::io::Error::other("x");
        let mut errors = vec![
            HandshakeError::AuthenticationFailed { peer: "b".into() },
            HandshakeError::UnknownNode { node: "z".into() },
            HandshakeError::ClusterMismatch {
                ours: "x".into(),
                theirs: "y".into(),
            },
            HandshakeError::UnsupportedProtocol { theirs: 0 },
            HandshakeError::WrongPeer {
                expected: "b".into(),
                actual: "c".into(),
            },
            HandshakeError::Unexpected {
                expected: "Hello",
                got: "Ack",
            },
            HandshakeError::Unavailable {
                node: "b".into(),
                message: "down".into(),
            },
            HandshakeError::Tls(io()),
            HandshakeError::Timeout(std::time::Duration::from_secs(1)),
            HandshakeError::TooManyHandshakes(4),
            HandshakeError::Frame(FrameError::Io(io())),
            HandshakeError::Frame(FrameError::Closed),
            HandshakeError::Frame(FrameError::UnexpectedEof),
            HandshakeError::Frame(FrameError::Malformed("x".into())),
            HandshakeError::Frame(FrameError::TooLarge { len: None, max: 1 }),
        ];
        for kind in [
            RefusalKind::Authentication,
            RefusalKind::UnknownNode,
            RefusalKind::Cluster,
            RefusalKind::Protocol,
            RefusalKind::WrongPeer,
            RefusalKind::ProtocolViolation,
            RefusalKind::Unavailable,
            RefusalKind::Other,
        ] {
            errors.push(HandshakeError::RefusedByPeer {
                kind,
                reason: String::new(),
            });
        }
        for err in &errors {
            assert!(LABELS.contains(&err.label()), "{err:?}");
        }
        // A refusal we send is counted by the peer under the same label as ours.
        for err in &errors {
            if let Some((kind, _)) = err.refusal("a") {
                assert_eq!(kind_label(kind), err.label(), "{err:?}");
            }
        }
    }

    /// The largest handshake messages a legitimate peer can send, built from the longest
    /// names the config accepts, fit [`HANDSHAKE_MAX_FRAME_BYTES`] with room to spare.
    #[test]
    fn handshake_frame_limit_fits_every_handshake_message() {
        use crate::replication::peer::frame::{encode_envelope, HANDSHAKE_MAX_FRAME_BYTES};
        // Node names are [a-z0-9_], at most 58 bytes; a cluster name is any text up to 255
        // bytes, and a control character is the worst case for the `{:?}` in refusal reasons.
        let node = "n".repeat(58);
        let other = "m".repeat(58);
        use crate::config::MAX_CLUSTER_NAME_BYTES;
        let cluster = "\u{1f}".repeat(MAX_CLUSTER_NAME_BYTES);
        let other_cluster = "\u{1e}".repeat(MAX_CLUSTER_NAME_BYTES);
        let mut bodies = vec![
            Body::Hello {
                protocol: u16::MAX,
                cluster: cluster.clone(),
                node: node.clone(),
                nonce: [0xff; NONCE_LEN],
                purpose: Purpose::Request,
            },
            Body::Challenge {
                protocol: u16::MAX,
                cluster: cluster.clone(),
                node: node.clone(),
                nonce: [0xff; NONCE_LEN],
                proof: vec![0xff; 32],
            },
            Body::Proof {
                proof: vec![0xff; 32],
            },
            Body::Welcome(Welcome {
                resume_from: u64::MAX,
            }),
        ];
        for err in [
            HandshakeError::AuthenticationFailed {
                peer: other.clone(),
            },
            HandshakeError::UnknownNode {
                node: other.clone(),
            },
            HandshakeError::ClusterMismatch {
                ours: cluster.clone(),
                theirs: other_cluster.clone(),
            },
            HandshakeError::UnsupportedProtocol { theirs: u16::MAX },
            HandshakeError::WrongPeer {
                expected: other.clone(),
                actual: other.clone(),
            },
            HandshakeError::Unexpected {
                expected: "Challenge",
                got: "Transaction",
            },
            HandshakeError::Unavailable {
                node: other.clone(),
                message: "x".repeat(100_000),
            },
        ] {
            let (kind, reason) = err.refusal(&node).expect("a refusal");
            bodies.push(Body::Refused { reason, kind });
        }
        let largest = bodies
            .iter()
            .map(|b| encode_envelope(b).unwrap().len())
            .max()
            .unwrap();
        // What the limit's doc comment says: about 3.3 KiB, at most half the limit.
        assert!(largest > 3000, "{largest}");
        assert!(largest <= HANDSHAKE_MAX_FRAME_BYTES / 2, "{largest}");
    }

    #[test]
    fn transcripts_differ_by_role_and_by_every_field() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef");
        let base = Transcript {
            cluster: "c",
            client_node: "a",
            server_node: "b",
            client_nonce: &[1; NONCE_LEN],
            server_nonce: &[2; NONCE_LEN],
            protocol: 1,
            binding: b"",
        };
        let server_proof = base.sign(&key, SERVER_LABEL);
        assert!(base.verify(&key, SERVER_LABEL, &server_proof));
        // A server proof never passes as a client proof (no reflection).
        assert!(!base.verify(&key, CLIENT_LABEL, &server_proof));
        // Moving a byte between adjacent names changes the transcript.
        let shifted = Transcript {
            client_node: "ab",
            server_node: "",
            ..base
        };
        assert!(!shifted.verify(&key, SERVER_LABEL, &server_proof));
        let other_protocol = Transcript {
            protocol: 2,
            ..base
        };
        assert!(!other_protocol.verify(&key, SERVER_LABEL, &server_proof));
        let other_session = Transcript {
            binding: b"tls",
            ..base
        };
        assert!(!other_session.verify(&key, SERVER_LABEL, &server_proof));
    }
}
