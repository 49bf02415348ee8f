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

use crate::frontdoor::wire;

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
    /// How many ReadyForQuery the server sends before the one that ends this refusal's cycle.
    cycle: u64,
}

/// Refusals in flight, shared by the two directions of one session. The count lets the
/// server-to-client direction stay on its fast path (one atomic load) when nothing is pending.
///
/// Responses are matched to refusals by counting cycles: every Sync, Query and FunctionCall the
/// server receives ends in exactly one ReadyForQuery (so does start-up), in order. A refusal
/// pipelined behind other cycles must not be taken for theirs.
#[derive(Debug, Default)]
pub struct Pending {
    count: AtomicUsize,
    queue: Mutex<VecDeque<Expected>>,
}

impl Pending {
    /// Registers a refusal that the server will see in cycle `cycle` (the number of
    /// ReadyForQuery-producing messages sent before it, start-up included); must happen before
    /// its replacement is written to the server.
    pub fn push(&self, message: String, extended: bool, cycle: u64) {
        self.queue.lock().expect("poisoned").push_back(Expected {
            message,
            extended,
            cycle,
        });
        self.count.fetch_add(1, Ordering::Release);
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Whether the oldest refusal belongs to the cycle `ready_seen` (and, if so, whether it
    /// came from an extended-protocol replacement).
    fn current(&self, ready_seen: u64) -> Option<bool> {
        let queue = self.queue.lock().expect("poisoned");
        let front = queue.front()?;
        (front.cycle == ready_seen).then_some(front.extended)
    }

    /// Whether an ErrorResponse body is the oldest pending refusal's error.
    fn matches(&self, body: &[u8], ready_seen: u64) -> bool {
        let (code, message) = wire::error_fields(body);
        let queue = self.queue.lock().expect("poisoned");
        queue.front().is_some_and(|front| {
            front.cycle == ready_seen
                && code == Some("42501")
                && message == Some(front.message.as_str())
        })
    }

    /// A ReadyForQuery ends cycle `ready_seen`, whether or not its refusal's error was raised
    /// (an earlier error in the same cycle makes the server skip the replacement).
    fn complete(&self, ready_seen: u64) {
        let mut queue = self.queue.lock().expect("poisoned");
        while queue.front().is_some_and(|f| f.cycle <= ready_seen) {
            queue.pop_front();
            self.count.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Rewrites the server-to-client stream while refusals are pending.
#[derive(Debug, Default)]
pub struct ResponseFilter {
    /// ParseComplete, or ParseComplete + BindComplete, that may belong to a replacement.
    held: BytesMut,
    /// ReadyForQuery messages relayed so far (start-up's included).
    ready_seen: u64,
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

    /// Counts a message relayed on the fast path (nothing pending); only ReadyForQuery matters.
    pub fn passed(&mut self, kind: u8) {
        if kind == b'Z' {
            self.ready_seen += 1;
        }
    }

    /// Handles one complete server message (type byte included), appending what the client
    /// should receive to `out`.
    pub fn message(&mut self, pending: &Pending, msg: &[u8], out: &mut BytesMut) {
        match msg[0] {
            b'1' if pending.current(self.ready_seen) == Some(true) => {
                out.extend_from_slice(&self.held.split());
                self.held.extend_from_slice(msg);
            }
            b'2' if self.held.len() == 5 => self.held.extend_from_slice(msg),
            b'E' if pending.matches(&msg[5..], self.ready_seen) => {
                if pending.current(self.ready_seen) == Some(true) {
                    self.held.clear();
                } else {
                    out.extend_from_slice(&self.held.split());
                }
                out.extend_from_slice(&wire::strip_error_internals(&msg[5..]));
            }
            kind => {
                out.extend_from_slice(&self.held.split());
                out.extend_from_slice(msg);
                if kind == b'Z' {
                    pending.complete(self.ready_seen);
                    self.ready_seen += 1;
                }
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
        pending.push(REFUSED.into(), true, 0);
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
        expected.extend(msg(
            b'E',
            format!("SERROR\0C42501\0M{REFUSED}\0\0").as_bytes(),
        ));
        expected.extend(msg(b'Z', b"T"));
        assert_eq!(run(&pending, &stream), expected);
        assert!(pending.is_empty());
    }

    #[test]
    fn earlier_error_in_cycle_passes_through_untouched() {
        let pending = Pending::default();
        pending.push(REFUSED.into(), true, 0);
        let stream = [
            msg(b'1', b""),
            msg(b'2', b""),
            error("23505", "dup"),
            msg(b'Z', b"E"),
        ];
        assert_eq!(run(&pending, &stream), stream.concat());
        assert!(pending.is_empty());
    }

    #[test]
    fn other_errors_with_same_code_are_not_swallowed() {
        let pending = Pending::default();
        pending.push(REFUSED.into(), true, 0);
        let stream = [
            msg(b'1', b""),
            msg(b'2', b""),
            error("42501", "permission denied"),
            msg(b'Z', b"I"),
        ];
        assert_eq!(run(&pending, &stream), stream.concat());
    }

    #[test]
    fn simple_refusal_keeps_everything_but_internals() {
        let pending = Pending::default();
        pending.push(REFUSED.into(), false, 0);
        let out = run(&pending, &[error("42501", REFUSED), msg(b'Z', b"I")]);
        let mut expected = msg(b'E', format!("SERROR\0C42501\0M{REFUSED}\0\0").as_bytes());
        expected.extend(msg(b'Z', b"I"));
        assert_eq!(out, expected);
    }

    #[test]
    fn refusal_behind_an_earlier_cycle_waits_for_its_own() {
        // Close + Sync, then the refused Parse + Describe + Sync, in one write.
        let pending = Pending::default();
        pending.push(REFUSED.into(), true, 1);
        let stream = [
            msg(b'3', b""),
            msg(b'Z', b"I"),
            msg(b'1', b""),
            msg(b'2', b""),
            error("42501", REFUSED),
            msg(b'Z', b"I"),
        ];
        let mut expected = [msg(b'3', b""), msg(b'Z', b"I")].concat();
        expected.extend(msg(
            b'E',
            format!("SERROR\0C42501\0M{REFUSED}\0\0").as_bytes(),
        ));
        expected.extend(msg(b'Z', b"I"));
        assert_eq!(run(&pending, &stream), expected);
        assert!(pending.is_empty());
    }

    #[test]
    fn raise_sql_quotes_any_name() {
        let sql = raise_sql("42501", "table \"a$msg$b\" it's");
        assert!(sql.contains("$msg1$table \"a$msg$b\" it's$msg1$"), "{sql}");
    }
}
