//! `pgmm check --config FILE` and `pgmm resync --config FILE --table T --from NODE`.

use std::path::Path;
use std::process::ExitCode;

use crate::commands::output;
use crate::config::Config;
use crate::membership::{check, resync};

fn load(config_path: &Path) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let config = Config::load(config_path).map_err(|e| {
        output::err(format_args!("{e}"));
        ExitCode::from(2)
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            output::err(format_args!("pgmm: cannot start the async runtime: {e}"));
            ExitCode::FAILURE
        })?;
    Ok((config, runtime))
}

/// Exit 0 when every replicated table agrees on every node, 1 when one differs, 2 for a bad
/// config, 3 when a node cannot be compared (unreachable, refused).
pub fn main(config_path: &Path) -> ExitCode {
    let (config, runtime) = match load(config_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match runtime.block_on(check::check(&config)) {
        Ok(report) => {
            output::out_text(&report.render());
            if report.agree() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            output::err(format_args!("pgmm check: {e}"));
            ExitCode::from(3)
        }
    }
}

/// Exit 0 once the table is copied again, 2 for a bad config, 1 when it failed.
pub fn resync_main(config_path: &Path, table: &str, from: &str) -> ExitCode {
    let (config, runtime) = match load(config_path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match runtime.block_on(resync::resync(&config, table, from)) {
        Ok(report) => {
            output::out(format_args!("{report}"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            output::err(format_args!("pgmm resync: {e}"));
            ExitCode::FAILURE
        }
    }
}
