//! `pgmm check-config FILE`: a one-line summary of a valid config, or the error with the key
//! and line (exit 2).

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

pub fn main(file: &Path) -> ExitCode {
    match Config::load(file) {
        Ok(config) => {
            println!("{}", config.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}
