//! relay-bench: the reproducible benchmark of issue 4. It measures the relay
//! (the release binary, as a child process) against baselines built from the
//! same hyper and the same disk, alternating relay and baseline runs, and
//! prints req/s, latency percentiles and the ratio relay/baseline.
//!
//! ```sh
//! cargo run --release -p relay-bench -- [--quick] [--only S1,S2,...] [--rounds N]
//!     [--postgres postgres://postgres@127.0.0.1:5432/postgres] [--load wrk]
//! ```
//!
//! See docs/performance.md for what each scenario measures and how to read
//! the ratios. This is a program, not a test: `cargo test` never runs it and
//! nothing here asserts on timing. It imports nothing from the relay's
//! library, so it is a crate of its own (bench/), outside the daemon's build.
//!
//! The modules: `cli` (options and settings), `bench` (the request/answer
//! scenarios S1–S3 and the PostgreSQL ones), `backlog` (S4 and S5), `loadgen`
//! (the built-in load generator), `wrk` (the external one), `servers` (the
//! baselines, the sink), `relay_proc` (the relay as a child process), `pg`
//! (a database per run), `stats` (medians and ratios), `report` (the table
//! and the JSON).

mod backlog;
mod bench;
mod cli;
mod loadgen;
mod pg;
mod relay_proc;
mod report;
mod servers;
mod stats;
mod wrk;

use clap::Parser;

/// The repository root (bench/..): the relay's manifest, the seed fixture
/// and the git checkout the results name.
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn main() {
    let args = cli::Args::parse();
    let settings = match cli::settings(args) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("relay-bench: {err}");
            std::process::exit(2);
        }
    };
    if cfg!(debug_assertions) {
        eprintln!(
            "relay-bench: WARNING: built without --release; the baselines and the load \
             generator are slow, so the ratios mean nothing. Use `cargo run --release -p relay-bench`."
        );
    }
    let _ = std::fs::remove_dir_all(&settings.work);
    if let Err(err) = std::fs::create_dir_all(&settings.work) {
        eprintln!(
            "relay-bench: cannot create {}: {err}",
            settings.work.display()
        );
        std::process::exit(1);
    }
    let bench = bench::Bench::new(settings);
    bench.run();
}
