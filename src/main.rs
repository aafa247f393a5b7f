//! Thin entry point: parse the command line, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

/// jemalloc instead of glibc's malloc: the relay frees on one thread what it
/// allocated on another (a job's bodies, hyper's buffers), where glibc's
/// arenas contend on a lock and consolidate. Unprefixed, so SQLite's own
/// allocations use it too (glibc trimmed its heap with `madvise` under the
/// writer's statements). Same-hour A/B in docs/performance.md (fifth
/// pass); Vector and linkerd2-proxy use jemalloc too.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    postback_relay::cli::main(postback_relay::cli::Cli::parse())
}
