//! Schema changes as they travel: the `pgmm.ddl` message the origin's event trigger writes
//! (`schema::ddl`), and how the one statement it stands for is cut out of the client's text.
//!
//! The event trigger sees `current_query()`, which is the whole text the client sent: for a
//! simple Query with several statements (`CREATE TABLE t (...); INSERT INTO t ...`) that is all
//! of them, and replaying it would run the INSERT twice on every peer (once from the text, once
//! from the row change). So the message carries the command tag too, and [`Statements`] splits
//! the text the way the server's lexer does (quotes, dollar quotes, comments, `BEGIN ATOMIC`
//! bodies) and hands each message the next statement whose leading keywords make its tag. When
//! no statement does, the DDL ran inside another statement (a `DO` block, a function, a
//! procedure): the enclosing statement is replayed once per transaction, and the shipper warns
//! when that transaction also changed rows (see docs/SCHEMA_CHANGES.md).

use serde::Deserialize;

/// What the origin's event trigger writes for one DDL command (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DdlMessage {
    /// The command tag, e.g. `CREATE TABLE`, `ALTER TABLE`, `COMMENT`.
    pub tag: String,
    /// `current_query()`: the client's whole text.
    pub query: String,
    /// The origin session's `search_path`.
    pub search_path: String,
    /// The origin session's `current_user`.
    pub role: String,
}

impl DdlMessage {
    pub fn parse(content: &[u8]) -> Option<DdlMessage> {
        serde_json::from_slice(content).ok()
    }
}

/// Where the messages of one transaction are in the texts they came from.
#[derive(Debug, Default)]
pub struct Statements {
    /// The last text seen, its statements and how many of them have been handed out.
    current: Option<(String, Vec<String>, usize)>,
    /// Enclosing statements already handed out whole (DDL run inside a DO block or function).
    enclosing: Vec<String>,
}

/// The statement a DDL message stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Picked {
    /// The statement itself.
    Own(String),
    /// The statement the DDL ran inside (a DO block, a function call), replayed whole.
    Enclosing(String),
    /// Already handed out: another DDL command of the same enclosing statement.
    Again,
}

impl Statements {
    /// The statement of the next message with `tag` from `query`.
    pub fn pick(&mut self, tag: &str, query: &str) -> Picked {
        if self.current.as_ref().is_none_or(|(q, _, _)| q != query) {
            self.current = Some((query.to_owned(), split(query), 0));
        }
        let (_, statements, next) = self.current.as_mut().expect("set above");
        // The next statement with the tag; before it, from the start (the same text run
        // again later in the transaction).
        let found = statements[*next..]
            .iter()
            .position(|s| has_tag(s, tag))
            .map(|i| i + *next)
            .or_else(|| statements.iter().position(|s| has_tag(s, tag)));
        if let Some(i) = found {
            *next = i + 1;
            return Picked::Own(statements[i].clone());
        }
        // The DDL ran inside a statement: the one after the last handed out, or the only one.
        let i = (*next).min(statements.len().saturating_sub(1));
        let Some(enclosing) = statements.get(i).cloned() else {
            return Picked::Enclosing(query.trim().to_owned());
        };
        if self.enclosing.contains(&enclosing) {
            return Picked::Again;
        }
        self.enclosing.push(enclosing.clone());
        Picked::Enclosing(enclosing)
    }
}

/// Whether `statement`'s leading keywords make the command tag `tag`: its first word is the
/// tag's first, and the tag's other words follow in order among its first few words (so
/// `CREATE UNIQUE INDEX CONCURRENTLY` is a `CREATE INDEX`, `CREATE OR REPLACE FUNCTION` a
/// `CREATE FUNCTION`, `CREATE TABLE x AS SELECT` a `CREATE TABLE AS`).
pub fn has_tag(statement: &str, tag: &str) -> bool {
    let words = leading_words(statement, 12);
    let mut tag_words = tag.split_whitespace().map(str::to_ascii_uppercase);
    let Some(first) = tag_words.next() else {
        return false;
    };
    if words.first() != Some(&first) {
        return false;
    }
    let mut rest = words.iter().skip(1);
    tag_words.all(|t| rest.any(|w| *w == t))
}

/// `statement` without the `CONCURRENTLY` of a CREATE INDEX, DROP INDEX or REINDEX, which
/// cannot run inside the apply transaction (see `apply::ddl`); any other statement unchanged.
pub fn without_concurrently(statement: &str) -> std::borrow::Cow<'_, str> {
    let concurrent = ["CREATE INDEX", "DROP INDEX", "REINDEX"]
        .iter()
        .any(|tag| has_tag(statement, tag));
    if concurrent {
        let mut lexer = Lexer::new(statement);
        for _ in 0..8 {
            match lexer.next_token() {
                None => break,
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("CONCURRENTLY") => {
                    let at = w.as_ptr() as usize - statement.as_ptr() as usize;
                    let out = format!("{}{}", &statement[..at], &statement[at + w.len()..]);
                    return std::borrow::Cow::Owned(out);
                }
                Some(_) => {}
            }
        }
    }
    std::borrow::Cow::Borrowed(statement)
}

/// The first `n` words of `statement` (identifiers and keywords, upper-cased; quoted
/// identifiers and literals are skipped, comments ignored).
fn leading_words(statement: &str, n: usize) -> Vec<String> {
    let mut words = Vec::new();
    let mut lexer = Lexer::new(statement);
    while words.len() < n {
        match lexer.next_token() {
            None => break,
            Some(Token::Word(w)) => words.push(w.to_ascii_uppercase()),
            Some(_) => {}
        }
    }
    words
}

/// The statements of `text`, each trimmed and without its `;`, empty ones dropped.
pub fn split(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lexer = Lexer::new(text);
    let mut start = 0;
    // psql's rule for SQL-standard bodies: inside CREATE FUNCTION/PROCEDURE, BEGIN (ATOMIC)
    // and CASE open a block that END closes, and a `;` inside a block does not end the
    // statement.
    let mut words_in_statement = 0usize;
    let mut routine = false;
    let mut depth = 0usize;
    let mut first = String::new();
    while let Some(token) = lexer.next_token() {
        match token {
            Token::Word(w) => {
                let upper = w.to_ascii_uppercase();
                if words_in_statement == 0 {
                    first = upper.clone();
                } else if first == "CREATE" && (upper == "FUNCTION" || upper == "PROCEDURE") {
                    routine = true;
                }
                words_in_statement += 1;
                if routine {
                    match upper.as_str() {
                        "BEGIN" | "CASE" => depth += 1,
                        "END" => depth = depth.saturating_sub(1),
                        _ => {}
                    }
                }
            }
            Token::Semicolon(at) if depth == 0 => {
                push_statement(&mut out, &text[start..at]);
                start = at + 1;
                words_in_statement = 0;
                routine = false;
                first.clear();
            }
            Token::Semicolon(_) | Token::Other => {}
        }
    }
    push_statement(&mut out, &text[start..]);
    out
}

fn push_statement(out: &mut Vec<String>, text: &str) {
    let trimmed = text.trim();
    if !trimmed.is_empty() && !leading_words(trimmed, 1).is_empty() {
        out.push(trimmed.to_owned());
    }
}

enum Token<'a> {
    Word(&'a str),
    /// A `;` at this byte offset.
    Semicolon(usize),
    Other,
}

/// Just enough of the server's lexer to find words and statement-ending semicolons: single
/// quotes (with `''`, and backslash escapes in `E'...'`), double-quoted identifiers, dollar
/// quotes, `--` and nested `/* */` comments. Malformed text (an unterminated quote) ends at the
/// end of the input, as the server would report it there.
struct Lexer<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Self {
        Lexer { text, at: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        &self.text.as_bytes()[self.at..]
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        let bytes = self.text.as_bytes();
        loop {
            let &b = bytes.get(self.at)?;
            match b {
                b if b.is_ascii_whitespace() => self.at += 1,
                b'-' if self.rest().starts_with(b"--") => {
                    let end = self.rest().iter().position(|&c| c == b'\n');
                    self.at = end.map_or(bytes.len(), |e| self.at + e + 1);
                }
                b'/' if self.rest().starts_with(b"/*") => self.block_comment(),
                b';' => {
                    self.at += 1;
                    return Some(Token::Semicolon(self.at - 1));
                }
                b'\'' => {
                    self.quoted(b'\'', false);
                    return Some(Token::Other);
                }
                b'"' => {
                    self.quoted(b'"', false);
                    return Some(Token::Other);
                }
                b'$' => {
                    if !self.dollar_quote() {
                        self.at += 1;
                    }
                    return Some(Token::Other);
                }
                b if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 => {
                    // E'...' / e'...': an escape string; other prefixes (B, X, U&, N) take
                    // standard quoting, which `quoted` handles when reached.
                    if (b == b'e' || b == b'E') && bytes.get(self.at + 1) == Some(&b'\'') {
                        self.at += 1;
                        self.quoted(b'\'', true);
                        return Some(Token::Other);
                    }
                    let start = self.at;
                    while let Some(&c) = bytes.get(self.at) {
                        if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80 {
                            self.at += 1;
                        } else {
                            break;
                        }
                    }
                    return Some(Token::Word(&self.text[start..self.at]));
                }
                _ => {
                    self.at += 1;
                    return Some(Token::Other);
                }
            }
        }
    }

    fn block_comment(&mut self) {
        let bytes = self.text.as_bytes();
        let mut depth = 0usize;
        while self.at < bytes.len() {
            if bytes[self.at..].starts_with(b"/*") {
                depth += 1;
                self.at += 2;
            } else if bytes[self.at..].starts_with(b"*/") {
                depth -= 1;
                self.at += 2;
                if depth == 0 {
                    return;
                }
            } else {
                self.at += 1;
            }
        }
    }

    /// From an opening `quote` to past its closing one (a doubled quote is part of the text).
    fn quoted(&mut self, quote: u8, backslash: bool) {
        let bytes = self.text.as_bytes();
        self.at += 1;
        while let Some(&c) = bytes.get(self.at) {
            self.at += 1;
            if backslash && c == b'\\' {
                self.at += 1;
            } else if c == quote {
                if bytes.get(self.at) == Some(&quote) {
                    self.at += 1;
                } else {
                    return;
                }
            }
        }
        self.at = self.at.min(bytes.len());
    }

    /// `$tag$ ... $tag$` from here; false (nothing consumed) when this `$` opens no quote
    /// (a parameter `$1`).
    fn dollar_quote(&mut self) -> bool {
        let rest = self.rest();
        let Some(len) = rest[1..].iter().position(|&c| c == b'$') else {
            return false;
        };
        let tag = &rest[..len + 2];
        let valid = tag[1..tag.len() - 1].iter().enumerate().all(|(i, &c)| {
            c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 || (i > 0 && c.is_ascii_digit())
        });
        if !valid {
            return false;
        }
        let body = &rest[tag.len()..];
        let end = body.windows(tag.len()).position(|w| w == tag);
        self.at += tag.len() + end.map_or(body.len(), |e| e + tag.len());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_at_semicolons_outside_quotes_comments_and_bodies() {
        let text = "CREATE TABLE t (a text DEFAULT 'x;y', \"b;\" int); -- c;\n\
                    INSERT INTO t VALUES (E'it\\'s;', 1) /* x; /* y; */ z; */ ;\n\
                    CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $f$ BEGIN RETURN 1; END $f$;\n\
                    CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END;\n\
                    SELECT $1, $$a;b$$;;";
        let got = split(text);
        assert_eq!(got.len(), 5, "{got:#?}");
        assert!(got[0].starts_with("CREATE TABLE t") && got[0].ends_with("int)"));
        // A comment before a statement stays with it; the server skips it.
        assert!(got[1].starts_with("-- c;\nINSERT") && got[1].ends_with("z; */"));
        assert!(got[2].ends_with("END $f$"));
        assert!(got[3].starts_with("CREATE FUNCTION g") && got[3].ends_with("END; END"));
        assert_eq!(got[4], "SELECT $1, $$a;b$$");
    }

    #[test]
    fn a_comment_alone_is_no_statement_and_unterminated_text_ends_the_input() {
        assert!(split("-- nothing\n/* at all */ ;").is_empty());
        assert_eq!(split("SELECT 'open;"), vec!["SELECT 'open;".to_owned()]);
        assert_eq!(
            split("SELECT $a$ open;"),
            vec!["SELECT $a$ open;".to_owned()]
        );
    }

    #[test]
    fn tags_come_from_the_leading_keywords() {
        assert!(has_tag(
            "create unique index concurrently i on t (a)",
            "CREATE INDEX"
        ));
        assert!(has_tag(
            "CREATE OR REPLACE FUNCTION f() ...",
            "CREATE FUNCTION"
        ));
        assert!(has_tag("create table x as select 1", "CREATE TABLE AS"));
        assert!(has_tag(
            "/* lead */ alter table t add column c int",
            "ALTER TABLE"
        ));
        assert!(has_tag("comment on table t is 'x'", "COMMENT"));
        assert!(!has_tag("insert into t values (1)", "CREATE TABLE"));
        assert!(!has_tag(
            "do $$ begin create table t (); end $$",
            "CREATE TABLE"
        ));
        assert!(!has_tag("alter index i rename to j", "ALTER TABLE"));
    }

    #[test]
    fn concurrently_is_dropped_only_where_it_would_fail_in_a_transaction() {
        assert_eq!(
            without_concurrently("create unique index concurrently i on t (a)"),
            "create unique index  i on t (a)"
        );
        assert_eq!(
            without_concurrently("DROP INDEX CONCURRENTLY IF EXISTS i"),
            "DROP INDEX  IF EXISTS i"
        );
        assert_eq!(
            without_concurrently("REINDEX INDEX CONCURRENTLY i"),
            "REINDEX INDEX  i"
        );
        let other = "comment on table t is 'concurrently'";
        assert_eq!(without_concurrently(other), other);
        let named = "create index \"concurrently\" on t (a)";
        assert_eq!(without_concurrently(named), named);
    }

    #[test]
    fn each_message_gets_its_own_statement_of_a_multi_statement_text() {
        let text = "create table t (id int primary key); insert into t values (1); \
                    create index on t (id); alter table t add column c int";
        let mut s = Statements::default();
        assert_eq!(
            s.pick("CREATE TABLE", text),
            Picked::Own("create table t (id int primary key)".into())
        );
        assert_eq!(
            s.pick("CREATE INDEX", text),
            Picked::Own("create index on t (id)".into())
        );
        assert_eq!(
            s.pick("ALTER TABLE", text),
            Picked::Own("alter table t add column c int".into())
        );
        // The same text again: its statements again.
        assert_eq!(
            s.pick("CREATE TABLE", text),
            Picked::Own("create table t (id int primary key)".into())
        );
    }

    #[test]
    fn ddl_inside_a_do_block_replays_the_block_once() {
        let text = "do $$ begin create table a (); create table b (); end $$";
        let mut s = Statements::default();
        assert_eq!(s.pick("CREATE TABLE", text), Picked::Enclosing(text.into()));
        assert_eq!(s.pick("CREATE TABLE", text), Picked::Again);
        // The same text sent again later in the transaction is a new statement.
        let mut s = Statements::default();
        assert_eq!(
            s.pick("CREATE TABLE", "select make_tables()"),
            Picked::Enclosing("select make_tables()".into())
        );
    }

    #[test]
    fn messages_parse_from_the_triggers_json() {
        let m = DdlMessage::parse(
            br#"{"tag" : "CREATE TABLE", "query" : "create table t ()", "search_path" : "\"$user\", public", "role" : "app"}"#,
        )
        .unwrap();
        assert_eq!(m.tag, "CREATE TABLE");
        assert_eq!(m.search_path, "\"$user\", public");
        assert!(DdlMessage::parse(b"not json").is_none());
    }
}
