//! The `pgmm` binary; everything lives in the library (see `pgmm::cli`).

/// Replication handles many small, short-lived values per row change (decoded datums, frames,
/// statement parameters); glibc's allocator spent about a quarter of the receiving node's CPU
/// on them (malloc_consolidate, unlink_chunk), mimalloc's thread-local free lists much less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pgmm::main()
}
