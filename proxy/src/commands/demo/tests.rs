use std::fs;
use std::path::{Path, PathBuf};

use super::postgres::{find_bindir, log_tail, server_settings, versioned_bindirs};
use super::*;
use crate::config::table::TableName;
use crate::config::OwnerSpec;

fn ports(n: u16) -> Vec<NodePorts> {
    (0..n)
        .map(|i| NodePorts {
            postgres: 15000 + i,
            client: 16000 + i,
            metrics: 17000 + i,
            peer: 18000 + i,
        })
        .collect()
}

#[test]
fn node_names_are_letters_and_the_count_is_bounded() {
    assert_eq!(node_names(3).unwrap(), ["a", "b", "c"]);
    assert_eq!(node_names(MAX_NODES).unwrap().last().unwrap(), "i");
    for bad in [0, MAX_NODES + 1] {
        let err = node_names(bad).unwrap_err();
        assert!(matches!(err, DemoError::NodeCount(n) if n == bad));
        assert_eq!(err.exit_code(), 2);
    }
}

#[test]
fn missing_binaries_message_names_the_package_and_exits_2() {
    let err = DemoError::BinariesNotFound;
    assert_eq!(
        err.to_string(),
        "PostgreSQL server binaries (initdb, postgres) not found: \
         install them with 'apt-get install -y postgresql'"
    );
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn every_generated_config_is_valid_and_gives_each_table_to_its_node() {
    let names = node_names(3).unwrap();
    let ports = ports(3);
    let secret = Path::new("/tmp/pgmm-demo-x/cluster.secret");
    for (name, node_ports) in names.iter().zip(&ports) {
        let text = node_config(name, &names, &ports, node_ports, secret);
        let config = Config::parse(&text, Path::new("demo.toml"))
            .unwrap_or_else(|e| panic!("config of node {name}: {e}\n{text}"));
        assert_eq!(config.node.name, *name);
        assert_eq!(config.cluster.name, "demo");
        assert_eq!(config.cluster.nodes, names);
        assert_eq!(
            config.client.listen,
            format!("127.0.0.1:{}", node_ports.client)
        );
        assert_eq!(config.client.shutdown_grace_seconds, CLIENT_GRACE_SECONDS);
        assert_eq!(
            config.postgres.host_port(),
            ("127.0.0.1".to_owned(), node_ports.postgres)
        );
        assert_eq!(
            config.metrics.as_ref().map(|m| m.listen.as_str()),
            Some(format!("127.0.0.1:{}", node_ports.metrics).as_str())
        );
        for owner in &names {
            let table = TableName::parse(&format!("demo.owned_by_{owner}")).unwrap();
            let rule = config
                .owner_of_table(&table)
                .expect("a rule per node table");
            assert_eq!(rule.owner, OwnerSpec::Node(owner.clone()));
        }
        let accounts = TableName::parse("demo.accounts").unwrap();
        assert_eq!(
            config.owner_of_table(&accounts).map(|r| &r.owner),
            Some(&OwnerSpec::Column("home_node".into()))
        );
        assert_eq!(config.ownership.len(), names.len() + 1);
        assert_eq!(config.replication.tables, ["demo.*"]);
        assert!(config.replication.matches(&accounts));
    }
}

#[test]
fn every_node_listens_for_peers_and_names_every_other_node() {
    let names = node_names(3).unwrap();
    let ports = ports(3);
    let secret = Path::new("/tmp/it's \"here\"/cluster.secret");
    for (i, (name, node_ports)) in names.iter().zip(&ports).enumerate() {
        let text = node_config(name, &names, &ports, node_ports, secret);
        let config = Config::parse(&text, Path::new("demo.toml")).unwrap();
        let peer = config.peer.as_ref().expect("a [peer] section");
        assert_eq!(peer.listen, format!("127.0.0.1:{}", 18000 + i));
        assert_eq!(peer.secret_file, secret);
        let peers: Vec<(String, String)> = config
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.address.clone()))
            .collect();
        let expected: Vec<(String, String)> = (0..3)
            .filter(|&j| j != i)
            .map(|j| (names[j].clone(), format!("127.0.0.1:{}", 18000 + j)))
            .collect();
        assert_eq!(peers, expected, "peers of node {name}");
    }
}

#[test]
fn a_single_node_demo_has_no_peers() {
    let names = node_names(1).unwrap();
    let ports = ports(1);
    let text = node_config("a", &names, &ports, &ports[0], Path::new("/tmp/s"));
    let config = Config::parse(&text, Path::new("demo.toml")).unwrap();
    assert!(config.peer.is_none() && config.peers.is_empty());
}

#[test]
fn the_secret_file_is_long_random_and_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = write_secret(dir.path()).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), 2 * SECRET_BYTES);
    assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let other = tempfile::tempdir().unwrap();
    assert_ne!(
        fs::read_to_string(write_secret(other.path()).unwrap()).unwrap(),
        text
    );
    crate::replication::peer::Secret::from_file(&path).expect("pgmm accepts the generated secret");
}

#[test]
fn schema_has_the_shared_table_and_one_owned_table_per_node() {
    let sql = schema_sql(&node_names(2).unwrap());
    assert!(sql.contains("create schema if not exists demo;"));
    assert!(sql.contains(
        "create table if not exists demo.accounts (id bigint primary key, \
         home_node text not null, balance int, updated_at timestamptz not null default now());"
    ));
    for table in ["demo.items", "demo.owned_by_a", "demo.owned_by_b"] {
        assert!(
            sql.contains(&format!(
                "create table if not exists {table} (id bigint primary key, v text, \
                 updated_at timestamptz not null default now());"
            )),
            "{table} in {sql}"
        );
    }
    assert!(!sql.contains("owned_by_c"));
}

#[test]
fn server_settings_quote_the_socket_directory() {
    let conf = server_settings(5999, Path::new("/tmp/it's here"), 2);
    for line in [
        "port = 5999",
        "listen_addresses = '127.0.0.1'",
        "unix_socket_directories = '/tmp/it''s here'",
        "wal_level = logical",
        "track_commit_timestamp = on",
        "max_replication_slots = 6",
        "max_wal_senders = 6",
        "max_connections = 100",
    ] {
        assert!(conf.lines().any(|l| l == line), "{line:?} in {conf}");
    }
}

fn fake_bindir(dir: &Path, programs: &[&str]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    for program in programs {
        fs::write(dir.join(program), "").unwrap();
    }
    dir.to_path_buf()
}

#[test]
fn versioned_bindirs_are_newest_first_and_skip_other_names() {
    let root = tempfile::tempdir().unwrap();
    for version in ["9.6", "15", "10", "common", "16"] {
        fs::create_dir(root.path().join(version)).unwrap();
    }
    let found = versioned_bindirs(root.path());
    let expected: Vec<PathBuf> = ["16", "15", "10", "9.6"]
        .iter()
        .map(|v| root.path().join(v).join("bin"))
        .collect();
    assert_eq!(found, expected);
    assert!(versioned_bindirs(&root.path().join("absent")).is_empty());
}

#[test]
fn find_bindir_wants_both_initdb_and_postgres() {
    let root = tempfile::tempdir().unwrap();
    let client_only = fake_bindir(&root.path().join("client"), &["psql", "pg_config"]);
    let no_initdb = fake_bindir(&root.path().join("half"), &["postgres"]);
    let full = fake_bindir(&root.path().join("full"), &["initdb", "postgres"]);
    assert_eq!(
        find_bindir([client_only.clone(), no_initdb.clone(), full.clone()]),
        Some(full)
    );
    assert_eq!(find_bindir([client_only, no_initdb]), None);
}

#[test]
fn log_tail_keeps_the_last_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("postgres.log");
    let text: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    fs::write(&log, text).unwrap();
    let tail = log_tail(&log);
    assert!(tail.starts_with("last lines of postgres.log:"));
    assert!(tail.ends_with("line 40"));
    assert!(!tail.contains("line 25\n"));
    assert!(tail.contains("line 26"));
    assert!(log_tail(&dir.path().join("absent.log")).ends_with("(empty)"));
}
