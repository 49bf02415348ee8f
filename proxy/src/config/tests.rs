use std::path::Path;

use super::*;
use crate::pg::SqlState;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config.example.toml");

/// Nine lines; tests append sections after it.
const BASE: &str = r#"[node]
name = "a"
[cluster]
name = "test"
nodes = ["a", "b", "c"]
[client]
listen = "127.0.0.1:6432"
[postgres]
url = "postgres://postgres@127.0.0.1:5432/postgres"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

fn with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

/// 1-based line of the `nth` (0-based) occurrence of `needle`.
fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    let (offset, _) = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("{needle:?} #{nth} not in the test text"));
    text[..offset].matches('\n').count() + 1
}

/// Asserts an `Invalid` error for `key` at `line` whose message contains `fragment`.
#[track_caller]
fn assert_invalid(text: &str, key: &str, line: usize, fragment: &str) {
    match parse(text) {
        Err(ConfigError::Invalid {
            key: k,
            line: l,
            message,
            ..
        }) => {
            assert_eq!(
                (k.as_str(), l),
                (key, line),
                "wrong key/line; message: {message}"
            );
            assert!(
                message.contains(fragment),
                "message {message:?} lacks {fragment:?}"
            );
        }
        other => panic!("expected Invalid for {key} at line {line}, got {other:?}"),
    }
}

/// Asserts a `Syntax` error at `line` whose message contains `fragment`.
#[track_caller]
fn assert_syntax(text: &str, line: usize, fragment: &str) {
    match parse(text) {
        Err(ConfigError::Syntax {
            line: l, message, ..
        }) => {
            assert_eq!(l, line, "wrong line; message: {message}");
            assert!(
                message.contains(fragment),
                "message {message:?} lacks {fragment:?}"
            );
        }
        other => panic!("expected Syntax at line {line}, got {other:?}"),
    }
}

#[test]
fn example_file_loads() {
    let config = Config::load(Path::new(EXAMPLE)).expect("config.example.toml must be valid");
    assert_eq!(config.node.name, "a");
    assert_eq!(config.cluster.nodes, ["a", "b", "c"]);
    assert_eq!(config.node_index(), 0);
    let names: Vec<&str> = config.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["b", "c"]);
    // The example states the default of each peer limit.
    assert_eq!(
        config.peer.as_ref().unwrap().max_pending_handshakes,
        crate::config::DEFAULT_MAX_PENDING_HANDSHAKES
    );
    assert!(config.metrics.is_some());
    assert!(config.client.tls_cert.is_some() && config.client.tls_key.is_some());
    assert!(!config.replication.tables.is_empty());
    let owners: Vec<&OwnerSpec> = config.ownership.iter().map(|r| &r.owner).collect();
    assert!(matches!(
        owners[..],
        [OwnerSpec::Node(_), OwnerSpec::Column(_), OwnerSpec::Key(_)]
    ));
}

#[test]
fn context_minimal_config_and_defaults() {
    let text = r#"[node]
name = "a"
[cluster]
name = "test"
nodes = ["a", "b"]
[client]
listen = "127.0.0.1:6432"
# tls_cert = "/path/cert.pem"
[postgres]
url = "postgres://postgres@127.0.0.1:5432/postgres"
[metrics]
listen = "127.0.0.1:9187"
[[ownership]]
table = "public.owned_by_b"
owner = "b"
"#;
    let config = parse(text).unwrap();
    assert_eq!(config.client.shutdown_grace_seconds, 30);
    assert_eq!(config.client.max_parse_bytes, DEFAULT_MAX_PARSE_BYTES);
    assert_eq!(
        config.client.startup_timeout_seconds,
        DEFAULT_STARTUP_TIMEOUT_SECONDS
    );
    assert_eq!(config.client.max_parse_depth, DEFAULT_MAX_PARSE_DEPTH);
    assert_eq!(config.node.worker_threads, 0);
    assert!(config.node.threads() >= 1);
    assert_eq!(config.client.tls_cert, None);
    assert_eq!(config.postgres.pool_size, 4);
    assert_eq!(config.replication, ReplicationConfig::default());
    assert_eq!(config.replication.conflict_column, "updated_at");
    assert!(config.replication.tables.is_empty());
    assert_eq!(config.peer, None);
    assert!(config.peers.is_empty());
    assert_eq!(
        config.metrics,
        Some(MetricsConfig {
            listen: "127.0.0.1:9187".into()
        })
    );
    let rule = config
        .owner_of_table(&TableName::new("public", "owned_by_b"))
        .unwrap();
    assert_eq!(rule.owner, OwnerSpec::Node("b".into()));
    assert_eq!(
        config.owner_of_table(&TableName::new("public", "other")),
        None
    );
    assert_eq!(config.postgres.host_port(), ("127.0.0.1".to_owned(), 5432));
}

#[test]
fn replication_section_without_conflict_column_gets_default() {
    let config = parse(&with("[replication]\ntables = [\"public.*\"]\n")).unwrap();
    assert_eq!(config.replication.conflict_column, "updated_at");
    assert_eq!(config.replication.tables, ["public.*"]);
}

#[test]
fn summary_is_one_line() {
    let text = with(
        r#"[peer]
listen = "127.0.0.1:7001"
secret_file = "s"
[[peers]]
name = "b"
address = "127.0.0.1:7002"
[[peers]]
name = "c"
address = "127.0.0.1:7003"
[replication]
tables = ["public.*"]
[[ownership]]
table = "x"
owner = "b"
[[ownership]]
table = "y"
owner_key = "id"
"#,
    );
    assert_eq!(
        parse(&text).unwrap().summary(),
        "config ok: node \"a\" of cluster \"test\" (3 nodes), client 127.0.0.1:6432, \
         2 peers, 1 table pattern, 2 ownership rules"
    );
}

#[test]
fn node_index_follows_cluster_order() {
    let text = BASE.replace("name = \"a\"", "name = \"c\"");
    assert_eq!(parse(&text).unwrap().node_index(), 2);
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let text = BASE.replace("[client]\n", "[client]\nlisten_addr = \"x\"\n");
    assert_syntax(&text, 7, "unknown key `client.listen_addr`");

    let text = with("[metrics]\nlisten = \"127.0.0.1:1\"\n\n[wat]\nx = 1\n");
    assert_syntax(&text, 13, "unknown key `wat`");

    let text = with("[[ownership]]\ntable = \"x\"\nowner = \"b\"\n[[ownership]]\ntable = \"y\"\nowners = \"b\"\n");
    assert_syntax(
        &text,
        line_of(&text, "owners =", 0),
        "unknown key `ownership.owners`",
    );

    let text = with("[client.extra]\nx = 1\n");
    assert_syntax(&text, 10, "client.extra");

    let text = format!("top = 1\n{BASE}");
    assert_syntax(&text, 1, "unknown key `top`");
}

#[test]
fn missing_keys_are_named() {
    let text = BASE.replace("name = \"a\"\n", "");
    assert_syntax(&text, 1, "missing required key `node.name`");

    let text = BASE.replace(
        "[postgres]\nurl = \"postgres://postgres@127.0.0.1:5432/postgres\"\n",
        "",
    );
    assert_syntax(&text, 1, "missing required section [postgres]");

    let text =
        with("[[peers]]\nname = \"b\"\n[peer]\nlisten = \"127.0.0.1:1\"\nsecret_file = \"s\"\n");
    assert_syntax(&text, 10, "missing required key `peers.address`");

    let text = with("[[ownership]]\nowner = \"b\"\n");
    assert_syntax(&text, 10, "missing required key `ownership.table`");
}

#[test]
fn parse_limits_are_read_and_must_be_positive() {
    let text = BASE.replace(
        "[client]\n",
        "[client]\nmax_parse_bytes = 4096\nmax_parse_depth = 30\nstartup_timeout_seconds = 5\n",
    );
    let config = parse(&text).unwrap();
    assert_eq!(config.client.max_parse_bytes, 4096);
    assert_eq!(config.client.max_parse_depth, 30);
    assert_eq!(config.client.startup_timeout_seconds, 5);
    for key in [
        "max_parse_bytes",
        "max_parse_depth",
        "startup_timeout_seconds",
    ] {
        let text = BASE.replace("[client]\n", &format!("[client]\n{key} = 0\n"));
        assert_invalid(&text, &format!("client.{key}"), 7, "must be at least 1");
    }
}

#[test]
fn type_errors_and_duplicate_keys_name_the_key() {
    let text = BASE.replace(
        "[client]\n",
        "[client]\nshutdown_grace_seconds = \"soon\"\n",
    );
    assert_syntax(&text, 7, "`client.shutdown_grace_seconds`");

    let text = BASE.replace("name = \"test\"\n", "name = \"test\"\nname = \"again\"\n");
    assert_syntax(&text, 5, "duplicate key `cluster.name`");

    assert_syntax("[node\n", 1, "");
}

#[test]
fn node_names_are_checked() {
    assert_invalid(
        &BASE.replace("name = \"a\"", "name = \"\""),
        "node.name",
        2,
        "must not be empty",
    );
    assert_invalid(
        &BASE.replace("name = \"a\"", "name = \"Node-1\""),
        "node.name",
        2,
        "a-z, 0-9 and _",
    );
    let long = "n".repeat(59);
    assert_invalid(
        &BASE.replace("name = \"a\"", &format!("name = \"{long}\"")),
        "node.name",
        2,
        "too long",
    );
    assert_invalid(
        &BASE.replace("[\"a\", \"b\", \"c\"]", "[\"a\", \"B\"]"),
        "cluster.nodes",
        5,
        "a-z, 0-9 and _",
    );
}

#[test]
fn node_must_be_in_cluster() {
    assert_invalid(
        &BASE.replace("name = \"a\"", "name = \"d\""),
        "node.name",
        2,
        "not in cluster.nodes",
    );
}

#[test]
fn cluster_nodes_empty_or_duplicate() {
    assert_invalid(
        &BASE.replace("[\"a\", \"b\", \"c\"]", "[]"),
        "cluster.nodes",
        5,
        "at least one node",
    );
    let text = BASE.replace(
        "[\"a\", \"b\", \"c\"]",
        "[\n  \"a\",\n  \"b\",\n  \"a\",\n]",
    );
    assert_invalid(
        &text,
        "cluster.nodes",
        8,
        "\"a\" is listed twice (lines 6 and 8)",
    );
    assert_invalid(
        &BASE.replace("name = \"test\"", "name = \" \""),
        "cluster.name",
        4,
        "must not be empty",
    );
    // The name travels in the handshake, whose frames are size-limited.
    let long = "x".repeat(crate::config::MAX_CLUSTER_NAME_BYTES + 1);
    assert_invalid(
        &BASE.replace("name = \"test\"", &format!("name = \"{long}\"")),
        "cluster.name",
        4,
        "longer than 255",
    );
    let longest = "x".repeat(crate::config::MAX_CLUSTER_NAME_BYTES);
    let text = BASE.replace("name = \"test\"", &format!("name = \"{longest}\""));
    assert_eq!(parse(&text).unwrap().cluster.name, longest);
}

#[test]
fn max_pending_handshakes_defaults_and_is_checked() {
    let config = parse(&with(PEER)).unwrap();
    assert_eq!(
        config.peer.unwrap().max_pending_handshakes,
        crate::config::DEFAULT_MAX_PENDING_HANDSHAKES
    );
    let text = with(&format!("{PEER}max_pending_handshakes = 5\n"));
    assert_eq!(
        parse(&text).unwrap().peer.unwrap().max_pending_handshakes,
        5
    );
    for bad in ["0", "4097", "-1"] {
        let text = with(&format!("{PEER}max_pending_handshakes = {bad}\n"));
        match parse(&text) {
            Err(ConfigError::Invalid { key, line, .. }) => {
                assert_eq!((key.as_str(), line), ("peer.max_pending_handshakes", 13))
            }
            // A negative number is not a u64: a syntax error naming the key's line.
            Err(ConfigError::Syntax { line, .. }) if bad == "-1" => assert_eq!(line, 13),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

const PEER: &str = "[peer]\nlisten = \"127.0.0.1:7001\"\nsecret_file = \"/s\"\n";

#[test]
fn peers_are_checked() {
    let text = with(&format!(
        "{PEER}[[peers]]\nname = \"d\"\naddress = \"h:1\"\n"
    ));
    assert_invalid(&text, "peers.name", 14, "not in cluster.nodes");

    let text = with(&format!(
        "{PEER}[[peers]]\nname = \"a\"\naddress = \"h:1\"\n"
    ));
    assert_invalid(&text, "peers.name", 14, "is this node");

    let text = with(&format!(
        "{PEER}[[peers]]\nname = \"b\"\naddress = \"h:1\"\n[[peers]]\nname = \"b\"\naddress = \"h:2\"\n"
    ));
    assert_invalid(&text, "peers.name", 17, "listed twice (lines 14 and 17)");

    let text = with("[[peers]]\nname = \"b\"\naddress = \"h:1\"\n");
    assert_invalid(&text, "peer", 10, "[peer] section is missing");

    let text = with(&format!("{PEER}[[peers]]\nname = \"b\"\naddress = \"h\"\n"));
    assert_invalid(&text, "peers.address", 15, "host:port");
}

#[test]
fn listen_addresses_need_host_and_numeric_port() {
    for bad in [
        "localhost",
        "host:http",
        ":6432",
        "h:70000",
        "::1:6432",
        "[::1:6432",
        "h:",
    ] {
        let text = BASE.replace("127.0.0.1:6432", bad);
        assert_invalid(&text, "client.listen", 7, "not host:port");
    }
    for good in ["0.0.0.0:6432", "[::1]:6432", "localhost:1"] {
        let text = BASE.replace("127.0.0.1:6432", good);
        assert_eq!(parse(&text).unwrap().client.listen, good);
    }
    let text = with("[metrics]\nlisten = \"9187\"\n");
    assert_invalid(&text, "metrics.listen", 11, "not host:port");
    let text = with(&PEER.replace("127.0.0.1:7001", "peerhost"));
    assert_invalid(&text, "peer.listen", 11, "not host:port");
}

#[test]
fn tls_cert_and_key_come_in_pairs() {
    let text = BASE.replace("[client]\n", "[client]\ntls_cert = \"c.pem\"\n");
    assert_invalid(
        &text,
        "client.tls_key",
        7,
        "client.tls_cert is set but client.tls_key is not",
    );

    let text = with(&format!("{PEER}tls_key = \"k.pem\"\n"));
    assert_invalid(
        &text,
        "peer.tls_cert",
        13,
        "peer.tls_key is set but peer.tls_cert is not",
    );

    let text = with(&format!(
        "{PEER}tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_ca = \"ca.pem\"\n"
    ));
    let peer = parse(&text).unwrap().peer.unwrap();
    assert_eq!(peer.tls_ca.as_deref(), Some(Path::new("ca.pem")));
    assert_eq!(peer.secret_file, Path::new("/s"));

    let text = with(&PEER.replace("\"/s\"", "\"\""));
    assert_invalid(&text, "peer.secret_file", 12, "must not be empty");
}

#[test]
fn ownership_rules_are_checked() {
    let text = with("[[ownership]]\ntable = \"x\"\nowner = \"z\"\n");
    assert_invalid(&text, "ownership.owner", 12, "owner \"z\" is not a node");

    let text = with("[[ownership]]\ntable = \"X\"\nowner = \"b\"\n\n[[ownership]]\ntable = \"public.x\"\nowner_key = \"id\"\n");
    assert_invalid(
        &text,
        "ownership.table",
        15,
        "two ownership rules for table public.x (lines 11 and 15)",
    );

    let text = with("[[ownership]]\ntable = \"x\"\n");
    assert_invalid(&text, "ownership.owner", 10, "has none");

    let text = with("[[ownership]]\ntable = \"x\"\nowner = \"b\"\nowner_column = \"home\"\n");
    assert_invalid(
        &text,
        "ownership.owner_column",
        13,
        "has owner and owner_column",
    );

    let text = with("[[ownership]]\ntable = \"a.b.c\"\nowner = \"b\"\n");
    assert_invalid(&text, "ownership.table", 11, "not a table name");

    let text = with("[[ownership]]\ntable = \"pgmm.conflicts\"\nowner = \"b\"\n");
    assert_invalid(&text, "ownership.table", 11, "schema pgmm");

    let text = with("[[ownership]]\ntable = \"x\"\nowner_key = \"\"\n");
    assert_invalid(&text, "ownership.owner_key", 12, "must not be empty");

    let text = with("[[ownership]]\ntable = '\"Mixed\".T'\nowner_column = \"home_node\"\n");
    let config = parse(&text).unwrap();
    let rule = config
        .owner_of_table(&TableName::new("Mixed", "t"))
        .unwrap();
    assert_eq!(rule.owner, OwnerSpec::Column("home_node".into()));
}

#[test]
fn replication_patterns_are_checked() {
    for bad in ["orders", "*", "a.b.c", "sal*.orders", "public.", ".x", ""] {
        let text = with(&format!(
            "[replication]\ntables = [\"public.*\", '{bad}']\n"
        ));
        assert_invalid(&text, "replication.tables", 11, "not a table pattern");
    }
    for pgmm in ["pgmm.*", "pgmm.conflicts", "PGMM.tombstones"] {
        let text = with(&format!("[replication]\ntables = [\n  \"{pgmm}\",\n]\n"));
        assert_invalid(&text, "replication.tables", 12, "never replicated");
    }
    let text = with("[replication]\ntables = []\nconflict_column = \"\"\n");
    assert_invalid(
        &text,
        "replication.conflict_column",
        12,
        "must not be empty",
    );
}

#[test]
fn replication_patterns_match_folded_names() {
    let text = with(
        "[replication]\ntables = [\"Sales.*\", \"*.audit\", 'public.\"Mixed\"', '\"a.b\".c']\nconflict_column = \"ts\"\n",
    );
    let repl = parse(&text).unwrap().replication;
    assert_eq!(repl.conflict_column, "ts");
    assert!(repl.matches(&TableName::new("sales", "orders")));
    assert!(repl.matches(&TableName::new("anything", "audit")));
    assert!(repl.matches(&TableName::new("public", "Mixed")));
    assert!(repl.matches(&TableName::new("a.b", "c")));
    assert!(!repl.matches(&TableName::new("public", "mixed")));
    assert!(!repl.matches(&TableName::new("pgmm", "audit")));
    let all = ReplicationConfig {
        tables: vec!["*.*".into()],
        ..ReplicationConfig::default()
    };
    assert!(all.matches(&TableName::new("x", "y")));
    assert!(!all.matches(&TableName::new("pgmm", "conflicts")));
}

#[test]
fn the_plain_pattern_shortcut_agrees_with_the_parser() {
    let patterns = [
        "public.bench",
        " public.bench ",
        "sales.*",
        "*.audit",
        "*.*",
        "Public.bench",
        "public.\"Bench\"",
        "\"a.b\".c",
        "a.b.c",
        "public.",
        ".bench",
        "bench",
        "public.ben*",
        "public. bench",
        "s$1.t_2",
        "ünï.côde",
    ];
    let tables = [
        TableName::new("public", "bench"),
        TableName::new("public", "Bench"),
        TableName::new("sales", "orders"),
        TableName::new("x", "audit"),
        TableName::new("a.b", "c"),
        TableName::new("s$1", "t_2"),
        TableName::new("ünï", "côde"),
    ];
    for pattern in patterns {
        for table in &tables {
            let parsed = validate::parse_pattern(pattern).is_some_and(|p| p.matches(table));
            if let Some(fast) = validate::plain_pattern_matches(pattern, table) {
                assert_eq!(fast, parsed, "{pattern:?} against {table}");
            }
        }
    }
    assert_eq!(
        validate::plain_pattern_matches("public.bench", &tables[0]),
        Some(true),
        "the usual pattern takes the shortcut"
    );
}

#[test]
fn postgres_url_is_checked_and_resolved() {
    let text = BASE.replace(
        "postgres://postgres@127.0.0.1:5432/postgres",
        "postgres://h:notaport/db",
    );
    assert_invalid(
        &text,
        "postgres.url",
        9,
        "not a valid Postgres connection string",
    );

    let text = BASE.replace(
        "postgres://postgres@127.0.0.1:5432/postgres",
        "user=x dbname=y",
    );
    assert_invalid(&text, "postgres.url", 9, "names no host");

    let text = BASE.replace(
        "url = \"postgres://postgres@127.0.0.1:5432/postgres\"",
        "url = \"postgres://postgres@127.0.0.1:5432/postgres\"\npool_size = 0",
    );
    assert_invalid(&text, "postgres.pool_size", 10, "at least 1");

    let resolved = |url: &str| {
        let text = BASE.replace("postgres://postgres@127.0.0.1:5432/postgres", url);
        parse(&text).unwrap().postgres.host_port()
    };
    assert_eq!(
        resolved("postgres://u@db.internal/x"),
        ("db.internal".into(), 5432)
    );
    assert_eq!(
        resolved("postgres://u@h1:6000,h2:6001/x"),
        ("h1".into(), 6000)
    );
    assert_eq!(
        resolved("host=/var/run/postgresql port=5433 user=u"),
        ("/var/run/postgresql".into(), 5433)
    );
    assert_eq!(
        resolved("postgres://u@%2Ftmp%2Fpg/x"),
        ("/tmp/pg".into(), 5432)
    );
    assert_eq!(
        resolved("hostaddr=10.1.2.3 host=db port=7"),
        ("10.1.2.3".into(), 7)
    );
}

#[test]
fn errors_render_path_line_and_sqlstate() {
    let err = parse(&BASE.replace("name = \"a\"", "name = \"d\"")).unwrap_err();
    assert_eq!(err.sqlstate(), "F0000");
    assert_eq!(err.line(), Some(2));
    let shown = err.to_string();
    assert!(shown.starts_with("test.toml:2: node.name: "), "{shown}");

    let err = Config::load(Path::new("/nonexistent/pgmm.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/pgmm.toml"), "{err}");
    assert_eq!(err.sqlstate(), "F0000");

    let err = parse(&BASE.replace("[client]\n", "[client]\nbogus = 1\n")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("test.toml:7:1: unknown key `client.bogus`"),
        "{err}"
    );
}

#[test]
fn ddl_nodes_name_cluster_nodes_and_default_to_all() {
    let config = parse(&with("[replication]\ntables = [\"public.*\"]\n")).unwrap();
    assert!(config.replication.ddl_nodes.is_empty());
    let config = parse(&with("[replication]\nddl_nodes = [\"a\", \"c\"]\n")).unwrap();
    assert_eq!(config.replication.ddl_nodes, ["a", "c"]);
    let text = with("[replication]\nddl_nodes = [\"a\", \"x\"]\n");
    assert_invalid(
        &text,
        "replication.ddl_nodes",
        line_of(&text, "ddl_nodes", 0),
        "\"x\" is not a node of cluster.nodes (a, b, c)",
    );
    let text = with("[replication]\nddl_nodes = []\n");
    assert_invalid(
        &text,
        "replication.ddl_nodes",
        line_of(&text, "ddl_nodes", 0),
        "at least one node",
    );
}
