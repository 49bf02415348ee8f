//! What travels on a peer link: length-delimited frames, each one MessagePack [`Envelope`].
//!
//! MessagePack with named fields (`rmp_serde::to_vec_named`) is self-describing: a newer peer may
//! add fields to a message (declared `#[serde(default)]` on the receiving side when they must be
//! optional) and an older peer skips them. A message kind the receiver does not know yet surfaces
//! as [`FrameError::UnknownMessage`] with the frame consumed, so the caller decides whether to
//! ignore it; an envelope of another major [`WIRE_VERSION`] is refused outright.
//!
//! Frames are a 4-byte big-endian length followed by the payload (tokio-util's
//! `LengthDelimitedCodec` defaults), limited to [`MAX_FRAME_BYTES`] once the peer is
//! authenticated and to [`HANDSHAKE_MAX_FRAME_BYTES`] before: the reader rejects an oversized
//! header before buffering any of the body, so a hostile or confused peer cannot make us
//! allocate more than the limit, and a connection that has not proved the secret cannot make us
//! allocate more than a few kilobytes.

use std::fmt;
use std::io;

use bytes::{BufMut, BytesMut};
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

use crate::pg::SqlState;
use crate::replication::changeset::ChangeSet;

/// Major version of the envelope format. Bumped only for changes an older reader cannot skip;
/// additive changes (new fields, new message kinds) keep it.
pub const WIRE_VERSION: u16 = 1;

/// Largest payload of one frame: what a peer can make us buffer at once. A transaction larger
/// than `[replication] chunk_bytes` travels as several frames (protocol 2), and a value larger
/// than a frame in [`Body::TxValue`] pieces, so no transaction or value needs a larger frame.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Largest payload of one frame before the peer is authenticated (both directions of the
/// handshake read with it). Anyone who can reach the peer port can open a connection, and the
/// reader buffers a whole frame before decoding it, so with [`MAX_FRAME_BYTES`] each
/// unauthenticated connection could make this node hold 64 MiB.
///
/// The limit is derived from what the handshake sends: every handshake message is a few
/// fixed-size fields (protocol, 32-byte nonces, 32-byte HMAC-SHA256 proofs, the message and
/// field names, about 150 bytes) plus node names (at most 58 bytes, config-validated), the
/// cluster name (at most [`crate::config::MAX_CLUSTER_NAME_BYTES`], config-validated) and, in `Refused`, a
/// reason that quotes at most two such names `{:?}`-escaped (at most 6 bytes per byte, for a
/// control character as `\u{1f}`). The largest legitimate message is therefore a `Refused` for
/// a cluster mismatch at about 2 × 255 × 6 + 200 ≈ 3.3 KiB (a test in `handshake.rs` builds
/// it); 8 KiB leaves room for fields a newer peer may add to its handshake messages, and is
/// still 8,192 times less than the post-handshake limit.
pub const HANDSHAKE_MAX_FRAME_BYTES: usize = 8 * 1024;

/// One frame's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u16,
    pub body: Body,
}

/// The messages of the peer protocol. The first five make up the handshake (see `handshake.rs`
/// for their order); the rest flow after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Client → server: who is calling, and the client's nonce.
    Hello {
        protocol: u16,
        cluster: String,
        node: String,
        #[serde(with = "serde_bytes")]
        nonce: [u8; 32],
        /// What the caller opens the link for; absent (a node before protocol 4) means
        /// replication.
        #[serde(default)]
        purpose: Purpose,
    },
    /// Server → client: who answered, the server's nonce, and the server's proof that it holds
    /// the shared secret.
    Challenge {
        protocol: u16,
        cluster: String,
        node: String,
        #[serde(with = "serde_bytes")]
        nonce: [u8; 32],
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// Client → server: the client's proof.
    Proof {
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// Server → client: the handshake succeeded.
    Welcome(Welcome),
    /// Either direction: the handshake (or the link) is refused; the connection closes after it.
    Refused {
        reason: String,
        /// Machine-readable class of `reason`, so both ends count the same failure the same way.
        #[serde(default)]
        kind: RefusalKind,
    },
    /// Sender's wall clock, for lag and clock-skew estimates and to detect a dead link.
    Heartbeat { sent_at_micros: i64 },
    /// Receiver → sender: every transaction up to this LSN is durably applied.
    Ack { applied_lsn: u64 },
    /// One whole committed transaction of `origin` (the sending node), in commit order.
    Transaction {
        origin: String,
        commit_lsn: u64,
        /// End of the commit record on the origin: what the receiver's replication origin
        /// records, and what it acks.
        end_lsn: u64,
        /// Microseconds since 2000-01-01 UTC.
        commit_time: i64,
        changes: ChangeSet,
    },
    /// Protocol 2: the start of a transaction sent in pieces, because it outgrew
    /// `[replication] chunk_bytes` while it was being decoded. [`Body::TxChunk`]s follow, then
    /// one [`Body::TxCommit`]; nothing else of the same origin comes in between.
    TxBegin {
        origin: String,
        /// The commit record's LSN, known from the start (pgoutput's Begin says it): the
        /// receiver knows from it whether it has the transaction already.
        commit_lsn: u64,
        /// Microseconds since 2000-01-01 UTC.
        commit_time: i64,
    },
    /// Protocol 2: the next changes of the transaction a [`Body::TxBegin`] opened, in order;
    /// self-contained like a whole transaction's (it names its own tables).
    TxChunk { changes: ChangeSet },
    /// Protocol 2: a piece of a value too large for a frame. The pieces of one value come in
    /// order, `last` on the final one, ahead of the [`Body::TxChunk`] or [`Body::TxCommit`] whose
    /// change holds [`crate::replication::pgoutput::Datum::Staged`] in its place; several staged
    /// values of one chunk come in the order of their changes and columns.
    TxValue {
        #[serde(with = "crate::replication::pgoutput::serde_bytes_compat")]
        data: bytes::Bytes,
        last: bool,
    },
    /// Protocol 2: the last changes of the open transaction, and its commit.
    TxCommit {
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
        changes: ChangeSet,
    },
    /// Protocol 4, on a request link: a membership request or its answer
    /// (`crate::membership` gives them meaning).
    Member(Member),
}

/// The membership messages (protocol 4), exchanged on a link opened with
/// [`Purpose::Request`]: a joining node preparing every other node and copying from its donor,
/// and `pgmm check` comparing tables. The caller sends one request and reads answers until the
/// final one; a failure comes as [`Body::Refused`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Member {
    /// Joiner → a node that is not its donor: have the slot for the joiner (created if
    /// missing), and answer once the donor has acknowledged this node's changes up to that
    /// slot's start, so that the donor's copy holds everything the slot does not.
    Prepare {
        donor: String,
    },
    /// Answer to `Prepare`: the slot's start; the joiner's stream from this node begins there.
    Prepared {
        slot_lsn: u64,
    },
    /// Either answerer: still working (a wait, a long scan); keeps the link from looking dead.
    Waiting {
        reason: String,
    },
    /// Joiner → donor: copy these tables (all replicated ones when empty). With `slot`, the
    /// donor first creates its slot for the joiner anew and copies at that slot's snapshot
    /// (a join); without, at a snapshot of its own (a resync).
    Copy {
        tables: Vec<String>,
        slot: bool,
    },
    /// The schema of the copied tables, as statements: `pre` before the rows (schemas, types,
    /// sequences, tables), `post` after them (keys, indexes, foreign keys).
    Schema {
        pre: Vec<String>,
        post: Vec<String>,
        /// The tables whose rows follow, in order (`schema.name`).
        tables: Vec<String>,
    },
    /// The rows of one table follow, in `Rows` messages, then `TableDone`.
    Table {
        table: String,
        columns: Vec<String>,
        estimated_rows: i64,
        /// This table's keys, checks and indexes: the joiner builds them once its rows are in,
        /// while the next table streams (foreign keys and owners stay in `Schema::post`).
        #[serde(default)]
        post: Vec<String>,
    },
    /// COPY text rows, all written by `node` (the receiver writes them under that node's
    /// origin, so rows are grouped by writer rather than tagged one by one); `rows` of them end
    /// in this message. At most about `chunk_bytes` per message: a longer row continues in the
    /// next one, which has the same `node`.
    Rows {
        node: String,
        rows: u64,
        #[serde(with = "crate::replication::pgoutput::serde_bytes_compat")]
        data: bytes::Bytes,
    },
    TableDone {
        rows: u64,
    },
    /// The copy is complete: its snapshot's position in the donor's WAL (the joiner's stream
    /// from the donor begins there) and the sequences' values at it.
    Done {
        snapshot_lsn: u64,
        sequences: Vec<SequenceValue>,
    },
    /// `pgmm check` → a node: hash the rows of `table` into `buckets` buckets by key.
    HashBuckets {
        table: String,
        columns: Vec<String>,
        key: Vec<String>,
        buckets: u32,
    },
    BucketHashes {
        hashes: Vec<BucketHash>,
    },
    /// `pgmm check` → a node: one hash per row of these buckets.
    HashRows {
        table: String,
        columns: Vec<String>,
        key: Vec<String>,
        buckets: u32,
        which: Vec<u32>,
    },
    RowHashes {
        rows: Vec<RowHash>,
        last: bool,
    },
}

/// A sequence's state on the donor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceValue {
    /// Qualified and quoted.
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
}

/// One bucket of a table's rows: how many, and the sum of their row hashes (as text: a sum of
/// 60-bit values overflows a bigint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketHash {
    pub bucket: u32,
    pub rows: i64,
    pub hash: String,
}

/// One row: its key (as a row literal), the hash of its values, and its version (the conflict
/// column and the node that wrote it) for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowHash {
    pub key: String,
    pub hash: String,
    pub version: String,
}

/// Why a link is opened, said in `Hello`: to stream a node's changes (every link before
/// protocol 4), or to ask the accepting node something (the membership requests of protocol 4:
/// join, check), which must not replace the caller's replication link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    #[default]
    Replicate,
    Request,
    /// A purpose of a newer pgmm; refused.
    #[serde(other)]
    Unknown,
}

/// The server's acceptance of a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The LSN (of the client's node) from which the server wants the client's changes: its
    /// replication origin progress for that node.
    pub resume_from: u64,
}

/// Why a handshake was refused, as sent in [`Body::Refused`]. An unknown kind from a newer peer
/// reads as [`RefusalKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    Authentication,
    UnknownNode,
    Cluster,
    Protocol,
    WrongPeer,
    ProtocolViolation,
    Unavailable,
    #[default]
    #[serde(other)]
    Other,
}

impl Body {
    /// The message kind, as spelled on the wire; for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Hello { .. } => "Hello",
            Body::Challenge { .. } => "Challenge",
            Body::Proof { .. } => "Proof",
            Body::Welcome(_) => "Welcome",
            Body::Refused { .. } => "Refused",
            Body::Heartbeat { .. } => "Heartbeat",
            Body::Ack { .. } => "Ack",
            Body::Transaction { .. } => "Transaction",
            Body::TxBegin { .. } => "TxBegin",
            Body::TxChunk { .. } => "TxChunk",
            Body::TxValue { .. } => "TxValue",
            Body::TxCommit { .. } => "TxCommit",
            Body::Member(_) => "Member",
        }
    }
}

/// Why a frame could not be sent or received.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("peer link I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection where a message was required.
    #[error("the peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("the peer closed the connection in the middle of a frame")]
    UnexpectedEof,
    #[error("frame of {} exceeds the {max}-byte limit", len.map_or_else(|| "unknown size".to_owned(), |n| format!("{n} bytes")))]
    TooLarge { len: Option<usize>, max: usize },
    /// The payload is not an envelope this node can read (garbage, or not a pgmm peer).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A message kind this node does not know, from a newer peer. The frame has been consumed:
    /// the connection stays usable if the caller chooses to skip it.
    #[error(
        "unknown peer message {name:?} (envelope version {version}); is the peer a newer pgmm?"
    )]
    UnknownMessage { name: String, version: u16 },
    #[error("peer speaks envelope version {theirs}, this node only version {ours}")]
    IncompatibleVersion { theirs: u16, ours: u16 },
    #[error("cannot encode a peer message: {0}")]
    Encode(String),
}

impl SqlState for FrameError {
    fn sqlstate(&self) -> &str {
        match self {
            // connection_failure
            FrameError::Io(_) | FrameError::Closed | FrameError::UnexpectedEof => "08006",
            // program_limit_exceeded: our own message does not fit a frame
            FrameError::Encode(_) => "54000",
            // protocol_violation
            FrameError::TooLarge { .. }
            | FrameError::Malformed(_)
            | FrameError::UnknownMessage { .. }
            | FrameError::IncompatibleVersion { .. } => "08P01",
        }
    }
}

/// Bytes of the big-endian length in front of every frame.
const FRAME_HEADER_LEN: usize = 4;

fn codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(FRAME_HEADER_LEN)
        .max_frame_length(max)
        .new_codec()
}

fn is_too_large(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>())
}

/// Serializes `body` in an envelope of this node's [`WIRE_VERSION`].
#[cfg(test)]
pub fn encode_envelope(body: &Body) -> Result<Vec<u8>, FrameError> {
    let envelope = EnvelopeRef {
        version: WIRE_VERSION,
        body,
    };
    rmp_serde::to_vec_named(&envelope).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes one frame's payload. Only the failure path looks at the envelope twice: to tell an
/// unknown message kind or version from garbage.
pub fn decode_envelope(payload: &[u8]) -> Result<Body, FrameError> {
    match rmp_serde::from_slice::<Envelope>(payload) {
        Ok(envelope) if envelope.version == WIRE_VERSION => Ok(envelope.body),
        Ok(envelope) => Err(FrameError::IncompatibleVersion {
            theirs: envelope.version,
            ours: WIRE_VERSION,
        }),
        Err(err) => match rmp_serde::from_slice::<Probe>(payload) {
            Ok(probe) if probe.version != WIRE_VERSION => Err(FrameError::IncompatibleVersion {
                theirs: probe.version,
                ours: WIRE_VERSION,
            }),
            Ok(Probe {
                version,
                body: MessageTag(name),
            }) if !KNOWN_MESSAGES.contains(&name.as_str()) => {
                Err(FrameError::UnknownMessage { name, version })
            }
            _ => Err(FrameError::Malformed(err.to_string())),
        },
    }
}

const KNOWN_MESSAGES: &[&str] = &[
    "Hello",
    "Challenge",
    "Proof",
    "Welcome",
    "Refused",
    "Heartbeat",
    "Ack",
    "Transaction",
];

/// Serializes like [`Envelope`] without owning the body (a `Transaction` can be large).
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    version: u16,
    body: &'a Body,
}

/// The part of an envelope every version shares: its version and its message tag.
#[derive(Deserialize)]
struct Probe {
    version: u16,
    body: MessageTag,
}

/// The variant name of an externally tagged enum: a one-entry map `{name: payload}`, or a bare
/// string for a payload-less variant.
struct MessageTag(String);

impl<'de> Deserialize<'de> for MessageTag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TagVisitor;
        impl<'de> Visitor<'de> for TagVisitor {
            type Value = MessageTag;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message tag")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MessageTag, E> {
                Ok(MessageTag(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MessageTag, A::Error> {
                let (name, IgnoredAny) = map
                    .next_entry::<String, IgnoredAny>()?
                    .ok_or_else(|| de::Error::custom("empty message map"))?;
                Ok(MessageTag(name))
            }
        }
        deserializer.deserialize_any(TagVisitor)
    }
}

/// The reading half of a framed connection. `recv` is cancel-safe: bytes read so far stay in
/// the buffer, so it can sit in a `tokio::select!` next to a timer.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    codec: LengthDelimitedCodec,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, max_frame: usize) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            codec: codec(max_frame),
        }
    }

    /// Changes the largest frame accepted from the next header on: raised from
    /// [`HANDSHAKE_MAX_FRAME_BYTES`] to [`MAX_FRAME_BYTES`] once the handshake authenticated
    /// the peer. Called between frames (after `recv` returned a whole one), so no header
    /// already checked against the old limit is pending.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.codec.set_max_frame_length(max_frame);
    }

    /// The next message; `None` when the peer closed the connection between frames. After any
    /// error except [`FrameError::UnknownMessage`] the stream position is lost: drop the link.
    pub async fn recv(&mut self) -> Result<Option<Body>, FrameError> {
        loop {
            let frame = self.codec.decode(&mut self.buf).map_err(|e| {
                if is_too_large(&e) {
                    FrameError::TooLarge {
                        len: frame_len(&self.buf),
                        max: self.codec.max_frame_length(),
                    }
                } else {
                    FrameError::Io(e)
                }
            })?;
            if let Some(frame) = frame {
                return decode_envelope(&frame).map(Some);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::UnexpectedEof)
                };
            }
        }
    }

    /// Like [`FrameReader::recv`], for a point where the peer must speak.
    pub async fn recv_required(&mut self) -> Result<Body, FrameError> {
        self.recv().await?.ok_or(FrameError::Closed)
    }
}

/// The length announced by the frame header at the front of `buf`, if complete.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let head: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    usize::try_from(u32::from_be_bytes(head)).ok()
}

/// The writing half of a framed connection. Messages can be queued and flushed together, so a
/// sender streaming many small transactions pays one write per batch rather than per message.
pub struct FrameWriter<W> {
    io: W,
    buf: BytesMut,
    codec: LengthDelimitedCodec,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W, max_frame: usize) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            codec: codec(max_frame),
        }
    }

    /// Encodes `body` into the output buffer without writing it. An oversized message is
    /// refused here, with nothing queued, and the link stays usable.
    ///
    /// The envelope is serialized straight into the output buffer behind a placeholder header
    /// that is filled in afterwards, the same bytes the codec would frame: a sender streaming
    /// transactions pays no intermediate buffer (and its growth) and no copy per message.
    pub fn queue(&mut self, body: &Body) -> Result<(), FrameError> {
        let start = self.buf.len();
        self.buf.put_u32(0);
        let envelope = EnvelopeRef {
            version: WIRE_VERSION,
            body,
        };
        let encoded = rmp_serde::encode::write_named(&mut (&mut self.buf).writer(), &envelope);
        let len = self.buf.len() - start - FRAME_HEADER_LEN;
        let max = self.codec.max_frame_length();
        let header = match encoded {
            Err(e) => Err(FrameError::Encode(e.to_string())),
            Ok(()) => u32::try_from(len)
                .ok()
                .filter(|_| len <= max)
                .ok_or(FrameError::TooLarge {
                    len: Some(len),
                    max,
                }),
        };
        match header {
            Ok(header) => {
                self.buf[start..start + FRAME_HEADER_LEN].copy_from_slice(&header.to_be_bytes());
                Ok(())
            }
            Err(e) => {
                self.buf.truncate(start);
                Err(e)
            }
        }
    }

    /// Writes everything queued. Not cancel-safe: a cancelled flush leaves a partial frame on
    /// the wire, after which the link must be dropped.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        if !self.buf.is_empty() {
            self.io.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.io.flush().await?;
        Ok(())
    }

    /// Queues and flushes one message.
    pub async fn send(&mut self, body: &Body) -> Result<(), FrameError> {
        self.queue(body)?;
        self.flush().await
    }

    /// Flushes and closes the write side (TLS close_notify, TCP FIN).
    pub async fn shutdown(&mut self) -> Result<(), FrameError> {
        self.flush().await?;
        self.io.shutdown().await?;
        Ok(())
    }
}
