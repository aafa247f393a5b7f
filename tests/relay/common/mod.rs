//! Test harness shared by the integration tests: a relay started in-process on
//! ephemeral loopback ports with its store in a temporary directory, sink servers
//! that record what they receive and answer as told, a target that never
//! answers, a small tmpfs for a full disk, and a small HTTP client. The real
//! binary and the load that is sent to it are in [`process`].

pub mod pg;
pub mod raw;
pub mod tls;

pub mod process;

mod hung;
mod in_process;
mod sink;
mod store;
mod tmpfs;

pub use hung::HungListener;
pub use in_process::{config_yaml, start_relay, start_relay_in, TestRelay};
pub use sink::{dead_addr, Received, Reply, Sink};
pub use store::{skip_unless, Backend, TestStore};
pub use tmpfs::Tmpfs;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

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
