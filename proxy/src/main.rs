//! The `pgmm` binary; everything lives in the library (see `pgmm::cli`).

fn main() -> std::process::ExitCode {
    pgmm::cli::main()
}
