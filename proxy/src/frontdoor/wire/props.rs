//! Property tests of the front door's framing: random and mutated-valid bytes fed to the
//! startup reader, the boundary tracker and the body decoders must never panic, and whatever
//! they accept must be consistent with the bytes (and independent of how the bytes arrive).
//!
//! Each case runs from its own seed, printed when the case fails; `PGMM_PROP_SEED=<seed>` replays
//! exactly that case. Without it the base seed comes from the clock, so every run explores new
//! inputs. The numbers come from `fastrand`, seeded.

use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use fastrand::Rng;
use tokio::io::{AsyncRead, ReadBuf};

use super::*;

/// Protocol 3.0's startup code; the reader accepts any 3.x.
const PROTOCOL_3: u32 = PROTOCOL_MAJOR_3 << 16;

/// What the generators draw beyond `fastrand`'s own numbers.
trait Draw {
    fn chance(&mut self, one_in: usize) -> bool;
    fn bytes(&mut self, n: usize) -> Vec<u8>;
    fn pick<T: Copy>(&mut self, from: &[T]) -> T;
    /// A length biased towards the edges where framing bugs live.
    fn edgy_u32(&mut self) -> u32;
}

impl Draw for Rng {
    fn chance(&mut self, one_in: usize) -> bool {
        self.usize(..one_in) == 0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.fill(&mut v);
        v
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.usize(..from.len())]
    }

    fn edgy_u32(&mut self) -> u32 {
        match self.usize(..6) {
            0 => self.pick(&[0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17]),
            1 => self.pick(&[
                MAX_STARTUP_LEN as u32 - 1,
                MAX_STARTUP_LEN as u32,
                MAX_STARTUP_LEN as u32 + 1,
                MAX_MESSAGE_LEN as u32,
                MAX_MESSAGE_LEN as u32 + 1,
                u32::MAX,
                0x8000_0000,
            ]),
            2 => self.u32(..64),
            3 => self.usize(..MAX_STARTUP_LEN + 64) as u32,
            _ => self.u32(..),
        }
    }
}

/// Runs `case` for `cases` seeds (or only `PGMM_PROP_SEED`), naming the seed of a failing one.
fn check(name: &str, cases: u64, case: impl Fn(&mut Rng)) {
    let replay = std::env::var("PGMM_PROP_SEED").ok().map(|s| {
        let s = s.trim();
        s.strip_prefix("0x")
            .map_or_else(|| s.parse(), |hex| u64::from_str_radix(hex, 16))
            .expect("PGMM_PROP_SEED is a number (decimal or 0x hex)")
    });
    let (base, cases) = match replay {
        Some(seed) => (seed, 1),
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            (now, cases)
        }
    };
    for i in 0..cases {
        let seed = base.wrapping_add(i);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| case(&mut Rng::with_seed(seed))));
        if let Err(cause) = outcome {
            eprintln!(
                "property {name} failed for seed {seed:#x}; replay: PGMM_PROP_SEED={seed:#x}"
            );
            panic::resume_unwind(cause);
        }
    }
}

/// A reader handing out its bytes in the chunk sizes given (then whatever is asked for), as a
/// socket may: the startup reader must not care how its packet is split.
struct Chunked<'a> {
    data: &'a [u8],
    chunks: Vec<usize>,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        // A zero-byte chunk would read as EOF; a socket never returns one before the end.
        let chunk = this.chunks.pop().unwrap_or(usize::MAX).max(1);
        let n = chunk.min(buf.remaining()).min(this.data.len());
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

fn block_on<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(fut)
}

/// A valid StartupMessage with random parameters, or one of the special requests.
fn valid_startup(rng: &mut Rng) -> Vec<u8> {
    let code = match rng.usize(..5) {
        0 => SSL_REQUEST,
        1 => GSSENC_REQUEST,
        2 => CANCEL_REQUEST,
        _ => PROTOCOL_3,
    };
    let mut packet = vec![0, 0, 0, 0];
    packet.extend_from_slice(&code.to_be_bytes());
    match code {
        CANCEL_REQUEST => packet.extend(rng.bytes(8)),
        PROTOCOL_3 => {
            for _ in 0..rng.usize(..5) {
                let key = rng.pick(&["user", "database", "application_name", "options", "x"]);
                packet.extend_from_slice(key.as_bytes());
                packet.push(0);
                let value: Vec<u8> = (0..rng.usize(..40))
                    .map(|_| b'a' + rng.usize(..26) as u8)
                    .collect();
                packet.extend(value);
                packet.push(0);
            }
            packet.push(0);
        }
        _ => {}
    }
    let len = packet.len() as u32;
    packet[..4].copy_from_slice(&len.to_be_bytes());
    packet
}

/// Random bytes, a random header over a random body, or a valid packet mutated.
fn startup_input(rng: &mut Rng) -> Vec<u8> {
    match rng.usize(..3) {
        0 => {
            let n = rng.usize(..40);
            rng.bytes(n)
        }
        1 => {
            let mut v = rng.edgy_u32().to_be_bytes().to_vec();
            let code = match rng.usize(..5) {
                0 => rng.pick(&[SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST, PROTOCOL_3]),
                1 => (3 << 16) | rng.usize(..8) as u32,
                2 => (rng.usize(..8) as u32) << 16,
                _ => rng.u32(..),
            };
            v.extend_from_slice(&code.to_be_bytes());
            let body = if rng.chance(8) {
                rng.usize(..MAX_STARTUP_LEN + 16)
            } else {
                rng.usize(..64)
            };
            v.extend(rng.bytes(body));
            v
        }
        _ => {
            let mut v = valid_startup(rng);
            mutate(rng, &mut v);
            v
        }
    }
}

/// A few random edits: flipped or replaced bytes, a cut, an insertion, trailing bytes.
fn mutate(rng: &mut Rng, v: &mut Vec<u8>) {
    for _ in 0..=rng.usize(..3) {
        match rng.usize(..5) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.usize(..8);
            }
            1 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] = rng.u8(..);
            }
            2 if !v.is_empty() => {
                let cut = rng.usize(..v.len());
                v.truncate(cut);
            }
            3 => {
                let i = rng.usize(..v.len() + 1);
                let b = rng.u8(..);
                v.insert(i, b);
            }
            _ => {
                let n = rng.usize(..16);
                v.extend(rng.bytes(n));
            }
        }
    }
}

/// What a read_startup result says, comparable across readers.
fn outcome(r: &Result<StartupRequest, WireError>) -> (String, Option<Vec<u8>>) {
    match r {
        Ok(StartupRequest::Startup(p)) => ("startup".into(), Some(p.to_vec())),
        Ok(StartupRequest::Cancel(p)) => ("cancel".into(), Some(p.to_vec())),
        Ok(other) => (format!("{other:?}"), None),
        Err(WireError::Io(e)) => (format!("io {:?}", e.kind()), None),
        Err(e) => (format!("error {:?}", e.reason()), None),
    }
}

#[test]
fn startup_reader_never_panics_and_reads_exactly_its_packet() {
    check("startup", 20_000, |rng| {
        let input = startup_input(rng);
        let mut whole: &[u8] = &input;
        let result = block_on(read_startup(&mut whole));
        let consumed = input.len() - whole.len();
        let declared = input
            .get(..4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize);
        if let Ok(request) = &result {
            // Never more than its own packet: after an SSLRequest the next bytes are TLS.
            assert_eq!(Some(consumed), declared, "{request:?} from {input:?}");
            assert!((8..=MAX_STARTUP_LEN).contains(&consumed), "{input:?}");
        }
        if let Ok(StartupRequest::Startup(p)) = &result {
            assert_eq!(&p[..], &input[..consumed]);
            assert_eq!(p[4..6], [0, 3], "protocol major 3: {input:?}");
            assert_eq!(p.last(), Some(&0), "{input:?}");
        }
        if let Ok(StartupRequest::Cancel(p)) = &result {
            assert_eq!(&p[..], &input[..consumed]);
            assert!(
                (CANCEL_MIN_LEN..=CANCEL_MAX_LEN).contains(&consumed),
                "{input:?}"
            );
            assert_eq!(p[4..8], CANCEL_REQUEST.to_be_bytes());
        }
        if let Ok(StartupRequest::Ssl) = &result {
            assert_eq!(input[..8], wire_request(SSL_REQUEST));
        }
        if let Ok(StartupRequest::GssEnc) = &result {
            assert_eq!(input[..8], wire_request(GSSENC_REQUEST));
        }
        if input.is_empty() {
            assert!(matches!(result, Err(WireError::ClosedBeforeStartup)));
        }
        // A cut anywhere inside the packet is an unexpected end, never an accepted packet.
        if let Some(len) = declared.filter(|l| (8..=MAX_STARTUP_LEN).contains(l)) {
            if (1..len).contains(&input.len()) {
                assert_eq!(
                    outcome(&result).0,
                    "error Some(\"unexpected_eof\")",
                    "{input:?}"
                );
            }
        }
        // The same bytes in random pieces: the same answer.
        let chunks = (0..rng.usize(..12)).map(|_| rng.usize(..10)).collect();
        let mut chunked = Chunked {
            data: &input,
            chunks,
        };
        let split = block_on(read_startup(&mut chunked));
        assert_eq!(outcome(&split), outcome(&result), "{input:?}");
        if result.is_ok() {
            assert_eq!(input.len() - chunked.data.len(), consumed);
        }
    });
}

fn wire_request(code: u32) -> [u8; 8] {
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&8u32.to_be_bytes());
    v[4..].copy_from_slice(&code.to_be_bytes());
    v
}

/// A message stream: valid messages with bodies of random sizes (a few large), sometimes with
/// a bad header or random bytes spliced in.
fn message_stream(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(4) {
        let n = rng.usize(..200);
        return rng.bytes(n);
    }
    let mut v = Vec::new();
    for _ in 0..rng.usize(..20) {
        let kind = rng.pick(b"QPBEDSHXCcdfF1Z");
        // Sizes past 255 and 65535 put non-zero bytes in every position of the length field.
        let body = match rng.usize(..30) {
            0 => rng.usize(..70_000),
            1..=6 => rng.usize(..2_000),
            _ => rng.usize(..64),
        };
        v.push(kind);
        v.extend_from_slice(&((body + 4) as u32).to_be_bytes());
        v.extend(rng.bytes(body));
    }
    if rng.chance(3) {
        let at = rng.usize(..v.len() + 1);
        let mut bad = vec![rng.u8(..)];
        bad.extend_from_slice(&rng.edgy_u32().to_be_bytes());
        v.splice(at..at, bad);
    }
    if rng.chance(4) && !v.is_empty() {
        let cut = rng.usize(..v.len());
        v.truncate(cut);
    }
    v
}

/// Headers of `stream` read in one pass over the whole buffer, whether it ended in an error,
/// and whether it ended exactly at a message boundary.
fn whole_parse(stream: &[u8]) -> (Vec<Header>, bool, bool) {
    let mut headers = Vec::new();
    let mut pos = 0;
    loop {
        if pos == stream.len() {
            return (headers, false, true);
        }
        match Header::parse(&stream[pos..]) {
            Ok(Some(h)) => {
                headers.push(h);
                pos += h.total();
                if pos > stream.len() {
                    return (headers, false, false);
                }
            }
            Ok(None) => return (headers, false, false),
            Err(_) => return (headers, true, false),
        }
    }
}

#[test]
fn boundary_tracker_finds_the_same_headers_however_the_stream_is_split() {
    check("boundaries", 5_000, |rng| {
        let stream = message_stream(rng);
        let (expected, fails, at_end) = whole_parse(&stream);
        let mut tracker = BoundaryTracker::default();
        let mut seen = Vec::new();
        let mut failed = false;
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = match rng.usize(..4) {
                0 => rng.usize(..6),
                1 => rng.usize(..64),
                2 => rng.usize(..9000),
                _ => rest.len(),
            }
            .min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            if tracker.feed(chunk, |h| seen.push(h)).is_err() {
                failed = true;
                break;
            }
        }
        assert_eq!(seen, expected, "headers of a {}-byte stream", stream.len());
        assert_eq!(failed, fails, "error of a {}-byte stream", stream.len());
        if !fails {
            assert_eq!(tracker.at_boundary(), at_end);
        }
    });
}

#[test]
fn body_decoders_never_panic_and_agree_with_the_bytes() {
    check("bodies", 20_000, |rng| {
        let (body, expected) = if rng.chance(2) {
            let (body, expected) = bind_body(rng);
            (body, Some(expected))
        } else {
            let n = rng.usize(..80);
            (rng.bytes(n), None)
        };
        let mut body = body;
        let mutated = expected.is_some() && rng.chance(3);
        if mutated {
            mutate(rng, &mut body);
        }
        let decoded = bind_params(&body);
        match (&expected, mutated) {
            (Some((statement, params)), false) => {
                let (s, p) = decoded.as_ref().expect("a valid Bind decodes");
                assert_eq!(s, statement);
                let p: Vec<(Option<Vec<u8>>, bool)> =
                    p.iter().map(|(v, b)| (v.map(<[u8]>::to_vec), *b)).collect();
                assert_eq!(&p, params);
            }
            _ => {
                if let Some((statement, params)) = &decoded {
                    assert!(!statement.contains('\0'));
                    let bytes: usize = params.iter().filter_map(|(v, _)| v.map(<[u8]>::len)).sum();
                    assert!(bytes + 4 * params.len() <= body.len(), "{body:?}");
                }
            }
        }
        if let Some((name, sql)) = parse_text(&body) {
            let mut prefix = name.as_bytes().to_vec();
            prefix.push(0);
            prefix.extend_from_slice(sql.as_bytes());
            prefix.push(0);
            assert!(body.starts_with(&prefix));
        }
        if let Some(sql) = query_text(&body) {
            assert!(body.starts_with(sql.as_bytes()) && body.get(sql.len()) == Some(&0));
        }
        if let Some(name) = closed_statement(&body) {
            assert_eq!(body[0], b'S');
            assert!(body[1..].starts_with(name.as_bytes()));
        }
        let _ = error_fields(&body);
        // A rebuilt ErrorResponse is always one well-framed message.
        let stripped = strip_error_internals(&body);
        let header = Header::parse(&stripped)
            .expect("valid length")
            .expect("a header");
        assert_eq!((header.kind, header.total()), (b'E', stripped.len()));
    });
}

/// A Parse body's decoding of what was generated.
#[test]
fn parse_bodies_decode_to_their_name_and_text() {
    check("parse", 5_000, |rng| {
        let name: String = (0..rng.usize(..10))
            .map(|_| char::from(b'a' + rng.usize(..26) as u8))
            .collect();
        let sql: String = (0..rng.usize(..100))
            .map(|_| rng.pick(&['s', 'e', 'l', ' ', '1', 'é', '\'', ';']))
            .collect();
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        let types = rng.usize(..4) as i16;
        body.extend_from_slice(&types.to_be_bytes());
        for _ in 0..types {
            body.extend_from_slice(&rng.u32(..).to_be_bytes());
        }
        assert_eq!(parse_text(&body), Some((name.as_str(), sql.as_str())));
        let cut = rng.usize(..name.len() + sql.len() + 2);
        assert_eq!(parse_text(&body[..cut]), None, "cut at {cut}");
    });
}

type Expected = (String, Vec<(Option<Vec<u8>>, bool)>);

/// A valid Bind body with random names, format codes and parameters, and its decoding.
fn bind_body(rng: &mut Rng) -> (Vec<u8>, Expected) {
    let name = |rng: &mut Rng| -> String {
        (0..rng.usize(..8))
            .map(|_| char::from(b'a' + rng.usize(..26) as u8))
            .collect()
    };
    let portal = name(rng);
    let statement = name(rng);
    let n = rng.usize(..6);
    let formats: Vec<bool> = match rng.usize(..3) {
        0 => Vec::new(),
        1 => vec![rng.chance(2)],
        _ => (0..n).map(|_| rng.chance(2)).collect(),
    };
    let mut body = portal.into_bytes();
    body.push(0);
    body.extend_from_slice(statement.as_bytes());
    body.push(0);
    body.extend_from_slice(&(formats.len() as i16).to_be_bytes());
    for f in &formats {
        body.extend_from_slice(&i16::from(*f).to_be_bytes());
    }
    body.extend_from_slice(&(n as i16).to_be_bytes());
    let mut params = Vec::new();
    for i in 0..n {
        let binary = match formats.len() {
            0 => false,
            1 => formats[0],
            _ => formats[i],
        };
        if rng.chance(4) {
            body.extend_from_slice(&(-1i32).to_be_bytes());
            params.push((None, binary));
        } else {
            let len = rng.usize(..20);
            let value = rng.bytes(len);
            body.extend_from_slice(&(len as i32).to_be_bytes());
            body.extend_from_slice(&value);
            params.push((Some(value), binary));
        }
    }
    let results = rng.usize(..3) as i16;
    body.extend_from_slice(&results.to_be_bytes());
    for _ in 0..results {
        body.extend_from_slice(&(rng.usize(..2) as i16).to_be_bytes());
    }
    (body, (statement, params))
}
