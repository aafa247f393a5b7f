//! Sink servers standing in for internal services: they record what they
//! receive and answer as told; and a dead port for a target that refuses
//! connections until a sink opens it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::eventually;

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
