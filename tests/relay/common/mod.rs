//! Test harness shared by the integration tests: a relay started in-process on
//! ephemeral loopback ports with its store in a temporary directory, sink servers
//! that record what they receive and answer as told, a target that never
//! answers, a small tmpfs for a full disk, and a small HTTP client. The real
//! binary and the load that is sent to it are in [`process`].

pub mod pg;
pub mod raw;
pub mod tls;

pub mod process;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use postback_relay::config::Config;
use postback_relay::relay::{self, RelayHandle};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The seed MMS MO example from Sinch's documentation, verbatim.
pub const SEED_XML: &str = include_str!("../../fixtures/seed-mo.xml");

/// The seed JSON example with its placeholders filled and its missing comma
/// fixed (the documentation's own sample is not valid JSON).
pub const SEED_JSON: &str = include_str!("../../fixtures/seed-mo.json");

/// An MO postback with a given tracking id, for tests that need many distinct ones.
pub fn mo_xml(tracking_id: &str, keyword: &str, to: &str) -> String {
    format!(
        "<postback><origin>MMS_MO</origin><code>N401</code><from>14085550000</from>\
         <to>{to}</to><keyword>{keyword}</keyword><tracking-id>{tracking_id}</tracking-id>\
         <timestamp>2021-02-03T18:27:54Z</timestamp><content><file>https://m.example/{tracking_id}.jpg</file></content></postback>"
    )
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `test` with a hard time limit, so a test that hangs fails (and drops
/// what it owns: relays, sinks, mounts) instead of blocking the run.
pub async fn bounded<T>(limit: Duration, what: &str, test: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, test)
        .await
        .unwrap_or_else(|_| panic!("{what}: not finished within {limit:?}"))
}

/// The store backend the tests run against: SQLite, unless
/// `RELAY_TEST_BACKEND=postgres` says otherwise (`.ci/run` runs the
/// store-backed modules both ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded SQLite store in a temporary directory.
    Sqlite,
    /// A fresh database on the tests' PostgreSQL server.
    Postgres,
}

/// The backend of this run.
pub fn backend() -> Backend {
    match std::env::var("RELAY_TEST_BACKEND").as_deref() {
        Ok("postgres") => Backend::Postgres,
        _ => Backend::Sqlite,
    }
}

/// For tests that exercise something only one backend has (an SQLite file
/// lock, a full disk under the SQLite file): true, with a note, when this
/// binary runs on another backend and the test should return at once.
pub fn skip_unless(wanted: Backend, why: &str) -> bool {
    let skip = backend() != wanted;
    if skip {
        eprintln!("skipped on {:?}: {why}", backend());
    }
    skip
}

/// Where a test relay keeps its state: a temporary directory (its config, and
/// with SQLite its database) and, with PostgreSQL, a database of its own,
/// dropped with this guard.
pub struct TestStore {
    /// Holds the config file (and the SQLite database).
    pub dir: tempfile::TempDir,
    /// The PostgreSQL database, when the backend is PostgreSQL.
    pub db: Option<pg::TestDatabase>,
    /// More `store:` keys (indented lines), e.g. `"  lease: 4s\n"`.
    pub store_extra: String,
}

impl TestStore {
    /// A store for this binary's backend.
    pub fn new() -> TestStore {
        TestStore::on(backend())
    }

    /// A store on `backend`.
    pub fn on(backend: Backend) -> TestStore {
        TestStore {
            dir: tempfile::tempdir().expect("temp dir"),
            db: (backend == Backend::Postgres).then(pg::TestDatabase::create),
            store_extra: String::new(),
        }
    }

    /// Adds `store:` keys (indented lines) to the configs it writes. A
    /// `lease` is used by PostgreSQL only: with SQLite, leases end at restart.
    pub fn with_store(mut self, extra: &str) -> TestStore {
        self.store_extra.push_str(extra);
        self
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `store:` section of the config.
    pub fn yaml(&self) -> String {
        match &self.db {
            None => format!(
                "store:\n  path: {}\n  busy_timeout: 200ms\n  min_free_bytes: 131072\n{}",
                self.dir.path().join("relay.db").display(),
                self.store_extra
            ),
            Some(db) => format!(
                "store:\n  backend: postgres\n  url: \"{}\"\n{}",
                db.url, self.store_extra
            ),
        }
    }

    /// Config text with ephemeral ports and this store; `rest` adds targets,
    /// routes and any other section.
    pub fn config_yaml(&self, rest: &str) -> String {
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{}{rest}\n",
            self.yaml()
        )
    }

    /// Writes [`TestStore::config_yaml`] to `relay.yaml` in the directory.
    pub fn write_config(&self, rest: &str) -> PathBuf {
        let path = self.dir.path().join("relay.yaml");
        std::fs::write(&path, self.config_yaml(rest)).expect("write config");
        path
    }

    /// Rows of a query against the store (read-only with SQLite; safe while
    /// relays run). Table and column names are the same on both backends.
    pub fn query(&self, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
        match &self.db {
            None => query_db(&self.dir.path().join("relay.db"), sql),
            Some(db) => db.query(sql),
        }
    }

    /// The one integer a query returns (`SELECT COUNT(*) ...`); NULL is 0.
    pub fn query_int(&self, sql: &str) -> i64 {
        single_int(sql, self.query(sql))
    }

    /// Runs a statement with `?1`-style parameters beside the relay.
    pub fn execute(&self, sql: &str, params: Vec<rusqlite::types::Value>) -> u64 {
        match &self.db {
            None => {
                let conn =
                    rusqlite::Connection::open(self.dir.path().join("relay.db")).expect("open db");
                conn.busy_timeout(Duration::from_secs(5)).unwrap();
                conn.execute(sql, rusqlite::params_from_iter(params))
                    .unwrap_or_else(|err| panic!("{sql}: {err}")) as u64
            }
            Some(db) => db.execute(sql, params),
        }
    }
}

impl Default for TestStore {
    fn default() -> Self {
        TestStore::new()
    }
}

/// A relay running in this process.
pub struct TestRelay {
    /// Its config file and store; removed when the test ends.
    pub store: TestStore,
    /// The running relay (taken by `shutdown`).
    pub handle: Option<RelayHandle>,
    /// Full URL of the postback endpoint.
    pub url: String,
    /// Base URL of the admin listener.
    pub admin: String,
}

/// Config text with ephemeral ports and an SQLite store in `dir`; `rest` adds
/// targets, routes and any other section.
pub fn config_yaml(dir: &Path, rest: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nstore:\n  path: {}\n  busy_timeout: 200ms\n  min_free_bytes: 131072\n{rest}\n",
        dir.join("relay.db").display()
    )
}

/// Starts a relay whose config is the ephemeral basics plus `rest`, on this
/// binary's backend.
pub async fn start_relay(rest: &str) -> TestRelay {
    start_relay_in(TestStore::new(), rest).await
}

/// Starts a relay on an existing store (for restarts).
pub async fn start_relay_in(store: TestStore, rest: &str) -> TestRelay {
    let path = store.write_config(rest);
    let config = Config::load(&path).unwrap_or_else(|err| panic!("test config invalid: {err}"));
    let handle = relay::start(config).await.expect("relay starts");
    TestRelay {
        url: format!("http://{}/sinch/postback", handle.ingest_addr),
        admin: format!("http://{}", handle.admin_addr),
        store,
        handle: Some(handle),
    }
}

impl TestRelay {
    /// Path of the relay's SQLite database, for looking at what it kept.
    pub fn db_path(&self) -> PathBuf {
        self.store.path().join("relay.db")
    }

    /// Gracefully stops the relay and returns its store for a restart.
    pub async fn shutdown(mut self) -> TestStore {
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), handle.shutdown())
                .await
                .expect("shutdown within 30 s")
                .expect("clean shutdown");
        }
        self.store
    }

    /// The value of one metric sample, e.g. `relay_dead_letters{target="a"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let (status, body) = get(&format!("{}/metrics", self.admin)).await;
        assert_eq!(status, 200);
        metric_value(&body, sample)
    }

    /// Rows of a query against the relay's store (read-only with SQLite).
    pub fn query(&self, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
        self.store.query(sql)
    }

    /// Waits (up to `timeout`) until a one-integer query (`COUNT(*)` and the
    /// like) returns `expected`: what the relay keeps is moved into the
    /// store from the intake journal a few milliseconds after the 200.
    pub async fn eventually_int(&self, timeout: Duration, sql: &str, expected: i64) {
        eventually(timeout, &format!("{sql} = {expected}"), || {
            let got = self.store.query_int(sql);
            async move { (got == expected).then_some(()) }
        })
        .await
    }

    /// Runs a statement with `?1`-style parameters against the relay's store.
    pub fn execute(&self, sql: &str, params: Vec<rusqlite::types::Value>) -> u64 {
        self.store.execute(sql, params)
    }
}

/// Rows of a read-only query against a relay's database (safe while it runs).
pub fn query_db(db: &Path, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db read-only");
    let mut statement = conn.prepare(sql).expect("valid query");
    let columns = statement.column_count();
    statement
        .query_map([], |row| (0..columns).map(|i| row.get(i)).collect())
        .expect("query runs")
        .collect::<Result<_, _>>()
        .expect("rows read")
}

/// The one integer a read-only query returns (`SELECT COUNT(*) ...`); NULL is 0.
pub fn query_int(db: &Path, sql: &str) -> i64 {
    single_int(sql, query_db(db, sql))
}

fn single_int(sql: &str, rows: Vec<Vec<rusqlite::types::Value>>) -> i64 {
    match rows.first().and_then(|row| row.first()) {
        Some(rusqlite::types::Value::Integer(n)) => *n,
        Some(rusqlite::types::Value::Null) | None => 0,
        Some(other) => panic!("{sql}: not an integer: {other:?}"),
    }
}

/// Finds `sample` (name with labels, as printed) in a Prometheus text exposition.
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok())?
        })
}

/// What a sink received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request path.
    pub path: String,
    /// Request headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Bytes,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl Received {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("sink received JSON")
    }
}

/// How a sink answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// Wait this long before answering (a slow or hung target).
    pub delay: Duration,
}

impl Reply {
    /// A plain answer with `status`.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }
}

type Responder = dyn Fn(usize, &Received) -> Reply + Send + Sync;

/// An HTTP server standing in for an internal service. It records every request
/// and answers with its responder, which sees how many requests came before.
/// It also counts the requests it is handling at once (from the request's
/// arrival until its answer, the responder's delay included), so a test can
/// check a target's concurrency limit with [`Sink::max_in_flight`].
#[derive(Clone)]
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    responder: Arc<Mutex<Arc<Responder>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    stop: CancellationToken,
}

/// Counts one request as in flight at a sink until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(sink: &Sink) -> InFlight {
        let now = sink.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        sink.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(sink.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Sink {
    /// A sink on an ephemeral port that answers 200.
    pub async fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        Sink::serve(listener, Arc::new(|_, _| Reply::status(200)))
    }

    /// A sink on a given address (to bring a "dead" target back).
    pub async fn start_at(addr: DeadPort) -> Sink {
        Sink::start_at_responding(addr, |_, _| Reply::status(200)).await
    }

    /// A sink on a given address that answers with `responder` from its very
    /// first request (a dead target coming back with a particular behaviour).
    pub async fn start_at_responding(
        port: DeadPort,
        responder: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static,
    ) -> Sink {
        let addr = port.addr;
        drop(port);
        let listener = TcpListener::bind(addr).await.expect("rebind sink address");
        Sink::serve(listener, Arc::new(responder))
    }

    fn serve(listener: TcpListener, responder: Arc<Responder>) -> Sink {
        let sink = Sink {
            addr: listener.local_addr().expect("sink addr"),
            received: Arc::default(),
            responder: Arc::new(Mutex::new(responder)),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
            stop: CancellationToken::new(),
        };
        let server = sink.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    () = server.stop.cancelled() => return,
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.answer(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        sink
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let _in_flight = InFlight::enter(self);
        let path = request.uri().path().to_owned();
        let headers = request
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body = request
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let received = Received {
            path,
            headers,
            body,
            at: std::time::Instant::now(),
        };
        let (index, responder) = {
            let mut all = self.received.lock().unwrap();
            all.push(received.clone());
            (all.len() - 1, self.responder.lock().unwrap().clone())
        };
        let reply = responder(index, &received);
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        let mut response = Response::new(Full::new(Bytes::from_static(b"sink says hi")));
        *response.status_mut() = StatusCode::from_u16(reply.status).expect("valid status");
        for (name, value) in reply.headers {
            response
                .headers_mut()
                .insert(name, value.parse().expect("valid header"));
        }
        response
    }

    /// Changes how the sink answers from now on.
    pub fn respond(&self, responder: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static) {
        *self.responder.lock().unwrap() = Arc::new(responder);
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// What was received after the first `start` requests (for tallying a
    /// large stream of deliveries without copying all of it on every poll).
    pub fn received_from(&self, start: usize) -> Vec<Received> {
        let all = self.received.lock().unwrap();
        all.get(start..)
            .map(<[Received]>::to_vec)
            .unwrap_or_default()
    }

    /// How many requests were received so far.
    pub fn received_count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// The most requests this sink was ever handling at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Requests received on `path`.
    pub fn received_on(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// A URL on this sink.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until `path` has received at least `count` requests.
    pub async fn wait_for(&self, path: &str, count: usize, timeout: Duration) -> Vec<Received> {
        eventually(timeout, &format!("{count} requests on {path}"), || {
            let got = self.received_on(path);
            async move { (got.len() >= count).then_some(got) }
        })
        .await
    }
}

/// A target that accepts TCP connections and never answers (a hung service):
/// it reads and discards whatever arrives and holds each connection until the
/// client closes it or the listener is dropped.
pub struct HungListener {
    /// Where it listens.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl HungListener {
    /// Listens on an ephemeral loopback port.
    pub async fn start() -> HungListener {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let hung = HungListener {
            addr: listener.local_addr().expect("addr"),
            accepted: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (accepted, stop) = (hung.accepted.clone(), hung.stop.clone());
        tokio::spawn(async move {
            loop {
                let mut stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    () = stop.cancelled() => return,
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    loop {
                        tokio::select! {
                            read = stream.read(&mut buffer) => match read {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            },
                            () = stop.cancelled() => return,
                        }
                    }
                });
            }
        });
        hung
    }

    /// A URL on this listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for HungListener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A small tmpfs mounted on a fresh temporary directory, for a disk that
/// fills up; unmounted when dropped, also when the test panics. Mounting needs
/// root (the tests run as root in CI); without it the test fails saying so.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `2m`).
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match output {
            Ok(output) if output.status.success() => Tmpfs { dir },
            Ok(output) => panic!(
                "this test needs root to mount a tmpfs (mount -t tmpfs -o size={size} tmpfs {}): {} {}",
                dir.path().display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(err) => panic!("this test needs root and the `mount` command to mount a tmpfs: {err}"),
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `name` until the file system refuses more (ENOSPC), so that any
    /// write that needs one more block fails; returns the bytes written.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path().join(name)).expect("create filler");
        let block = vec![0xA5u8; 64 * 1024];
        let mut written = 0u64;
        let mut chunk = block.len();
        // Large writes first, then smaller ones down to one byte, so the last
        // partial page is used up too.
        while chunk > 0 {
            match file.write(&block[..chunk]) {
                Ok(0) => chunk /= 2,
                Ok(n) => written += n as u64,
                Err(err) if err.raw_os_error() == Some(28) => chunk /= 2, // ENOSPC
                Err(err) => panic!("filling {name}: {err}"),
            }
        }
        file.sync_all().expect("sync filler");
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = self.dir.path().to_owned();
        let unmounted = std::process::Command::new("umount")
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process holding a file): detach it now, freed when released.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&path)
                .status();
        }
    }
}

/// A loopback port nothing listens on (a dead target: connections to it are
/// refused). The port stays bound, not listening, until the test opens it
/// with [`Sink::start_at`]: a port that was merely free could be handed to
/// another test's listener meanwhile, and the "dead" target would answer.
pub struct DeadPort {
    addr: SocketAddr,
    _held: tokio::net::TcpSocket,
}

impl std::fmt::Display for DeadPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

/// Reserves a [`DeadPort`] on loopback.
pub async fn dead_addr() -> DeadPort {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("bind a port");
    DeadPort {
        addr: socket.local_addr().expect("addr"),
        _held: socket,
    }
}

/// POSTs `body` and returns the status and the JSON answer (Null when not JSON).
pub async fn post(url: &str, content_type: Option<&str>, body: impl Into<Bytes>) -> (u16, Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut request = Request::post(url);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(15),
        client.request(request.body(Full::new(body.into())).unwrap()),
    )
    .await
    .expect("answer within 15 s")
    .expect("request succeeds");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// GETs `url` and returns the status and the body text.
pub async fn get(url: &str) -> (u16, String) {
    request_text("GET", url).await
}

/// Sends a body-less request with `method`.
pub async fn request_text(method: &str, url: &str) -> (u16, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(15), client.request(request))
        .await
        .expect("answer within 15 s")
        .expect("request succeeds");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}
