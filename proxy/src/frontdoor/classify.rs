//! Statement classification for the front door: what kind of statement a client sent and which
//! tables it writes, so that ownership can be enforced before Postgres sees the statement.
//!
//! Classification runs on every Query and Parse message, so results are cached by statement
//! text: clients (pgbench, ORMs, prepared statements) repeat the same texts over and over, and a
//! cache hit costs a hash, a lock and an `Arc` clone instead of a tokenize-and-parse.
//!
//! Table names are resolved the way Postgres stores them (unquoted identifiers folded to lower
//! case, names truncated to 63 bytes) but *not* through the session's `search_path`, which the
//! proxy does not track: an unqualified name is taken to be in schema `public`, the default path.
//! A client that changes `search_path` (or writes a same-named temporary table) can therefore be
//! judged against the wrong table; ownership is enforced again on the apply side, which is the
//! authority, and so are writes hidden in functions, triggers and rules, which no parser sees.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;
use sqlparser::ast::{
    Expr, Ident, ObjectName, ObjectNamePart, Query, SetExpr, Statement, TableFactor, TableObject,
    TableWithJoins, UtilityOption, Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::Token;

use crate::config::table::TableName;
use crate::config::DEFAULT_MAX_PARSE_DEPTH;

/// Statement texts longer than this are classified but not cached: long texts are usually
/// generated one-offs (bulk `VALUES` lists) that would only evict the hot statements.
const MAX_CACHED_LEN: usize = 8 * 1024;

/// Postgres truncates identifiers to `NAMEDATALEN - 1` bytes; so must we, or a long spelling
/// of an owned table's name would slip past the ownership check.
const MAX_IDENTIFIER_LEN: usize = 63;

/// What a statement does, as far as routing, ownership and metrics care.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueryKind {
    Read,
    Write,
    Ddl,
    Other,
}

impl QueryKind {
    /// The `kind` label of `pgmm_client_queries_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueryKind::Read => "read",
            QueryKind::Write => "write",
            QueryKind::Ddl => "ddl",
            QueryKind::Other => "other",
        }
    }

    /// A multi-statement string is as strong as its strongest statement: one write among
    /// reads makes the whole string a write.
    fn strength(self) -> u8 {
        match self {
            QueryKind::Read => 0,
            QueryKind::Other => 1,
            QueryKind::Write => 2,
            QueryKind::Ddl => 3,
        }
    }
}

/// The verdict on one statement text (which may hold several statements).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classification {
    pub kind: QueryKind,
    /// Every table the text writes with DML, sorted and deduplicated.
    pub written: Vec<TableName>,
    /// False when sqlparser rejected the text; it is then forwarded unchanged and Postgres
    /// (and the apply side) have the last word.
    pub parsed: bool,
    /// The literal values of each top-level `INSERT ... VALUES`, for row-ownership checks.
    pub inserted: Vec<InsertedRows>,
    /// Not parsed because it nests deeper than the parser's recursion limit.
    pub too_deep: bool,
}

/// What an `INSERT INTO t (columns) VALUES (...), ...` writes, as far as literals tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InsertedRows {
    pub table: TableName,
    /// The column list as written (folded like Postgres); empty when the statement has none.
    pub columns: Vec<String>,
    /// Per row, per column: what the statement gives it.
    pub rows: Vec<Vec<InsertedValue>>,
}

/// One value of an `INSERT ... VALUES` row, as far as the front door can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsertedValue {
    /// A string or number literal's text.
    Literal(String),
    /// `$n` (1-based): known only when the statement is bound.
    Param(usize),
    /// An expression, DEFAULT, ...: only the database can judge it.
    Other,
}

/// Stack the parse of a text may need, per byte of text, beyond what the parser itself
/// allocates on the heap. sqlparser grows its own stack as it recurses (its
/// `recursive-protection` feature) and pgmm's walk recurses only into nested queries, which the
/// recursion limit bounds; but a left-associative chain (`1+1+...`, `x::t::t...`, `a AND a ...`)
/// is parsed by a loop into a tree as deep as the chain is long, and the drop of that tree is
/// recursive. Measured on a debug build (the larger frames): 66 bytes of stack per level, and a
/// level costs at least two bytes of text (`+1`), so 33 bytes per byte; this doubles it (again
/// for a hypothetical one-byte level).
const STACK_PER_BYTE: usize = 128;

/// Stack kept free beyond [`STACK_PER_BYTE`] for everything else the parse calls.
const STACK_BASE: usize = 256 * 1024;

impl Classification {
    /// Classifies `sql` without the cache, with the default recursion limit.
    #[cfg(test)]
    pub fn of(sql: &str) -> Self {
        Self::with_depth(sql, DEFAULT_MAX_PARSE_DEPTH)
    }

    /// Classifies `sql` without the cache, with sqlparser's recursion limit `max_depth`.
    ///
    /// Runs on a stack known to fit the parse: where the current thread has less left than the
    /// text can need, on a fresh one of that size (`stacker`), so no text overflows a stack.
    pub fn with_depth(sql: &str, max_depth: usize) -> Self {
        let need = sql.len().saturating_mul(STACK_PER_BYTE) + STACK_BASE;
        stacker::maybe_grow(need, need, || Self::of_on_this_stack(sql, max_depth))
    }

    fn of_on_this_stack(sql: &str, max_depth: usize) -> Self {
        let mut walk = Walk::default();
        match walk.parse(sql, max_depth) {
            Ok(()) => {
                let mut written = walk.written;
                written.sort_unstable();
                written.dedup();
                Self {
                    kind: walk.kind.unwrap_or(QueryKind::Other),
                    written,
                    parsed: true,
                    inserted: walk.inserted,
                    too_deep: false,
                }
            }
            Err(e) => Self {
                kind: QueryKind::Other,
                written: Vec::new(),
                parsed: false,
                inserted: Vec::new(),
                too_deep: matches!(e, ParserError::RecursionLimitExceeded),
            },
        }
    }
}

/// The kind of a single statement judged by its first keyword alone, for the hot path of
/// statements that cannot touch a table whose ownership matters (the caller checks that):
/// simple-protocol clients send texts with fresh literals every time, which never hit the
/// cache and would otherwise all be parsed. `None` whenever the first keyword does not decide
/// (WITH, COPY, EXPLAIN, PREPARE, DDL, `SELECT ... INTO`, several statements, ...): the caller
/// then takes the full parse. Agrees with [`Classification::of`] wherever it answers.
pub fn quick_kind(sql: &str) -> Option<QueryKind> {
    let text = skip_space_and_comments(sql);
    // One statement only: nothing but space after a first semicolon.
    if let Some(semi) = text.find(';') {
        if !text[semi + 1..].trim().is_empty() {
            return None;
        }
    }
    let word_len = text.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
    let word = &text[..word_len];
    let is = |k: &str| word.eq_ignore_ascii_case(k);
    if is("select") {
        return (!contains_ignore_ascii_case(text, "into")).then_some(QueryKind::Read);
    }
    if ["insert", "update", "delete"].into_iter().any(is) {
        return Some(QueryKind::Write);
    }
    if [
        "begin",
        "commit",
        "end",
        "rollback",
        "savepoint",
        "release",
        "set",
        "reset",
    ]
    .into_iter()
    .any(is)
    {
        return Some(QueryKind::Other);
    }
    None
}

/// The kind of a statement that is not parsed (past the front door's limits), for the queries
/// metric: [`quick_kind`] where it answers, else by the first keyword alone.
pub fn first_keyword_kind(sql: &str) -> QueryKind {
    if let Some(kind) = quick_kind(sql) {
        return kind;
    }
    let text = skip_space_and_comments(sql);
    let word_len = text.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
    let word = &text[..word_len];
    let is = |k: &str| word.eq_ignore_ascii_case(k);
    if ["create", "alter", "drop", "comment", "grant", "revoke"]
        .into_iter()
        .any(is)
    {
        QueryKind::Ddl
    } else if ["with", "values", "table", "show"].into_iter().any(is) {
        QueryKind::Read
    } else {
        QueryKind::Other
    }
}

/// Whether `needle` (lower-case ASCII) occurs in `haystack` in any ASCII case, without the
/// allocation of lower-casing the haystack: this runs on every statement.
pub fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// `sql` after leading white space and `--` / `/* */` comments (nested, as in Postgres).
fn skip_space_and_comments(mut sql: &str) -> &str {
    loop {
        sql = sql.trim_start();
        if let Some(rest) = sql.strip_prefix("--") {
            sql = rest.find('\n').map_or("", |i| &rest[i + 1..]);
        } else if sql.starts_with("/*") {
            let mut depth = 0usize;
            let mut i = 0;
            let bytes = sql.as_bytes();
            while i + 1 < bytes.len() {
                match (bytes[i], bytes[i + 1]) {
                    (b'/', b'*') => {
                        depth += 1;
                        i += 2;
                    }
                    (b'*', b'/') => {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => i += 1,
                }
            }
            if depth != 0 {
                return "";
            }
            sql = &sql[i..];
        } else {
            return sql;
        }
    }
}

/// A classifier with a bounded LRU cache keyed by statement text, shared by all sessions.
pub struct Classifier {
    cache: Mutex<LruCache<Box<str>, Arc<Classification>>>,
    /// The parser's recursion limit (`[client] max_parse_depth`).
    max_depth: usize,
}

impl Classifier {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            cache: Mutex::new(LruCache::new(capacity)),
            max_depth: DEFAULT_MAX_PARSE_DEPTH,
        }
    }

    /// This classifier with the parser's recursion limit `max_depth`.
    pub fn with_max_depth(mut self, max_depth: usize) -> Self {
        self.max_depth = max_depth;
        self
    }

    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        let cacheable = sql.len() <= MAX_CACHED_LEN;
        if cacheable {
            if let Some(hit) = self.lock().get(sql) {
                return Arc::clone(hit);
            }
        }
        // Parse outside the lock: a miss must not stall the other sessions' hits.
        let classification = Arc::new(Classification::with_depth(sql, self.max_depth));
        if cacheable {
            self.lock().put(sql.into(), Arc::clone(&classification));
        }
        classification
    }

    /// The cache holds only immutable, fully built entries, so a panic elsewhere while the lock
    /// was held cannot leave it inconsistent: keep using it rather than failing every session.
    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Box<str>, Arc<Classification>>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn cached(&self) -> usize {
        self.lock().len()
    }
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cache = self.lock();
        f.debug_struct("Classifier")
            .field("cached", &cache.len())
            .field("capacity", &cache.cap())
            .finish()
    }
}

/// Accumulates kind and written tables over a statement tree.
#[derive(Default)]
struct Walk {
    kind: Option<QueryKind>,
    written: Vec<TableName>,
    inserted: Vec<InsertedRows>,
}

impl Walk {
    /// `Parser::parse_sql`, walking each statement, with one addition: a statement may be
    /// `TABLE name` (short for `SELECT * FROM name`), which sqlparser 0.63 accepts only inside a
    /// query, and even there swallows the two tokens after the name (`TABLE t; SELECT 1`).
    fn parse(&mut self, sql: &str, max_depth: usize) -> Result<(), ParserError> {
        let dialect = PostgreSqlDialect {};
        let mut parser = Parser::new(&dialect)
            .with_recursion_limit(max_depth)
            .try_with_sql(sql)?;
        loop {
            while parser.consume_token(&Token::SemiColon) {}
            if parser.peek_token_ref().token == Token::EOF {
                return Ok(());
            }
            if parser.parse_keyword(Keyword::TABLE) {
                parser.parse_object_name(false)?;
                self.raise(QueryKind::Read);
            } else {
                self.statement(&parser.parse_statement()?);
            }
            if !parser.consume_token(&Token::SemiColon)
                && parser.peek_token_ref().token != Token::EOF
            {
                return parser.expected_ref("end of statement", parser.peek_token_ref());
            }
        }
    }

    fn raise(&mut self, kind: QueryKind) {
        if self.kind.is_none_or(|k| kind.strength() > k.strength()) {
            self.kind = Some(kind);
        }
    }

    fn write(&mut self, name: &ObjectName) {
        self.raise(QueryKind::Write);
        if let Some(table) = table_name(name) {
            self.written.push(table);
        }
    }

    fn write_factor(&mut self, factor: &TableFactor) {
        self.raise(QueryKind::Write);
        if let TableFactor::Table { name, alias, .. } = factor {
            match (name.0.as_slice(), alias) {
                // sqlparser reads `UPDATE ONLY t` as table `only` aliased `t`; `only` is
                // reserved in Postgres, so unquoted it can only be the keyword.
                ([ObjectNamePart::Identifier(only)], Some(alias))
                    if only.quote_style.is_none() && only.value.eq_ignore_ascii_case("only") =>
                {
                    self.written
                        .push(TableName::new("public", fold(&alias.name)));
                }
                _ => self.write(name),
            }
        }
    }

    fn statement(&mut self, statement: &Statement) {
        match statement {
            Statement::Query(query) => {
                self.raise(QueryKind::Read);
                self.query(query);
            }
            Statement::Insert(insert) => {
                self.raise(QueryKind::Write);
                match &insert.table {
                    TableObject::TableName(name) => self.write(name),
                    TableObject::TableQuery(query) => self.query(query),
                    TableObject::TableFunction(_) => {}
                }
                if let Some(source) = &insert.source {
                    self.query(source);
                }
                if let Some(rows) = inserted_rows(insert) {
                    self.inserted.push(rows);
                }
            }
            Statement::Update(update) => {
                // Only the target is written; FROM tables are read.
                self.write_factor(&update.table.relation);
                if let Some(from) = &update.from {
                    let (sqlparser::ast::UpdateTableFromKind::BeforeSet(from)
                    | sqlparser::ast::UpdateTableFromKind::AfterSet(from)) = from;
                    self.from(from);
                }
            }
            Statement::Delete(delete) => {
                self.raise(QueryKind::Write);
                if delete.tables.is_empty() {
                    let (sqlparser::ast::FromTable::WithFromKeyword(from)
                    | sqlparser::ast::FromTable::WithoutKeyword(from)) = &delete.from;
                    for target in from {
                        self.write_factor(&target.relation);
                    }
                } else {
                    // `DELETE t1, t2 FROM ...` (not Postgres, but cheap to honour).
                    for name in &delete.tables {
                        self.write(name);
                    }
                }
                if let Some(using) = &delete.using {
                    self.from(using);
                }
            }
            Statement::Merge(merge) => {
                self.write_factor(&merge.table);
                self.factor(&merge.source);
            }
            Statement::Copy { source, to, .. } => match source {
                sqlparser::ast::CopySource::Table { table_name, .. } => {
                    if *to {
                        self.raise(QueryKind::Read);
                    } else {
                        self.write(table_name);
                    }
                }
                // `COPY (DELETE ... RETURNING *) TO STDOUT` is legal: the query decides.
                sqlparser::ast::CopySource::Query(query) => {
                    self.raise(QueryKind::Read);
                    self.query(query);
                }
            },
            Statement::Truncate(truncate) => {
                self.raise(QueryKind::Write);
                for target in &truncate.table_names {
                    self.write(&target.name);
                }
            }
            Statement::Explain {
                analyze,
                options,
                statement,
                ..
            } => {
                self.raise(QueryKind::Read);
                // EXPLAIN ANALYZE runs the statement; plain EXPLAIN only plans it.
                if *analyze || options.as_deref().is_some_and(has_analyze) {
                    self.statement(statement);
                }
            }
            // The prepared statement runs later through EXECUTE, which names only the
            // statement; judge its writes now, when its text is visible.
            Statement::Prepare { statement, .. } => {
                self.raise(QueryKind::Other);
                self.statement(statement);
            }
            Statement::CreateTable(create) => {
                self.raise(QueryKind::Ddl);
                if let Some(query) = &create.query {
                    self.query(query);
                }
            }
            Statement::ExplainTable { .. }
            | Statement::ShowFunctions { .. }
            | Statement::ShowVariable { .. }
            | Statement::ShowStatus { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowCreate { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowCatalogs { .. }
            | Statement::ShowDatabases { .. }
            | Statement::ShowProcessList { .. }
            | Statement::ShowSchemas { .. }
            | Statement::ShowCharset { .. }
            | Statement::ShowObjects { .. }
            | Statement::ShowTables { .. }
            | Statement::ShowViews { .. }
            | Statement::ShowCollation { .. } => self.raise(QueryKind::Read),
            Statement::CreateView { .. }
            | Statement::CreateVirtualTable { .. }
            | Statement::CreateIndex { .. }
            | Statement::CreateRole { .. }
            | Statement::CreateSecret { .. }
            | Statement::CreateServer { .. }
            | Statement::CreatePolicy { .. }
            | Statement::CreateConnector { .. }
            | Statement::CreateOperator { .. }
            | Statement::CreateOperatorFamily { .. }
            | Statement::CreateOperatorClass { .. }
            | Statement::CreateTextSearch { .. }
            | Statement::CreateExtension { .. }
            | Statement::CreateCollation { .. }
            | Statement::CreateSchema { .. }
            | Statement::CreateDatabase { .. }
            | Statement::CreateFunction { .. }
            | Statement::CreateTrigger { .. }
            | Statement::CreateProcedure { .. }
            | Statement::CreateMacro { .. }
            | Statement::CreateStage { .. }
            | Statement::CreateFileFormat { .. }
            | Statement::CreateWarehouse { .. }
            | Statement::CreateSequence { .. }
            | Statement::CreateDomain { .. }
            | Statement::CreateType { .. }
            | Statement::CreateUser { .. }
            | Statement::AlterTable { .. }
            | Statement::AlterSchema { .. }
            | Statement::AlterIndex { .. }
            | Statement::AlterView { .. }
            | Statement::AlterFunction { .. }
            | Statement::AlterType { .. }
            | Statement::AlterCollation { .. }
            | Statement::AlterOperator { .. }
            | Statement::AlterOperatorFamily { .. }
            | Statement::AlterOperatorClass { .. }
            | Statement::AlterTextSearch { .. }
            | Statement::AlterRole { .. }
            | Statement::AlterPolicy { .. }
            | Statement::AlterConnector { .. }
            | Statement::AlterUser { .. }
            | Statement::Drop { .. }
            | Statement::DropFunction { .. }
            | Statement::DropDomain { .. }
            | Statement::DropProcedure { .. }
            | Statement::DropSecret { .. }
            | Statement::DropPolicy { .. }
            | Statement::DropConnector { .. }
            | Statement::DropExtension { .. }
            | Statement::DropOperator { .. }
            | Statement::DropOperatorFamily { .. }
            | Statement::DropOperatorClass { .. }
            | Statement::DropTrigger { .. }
            | Statement::RenameTable { .. }
            | Statement::Comment { .. }
            | Statement::Grant { .. }
            | Statement::Deny { .. }
            | Statement::Revoke { .. } => self.raise(QueryKind::Ddl),
            // Transaction control, session state, LISTEN/NOTIFY, cursors, EXECUTE, DEALLOCATE,
            // CALL, LOCK, VACUUM, ANALYZE, ... and other dialects' statements.
            _ => self.raise(QueryKind::Other),
        }
    }

    /// Finds data-modifying statements in a query's CTEs and body. Postgres allows them only
    /// in a top-level WITH; going deeper (nested WITH, derived tables) is defence in depth,
    /// while subqueries inside expressions, where Postgres rejects them outright, are not
    /// searched.
    fn query(&mut self, query: &Query) {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.query(&cte.query);
            }
        }
        self.set_expr(&query.body);
    }

    fn set_expr(&mut self, body: &SetExpr) {
        match body {
            SetExpr::Select(select) => {
                // `SELECT ... INTO t` creates table t.
                if select.into.is_some() {
                    self.raise(QueryKind::Ddl);
                }
                self.from(&select.from);
            }
            SetExpr::Query(query) => self.query(query),
            SetExpr::SetOperation { left, right, .. } => {
                self.set_expr(left);
                self.set_expr(right);
            }
            SetExpr::Insert(statement)
            | SetExpr::Update(statement)
            | SetExpr::Delete(statement)
            | SetExpr::Merge(statement) => self.statement(statement),
            SetExpr::Values(_) | SetExpr::Table(_) => {}
        }
    }

    fn from(&mut self, from: &[TableWithJoins]) {
        for table in from {
            self.factor(&table.relation);
            for join in &table.joins {
                self.factor(&join.relation);
            }
        }
    }

    fn factor(&mut self, factor: &TableFactor) {
        match factor {
            TableFactor::Derived { subquery, .. } => self.query(subquery),
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => self.from(std::slice::from_ref(table_with_joins)),
            _ => {}
        }
    }
}

/// Whether EXPLAIN's option list turns ANALYZE on (the last mention wins, as in Postgres).
/// Postgres's boolean spellings that mean false are any prefix of `false` or `no`, `of(f)`,
/// and `0`; anything else (including no value) means true, so an unusual spelling errs
/// towards "it executes".
fn has_analyze(options: &[UtilityOption]) -> bool {
    options
        .iter()
        .rfind(|option| option.name.value.eq_ignore_ascii_case("analyze"))
        .is_some_and(|option| match &option.arg {
            None => true,
            Some(Expr::Value(value)) => match &value.value {
                Value::Boolean(on) => *on,
                Value::Number(number, _) => !is_false_word(number),
                Value::SingleQuotedString(word) => !is_false_word(word),
                _ => true,
            },
            Some(Expr::Identifier(word)) => !is_false_word(&word.value),
            Some(_) => true,
        })
}

fn is_false_word(word: &str) -> bool {
    let word = word.trim().to_ascii_lowercase();
    let prefix_of = |full: &str, min: usize| word.len() >= min && full.starts_with(&word);
    word == "0" || prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2)
}

/// `[catalog.]schema.name` or `name` (in `public`) as Postgres would store them; `None` for
/// names built from functions, which Postgres does not have.
/// The literals of `INSERT INTO t (...) VALUES (...)`; `None` for other shapes.
fn inserted_rows(insert: &sqlparser::ast::Insert) -> Option<InsertedRows> {
    let TableObject::TableName(name) = &insert.table else {
        return None;
    };
    let table = table_name(name)?;
    let SetExpr::Values(values) = insert.source.as_ref()?.body.as_ref() else {
        return None;
    };
    let columns = insert
        .columns
        .iter()
        .map(|c| c.0.last().and_then(ObjectNamePart::as_ident).map(fold))
        .collect::<Option<Vec<String>>>()?;
    let rows = values
        .rows
        .iter()
        .map(|row| row.content.iter().map(inserted_value).collect())
        .collect();
    Some(InsertedRows {
        table,
        columns,
        rows,
    })
}

fn inserted_value(expr: &Expr) -> InsertedValue {
    use sqlparser::ast::Value;
    if let Some(text) = literal_text(expr) {
        return InsertedValue::Literal(text);
    }
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => p
                .strip_prefix('$')
                .and_then(|n| n.parse().ok())
                .filter(|n| *n > 0)
                .map_or(InsertedValue::Other, InsertedValue::Param),
            _ => InsertedValue::Other,
        },
        Expr::Nested(inner) => inserted_value(inner),
        _ => InsertedValue::Other,
    }
}

/// The text a string or number literal (possibly negated) stands for.
fn literal_text(expr: &Expr) -> Option<String> {
    use sqlparser::ast::{UnaryOperator, Value};
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            Value::Number(n, _) => Some(n.clone()),
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match expr.as_ref() {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => Some(format!("-{n}")),
                _ => None,
            },
            _ => None,
        },
        Expr::Nested(inner) => literal_text(inner),
        _ => None,
    }
}

fn table_name(name: &ObjectName) -> Option<TableName> {
    let mut parts = name.0.iter().rev().map(ObjectNamePart::as_ident);
    let table = fold(parts.next()??);
    let schema = match parts.next() {
        None => "public".to_owned(),
        Some(ident) => fold(ident?),
    };
    Some(TableName::new(schema, table))
}

/// Folds an identifier like Postgres: unquoted ones to lower case (per character, exactly
/// like `TableName::parse` does for the config, so both sides agree), then truncated.
fn fold(ident: &Ident) -> String {
    let mut folded = if ident.quote_style.is_some() {
        ident.value.clone()
    } else if ident.value.is_ascii() {
        ident.value.to_ascii_lowercase()
    } else {
        ident.value.chars().flat_map(char::to_lowercase).collect()
    };
    if folded.len() > MAX_IDENTIFIER_LEN {
        let mut end = MAX_IDENTIFIER_LEN;
        while !folded.is_char_boundary(end) {
            end -= 1;
        }
        folded.truncate(end);
    }
    folded
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, name: &str) -> TableName {
        TableName::new(schema, name)
    }

    fn p(name: &str) -> TableName {
        t("public", name)
    }

    #[track_caller]
    fn check(sql: &str, kind: QueryKind, written: &[TableName]) {
        let c = Classification::of(sql);
        assert!(c.parsed, "did not parse: {sql}");
        assert_eq!(c.kind, kind, "kind of {sql}");
        assert_eq!(c.written, written, "written by {sql}");
    }

    #[test]
    fn reads() {
        check("SELECT 1", QueryKind::Read, &[]);
        check(
            "select a.x from a join b on a.id = b.id where a.y in (select y from c)",
            QueryKind::Read,
            &[],
        );
        check("VALUES (1), (2)", QueryKind::Read, &[]);
        check("SHOW search_path", QueryKind::Read, &[]);
        check("TABLE t", QueryKind::Read, &[]);
        check("table t; TABLE s.u;", QueryKind::Read, &[]);
        check("TABLE t; SELECT 1", QueryKind::Read, &[]);
        check("TABLE t; DELETE FROM u", QueryKind::Write, &[p("u")]);
        check("SELECT 1 UNION TABLE t", QueryKind::Read, &[]);
        check("EXPLAIN SELECT * FROM t", QueryKind::Read, &[]);
        check("COPY t TO STDOUT", QueryKind::Read, &[]);
        check("COPY (SELECT * FROM t) TO STDOUT", QueryKind::Read, &[]);
        check(
            "COPY \"T\" (a, b) TO STDOUT WITH (FORMAT csv)",
            QueryKind::Read,
            &[],
        );
        check("SELECT * FROM t FOR UPDATE", QueryKind::Read, &[]);
        check(
            "WITH x AS (SELECT 1) SELECT * FROM x, (SELECT 2) y",
            QueryKind::Read,
            &[],
        );
    }

    #[test]
    fn writes() {
        check("INSERT INTO t VALUES (1)", QueryKind::Write, &[p("t")]);
        check(
            "insert into t (a) select a from u on conflict (a) do update set a = excluded.a returning *",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "INSERT INTO t AS x DEFAULT VALUES",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "UPDATE t SET a = u.a FROM u JOIN v ON u.id = v.id WHERE t.id = u.id",
            QueryKind::Write,
            &[p("t")],
        );
        check("UPDATE ONLY t SET a = 1", QueryKind::Write, &[p("t")]);
        check("update only s SET a = 1", QueryKind::Write, &[p("s")]);
        check("UPDATE t AS x SET a = 1", QueryKind::Write, &[p("t")]);
        check(
            "UPDATE \"only\" x SET a = 1",
            QueryKind::Write,
            &[p("only")],
        );
        check(
            "DELETE FROM t USING u WHERE t.id = u.id",
            QueryKind::Write,
            &[p("t")],
        );
        check("DELETE FROM ONLY t", QueryKind::Write, &[p("t")]);
        check(
            "DELETE FROM t AS x WHERE x.a = 1",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "MERGE INTO ONLY t USING u ON t.id = u.id WHEN MATCHED THEN DELETE",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "INSERT INTO t VALUES (1) ON CONFLICT ON CONSTRAINT t_pkey DO NOTHING",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            QueryKind::Write,
            &[p("pgbench_accounts")],
        );
        check(
            "COPY t FROM '/tmp/x.csv' WITH (FORMAT csv, HEADER true)",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "COPY t FROM STDIN WITH CSV HEADER",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = u.a \
             WHEN NOT MATCHED THEN INSERT (id, a) VALUES (u.id, u.a)",
            QueryKind::Write,
            &[p("t")],
        );
        check("COPY t FROM STDIN", QueryKind::Write, &[p("t")]);
        check(
            "COPY s.t (a, b) FROM STDIN WITH (FORMAT csv)",
            QueryKind::Write,
            &[t("s", "t")],
        );
        check("TRUNCATE a, s.b", QueryKind::Write, &[p("a"), t("s", "b")]);
        check(
            "TRUNCATE TABLE ONLY a RESTART IDENTITY CASCADE",
            QueryKind::Write,
            &[p("a")],
        );
    }

    #[test]
    fn names_fold_like_postgres() {
        check("INSERT INTO Foo VALUES (1)", QueryKind::Write, &[p("foo")]);
        check(
            "INSERT INTO \"Foo\" VALUES (1)",
            QueryKind::Write,
            &[p("Foo")],
        );
        check(
            "INSERT INTO Sales.\"Orders\" VALUES (1)",
            QueryKind::Write,
            &[t("sales", "Orders")],
        );
        check(
            "UPDATE \"My Schema\".\"a\"\"b\" SET x = 1",
            QueryKind::Write,
            &[t("My Schema", "a\"b")],
        );
        check("DELETE FROM mydb.public.t", QueryKind::Write, &[p("t")]);
        // Postgres truncates identifiers to 63 bytes.
        let long = "x".repeat(70);
        check(
            &format!("INSERT INTO {long} VALUES (1)"),
            QueryKind::Write,
            &[p(&"x".repeat(63))],
        );
        // The config side folds the same way.
        for spelling in ["T", "public.T", "\"public\".t", "Public.\"t\""] {
            let sql = format!("INSERT INTO {spelling} VALUES (1)");
            assert_eq!(
                Classification::of(&sql).written,
                [TableName::parse(spelling).unwrap()]
            );
        }
    }

    #[test]
    fn data_modifying_ctes() {
        check(
            "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "WITH x AS (SELECT * FROM u) INSERT INTO t SELECT * FROM x",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "WITH a AS (UPDATE s.t SET v = 1 RETURNING id), \
                  b AS (INSERT INTO log SELECT id FROM a RETURNING id) \
             DELETE FROM q WHERE id IN (SELECT id FROM b)",
            QueryKind::Write,
            &[p("log"), p("q"), t("s", "t")],
        );
        // Nested deeper than Postgres allows: still seen.
        check(
            "WITH a AS (WITH b AS (INSERT INTO deep VALUES (1) RETURNING *) SELECT * FROM b) \
             SELECT * FROM a",
            QueryKind::Write,
            &[p("deep")],
        );
        check(
            "SELECT * FROM (WITH b AS (DELETE FROM d RETURNING *) SELECT * FROM b) s",
            QueryKind::Write,
            &[p("d")],
        );
        check(
            "SELECT 1 UNION ALL (WITH b AS (DELETE FROM d RETURNING *) SELECT 2)",
            QueryKind::Write,
            &[p("d")],
        );
        check(
            "WITH m AS (MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE RETURNING t.*) \
             SELECT * FROM m",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "COPY (DELETE FROM t RETURNING *) TO STDOUT",
            QueryKind::Write,
            &[p("t")],
        );
        // A CTE named like the target does not hide the target.
        check(
            "WITH t AS (SELECT 1) INSERT INTO t VALUES (1)",
            QueryKind::Write,
            &[p("t")],
        );
    }

    #[test]
    fn explain() {
        check("EXPLAIN UPDATE t SET a = 1", QueryKind::Read, &[]);
        check(
            "EXPLAIN ANALYZE UPDATE t SET a = 1",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "EXPLAIN ANALYZE VERBOSE DELETE FROM t",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "EXPLAIN (ANALYZE, BUFFERS) INSERT INTO t VALUES (1)",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "EXPLAIN (analyze on) INSERT INTO t VALUES (1)",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "EXPLAIN (ANALYZE false) UPDATE t SET a = 1",
            QueryKind::Read,
            &[],
        );
        check(
            "EXPLAIN (ANALYZE off) UPDATE t SET a = 1",
            QueryKind::Read,
            &[],
        );
        check(
            "EXPLAIN (ANALYZE 0, COSTS) UPDATE t SET a = 1",
            QueryKind::Read,
            &[],
        );
        check("EXPLAIN ANALYZE SELECT * FROM t", QueryKind::Read, &[]);
        check(
            "EXPLAIN WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
            QueryKind::Read,
            &[],
        );
    }

    #[test]
    fn ddl() {
        check("CREATE TABLE t (id int primary key)", QueryKind::Ddl, &[]);
        check("CREATE TABLE t2 AS SELECT * FROM t", QueryKind::Ddl, &[]);
        check("SELECT * INTO newtable FROM t", QueryKind::Ddl, &[]);
        check("SELECT 1 INTO TEMP newtable", QueryKind::Ddl, &[]);
        check("ALTER TABLE t ADD COLUMN c int", QueryKind::Ddl, &[]);
        check("DROP TABLE IF EXISTS t CASCADE", QueryKind::Ddl, &[]);
        check("CREATE INDEX ON t (a)", QueryKind::Ddl, &[]);
        check("CREATE VIEW v AS SELECT * FROM t", QueryKind::Ddl, &[]);
        check("COMMENT ON TABLE t IS 'x'", QueryKind::Ddl, &[]);
        check("GRANT SELECT ON t TO bob", QueryKind::Ddl, &[]);
        check("REVOKE SELECT ON t FROM bob", QueryKind::Ddl, &[]);
        check("CREATE SCHEMA s", QueryKind::Ddl, &[]);
        check("CREATE SEQUENCE s", QueryKind::Ddl, &[]);
        check(
            "CREATE EXTENSION IF NOT EXISTS pgcrypto",
            QueryKind::Ddl,
            &[],
        );
        check(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
            QueryKind::Ddl,
            &[],
        );
    }

    #[test]
    fn other() {
        for sql in [
            "BEGIN",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "COMMIT",
            "ROLLBACK",
            "ROLLBACK TO SAVEPOINT s",
            "SAVEPOINT s",
            "RELEASE SAVEPOINT s",
            "SET search_path = a, b",
            "SET LOCAL statement_timeout = 0",
            "RESET ALL",
            "LISTEN ch",
            "UNLISTEN *",
            "NOTIFY ch, 'x'",
            "PREPARE p (int) AS SELECT $1",
            "EXECUTE p (1)",
            "DEALLOCATE p",
            "DEALLOCATE ALL",
            "DISCARD ALL",
            "DECLARE c CURSOR FOR SELECT 1",
            "FETCH 10 FROM c",
            "CLOSE c",
            "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
            "VACUUM t",
            "ANALYZE t",
            "CALL p()",
        ] {
            check(sql, QueryKind::Other, &[]);
        }
        check("", QueryKind::Other, &[]);
        check("  ;; ", QueryKind::Other, &[]);
        check("-- just a comment", QueryKind::Other, &[]);
    }

    #[test]
    fn prepare_of_a_write_is_a_write() {
        check(
            "PREPARE p (int) AS INSERT INTO t VALUES ($1)",
            QueryKind::Write,
            &[p("t")],
        );
        check(
            "PREPARE p AS WITH x AS (DELETE FROM s.t RETURNING *) SELECT * FROM x",
            QueryKind::Write,
            &[t("s", "t")],
        );
    }

    #[test]
    fn multi_statement_strings_take_the_strongest_kind_and_all_tables() {
        check("SELECT 1; SELECT 2;", QueryKind::Read, &[]);
        check("BEGIN; SELECT 1; COMMIT", QueryKind::Other, &[]);
        check(
            "BEGIN; UPDATE b SET x = 1; INSERT INTO a VALUES (1); UPDATE b SET x = 2; COMMIT;",
            QueryKind::Write,
            &[p("a"), p("b")],
        );
        check(
            "INSERT INTO a VALUES (1); CREATE TABLE c (x int)",
            QueryKind::Ddl,
            &[p("a")],
        );
        // pgbench's TPC-B transaction in one string.
        check(
            "BEGIN; UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1; \
             SELECT abalance FROM pgbench_accounts WHERE aid = 1; \
             UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = 1; \
             UPDATE pgbench_branches SET bbalance = bbalance + 1 WHERE bid = 1; \
             INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 1, CURRENT_TIMESTAMP); \
             END;",
            QueryKind::Write,
            &[
                p("pgbench_accounts"),
                p("pgbench_branches"),
                p("pgbench_history"),
                p("pgbench_tellers"),
            ],
        );
    }

    #[test]
    fn unparsable_sql_is_other_and_unparsed() {
        for sql in [
            "SELEC 1",
            "DO $$ BEGIN DELETE FROM t; END $$",
            "REFRESH MATERIALIZED VIEW mv",
            "INSERT INTO",
            "SELECT 1 SELECT 2",
            "UPDATE t SET a = 'unterminated",
            "SELECT 1; garbage here",
        ] {
            let c = Classification::of(sql);
            assert_eq!(
                c,
                Classification {
                    kind: QueryKind::Other,
                    written: vec![],
                    parsed: false,
                    inserted: vec![],
                    too_deep: false,
                },
                "{sql}"
            );
        }
    }

    /// Write shapes sqlparser 0.63 rejects: they are forwarded unchecked, and only the database
    /// side can refuse them. Kept as a test so that a sqlparser upgrade that fixes them shows.
    #[test]
    fn known_unparsed_writes() {
        for sql in [
            "UPDATE t * SET a = 1",
            "UPDATE ONLY t AS x SET a = 1",
            "UPDATE ONLY s.t SET a = 1",
            "DELETE FROM ONLY s.t",
            "UPDATE t SET a = 1 WHERE CURRENT OF c",
            "INSERT INTO t OVERRIDING SYSTEM VALUE VALUES (1)",
            "INSERT INTO t OVERRIDING USER VALUE VALUES (1)",
            "INSERT INTO t VALUES (1) ON CONFLICT (a) WHERE a > 0 DO NOTHING",
        ] {
            assert!(!Classification::of(sql).parsed, "{sql} now parses");
        }
    }

    /// `1+1+...` is parsed by a loop, not recursion, into a tree as deep as the chain: its drop
    /// used to overflow the stack and abort the process. A thread with tokio's 2 MiB stack
    /// classifies such texts of every length up to 1 MiB.
    #[test]
    fn deep_chains_do_not_overflow_a_small_stack() {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                for (n, chain) in [(300_000, "+1"), (150_000, "::t"), (100_000, " AND a")] {
                    let sql = format!("with x as (select 1) select 1{}", chain.repeat(n));
                    assert_eq!(Classification::of(&sql).kind, QueryKind::Read);
                }
                let sql = format!("select * from b.t where {}", "a = 1 or ".repeat(100_000));
                assert!(!Classification::of(&sql).parsed);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn nesting_past_the_recursion_limit_is_too_deep() {
        let nested = |n: usize| format!("select {}1{}", "(".repeat(n), ")".repeat(n));
        let c = Classification::with_depth(&nested(90), 200);
        assert!(c.parsed && !c.too_deep);
        let c = Classification::with_depth(&nested(90), 50);
        assert!(!c.parsed && c.too_deep);
        let deep = format!(
            "select 1 from {}t{}",
            "(select * from ".repeat(300),
            ")".repeat(300)
        );
        let c = Classification::with_depth(&deep, 200);
        assert!(!c.parsed && c.too_deep);
        assert!(!Classification::of("SELEC 1").too_deep);
    }

    #[test]
    fn first_keyword_kinds() {
        for (sql, kind) in [
            ("select 1", QueryKind::Read),
            (" WITH x AS (select 1) select 2", QueryKind::Read),
            ("insert into t values (1)", QueryKind::Write),
            ("/* c */ CREATE TABLE t (a int)", QueryKind::Ddl),
            ("select 1 into t", QueryKind::Other),
            ("vacuum", QueryKind::Other),
        ] {
            assert_eq!(first_keyword_kind(sql), kind, "{sql}");
        }
    }

    #[test]
    fn kind_labels() {
        assert_eq!(QueryKind::Read.as_str(), "read");
        assert_eq!(QueryKind::Write.as_str(), "write");
        assert_eq!(QueryKind::Ddl.as_str(), "ddl");
        assert_eq!(QueryKind::Other.as_str(), "other");
    }

    #[test]
    fn cache_hit_returns_the_same_arc() {
        let classifier = Classifier::new(NonZeroUsize::new(4).unwrap());
        let first = classifier.classify("UPDATE t SET a = 1");
        let second = classifier.classify("UPDATE t SET a = 1");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.written, [p("t")]);
        let other = classifier.classify("UPDATE u SET a = 1");
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(classifier.cached(), 2);
        // Unparsable texts are cached too: they would be re-parsed for nothing otherwise.
        let bad = classifier.classify("SELEC 1");
        assert!(Arc::ptr_eq(&bad, &classifier.classify("SELEC 1")));
    }

    #[test]
    fn cache_is_bounded_lru() {
        let classifier = Classifier::new(NonZeroUsize::new(3).unwrap());
        let keep = classifier.classify("SELECT 0");
        for i in 1..100 {
            // Touching "SELECT 0" keeps it the most recently used.
            assert!(Arc::ptr_eq(&keep, &classifier.classify("SELECT 0")));
            classifier.classify(&format!("SELECT {i}"));
            assert!(classifier.cached() <= 3);
        }
        assert_eq!(classifier.cached(), 3);
        assert!(Arc::ptr_eq(&keep, &classifier.classify("SELECT 0")));
        let evicted = classifier.classify("SELECT 1");
        assert!(!Arc::ptr_eq(&evicted, &classifier.classify("SELECT 2")));
    }

    #[test]
    fn long_texts_are_classified_but_not_cached() {
        let classifier = Classifier::new(NonZeroUsize::new(8).unwrap());
        let values = vec!["(1)"; 4000].join(", ");
        let sql = format!("INSERT INTO big VALUES {values}");
        assert!(sql.len() > MAX_CACHED_LEN);
        let first = classifier.classify(&sql);
        assert_eq!(first.kind, QueryKind::Write);
        assert_eq!(first.written, [p("big")]);
        assert_eq!(classifier.cached(), 0);
        assert!(!Arc::ptr_eq(&first, &classifier.classify(&sql)));
    }

    /// Run with `cargo test -p pgmm --release --lib classify::tests::bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench() {
        use std::time::Instant;
        let statement = |i: u32| {
            format!("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = {i};")
        };
        let classifier = Classifier::new(NonZeroUsize::new(1024).unwrap());
        let hot = statement(123);
        classifier.classify(&hot);
        const HITS: u32 = 100_000;
        let start = Instant::now();
        for _ in 0..HITS {
            std::hint::black_box(classifier.classify(std::hint::black_box(&hot)));
        }
        let hit = start.elapsed() / HITS;

        const MISSES: u32 = 10_000;
        let texts: Vec<String> = (0..MISSES).map(|i| statement(1_000_000 + i)).collect();
        let start = Instant::now();
        for text in &texts {
            std::hint::black_box(classifier.classify(text));
        }
        let miss = start.elapsed() / MISSES;
        println!("classify: cache hit {hit:?}/call, miss {miss:?}/call");
    }

    #[test]
    fn quick_kind_agrees_with_the_parser_wherever_it_answers() {
        let texts = [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
            "  -- comment\n select 1",
            "/* a /* nested */ comment */ SELECT 1",
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7;",
            "INSERT INTO pgbench_history (tid, bid) VALUES (1, 2);",
            "delete from t where id = 1",
            "BEGIN;",
            "END;",
            "COMMIT",
            "ROLLBACK",
            "SAVEPOINT s1",
            "RELEASE SAVEPOINT s1",
            "SET search_path = public",
            "RESET ALL",
            "select * into newtable from t",
            "select 1; delete from t",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "COPY t FROM STDIN",
            "EXPLAIN ANALYZE DELETE FROM t",
            "create table t (id int)",
            "PREPARE p AS INSERT INTO t VALUES (1)",
            "/* unterminated",
            "",
        ];
        let mut answered = 0;
        for sql in texts {
            if let Some(kind) = quick_kind(sql) {
                answered += 1;
                assert_eq!(kind, Classification::of(sql).kind, "{sql}");
            }
        }
        assert_eq!(answered, 14);
        assert_eq!(quick_kind("select * into newtable from t"), None);
        assert_eq!(quick_kind("select 1; delete from t"), None);
        assert_eq!(
            quick_kind("WITH d AS (DELETE FROM t RETURNING *) SELECT 1"),
            None
        );
    }

    #[test]
    fn case_insensitive_search() {
        assert!(contains_ignore_ascii_case("SELECT a INTO b", "into"));
        assert!(contains_ignore_ascii_case("x", ""));
        assert!(!contains_ignore_ascii_case("select 1", "into"));
        assert!(!contains_ignore_ascii_case("in", "into"));
    }
}
