//! The benchmark itself: one sink for every run, fresh directories, seed
//! bodies with unique tracking ids, and the request/answer scenarios (S1–S3
//! and the PostgreSQL ones), each alternating relay and baseline runs under
//! the same load. The backlog scenarios S4 and S5 are in backlog.rs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::cli::{Load, Settings};
use crate::loadgen::{self, LoadSpec, Stop};
use crate::pg;
use crate::relay_proc::{self, cpu_ticks, machine_ticks, Backend, RelayChild, RelayConfig};
use crate::report::{render, results_json};
use crate::servers::{start_baseline, start_sink, Baseline, Server};
use crate::stats::{insert_cpu, round2, Measured, Paired, RunStats};
use crate::wrk;
use crate::REPO;

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
/// Where every load posts (the relay's ingest path; the baselines answer any).
pub const INGEST_PATH: &str = "/sinch/postback";

/// How long a relay may take to stop gracefully.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The benchmark's shared state: settings, the sink every relay delivers
/// to, the seed body, and a counter that keeps run directories and tracking
/// ids apart.
pub struct Bench {
    pub s: Settings,
    pub sink: Server,
    seed: Arc<(String, String)>,
    runs: AtomicU64,
    tag: String,
    pub started: Instant,
}

impl Bench {
    /// Reads the seed, starts the sink.
    pub fn new(s: Settings) -> Bench {
        let seed = std::fs::read_to_string(format!("{REPO}/tests/fixtures/seed-mo.xml"))
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

    /// A progress line on stderr, stamped with the time since the start.
    pub fn log(&self, message: &str) {
        eprintln!("[{:>6.1}s] {message}", self.started.elapsed().as_secs_f64());
    }

    /// A fresh directory for one run, on the same disk as target/.
    pub fn fresh_dir(&self, what: &str) -> PathBuf {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let dir = self.s.work.join(format!("{n:03}-{what}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create run dir");
        dir
    }

    /// A tracking-id prefix no other run uses (the relay drops repeated
    /// postbacks, so a load that repeats ids would flatter it).
    fn tracking_prefix(&self) -> String {
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        format!("BENCH-{}-{run}-", self.tag)
    }

    /// Seed XML bodies with a tracking id unique to this run and request.
    pub fn bodies(&self) -> loadgen::BodyMaker {
        let seed = self.seed.clone();
        let prefix = self.tracking_prefix();
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

    fn timed(&self, addrs: Vec<SocketAddr>, connections: usize) -> LoadSpec {
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

    /// One timed load (warm-up, then the measured window) of `connections`
    /// against `addrs`, by the generator `--load` names; wrk's script goes
    /// into `dir`.
    fn measure(
        &self,
        addrs: Vec<SocketAddr>,
        connections: usize,
        dir: &Path,
    ) -> Result<Measured, String> {
        match &self.s.load {
            Load::Builtin => Ok(Measured::from_builtin(&loadgen::run(
                self.timed(addrs, connections),
            ))),
            Load::Wrk { threads, .. } => {
                let [addr] = addrs[..] else {
                    return Err(format!("wrk drives one server, not {}", addrs.len()));
                };
                wrk::run(&wrk::WrkSpec {
                    addr,
                    path: INGEST_PATH,
                    connections,
                    threads: *threads,
                    warmup: self.s.warmup,
                    duration: self.s.duration,
                    seed: (&self.seed.0, &self.seed.1),
                    prefix: self.tracking_prefix(),
                    dir,
                })
            }
        }
    }

    /// The relay's config for one run: its store in `dir`, both targets on
    /// `target_port`.
    pub fn relay_config(&self, dir: &Path, backend: Backend, target_port: u16) -> RelayConfig {
        RelayConfig {
            dir: dir.to_path_buf(),
            backend,
            target_base: format!("http://127.0.0.1:{target_port}"),
            delivery_timeout: "10s",
        }
    }

    /// Runs the chosen scenarios, prints the table, writes the JSON.
    pub fn run(&self) {
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
            match self.baseline_run(id, baseline, connections) {
                Ok(stats) => {
                    self.log(&format!(
                        "{id} round {round} baseline {:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms  errors {}",
                        stats.rps, stats.p50, stats.p99, stats.errors
                    ));
                    result.baseline.push(stats);
                }
                Err(err) => {
                    self.log(&format!("{id} round {round} baseline FAILED: {err}"));
                    result
                        .notes
                        .push(format!("round {round}: baseline failed: {err}"));
                }
            }
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
        let load = self.measure(addrs, connections, &dir)?;
        let mut stats = load.stats.clone();
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
        if load.stats.errors > 0 {
            notes.push(format!(
                "{} load errors, e.g. {:?}",
                load.stats.errors, load.error_samples
            ));
        }
        drop(database);
        let _ = std::fs::remove_dir_all(&dir);
        Ok((stats, notes))
    }

    /// One measured baseline run: a fresh server of `kind`, the same load.
    fn baseline_run(
        &self,
        id: &str,
        kind: Baseline,
        connections: usize,
    ) -> Result<RunStats, String> {
        let dir = self.fresh_dir(&format!("{}-baseline", id.to_lowercase()));
        let server = start_baseline(kind, &dir, self.s.workers);
        let machine_before = machine_ticks();
        let load = self.measure(vec![server.addr], connections, &dir)?;
        let mut stats = load.stats.clone();
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
        Ok(stats)
    }
}

/// Size of a file in bytes (0 when absent).
pub fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// What the report should say about a relay's stop: an unclean exit, a
/// stop that needed SIGKILL, WARN and ERROR log lines.
pub fn stop_notes(stopped: &relay_proc::Stopped) -> Vec<String> {
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
