//! The connection: startup and authentication, simple queries in replication mode, and the
//! CopyBoth stream that START_REPLICATION opens.

use std::collections::HashMap;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{ErrorFields, Header, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::fallible_iterator::FallibleIterator;

use super::{
    create_slot_command, parse_lsn, start_replication_command, ReplicationError, SystemId,
    WalSenderConfig, DUPLICATE_OBJECT,
};
use crate::pg::quote::replication_ident;

/// CopyBothResponse, which postgres-protocol's parser does not know (it has no replication
/// support either), so it is framed here.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// Room made in the read buffer before each read, so that a stream of small XLogData messages
/// costs one syscall per batch rather than one per message.
const READ_CHUNK: usize = 64 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum Backend {
    Message(Message),
    CopyBothResponse,
}

impl Backend {
    /// For "unexpected message" errors: the protocol tag, as the server's docs name messages.
    fn describe(&self) -> String {
        match self {
            Backend::CopyBothResponse => "CopyBothResponse".into(),
            Backend::Message(message) => {
                let name = match message {
                    Message::AuthenticationOk => "AuthenticationOk",
                    Message::BackendKeyData(_) => "BackendKeyData",
                    Message::CommandComplete(_) => "CommandComplete",
                    Message::CopyData(_) => "CopyData",
                    Message::CopyDone => "CopyDone",
                    Message::CopyInResponse(_) => "CopyInResponse",
                    Message::CopyOutResponse(_) => "CopyOutResponse",
                    Message::DataRow(_) => "DataRow",
                    Message::EmptyQueryResponse => "EmptyQueryResponse",
                    Message::ReadyForQuery(_) => "ReadyForQuery",
                    Message::RowDescription(_) => "RowDescription",
                    Message::ParameterStatus(_) => "ParameterStatus",
                    _ => "another message",
                };
                name.into()
            }
        }
    }
}

/// The byte stream and its buffers. Reading is cancel-safe: bytes read stay in `rbuf` until a
/// whole message is there.
struct Framed {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Framed {
    fn new(io: Box<dyn Io>) -> Self {
        Framed {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::new(),
        }
    }

    fn try_parse(&mut self) -> Result<Option<Backend>, ReplicationError> {
        let Some(header) = Header::parse(&self.rbuf).map_err(protocol("malformed message"))? else {
            return Ok(None);
        };
        if header.tag() == COPY_BOTH_RESPONSE_TAG {
            let total = header.len() as usize + 1;
            if self.rbuf.len() < total {
                return Ok(None);
            }
            // The body (overall format, column formats) is always "binary, no columns" for
            // replication, so it is not looked at.
            let _ = self.rbuf.split_to(total);
            return Ok(Some(Backend::CopyBothResponse));
        }
        let message = Message::parse(&mut self.rbuf).map_err(protocol("malformed message"))?;
        Ok(message.map(Backend::Message))
    }

    /// The next message; `None` if the server closed the connection between messages.
    async fn recv(&mut self) -> Result<Option<Backend>, ReplicationError> {
        loop {
            if let Some(message) = self.try_parse()? {
                return Ok(Some(message));
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                return Err(unexpected_eof());
            }
        }
    }

    /// The next message, when the conversation is not over yet.
    async fn recv_required(&mut self) -> Result<Backend, ReplicationError> {
        self.recv().await?.ok_or_else(unexpected_eof)
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.io.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        self.io.flush().await?;
        Ok(())
    }
}

fn unexpected_eof() -> ReplicationError {
    ReplicationError::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the server closed the replication connection",
    ))
}

fn unexpected(message: &Backend, during: &str) -> ReplicationError {
    ReplicationError::Protocol(format!("unexpected {} {during}", message.describe()))
}

fn server_error(mut fields: ErrorFields<'_>) -> ReplicationError {
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = None;
    loop {
        match fields.next() {
            Ok(Some(field)) => {
                let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
                match field.type_() {
                    b'C' => code = value,
                    b'M' => message = value,
                    b'D' => detail = Some(value),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => return ReplicationError::Protocol(format!("malformed ErrorResponse: {e}")),
        }
    }
    if let Some(detail) = detail {
        message = format!("{message} (DETAIL: {detail})");
    }
    if code.is_empty() {
        // internal_error: every real server sends a code; do not make one up that callers match on.
        code = "XX000".into();
    }
    ReplicationError::Server { code, message }
}

fn protocol(context: &str) -> impl FnOnce(std::io::Error) -> ReplicationError + '_ {
    move |e| ReplicationError::Protocol(format!("{context}: {e}"))
}

/// A connection in `replication=database` mode, before START_REPLICATION.
pub struct ReplicationConn {
    framed: Framed,
    parameters: HashMap<String, String>,
    backend_pid: i32,
}

impl ReplicationConn {
    /// Opens the connection and authenticates (trust, password, md5 or SCRAM-SHA-256), returning
    /// once the server is ready for commands.
    pub async fn connect(cfg: &WalSenderConfig) -> Result<Self, ReplicationError> {
        let io = match cfg.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, open(cfg)).await.map_err(|_| {
                ReplicationError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {}:{} timed out", cfg.host, cfg.port),
                ))
            })??,
            None => open(cfg).await?,
        };
        Self::handshake(io, cfg).await
    }

    async fn handshake(io: Box<dyn Io>, cfg: &WalSenderConfig) -> Result<Self, ReplicationError> {
        let mut framed = Framed::new(io);
        frontend::startup_message(
            [
                ("user", cfg.user.as_str()),
                ("database", cfg.dbname.as_str()),
                ("replication", "database"),
                ("application_name", cfg.application_name.as_str()),
                ("client_encoding", "UTF8"),
            ],
            &mut framed.wbuf,
        )?;
        framed.flush().await?;
        authenticate(&mut framed, cfg).await?;

        let mut conn = ReplicationConn {
            framed,
            parameters: HashMap::new(),
            backend_pid: 0,
        };
        loop {
            match conn.framed.recv_required().await? {
                Backend::Message(Message::ReadyForQuery(_)) => return Ok(conn),
                Backend::Message(Message::ParameterStatus(body)) => {
                    let name = body.name().map_err(protocol("ParameterStatus"))?;
                    let value = body.value().map_err(protocol("ParameterStatus"))?;
                    conn.parameters.insert(name.to_owned(), value.to_owned());
                }
                Backend::Message(Message::BackendKeyData(body)) => {
                    conn.backend_pid = body.process_id();
                }
                Backend::Message(Message::NoticeResponse(_)) => {}
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(server_error(body.fields()))
                }
                other => return Err(unexpected(&other, "after authentication")),
            }
        }
    }

    /// A run-time parameter the server reported at startup (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// The walsender's process id, for `pg_stat_replication` and `pg_terminate_backend`.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Runs a command with the simple query protocol and returns every row as text. Replication
    /// commands (IDENTIFY_SYSTEM, ...) and plain SQL both work on a `replication=database`
    /// connection; commands that enter COPY mode do not and leave the connection unusable.
    /// A server error leaves the connection usable.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        frontend::query(sql, &mut self.framed.wbuf)?;
        self.framed.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.framed.recv_required().await? {
                Backend::Message(Message::ReadyForQuery(_)) => break,
                Backend::Message(Message::DataRow(body)) => {
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(range) = ranges.next().map_err(protocol("DataRow"))? {
                        let value = match range {
                            None => None,
                            Some(range) => Some(
                                String::from_utf8(body.buffer()[range].to_vec()).map_err(|_| {
                                    ReplicationError::Protocol("DataRow value is not UTF-8".into())
                                })?,
                            ),
                        };
                        row.push(value);
                    }
                    rows.push(row);
                }
                Backend::Message(
                    Message::RowDescription(_)
                    | Message::CommandComplete(_)
                    | Message::EmptyQueryResponse
                    | Message::NoticeResponse(_),
                ) => {}
                Backend::Message(Message::ParameterStatus(body)) => {
                    let name = body.name().map_err(protocol("ParameterStatus"))?;
                    let value = body.value().map_err(protocol("ParameterStatus"))?;
                    self.parameters.insert(name.to_owned(), value.to_owned());
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    // ReadyForQuery follows; wait for it so that the connection stays usable.
                    error = Some(server_error(body.fields()));
                }
                other => return Err(unexpected(&other, "in a simple query")),
            }
        }
        match error {
            Some(error) => Err(error),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemId, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let bad =
            || ReplicationError::Protocol(format!("unexpected IDENTIFY_SYSTEM answer {rows:?}"));
        let [row] = rows.as_slice() else {
            return Err(bad());
        };
        let [Some(systemid), Some(timeline), Some(xlogpos), dbname] = row.as_slice() else {
            return Err(bad());
        };
        Ok(SystemId {
            systemid: systemid.clone(),
            timeline: timeline.parse().map_err(|_| bad())?,
            xlogpos: parse_lsn(xlogpos).ok_or_else(bad)?,
            dbname: dbname.clone(),
        })
    }

    /// Creates a logical slot and returns its consistent point: changes committed after it are
    /// streamed. An existing slot is [`ReplicationError::SlotExists`].
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        plugin: &str,
    ) -> Result<u64, ReplicationError> {
        self.create_slot(slot, plugin, false)
            .await
            .map(|(at, _)| at)
    }

    /// Creates a logical slot and exports its snapshot: returns the consistent point and the
    /// snapshot's name, which other sessions import with `SET TRANSACTION SNAPSHOT` while this
    /// connection stays open and runs nothing else. Their reads then see exactly what precedes
    /// the slot's first change.
    pub async fn create_logical_slot_exporting(
        &mut self,
        slot: &str,
        plugin: &str,
    ) -> Result<(u64, String), ReplicationError> {
        let (at, snapshot) = self.create_slot(slot, plugin, true).await?;
        let snapshot = snapshot.ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT exported no snapshot".to_owned())
        })?;
        Ok((at, snapshot))
    }

    async fn create_slot(
        &mut self,
        slot: &str,
        plugin: &str,
        export: bool,
    ) -> Result<(u64, Option<String>), ReplicationError> {
        let rows = match self
            .simple_query(&create_slot_command(slot, plugin, export))
            .await
        {
            Err(ReplicationError::Server { code, .. }) if code == DUPLICATE_OBJECT => {
                return Err(ReplicationError::SlotExists)
            }
            other => other?,
        };
        let (consistent_point, snapshot) = match rows.as_slice() {
            [row] => (row.get(1).cloned().flatten(), row.get(2).cloned().flatten()),
            _ => (None, None),
        };
        let at = consistent_point
            .as_deref()
            .and_then(parse_lsn)
            .ok_or_else(|| {
                ReplicationError::Protocol(format!(
                    "unexpected CREATE_REPLICATION_SLOT answer {rows:?}"
                ))
            })?;
        Ok((at, snapshot))
    }

    /// Drops a slot, which must not be in use (the server refuses with 55006 otherwise).
    pub async fn drop_slot(&mut self, slot: &str) -> Result<(), ReplicationError> {
        self.simple_query(&format!(
            "DROP_REPLICATION_SLOT {}",
            replication_ident(slot)
        ))
        .await
        .map(drop)
    }

    /// Starts streaming a logical slot from `start_lsn` (0: from the slot's confirmed position),
    /// with the output plugin's options, e.g. `[("proto_version", "1"), ("publication_names",
    /// "pgmm")]`.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start_lsn: u64,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let command = start_replication_command(slot, start_lsn, options);
        frontend::query(&command, &mut self.framed.wbuf)?;
        self.framed.flush().await?;
        loop {
            match self.framed.recv_required().await? {
                Backend::CopyBothResponse => {
                    return Ok(ReplicationStream {
                        framed: self.framed,
                        ended: false,
                    })
                }
                Backend::Message(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(server_error(body.fields()))
                }
                other => return Err(unexpected(&other, "in answer to START_REPLICATION")),
            }
        }
    }

    /// Ends the session politely, so the server does not log an unexpected EOF.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::terminate(&mut self.framed.wbuf);
        self.framed.flush().await?;
        self.framed.io.shutdown().await?;
        Ok(())
    }
}

async fn open(cfg: &WalSenderConfig) -> Result<Box<dyn Io>, ReplicationError> {
    if cfg.host.starts_with('/') {
        let path = Path::new(&cfg.host).join(format!(".s.PGSQL.{}", cfg.port));
        Ok(Box::new(UnixStream::connect(path).await?))
    } else {
        let stream = TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
        // Standby status updates are small and latency-bound (they gate the slot's progress).
        stream.set_nodelay(true)?;
        Ok(Box::new(stream))
    }
}

async fn authenticate(framed: &mut Framed, cfg: &WalSenderConfig) -> Result<(), ReplicationError> {
    let password = || {
        cfg.password.as_deref().ok_or_else(|| {
            ReplicationError::Auth(format!(
                "the server asks a password for user \"{}\" and none is configured",
                cfg.user
            ))
        })
    };
    loop {
        match framed.recv_required().await? {
            Backend::Message(Message::AuthenticationOk) => return Ok(()),
            Backend::Message(Message::AuthenticationCleartextPassword) => {
                frontend::password_message(password()?.as_bytes(), &mut framed.wbuf)?;
                framed.flush().await?;
            }
            Backend::Message(Message::AuthenticationMd5Password(body)) => {
                let hash = md5_hash(cfg.user.as_bytes(), password()?.as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), &mut framed.wbuf)?;
                framed.flush().await?;
            }
            Backend::Message(Message::AuthenticationSasl(body)) => {
                let mut mechanisms = body.mechanisms();
                let mut scram = false;
                while let Some(mechanism) = mechanisms.next().map_err(protocol("SASL"))? {
                    scram |= mechanism == SCRAM_SHA_256;
                }
                if !scram {
                    return Err(ReplicationError::Auth(
                        "the server offers no SASL mechanism this client supports (SCRAM-SHA-256)"
                            .into(),
                    ));
                }
                scram_sha_256(framed, password()?).await?;
            }
            Backend::Message(Message::NoticeResponse(_)) => {}
            Backend::Message(Message::ErrorResponse(body)) => {
                return Err(server_error(body.fields()))
            }
            Backend::Message(
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_),
            ) => {
                return Err(ReplicationError::Auth(
                    "the server asks for an authentication method this client does not support \
                     (supported: trust, password, md5, scram-sha-256)"
                        .into(),
                ))
            }
            other => return Err(unexpected(&other, "during authentication")),
        }
    }
}

/// The SASL exchange after AuthenticationSASL; the server's AuthenticationOk follows.
async fn scram_sha_256(framed: &mut Framed, password: &str) -> Result<(), ReplicationError> {
    // No TLS, hence no channel binding ("n" in the GS2 header).
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut framed.wbuf)?;
    framed.flush().await?;

    let first = expect_sasl(framed).await?;
    let Message::AuthenticationSaslContinue(body) = first else {
        return Err(unexpected(
            &Backend::Message(first),
            "in the SCRAM exchange",
        ));
    };
    scram
        .update(body.data())
        .map_err(|e| ReplicationError::Auth(format!("SCRAM: {e}")))?;
    frontend::sasl_response(scram.message(), &mut framed.wbuf)?;
    framed.flush().await?;

    let last = expect_sasl(framed).await?;
    let Message::AuthenticationSaslFinal(body) = last else {
        return Err(unexpected(&Backend::Message(last), "in the SCRAM exchange"));
    };
    // Verifies the server's signature: the server also proves it knows the password.
    scram
        .finish(body.data())
        .map_err(|e| ReplicationError::Auth(format!("SCRAM: {e}")))
}

/// The next SASL step, with a wrong password's ErrorResponse turned into the server error.
async fn expect_sasl(framed: &mut Framed) -> Result<Message, ReplicationError> {
    loop {
        match framed.recv_required().await? {
            Backend::Message(Message::NoticeResponse(_)) => {}
            Backend::Message(Message::ErrorResponse(body)) => {
                return Err(server_error(body.fields()))
            }
            Backend::Message(message) => return Ok(message),
            other => return Err(unexpected(&other, "in the SCRAM exchange")),
        }
    }
}

/// The CopyBoth phase of a logical slot.
pub struct ReplicationStream {
    framed: Framed,
    ended: bool,
}

impl ReplicationStream {
    /// The next CopyData payload, raw: `'w'` XLogData or `'k'` keepalive. `None` once the server
    /// ended the copy or closed the connection. Cancel-safe, so it can race a status timer in
    /// `tokio::select!` without losing data.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ReplicationError> {
        while !self.ended {
            let message = self.framed.recv().await;
            if let Some(payload) = self.payload(message)? {
                return Ok(Some(payload));
            }
        }
        Ok(None)
    }

    /// Like [`next`](Self::next), but only from what is already buffered: never reads, never
    /// waits. `None` when no whole CopyData is buffered (or the stream has ended; `next` then
    /// says which). Lets a caller work through a burst of messages in one wakeup, without a
    /// round through its `select!` per message, and flush its own output once the burst is
    /// consumed.
    pub fn next_buffered(&mut self) -> Result<Option<Bytes>, ReplicationError> {
        while !self.ended {
            let message = match self.framed.try_parse() {
                Ok(None) => return Ok(None),
                parsed => parsed,
            };
            if let Some(payload) = self.payload(message)? {
                return Ok(Some(payload));
            }
        }
        Ok(None)
    }

    /// What one received message means: a CopyData payload, `None` for a message to skip or the
    /// end of the copy, or the error that ends the stream.
    fn payload(
        &mut self,
        message: Result<Option<Backend>, ReplicationError>,
    ) -> Result<Option<Bytes>, ReplicationError> {
        match message {
            Ok(Some(Backend::Message(Message::CopyData(body)))) => Ok(Some(body.into_bytes())),
            Ok(Some(Backend::Message(
                Message::NoticeResponse(_) | Message::ParameterStatus(_),
            ))) => Ok(None),
            Ok(None | Some(Backend::Message(Message::CopyDone))) => {
                self.ended = true;
                Ok(None)
            }
            Ok(Some(Backend::Message(Message::ErrorResponse(body)))) => {
                self.ended = true;
                Err(server_error(body.fields()))
            }
            Ok(Some(other)) => {
                self.ended = true;
                Err(unexpected(&other, "in the replication stream"))
            }
            Err(e) => {
                self.ended = true;
                Err(e)
            }
        }
    }

    /// Whether a whole message is already buffered, so that [`next`](Self::next) will not wait.
    /// Lets a caller batch its own output and flush when the server has paused.
    pub fn has_buffered_message(&self) -> bool {
        matches!(
            Header::parse(&self.framed.rbuf),
            Ok(Some(h)) if self.framed.rbuf.len() > h.len() as usize
        )
    }

    /// Sends one CopyData with `payload` (a standby status update built by the caller).
    pub async fn send_status(&mut self, payload: &[u8]) -> Result<(), ReplicationError> {
        frontend::CopyData::new(payload)?.write(&mut self.framed.wbuf);
        self.framed.flush().await
    }

    /// Ends the session without waiting for the server to finish the copy; the slot keeps the
    /// position last confirmed with [`send_status`](Self::send_status).
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::terminate(&mut self.framed.wbuf);
        self.framed.flush().await?;
        self.framed.io.shutdown().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Buf, BufMut};
    use tokio::io::{duplex, DuplexStream};

    use crate::pg::SqlState;

    /// A backend message: tag, length, body.
    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn auth(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(extra);
        msg(b'R', &body)
    }

    fn error(code: &str, message: &str) -> Vec<u8> {
        let body = format!("SFATAL\0C{code}\0M{message}\0\0");
        msg(b'E', body.as_bytes())
    }

    fn ready() -> Vec<u8> {
        msg(b'Z', b"I")
    }

    fn cfg(password: Option<&str>) -> WalSenderConfig {
        WalSenderConfig {
            host: "unused".into(),
            port: 5432,
            user: "rep".into(),
            password: password.map(str::to_owned),
            dbname: "app".into(),
            application_name: "pgmm-test".into(),
            connect_timeout: None,
        }
    }

    /// The server side of a mock connection: reads what the client sends.
    struct Peer {
        io: DuplexStream,
        buf: BytesMut,
    }

    impl Peer {
        async fn fill(&mut self, n: usize) {
            while self.buf.len() < n {
                assert_ne!(
                    self.io.read_buf(&mut self.buf).await.unwrap(),
                    0,
                    "client hung up"
                );
            }
        }

        /// The startup packet's parameters.
        async fn startup(&mut self) -> HashMap<String, String> {
            self.fill(4).await;
            let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
            self.fill(len).await;
            let mut packet = self.buf.split_to(len);
            packet.advance(4);
            assert_eq!(packet.get_u32(), 196_608, "protocol 3.0");
            let text = String::from_utf8(packet.to_vec()).unwrap();
            let parts: Vec<&str> = text.trim_end_matches('\0').split('\0').collect();
            parts
                .chunks(2)
                .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
                .collect()
        }

        async fn message(&mut self) -> (u8, Vec<u8>) {
            self.fill(5).await;
            let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
            self.fill(len + 1).await;
            let mut message = self.buf.split_to(len + 1);
            let tag = message.get_u8();
            message.advance(4);
            (tag, message.to_vec())
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.io.write_all(bytes).await.unwrap();
        }
    }

    fn pair() -> (Box<dyn Io>, Peer) {
        let (client, server) = duplex(1 << 20);
        (
            Box::new(client),
            Peer {
                io: server,
                buf: BytesMut::new(),
            },
        )
    }

    #[tokio::test]
    async fn md5_startup_collects_parameters() {
        let (io, mut server) = pair();
        let server = tokio::spawn(async move {
            let params = server.startup().await;
            assert_eq!(params["replication"], "database");
            assert_eq!(params["user"], "rep");
            assert_eq!(params["database"], "app");
            assert_eq!(params["application_name"], "pgmm-test");
            server.send(&auth(5, &[1, 2, 3, 4])).await;
            let (tag, body) = server.message().await;
            assert_eq!(tag, b'p');
            let expected = md5_hash(b"rep", b"pw", [1, 2, 3, 4]);
            assert_eq!(body, format!("{expected}\0").into_bytes());
            let mut reply = auth(0, &[]);
            reply.extend(msg(b'S', b"server_version\x0015.14\0"));
            reply.extend(msg(b'K', &[0, 0, 0, 42, 0, 0, 0, 7]));
            reply.extend(ready());
            server.send(&reply).await;
            server
        });
        let conn = ReplicationConn::handshake(io, &cfg(Some("pw")))
            .await
            .unwrap();
        assert_eq!(conn.parameter("server_version"), Some("15.14"));
        assert_eq!(conn.backend_pid(), 42);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_password_request_without_password_is_an_auth_error() {
        let (io, mut server) = pair();
        let server = tokio::spawn(async move {
            server.startup().await;
            server.send(&auth(3, &[])).await;
            server
        });
        let err = ReplicationConn::handshake(io, &cfg(None))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ReplicationError::Auth(_)), "{err}");
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn a_refused_login_is_the_server_error() {
        let (io, mut server) = pair();
        let server = tokio::spawn(async move {
            server.startup().await;
            server.send(&auth(3, &[])).await;
            assert_eq!(server.message().await.0, b'p');
            server
                .send(&error("28P01", "password authentication failed"))
                .await;
            server
        });
        let err = ReplicationConn::handshake(io, &cfg(Some("bad")))
            .await
            .err()
            .unwrap();
        assert_eq!(err.sqlstate(), "28P01");
        assert!(
            err.to_string().contains("password authentication failed"),
            "{err}"
        );
        drop(server.await.unwrap());
    }

    async fn ready_conn() -> (ReplicationConn, Peer) {
        let (io, mut server) = pair();
        let server = tokio::spawn(async move {
            server.startup().await;
            let mut reply = auth(0, &[]);
            reply.extend(ready());
            server.send(&reply).await;
            server
        });
        let conn = ReplicationConn::handshake(io, &cfg(None)).await.unwrap();
        (conn, server.await.unwrap())
    }

    fn data_row(values: &[Option<&str>]) -> Vec<u8> {
        let mut body = (values.len() as u16).to_be_bytes().to_vec();
        for value in values {
            match value {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v.as_bytes());
                }
            }
        }
        msg(b'D', &body)
    }

    #[tokio::test]
    async fn slot_exists_is_recognised_and_the_connection_stays_usable() {
        let (mut conn, mut server) = ready_conn().await;
        let server = tokio::spawn(async move {
            let (tag, sql) = server.message().await;
            assert_eq!(tag, b'Q');
            assert!(sql.starts_with(b"CREATE_REPLICATION_SLOT \"s\" LOGICAL"));
            let mut reply = error("42710", "replication slot \"s\" already exists");
            reply.extend(ready());
            server.send(&reply).await;

            assert_eq!(server.message().await.0, b'Q');
            let mut reply = data_row(&[
                Some("7000000000000000001"),
                Some("1"),
                Some("0/15D6B30"),
                None,
            ]);
            reply.extend(msg(b'C', b"IDENTIFY_SYSTEM\0"));
            reply.extend(ready());
            server.send(&reply).await;
            server
        });
        let err = conn.create_logical_slot("s", "pgoutput").await.unwrap_err();
        assert!(matches!(err, ReplicationError::SlotExists), "{err}");
        assert_eq!(err.sqlstate(), "42710");
        let id = conn.identify_system().await.unwrap();
        assert_eq!(
            id,
            SystemId {
                systemid: "7000000000000000001".into(),
                timeline: 1,
                xlogpos: 0x15D6B30,
                dbname: None,
            }
        );
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn stream_yields_copy_data_across_split_reads_until_copy_done() {
        let (conn, mut server) = ready_conn().await;
        let server = tokio::spawn(async move {
            let (tag, sql) = server.message().await;
            assert_eq!(tag, b'Q');
            assert_eq!(
                String::from_utf8(sql).unwrap(),
                "START_REPLICATION SLOT \"s\" LOGICAL 0/10 (\"proto_version\" '1')\0"
            );
            server.send(&msg(b'W', &[0, 0, 0])).await;
            // One payload delivered a byte at a time, then two in one write.
            for byte in msg(b'd', b"w-first") {
                server.send(&[byte]).await;
                tokio::task::yield_now().await;
            }
            let mut two = msg(b'd', b"k-second");
            two.extend(msg(b'N', b"SNOTICE\0C00000\0Mhello\0\0"));
            two.extend(msg(b'd', b"w-third"));
            two.extend(msg(b'c', b""));
            server.send(&two).await;
            let (tag, status) = server.message().await;
            assert_eq!((tag, status.as_slice()), (b'd', &b"r-status"[..]));
            server
        });
        let mut stream = conn
            .start_logical("s", 0x10, &[("proto_version", "1")])
            .await
            .unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), &b"w-first"[..]);
        assert_eq!(stream.next().await.unwrap().unwrap(), &b"k-second"[..]);
        stream.send_status(b"r-status").await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), &b"w-third"[..]);
        assert!(stream.next().await.unwrap().is_none());
        assert!(stream.next().await.unwrap().is_none(), "stays ended");
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn next_buffered_takes_only_whole_buffered_payloads() {
        let mut bytes = msg(b'd', b"w-one");
        bytes.extend(msg(b'N', b"SNOTICE\0C00000\0Mhello\0\0"));
        bytes.extend(msg(b'd', b"w-two"));
        bytes.extend(&msg(b'd', b"w-partial")[..4]);
        let mut stream = stream_then_hang_up(bytes).await;
        assert_eq!(stream.next().await.unwrap().unwrap(), &b"w-one"[..]);
        assert_eq!(stream.next_buffered().unwrap().unwrap(), &b"w-two"[..]);
        assert_eq!(
            stream.next_buffered().unwrap(),
            None,
            "a partial message waits"
        );
        assert!(
            stream.next().await.is_err(),
            "and is cut off by the hang-up"
        );
        assert_eq!(stream.next_buffered().unwrap(), None, "ended");
    }

    #[tokio::test]
    async fn stream_reports_the_server_error_that_ends_it() {
        let (conn, mut server) = ready_conn().await;
        let server = tokio::spawn(async move {
            server.message().await;
            let mut reply = msg(b'W', &[0, 0, 0]);
            reply.extend(error(
                "57P01",
                "terminating connection due to administrator command",
            ));
            server.send(&reply).await;
            server
        });
        let mut stream = conn.start_logical("s", 0, &[]).await.unwrap();
        let err = stream.next().await.unwrap_err();
        assert_eq!(err.sqlstate(), "57P01");
        assert!(stream.next().await.unwrap().is_none());
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn a_refused_start_is_the_server_error() {
        let (conn, mut server) = ready_conn().await;
        let server = tokio::spawn(async move {
            server.message().await;
            let mut reply = error("42704", "replication slot \"s\" does not exist");
            reply.extend(ready());
            server.send(&reply).await;
            server
        });
        let err = conn.start_logical("s", 0, &[]).await.err().unwrap();
        assert_eq!(err.sqlstate(), "42704");
        drop(server.await.unwrap());
    }

    /// Starts a stream whose server sends `bytes` after CopyBothResponse and hangs up.
    async fn stream_then_hang_up(bytes: Vec<u8>) -> ReplicationStream {
        let (conn, mut server) = ready_conn().await;
        let server = tokio::spawn(async move {
            server.message().await;
            let mut reply = msg(b'W', &[0, 0, 0]);
            reply.put_slice(&bytes);
            server.send(&reply).await;
        });
        let stream = conn.start_logical("s", 0, &[]).await.unwrap();
        server.await.unwrap();
        stream
    }

    #[tokio::test]
    async fn a_connection_cut_mid_message_is_an_error_and_between_messages_the_end() {
        let mut cut = msg(b'd', b"whole");
        cut.extend(&msg(b'd', b"partial")[..6]);
        let mut stream = stream_then_hang_up(cut).await;
        assert_eq!(stream.next().await.unwrap().unwrap(), &b"whole"[..]);
        let err = stream.next().await.unwrap_err();
        assert!(
            matches!(&err, ReplicationError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
            "{err}"
        );

        let mut stream = stream_then_hang_up(msg(b'd', b"whole")).await;
        assert_eq!(stream.next().await.unwrap().unwrap(), &b"whole"[..]);
        assert!(stream.next().await.unwrap().is_none());
    }
}
