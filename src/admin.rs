//! The admin listener: what Prometheus and the orchestrator poll. Keep it on a
//! private address; it is not meant for the internet.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::http_server::{json_response, HttpResponse};
use crate::metrics::Metrics;
use crate::store::Store;

/// Shared state of the admin endpoints.
pub struct Admin {
    /// Rendered on `/metrics`.
    pub metrics: Metrics,
    /// Asked by `/readyz` whether commits succeed.
    pub store: Arc<dyn Store>,
}

impl Admin {
    /// Handles one admin request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> HttpResponse {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "only GET is allowed here"}),
            );
        }
        match request.uri().path() {
            "/metrics" => {
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.render())));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            // Alive: the process answers.
            "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
            // Ready: the config is loaded (we would not be running otherwise)
            // and the store's last commit succeeded.
            "/readyz" => {
                if self.store.is_ready() {
                    json_response(StatusCode::OK, &json!({"status": "ready"}))
                } else {
                    json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"status": "unready", "reason": "the store cannot commit"}),
                    )
                }
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
        }
    }
}
