//! The `pgmm` subcommands: each turns its arguments into a process outcome (output and exit
//! code: 0 success, 1 failure, 2 bad config, 3 for `status` when the node is not running).
//! `serve` runs a [`crate::node`]; the others are short-lived.

pub mod check;
pub mod check_config;
pub mod demo;
pub mod migrate;
pub mod output;
pub mod serve;
pub mod status;
