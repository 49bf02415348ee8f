//! One client session: the startup negotiation, then a 1:1 relay to one backend connection.
//!
//! The relay forwards bytes as they arrive and never re-encodes a message. Client-to-server it
//! stops at message boundaries only for Query and Parse (to classify and, when this node does
//! not own the written table, replace them; see [`crate::frontdoor::refusal`]); server-to-client it is a
//! copy that tracks boundaries so the refusal filter can engage mid-stream. The two directions
//! run concurrently in one task, so neither can block the other (a pipelining client and a
//! server streaming results never deadlock), and a session costs one task and two buffers.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::FrontDoor;
use crate::frontdoor::classify::{self, Classification, QueryKind};
use crate::frontdoor::ownership::BoundCheck;
use crate::frontdoor::refusal::{self, Pending, ResponseFilter};
use crate::frontdoor::wire::{self, Header, StartupRequest, WireError};
use crate::pg::SqlState;

/// Why a session ended abnormally.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("client: {0}")]
    Client(WireError),
    #[error("server: {0}")]
    Server(WireError),
    #[error("cannot reach the local Postgres at {addr}: {source}")]
    Backend { addr: String, source: io::Error },
    #[error("client did not complete start-up within {0:?}")]
    StartupTimeout(std::time::Duration),
}

impl SqlState for SessionError {
    /// SQLSTATE reported to the client where it can still be told.
    fn sqlstate(&self) -> &str {
        match self {
            SessionError::Client(e) | SessionError::Server(e) => e.sqlstate(),
            SessionError::Backend { .. } => "08006",
            SessionError::StartupTimeout(_) => "08P01",
        }
    }
}

impl SessionError {
    /// Label of `pgmm_client_protocol_errors_total{reason}`: what the client did wrong;
    /// `None` when the client is not to blame (a reset connection, an unreachable backend).
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            SessionError::Client(w) => w.reason(),
            SessionError::StartupTimeout(_) => Some("startup_timeout"),
            SessionError::Server(_) | SessionError::Backend { .. } => None,
        }
    }
}

/// Read buffer size per direction; the buffer only grows past it for a Query or Parse longer
/// than that, and shrinks back afterwards.
const BUF_SIZE: usize = 8 * 1024;

/// Serves one accepted client connection to its end, logging why it ended.
pub async fn run(door: Arc<FrontDoor>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let open = OpenSession::count(&door.metrics.client_connections);
    let result = negotiate(&door, stream).await;
    drop(open);
    match result {
        Ok(()) | Err(SessionError::Client(WireError::ClosedBeforeStartup)) => {
            tracing::debug!(%peer, "session closed")
        }
        Err(SessionError::Client(WireError::Io(e)) | SessionError::Server(WireError::Io(e))) => {
            tracing::debug!(%peer, error = %e, "session ended by I/O error")
        }
        Err(e) => {
            let reason = e.reason();
            if let Some(reason) = reason {
                door.metrics
                    .protocol_errors
                    .with_label_values(&[reason])
                    .inc();
            }
            // A scanner or a broken client can open thousands of connections: one line per
            // reason and interval, saying how many it stands for; the metric counts them all.
            let reason = reason.unwrap_or("session");
            if let Some(suppressed) = door.bad_client_log.admit(reason) {
                tracing::warn!(%peer, reason, error = %e, suppressed, "closing client connection (suppressed: like closes since the last line for this reason)");
            }
        }
    }
}

/// One open session in `pgmm_client_connections`, taken back when the session ends however it
/// ends: a panic in a session task unwinds through this too, so the gauge cannot drift.
struct OpenSession<'a>(&'a prometheus::IntGauge);

impl<'a> OpenSession<'a> {
    fn count(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        OpenSession(gauge)
    }
}

impl Drop for OpenSession<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the client asked for once the optional TLS negotiation is over.
enum Opening {
    Tls,
    Startup(Bytes),
    Cancel(Bytes),
}

async fn negotiate(door: &FrontDoor, mut tcp: TcpStream) -> Result<(), SessionError> {
    let first = with_startup_timeout(door, opening(&mut tcp, door.tls.is_some())).await?;
    match first {
        Opening::Startup(packet) => {
            let (r, w) = tcp.split();
            relay(door, r, w, packet).await
        }
        Opening::Cancel(packet) => cancel(door, packet).await,
        Opening::Tls => {
            let acceptor = door.tls.as_ref().expect("TLS offered only when configured");
            tcp.write_all(b"S")
                .await
                .map_err(|e| SessionError::Client(e.into()))?;
            let mut tls = with_startup_timeout(door, async {
                acceptor
                    .accept(tcp)
                    .await
                    .map_err(|e| SessionError::Client(WireError::Tls(e.to_string())))
            })
            .await?;
            match with_startup_timeout(door, opening(&mut tls, false)).await? {
                Opening::Startup(packet) => {
                    let (r, w) = tokio::io::split(tls);
                    relay(door, r, w, packet).await
                }
                Opening::Cancel(packet) => cancel(door, packet).await,
                Opening::Tls => unreachable!("TLS is not offered twice"),
            }
        }
    }
}

async fn with_startup_timeout<T>(
    door: &FrontDoor,
    fut: impl std::future::Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    tokio::time::timeout(door.startup_timeout, fut)
        .await
        .map_err(|_| SessionError::StartupTimeout(door.startup_timeout))?
}

/// Answers SSLRequest and GSSENCRequest until the client sends what opens the session.
async fn opening<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    offer_tls: bool,
) -> Result<Opening, SessionError> {
    let client_err = |e: io::Error| SessionError::Client(e.into());
    loop {
        let request = match wire::read_startup(stream).await {
            Ok(r) => r,
            Err(e) => {
                if e.reason() == Some("startup_packet") {
                    let msg = wire::error_response(e.sqlstate(), &e.to_string());
                    let _ = stream.write_all(&msg).await;
                    let _ = stream.flush().await;
                }
                return Err(SessionError::Client(e));
            }
        };
        match request {
            StartupRequest::Ssl if offer_tls => return Ok(Opening::Tls),
            StartupRequest::Ssl | StartupRequest::GssEnc => {
                stream.write_all(b"N").await.map_err(client_err)?;
                stream.flush().await.map_err(client_err)?;
            }
            StartupRequest::Cancel(packet) => return Ok(Opening::Cancel(packet)),
            StartupRequest::Startup(packet) => return Ok(Opening::Startup(packet)),
        }
    }
}

/// Forwards a CancelRequest: the key in it is the real backend's (BackendKeyData is relayed
/// unchanged), so Postgres itself decides whether it matches.
async fn cancel(door: &FrontDoor, packet: Bytes) -> Result<(), SessionError> {
    let mut backend = door
        .backend
        .connect()
        .await
        .map_err(|source| SessionError::Backend {
            addr: door.backend.to_string(),
            source,
        })?;
    backend
        .write_all(&packet)
        .await
        .map_err(|e| SessionError::Server(e.into()))?;
    // Postgres closes the connection without answering; wait for that so the cancel is
    // delivered before the client's next step.
    let mut sink = [0u8; 1];
    let _ = backend.read(&mut sink).await;
    Ok(())
}

async fn relay<CR, CW>(
    door: &FrontDoor,
    client_r: CR,
    mut client_w: CW,
    startup: Bytes,
) -> Result<(), SessionError>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let mut backend = match door.backend.connect().await {
        Ok(b) => b,
        Err(source) => {
            let err = SessionError::Backend {
                addr: door.backend.to_string(),
                source,
            };
            let msg = wire::error_response(err.sqlstate(), &format!("pgmm: {err}"));
            let _ = client_w.write_all(&msg).await;
            let _ = client_w.flush().await;
            return Err(err);
        }
    };
    backend
        .write_all(&startup)
        .await
        .map_err(|e| SessionError::Server(e.into()))?;
    pipe(door, client_r, client_w, backend).await
}

/// The two relay loops of an established session, over any pair of streams (sockets in
/// production, in-memory pipes with a scripted backend in the tests).
async fn pipe<CR, CW, B>(
    door: &FrontDoor,
    client_r: CR,
    client_w: CW,
    backend: B,
) -> Result<(), SessionError>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite,
{
    let (server_r, server_w) = tokio::io::split(backend);
    let pending = Pending::default();
    let up = client_to_server(door, client_r, server_w, &pending);
    let down = server_to_client(server_r, client_w, &pending);
    // Either side ending ends the session: the other socket is dropped, which Postgres and
    // the client both see as the connection closing.
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

/// Relays client messages, inspecting Query and Parse.
async fn client_to_server<R, W>(
    door: &FrontDoor,
    mut r: R,
    mut w: W,
    pending: &Pending,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let client = SessionError::Client;
    let mut buf = BytesMut::with_capacity(BUF_SIZE);
    let mut out = BytesMut::new();
    // Bytes of a streamed message still to come, and whether they are dropped.
    let mut stream_rest = 0usize;
    let mut stream_drop = false;
    // After a refused Parse, the client's messages up to Sync are skipped, as Postgres would.
    let mut skipping_to_sync = false;
    let mut terminated = false;
    // Messages sent that each end in one ReadyForQuery; start-up ends in one too.
    let mut cycles_sent: u64 = 1;
    // Prepared INSERTs whose bound parameters name a row's owner, by statement name: their
    // Binds are inspected. Empty unless the config has row ownership rules and the client
    // prepared such a statement, so other sessions never buffer a Bind.
    let mut bound: HashMap<String, Arc<[BoundCheck]>> = HashMap::new();
    loop {
        if !read_more(&mut r, &mut buf, stream_rest > 0)
            .await
            .map_err(client)?
        {
            return Ok(());
        }
        let len = buf.len();
        let mut pos = 0usize;
        let mut run_start = 0usize;
        // Whether `out` replaces `buf[..run_start]` (something was replaced or dropped).
        let mut modified = false;
        while pos < len {
            if stream_rest > 0 {
                let n = stream_rest.min(len - pos);
                pos += n;
                stream_rest -= n;
                if stream_drop {
                    run_start = pos;
                }
                continue;
            }
            let Some(h) = Header::parse(&buf[pos..]).map_err(client)? else {
                break;
            };
            let total = h.total();
            let complete = len - pos >= total;
            if skipping_to_sync && !matches!(h.kind, b'S' | b'H') {
                modified = true;
                out.extend_from_slice(&buf[run_start..pos]);
                if complete {
                    pos += total;
                } else {
                    stream_rest = total - (len - pos);
                    stream_drop = true;
                    pos = len;
                }
                run_start = pos;
                continue;
            }
            match h.kind {
                b'Q' | b'P' if !complete => {
                    // Wait for the whole statement; grow the buffer towards it in steps so a
                    // lying length field cannot make pgmm allocate a gigabyte up front.
                    buf.reserve((total - (len - pos)).min(1 << 20));
                    break;
                }
                b'Q' | b'P' => {
                    let body = &buf[pos + 5..pos + total];
                    let inspected = inspect(door, h.kind, body).await;
                    if let Some(refusal) = inspected.refusal {
                        modified = true;
                        out.extend_from_slice(&buf[run_start..pos]);
                        let sql = refusal::raise_sql("42501", &refusal);
                        let extended = h.kind == b'P';
                        pending.push(refusal, extended, cycles_sent);
                        if extended {
                            refusal::extended_replacement(&sql, &mut out);
                            skipping_to_sync = true;
                            if let Some((name, _)) = wire::parse_text(body) {
                                bound.remove(name);
                            }
                        } else {
                            refusal::simple_replacement(&sql, &mut out);
                            cycles_sent += 1;
                        }
                        pos += total;
                        run_start = pos;
                    } else {
                        if h.kind == b'Q' {
                            cycles_sent += 1;
                        } else if door.ownership.has_row_rules() {
                            track_bound(door, body, inspected.class.as_deref(), &mut bound);
                        }
                        pos += total;
                    }
                }
                b'B' if !bound.is_empty() && !complete => {
                    buf.reserve((total - (len - pos)).min(1 << 20));
                    break;
                }
                b'B' if !bound.is_empty() => {
                    let body = &buf[pos + 5..pos + total];
                    if let Some(refusal) = inspect_bind(door, &bound, body) {
                        // As for a refused Parse: Postgres raises the refusal in the Bind's
                        // place, and the client's messages up to Sync are skipped.
                        modified = true;
                        out.extend_from_slice(&buf[run_start..pos]);
                        let sql = refusal::raise_sql("42501", &refusal);
                        pending.push(refusal, true, cycles_sent);
                        refusal::extended_replacement(&sql, &mut out);
                        skipping_to_sync = true;
                        pos += total;
                        run_start = pos;
                    } else {
                        pos += total;
                    }
                }
                b'C' if !bound.is_empty() && complete => {
                    if let Some(name) = wire::closed_statement(&buf[pos + 5..pos + total]) {
                        bound.remove(name);
                    }
                    pos += total;
                }
                kind => {
                    match kind {
                        b'S' => {
                            skipping_to_sync = false;
                            cycles_sent += 1;
                        }
                        b'F' => cycles_sent += 1,
                        b'X' => terminated = true,
                        _ => {}
                    }
                    if complete {
                        pos += total;
                    } else {
                        stream_rest = total - (len - pos);
                        stream_drop = false;
                        pos = len;
                    }
                }
            }
        }
        let pass = Pass {
            pos,
            run_start,
            modified,
        };
        emit(&mut w, &mut buf, &mut out, pass)
            .await
            .map_err(SessionError::Server)?;
        if terminated {
            return Ok(());
        }
    }
}

/// Remembers (or forgets) the owner parameters of the statement a Parse prepares, given its
/// classification when it may write a table owned elsewhere and was parsed.
fn track_bound(
    door: &FrontDoor,
    body: &[u8],
    class: Option<&Classification>,
    bound: &mut HashMap<String, Arc<[BoundCheck]>>,
) {
    let Some((name, _)) = wire::parse_text(body) else {
        return;
    };
    let checks = class.map_or_else(Vec::new, |c| door.ownership.bound_checks(c));
    if checks.is_empty() {
        bound.remove(name);
    } else {
        bound.insert(name.to_owned(), checks.into());
    }
}

/// The refusal of a Bind whose parameters insert a row another node owns, if it does.
fn inspect_bind(
    door: &FrontDoor,
    bound: &HashMap<String, Arc<[BoundCheck]>>,
    body: &[u8],
) -> Option<String> {
    let (statement, params) = wire::bind_params(body)?;
    let checks = bound.get(statement)?;
    let e = door.ownership.check_bound(checks, &params).err()?;
    Some(refused(door, e))
}

/// Counts and logs a front-door refusal; returns its message.
fn refused(door: &FrontDoor, e: crate::frontdoor::ownership::OwnershipError) -> String {
    door.metrics
        .ownership_rejections
        .with_label_values(&[&e.table().to_string()])
        .inc();
    door.refusals.record();
    tracing::debug!(error = %e, sqlstate = e.sqlstate(), "write refused at the front door");
    e.to_string()
}

fn count(door: &FrontDoor, kind: QueryKind) {
    door.metrics.query(kind).inc();
    if kind == QueryKind::Ddl {
        door.ddl_seen.notify_one();
    }
}

/// What inspecting a Query or Parse found.
#[derive(Default)]
struct Inspected {
    /// The refusal message, if this node may not run the statement.
    refusal: Option<String>,
    /// The classification, when the statement may write a table owned elsewhere and was parsed.
    class: Option<Arc<Classification>>,
}

/// Classifies a Query or Parse and finds whether this node may run it.
async fn inspect(door: &FrontDoor, kind: u8, body: &[u8]) -> Inspected {
    let sql = if kind == b'Q' {
        wire::query_text(body)
    } else {
        wire::parse_text(body).map(|(_, sql)| sql)
    };
    let Some(sql) = sql else {
        return Inspected::default();
    };
    // Past the size limit nothing else is worth scanning for: the statement goes unparsed.
    if sql.len() > door.max_parse_bytes {
        return unparsed(door, sql, "size");
    }
    // A statement that cannot name a table owned elsewhere needs no table list: its first
    // keyword is enough for the metric, and the parse (the front door's main CPU cost for
    // simple-protocol clients, whose texts rarely repeat) is skipped.
    let may_write_foreign = door.ownership.may_write_foreign(sql);
    if !may_write_foreign {
        if let Some(kind) = classify::quick_kind(sql) {
            count(door, kind);
            return Inspected::default();
        }
    }
    let Some(class) = parse(door, sql).await else {
        return unparsed(door, sql, "depth");
    };
    count(door, class.kind);
    if !may_write_foreign {
        return Inspected::default();
    }
    let refusal = if class.written.is_empty() {
        None
    } else {
        door.ownership.check(&class).err().map(|e| refused(door, e))
    };
    Inspected {
        refusal,
        class: Some(class),
    }
}

/// Statements up to this long are parsed on the relay thread (a cache hit, or well under a
/// millisecond); longer ones on tokio's blocking pool, so that a parse taking long (seconds for
/// a megabyte of select items) holds up only its own session.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// Parses `sql` (no longer than `max_parse_bytes`); `None` when it nests past the recursion
/// limit. Any text is safe to parse on any thread: [`Classification::with_depth`] runs on a
/// stack sized for the text.
async fn parse(door: &FrontDoor, sql: &str) -> Option<Arc<Classification>> {
    let class = if sql.len() <= INLINE_PARSE_BYTES {
        door.classifier.classify(sql)
    } else {
        // Longer than the classifier caches anyway. The semaphore is never closed.
        let permit = Arc::clone(&door.large_parses).acquire_owned().await.ok();
        let sql = sql.to_owned();
        let max_depth = door.classifier.max_depth();
        let parsed = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            Classification::with_depth(&sql, max_depth)
        })
        .await;
        match parsed {
            Ok(class) => Arc::new(class),
            Err(e) => {
                tracing::warn!(error = %e, "statement parse failed; forwarding it unparsed");
                return None;
            }
        }
    };
    (!class.too_deep).then_some(class)
}

/// Counts a statement forwarded without a parse, classifying it by its first keyword.
fn unparsed(door: &FrontDoor, sql: &str, reason: &str) -> Inspected {
    door.metrics.unparsed.with_label_values(&[reason]).inc();
    count(door, classify::first_keyword_kind(sql));
    Inspected::default()
}

/// Relays server messages; only while a refusal is pending does it look at them one by one.
async fn server_to_client<R, W>(mut r: R, mut w: W, pending: &Pending) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let server = SessionError::Server;
    let mut buf = BytesMut::with_capacity(BUF_SIZE);
    let mut out = BytesMut::new();
    let mut filter = ResponseFilter::default();
    let mut stream_rest = 0usize;
    loop {
        if !read_more(&mut r, &mut buf, stream_rest > 0)
            .await
            .map_err(server)?
        {
            return Ok(());
        }
        let len = buf.len();
        let mut pos = 0usize;
        let mut run_start = 0usize;
        // Whether `out` replaces `buf[..run_start]` (something was replaced or dropped).
        let mut modified = false;
        while pos < len {
            if stream_rest > 0 {
                let n = stream_rest.min(len - pos);
                pos += n;
                stream_rest -= n;
                continue;
            }
            let Some(h) = Header::parse(&buf[pos..]).map_err(server)? else {
                break;
            };
            let total = h.total();
            let complete = len - pos >= total;
            if pending.is_empty() && filter.is_idle() {
                filter.passed(h.kind);
                if complete {
                    pos += total;
                } else {
                    stream_rest = total - (len - pos);
                    pos = len;
                }
                continue;
            }
            modified = true;
            out.extend_from_slice(&buf[run_start..pos]);
            if complete {
                filter.message(pending, &buf[pos..pos + total], &mut out);
                pos += total;
            } else if ResponseFilter::needs_whole(h.kind) {
                buf.reserve((total - (len - pos)).min(1 << 20));
                run_start = pos;
                break;
            } else {
                filter.release(&mut out);
                out.extend_from_slice(&buf[pos..len]);
                stream_rest = total - (len - pos);
                pos = len;
            }
            run_start = pos;
        }
        let pass = Pass {
            pos,
            run_start,
            modified,
        };
        emit(&mut w, &mut buf, &mut out, pass)
            .await
            .map_err(SessionError::Client)?;
    }
}

/// Reads more of a stream into `buf`; `Ok(false)` at a clean end, between messages.
async fn read_more<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    mid_message: bool,
) -> Result<bool, WireError> {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(BUF_SIZE);
    }
    if r.read_buf(buf).await? == 0 {
        if mid_message || !buf.is_empty() {
            return Err(WireError::UnexpectedEof);
        }
        return Ok(false);
    }
    Ok(true)
}

/// The outcome of one pass over a read buffer: `buf[..pos]` is handled; when `modified`, `out`
/// holds the rewritten form of `buf[..run_start]` and `buf[run_start..pos]` follows unchanged.
struct Pass {
    pos: usize,
    run_start: usize,
    modified: bool,
}

/// Writes what a pass produced (the bytes as they came whenever nothing was rewritten, the
/// common case) and consumes them from `buf`, shrinking it back after an oversized message.
async fn emit<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    pass: Pass,
) -> Result<(), WireError> {
    if pass.modified {
        out.extend_from_slice(&buf[pass.run_start..pass.pos]);
        w.write_all(out).await?;
        out.clear();
    } else {
        w.write_all(&buf[..pass.pos]).await?;
    }
    w.flush().await?;
    buf.advance(pass.pos);
    if buf.is_empty() && buf.capacity() > 4 * BUF_SIZE {
        *buf = BytesMut::with_capacity(BUF_SIZE);
    }
    Ok(())
}

/// The relay driven over in-memory pipes: a scripted backend on one end, a client on the other,
/// no Postgres and no sockets. What the integration tests show end to end, these pin down byte
/// for byte: what is forwarded unchanged, and what a refusal replaces.
#[cfg(test)]
mod relay_tests {
    use std::path::Path;
    use std::time::Duration;

    use prometheus::Registry;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::config::Config;
    use crate::frontdoor::metrics::FrontDoorMetrics;

    const CONFIG: &str = r#"[node]
name = "a"
[cluster]
name = "test"
nodes = ["a", "b"]
[client]
listen = "127.0.0.1:6432"
[postgres]
url = "postgres://postgres@127.0.0.1:5432/postgres"
[[ownership]]
table = "public.owned_by_b"
owner = "b"
"#;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn query(sql: &str) -> Vec<u8> {
        message(b'Q', format!("{sql}\0").as_bytes())
    }

    /// A session relaying between a client pipe and a backend pipe; returns the far ends.
    fn session() -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<()>) {
        let config = Config::parse(CONFIG, Path::new("test.toml")).expect("test config");
        let metrics = FrontDoorMetrics::register(&Registry::new()).expect("metrics");
        let door = Arc::new(FrontDoor::from_config(&config, metrics).expect("front door"));
        let (client, client_end) = duplex(64 * 1024);
        let (backend, backend_end) = duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let (r, w) = tokio::io::split(client_end);
            let _ = pipe(&door, r, w, backend_end).await;
        });
        (client, backend, task)
    }

    /// Reads exactly `n` bytes, failing the test instead of hanging it.
    async fn read_n(s: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .expect("bytes within 5 s")
            .expect("read");
        buf
    }

    /// One typed message from `s`.
    async fn read_message(s: &mut DuplexStream) -> (u8, Vec<u8>) {
        let head = read_n(s, 5).await;
        let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        (head[0], read_n(s, len - 4).await)
    }

    #[tokio::test]
    async fn statements_and_answers_cross_unchanged() {
        let (mut client, mut backend, _task) = session();
        let mut sent = query("select 1");
        // A pipeline of the extended protocol in the same write: Parse, Bind, Execute, Sync.
        sent.extend(message(b'P', b"s1\0select $1::int\0\0\0"));
        sent.extend(message(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x0142\0\0"));
        sent.extend(message(b'E', b"\0\0\0\0\0"));
        sent.extend(message(b'S', b""));
        client.write_all(&sent).await.unwrap();
        assert_eq!(read_n(&mut backend, sent.len()).await, sent);

        let mut answer = message(
            b'T',
            b"\0\x01?column?\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        );
        answer.extend(message(b'D', b"\0\x01\0\0\0\x011"));
        answer.extend(message(b'C', b"SELECT 1\0"));
        answer.extend(message(b'Z', b"I"));
        // Split mid-header, as a socket may deliver it.
        backend.write_all(&answer[..3]).await.unwrap();
        backend.write_all(&answer[3..]).await.unwrap();
        assert_eq!(read_n(&mut client, answer.len()).await, answer);
    }

    #[tokio::test]
    async fn a_write_this_node_does_not_own_never_reaches_the_backend() {
        let (mut client, mut backend, _task) = session();
        client
            .write_all(&query("insert into owned_by_b values (1)"))
            .await
            .unwrap();
        let (kind, body) = read_message(&mut backend).await;
        assert_eq!(kind, b'Q');
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("insert"), "the insert was forwarded: {text}");
        assert!(
            text.contains("42501") && text.contains("owned by node"),
            "{text}"
        );

        // Postgres raises the refusal; its error and ReadyForQuery reach the client as sent.
        let mut answer = wire::error_response(
            "42501",
            "table \"public.owned_by_b\" is owned by node \"b\"",
        )
        .to_vec();
        answer.extend(message(b'Z', b"I"));
        backend.write_all(&answer).await.unwrap();
        let (kind, body) = read_message(&mut client).await;
        assert_eq!(kind, b'E');
        assert_eq!(wire::error_fields(&body).0, Some("42501"));
        assert_eq!(read_message(&mut client).await, (b'Z', b"I".to_vec()));

        // The session goes on: the next statement is forwarded as it is.
        let next = query("select 2");
        client.write_all(&next).await.unwrap();
        assert_eq!(read_n(&mut backend, next.len()).await, next);
    }

    #[tokio::test]
    async fn either_side_closing_ends_the_session() {
        let (client, mut backend, task) = session();
        drop(client);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), backend.read_to_end(&mut rest))
            .await
            .expect("the backend side closes")
            .unwrap();
        assert!(rest.is_empty());
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the session ends")
            .unwrap();
    }
}
