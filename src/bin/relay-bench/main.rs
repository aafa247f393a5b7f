//! relay-bench: the reproducible benchmark of issue 4. It measures the relay
//! (the release binary, as a child process) against baselines built from the
//! same hyper and the same disk, alternating relay and baseline runs, and
//! prints req/s, latency percentiles and the ratio relay/baseline.
//!
//! ```sh
//! cargo run --release --bin relay-bench -- [--quick] [--only S1,S2,...] [--rounds N]
//!     [--postgres postgres://postgres@127.0.0.1:5432/postgres]
//! ```
//!
//! See the README ("Benchmark") and docs/performance.md for what each
//! scenario measures and how to read the ratios. This is a program, not a
//! test: `cargo test` never runs it and nothing here asserts on timing.

mod loadgen;
mod pg;
mod relay_proc;
mod servers;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use serde_json::{json, Value};

use loadgen::{LoadResult, LoadSpec, Stop};
use relay_proc::{
    cpu_ticks, machine_ticks, memory_kib, store_counts, store_envelopes, Backend, RelayChild,
    RelayConfig,
};
use servers::{start_baseline, start_hung, start_sink, Baseline, Server};

/// The seed postback (a copy of tests/fixtures/seed-mo.xml, used when the
/// fixture is not on disk); its tracking id is replaced per request.
const SEED_XML: &str = r#"<postback>
    <origin>MMS_MO</origin>
    <code>N401</code>
    <from>14082257140</from>
    <to>28444</to>
    <keyword>all</keyword>
    <tracking-id>MMS_MO_iLnCRrL6</tracking-id>
    <operator-id>31002</operator-id>
    <timestamp>2014-02-03T11:19:49-05:00</timestamp>
    <message-subject></message-subject>
    <content>
        <file>URL of Content Here</file>
        <file>URL of Content Here</file>
        <file>URL of Content Here</file>
    </content>
</postback>
"#;
const SEED_TRACKING_ID: &str = "MMS_MO_iLnCRrL6";
const INGEST_PATH: &str = "/sinch/postback";
/// Deliveries in flight in S4: 2 targets × `delivery.concurrency` 16.
const S4_IN_FLIGHT: usize = 32;
/// Connections used to fill a backlog.
const FILL_CONNECTIONS: usize = 64;
/// How long a relay may take to stop gracefully.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: f64 = 1024.0;
/// Scenarios on the embedded SQLite store (the default run).
const SQLITE_SCENARIOS: [&str; 5] = ["S1", "S2", "S3", "S4", "S5"];
/// Scenarios on PostgreSQL (run by default only with `--postgres`).
const POSTGRES_SCENARIOS: [&str; 3] = ["S1pg", "S2pg", "S2pg2"];
/// Issue 4, part 4: two instances on PostgreSQL sustain at least this share
/// of the single-instance SQLite rate in S2…
const S2PG2_MIN_SHARE: f64 = 0.5;
/// …with p99 answer time at most this (ms).
const S2PG2_MAX_P99_MS: f64 = 50.0;

/// Benchmark of the relay against the limits of this machine (issue 4).
#[derive(Debug, Parser)]
#[command(name = "relay-bench")]
struct Args {
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
}

/// Settings after defaults.
struct Settings {
    quick: bool,
    scenarios: Vec<String>,
    postgres: Option<String>,
    rounds: usize,
    warmup: Duration,
    duration: Duration,
    s4_postbacks: u64,
    s5_postbacks: u64,
    s5_observe: Duration,
    relay_bin: PathBuf,
    relay_log: String,
    work: PathBuf,
    out: PathBuf,
    workers: usize,
}

/// One measured run (relay or baseline).
#[derive(Debug, Clone, Default)]
struct RunStats {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    ok: u64,
    errors: u64,
    extra: serde_json::Map<String, Value>,
}

impl RunStats {
    fn from_load(load: &LoadResult) -> RunStats {
        RunStats {
            rps: load.rps(),
            p50: load.quantile_ms(0.50),
            p99: load.quantile_ms(0.99),
            p999: load.quantile_ms(0.999),
            ok: load.ok,
            errors: load.errors,
            extra: serde_json::Map::new(),
        }
    }

    fn json(&self) -> Value {
        let mut value = json!({
            "rps": round2(self.rps), "p50_ms": round3(self.p50), "p99_ms": round3(self.p99),
            "p999_ms": round3(self.p999), "ok": self.ok, "errors": self.errors,
        });
        for (key, extra) in &self.extra {
            value[key] = extra.clone();
        }
        value
    }
}

/// A paired scenario's results.
struct Paired {
    id: &'static str,
    title: String,
    relay_label: String,
    baseline_label: String,
    unit: &'static str,
    target: Option<(f64, &'static str)>,
    relay: Vec<RunStats>,
    baseline: Vec<RunStats>,
    notes: Vec<String>,
}

fn main() {
    let args = Args::parse();
    let settings = match settings(args) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("relay-bench: {err}");
            std::process::exit(2);
        }
    };
    if cfg!(debug_assertions) {
        eprintln!(
            "relay-bench: WARNING: built without --release; the baselines and the load \
             generator are slow, so the ratios mean nothing. Use `cargo run --release --bin relay-bench`."
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
    let bench = Bench::new(settings);
    bench.run();
}

fn settings(args: Args) -> Result<Settings, String> {
    let quick = args.quick;
    let known = SQLITE_SCENARIOS.iter().chain(&POSTGRES_SCENARIOS);
    let scenarios: Vec<String> = if args.only.is_empty() {
        known
            .filter(|id| args.postgres.is_some() || !POSTGRES_SCENARIOS.contains(id))
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
            scenarios.push(id.to_string());
        }
        scenarios
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
    let bench_dir = target_dir.join("relay-bench");
    Ok(Settings {
        quick,
        scenarios,
        postgres: args.postgres,
        rounds: args.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
        warmup: seconds(args.warmup, 1.0, 0.5),
        duration: seconds(args.duration, 5.0, 2.0),
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
    })
}

/// Builds the relay binary so the benchmark never measures a stale one.
fn build_relay() -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    eprintln!("relay-bench: cargo build --release --bin postback-relay");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--bin",
            "postback-relay",
            "--manifest-path",
            manifest,
        ])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("building the relay failed ({status})"))
    }
}

struct Bench {
    s: Settings,
    sink: Server,
    seed: Arc<(String, String)>,
    runs: AtomicU64,
    tag: String,
    started: Instant,
}

impl Bench {
    fn new(s: Settings) -> Bench {
        let seed = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/seed-mo.xml"
        ))
        .unwrap_or_else(|_| SEED_XML.to_owned());
        let (before, after) = seed
            .split_once(SEED_TRACKING_ID)
            .expect("the seed has a tracking id");
        let sink = start_sink(s.workers);
        Bench {
            s,
            sink,
            seed: Arc::new((before.to_owned(), after.to_owned())),
            runs: AtomicU64::new(0),
            tag: format!("{:x}", chrono::Utc::now().timestamp() & 0xffff_ffff),
            started: Instant::now(),
        }
    }

    fn log(&self, message: &str) {
        eprintln!("[{:>6.1}s] {message}", self.started.elapsed().as_secs_f64());
    }

    /// A fresh directory for one run, on the same disk as target/.
    fn fresh_dir(&self, what: &str) -> PathBuf {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let dir = self.s.work.join(format!("{n:03}-{what}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create run dir");
        dir
    }

    /// Seed XML bodies with a tracking id unique to this run and request.
    fn bodies(&self) -> loadgen::BodyMaker {
        let seed = self.seed.clone();
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("BENCH-{}-{run}-", self.tag);
        Arc::new(move |seq| {
            let (before, after) = (&seed.0, &seed.1);
            let mut body = String::with_capacity(before.len() + after.len() + 40);
            body.push_str(before);
            body.push_str(&prefix);
            body.push_str(&seq.to_string());
            body.push_str(after);
            Bytes::from(body)
        })
    }

    fn timed(&self, addrs: Vec<std::net::SocketAddr>, connections: usize) -> LoadSpec {
        LoadSpec {
            addrs,
            path: INGEST_PATH.into(),
            connections,
            stop: Stop::Timed {
                warmup: self.s.warmup,
                duration: self.s.duration,
            },
            body: self.bodies(),
            content_type: "text/xml",
            progress: None,
        }
    }

    fn relay_config(&self, dir: &Path, backend: Backend, target_port: u16) -> RelayConfig {
        RelayConfig {
            dir: dir.to_path_buf(),
            backend,
            target_base: format!("http://127.0.0.1:{target_port}"),
            delivery_timeout: "10s",
        }
    }

    fn run(&self) {
        let s = &self.s;
        self.log(&format!(
            "relay {} | {} round(s) | {:.1}s warm-up + {:.1}s measured | scenarios {}",
            s.relay_bin.display(),
            s.rounds,
            s.warmup.as_secs_f64(),
            s.duration.as_secs_f64(),
            s.scenarios.join(",")
        ));
        let mut paired = Vec::new();
        let mut s2_rss: Vec<f64> = Vec::new();
        let mut s5 = None;
        for scenario in s.scenarios.clone() {
            match scenario.as_str() {
                "S1" => paired.push(self.latency_scenario(
                    "S1",
                    "1 connection, store.sync full",
                    Backend::Sqlite { sync: "full" },
                    1,
                    1,
                    Baseline::FsyncEach,
                    Some((0.90, "req/s ratio ≥ 0.90")),
                )),
                "S2" => {
                    let result = self.latency_scenario(
                        "S2",
                        "64 connections, store.sync full",
                        Backend::Sqlite { sync: "full" },
                        1,
                        64,
                        Baseline::GroupCommit,
                        Some((0.70, "req/s ratio ≥ 0.70, p99 ratio ≤ 3")),
                    );
                    s2_rss = result
                        .relay
                        .iter()
                        .filter_map(|r| r.extra.get("peak_rss_kib").and_then(Value::as_f64))
                        .collect();
                    paired.push(result);
                }
                "S3" => paired.push(self.latency_scenario(
                    "S3",
                    "1 connection, store.sync normal",
                    Backend::Sqlite { sync: "normal" },
                    1,
                    1,
                    Baseline::Bare,
                    Some((0.50, "req/s ratio ≥ 0.50")),
                )),
                "S1pg" => paired.push(self.latency_scenario(
                    "S1pg",
                    "1 connection, PostgreSQL, one relay instance",
                    self.postgres_server(),
                    1,
                    1,
                    Baseline::FsyncEach,
                    None,
                )),
                "S2pg" => paired.push(self.latency_scenario(
                    "S2pg",
                    "64 connections, PostgreSQL, one relay instance",
                    self.postgres_server(),
                    1,
                    64,
                    Baseline::GroupCommit,
                    None,
                )),
                "S2pg2" => paired.push(self.latency_scenario(
                    "S2pg2",
                    "64 connections, PostgreSQL, two relay instances (32 connections each)",
                    self.postgres_server(),
                    2,
                    64,
                    Baseline::GroupCommit,
                    None,
                )),
                "S4" => paired.push(self.s4()),
                "S5" => s5 = Some(self.s5()),
                _ => unreachable!("checked in settings"),
            }
        }
        let table = render(s, &paired, s5.as_ref(), &s2_rss);
        println!("{table}");
        let json = results_json(s, &paired, s5.as_ref(), &s2_rss, &table);
        if let Some(dir) = s.out.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::write(
            &s.out,
            serde_json::to_string_pretty(&json).expect("json") + "\n",
        ) {
            Ok(()) => eprintln!("relay-bench: results written to {}", s.out.display()),
            Err(err) => eprintln!("relay-bench: cannot write {}: {err}", s.out.display()),
        }
        let _ = std::fs::remove_dir_all(&s.work);
    }

    /// The `--postgres` server as a backend (each run makes a database on it).
    fn postgres_server(&self) -> Backend {
        Backend::Postgres {
            url: self.s.postgres.clone().expect("checked in settings"),
        }
    }

    /// S1–S3 and the PostgreSQL scenarios: the relay (`instances` of it,
    /// sharing the store and the connections) and a baseline, same load,
    /// alternating.
    #[allow(clippy::too_many_arguments)]
    fn latency_scenario(
        &self,
        id: &'static str,
        title: &str,
        backend: Backend,
        instances: usize,
        connections: usize,
        baseline: Baseline,
        target: Option<(f64, &'static str)>,
    ) -> Paired {
        let mut result = Paired {
            id,
            title: title.to_owned(),
            relay_label: if instances > 1 {
                format!("{}, {instances} instances", backend.label())
            } else {
                backend.label()
            },
            baseline_label: baseline.label().to_owned(),
            unit: "req/s",
            target,
            relay: Vec::new(),
            baseline: Vec::new(),
            notes: Vec::new(),
        };
        for round in 1..=self.s.rounds {
            match self.relay_run(id, &backend, instances, connections) {
                Ok((stats, notes)) => {
                    self.log(&format!(
                        "{id} round {round} relay    {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms  errors {}",
                        stats.rps, stats.p50, stats.p99, stats.errors
                    ));
                    result.relay.push(stats);
                    result.notes.extend(notes);
                }
                Err(err) => {
                    self.log(&format!("{id} round {round} relay FAILED: {err}"));
                    result
                        .notes
                        .push(format!("round {round}: relay failed: {err}"));
                }
            }
            let stats = self.baseline_run(id, baseline, connections);
            self.log(&format!(
                "{id} round {round} baseline {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms  errors {}",
                stats.rps, stats.p50, stats.p99, stats.errors
            ));
            result.baseline.push(stats);
        }
        result.notes.sort();
        result.notes.dedup();
        result
    }

    /// One measured relay run: a fresh store (a new SQLite directory, or a
    /// new database on the PostgreSQL server), `instances` relays on it, the
    /// connections spread evenly over their ingest listeners.
    fn relay_run(
        &self,
        id: &str,
        backend: &Backend,
        instances: usize,
        connections: usize,
    ) -> Result<(RunStats, Vec<String>), String> {
        let dir = self.fresh_dir(&format!("{}-relay", id.to_lowercase()));
        let mut notes = Vec::new();
        // Declared before the relays, so dropped (DROP DATABASE) after them.
        let mut database = None;
        let backend = match backend {
            Backend::Postgres { url } => {
                let created = pg::RunDatabase::create(url)?;
                notes.push(format!("PostgreSQL: {}", created.settings));
                let backend = Backend::Postgres {
                    url: created.url.clone(),
                };
                database = Some(created);
                backend
            }
            sqlite => sqlite.clone(),
        };
        let delivered_before = self.sink.requests.load(Ordering::Relaxed);
        let mut relays = Vec::with_capacity(instances);
        for instance in 0..instances {
            let config = self.relay_config(
                &dir.join(format!("instance-{instance}")),
                backend.clone(),
                self.sink.addr.port(),
            );
            relays.push(RelayChild::start(
                &self.s.relay_bin,
                &config,
                &self.s.relay_log,
            )?);
        }
        let addrs = relays.iter().map(|relay| relay.ingest).collect();
        let relay_cpu = || -> Option<u64> { relays.iter().map(|r| cpu_ticks(r.pid())).sum() };
        let (cpu_before, machine_before) = (relay_cpu(), machine_ticks());
        let load = loadgen::run(self.timed(addrs, connections));
        let mut stats = RunStats::from_load(&load);
        insert_cpu(&mut stats, machine_before);
        if let (Some(before), Some(after)) = (cpu_before, relay_cpu()) {
            // Ticks are 10 ms; over warm-up and the measured run.
            let per_postback =
                (after - before) as f64 * 10_000.0 / load.answered_total.max(1) as f64;
            stats.extra.insert(
                "relay_cpu_us_per_postback".into(),
                json!(per_postback.round()),
            );
        }
        let mut peak_kib = Vec::new();
        for relay in &mut relays {
            if let Some(status) = relay.exited() {
                notes.push(format!(
                    "a relay exited during the run ({status}); last log lines:\n{}",
                    relay.log_summary().tail.join("\n")
                ));
            }
            if let Some((hwm, rss)) = relay.memory_kib() {
                peak_kib.push((hwm, rss));
            }
        }
        // The largest instance (they share the load evenly).
        if let Some(&(hwm, rss)) = peak_kib.iter().max() {
            stats.extra.insert("peak_rss_kib".into(), json!(hwm));
            stats.extra.insert("rss_kib".into(), json!(rss));
        }
        if let Backend::Sqlite { .. } = backend {
            let wal: u64 = (0..instances)
                .map(|i| file_size(&dir.join(format!("instance-{i}/relay.db-wal"))))
                .sum();
            stats.extra.insert("wal_bytes_at_end".into(), json!(wal));
        }
        let mut log = (0, 0, 0);
        for relay in relays {
            let stopped = relay.stop(STOP_TIMEOUT);
            log.0 += stopped.log.lines;
            log.1 += stopped.log.warnings;
            log.2 += stopped.log.errors;
            notes.extend(stop_notes(&stopped));
        }
        let delivered = self.sink.requests.load(Ordering::Relaxed) - delivered_before;
        stats
            .extra
            .insert("deliveries_seen_by_sink".into(), json!(delivered));
        stats
            .extra
            .insert("postbacks_accepted".into(), json!(load.answered_total));
        stats.extra.insert(
            "log".into(),
            json!({"lines": log.0, "warn": log.1, "error": log.2}),
        );
        if instances > 1 {
            stats.extra.insert("instances".into(), json!(instances));
        }
        if load.errors > 0 {
            notes.push(format!(
                "{} load errors, e.g. {:?}",
                load.errors, load.error_samples
            ));
        }
        drop(database);
        let _ = std::fs::remove_dir_all(&dir);
        Ok((stats, notes))
    }

    fn baseline_run(&self, id: &str, kind: Baseline, connections: usize) -> RunStats {
        let dir = self.fresh_dir(&format!("{}-baseline", id.to_lowercase()));
        let server = start_baseline(kind, &dir, self.s.workers);
        let machine_before = machine_ticks();
        let load = loadgen::run(self.timed(vec![server.addr], connections));
        let mut stats = RunStats::from_load(&load);
        insert_cpu(&mut stats, machine_before);
        let syncs = server.sync_stats.syncs.load(Ordering::Relaxed);
        let records = server.sync_stats.records.load(Ordering::Relaxed);
        if syncs > 0 {
            stats.extra.insert("fdatasyncs".into(), json!(syncs));
            stats.extra.insert(
                "records_per_fdatasync".into(),
                json!(round2(records as f64 / syncs as f64)),
            );
        }
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
        stats
    }

    /// Fills a store with `postbacks` × 2 pending deliveries: the relay runs
    /// with both targets on a hung server (connections accepted, never
    /// answered, `delivery.timeout` 2 s), 64 connections post as fast as it
    /// takes them, and the relay is stopped with SIGTERM (the WAL is
    /// checkpointed). Returns the store directory and what was seen.
    fn fill(&self, what: &str, postbacks: u64) -> Result<(PathBuf, Value), String> {
        let dir = self.fresh_dir(&format!("{what}-backlog"));
        let hung = start_hung();
        let mut config =
            self.relay_config(&dir, Backend::Sqlite { sync: "normal" }, hung.addr.port());
        config.delivery_timeout = "2s";
        let mut relay = RelayChild::start(&self.s.relay_bin, &config, &self.s.relay_log)?;
        let pid = relay.pid();
        let samples: Arc<Mutex<Vec<FillSample>>> = Arc::default();
        let progress = {
            let samples = samples.clone();
            let wal = dir.join("relay.db-wal");
            let last_print = Arc::new(AtomicU64::new(0));
            let started = self.started;
            Arc::new(move |answered: u64| {
                if let Some((hwm, rss)) = memory_kib(pid) {
                    let wal_bytes = file_size(&wal);
                    samples
                        .lock()
                        .unwrap()
                        .push((answered, hwm, rss, wal_bytes));
                    let step = (postbacks / 10).max(1);
                    if answered / step > last_print.load(Ordering::Relaxed) {
                        last_print.store(answered / step, Ordering::Relaxed);
                        eprintln!(
                            "[{:>6.1}s]   fill: {answered}/{postbacks} postbacks, relay RSS {:.1} MiB (peak {:.1}), WAL {:.0} MiB",
                            started.elapsed().as_secs_f64(),
                            rss as f64 / MIB,
                            hwm as f64 / MIB,
                            wal_bytes as f64 / MIB / MIB
                        );
                    }
                }
            }) as Arc<dyn Fn(u64) + Send + Sync>
        };
        self.log(&format!(
            "{what}: filling a backlog of {postbacks} postbacks × 2 targets (target hung)"
        ));
        let load = loadgen::run(LoadSpec {
            addrs: vec![relay.ingest],
            path: INGEST_PATH.into(),
            connections: FILL_CONNECTIONS,
            stop: Stop::Count(postbacks),
            body: self.bodies(),
            content_type: "text/xml",
            progress: Some(progress),
        });
        let memory = relay.memory_kib();
        let crashed = relay.exited();
        let stopped = relay.stop(STOP_TIMEOUT);
        drop(hung);
        if let Some(status) = crashed {
            return Err(format!(
                "the relay exited while filling ({status}):\n{}",
                stopped.log.tail.join("\n")
            ));
        }
        let counts = store_counts(&dir)?;
        self.log(&format!(
            "{what}: filled in {:.1} s ({:.0} postbacks/s, {} errors); store: {} events, {} pending jobs ({} attempted once or more), {} dead",
            load.window.as_secs_f64(),
            load.rps(),
            load.errors,
            counts.events,
            counts.jobs,
            counts.attempted,
            counts.dead
        ));
        if counts.jobs < 2 * postbacks {
            return Err(format!(
                "the backlog is short: {} pending jobs, expected {} (load: {} ok, {} errors {:?})",
                counts.jobs,
                2 * postbacks,
                load.ok,
                load.errors,
                load.error_samples
            ));
        }
        let samples = samples.lock().unwrap().clone();
        let info = json!({
            "postbacks": postbacks,
            "seconds": round2(load.window.as_secs_f64()),
            "postbacks_per_s": round2(load.rps()),
            "errors": load.errors,
            "peak_rss_kib": memory.map(|m| m.0),
            "rss_kib_at_end": memory.map(|m| m.1),
            "rss_samples": samples.iter().map(|(n, hwm, rss, wal)| json!({"answered": n, "peak_rss_kib": hwm, "rss_kib": rss, "wal_bytes": wal})).collect::<Vec<_>>(),
            "max_wal_bytes": samples.iter().map(|s| s.3).max(),
            "store": {"events": counts.events, "jobs": counts.jobs, "attempted": counts.attempted, "dead": counts.dead},
            "stop": {"seconds": round2(stopped.took.as_secs_f64()), "clean": stopped.status.is_some_and(|s| s.success())},
            "log": {"lines": stopped.log.lines, "warn": stopped.log.warnings, "error": stopped.log.errors},
        });
        Ok((dir, info))
    }

    /// S4: drain a backlog to the sink vs a bare client posting the same bodies.
    fn s4(&self) -> Paired {
        let postbacks = self.s.s4_postbacks;
        let deliveries = 2 * postbacks;
        let mut result = Paired {
            id: "S4",
            title: format!("drain {deliveries} deliveries to the sink"),
            relay_label: "2 targets × concurrency 16".into(),
            baseline_label: format!("bare hyper client, {S4_IN_FLIGHT} in flight"),
            unit: "deliveries/s",
            target: Some((0.50, "deliveries/s ratio ≥ 0.50")),
            relay: Vec::new(),
            baseline: Vec::new(),
            notes: Vec::new(),
        };
        let (snapshot, fill) = match self.fill("s4", postbacks) {
            Ok(filled) => filled,
            Err(err) => {
                self.log(&format!("S4 FAILED: {err}"));
                result.notes.push(format!("fill failed: {err}"));
                return result;
            }
        };
        let envelopes = match store_envelopes(&snapshot) {
            Ok(envelopes) => Arc::new(envelopes),
            Err(err) => {
                result
                    .notes
                    .push(format!("cannot read envelopes from the store: {err}"));
                return result;
            }
        };
        for round in 1..=self.s.rounds {
            match self.drain_run(&snapshot, deliveries) {
                Ok((stats, notes)) => {
                    self.log(&format!(
                        "S4 round {round} relay    {:>9.0} deliveries/s",
                        stats.rps
                    ));
                    result.relay.push(stats);
                    result.notes.extend(notes);
                }
                Err(err) => {
                    self.log(&format!("S4 round {round} relay FAILED: {err}"));
                    result.notes.push(format!("round {round}: {err}"));
                }
            }
            let stats = self.client_run(&envelopes);
            self.log(&format!(
                "S4 round {round} baseline {:>9.0} deliveries/s  p50 {:.3} ms  p99 {:.3} ms  errors {}",
                stats.rps, stats.p50, stats.p99, stats.errors
            ));
            result.baseline.push(stats);
        }
        result.notes.sort();
        result.notes.dedup();
        result.relay.iter_mut().for_each(|r| {
            r.extra.insert("fill".into(), fill.clone());
        });
        let _ = std::fs::remove_dir_all(&snapshot);
        result
    }

    /// One S4 relay run: a copy of the backlog, targets on the live sink,
    /// timed from "listening" until the sink has every delivery.
    fn drain_run(
        &self,
        snapshot: &Path,
        deliveries: u64,
    ) -> Result<(RunStats, Vec<String>), String> {
        let dir = self.fresh_dir("s4-drain");
        copy_store(snapshot, &dir)?;
        let config = self.relay_config(
            &dir,
            Backend::Sqlite { sync: "full" },
            self.sink.addr.port(),
        );
        self.sink.requests.store(0, Ordering::Relaxed);
        let spawned = Instant::now();
        let mut relay = RelayChild::start(&self.s.relay_bin, &config, &self.s.relay_log)?;
        let startup = relay.listening_at - spawned;
        let from = relay.listening_at;
        let deadline = Duration::from_secs(600);
        let mut first = None;
        let mut notes = Vec::new();
        let finished = loop {
            let seen = self.sink.requests.load(Ordering::Relaxed);
            if seen > 0 && first.is_none() {
                first = Some(from.elapsed());
            }
            if seen >= deliveries {
                break Some(from.elapsed());
            }
            if let Some(status) = relay.exited() {
                notes.push(format!(
                    "the relay exited while draining ({status}) after {seen} deliveries:\n{}",
                    relay.log_summary().tail.join("\n")
                ));
                break None;
            }
            if from.elapsed() > deadline {
                notes.push(format!(
                    "the sink had {seen}/{deliveries} deliveries after {deadline:?}"
                ));
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let memory = relay.memory_kib();
        let wal_bytes = file_size(&dir.join("relay.db-wal"));
        let stopped = relay.stop(STOP_TIMEOUT);
        notes.extend(stop_notes(&stopped));
        let Some(took) = finished else {
            return Err(notes.join("; "));
        };
        let received = self.sink.requests.load(Ordering::Relaxed);
        let mut stats = RunStats {
            rps: deliveries as f64 / took.as_secs_f64(),
            p50: f64::NAN,
            p99: f64::NAN,
            p999: f64::NAN,
            ok: deliveries,
            errors: 0,
            extra: serde_json::Map::new(),
        };
        stats
            .extra
            .insert("drain_seconds".into(), json!(round3(took.as_secs_f64())));
        stats.extra.insert(
            "startup_seconds".into(),
            json!(round3(startup.as_secs_f64())),
        );
        stats.extra.insert(
            "first_delivery_after_s".into(),
            json!(first.map(|f| round3(f.as_secs_f64()))),
        );
        stats.extra.insert("sink_received".into(), json!(received));
        stats
            .extra
            .insert("wal_bytes_at_end".into(), json!(wal_bytes));
        if let Some((hwm, _)) = memory {
            stats.extra.insert("peak_rss_kib".into(), json!(hwm));
        }
        if received > deliveries {
            notes.push(format!(
                "the sink received {received} requests for {deliveries} deliveries ({} repeats)",
                received - deliveries
            ));
        }
        match store_counts(&dir) {
            Ok(counts) => {
                stats.extra.insert(
                    "store_after".into(),
                    json!({"events": counts.events, "jobs": counts.jobs, "dead": counts.dead}),
                );
                if counts.jobs > 0 || counts.events > 0 {
                    notes.push(format!(
                        "after the drain and a graceful stop the store still holds {} jobs and {} events",
                        counts.jobs, counts.events
                    ));
                }
            }
            Err(err) => notes.push(format!("cannot count the store after the drain: {err}")),
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok((stats, notes))
    }

    /// S4's baseline: a bare hyper client posts every envelope once per target
    /// to the same sink, 32 requests in flight, on a runtime like the relay's.
    fn client_run(&self, envelopes: &Arc<Vec<Bytes>>) -> RunStats {
        let total = envelopes.len() * 2;
        let sink = self.sink.addr;
        let workers = self.s.workers;
        let envelopes = envelopes.clone();
        self.sink.requests.store(0, Ordering::Relaxed);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("bare-client")
            .enable_all()
            .build()
            .expect("client runtime");
        let (elapsed, mut latencies, errors) = runtime.block_on(async move {
            let client: hyper_util::client::legacy::Client<
                hyper_util::client::legacy::connect::HttpConnector,
                http_body_util::Full<Bytes>,
            > = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
            let inbox: hyper::Uri = format!("http://{sink}/hooks/inbox").parse().unwrap();
            let archive: hyper::Uri = format!("http://{sink}/hooks/archive").parse().unwrap();
            let next = Arc::new(AtomicUsize::new(0));
            let started = Instant::now();
            let tasks: Vec<_> = (0..S4_IN_FLIGHT)
                .map(|_| {
                    let client = client.clone();
                    let next = next.clone();
                    let envelopes = envelopes.clone();
                    let (inbox, archive) = (inbox.clone(), archive.clone());
                    tokio::spawn(async move {
                        let mut latencies = Vec::new();
                        let mut errors = 0u64;
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= total {
                                break;
                            }
                            let uri = if i % 2 == 0 { &inbox } else { &archive };
                            let request = hyper::Request::post(uri.clone())
                                .header("content-type", "application/cloudevents+json")
                                .header("user-agent", "relay-bench")
                                .body(http_body_util::Full::new(envelopes[i / 2].clone()))
                                .expect("request");
                            let sent = Instant::now();
                            let outcome = async {
                                let response = client.request(request).await.ok()?;
                                let status = response.status();
                                http_body_util::BodyExt::collect(response.into_body())
                                    .await
                                    .ok()?;
                                Some(status)
                            }
                            .await;
                            match outcome {
                                Some(status) if status.is_success() => latencies
                                    .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32),
                                _ => errors += 1,
                            }
                        }
                        (latencies, errors)
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(total);
            let mut errors = 0;
            for task in tasks {
                if let Ok((latencies, e)) = task.await {
                    all.extend(latencies);
                    errors += e;
                }
            }
            (started.elapsed(), all, errors)
        });
        runtime.shutdown_timeout(Duration::from_secs(2));
        latencies.sort_unstable();
        let ok = latencies.len() as u64;
        let mut stats = RunStats {
            rps: ok as f64 / elapsed.as_secs_f64(),
            p50: loadgen::quantile_us(&latencies, 0.5) / 1000.0,
            p99: loadgen::quantile_us(&latencies, 0.99) / 1000.0,
            p999: loadgen::quantile_us(&latencies, 0.999) / 1000.0,
            ok,
            errors,
            extra: serde_json::Map::new(),
        };
        stats.extra.insert(
            "sink_received".into(),
            json!(self.sink.requests.load(Ordering::Relaxed)),
        );
        stats
    }

    /// S5: peak RSS of the relay with a large backlog and the sink down.
    fn s5(&self) -> Value {
        let postbacks = self.s.s5_postbacks;
        let (dir, fill) = match self.fill("s5", postbacks) {
            Ok(filled) => filled,
            Err(err) => {
                self.log(&format!("S5 FAILED: {err}"));
                return json!({"error": err});
            }
        };
        let port = servers::dead_port();
        let config = self.relay_config(&dir, Backend::Sqlite { sync: "full" }, port);
        self.log(&format!(
            "s5: restarting with {} pending deliveries, targets refusing connections, watching {:.0} s",
            2 * postbacks,
            self.s.s5_observe.as_secs_f64()
        ));
        let spawned = Instant::now();
        let mut relay = match RelayChild::start(&self.s.relay_bin, &config, &self.s.relay_log) {
            Ok(relay) => relay,
            Err(err) => return json!({"fill": fill, "error": err}),
        };
        let startup = relay.listening_at - spawned;
        let mut samples = Vec::new();
        let watch = Instant::now();
        let mut crashed = None;
        while watch.elapsed() < self.s.s5_observe {
            std::thread::sleep(Duration::from_millis(500));
            if let Some((hwm, rss)) = relay.memory_kib() {
                samples.push(json!({"t": round2(watch.elapsed().as_secs_f64()), "peak_rss_kib": hwm, "rss_kib": rss}));
            }
            if let Some(status) = relay.exited() {
                crashed = Some(status.to_string());
                break;
            }
        }
        let memory = relay.memory_kib();
        let stopped = relay.stop(STOP_TIMEOUT);
        let counts = store_counts(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let restart = json!({
            "pending": 2 * postbacks,
            "startup_seconds": round3(startup.as_secs_f64()),
            "observed_seconds": round2(self.s.s5_observe.as_secs_f64()),
            "peak_rss_kib": memory.map(|m| m.0),
            "rss_kib_at_end": memory.map(|m| m.1),
            "rss_samples": samples,
            "crashed": crashed,
            "stop": {"seconds": round2(stopped.took.as_secs_f64()), "clean": stopped.status.is_some_and(|s| s.success())},
            "log": {"lines": stopped.log.lines, "warn": stopped.log.warnings, "error": stopped.log.errors},
            "store_after": counts.map(|c| json!({"events": c.events, "jobs": c.jobs, "attempted": c.attempted, "dead": c.dead})).unwrap_or_else(|e| json!(e)),
        });
        self.log(&format!(
            "s5: peak RSS filling {:.1} MiB, restarted with backlog {:.1} MiB",
            fill["peak_rss_kib"].as_f64().unwrap_or(f64::NAN) / MIB,
            restart["peak_rss_kib"].as_f64().unwrap_or(f64::NAN) / MIB
        ));
        json!({"fill": fill, "restart": restart})
    }
}

/// (postbacks answered, VmHWM KiB, VmRSS KiB, WAL bytes) while filling.
type FillSample = (u64, u64, u64, u64);

/// Size of a file in bytes (0 when absent).
fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Adds how busy the machine's CPUs were since `before` (load generator,
/// server or relay, sink: everything), to show which runs are CPU-bound.
fn insert_cpu(stats: &mut RunStats, before: Option<(u64, u64)>) {
    if let (Some((busy0, total0)), Some((busy1, total1))) = (before, machine_ticks()) {
        let busy = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64;
        stats
            .extra
            .insert("machine_cpu_busy".into(), json!(round2(busy)));
    }
}

/// Copies a stopped relay's store files into `dir`.
fn copy_store(snapshot: &Path, dir: &Path) -> Result<(), String> {
    for entry in std::fs::read_dir(snapshot).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("relay.db") {
            continue;
        }
        // The intake journal is a directory (empty after the clean stop
        // that made the snapshot, but copied whole all the same).
        if entry.file_type().map_err(|e| e.to_string())?.is_dir() {
            let into = dir.join(&name);
            std::fs::create_dir_all(&into).map_err(|e| format!("copy store: {e}"))?;
            for segment in std::fs::read_dir(entry.path()).map_err(|e| e.to_string())? {
                let segment = segment.map_err(|e| e.to_string())?;
                std::fs::copy(segment.path(), into.join(segment.file_name()))
                    .map_err(|e| format!("copy store: {e}"))?;
            }
            continue;
        }
        std::fs::copy(entry.path(), dir.join(&name)).map_err(|e| format!("copy store: {e}"))?;
    }
    Ok(())
}

fn stop_notes(stopped: &relay_proc::Stopped) -> Vec<String> {
    let mut notes = Vec::new();
    match stopped.status {
        Some(status) if status.success() => {}
        Some(status) => notes.push(format!(
            "the relay exited with {status} after SIGTERM; last lines:\n{}",
            stopped.log.tail.join("\n")
        )),
        None => notes.push(format!(
            "the relay did not stop within {STOP_TIMEOUT:?} of SIGTERM (SIGKILLed)"
        )),
    }
    if stopped.log.errors > 0 || stopped.log.warnings > 0 {
        notes.push(format!(
            "relay log: {} WARN and {} ERROR lines, e.g. {}",
            stopped.log.warnings,
            stopped.log.errors,
            stopped.log.samples.join(" | ")
        ));
    }
    notes
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Medians over rounds, and ratios relay/baseline as the median of the
/// per-round ratios (each pair ran back to back, so drift cancels).
struct Summary {
    relay: [f64; 4],
    baseline: [f64; 4],
    ratio: [f64; 4],
    errors: (u64, u64),
}

fn summarize(p: &Paired) -> Summary {
    let pick = |r: &RunStats| [r.rps, r.p50, r.p99, r.p999];
    let med = |runs: &[RunStats]| -> [f64; 4] {
        let mut out = [f64::NAN; 4];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = median(runs.iter().map(|r| pick(r)[i]));
        }
        out
    };
    let mut ratio = [f64::NAN; 4];
    for (i, slot) in ratio.iter_mut().enumerate() {
        *slot = median(
            p.relay
                .iter()
                .zip(&p.baseline)
                .map(|(a, b)| pick(a)[i] / pick(b)[i]),
        );
    }
    Summary {
        relay: med(&p.relay),
        baseline: med(&p.baseline),
        ratio,
        errors: (
            p.relay.iter().map(|r| r.errors).sum(),
            p.baseline.iter().map(|r| r.errors).sum(),
        ),
    }
}

fn verdict(p: &Paired, s: &Summary) -> Option<bool> {
    let (threshold, _) = p.target?;
    if !s.ratio[0].is_finite() {
        return None;
    }
    let mut met = s.ratio[0] >= threshold;
    if p.id == "S2" {
        met &= s.ratio[2] <= 3.0;
    }
    Some(met)
}

/// Issue 4, part 4: S2pg2's relay rate as a share of the S2 (SQLite) relay
/// rate of the same invocation, and its p99, against the target.
fn s2pg2_vs_s2(paired: &[Paired]) -> Option<Value> {
    let pg2 = paired.iter().find(|p| p.id == "S2pg2")?;
    let target = format!(
        "S2pg2 rate ≥ {S2PG2_MIN_SHARE} × S2 SQLite relay rate, p99 ≤ {S2PG2_MAX_P99_MS} ms"
    );
    let pg2 = summarize(pg2);
    let Some(s2) = paired.iter().find(|p| p.id == "S2") else {
        return Some(json!({
            "target": target,
            "p99_ms": round3(pg2.relay[2]),
            "error": "S2 (SQLite) was not run in this invocation; no ratio",
        }));
    };
    let share = pg2.relay[0] / summarize(s2).relay[0];
    let met = (share.is_finite() && pg2.relay[2].is_finite())
        .then(|| share >= S2PG2_MIN_SHARE && pg2.relay[2] <= S2PG2_MAX_P99_MS);
    Some(json!({
        "target": target,
        "share_of_s2_sqlite": round3(share),
        "p99_ms": round3(pg2.relay[2]),
        "target_met": met,
    }))
}

fn num(value: f64, decimals: usize) -> String {
    if !value.is_finite() {
        return "-".into();
    }
    if decimals == 0 {
        let text = format!("{:.0}", value);
        let (sign, digits) = text.split_at(if text.starts_with('-') { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else {
        format!("{value:.decimals$}")
    }
}

fn render(s: &Settings, paired: &[Paired], s5: Option<&Value>, s2_rss: &[f64]) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "relay-bench {} | {} | {} round(s), medians | {:.1} s measured after {:.1} s warm-up | {} CPUs",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        if s.quick { "quick" } else { "full" },
        s.rounds,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.workers,
    );
    let _ = writeln!(
        t,
        "ratio = relay / baseline (median of per-round ratios): ≥ 1 is better for rates, ≤ 1 for latencies"
    );
    if !paired.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "{:<4} {:<46} {:>12} {:>9} {:>9} {:>9} {:>7}",
            "", "", "rate", "p50 ms", "p99 ms", "p99.9 ms", "errors"
        );
    }
    for p in paired {
        let sum = summarize(p);
        let lat = |v: &[f64; 4], i: usize| num(v[i], 3);
        let _ = writeln!(t, "{:<4} {} ({})", p.id, p.title, p.unit);
        for (label, values, errors) in [
            (
                format!("relay: {}", p.relay_label),
                &sum.relay,
                sum.errors.0,
            ),
            (
                format!("baseline: {}", p.baseline_label),
                &sum.baseline,
                sum.errors.1,
            ),
        ] {
            let _ = writeln!(
                t,
                "{:<4} {:<46} {:>12} {:>9} {:>9} {:>9} {:>7}",
                "",
                label,
                num(values[0], 0),
                lat(values, 1),
                lat(values, 2),
                lat(values, 3),
                errors
            );
        }
        let target = match (p.target, verdict(p, &sum)) {
            (Some((_, text)), Some(true)) => format!("target {text}: met"),
            (Some((_, text)), Some(false)) => format!("target {text}: NOT met"),
            (Some((_, text)), None) => format!("target {text}: no data"),
            (None, _) => String::new(),
        };
        let _ = writeln!(
            t,
            "{:<4} {:<46} {:>12} {:>9} {:>9} {:>9}   {}",
            "",
            "ratio relay/baseline",
            num(sum.ratio[0], 2),
            num(sum.ratio[1], 2),
            num(sum.ratio[2], 2),
            num(sum.ratio[3], 2),
            target
        );
        if p.id == "S4" {
            if let Some(fill) = p.relay.first().and_then(|r| r.extra.get("fill")) {
                let fill_rate = fill["postbacks_per_s"].as_f64().unwrap_or(f64::NAN);
                let drain = median(
                    p.relay
                        .iter()
                        .filter_map(|r| r.extra.get("drain_seconds").and_then(Value::as_f64)),
                );
                let fill_wal = fill["max_wal_bytes"].as_f64().unwrap_or(f64::NAN) / MIB / MIB;
                let drain_wal = median(
                    p.relay
                        .iter()
                        .filter_map(|r| r.extra.get("wal_bytes_at_end").and_then(Value::as_f64)),
                ) / MIB
                    / MIB;
                let _ = writeln!(
                    t,
                    "{:<4} backlog filled at {} postbacks/s (WAL up to {} MiB); drain time {} s, WAL at the end of the drain {} MiB (medians)",
                    "",
                    num(fill_rate, 0),
                    num(fill_wal, 0),
                    num(drain, 2),
                    num(drain_wal, 0)
                );
            }
        }
        let accepted = median(
            p.relay
                .iter()
                .filter_map(|r| r.extra.get("postbacks_accepted").and_then(Value::as_f64)),
        );
        let delivered = median(p.relay.iter().filter_map(|r| {
            r.extra
                .get("deliveries_seen_by_sink")
                .and_then(Value::as_f64)
        }));
        let wal = median(
            p.relay
                .iter()
                .filter_map(|r| r.extra.get("wal_bytes_at_end").and_then(Value::as_f64)),
        ) / MIB
            / MIB;
        let busy = |runs: &[RunStats]| {
            median(
                runs.iter()
                    .filter_map(|r| r.extra.get("machine_cpu_busy").and_then(Value::as_f64)),
            )
        };
        let relay_cpu = median(p.relay.iter().filter_map(|r| {
            r.extra
                .get("relay_cpu_us_per_postback")
                .and_then(Value::as_f64)
        }));
        if relay_cpu.is_finite() {
            let _ = writeln!(
                t,
                "{:<4} CPU: relay {} µs per postback (its deliveries included); machine busy {} % (relay run) vs {} % (baseline run)",
                "",
                num(relay_cpu, 0),
                num(100.0 * busy(&p.relay), 0),
                num(100.0 * busy(&p.baseline), 0),
            );
        }
        if accepted.is_finite() && delivered.is_finite() {
            let _ = writeln!(
                t,
                "{:<4} relay run: {} postbacks accepted (warm-up included) → {} of {} deliveries reached the sink by the stop{}",
                "",
                num(accepted, 0),
                num(delivered, 0),
                num(2.0 * accepted, 0),
                if wal.is_finite() {
                    format!("; WAL {} MiB", num(wal, 1))
                } else {
                    String::new()
                }
            );
        }
        if p.id == "S2" {
            let per_sync = median(
                p.baseline
                    .iter()
                    .filter_map(|r| r.extra.get("records_per_fdatasync").and_then(Value::as_f64)),
            );
            if per_sync.is_finite() {
                let _ = writeln!(
                    t,
                    "{:<4} baseline wrote {} records per fdatasync",
                    "",
                    num(per_sync, 1)
                );
            }
        }
        if p.id == "S2pg2" {
            if let Some(vs) = s2pg2_vs_s2(paired) {
                let target = vs["target"].as_str().unwrap_or("?");
                let line = match vs.get("error") {
                    Some(err) => format!("target {target}: {}", err.as_str().unwrap_or("?")),
                    None => format!(
                        "rate / S2 SQLite relay rate {}, p99 {} ms: target {target}: {}",
                        num(vs["share_of_s2_sqlite"].as_f64().unwrap_or(f64::NAN), 2),
                        num(vs["p99_ms"].as_f64().unwrap_or(f64::NAN), 3),
                        match vs["target_met"].as_bool() {
                            Some(true) => "met",
                            Some(false) => "NOT met",
                            None => "no data",
                        }
                    ),
                };
                let _ = writeln!(t, "{:<4} {line}", "");
            }
        }
        for note in &p.notes {
            let _ = writeln!(t, "{:<4} note: {}", "", note.replace('\n', "\n           "));
        }
    }
    if s5.is_some() || !s2_rss.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "S5   peak RSS of the relay (VmHWM); target ≤ 100 MiB, bounded"
        );
        let mib = |v: &Value| v.as_f64().map(|k| k / MIB).unwrap_or(f64::NAN);
        let mut peaks = Vec::new();
        if let Some(s5) = s5 {
            if let Some(err) = s5.get("error") {
                let _ = writeln!(t, "     error: {}", err.as_str().unwrap_or("?"));
            }
            let fill = &s5["fill"];
            if fill.is_object() {
                let peak = mib(&fill["peak_rss_kib"]);
                peaks.push(peak);
                let _ = writeln!(
                    t,
                    "     {:<64} {:>8} MiB",
                    format!(
                        "filling {} postbacks (64 conns, sync normal, target hung)",
                        num(fill["postbacks"].as_f64().unwrap_or(f64::NAN), 0)
                    ),
                    num(peak, 1)
                );
                let samples = fill["rss_samples"].as_array().cloned().unwrap_or_default();
                if !samples.is_empty() {
                    let mut line = String::from(
                        "       RSS while filling (postbacks answered → MiB, WAL MiB):",
                    );
                    let picks = 6.min(samples.len());
                    for k in 1..=picks {
                        let sample = &samples[k * samples.len() / picks - 1];
                        let _ = write!(
                            line,
                            "{} {} → {} (WAL {})",
                            if k == 1 { "" } else { "," },
                            num(sample["answered"].as_f64().unwrap_or(f64::NAN), 0),
                            num(mib(&sample["rss_kib"]), 1),
                            num(
                                sample["wal_bytes"].as_f64().unwrap_or(f64::NAN) / MIB / MIB,
                                0
                            )
                        );
                    }
                    let _ = writeln!(t, "{line}");
                }
            }
            let restart = &s5["restart"];
            if restart.is_object() {
                let peak = mib(&restart["peak_rss_kib"]);
                peaks.push(peak);
                let _ = writeln!(
                    t,
                    "     {:<64} {:>8} MiB",
                    format!(
                        "restarted with {} pending, targets refusing, {} s",
                        num(restart["pending"].as_f64().unwrap_or(f64::NAN), 0),
                        num(restart["observed_seconds"].as_f64().unwrap_or(f64::NAN), 0)
                    ),
                    num(peak, 1)
                );
                let _ = writeln!(
                    t,
                    "       startup with the backlog {} s; store after: {}",
                    num(restart["startup_seconds"].as_f64().unwrap_or(f64::NAN), 2),
                    restart["store_after"]
                );
                let _ = writeln!(
                    t,
                    "       relay log meanwhile: {} lines ({} WARN, {} ERROR)",
                    num(restart["log"]["lines"].as_f64().unwrap_or(f64::NAN), 0),
                    num(restart["log"]["warn"].as_f64().unwrap_or(f64::NAN), 0),
                    num(restart["log"]["error"].as_f64().unwrap_or(f64::NAN), 0)
                );
                if let Some(crash) = restart["crashed"].as_str() {
                    let _ = writeln!(t, "       note: the relay exited on its own: {crash}");
                }
            }
        }
        if !s2_rss.is_empty() {
            let peak = median(s2_rss.iter().copied()) / MIB;
            peaks.push(peak);
            let _ = writeln!(
                t,
                "     {:<64} {:>8} MiB",
                "during S2 (64 conns, sync full), median of rounds",
                num(peak, 1)
            );
        }
        let worst = peaks.iter().copied().fold(f64::NAN, f64::max);
        if worst.is_finite() {
            let _ = writeln!(
                t,
                "     largest peak {} MiB: target ≤ 100 MiB {}",
                num(worst, 1),
                if worst <= 100.0 { "met" } else { "NOT met" }
            );
        }
    }
    t
}

fn results_json(
    s: &Settings,
    paired: &[Paired],
    s5: Option<&Value>,
    s2_rss: &[f64],
    table: &str,
) -> Value {
    let mut scenarios = serde_json::Map::new();
    for p in paired {
        let sum = summarize(p);
        let four = |v: [f64; 4], digits: fn(f64) -> f64| json!({"rate": round2(v[0]), "p50_ms": digits(v[1]), "p99_ms": digits(v[2]), "p999_ms": digits(v[3])});
        let mut value = json!({
                "title": p.title,
                "unit": p.unit,
                "relay_label": p.relay_label,
                "baseline_label": p.baseline_label,
                "relay": four(sum.relay, round3),
                "baseline": four(sum.baseline, round3),
                "ratio": four(sum.ratio, round3),
                "errors": {"relay": sum.errors.0, "baseline": sum.errors.1},
                "target": p.target.map(|(_, text)| text),
                "target_met": verdict(p, &sum),
                "rounds": {
                    "relay": p.relay.iter().map(RunStats::json).collect::<Vec<_>>(),
                    "baseline": p.baseline.iter().map(RunStats::json).collect::<Vec<_>>(),
                },
                "notes": p.notes,
        });
        if p.id == "S2pg2" {
            value["vs_s2_sqlite"] = s2pg2_vs_s2(paired).unwrap_or(Value::Null);
        }
        scenarios.insert(p.id.into(), value);
    }
    if s5.is_some() || !s2_rss.is_empty() {
        let mut value = s5.cloned().unwrap_or_else(|| json!({}));
        value["during_s2_peak_rss_kib"] = json!(s2_rss);
        value["target"] = json!("peak RSS ≤ 100 MiB, bounded");
        scenarios.insert("S5".into(), value);
    }
    json!({
        "date": chrono::Utc::now().to_rfc3339(),
        "mode": if s.quick { "quick" } else { "full" },
        "rounds": s.rounds,
        "warmup_s": s.warmup.as_secs_f64(),
        "duration_s": s.duration.as_secs_f64(),
        "cpus": s.workers,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|k| k.trim().to_owned()).ok(),
        "git": git_describe(),
        "relay_bin": s.relay_bin.display().to_string(),
        "relay_log": s.relay_log,
        "scenarios": scenarios,
        "table": table,
    })
}

fn git_describe() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let head = Command::new("git")
        .args(["-C", dir, "rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    let mut text = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    if text.is_empty() {
        return None;
    }
    if let Ok(status) = Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .output()
    {
        if !status.stdout.is_empty() {
            text.push_str("+dirty");
        }
    }
    Some(text)
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
