//! Just enough of the frontend side of the Postgres wire protocol to write deliberately broken clients
//! on plain blocking sockets.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Protocol 3.0 StartupMessage for `user` on `db`.
pub fn startup_message(user: &str, db: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// SSLRequest (80877103) or GSSENCRequest (80877104).
pub fn special_request(code: u32) -> Vec<u8> {
    let mut msg = 8u32.to_be_bytes().to_vec();
    msg.extend_from_slice(&code.to_be_bytes());
    msg
}

pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;

/// A tagged frontend message (`Q` with `"select 1\0"`, ...).
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![tag];
    msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(body);
    msg
}

/// A simple-protocol Query message.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// Connects with a read timeout so that a server that never answers fails the test instead of hanging it.
pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set read timeout");
    s
}

/// Reads one backend message: `Ok(None)` on a clean EOF before its first byte.
pub fn read_message(s: &mut TcpStream) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match s.read(&mut head[..1])? {
        0 => return Ok(None),
        _ => s.read_exact(&mut head[1..])?,
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=(1 << 30)).contains(&len) {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("backend message {:?} with length {len}", head[0] as char),
        ));
    }
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body)?;
    Ok(Some((head[0], body)))
}

/// After a StartupMessage for a trust-authenticated user: reads up to ReadyForQuery, panicking on an
/// ErrorResponse or an authentication request that needs a password.
pub fn read_until_ready(s: &mut TcpStream) {
    loop {
        match read_message(s).expect("read during startup") {
            None => panic!("connection closed during startup"),
            Some((b'Z', _)) => return,
            Some((b'E', body)) => panic!("startup refused: {:?}", error_fields(&body)),
            Some((b'R', body)) if body[..4] != [0, 0, 0, 0] => {
                panic!("server wants authentication type {:?}", &body[..4])
            }
            Some(_) => {}
        }
    }
}

/// The fields of an ErrorResponse/NoticeResponse body as (code, text), e.g. ('C', "42501").
pub fn error_fields(body: &[u8]) -> Vec<(char, String)> {
    body.split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0] as char, String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

/// How a connection ended, as seen by [`read_until_closed`].
#[derive(Debug)]
pub struct Closed {
    /// Messages received before the end (ErrorResponse and the like).
    pub messages: Vec<(u8, Vec<u8>)>,
}

/// Reads until the server closes the connection (EOF or reset); panics if it is still open after
/// `timeout`, since that means the server kept a connection it should have dropped.
pub fn read_until_closed(s: &mut TcpStream, timeout: Duration) -> Closed {
    let deadline = Instant::now() + timeout;
    let mut messages = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            panic!("server kept the connection open for {timeout:?}; received {messages:?}");
        }
        s.set_read_timeout(Some(left)).expect("set read timeout");
        match read_message(s) {
            Ok(Some(m)) => messages.push(m),
            Ok(None) => return Closed { messages },
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("server kept the connection open for {timeout:?}; received {messages:?}")
            }
            // A reset ends the connection as surely as an EOF does.
            Err(_) => return Closed { messages },
        }
    }
}

/// Sends bytes, tolerating a server that already closed the connection (that is often the point).
pub fn send(s: &mut TcpStream, bytes: &[u8]) {
    let _ = s.write_all(bytes);
    let _ = s.flush();
}

/// Parse of `sql` into the statement `name`, with no parameter types given.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    body.extend_from_slice(&0u16.to_be_bytes());
    message(b'P', &body)
}

/// Bind of the parameterless `statement` to `portal`, text results.
pub fn bind(portal: &str, statement: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(portal.as_bytes());
    body.push(0);
    body.extend_from_slice(statement.as_bytes());
    body.push(0);
    body.extend_from_slice(&0u16.to_be_bytes()); // parameter formats
    body.extend_from_slice(&0u16.to_be_bytes()); // parameters
    body.extend_from_slice(&0u16.to_be_bytes()); // result formats
    message(b'B', &body)
}

/// Execute of `portal` with no row limit.
pub fn execute(portal: &str) -> Vec<u8> {
    let mut body = portal.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&0u32.to_be_bytes());
    message(b'E', &body)
}

pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}

/// Reads backend messages up to and including the next ReadyForQuery (whose body is the transaction
/// status), skipping asynchronous ParameterStatus/Notice messages.
pub fn read_until_ready_for_query(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        match read_message(s).expect("read a backend message") {
            None => panic!("connection closed before ReadyForQuery; received {out:?}"),
            Some((b'S' | b'N', _)) => {}
            Some((tag, body)) => {
                out.push((tag, body));
                if tag == b'Z' {
                    return out;
                }
            }
        }
    }
}
