//! The admin listener: what Prometheus and the orchestrator poll (`/metrics`,
//! `/healthz`, `/readyz`, always open), and the admin API under `/api/v1/`
//! (behind a bearer token; see docs/admin-api.md), whose requests and
//! answers are the types of [`model`], described by the OpenAPI document of
//! [`openapi`]. Keep it on a private address; it is not meant for the internet.

mod api;
mod kinds;
pub mod model;
pub mod openapi;
mod refusal;

use refusal::Refusal;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::delivery::fleet::Fleet;
use crate::http_server::{json_response, HttpResponse};
use crate::live::Live;
use crate::metrics::Metrics;
use crate::routing::Router;
use crate::store::{Committer, OperatorStore};

/// Shared state of the admin endpoints.
pub struct Admin {
    /// Rendered on `/metrics`.
    pub metrics: Metrics,
    /// Asked by `/readyz` whether commits succeed; the API's data.
    pub store: Arc<dyn OperatorStore>,
    /// The API's bearer token (None: the API is off); replaced by a reload.
    pub token: Arc<Live<Option<String>>>,
    /// Targets to pause, resume and wake after a replay.
    pub fleet: Arc<Fleet>,
    /// Re-ingested quarantined bodies are committed through it, so their
    /// jobs reach delivery as fresh ones do.
    pub committer: Committer,
    /// Routes a replayed `(no route)` dead letter or quarantined body.
    pub router: Arc<Live<Router>>,
    /// The envelope `source` of re-ingested quarantined bodies.
    pub source: String,
}

/// Where the admin API lives.
const API_PREFIX: &str = "/api/v1/";

impl Admin {
    /// Handles one admin request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> HttpResponse {
        if let Some(rest) = request.uri().path().strip_prefix(API_PREFIX) {
            let rest = rest.to_owned();
            return match self.refusal(&request) {
                None => api::handle(&self, request, &rest).await,
                Some(refusal) => refusal,
            };
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return Refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is allowed here".into(),
            )
            .response();
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
            _ => refusal::not_found("not found").response(),
        }
    }

    /// The answer to a request the API must refuse (None: authorized). The
    /// API needs `Authorization: Bearer <admin token>`, compared in constant
    /// time; without a configured token the API does not exist.
    fn refusal(&self, request: &Request<Incoming>) -> Option<HttpResponse> {
        let Some(token) = self.token.get().as_ref().clone() else {
            return Some(
                refusal::not_found("the admin API is disabled: set admin.token_file").response(),
            );
        };
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        let matches = Sha256::digest(given.trim().as_bytes())
            .as_slice()
            .ct_eq(Sha256::digest(token.as_bytes()).as_slice());
        if bool::from(matches) {
            return None;
        }
        tracing::warn!(path = %request.uri().path(), "admin API request without a valid bearer token");
        let mut refusal = Refusal(
            StatusCode::UNAUTHORIZED,
            "a valid `Authorization: Bearer <admin token>` header is required".into(),
        )
        .response();
        refusal
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(refusal)
    }
}
