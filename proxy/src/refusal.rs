//! How the front door refuses a statement without desynchronising the session.
//!
//! A refusal must look to the client exactly like a Postgres error: the ErrorResponse arrives
//! after the responses to everything sent before it, the transaction block becomes failed
//! (status 'E', later statements get 25P02) just as it would for any error, and in the
//! extended protocol the messages up to Sync are skipped. Emulating all of that in the proxy
//! means modelling the server's state machine. Instead pgmm lets Postgres do it: the refused
//! statement is replaced by a `DO` block that raises the refusal (SQLSTATE 42501), so the
//! server produces the error, the transaction status and the ReadyForQuery itself, and the
//! write never reaches the table.
//!
//! In the extended protocol the replacement is Parse/Bind/Execute of that `DO` block, whose
//! ParseComplete and BindComplete the client must not see: the [`ResponseFilter`] holds those
//! two back and drops them when the error that follows is the expected refusal.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::BytesMut;

use crate::wire;

/// SQL that makes Postgres raise `message` with SQLSTATE `sqlstate`.
pub fn raise_sql(sqlstate: &str, message: &str) -> String {
    let body_tag = unused_tag(message, "pgmm");
    let msg_tag = unused_tag(message, "msg");
    format!(
        "DO ${body_tag}$BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', \
         MESSAGE = ${msg_tag}${message}${msg_tag}$; END${body_tag}$"
    )
}

/// A dollar-quote tag that does not occur in `text`, so any table name can be quoted.
fn unused_tag(text: &str, base: &str) -> String {
    let mut tag = base.to_string();
    let mut n = 0;
    while text.contains(&format!("${tag}$")) {
        n += 1;
        tag = format!("{base}{n}");
    }
    tag
}

/// Extended-protocol replacement of a refused Parse: Parse, Bind and Execute of the raise,
/// on the unnamed statement and portal (the client's pipeline is being aborted anyway).
pub fn extended_replacement(sql: &str, out: &mut BytesMut) {
    use postgres_protocol::message::frontend;
    frontend::parse("", sql, std::iter::empty(), out).expect("statement text has no NUL");
    frontend::bind(
        "",
        "",
        std::iter::empty::<i16>(),
        std::iter::empty::<()>(),
        |_, _| -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            unreachable!("no parameters")
        },
        std::iter::empty::<i16>(),
        out,
    )
    .map_err(|_| ())
    .expect("bind without parameters cannot fail");
    frontend::execute("", 0, out).expect("unnamed portal");
}

/// Simple-protocol replacement of a refused Query.
pub fn simple_replacement(sql: &str, out: &mut BytesMut) {
    postgres_protocol::message::frontend::query(sql, out).expect("statement text has no NUL");
}

/// A refusal sent to the server whose error has not come back yet.
#[derive(Debug)]
struct Expected {
    message: String,
    extended: bool,
}

/// Refusals in flight, shared by the two directions of one session. The count lets the
/// server-to-client direction stay on its fast path (one atomic load) when nothing is pending.
#[derive(Debug, Default)]
pub struct Pending {
    count: AtomicUsize,
    queue: Mutex<VecDeque<Expected>>,
}

impl Pending {
    /// Registers a refusal; must happen before its replacement is written to the server.
    pub fn push(&self, message: String, extended: bool) {
        self.queue
            .lock()
            .expect("poisoned")
            .push_back(Expected { message, extended });
        self.count.fetch_add(1, Ordering::Release);
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Whether an ErrorResponse body is the oldest pending refusal, and if so whether it came
    /// from an extended-protocol replacement.
    fn matches(&self, body: &[u8]) -> Option<bool> {
        let (code, message) = wire::error_fields(body);
        let queue = self.queue.lock().expect("poisoned");
        let front = queue.front()?;
        (code == Some("42501") && message == Some(front.message.as_str())).then_some(front.extended)
    }

    /// A ReadyForQuery ends the cycle of the oldest refusal, whether or not its error was
    /// raised (an earlier error in the same cycle makes the server skip the replacement).
    fn complete(&self) {
        if self.queue.lock().expect("poisoned").pop_front().is_some() {
            self.count.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Rewrites the server-to-client stream while refusals are pending.
#[derive(Debug, Default)]
pub struct ResponseFilter {
    /// ParseComplete, or ParseComplete + BindComplete, that may belong to a replacement.
    held: BytesMut,
}

impl ResponseFilter {
    /// True when the filter holds nothing and may be bypassed.
    pub fn is_idle(&self) -> bool {
        self.held.is_empty()
    }

    /// Whether a message of this kind must be complete in the buffer before [`Self::message`].
    pub fn needs_whole(kind: u8) -> bool {
        matches!(kind, b'1' | b'2' | b'E' | b'Z')
    }

    /// Handles one complete server message (type byte included), appending what the client
    /// should receive to `out`.
    pub fn message(&mut self, pending: &Pending, msg: &[u8], out: &mut BytesMut) {
        match msg[0] {
            b'1' => {
                out.extend_from_slice(&self.held.split());
                self.held.extend_from_slice(msg);
            }
            b'2' if self.held.len() == 5 => self.held.extend_from_slice(msg),
            b'E' => match pending.matches(&msg[5..]) {
                Some(extended) => {
                    if extended {
                        self.held.clear();
                    } else {
                        out.extend_from_slice(&self.held.split());
                    }
                    out.extend_from_slice(&wire::strip_error_internals(&msg[5..]));
                }
                None => {
                    out.extend_from_slice(&self.held.split());
                    out.extend_from_slice(msg);
                }
            },
            b'Z' => {
                out.extend_from_slice(&self.held.split());
                out.extend_from_slice(msg);
                pending.complete();
            }
            _ => {
                out.extend_from_slice(&self.held.split());
                out.extend_from_slice(msg);
            }
        }
    }

    /// A message that is relayed as it streams in: whatever is held goes first.
    pub fn release(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&self.held.split());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn error(code: &str, message: &str) -> Vec<u8> {
        let body = format!("SERROR\0C{code}\0M{message}\0WPL/pgSQL function\0\0");
        msg(b'E', body.as_bytes())
    }

    fn run(pending: &Pending, stream: &[Vec<u8>]) -> Vec<u8> {
        let mut f = ResponseFilter::default();
        let mut out = BytesMut::new();
        for m in stream {
            f.message(pending, m, &mut out);
        }
        out.to_vec()
    }

    const REFUSED: &str = "table \"public.x\" is owned by node \"b\"; write it through node \"b\"";

    #[test]
    fn extended_refusal_hides_replacement_completions() {
        let pending = Pending::default();
        pending.push(REFUSED.into(), true);
        // An earlier statement in the same pipeline: Parse, Bind, Execute all succeed.
        let earlier = [msg(b'1', b""), msg(b'2', b""), msg(b'C', b"INSERT 0 1\0")];
        let mut stream = earlier.to_vec();
        stream.extend([
            msg(b'1', b""),
            msg(b'2', b""),
            error("42501", REFUSED),
            msg(b'Z', b"T"),
        ]);
        let mut expected: Vec<u8> = earlier.concat();
        expected.extend(msg(b'E', format!("SERROR\0C42501\0M{REFUSED}\0\0").as_bytes()));
        expected.extend(msg(b'Z', b"T"));
        assert_eq!(run(&pending, &stream), expected);
        assert!(pending.is_empty());
    }

    #[test]
    fn earlier_error_in_cycle_passes_through_untouched() {
        let pending = Pending::default();
        pending.push(REFUSED.into(), true);
        let stream = [msg(b'1', b""), msg(b'2', b""), error("23505", "dup"), msg(b'Z', b"E")];
        assert_eq!(run(&pending, &stream), stream.concat());
        assert!(pending.is_empty());
    }

    #[test]
    fn other_errors_with_same_code_are_not_swallowed() {
        let pending = Pending::default();
        pending.push(REFUSED.into(), true);
        let stream = [msg(b'1', b""), msg(b'2', b""), error("42501", "permission denied"), msg(b'Z', b"I")];
        assert_eq!(run(&pending, &stream), stream.concat());
    }

    #[test]
    fn simple_refusal_keeps_everything_but_internals() {
        let pending = Pending::default();
        pending.push(REFUSED.into(), false);
        let out = run(&pending, &[error("42501", REFUSED), msg(b'Z', b"I")]);
        let mut expected = msg(b'E', format!("SERROR\0C42501\0M{REFUSED}\0\0").as_bytes());
        expected.extend(msg(b'Z', b"I"));
        assert_eq!(out, expected);
    }

    #[test]
    fn raise_sql_quotes_any_name() {
        let sql = raise_sql("42501", "table \"a$msg$b\" it's");
        assert!(sql.contains("$msg1$table \"a$msg$b\" it's$msg1$"), "{sql}");
    }
}
