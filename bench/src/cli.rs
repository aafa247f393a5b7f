//! The command line: options, their defaults (full and `--quick`), which
//! scenarios run, and the relay binary (built first unless told otherwise).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::wrk;
use crate::REPO;

/// Scenarios on the embedded SQLite store (the default run).
pub const SQLITE_SCENARIOS: [&str; 5] = ["S1", "S2", "S3", "S4", "S5"];
/// Scenarios on PostgreSQL (run by default only with `--postgres`).
pub const POSTGRES_SCENARIOS: [&str; 3] = ["S1pg", "S2pg", "S2pg2"];
/// The scenarios `--load wrk` can drive: one relay answering requests, and a
/// baseline answering the same requests (S4 and S5 are backlogs, not request
/// loads; S2pg2 spreads its connections over two relays, one wrk URL cannot).
const WRK_SCENARIOS: [&str; 5] = ["S1", "S2", "S3", "S1pg", "S2pg"];

/// Benchmark of the relay against the limits of this machine (issue 4).
#[derive(Debug, Parser)]
#[command(name = "relay-bench")]
pub struct Args {
    /// One round, shorter runs, smaller backlogs (a few minutes in all).
    #[arg(long)]
    quick: bool,
    /// Scenarios to run, e.g. `S1,S3` (default: all of S1..S5, plus S1pg, S2pg
    /// and S2pg2 with `--postgres`).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// PostgreSQL server for S1pg, S2pg and S2pg2, as a role that may create
    /// databases, e.g. `postgres://postgres@127.0.0.1:5432/postgres`; each run
    /// creates a database `bench_<random>` there and drops it afterwards.
    #[arg(long)]
    postgres: Option<String>,
    /// Alternations of relay and baseline per scenario (default 3; quick 1).
    #[arg(long)]
    rounds: Option<usize>,
    /// Measured seconds per run (default 5; quick 2).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds before each measured run (default 1; quick 0.5).
    #[arg(long)]
    warmup: Option<f64>,
    /// Postbacks in S4's backlog; each makes 2 deliveries (default 100000; quick 25000).
    #[arg(long)]
    s4_postbacks: Option<u64>,
    /// Postbacks in S5's backlog; each makes 2 deliveries (default 500000; quick 100000).
    #[arg(long)]
    s5_postbacks: Option<u64>,
    /// Seconds S5 watches the restarted relay with its backlog and the sink down (default 10; quick 5).
    #[arg(long)]
    s5_observe: Option<f64>,
    /// The relay binary (default: target/release/postback-relay, built first).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Do not run `cargo build --release --bin postback-relay` first.
    #[arg(long)]
    no_build: bool,
    /// RUST_LOG of the relay (its JSON log lines are read and counted).
    #[arg(long, default_value = "info")]
    relay_log: String,
    /// Where to write the JSON results (default: target/relay-bench/results.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// What sends the requests of S1–S3, S1pg and S2pg: the built-in
    /// generator, or wrk (Debian package wrk) so an outside program measures
    /// the relay and its baseline alike. With wrk, durations are whole
    /// seconds (rounded up) and the default scenarios are those it can drive.
    #[arg(long, value_enum, default_value_t = LoadMode::Builtin)]
    load: LoadMode,
    /// wrk's threads (`wrk -t`), at most the connections (default 1, like
    /// the built-in generator's one thread).
    #[arg(long, default_value_t = 1)]
    wrk_threads: usize,
}

/// The `--load` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoadMode {
    /// The built-in generator (loadgen.rs).
    Builtin,
    /// wrk, an external load generator.
    Wrk,
}

/// The load generator of the timed runs, as the benchmark uses it.
#[derive(Debug, Clone)]
pub enum Load {
    /// loadgen.rs: one thread, keep-alive connections, warm-up measured apart.
    Builtin,
    /// wrk with `threads` threads; `version` is its first `wrk -v` line.
    Wrk { threads: usize, version: String },
}

/// Settings after defaults: what every scenario reads.
pub struct Settings {
    pub quick: bool,
    pub scenarios: Vec<String>,
    pub postgres: Option<String>,
    pub rounds: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub s4_postbacks: u64,
    pub s5_postbacks: u64,
    pub s5_observe: Duration,
    pub relay_bin: PathBuf,
    pub relay_log: String,
    pub work: PathBuf,
    pub out: PathBuf,
    pub workers: usize,
    pub load: Load,
}

/// Applies the defaults and checks the options before anything runs (a typo
/// in `--only` should not cost a ten-minute build and benchmark).
pub fn settings(args: Args) -> Result<Settings, String> {
    let quick = args.quick;
    let wrk = args.load == LoadMode::Wrk;
    let known = SQLITE_SCENARIOS.iter().chain(&POSTGRES_SCENARIOS);
    let scenarios: Vec<String> = if args.only.is_empty() {
        known
            .filter(|id| args.postgres.is_some() || !POSTGRES_SCENARIOS.contains(id))
            .filter(|id| !wrk || WRK_SCENARIOS.contains(id))
            .map(|id| id.to_string())
            .collect()
    } else {
        let mut scenarios = Vec::new();
        for wanted in &args.only {
            let wanted = wanted.trim();
            let id = known
                .clone()
                .find(|id| id.eq_ignore_ascii_case(wanted))
                .ok_or_else(|| {
                    format!("unknown scenario `{wanted}` (S1..S5, S1pg, S2pg, S2pg2)")
                })?;
            if POSTGRES_SCENARIOS.contains(id) && args.postgres.is_none() {
                return Err(format!(
                    "{id} needs `--postgres URL` (e.g. postgres://postgres@127.0.0.1:5432/postgres)"
                ));
            }
            if wrk && !WRK_SCENARIOS.contains(id) {
                return Err(format!(
                    "{id} cannot run with `--load wrk` (it drives {}); run it with the built-in generator",
                    WRK_SCENARIOS.join(", ")
                ));
            }
            scenarios.push(id.to_string());
        }
        scenarios
    };
    let load = if wrk {
        if args.wrk_threads == 0 {
            return Err("--wrk-threads must be at least 1".into());
        }
        Load::Wrk {
            threads: args.wrk_threads,
            version: wrk::version()?,
        }
    } else {
        Load::Builtin
    };
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/relay-bench → target
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"));
    let relay_bin = match args.relay_bin {
        Some(bin) => bin,
        None => {
            if !args.no_build {
                build_relay()?;
            }
            target_dir.join("release").join("postback-relay")
        }
    };
    if !relay_bin.is_file() {
        return Err(format!("no relay binary at {}", relay_bin.display()));
    }
    let seconds = |value: Option<f64>, full: f64, short: f64| {
        Duration::from_secs_f64(value.unwrap_or(if quick { short } else { full }).max(0.0))
    };
    // wrk's -d takes whole seconds: the load's durations are rounded up.
    let load_seconds = |value: Option<f64>, full: f64, short: f64| {
        let duration = seconds(value, full, short);
        if wrk {
            Duration::from_secs(duration.as_secs_f64().ceil() as u64)
        } else {
            duration
        }
    };
    let bench_dir = target_dir.join("relay-bench");
    Ok(Settings {
        quick,
        scenarios,
        postgres: args.postgres,
        rounds: args.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
        warmup: load_seconds(args.warmup, 1.0, 0.5),
        duration: load_seconds(args.duration, 5.0, 2.0),
        s4_postbacks: args
            .s4_postbacks
            .unwrap_or(if quick { 25_000 } else { 100_000 })
            .max(1),
        s5_postbacks: args
            .s5_postbacks
            .unwrap_or(if quick { 100_000 } else { 500_000 })
            .max(1),
        s5_observe: seconds(args.s5_observe, 10.0, 5.0),
        relay_bin,
        relay_log: args.relay_log,
        work: bench_dir.join("work"),
        out: args.out.unwrap_or_else(|| bench_dir.join("results.json")),
        workers: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        load,
    })
}

/// Builds the relay binary so the benchmark never measures a stale one.
fn build_relay() -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = format!("{REPO}/Cargo.toml");
    eprintln!("relay-bench: cargo build --release --bin postback-relay");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--bin",
            "postback-relay",
            "--manifest-path",
            &manifest,
        ])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("building the relay failed ({status})"))
    }
}
