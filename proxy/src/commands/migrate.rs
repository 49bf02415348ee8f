//! `pgmm migrate --config FILE`.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;
use crate::schema::migrate::migrate_database;

/// `pgmm migrate --config FILE`: prints what was applied and exits 0; prints the error and exits
/// 2 for a bad config, 1 when migrating failed.
pub fn main(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgmm: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(migrate_database(&config.postgres)) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgmm: {e}");
            ExitCode::FAILURE
        }
    }
}
