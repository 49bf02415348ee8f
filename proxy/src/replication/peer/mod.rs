//! The peer link: an authenticated, framed connection between two pgmm nodes.
//!
//! One node dials (`connect`, for each `[[peers]]` entry) and the other accepts (`accept`, on
//! `[peer] listen`); after the handshake both get a [`PeerConnection`] that carries [`Body`]
//! messages both ways. Transport is TCP, optionally mutual TLS ([`PeerTls`]); authentication is
//! always the shared-secret challenge-response of `handshake.rs`, with or without TLS, so a
//! node's identity never rests on which CA-signed certificate it happens to hold.
//!
//! Without TLS the handshake still authenticates both nodes and never exposes the secret, but
//! the frames after it are neither encrypted nor integrity-protected: an active attacker on the
//! path could alter or inject them. Plain TCP is for trusted networks; elsewhere, set the
//! `[peer] tls_*` files.
//!
//! What flows after the handshake (transactions, acks, heartbeats) and what it means is the
//! replication layer's business; this module only moves whole messages.
//!
//! Failures of the handshake are logged with their reason on the node that sees them and
//! counted in `pgmm_peer_handshake_failures_total{reason}`; failing to reach the peer at all
//! (connection refused) is not a handshake failure and is left to the caller's [`Backoff`].
//!
//! What an unauthenticated connection can cost the accepting node is bounded: it reads frames
//! of at most [`HANDSHAKE_MAX_FRAME_BYTES`] until the handshake has verified the peer's proof
//! (then [`MAX_FRAME_BYTES`]), gets [`HANDSHAKE_TIMEOUT`] to finish, and at most
//! `[peer] max_pending_handshakes` handshakes run at once ([`HandshakeLimit`]); a connection
//! over that cap is closed as soon as it is accepted.

mod backoff;
mod frame;
mod handshake;
mod tls;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use ring::hmac;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use backoff::{Backoff, BACKOFF_BASE};
pub use frame::{
    Body, BucketHash, FrameError, Member, Purpose, RefusalKind, RowHash, SequenceValue, Welcome,
    HANDSHAKE_MAX_FRAME_BYTES, MAX_FRAME_BYTES,
};
pub use handshake::{
    HandshakeError, ResumeSource, CHUNKED_PROTOCOL_VERSION, DDL_PROTOCOL_VERSION,
    MEMBER_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use tls::{ClientTls, PeerTls, PeerTlsError, ServerTls};

use crate::config::Config;
use crate::observe::MetricsError;
use crate::pg::SqlState;
use frame::{FrameReader, FrameWriter};

/// How long a connection may take from TCP connect (or accept) to the end of the handshake. A
/// peer that connects and stays silent must not hold an accept task forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Shortest secret accepted: any TCP client can obtain one server proof and guess offline, so
/// the secret must not be guessable (see `handshake.rs`).
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, Error)]
pub enum PeerError {
    #[error("peer secret{}: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Secret {
        path: Option<PathBuf>,
        message: String,
    },
    #[error(
        "this node has no [peer] section: add one with listen and secret_file to link to peers"
    )]
    NotConfigured,
    #[error("cannot connect to peer {peer:?} at {addr}: {source}")]
    Connect {
        peer: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("peer handshake with {who}: {source}")]
    Handshake {
        /// The node name when known, else the remote address.
        who: String,
        #[source]
        source: HandshakeError,
    },
    #[error(transparent)]
    Tls(#[from] PeerTlsError),
}

impl SqlState for PeerError {
    fn sqlstate(&self) -> &str {
        match self {
            // config_file_error
            PeerError::Secret { .. } | PeerError::NotConfigured => "F0000",
            // sqlclient_unable_to_establish_sqlconnection
            PeerError::Connect { .. } => "08001",
            PeerError::Handshake { source, .. } => source.sqlstate(),
            PeerError::Tls(e) => e.sqlstate(),
        }
    }
}

/// The shared secret of a cluster, as an HMAC key. It is only ever used as a key: never
/// formatted, serialized or sent.
#[derive(Clone)]
pub struct Secret {
    key: hmac::Key,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Refuses a secret shorter than [`MIN_SECRET_LEN`] bytes.
    #[cfg(test)]
    pub fn new(bytes: &[u8]) -> Result<Secret, PeerError> {
        Self::checked(bytes, None)
    }

    /// Reads `[peer] secret_file`. One trailing newline (what an editor or `echo` adds) is not
    /// part of the secret.
    pub fn from_file(path: &Path) -> Result<Secret, PeerError> {
        let bytes = std::fs::read(path).map_err(|e| PeerError::Secret {
            path: Some(path.to_path_buf()),
            message: e.to_string(),
        })?;
        warn_if_readable_by_others(path);
        let bytes = bytes
            .strip_suffix(b"\n")
            .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
            .unwrap_or(&bytes);
        Self::checked(bytes, Some(path))
    }

    fn checked(bytes: &[u8], path: Option<&Path>) -> Result<Secret, PeerError> {
        let err = |message: String| PeerError::Secret {
            path: path.map(Path::to_path_buf),
            message,
        };
        if bytes.is_empty() {
            return Err(err("the secret is empty".into()));
        }
        if bytes.len() < MIN_SECRET_LEN {
            return Err(err(format!(
                "the secret is {} bytes, shorter than the minimum of {MIN_SECRET_LEN}; \
                 generate one with e.g. `openssl rand -hex 32`",
                bytes.len()
            )));
        }
        Ok(Secret {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }

    pub(crate) fn key(&self) -> &hmac::Key {
        &self.key
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the peer secret file is accessible to group or others; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// Who this node is on the peer link.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub cluster: String,
    pub node: String,
    pub secret: Secret,
}

impl PeerIdentity {
    /// From `[cluster] name`, `[node] name` and `[peer] secret_file`.
    pub fn from_config(config: &Config) -> Result<PeerIdentity, PeerError> {
        let peer = config.peer.as_ref().ok_or(PeerError::NotConfigured)?;
        Ok(PeerIdentity {
            cluster: config.cluster.name.clone(),
            node: config.node.name.clone(),
            secret: Secret::from_file(&peer.secret_file)?,
        })
    }
}

/// The peer link's metrics.
#[derive(Clone)]
pub struct PeerMetrics {
    handshake_failures: IntCounterVec,
    handshakes_in_progress: IntGauge,
}

impl PeerMetrics {
    pub fn register(registry: &Registry) -> Result<PeerMetrics, MetricsError> {
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "pgmm_peer_handshake_failures_total",
                "Peer link handshakes that failed on this node, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(handshake_failures.clone()))?;
        // Every series exists from the start, so a dashboard's rate() sees the first failure.
        for label in handshake::LABELS {
            handshake_failures.with_label_values(&[label]);
        }
        let handshakes_in_progress = IntGauge::new(
            "pgmm_peer_handshakes_in_progress",
            "Accepted peer connections whose handshake is running (at most [peer] max_pending_handshakes).",
        )?;
        registry.register(Box::new(handshakes_in_progress.clone()))?;
        Ok(PeerMetrics {
            handshake_failures,
            handshakes_in_progress,
        })
    }

    /// Accepted connections whose handshake is running now.
    #[cfg(test)]
    pub fn handshakes_in_progress(&self) -> i64 {
        self.handshakes_in_progress.get()
    }

    /// The current count for one `reason`.
    #[cfg(test)]
    pub fn handshake_failures(&self, reason: &str) -> u64 {
        self.handshake_failures.with_label_values(&[reason]).get()
    }

    fn count(&self, err: &HandshakeError) {
        self.handshake_failures
            .with_label_values(&[err.label()])
            .inc();
    }
}

/// The cap on handshakes running at once on the accepting side (`[peer] max_pending_handshakes`).
///
/// A connection over the cap is closed at once rather than made to wait: waiting would keep its
/// socket and task alive anyway (what the cap is for is bounding those), and a legitimate peer
/// refused this way retries on its [`Backoff`], by which time the burst has usually cleared
/// (each pending handshake ends within [`HANDSHAKE_TIMEOUT`]). It is counted as
/// `too_many_handshakes`; the peer sees the connection closed.
#[derive(Clone)]
pub struct HandshakeLimit {
    permits: Arc<Semaphore>,
    max: usize,
    metrics: PeerMetrics,
}

/// One running handshake's share of a [`HandshakeLimit`]; dropping it frees the slot.
pub struct HandshakePermit {
    _permit: OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl HandshakeLimit {
    /// At most `max` (at least 1) handshakes at once, counted in `metrics`.
    pub fn new(max: usize, metrics: &PeerMetrics) -> HandshakeLimit {
        let max = max.max(1);
        HandshakeLimit {
            permits: Arc::new(Semaphore::new(max)),
            max,
            metrics: metrics.clone(),
        }
    }

    /// A slot for the handshake of a connection just accepted from `remote`, or `None` when
    /// all are taken: then the refusal has been counted and the caller drops the connection.
    pub fn try_acquire(&self, remote: Option<std::net::SocketAddr>) -> Option<HandshakePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                self.metrics.handshakes_in_progress.inc();
                Some(HandshakePermit {
                    _permit: permit,
                    gauge: self.metrics.handshakes_in_progress.clone(),
                })
            }
            Err(_) => {
                let err = HandshakeError::TooManyHandshakes(self.max);
                self.metrics.count(&err);
                // Debug, not warn: a flood of these would otherwise flood the log too; the
                // counter is what an operator watches.
                tracing::debug!(
                    remote = ?remote,
                    reason = err.label(),
                    error = %err,
                    "peer connection refused"
                );
                None
            }
        }
    }
}

/// A plain or TLS stream, erased so that the rest of the link has one type.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type BoxIo = Box<dyn Io>;

/// An established, authenticated link to one peer node.
pub struct PeerConnection {
    sender: PeerSender,
    receiver: PeerReceiver,
    /// The version both ends agreed on: whether transactions may travel in chunks (2).
    protocol: u16,
    /// What the caller opened the link for.
    purpose: Purpose,
}

/// The sending half of a [`PeerConnection`].
pub struct PeerSender {
    #[cfg(test)]
    peer: String,
    writer: FrameWriter<WriteHalf<BoxIo>>,
}

/// The receiving half of a [`PeerConnection`].
pub struct PeerReceiver {
    reader: FrameReader<ReadHalf<BoxIo>>,
}

impl PeerConnection {
    /// Takes over the handshake's reader and writer as they are: the reader may already hold
    /// the peer's first messages after the handshake.
    fn new(
        reader: FrameReader<ReadHalf<BoxIo>>,
        writer: FrameWriter<WriteHalf<BoxIo>>,
        agreed: handshake::Agreed,
    ) -> Self {
        let handshake::Agreed {
            peer,
            protocol,
            purpose,
        } = agreed;
        tracing::debug!(%peer, protocol, ?purpose, "peer link authenticated");
        PeerConnection {
            sender: PeerSender {
                #[cfg(test)]
                peer,
                writer,
            },
            receiver: PeerReceiver { reader },
            protocol,
            purpose,
        }
    }

    /// What the caller opened the link for.
    pub fn purpose(&self) -> Purpose {
        self.purpose
    }

    /// The peer's node name, as authenticated by the handshake.
    #[cfg(test)]
    pub fn peer(&self) -> &str {
        &self.sender.peer
    }

    /// The protocol version both ends agreed on.
    pub fn protocol(&self) -> u16 {
        self.protocol
    }

    pub async fn send(&mut self, body: &Body) -> Result<(), FrameError> {
        self.sender.send(body).await
    }

    /// Sends a membership message.
    pub async fn send_member(&mut self, m: Member) -> Result<(), FrameError> {
        self.sender.send(&Body::Member(m)).await
    }

    /// The next membership message; a `Refused` is the other side's error, heartbeats are
    /// skipped, anything else is a protocol violation.
    pub async fn recv_member(&mut self) -> Result<Member, MemberError> {
        loop {
            match self.receiver.recv().await? {
                Some(Body::Member(m)) => return Ok(m),
                Some(Body::Heartbeat { .. }) => continue,
                Some(Body::Refused { reason, .. }) => return Err(MemberError::Refused(reason)),
                Some(other) => return Err(MemberError::Unexpected(other.name())),
                None => return Err(MemberError::Frame(FrameError::Closed)),
            }
        }
    }

    #[cfg(test)]
    pub async fn recv(&mut self) -> Result<Option<Body>, FrameError> {
        self.receiver.recv().await
    }

    /// Separate halves, so one task can stream transactions while another reads acks.
    pub fn into_split(self) -> (PeerSender, PeerReceiver) {
        (self.sender, self.receiver)
    }
}

impl PeerSender {
    /// Encodes `body` for the next [`PeerSender::flush`]. A message larger than
    /// [`MAX_FRAME_BYTES`] is refused here ([`FrameError::TooLarge`]) and nothing is queued.
    pub fn queue(&mut self, body: &Body) -> Result<(), FrameError> {
        self.writer.queue(body)
    }

    /// Writes every queued message. Not cancel-safe: drop the link if a flush is cancelled.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        self.writer.flush().await
    }

    pub async fn send(&mut self, body: &Body) -> Result<(), FrameError> {
        self.writer.send(body).await
    }

    /// Flushes and closes our direction of the link.
    pub async fn shutdown(&mut self) -> Result<(), FrameError> {
        self.writer.shutdown().await
    }
}

impl PeerReceiver {
    /// The next message, `None` once the peer closed the link cleanly. Cancel-safe. After an
    /// error other than [`FrameError::UnknownMessage`], drop the link.
    pub async fn recv(&mut self) -> Result<Option<Body>, FrameError> {
        self.reader.recv().await
    }
}

/// Dials `addr`, where node `expected_peer` should listen, and runs the client handshake.
/// Returns the link and the position from which the peer wants our changes.
pub async fn connect(
    addr: &str,
    me: &PeerIdentity,
    expected_peer: &str,
    tls: Option<&ClientTls>,
    metrics: &PeerMetrics,
) -> Result<(PeerConnection, Welcome), PeerError> {
    connect_with(
        addr,
        me,
        expected_peer,
        tls,
        metrics,
        Dial::new(Purpose::Replicate),
    )
    .await
}

/// Dials `addr` for a membership request ([`Purpose::Request`]); refuses a peer too old to
/// answer one.
pub async fn connect_for_request(
    addr: &str,
    me: &PeerIdentity,
    expected_peer: &str,
    tls: Option<&ClientTls>,
    metrics: &PeerMetrics,
) -> Result<PeerConnection, MemberError> {
    let (conn, _) = connect_with(
        addr,
        me,
        expected_peer,
        tls,
        metrics,
        Dial::new(Purpose::Request),
    )
    .await?;
    if conn.protocol() < MEMBER_PROTOCOL_VERSION {
        return Err(MemberError::TooOld {
            peer: expected_peer.to_owned(),
            protocol: conn.protocol(),
        });
    }
    Ok(conn)
}

/// Why a membership exchange failed.
#[derive(Debug, Error)]
pub enum MemberError {
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("protocol violation: unexpected {0} message")]
    Unexpected(&'static str),
    #[error(
        "node {peer} speaks peer protocol {protocol}, which has no membership requests \
         (version {MEMBER_PROTOCOL_VERSION} does): upgrade pgmm on {peer} first"
    )]
    TooOld { peer: String, protocol: u16 },
}

impl SqlState for MemberError {
    fn sqlstate(&self) -> &str {
        match self {
            MemberError::Peer(e) => e.sqlstate(),
            MemberError::Frame(e) => e.sqlstate(),
            MemberError::Refused(_) => "55000",
            MemberError::Unexpected(_) => "08P01",
            MemberError::TooOld { .. } => "0A000",
        }
    }
}

/// What answers the links opened with [`Purpose::Request`]; the replication layer only hands
/// them over (the membership layer implements it, so the dependency points one way).
pub trait RequestHandler: Send + Sync {
    fn handle(
        &self,
        conn: PeerConnection,
        peer: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

/// How a link is dialled: what for, the protocol offered (tests offer others) and how long the
/// connect and the handshake may take.
struct Dial {
    purpose: Purpose,
    protocol: u16,
    timeout: Duration,
}

impl Dial {
    fn new(purpose: Purpose) -> Dial {
        Dial {
            purpose,
            protocol: PROTOCOL_VERSION,
            timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

async fn connect_with(
    addr: &str,
    me: &PeerIdentity,
    expected_peer: &str,
    tls: Option<&ClientTls>,
    metrics: &PeerMetrics,
    dial: Dial,
) -> Result<(PeerConnection, Welcome), PeerError> {
    let Dial {
        purpose,
        protocol: offered_protocol,
        timeout,
    } = dial;
    let connect_err = |source| PeerError::Connect {
        peer: expected_peer.to_owned(),
        addr: addr.to_owned(),
        source,
    };
    // Resolve the TLS name before dialling: a bad address is a configuration error.
    let server_name = tls.map(|_| tls::server_name(addr)).transpose()?;
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
        .map_err(connect_err)?;
    // Frames are flushed whole; Nagle would only add latency to acks and heartbeats.
    let _ = tcp.set_nodelay(true);

    let handshake = async {
        let (io, binding): (BoxIo, Vec<u8>) = match (tls, server_name) {
            (Some(tls), Some(name)) => {
                let stream = tls
                    .connector()
                    .connect(name, tcp)
                    .await
                    .map_err(HandshakeError::Tls)?;
                let binding = stream
                    .get_ref()
                    .1
                    .export_keying_material([0u8; tls::EXPORTER_LEN], tls::EXPORTER_LABEL, None)
                    .map_err(|e| HandshakeError::Tls(std::io::Error::other(e)))?;
                (Box::new(stream), binding.to_vec())
            }
            _ => (Box::new(tcp), Vec::new()),
        };
        let (rd, wr) = tokio::io::split(io);
        // The server is not authenticated until its Challenge verified: until then it gets no
        // more than the accepting side gives us.
        let mut reader = FrameReader::new(rd, HANDSHAKE_MAX_FRAME_BYTES);
        let mut writer = FrameWriter::new(wr, MAX_FRAME_BYTES);
        let (agreed, welcome) = handshake::client(
            &mut reader,
            &mut writer,
            me,
            expected_peer,
            &binding,
            offered_protocol,
            purpose,
        )
        .await?;
        reader.set_max_frame(MAX_FRAME_BYTES);
        Ok::<_, HandshakeError>((reader, writer, agreed, welcome))
    };
    let result = match tokio::time::timeout(timeout, handshake).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    };
    match result {
        Ok((reader, writer, agreed, welcome)) => {
            tracing::info!(
                peer = %agreed.peer,
                %addr,
                protocol = agreed.protocol,
                resume_from = welcome.resume_from,
                tls = tls.is_some(),
                "peer link established"
            );
            Ok((PeerConnection::new(reader, writer, agreed), welcome))
        }
        Err(source) => {
            metrics.count(&source);
            tracing::warn!(
                peer = %expected_peer,
                %addr,
                reason = source.label(),
                error = %source,
                "peer handshake failed"
            );
            Err(PeerError::Handshake {
                who: format!("node {expected_peer:?} at {addr}"),
                source,
            })
        }
    }
}

/// Runs the server handshake on an accepted connection. `known_nodes` is `[cluster] nodes`;
/// `resume` says from which LSN we want the connecting node's changes. Returns the link and
/// the peer's node name.
pub async fn accept<S>(
    stream: TcpStream,
    me: &PeerIdentity,
    known_nodes: &[String],
    tls: Option<&ServerTls>,
    metrics: &PeerMetrics,
    resume: &S,
) -> Result<(PeerConnection, String), PeerError>
where
    S: ResumeSource + ?Sized,
{
    accept_with(
        stream,
        me,
        known_nodes,
        tls,
        metrics,
        resume,
        HANDSHAKE_TIMEOUT,
    )
    .await
}

async fn accept_with<S>(
    stream: TcpStream,
    me: &PeerIdentity,
    known_nodes: &[String],
    tls: Option<&ServerTls>,
    metrics: &PeerMetrics,
    resume: &S,
    timeout: Duration,
) -> Result<(PeerConnection, String), PeerError>
where
    S: ResumeSource + ?Sized,
{
    let remote = stream
        .peer_addr()
        .map_or_else(|_| "an unknown address".to_owned(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    let handshake = async {
        let (io, binding): (BoxIo, Vec<u8>) = match tls {
            Some(tls) => {
                let stream = tls
                    .acceptor()
                    .accept(stream)
                    .await
                    .map_err(HandshakeError::Tls)?;
                let binding = stream
                    .get_ref()
                    .1
                    .export_keying_material([0u8; tls::EXPORTER_LEN], tls::EXPORTER_LABEL, None)
                    .map_err(|e| HandshakeError::Tls(std::io::Error::other(e)))?;
                (Box::new(stream), binding.to_vec())
            }
            None => (Box::new(stream), Vec::new()),
        };
        let (rd, wr) = tokio::io::split(io);
        // Anyone can connect: until the client's proof verified, it may not make us buffer
        // more than a handshake message.
        let mut reader = FrameReader::new(rd, HANDSHAKE_MAX_FRAME_BYTES);
        let mut writer = FrameWriter::new(wr, MAX_FRAME_BYTES);
        let (agreed, welcome) =
            handshake::server(&mut reader, &mut writer, me, known_nodes, &binding, resume).await?;
        reader.set_max_frame(MAX_FRAME_BYTES);
        Ok::<_, HandshakeError>((reader, writer, agreed, welcome))
    };
    let result = match tokio::time::timeout(timeout, handshake).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    };
    match result {
        Ok((reader, writer, agreed, welcome)) => {
            tracing::info!(
                peer = %agreed.peer,
                %remote,
                protocol = agreed.protocol,
                resume_from = welcome.resume_from,
                tls = tls.is_some(),
                "peer link accepted"
            );
            let peer = agreed.peer.clone();
            Ok((PeerConnection::new(reader, writer, agreed), peer))
        }
        Err(source) => {
            metrics.count(&source);
            tracing::warn!(
                %remote,
                reason = source.label(),
                error = %source,
                "peer handshake refused"
            );
            Err(PeerError::Handshake {
                who: remote,
                source,
            })
        }
    }
}
