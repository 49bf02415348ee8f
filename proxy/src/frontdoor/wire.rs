//! Framing of the Postgres wire protocol, as far as a relay needs it.
//!
//! pgmm relays bytes; it does not decode rows. It only needs to know where messages start and
//! end (to find Query and Parse, and to notice a malformed stream early), and to read the
//! untyped packets that open a connection. The limits are Postgres's own, so that pgmm refuses
//! exactly what Postgres would refuse and never buffers more than Postgres would accept.

use bytes::{Bytes, BytesMut};
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::Message as _;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::pg::SqlState;

/// Largest message Postgres accepts (`PQ_LARGE_MESSAGE_LIMIT`, 1 GiB - 1), length field included.
pub const MAX_MESSAGE_LEN: usize = 0x3fff_ffff;
/// Largest startup packet Postgres accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Protocol major version 3, the only one Postgres still speaks; the minor (3.0, 3.2 since
/// PostgreSQL 18) is negotiated by the server.
const PROTOCOL_MAJOR_3: u32 = 3;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// A CancelRequest is length, code, process id and the secret key: 4 bytes in protocol 3.0,
/// up to 256 bytes from 3.2 on (`MAX_CANCEL_KEY_LENGTH`), so the packet is 13 to 268 bytes.
const CANCEL_MIN_LEN: usize = 13;
const CANCEL_MAX_LEN: usize = 12 + 256;

/// Why a connection's byte stream could not be framed. Each variant is a label of
/// `pgmm_client_protocol_errors_total{reason}`, so operators can tell scanners from bugs.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("invalid startup packet: {0}")]
    StartupPacket(String),
    #[error("invalid message length {len} for message type {kind:?}")]
    MessageLength { kind: char, len: u32 },
    #[error("connection closed in the middle of a message")]
    UnexpectedEof,
    /// Closed before sending a byte: port probes and health checks, not an error.
    #[error("connection closed before start-up")]
    ClosedBeforeStartup,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// Metric label; `None` for plain I/O errors (a reset connection is not a protocol error).
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            WireError::StartupPacket(_) => Some("startup_packet"),
            WireError::MessageLength { .. } => Some("message_length"),
            WireError::UnexpectedEof => Some("unexpected_eof"),
            WireError::Tls(_) => Some("tls"),
            WireError::Io(_) | WireError::ClosedBeforeStartup => None,
        }
    }
}

impl SqlState for WireError {
    /// protocol_violation, as Postgres answers malformed input.
    fn sqlstate(&self) -> &str {
        "08P01"
    }
}

/// The first packet of a connection, which carries no type byte.
#[derive(Debug)]
pub enum StartupRequest {
    Ssl,
    GssEnc,
    /// The packet (length, code, pid, secret key of 4 bytes, or up to 256 from protocol 3.2
    /// on), forwarded as is.
    Cancel(Bytes),
    /// The whole startup packet, length included, to be relayed unchanged.
    Startup(Bytes),
}

/// Reads exactly one startup-phase packet: never more, because after an SSLRequest the next
/// bytes belong to the TLS handshake and must not have been buffered in clear.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<StartupRequest, WireError> {
    let mut head = [0u8; 8];
    let first = r.read(&mut head[..4]).await?;
    if first == 0 {
        return Err(WireError::ClosedBeforeStartup);
    }
    read_exact_or_eof(r, &mut head[first..4]).await?;
    let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(WireError::StartupPacket(format!("length {len}")));
    }
    read_exact_or_eof(r, &mut head[4..]).await?;
    let code = u32::from_be_bytes(head[4..].try_into().expect("4 bytes"));
    let mut packet = BytesMut::with_capacity(len);
    packet.extend_from_slice(&head);
    packet.resize(len, 0);
    read_exact_or_eof(r, &mut packet[8..]).await?;
    match (code, len) {
        (SSL_REQUEST, 8) => Ok(StartupRequest::Ssl),
        (GSSENC_REQUEST, 8) => Ok(StartupRequest::GssEnc),
        (CANCEL_REQUEST, CANCEL_MIN_LEN..=CANCEL_MAX_LEN) => {
            Ok(StartupRequest::Cancel(packet.freeze()))
        }
        // Any 3.x: the minor version and `_pq_.` options are Postgres's to negotiate. It answers
        // a minor it does not speak, or an option it does not know, with NegotiateProtocolVersion
        // and goes on, and pgmm relays that answer like any other: the client and the server
        // agree on a version, and the relay (which only frames messages) speaks all of them.
        _ if code >> 16 == PROTOCOL_MAJOR_3 => {
            if packet.last() != Some(&0) {
                return Err(WireError::StartupPacket(
                    "parameters not NUL-terminated".into(),
                ));
            }
            Ok(StartupRequest::Startup(packet.freeze()))
        }
        (SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST, _) => Err(WireError::StartupPacket(
            format!("length {len} for request code {code}"),
        )),
        _ => Err(WireError::StartupPacket(format!(
            "unsupported frontend protocol {}.{}: pgmm and the server support 3.x",
            code >> 16,
            code & 0xffff
        ))),
    }
}

async fn read_exact_or_eof<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), WireError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::UnexpectedEof),
        Err(e) => Err(e.into()),
    }
}

/// Header of a typed message: the type byte and the length field (which counts itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub len: u32,
}

impl Header {
    /// Bytes the whole message occupies on the wire.
    pub fn total(&self) -> usize {
        1 + self.len as usize
    }

    /// Reads a header from the first 5 bytes of `buf`, validating the length as Postgres does.
    pub fn parse(buf: &[u8]) -> Result<Option<Header>, WireError> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let kind = buf[0];
        let len = u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes"));
        if len < 4 || len as usize > MAX_MESSAGE_LEN {
            return Err(WireError::MessageLength {
                kind: kind as char,
                len,
            });
        }
        Ok(Some(Header { kind, len }))
    }
}

/// Tracks message boundaries across reads of a byte stream that is relayed as it arrives,
/// without holding whole messages: only the up-to-5 header bytes that straddle two reads.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct BoundaryTracker {
    /// Bytes of the current message still to come.
    remaining: usize,
    partial: [u8; 5],
    partial_len: usize,
}

#[cfg(test)]
impl BoundaryTracker {
    /// Consumes `chunk`, calling `on_header` for every message that starts in it.
    pub fn feed(
        &mut self,
        mut chunk: &[u8],
        mut on_header: impl FnMut(Header),
    ) -> Result<(), WireError> {
        loop {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len());
                self.remaining -= n;
                chunk = &chunk[n..];
            }
            if chunk.is_empty() {
                return Ok(());
            }
            let need = 5 - self.partial_len;
            let n = need.min(chunk.len());
            self.partial[self.partial_len..self.partial_len + n].copy_from_slice(&chunk[..n]);
            self.partial_len += n;
            chunk = &chunk[n..];
            if self.partial_len < 5 {
                return Ok(());
            }
            let header = Header::parse(&self.partial)?.expect("5 bytes present");
            self.partial_len = 0;
            self.remaining = header.len as usize - 4;
            on_header(header);
        }
    }

    /// True when the stream is between messages.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.partial_len == 0
    }
}

/// The NUL-terminated string at the start of `body`, without copying.
pub fn cstr(body: &[u8]) -> Option<(&str, &[u8])> {
    let end = body.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&body[..end]).ok()?;
    Some((s, &body[end + 1..]))
}

/// The SQL text of a Query message body.
pub fn query_text(body: &[u8]) -> Option<&str> {
    cstr(body).map(|(s, _)| s)
}

/// Statement name and SQL text of a Parse message body.
pub fn parse_text(body: &[u8]) -> Option<(&str, &str)> {
    let (name, rest) = cstr(body)?;
    let (sql, _) = cstr(rest)?;
    Some((name, sql))
}

/// One parameter of a Bind: its bytes (`None` for NULL) and whether they are binary.
pub type BoundParam<'a> = (Option<&'a [u8]>, bool);

/// The statement a Bind message binds, and its parameters: each value's bytes (`None` for
/// NULL) with whether it is in binary format. `None` for a malformed body (Postgres will say so).
pub fn bind_params(body: &[u8]) -> Option<(&str, Vec<BoundParam<'_>>)> {
    fn split<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if rest.len() < n {
            return None;
        }
        let (head, tail) = rest.split_at(n);
        *rest = tail;
        Some(head)
    }
    fn int16(rest: &mut &[u8]) -> Option<i16> {
        split(rest, 2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    let (_portal, rest) = cstr(body)?;
    let (statement, mut rest) = cstr(rest)?;
    let formats_n = int16(&mut rest)?.max(0) as usize;
    let mut formats = Vec::with_capacity(formats_n);
    for _ in 0..formats_n {
        formats.push(int16(&mut rest)? == 1);
    }
    let params_n = int16(&mut rest)?.max(0) as usize;
    let mut params = Vec::with_capacity(params_n);
    for i in 0..params_n {
        let len = i32::from_be_bytes(split(&mut rest, 4)?.try_into().ok()?);
        // One format code applies to every parameter; none means text.
        let binary = match formats.len() {
            0 => false,
            1 => formats[0],
            _ => *formats.get(i)?,
        };
        let value = if len < 0 {
            None
        } else {
            Some(split(&mut rest, len as usize)?)
        };
        params.push((value, binary));
    }
    Some((statement, params))
}

/// The statement a Close message closes (`None` for a portal or a malformed body).
pub fn closed_statement(body: &[u8]) -> Option<&str> {
    let (&kind, rest) = body.split_first()?;
    (kind == b'S').then(|| cstr(rest).map(|(s, _)| s)).flatten()
}

/// An ErrorResponse as Postgres would send it, for errors pgmm raises itself.
pub fn error_response(sqlstate: &str, message: &str) -> BytesMut {
    let fields = vec![
        (b'S', "FATAL".to_string()),
        (b'V', "FATAL".to_string()),
        (b'C', sqlstate.to_string()),
        (b'M', message.to_string()),
    ];
    let mut buf = BytesMut::new();
    ErrorResponse::new(fields)
        .encode(&mut buf)
        .expect("encoding into memory cannot fail");
    buf
}

/// SQLSTATE and message of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (Option<&str>, Option<&str>) {
    let (mut code, mut message) = (None, None);
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let Some((value, tail)) = cstr(tail) else {
            break;
        };
        match kind {
            b'C' => code = Some(value),
            b'M' => message = Some(value),
            _ => {}
        }
        rest = tail;
    }
    (code, message)
}

/// Rebuilds an ErrorResponse body without the fields that point into PL/pgSQL internals
/// (context, source file, line, routine): a refusal pgmm raises through Postgres should
/// read like one pgmm raised itself.
pub fn strip_error_internals(body: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.extend_from_slice(&[b'E', 0, 0, 0, 0]);
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let Some(end) = tail.iter().position(|&b| b == 0) else {
            break;
        };
        if !matches!(kind, b'W' | b'F' | b'L' | b'R') {
            out.extend_from_slice(&rest[..end + 2]);
        }
        rest = &tail[end + 1..];
    }
    out.extend_from_slice(&[0]);
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn startup_kinds() {
        let mut ssl: &[u8] = &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert!(matches!(
            read_startup(&mut ssl).await,
            Ok(StartupRequest::Ssl)
        ));
        let mut zero: &[u8] = &[0, 0, 0, 0];
        assert_eq!(
            read_startup(&mut zero).await.unwrap_err().reason(),
            Some("startup_packet")
        );
        let mut garbage: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(
            read_startup(&mut garbage).await.unwrap_err().reason(),
            Some("startup_packet")
        );
        let mut short: &[u8] = &[0, 0, 0, 9, 0, 3, 0, 0];
        assert_eq!(
            read_startup(&mut short).await.unwrap_err().reason(),
            Some("unexpected_eof")
        );
        let mut good = vec![0, 0, 0, 0, 0, 3, 0, 0];
        good.extend_from_slice(b"user\0u\0\0");
        let len = good.len() as u32;
        good[..4].copy_from_slice(&len.to_be_bytes());
        let mut slice: &[u8] = &good;
        match read_startup(&mut slice).await.unwrap() {
            StartupRequest::Startup(p) => assert_eq!(&p[..], &good[..]),
            other => panic!("{other:?}"),
        }
    }

    fn startup_packet(code: u32) -> Vec<u8> {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(b"user\0u\0_pq_.some_option\0x\0\0");
        let len = p.len() as u32;
        p[..4].copy_from_slice(&len.to_be_bytes());
        p
    }

    /// Every 3.x minor, with `_pq_.` options, goes to the server, which negotiates it (as
    /// libpq 18 asks for 3.2); another major is refused as Postgres refuses it.
    #[tokio::test]
    async fn protocol_minor_versions_are_left_to_the_server() {
        for minor in [0u32, 1, 2, 9999] {
            let packet = startup_packet((3 << 16) | minor);
            let mut slice: &[u8] = &packet;
            match read_startup(&mut slice).await.unwrap() {
                StartupRequest::Startup(p) => assert_eq!(&p[..], &packet[..], "3.{minor}"),
                other => panic!("3.{minor}: {other:?}"),
            }
        }
        let packet = startup_packet(2 << 16);
        let err = read_startup(&mut &packet[..]).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("unsupported frontend protocol 2.0"),
            "{err}"
        );
    }

    /// Protocol 3.2 cancel keys are up to 256 bytes; 3.0's are 4.
    #[tokio::test]
    async fn cancel_requests_carry_keys_of_any_permitted_length() {
        for key_len in [4usize, 32, 256] {
            let mut p = ((12 + key_len) as u32).to_be_bytes().to_vec();
            p.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
            p.extend_from_slice(&1234u32.to_be_bytes());
            p.extend(std::iter::repeat_n(7u8, key_len));
            match read_startup(&mut &p[..]).await.unwrap() {
                StartupRequest::Cancel(c) => assert_eq!(&c[..], &p[..]),
                other => panic!("key of {key_len}: {other:?}"),
            }
        }
        for len in [12u32, 12 + 257] {
            let mut p = len.to_be_bytes().to_vec();
            p.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
            p.resize(len as usize, 0);
            let err = read_startup(&mut &p[..]).await.unwrap_err();
            assert_eq!(err.reason(), Some("startup_packet"), "length {len}");
        }
    }

    #[test]
    fn tracker_follows_split_headers() {
        let mut stream = msg(b'1', b"");
        stream.extend(msg(b'D', b"hello world"));
        stream.extend(msg(b'Z', b"I"));
        for split in 0..stream.len() {
            let mut t = BoundaryTracker::default();
            let mut seen = Vec::new();
            t.feed(&stream[..split], |h| seen.push(h.kind)).unwrap();
            t.feed(&stream[split..], |h| seen.push(h.kind)).unwrap();
            assert_eq!(seen, b"1DZ", "split at {split}");
            assert!(t.at_boundary());
        }
    }

    #[test]
    fn tracker_rejects_bad_lengths() {
        let mut t = BoundaryTracker::default();
        let err = t.feed(&[b'Q', 0, 0, 0, 3], |_| {}).unwrap_err();
        assert_eq!(err.reason(), Some("message_length"));
        let err = Header::parse(&[b'Q', 0x40, 0, 0, 0]).unwrap_err();
        assert_eq!(err.reason(), Some("message_length"));
    }

    #[test]
    fn error_fields_and_strip() {
        let body = b"SERROR\0C42501\0Mno\0WPL/pgSQL function\0Fpl_exec.c\0L1\0RX\0\0";
        assert_eq!(error_fields(body), (Some("42501"), Some("no")));
        let stripped = strip_error_internals(body);
        assert_eq!(&stripped[..], &msg(b'E', b"SERROR\0C42501\0Mno\0\0")[..]);
    }

    #[test]
    fn texts() {
        assert_eq!(query_text(b"select 1\0"), Some("select 1"));
        assert_eq!(parse_text(b"s1\0insert\0\0\0"), Some(("s1", "insert")));
        assert_eq!(parse_text(b"s1"), None);
    }

    #[test]
    fn bind_bodies_yield_their_statement_and_parameters() {
        // portal "", statement "s1", formats [1], params ["ab", NULL], results [].
        let mut body = b"\0s1\0".to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"ab");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        let (statement, params) = bind_params(&body).unwrap();
        assert_eq!(statement, "s1");
        assert_eq!(params, [(Some(b"ab".as_slice()), true), (None, true)]);
        // Truncated anywhere: no answer rather than a wrong one.
        for cut in 0..body.len() - 2 {
            assert!(bind_params(&body[..cut]).is_none(), "cut at {cut}");
        }
        assert_eq!(closed_statement(b"Ss1\0"), Some("s1"));
        assert_eq!(closed_statement(b"Pp1\0"), None);
    }
}
