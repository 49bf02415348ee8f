//! The `pgmm` command line: parsing, and the commands that drive the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::config::{Config, ConfigError};
use crate::frontdoor::{self, FrontDoor, FrontDoorError};
use crate::metrics::{self, FrontDoorMetrics, MetricsError};
use crate::node::{NodeError, ReplicationNode};

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

/// Why `serve` could not start or stopped abnormally.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    FrontDoor(#[from] FrontDoorError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
}

impl ServeError {
    pub fn sqlstate(&self) -> String {
        match self {
            ServeError::Config(e) => e.sqlstate().into(),
            ServeError::FrontDoor(e) => e.sqlstate().into(),
            ServeError::Metrics(e) => e.sqlstate().into(),
            ServeError::Node(e) => e.sqlstate(),
            ServeError::Signal(_) => "58000".into(),
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own progress; node logs would drown it unless asked for. Its nodes
    // start side by side, so each one's first attempts to link to a peer whose listener is not
    // bound yet fail and are retried: warnings that would only alarm a newcomer, and a link
    // that stays down shows in the demo's own output (`--workload`, /readyz).
    init_tracing(match cli.command {
        Command::Demo { .. } => {
            "warn,pgmm::capture=error,pgmm::peer=error,pgmm::apply::receiver=error"
        }
        Command::Status { .. } => "warn",
        _ => "info",
    });
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(config) => {
                println!("{}", config.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Demo { nodes, workload } => crate::demo::main(nodes, workload),
        Command::Status { config, json } => crate::status::cli_main(&config, json),
        Command::Migrate { config } => crate::migrate::cli_main(&config),
        Command::Serve { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match config.node.threads() {
                1 => tokio::runtime::Builder::new_current_thread(),
                n => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n);
                    b
                }
            }
            .enable_all()
            .build()
            .expect("tokio runtime");
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "pgmm stopped");
                    eprintln!("pgmm: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Not `std::io::stderr`: a failed write (stderr piped into a reader that exited) makes
        // tracing-subscriber report it with `eprintln!`, which panics the task that logged.
        .with_writer(crate::output::Stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Runs a node until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let shutdown = CancellationToken::new();
    let signals = watch_signals(shutdown.clone())?;
    let result = run_node(config, shutdown).await;
    signals.abort();
    result
}

/// Everything a node runs, stopped by `shutdown`; separate from signal handling so that a
/// test can run several nodes in one process.
pub async fn run_node(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let registry = Arc::new(metrics::new_registry()?);
    let door_metrics = FrontDoorMetrics::register(&registry)?;
    let door = Arc::new(FrontDoor::from_config(&config, door_metrics)?);
    // Metrics first: while the node waits for its Postgres, /healthz shows the process is up
    // (and /readyz says what it waits for).
    let metrics_task = match &config.metrics {
        Some(m) => {
            let listener = metrics::bind(&m.listen).await?;
            let admin = Admin {
                config: Arc::new(config.clone()),
                registry: registry.clone(),
                refusals: door.refusals.clone(),
            };
            Some(tokio::spawn(admin::serve(
                listener,
                admin,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    // Schema, publication and slots exist before the first client gets in, so every write
    // made through pgmm is captured.
    let replication =
        match ReplicationNode::start(&config, &registry, door.ddl_seen.clone(), shutdown.clone())
            .await
        {
            Ok(node) => node,
            Err(NodeError::Cancelled) => {
                if let Some(task) = metrics_task {
                    let _ = task.await;
                }
                return Ok(());
            }
            Err(e) => {
                shutdown.cancel();
                return Err(e.into());
            }
        };
    let listener = match frontdoor::bind(&config.client.listen).await {
        Ok(l) => l,
        Err(e) => {
            shutdown.cancel();
            replication.join().await;
            return Err(e.into());
        }
    };
    tracing::info!(node = %config.node.name, cluster = %config.cluster.name, "pgmm started");
    let grace = Duration::from_secs(config.client.shutdown_grace_seconds);
    frontdoor::serve(door, listener, shutdown.clone(), grace).await;
    shutdown.cancel();
    replication.join().await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("pgmm stopped");
    Ok(())
}

fn watch_signals(shutdown: CancellationToken) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    }))
}
