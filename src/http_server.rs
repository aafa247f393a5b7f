//! The accept loop shared by the public (ingest) and admin listeners.
//!
//! Each connection runs in its own task: optional PROXY header (trusted
//! balancers only), optional TLS, then hyper-util's auto connection (HTTP/1.1
//! with keep-alive, HTTP/2 when the client asks). A watchdog per connection
//! enforces two different clocks that hyper folds into one:
//! - idle: a keep-alive connection with no request in flight is kept for
//!   `idle_timeout` (Sinch's persistent connection must survive quiet spells);
//! - headers: once a client starts a request (or opens a connection) its
//!   headers must be complete within `header_read_timeout` (slowloris).
//!
//! Shutdown: stop accepting, let each connection finish its request in flight
//! (graceful close), wait up to `drain_timeout`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::ConnectionInfo;
use crate::metrics::Metrics;
use crate::tls::TlsReloader;

/// The response type of every handler: small, fully buffered bodies.
pub type HttpResponse = Response<Full<Bytes>>;

/// Connection settings of one listener.
#[derive(Clone)]
pub struct ServeOptions {
    /// How long an idle keep-alive connection is kept.
    pub idle_timeout: Duration,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// How long shutdown waits for requests in flight before closing anyway.
    pub drain_timeout: Duration,
    /// Read a PROXY header from peers this predicate trusts.
    pub proxy_protocol_from: Option<Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>>,
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
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
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
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            name,
            peer,
            builder: builder.clone(),
            options: options.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        };
        let handler = handler.clone();
        connections.spawn(async move {
            connection.run(stream, handler).await;
            drop(permit);
        });
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

/// One accepted connection and what it needs.
struct Connection {
    name: &'static str,
    peer: std::net::SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    options: ServeOptions,
    metrics: Metrics,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run<H, F>(self, mut stream: TcpStream, handler: H)
    where
        H: Fn(Request<Incoming>, ConnectionInfo) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = HttpResponse> + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let mut info = ConnectionInfo {
            peer: self.peer,
            proxied: None,
        };
        let mut prefix = Vec::new();
        if let Some(trusts) = &self.options.proxy_protocol_from {
            if trusts(self.peer.ip()) {
                let header = tokio::time::timeout(
                    self.options.header_read_timeout,
                    crate::proxy_protocol::read_header(&mut stream),
                );
                match header.await {
                    Ok(Ok((client, rest))) => {
                        info.proxied = client;
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
                activity.request_started(request.version() == hyper::Version::HTTP_2);
                // Ends the request on drop too: hyper drops the future of an
                // HTTP/2 stream the client resets, and a count left behind
                // would stop the watchdog's clocks for good.
                let in_flight = InFlight(activity.clone());
                let response = handler(request, info);
                async move {
                    let response = response.await;
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
