//! The public endpoint over real HTTP: what Sinch sees. Runs on SQLite,
//! and on PostgreSQL with `RELAY_TEST_BACKEND=postgres`.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rusqlite::types::Value as Sql;
use serde_json::{json, Value};

use crate::common::*;

mod backpressure;
mod dedupe;
mod envelope;
mod http;
mod malformed;
mod metrics;

/// Upper bound of every wait for something that should happen.
const WAIT: Duration = Duration::from_secs(10);
/// How long to keep watching for something that must not happen (a second delivery).
const QUIET: Duration = Duration::from_millis(800);

fn archive_to(sink: &Sink) -> String {
    format!(
        "targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    )
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

static ENVELOPE_SCHEMA: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema/envelope.schema.json");
    let text = std::fs::read_to_string(path).expect("read schema/envelope.schema.json");
    let schema: Value = serde_json::from_str(&text).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema compiles")
});

/// Fails with every schema violation listed when `envelope` does not match
/// `schema/envelope.schema.json`.
fn assert_valid_envelope(envelope: &Value) {
    let errors: Vec<String> = ENVELOPE_SCHEMA
        .iter_errors(envelope)
        .map(|error| format!("{} (at `{}`)", error, error.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "envelope does not match schema/envelope.schema.json:\n  {}\nenvelope: {envelope:#}",
        errors.join("\n  ")
    );
}

/// Waits for the envelope with `id` on the sink's `/inbox`, checks it against the
/// schema and the delivery content type, and returns it.
async fn delivered(sink: &Sink, id: &str) -> Value {
    let received = eventually(WAIT, &format!("envelope {id} delivered"), || {
        let found = sink
            .received_on("/inbox")
            .into_iter()
            .find(|r| r.json()["id"] == id);
        async move { found }
    })
    .await;
    assert_eq!(
        received.header("content-type"),
        Some("application/cloudevents+json")
    );
    let envelope = received.json();
    assert_valid_envelope(&envelope);
    envelope
}

/// POSTs a postback that must be accepted and returns its delivered envelope.
async fn accepted(
    relay: &TestRelay,
    sink: &Sink,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Value {
    let body = body.into();
    let (status, answer) = post(&relay.url, content_type, body.clone()).await;
    assert_eq!(
        status,
        200,
        "{answer} for {content_type:?} {:?}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(answer["status"], "accepted", "{answer}");
    let id = answer["id"].as_str().expect("the answer names the id");
    delivered(sink, id).await
}

/// Sends one request with the hyper client; returns status, headers and JSON body
/// (Null when the body is not JSON).
async fn send(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> (u16, HeaderMap, Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut request = Request::builder().method(method).uri(url);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = tokio::time::timeout(
        WAIT,
        client.request(request.body(Full::new(body.into())).unwrap()),
    )
    .await
    .expect("answer within 10 s")
    .expect("request succeeds");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body within 10 s")
        .expect("body read")
        .to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Asserts an error answer is `{"error": "<message containing `needle`>"}` and nothing else.
fn assert_error_body(answer: &Value, needle: &str) {
    let object = answer
        .as_object()
        .unwrap_or_else(|| panic!("error body is not a JSON object: {answer}"));
    assert_eq!(object.len(), 1, "only `error` expected: {answer}");
    let message = object["error"]
        .as_str()
        .unwrap_or_else(|| panic!("`error` is not a string: {answer}"));
    assert!(
        message.contains(needle),
        "error message {message:?} should mention {needle:?}"
    );
}

/// A JSON MO postback with the given tracking id.
fn mo_json(tracking_id: &str) -> String {
    json!({
        "origin": "MMS_MO",
        "code": "N401",
        "from": "14085550000",
        "to": "28444",
        "tracking-id": tracking_id,
        "timestamp": "2021-02-03T18:27:54Z",
        "content": [{"file": format!("https://m.example/{tracking_id}.jpg")}]
    })
    .to_string()
}

fn sql_int(value: &Sql) -> i64 {
    match value {
        Sql::Integer(i) => *i,
        other => panic!("expected an integer, got {other:?}"),
    }
}

fn sql_bytes(value: &Sql) -> &[u8] {
    match value {
        Sql::Blob(bytes) => bytes,
        Sql::Text(text) => text.as_bytes(),
        other => panic!("expected a blob, got {other:?}"),
    }
}

fn count(relay: &TestRelay, sql: &str) -> i64 {
    sql_int(&relay.query(sql)[0][0])
}

const SMALL_LIMIT: &str = "ingest:\n  max_body_bytes: 1024\n";

/// A valid postback longer than `SMALL_LIMIT` (an unknown field pads it).
fn oversized_postback() -> String {
    format!(
        "<postback><origin>MMS_MO</origin><code>N401</code><tracking-id>BIG_1</tracking-id><padding>{}</padding></postback>",
        "x".repeat(3000)
    )
}
