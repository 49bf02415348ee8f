//! `pgmm serve --config FILE`: loads the config (exit 2 when it is bad), builds the runtime
//! with `[node] threads`, and runs the node until SIGTERM or SIGINT (exit 1 when it fails).

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::node;
use crate::pg::SqlState;

pub fn main(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
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
    match runtime.block_on(node::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, sqlstate = %e.sqlstate(), "pgmm stopped");
            eprintln!("pgmm: {e}");
            ExitCode::FAILURE
        }
    }
}
