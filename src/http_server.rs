//! The accept loop shared by the public (ingest) and admin listeners.
//!
//! Admission comes first, right after `accept` and before TLS or a slot: a
//! TCP peer that may not post (neither on `ingest.allow` nor a trusted proxy)
//! is closed at once without a byte read; then the per-source cap
//! (`ingest.max_connections_per_source`); then a connection slot, taken
//! without waiting: when all `max_connections` are busy the new connection
//! is closed. The loop never waits for a slot before `accept`, so refused
//! peers in the kernel's backlog cannot keep Sinch's connection out. Each
//! refusal is counted in `relay_connections_refused_total`; the log says so
//! at most once per [`REFUSAL_LOG_EVERY`].
//!
//! Each connection runs in its own task: optional PROXY header (trusted
//! balancers only; the client it names is checked against the allowlist and
//! its own per-source cap), optional TLS, then hyper-util's auto connection
//! (HTTP/1.1 with keep-alive, HTTP/2 when the client asks, at most
//! `max_concurrent_streams` streams at once). Every 401 or 403 answer closes
//! its connection (`Connection: close`, or GOAWAY on HTTP/2): a refused
//! client gets no idle keep-alive slot. A watchdog per connection enforces
//! two different clocks that hyper folds into one:
//! - idle: a keep-alive connection with no request in flight is kept for
//!   `idle_timeout` (Sinch's persistent connection must survive quiet spells);
//! - headers: once a client starts a request (or opens a connection) its
//!   headers must be complete within `header_read_timeout` (slowloris).
//!
//! Shutdown: stop accepting, let each connection finish its request in flight
//! (graceful close), wait up to `drain_timeout`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::{AccessPolicy, Admission, ConnectionInfo};
use crate::live::Live;
use crate::logging::LogThrottle;
use crate::metrics::Metrics;
use crate::proxy_protocol::ProxyHeader;
use crate::tls::TlsReloader;

/// The response type of every handler: small, fully buffered bodies.
pub type HttpResponse = Response<Full<Bytes>>;

/// How often at most a refused connection is logged; a flood of them only
/// moves `relay_connections_refused_total`.
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Connection settings of one listener.
#[derive(Clone)]
pub struct ServeOptions {
    /// How long an idle keep-alive connection is kept.
    pub idle_timeout: Duration,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// Connections served at once; one more is closed at accept.
    pub max_connections: usize,
    /// Connections open at once per client address (`None`: uncapped, as on
    /// the admin listener). A trusted proxy's own address is never capped.
    pub max_connections_per_source: Option<usize>,
    /// HTTP/2 streams open at once on one connection.
    pub max_concurrent_streams: u32,
    /// How long shutdown waits for requests in flight before closing anyway.
    pub drain_timeout: Duration,
    /// Who may connect, decided on the TCP peer at accept (`None`: everyone,
    /// as on the admin listener, which has no allowlist).
    pub access: Option<Arc<Live<AccessPolicy>>>,
    /// Read a PROXY header from the trusted proxies of `access`.
    pub proxy_protocol: bool,
    /// Serve TLS with the current certificate.
    pub tls: Option<Arc<TlsReloader>>,
}

/// Serves `handler` on `listener` until `shutdown` fires, then drains.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    options: ServeOptions,
    metrics: Metrics,
    shutdown: CancellationToken,
) where
    H: Fn(Request<Incoming>, ConnectionInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header timer also runs while a keep-alive connection is idle;
    // the watchdog below keeps the two clocks apart instead.
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.max_concurrent_streams);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let gate = Arc::new(Gate {
        name,
        access: options.access.clone(),
        per_source: Arc::new(PerSource {
            limit: options.max_connections_per_source.unwrap_or(usize::MAX),
            open: Mutex::new(HashMap::new()),
        }),
        metrics: metrics.clone(),
    });
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(listener = name, error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Dropping `stream` on a refusal closes it unread.
        let Some(admitted) = gate.admit(peer) else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            gate.refuse(peer, peer.ip(), Refusal::NoSlot);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            name,
            peer,
            builder: builder.clone(),
            options: options.clone(),
            gate: gate.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        };
        let handler = handler.clone();
        connections.spawn(connection.run(stream, admitted, slot, handler));
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(options.drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "connections still open after the drain timeout; closing them"
        );
    }
}

/// Why a connection was closed without being served (the metric's label).
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// The client is not on the allowlist.
    NotAllowed,
    /// The client already has `max_connections_per_source` open.
    PerSourceLimit,
    /// Every one of `max_connections` slots is busy.
    NoSlot,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::PerSourceLimit => "per_source_limit",
            Refusal::NoSlot => "no_slot",
        }
    }
}

/// The admission decisions of one listener: allowlist and per-source cap.
struct Gate {
    name: &'static str,
    access: Option<Arc<Live<AccessPolicy>>>,
    per_source: Arc<PerSource>,
    metrics: Metrics,
}

/// What admission let through: whether the peer is a trusted proxy (whose
/// client is checked later), and the per-source count it holds.
struct Admitted {
    trusted_proxy: bool,
    source: Option<SourceGuard>,
}

impl Gate {
    /// The accept-time check on the TCP peer; `None` when it was refused.
    fn admit(&self, peer: SocketAddr) -> Option<Admitted> {
        let admission = self
            .access
            .as_ref()
            .map_or(Admission::Client, |access| access.get().admit(peer.ip()));
        match admission {
            Admission::TrustedProxy => Some(Admitted {
                trusted_proxy: true,
                source: None,
            }),
            Admission::Client => self.hold_source(peer, peer.ip()).map(|guard| Admitted {
                trusted_proxy: false,
                source: Some(guard),
            }),
            Admission::Refused => {
                self.refuse(peer, peer.ip(), Refusal::NotAllowed);
                None
            }
        }
    }

    /// The check on the client a PROXY header named (after `UNKNOWN`/`LOCAL`
    /// the balancer itself, which is not capped). `None` when it was refused,
    /// else the per-source count it holds.
    fn admit_proxied(&self, peer: SocketAddr, header: ProxyHeader) -> Option<Option<SourceGuard>> {
        let client = match header {
            ProxyHeader::Client(client) => client.ip(),
            ProxyHeader::Local => peer.ip(),
        };
        let allowed = self
            .access
            .as_ref()
            .is_none_or(|access| access.get().is_allowed(client));
        if !allowed {
            self.refuse(peer, client, Refusal::NotAllowed);
            return None;
        }
        match header {
            ProxyHeader::Client(_) => self.hold_source(peer, client).map(Some),
            ProxyHeader::Local => Some(None),
        }
    }

    fn hold_source(&self, peer: SocketAddr, client: IpAddr) -> Option<SourceGuard> {
        let guard = PerSource::take(&self.per_source, client);
        if guard.is_none() {
            self.refuse(peer, client, Refusal::PerSourceLimit);
        }
        guard
    }

    /// Counts a refusal; logs it when the throttle allows.
    fn refuse(&self, peer: SocketAddr, client: IpAddr, refusal: Refusal) {
        static LOG: LogThrottle = LogThrottle::new(REFUSAL_LOG_EVERY);
        let reason = refusal.as_str();
        self.metrics
            .connections_refused
            .with_label_values(&[self.name, reason])
            .inc();
        if let Some(not_logged) = LOG.admit() {
            tracing::warn!(
                listener = self.name, %peer, %client, reason, not_logged,
                "connection refused (logged at most once per 10 s; relay_connections_refused_total counts every one)"
            );
        }
    }
}

/// Open connections per client address.
struct PerSource {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerSource {
    /// Counts one more connection from `client`, unless it is at the limit.
    fn take(table: &Arc<PerSource>, client: IpAddr) -> Option<SourceGuard> {
        // An IPv4 client reaching a dual-stack listener shows as ::ffff:a.b.c.d.
        let client = client.to_canonical();
        let mut open = table.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(client).or_insert(0);
        if *count >= table.limit {
            return None;
        }
        *count += 1;
        Some(SourceGuard {
            table: table.clone(),
            client,
        })
    }
}

/// One connection counted against its source; uncounted on drop.
struct SourceGuard {
    table: Arc<PerSource>,
    client: IpAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// One accepted connection and what it needs.
struct Connection {
    name: &'static str,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    options: ServeOptions,
    gate: Arc<Gate>,
    metrics: Metrics,
    shutdown: CancellationToken,
}

/// Whether an answer ends its connection: a client refused once gets no
/// keep-alive connection to sit on (nor to try the next password on).
fn closes_connection(status: StatusCode) -> bool {
    matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
}

impl Connection {
    /// Serves the connection; the slot and the per-source count it holds are
    /// given back when it ends.
    async fn run<H, F>(
        self,
        mut stream: TcpStream,
        mut admitted: Admitted,
        _slot: OwnedSemaphorePermit,
        handler: H,
    ) where
        H: Fn(Request<Incoming>, ConnectionInfo) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = HttpResponse> + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let mut info = ConnectionInfo {
            peer: self.peer,
            proxy: None,
        };
        let mut prefix = Vec::new();
        if admitted.trusted_proxy && self.options.proxy_protocol {
            let header = tokio::time::timeout(
                self.options.header_read_timeout,
                crate::proxy_protocol::read_header(&mut stream),
            );
            match header.await {
                Ok(Ok((header, rest))) => {
                    let Some(source) = self.gate.admit_proxied(self.peer, header) else {
                        return;
                    };
                    admitted.source = source;
                    info.proxy = Some(header);
                    prefix = rest;
                }
                Ok(Err(err)) => {
                    tracing::warn!(listener = self.name, peer = %self.peer, error = %err, "bad PROXY header; closing");
                    return;
                }
                Err(_) => {
                    self.count_timeout("proxy_header");
                    return;
                }
            }
        }
        let stream = Tracked {
            inner: stream,
            prefix: Bytes::from(prefix),
            activity: activity.clone(),
        };
        match &self.options.tls {
            None => self.serve(stream, info, activity, handler).await,
            Some(tls) => {
                let handshake = tokio::time::timeout(
                    self.options.header_read_timeout,
                    tls.acceptor().accept(stream),
                );
                match handshake.await {
                    Ok(Ok(tls_stream)) => self.serve(tls_stream, info, activity, handler).await,
                    Ok(Err(err)) => {
                        tracing::debug!(listener = self.name, peer = %self.peer, error = %err, "TLS handshake failed");
                    }
                    Err(_) => self.count_timeout("tls_handshake"),
                }
            }
        }
    }

    async fn serve<IO, H, F>(
        &self,
        io: IO,
        info: ConnectionInfo,
        activity: Arc<Activity>,
        handler: H,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        H: Fn(Request<Incoming>, ConnectionInfo) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = HttpResponse> + Send + 'static,
    {
        let service = {
            let activity = activity.clone();
            service_fn(move |request: Request<Incoming>| {
                let http2 = request.version() == hyper::Version::HTTP_2;
                activity.request_started(http2);
                // Ends the request on drop too: hyper drops the future of an
                // HTTP/2 stream the client resets, and a count left behind
                // would stop the watchdog's clocks for good.
                let in_flight = InFlight(activity.clone());
                let response = handler(request, info);
                let activity = activity.clone();
                async move {
                    let mut response = response.await;
                    if closes_connection(response.status()) {
                        if http2 {
                            // GOAWAY from the watchdog; the other streams finish.
                            activity.close_wanted();
                        } else {
                            // hyper closes an HTTP/1 connection after an
                            // answer that says so.
                            response
                                .headers_mut()
                                .insert(CONNECTION, HeaderValue::from_static("close"));
                        }
                    }
                    drop(in_flight);
                    Ok::<_, Infallible>(response)
                }
            })
        };
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        let mut closing = false;
        // A graceful close waits for the client to read what it asked for;
        // one that never does is cut after `drain_timeout`.
        let mut cut_off_at = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        loop {
            if !closing && activity.closing() {
                connection.as_mut().graceful_shutdown();
                closing = true;
                cut_off_at = Instant::now() + self.options.drain_timeout;
            }
            let (deadline, clock) =
                activity.deadline(self.options.idle_timeout, self.options.header_read_timeout);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(listener = self.name, peer = %self.peer, error = %err, "connection ended with an error");
                    }
                    return;
                }
                () = tokio::time::sleep_until(deadline) => match clock {
                    Clock::Busy => {}
                    Clock::Idle if !closing && activity.expired(Clock::Idle, self.options.idle_timeout) => {
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                        cut_off_at = Instant::now() + self.options.drain_timeout;
                    }
                    Clock::Headers if activity.expired(Clock::Headers, self.options.header_read_timeout) => {
                        self.count_timeout("headers");
                        return; // dropping the connection closes the socket
                    }
                    _ => {}
                },
                () = activity.changed.notified() => {}
                () = self.shutdown.cancelled(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                    cut_off_at = Instant::now() + self.options.drain_timeout;
                }
                () = tokio::time::sleep_until(cut_off_at), if closing => {
                    tracing::debug!(listener = self.name, peer = %self.peer, "connection still open after its graceful close; cutting it");
                    return;
                }
            }
        }
    }

    fn count_timeout(&self, phase: &'static str) {
        self.metrics
            .connection_timeouts
            .with_label_values(&[self.name, phase])
            .inc();
        tracing::warn!(listener = self.name, peer = %self.peer, phase, "client too slow; connection closed");
    }
}

/// Which clock a connection's watchdog is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// A request is being handled: no limit here (the body has its own).
    Busy,
    /// Waiting for the next request on a keep-alive connection.
    Idle,
    /// Bytes of a request arrived; its headers must follow in time.
    Headers,
}

/// One request in flight; finishing it (or dropping it) tells the watchdog.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// What the watchdog needs to know about a connection; `changed` wakes it
/// when a different clock starts to apply.
struct Activity {
    state: Mutex<ActivityState>,
    changed: tokio::sync::Notify,
}

struct ActivityState {
    in_flight: usize,
    /// When the current quiet spell began (last response, or the accept).
    idle_since: Instant,
    /// When bytes of a new request first arrived; the accept counts, so a
    /// connection that never sends a request is cut at the header deadline.
    request_started_at: Option<Instant>,
    /// HTTP/2 peers send frames (PING, SETTINGS) while idle: only the idle
    /// clock applies to them once they are known.
    http2: bool,
    /// An answer asked for the connection to end (HTTP/2 401/403).
    close: bool,
}

impl Activity {
    fn new() -> Activity {
        let now = Instant::now();
        Activity {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                idle_since: now,
                request_started_at: Some(now),
                http2: false,
                close: false,
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bytes_read(&self) {
        let mut state = self.state();
        if state.in_flight == 0 && state.request_started_at.is_none() && !state.http2 {
            state.request_started_at = Some(Instant::now());
            self.changed.notify_one();
        }
    }

    fn request_started(&self, http2: bool) {
        let mut state = self.state();
        state.http2 |= http2;
        state.in_flight += 1;
        state.request_started_at = None;
        self.changed.notify_one();
    }

    fn request_finished(&self) {
        let mut state = self.state();
        state.in_flight -= 1;
        state.idle_since = Instant::now();
        self.changed.notify_one();
    }

    fn close_wanted(&self) {
        self.state().close = true;
        self.changed.notify_one();
    }

    fn closing(&self) -> bool {
        self.state().close
    }

    /// The next moment the watchdog must look, and for which clock.
    fn deadline(&self, idle: Duration, headers: Duration) -> (Instant, Clock) {
        let state = self.state();
        if state.in_flight > 0 {
            return (Instant::now() + idle.min(headers), Clock::Busy);
        }
        match state.request_started_at {
            Some(started) => (started + headers, Clock::Headers),
            None => (state.idle_since + idle, Clock::Idle),
        }
    }

    /// Whether `clock` has really run out (activity may have moved on).
    fn expired(&self, clock: Clock, limit: Duration) -> bool {
        let state = self.state();
        if state.in_flight > 0 {
            return false;
        }
        match (clock, state.request_started_at) {
            (Clock::Headers, Some(started)) => started.elapsed() >= limit,
            (Clock::Idle, None) => state.idle_since.elapsed() >= limit,
            _ => false,
        }
    }
}

/// The TCP stream as hyper (or TLS) sees it: bytes read past a PROXY header
/// first, and every read reported to the watchdog.
struct Tracked {
    inner: TcpStream,
    prefix: Bytes,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            self.activity.bytes_read();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A JSON response, the shape of every answer the relay gives.
pub fn json_response(status: hyper::StatusCode, body: &serde_json::Value) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
