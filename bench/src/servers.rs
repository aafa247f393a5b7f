//! In-process servers on 127.0.0.1 ephemeral ports, each on its own tokio
//! runtime (so none shares threads with the load generator):
//!
//! - the three baselines of issue 4: bare hyper, one 600-byte append +
//!   fdatasync per request, and group commit (one fdatasync per batch);
//! - the sink the relay delivers to (answers 200 at once, counts requests);
//! - a hung target (accepts connections, never answers) used while a backlog
//!   is filled.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// Size of the record the durable baselines write per request.
pub const RECORD_BYTES: usize = 600;

/// Which baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Read the body, answer 200: the HTTP limit.
    Bare,
    /// One 600-byte append + fdatasync per request, appends serialized by a
    /// mutex: the durable limit on one connection.
    FsyncEach,
    /// Requests hand their record to one writer thread that writes every
    /// waiting record and fdatasyncs once per batch: the durable limit on many
    /// connections.
    GroupCommit,
}

impl Baseline {
    /// Name used in the tables.
    pub fn label(self) -> &'static str {
        match self {
            Baseline::Bare => "bare hyper",
            Baseline::FsyncEach => "fdatasync per request",
            Baseline::GroupCommit => "group commit",
        }
    }
}

type Commit = (Vec<u8>, oneshot::Sender<std::io::Result<()>>);

enum Durability {
    None,
    Each(Arc<Mutex<std::fs::File>>),
    Group(mpsc::UnboundedSender<Commit>),
}

/// Counters a baseline keeps (group commit: records per fdatasync).
#[derive(Default)]
pub struct SyncStats {
    /// fdatasync calls.
    pub syncs: AtomicU64,
    /// Records written.
    pub records: AtomicU64,
}

/// A running in-process server; stopped when dropped.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests answered (sink: deliveries received).
    pub requests: Arc<AtomicU64>,
    /// fdatasync figures (durable baselines).
    pub sync_stats: Arc<SyncStats>,
    runtime: Option<tokio::runtime::Runtime>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        }
        // The group-commit writer ends by itself once every sender (held by
        // the runtime's tasks, now dropped) is gone; it is not waited for.
        drop(self.writer.take());
    }
}

fn runtime(name: &str, workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("server runtime")
}

fn bind(runtime: &tokio::runtime::Runtime) -> TcpListener {
    runtime
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1:0")
}

/// Starts a baseline server; durable ones write to `dir/baseline.log`.
/// `workers` is the runtime's worker count (the relay runs tokio's default:
/// one per CPU).
pub fn start_baseline(kind: Baseline, dir: &Path, workers: usize) -> Server {
    let runtime = runtime("baseline", workers);
    let listener = bind(&runtime);
    let addr = listener.local_addr().expect("local addr");
    let sync_stats = Arc::new(SyncStats::default());
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("baseline.log"))
            .expect("open baseline log")
    };
    let mut writer = None;
    let durability = match kind {
        Baseline::Bare => Durability::None,
        Baseline::FsyncEach => Durability::Each(Arc::new(Mutex::new(open()))),
        Baseline::GroupCommit => {
            let (sender, receiver) = mpsc::unbounded_channel();
            let file = open();
            let stats = sync_stats.clone();
            writer = Some(
                std::thread::Builder::new()
                    .name("group-commit".into())
                    .spawn(move || group_writer(file, receiver, &stats))
                    .expect("spawn writer"),
            );
            Durability::Group(sender)
        }
    };
    let durability = Arc::new(durability);
    let requests = Arc::new(AtomicU64::new(0));
    let stats = sync_stats.clone();
    let counter = requests.clone();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let durability = durability.clone();
            let stats = stats.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let durability = durability.clone();
                    let stats = stats.clone();
                    let counter = counter.clone();
                    async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        let status = match durable(&durability, &body, &stats).await {
                            Ok(()) => StatusCode::OK,
                            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, hyper::Error>(answer(status))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server {
        addr,
        requests,
        sync_stats,
        runtime: Some(runtime),
        writer,
    }
}

/// The 600-byte record: the start of the body, padded.
fn record(body: &[u8]) -> Vec<u8> {
    let mut record = vec![b' '; RECORD_BYTES];
    let n = body.len().min(RECORD_BYTES - 1);
    record[..n].copy_from_slice(&body[..n]);
    record[RECORD_BYTES - 1] = b'\n';
    record
}

async fn durable(durability: &Durability, body: &[u8], stats: &SyncStats) -> std::io::Result<()> {
    match durability {
        Durability::None => Ok(()),
        Durability::Each(file) => {
            let file = file.clone();
            let record = record(body);
            stats.syncs.fetch_add(1, Ordering::Relaxed);
            stats.records.fetch_add(1, Ordering::Relaxed);
            tokio::task::spawn_blocking(move || {
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                file.write_all(&record)?;
                file.sync_data()
            })
            .await
            .map_err(std::io::Error::other)?
        }
        Durability::Group(sender) => {
            let (reply, answer) = oneshot::channel();
            sender
                .send((record(body), reply))
                .map_err(|_| std::io::Error::other("writer gone"))?;
            answer
                .await
                .map_err(|_| std::io::Error::other("writer gone"))?
        }
    }
}

/// The group-commit writer: everything waiting goes into one write and one
/// fdatasync, then every waiting request is answered.
fn group_writer(
    mut file: std::fs::File,
    mut receiver: mpsc::UnboundedReceiver<Commit>,
    stats: &SyncStats,
) {
    let mut batch: Vec<Commit> = Vec::with_capacity(1024);
    let mut buffer: Vec<u8> = Vec::with_capacity(1024 * RECORD_BYTES);
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while let Ok(next) = receiver.try_recv() {
            batch.push(next);
        }
        buffer.clear();
        for (record, _) in &batch {
            buffer.extend_from_slice(record);
        }
        let result = file.write_all(&buffer).and_then(|()| file.sync_data());
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats
            .records
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for (_, reply) in batch.drain(..) {
            let _ = reply.send(match &result {
                Ok(()) => Ok(()),
                Err(err) => Err(std::io::Error::new(err.kind(), err.to_string())),
            });
        }
    }
}

fn answer(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(br#"{"status":"accepted"}"#)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The local delivery target: reads the body, answers 200 at once, counts.
pub fn start_sink(workers: usize) -> Server {
    let runtime = runtime("sink", workers);
    let listener = bind(&runtime);
    let addr = listener.local_addr().expect("local addr");
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let counter = counter.clone();
                    async move {
                        let _ = request.into_body().collect().await;
                        counter.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Server {
        addr,
        requests,
        sync_stats: Arc::new(SyncStats::default()),
        runtime: Some(runtime),
        writer: None,
    }
}

/// A target that is up but never answers: connections are accepted and read,
/// nothing is ever sent back. Deliveries to it wait for their timeout.
pub fn start_hung() -> Server {
    let runtime = runtime("hung", 1);
    let listener = bind(&runtime);
    let addr = listener.local_addr().expect("local addr");
    runtime.spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 16 * 1024];
                while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
            });
        }
    });
    Server {
        addr,
        requests: Arc::new(AtomicU64::new(0)),
        sync_stats: Arc::new(SyncStats::default()),
        runtime: Some(runtime),
        writer: None,
    }
}

/// A loopback port with nothing listening (connection refused), as far as
/// the kernel lets us know: bound once, then released.
pub fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}
