//! Writing to stdout and stderr when nobody may be reading any more.
//!
//! `println!` and `eprintln!` panic when the write fails, and Rust ignores SIGPIPE, so a write
//! to a pipe whose reader has gone (`pgmm demo 2>&1 | tee log`, then Ctrl-C: `tee` gets the
//! SIGINT too and exits first) returns EPIPE and panics the task that printed. For the demo that
//! was the signal watcher, so Ctrl-C never reached the cleanup: its Postgres servers and
//! temporary directory were left behind. Output is advisory; losing it must never change what
//! the process does, so everything here drops write errors.
//!
//! [`Stderr`] does the same for tracing: `tracing-subscriber` reports a failed write with
//! `eprintln!` (which, stderr being the writer that failed, panics in turn).

use std::fmt;
use std::io::{self, Write};

/// Writes `args` and a newline to stdout, in one write, dropping any error.
pub fn out(args: fmt::Arguments<'_>) {
    let mut text = args.to_string();
    text.push('\n');
    out_text(&text);
}

/// Writes `text` to stdout as is and flushes, dropping any error.
pub fn out_text(text: &str) {
    let mut stdout = io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// Writes `args` and a newline to stderr, in one write, dropping any error.
pub fn err(args: fmt::Arguments<'_>) {
    let mut text = args.to_string();
    text.push('\n');
    let _ = io::stderr().lock().write_all(text.as_bytes());
}

/// A `tracing-subscriber` writer to stderr that reports every write as done, whether or not it
/// got there: a log line nobody can read is not worth failing anything for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Stderr;

    fn make_writer(&'a self) -> Self::Writer {
        Stderr
    }
}
