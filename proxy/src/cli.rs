//! The `pgmm` command line: its clap types, the log filter per command, and the dispatch to
//! [`crate::commands`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands;

#[derive(Debug, Parser)]
#[command(
    name = "pgmm",
    version,
    about = "Multi-master replication proxy for PostgreSQL"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run this node: the client front door, replication to and from its peers, and the metrics
    /// endpoint.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file: prints a one-line summary, or the error (exit 2).
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Bring the local database's pgmm schema up to date, printing what was applied.
    Migrate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Start a local demo: N Postgres servers, each behind a pgmm node, replicating to each
    /// other; Ctrl-C removes it all.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Write on every node continuously and print a line per second (rows, lag, conflicts).
        #[arg(long)]
        workload: bool,
    },
    /// Compare every replicated table across the nodes (hashes by key range, narrowed down to
    /// rows) while writes go on; report the rows that differ with each node's version. Exit 0
    /// only when all agree (1: a table differs; 3: a node could not be compared).
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Copy one table again onto this node from a node that has it right (the repair for a
    /// table `pgmm check` reports).
    Resync {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The table, as schema.table (unqualified: public).
        #[arg(long)]
        table: String,
        /// The node to copy it from.
        #[arg(long, value_name = "NODE")]
        from: String,
    },
    /// Show a running node's view: peers up or down, replication lag, retained WAL, conflicts
    /// and ownership refusals of the last hour, schema version. Exit 3 if it is not running.
    Status {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print the report as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own progress; node logs would drown it unless asked for. Its nodes
    // start side by side, so each one's first attempts to link to a peer whose listener is not
    // bound yet fail and are retried: warnings that would only alarm a newcomer, and a link
    // that stays down shows in the demo's own output (`--workload`, /readyz).
    init_tracing(match cli.command {
        Command::Demo { .. } => {
            "warn,pgmm::replication::ship=error,pgmm::replication::peer=error,\
             pgmm::replication::apply::receiver=error"
        }
        Command::Status { .. } | Command::Check { .. } | Command::Resync { .. } => "warn",
        _ => "info",
    });
    match cli.command {
        Command::CheckConfig { file } => commands::check_config::main(&file),
        Command::Demo { nodes, workload } => commands::demo::main(nodes, workload),
        Command::Status { config, json } => commands::status::main(&config, json),
        Command::Migrate { config } => commands::migrate::main(&config),
        Command::Check { config } => commands::check::main(&config),
        Command::Resync {
            config,
            table,
            from,
        } => commands::check::resync_main(&config, &table, &from),
        Command::Serve { config } => commands::serve::main(&config),
    }
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Not `std::io::stderr`: a failed write (stderr piped into a reader that exited) makes
        // tracing-subscriber report it with `eprintln!`, which panics the task that logged.
        .with_writer(crate::commands::output::Stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
