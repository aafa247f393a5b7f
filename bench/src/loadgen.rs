//! The load generator: N keep-alive HTTP/1.1 connections, each sending its
//! requests serially (the way Sinch sends postbacks), on one thread of its own
//! so it never shares a runtime with a server under test.
//!
//! Latency is taken per request, from just before the request is handed to
//! hyper to the end of the answer body, in microseconds. Only requests that
//! start after the warm-up and end before the deadline are counted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a request may take before it counts as an error: Sinch gives up
/// after 10 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that fails this many times in a row gives up.
const MAX_CONSECUTIVE_FAILURES: u32 = 50;

/// Makes the body of request number `seq`.
pub type BodyMaker = Arc<dyn Fn(u64) -> Bytes + Send + Sync>;

/// When a load ends.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// Run for `warmup + duration`; measure only `duration`.
    Timed {
        /// Not measured.
        warmup: Duration,
        /// Measured.
        duration: Duration,
    },
    /// Send exactly this many requests (all measured).
    Count(u64),
}

/// What to send, where, and how.
#[derive(Clone)]
pub struct LoadSpec {
    /// The servers: connection `i` goes to `addrs[i % addrs.len()]` (several
    /// relay instances share the connections evenly).
    pub addrs: Vec<SocketAddr>,
    /// Request path.
    pub path: String,
    /// Connections, each sending serially.
    pub connections: usize,
    /// When to stop.
    pub stop: Stop,
    /// Request bodies.
    pub body: BodyMaker,
    /// Their Content-Type.
    pub content_type: &'static str,
    /// Called about once per second with the number of requests answered so
    /// far (for memory sampling during long fills).
    pub progress: Option<Arc<dyn Fn(u64) + Send + Sync>>,
}

/// The outcome of one load.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// 200 answers counted in the measured window.
    pub ok: u64,
    /// Non-200 answers, timeouts and connection errors (whole run).
    pub errors: u64,
    /// The first few errors, for the report.
    pub error_samples: Vec<String>,
    /// Length of the measured window.
    pub window: Duration,
    /// Sorted latencies of the counted requests, in microseconds.
    pub latencies_us: Vec<u32>,
    /// 200 answers in the whole run, warm-up included.
    pub answered_total: u64,
}

impl LoadResult {
    /// Answered requests per second in the window.
    pub fn rps(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    /// Latency at quantile `q` (0..=1) in milliseconds; NaN without data.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile_us(&self.latencies_us, q) / 1000.0
    }
}

/// The `q` quantile of sorted microsecond samples (nearest rank).
pub fn quantile_us(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// Runs a load on a fresh single-threaded runtime on its own thread and
/// returns when every connection has finished.
pub fn run(spec: LoadSpec) -> LoadResult {
    std::thread::Builder::new()
        .name("loadgen".into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("load generator runtime")
                .block_on(run_async(spec))
        })
        .expect("spawn load generator thread")
        .join()
        .expect("load generator panicked")
}

struct Shared {
    spec: LoadSpec,
    seq: AtomicU64,
    answered: AtomicU64,
    /// Start of the measured window.
    measure_from: Instant,
    /// No request starts after this (timed loads).
    deadline: Option<Instant>,
}

#[derive(Default)]
struct ConnStats {
    ok: u64,
    errors: u64,
    error_samples: Vec<String>,
    latencies: Vec<u32>,
}

impl ConnStats {
    fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < 5 {
            self.error_samples.push(message);
        }
    }
}

async fn run_async(spec: LoadSpec) -> LoadResult {
    let started = Instant::now();
    let (measure_from, deadline) = match spec.stop {
        Stop::Timed { warmup, duration } => (started + warmup, Some(started + warmup + duration)),
        Stop::Count(_) => (started, None),
    };
    let connections = spec.connections;
    let shared = Arc::new(Shared {
        spec,
        seq: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        measure_from,
        deadline,
    });
    let reporter = shared.spec.progress.clone().map(|progress| {
        let shared = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                progress(shared.answered.load(Ordering::Relaxed));
            }
        })
    });
    let tasks: Vec<_> = (0..connections)
        .map(|i| {
            let addr = shared.spec.addrs[i % shared.spec.addrs.len()];
            tokio::spawn(connection(shared.clone(), addr))
        })
        .collect();
    let mut result = LoadResult::default();
    for task in tasks {
        let stats = task.await.unwrap_or_default();
        result.ok += stats.ok;
        result.errors += stats.errors;
        for sample in stats.error_samples {
            if result.error_samples.len() < 5 {
                result.error_samples.push(sample);
            }
        }
        result.latencies_us.extend(stats.latencies);
    }
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    let ended = Instant::now();
    result.window = match deadline {
        Some(deadline) => deadline.saturating_duration_since(measure_from),
        None => ended - started,
    };
    result.latencies_us.sort_unstable();
    result.answered_total = shared.answered.load(Ordering::Relaxed);
    result
}

/// Takes the number of the next request, or None when the load is over.
fn next_request(shared: &Shared) -> Option<u64> {
    if let Some(deadline) = shared.deadline {
        if Instant::now() >= deadline {
            return None;
        }
    }
    let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
    match shared.spec.stop {
        Stop::Count(total) if seq >= total => None,
        _ => Some(seq),
    }
}

async fn connection(shared: Arc<Shared>, addr: SocketAddr) -> ConnStats {
    let mut stats = ConnStats::default();
    let mut failures = 0u32;
    let host = addr.to_string();
    let uri: hyper::Uri = shared.spec.path.parse().expect("request path");
    // A request number taken but not answered (connection broke) is sent again
    // on the next connection, so a counted load still sends every body.
    let mut carried: Option<u64> = None;
    'connect: loop {
        if failures >= MAX_CONSECUTIVE_FAILURES {
            stats.error(format!("giving up after {failures} consecutive failures"));
            return stats;
        }
        let stream = match TcpStream::connect(addr).await {
            Ok(stream) => stream,
            Err(err) => {
                failures += 1;
                stats.error(format!("connect: {err}"));
                if shared.deadline.is_some_and(|d| Instant::now() >= d) {
                    return stats;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
            {
                Ok(pair) => pair,
                Err(err) => {
                    failures += 1;
                    stats.error(format!("handshake: {err}"));
                    continue;
                }
            };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        loop {
            let seq = match carried.take() {
                Some(seq) => seq,
                None => match next_request(&shared) {
                    Some(seq) => seq,
                    None => return stats,
                },
            };
            let request = Request::post(uri.clone())
                .header(HOST, host.as_str())
                .header(CONTENT_TYPE, shared.spec.content_type)
                .body(Full::new((shared.spec.body)(seq)))
                .expect("valid request");
            if sender.ready().await.is_err() {
                failures += 1;
                stats.error("connection closed by the server".into());
                carried = Some(seq);
                continue 'connect;
            }
            let sent = Instant::now();
            let exchange = async {
                let response = sender.send_request(request).await?;
                let status = response.status();
                response.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            };
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await;
            let done = Instant::now();
            match outcome {
                Ok(Ok(status)) if status == hyper::StatusCode::OK => {
                    failures = 0;
                    shared.answered.fetch_add(1, Ordering::Relaxed);
                    let in_window =
                        sent >= shared.measure_from && shared.deadline.is_none_or(|d| done <= d);
                    if in_window {
                        stats.ok += 1;
                        let micros = (done - sent).as_micros().min(u32::MAX as u128) as u32;
                        stats.latencies.push(micros);
                    }
                }
                Ok(Ok(status)) => {
                    stats.error(format!("HTTP {status}"));
                }
                Ok(Err(err)) => {
                    failures += 1;
                    stats.error(format!("request: {err}"));
                    carried = Some(seq);
                    continue 'connect;
                }
                Err(_) => {
                    failures += 1;
                    stats.error(format!("no answer within {REQUEST_TIMEOUT:?}"));
                    continue 'connect;
                }
            }
        }
    }
}
