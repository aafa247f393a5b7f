//! The backlog scenarios: S4 drains a filled store to the sink (against a
//! bare hyper client posting the same envelopes), S5 watches the relay's
//! memory while filling a large backlog and after a restart with it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::bench::{file_size, stop_notes, Bench, INGEST_PATH, STOP_TIMEOUT};
use crate::loadgen::{self, LoadSpec, Stop};
use crate::relay_proc::{memory_kib, store_counts, store_envelopes, Backend, RelayChild};
use crate::report::MIB;
use crate::servers::{self, start_hung};
use crate::stats::{round2, round3, Paired, RunStats};

/// Deliveries in flight in S4: 2 targets × `delivery.concurrency` 16.
const S4_IN_FLIGHT: usize = 32;
/// Connections used to fill a backlog.
const FILL_CONNECTIONS: usize = 64;

impl Bench {
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
    pub fn s4(&self) -> Paired {
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
    pub fn s5(&self) -> Value {
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
