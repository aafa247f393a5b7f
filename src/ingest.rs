//! The public endpoint Sinch posts to. Every answer here delays every postback
//! queued behind it on Sinch's one connection, so the handler does the minimum:
//! read the body, parse, route, commit, answer. Delivery happens elsewhere.
//!
//! The one rule: 200 only after the store has committed the postback and its
//! jobs. Store errors become 503 (Sinch retries later); unparseable bodies,
//! and bodies the database refuses to store, are quarantined, then answered
//! 400.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::access::{AccessPolicy, ConnectionInfo, Denied};
use crate::clock::now_ms;
use crate::envelope::Envelope;
use crate::http_server::{json_response, HttpResponse, REFUSAL_LOG_EVERY};
use crate::live::Live;
use crate::load::IngestLoad;
use crate::logging::LogThrottle;
use crate::metrics::Metrics;
use crate::postback::{self, Postback};
use crate::routing::{Decision, Router};
use crate::store::{
    dedupe_key, Acceptance, Committer, Kept, NewPostback, QuarantineEntry, Store, StoreError,
};

/// Seconds Sinch is asked to wait after a 503 (it waits ~5 minutes anyway).
const RETRY_AFTER_SECONDS: &str = "30";

/// Everything the handler needs, shared by all connections.
pub struct Ingest {
    /// The accepted path.
    pub path: String,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Longest wait for a complete body: a stalled client must not hold a
    /// task forever (Sinch itself gives up after 10 s and sends again).
    pub body_read_timeout: Duration,
    /// Allowlist, trusted proxies, credentials.
    pub access: Arc<Live<AccessPolicy>>,
    /// CloudEvents `source`.
    pub source: String,
    /// Routing table.
    pub router: Arc<Live<Router>>,
    /// Durable queue.
    pub store: Arc<dyn Store>,
    /// Counters and histograms.
    pub metrics: Metrics,
    /// The way into the store that hands fresh jobs on to delivery.
    pub committer: Committer,
    /// Postbacks being answered now, which delivery yields to.
    pub load: Arc<IngestLoad>,
}

/// How a request ended, for the metrics label and the log line.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Accepted,
    Duplicate,
    Invalid,
    Error,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

impl Ingest {
    /// Handles one request on the public listener.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        connection: ConnectionInfo,
    ) -> HttpResponse {
        let Some(rest) = request.uri().path().strip_prefix(self.path.as_str()) else {
            return error(StatusCode::NOT_FOUND, "not found");
        };
        let access = self.access.get();
        if !(rest.is_empty() || access.uses_path_token() && rest.starts_with('/')) {
            return error(StatusCode::NOT_FOUND, "not found");
        }
        let client = access.client_addr(&connection, request.headers());
        if let Err(denied) = access.check(client, request.headers(), rest) {
            return self.deny(denied, client, &connection, &access);
        }
        if request.method() != Method::POST {
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "only POST is allowed here");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        let started = Instant::now();
        let _answering = self.load.answering();
        let (format, outcome, response) = self.receive(request).await;
        self.metrics
            .postbacks_received
            .with_label_values(&[format, outcome.as_str()])
            .inc();
        self.metrics
            .ingest_duration
            .observe(started.elapsed().as_secs_f64());
        response
    }

    /// Reads, parses and commits one postback; returns (format label, outcome, response).
    async fn receive(&self, request: Request<Incoming>) -> (&'static str, Outcome, HttpResponse) {
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let declared_length = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared_length.is_some_and(|length| length > self.max_body_bytes) {
            return ("unknown", Outcome::Invalid, self.too_large());
        }
        let read = tokio::time::timeout(
            self.body_read_timeout,
            Limited::new(request.into_body(), self.max_body_bytes).collect(),
        );
        let body = match read.await {
            Err(_elapsed) => {
                self.metrics
                    .connection_timeouts
                    .with_label_values(&["ingest", "body"])
                    .inc();
                tracing::warn!("request body not received in time; answering 408");
                return (
                    "unknown",
                    Outcome::Error,
                    error(
                        StatusCode::REQUEST_TIMEOUT,
                        &format!(
                            "body not received within {}",
                            humantime::format_duration(self.body_read_timeout)
                        ),
                    ),
                );
            }
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(err))
                if err
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return ("unknown", Outcome::Invalid, self.too_large());
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "could not read request body");
                return (
                    "unknown",
                    Outcome::Error,
                    error(
                        StatusCode::BAD_REQUEST,
                        &format!("could not read body: {err}"),
                    ),
                );
            }
        };
        let received_at_ms = now_ms();
        match postback::parse(&body, content_type.as_deref()) {
            Ok(postback) => {
                let format = postback.format.as_str();
                let (outcome, response) = self
                    .commit(postback, body, content_type, received_at_ms)
                    .await;
                (format, outcome, response)
            }
            Err(parse_error) => {
                let (outcome, response) = self
                    .quarantine(parse_error, body, content_type, received_at_ms)
                    .await;
                ("unknown", outcome, response)
            }
        }
    }

    async fn commit(
        &self,
        postback: Postback,
        body: Bytes,
        content_type: Option<String>,
        received_at_ms: i64,
    ) -> (Outcome, HttpResponse) {
        let (new, decision) = prepare(
            &postback,
            body.clone(),
            content_type.clone(),
            received_at_ms,
            &self.router.get(),
            &self.source,
        );
        let id = new.id.clone();
        let result = self.committer.accept(new).await;
        let log = |outcome: &str, id: &str| {
            tracing::info!(
                id, origin = postback.origin(), code = postback.code(),
                tracking_id = postback.tracking_id().unwrap_or(""),
                routes = %decision.routes.join(","), targets = %decision.targets.join(","),
                outcome, "postback"
            );
        };
        match result {
            Ok(Acceptance::Accepted) => {
                log("accepted", &id);
                if decision.targets.is_empty() {
                    tracing::warn!(id = %id, tracking_id = postback.tracking_id().unwrap_or(""),
                        "no route matched; kept as dead letter \"no route\"");
                }
                (
                    Outcome::Accepted,
                    json_response(StatusCode::OK, &json!({"status": "accepted", "id": id})),
                )
            }
            Ok(Acceptance::Duplicate { original_id }) => {
                log("duplicate", &original_id);
                (
                    Outcome::Duplicate,
                    json_response(
                        StatusCode::OK,
                        &json!({"status": "duplicate", "id": original_id}),
                    ),
                )
            }
            Err(StoreError::Refused {
                message: reason, ..
            }) => {
                // Sending it again cannot help: keep it for an operator.
                log("refused", &id);
                self.quarantine(reason, body, content_type, received_at_ms)
                    .await
            }
            Err(err) => {
                log("error", &id);
                (Outcome::Error, unavailable(&err))
            }
        }
    }

    /// Keeps a body that cannot be committed as a postback (the parser or
    /// the database refused it), then answers 400.
    async fn quarantine(
        &self,
        reason: impl std::fmt::Display,
        body: Bytes,
        content_type: Option<String>,
        received_at_ms: i64,
    ) -> (Outcome, HttpResponse) {
        let message = reason.to_string();
        let entry = QuarantineEntry {
            body_hash: hex::encode(Sha256::digest(&body)),
            body,
            content_type,
            error: message.clone(),
            received_at_ms,
        };
        let (hash, size) = (entry.body_hash.clone(), entry.body.len());
        match self.store.quarantine(entry).await {
            Ok(kept) => {
                if kept == Kept::Prefix {
                    self.metrics.quarantine_truncated.inc();
                    tracing::warn!(body_hash = %hash, size,
                        "quarantine.max_bytes reached: only the first bytes of this refused body are kept");
                }
                tracing::warn!(body_hash = %hash, error = %message, outcome = "invalid", "postback quarantined");
                (Outcome::Invalid, error(StatusCode::BAD_REQUEST, &message))
            }
            Err(err) => (Outcome::Error, unavailable(&err)),
        }
    }

    /// Answers a request the access policy refused, counting and logging it.
    fn deny(
        &self,
        denied: Denied,
        client: std::net::IpAddr,
        connection: &ConnectionInfo,
        access: &AccessPolicy,
    ) -> HttpResponse {
        let (outcome, status, message) = match denied {
            Denied::Forbidden => (
                "forbidden",
                StatusCode::FORBIDDEN,
                "this address may not post here",
            ),
            Denied::Unauthorized => (
                "unauthorized",
                StatusCode::UNAUTHORIZED,
                "missing or wrong credentials",
            ),
        };
        self.metrics
            .postbacks_received
            .with_label_values(&["unknown", outcome])
            .inc();
        // One line per refusal would let anyone fill the disk; the metric
        // above counts every one.
        static LOG: LogThrottle = LogThrottle::new(REFUSAL_LOG_EVERY);
        if let Some(not_logged) = LOG.admit() {
            tracing::warn!(%client, peer = %connection.peer, outcome, not_logged, "postback refused (logged at most once per 10 s)");
        }
        let mut response = error(status, message);
        if denied == Denied::Unauthorized && access.uses_basic_auth() {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"postback-relay\", charset=\"UTF-8\""),
            );
        }
        response
    }

    fn too_large(&self) -> HttpResponse {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body is larger than {} bytes", self.max_body_bytes),
        )
    }
}

/// Turns a parsed postback into what the store commits: a fresh envelope id,
/// the envelope, the routing decision and the dedupe key. Shared by the HTTP
/// handler and the quarantine replay, so both treat a postback alike.
pub fn prepare(
    postback: &Postback,
    body: Bytes,
    content_type: Option<String>,
    received_at_ms: i64,
    router: &Router,
    source: &str,
) -> (NewPostback, Decision) {
    let id = ulid::Ulid::generate().to_string();
    let received =
        chrono::DateTime::from_timestamp_millis(received_at_ms).unwrap_or_else(chrono::Utc::now);
    let envelope = Envelope::new(postback, id.clone(), source, received);
    let decision = router.route(postback);
    let new = NewPostback {
        id,
        dedupe_key: dedupe_key(postback, &body),
        received_at_ms,
        envelope: Bytes::from(envelope.to_json()),
        raw_body: body,
        content_type,
        targets: decision.targets.clone(),
        tracking_id: postback.tracking_id().map(str::to_owned),
    };
    (new, decision)
}

fn error(status: StatusCode, message: &str) -> HttpResponse {
    json_response(status, &json!({ "error": message }))
}

/// 503 with Retry-After: nothing was acknowledged, Sinch will send it again.
fn unavailable(err: &StoreError) -> HttpResponse {
    tracing::error!(error = %err, "cannot commit postback; answering 503");
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the relay cannot store postbacks right now; retry later",
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
    response
}
