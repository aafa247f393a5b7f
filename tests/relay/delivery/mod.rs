//! Delivery over real sockets: an in-process relay, recording sink servers on
//! loopback, and the relay's own database and metrics as evidence. Backoffs are
//! short so retries happen within a test; every wait is bounded. Runs on
//! SQLite, and on PostgreSQL with `RELAY_TEST_BACKEND=postgres`.

use std::time::Duration;

use crate::common::*;
use rusqlite::types::Value as Sql;

mod retries;
mod routing;
mod targets;

/// Quick retries; enough attempts that a target down for a few seconds is not
/// given up (tests about giving up set `max_attempts` on their target).
const DELIVERY: &str =
    "delivery:\n  backoff: {initial: 50ms, max: 200ms}\n  max_attempts: 1000\n  timeout: 5s\n";

/// How long any single "eventually" may take before the test fails.
const WAIT: Duration = Duration::from_secs(15);

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// POSTs an XML postback, asserts it was accepted, returns its envelope id.
async fn accept(relay: &TestRelay, body: &str) -> String {
    let (status, answer) = post(&relay.url, Some("text/xml"), body.to_owned()).await;
    assert_eq!(status, 200, "ingest answer: {answer}");
    assert_eq!(answer["status"], "accepted", "{answer}");
    answer["id"].as_str().expect("id in the answer").to_owned()
}

/// The envelope's `subject` (the tracking id) of a received request.
fn subject(received: &Received) -> String {
    received.json()["subject"]
        .as_str()
        .expect("envelope has a subject")
        .to_owned()
}

/// One integer from a query (`COUNT(*)` and the like).
fn int(relay: &TestRelay, sql: &str) -> i64 {
    match relay.query(sql).first().and_then(|row| row.first()) {
        Some(Sql::Integer(value)) => *value,
        other => panic!("{sql}: expected an integer, got {other:?}"),
    }
}

fn text(value: &Sql) -> String {
    match value {
        Sql::Text(text) => text.clone(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// A dead letter row: (target, reason, attempts, last_status, last_error).
#[derive(Debug, Clone, PartialEq)]
struct DeadLetter {
    event_id: String,
    target: String,
    reason: String,
    attempts: i64,
    last_status: Option<i64>,
    last_error: Option<String>,
}

fn dead_letters(relay: &TestRelay) -> Vec<DeadLetter> {
    relay
        .query(
            "SELECT event_id, target, reason, attempts, last_status, last_error \
             FROM dead_letters ORDER BY id",
        )
        .into_iter()
        .map(|row| DeadLetter {
            event_id: text(&row[0]),
            target: text(&row[1]),
            reason: text(&row[2]),
            attempts: match row[3] {
                Sql::Integer(n) => n,
                ref other => panic!("attempts: {other:?}"),
            },
            last_status: match row[4] {
                Sql::Integer(n) => Some(n),
                Sql::Null => None,
                ref other => panic!("last_status: {other:?}"),
            },
            last_error: match &row[5] {
                Sql::Text(t) => Some(t.clone()),
                Sql::Null => None,
                other => panic!("last_error: {other:?}"),
            },
        })
        .collect()
}

/// A metric sample whose labels are given in any order.
async fn metric(relay: &TestRelay, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (status, body) = get(&format!("{}/metrics", relay.admin)).await;
    assert_eq!(status, 200);
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let mut got: Vec<String> = series_labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            got.sort();
            (series_name == name && got == wanted).then(|| value.parse().ok())?
        })
}

/// Waits until a query returns `expected`.
async fn eventually_int(relay: &TestRelay, sql: &str, expected: i64) {
    relay.eventually_int(WAIT, sql, expected).await
}
