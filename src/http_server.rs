//! The accept loop shared by the public (ingest) and admin listeners: hyper-util's
//! auto connection (HTTP/1.1 with keep-alive, HTTP/2 when the client asks) and a
//! graceful shutdown that lets requests in flight finish.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The response type of every handler: small, fully buffered bodies.
pub type HttpResponse = Response<Full<Bytes>>;

/// Connection settings of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// How long an idle keep-alive connection is kept. hyper's HTTP/1 header
    /// read timer also runs while a keep-alive connection waits for its next
    /// request, so it is set to this value: shorter would cut Sinch's idle
    /// connection, and a request's headers are bounded by it too.
    pub idle_timeout: Duration,
    /// How long shutdown waits for requests in flight before closing anyway.
    pub drain_timeout: Duration,
}

/// Serves `handler` on `listener` until `shutdown` fires, then drains.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    options: ServeOptions,
    shutdown: CancellationToken,
) where
    H: Fn(Request<Incoming>, std::net::SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(options.idle_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
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
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |request| {
            let response = handler(request, peer);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(listener = name, %peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "connections still open after the drain timeout; closing them"
        );
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
