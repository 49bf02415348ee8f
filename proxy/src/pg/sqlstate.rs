//! One SQLSTATE vocabulary for pgmm's errors: every boundary error enum says which class of
//! failure it is with the code Postgres would use for it, so that logs, metrics and the errors
//! pgmm sends to clients read alike whether the failure was local or the server's.

/// The SQLSTATE of an error: the server's own code when Postgres reported the failure, the
/// closest class otherwise.
pub trait SqlState {
    fn sqlstate(&self) -> &str;
}

/// The server's SQLSTATE of a `tokio_postgres` error, or `08006` (connection_failure) when it
/// carries none: then the failure is the connection's, not a statement's.
pub fn of_pg_error(e: &tokio_postgres::Error) -> &str {
    e.code().map_or("08006", |c| c.code())
}

/// Here rather than in `config`, which depends on nothing else in pgmm.
impl SqlState for crate::config::ConfigError {
    /// `F0000` (config_file_error), so config failures surface like the other error enums when
    /// reported to a client.
    fn sqlstate(&self) -> &str {
        "F0000"
    }
}
