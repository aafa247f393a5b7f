//! Delivery over real sockets: an in-process relay, recording sink servers on
//! loopback, and the relay's own database and metrics as evidence. Backoffs are
//! short so retries happen within a test; every wait is bounded. Runs on
//! SQLite, and on PostgreSQL with `RELAY_TEST_BACKEND=postgres`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use rusqlite::types::Value as Sql;
use serde_json::Value;
use sha2::Sha256;

/// Quick retries; enough attempts that a target down for a few seconds is not
/// given up (tests about giving up set `max_attempts` on their target).
const DELIVERY: &str =
    "delivery:\n  backoff: {initial: 50ms, max: 200ms}\n  max_attempts: 1000\n  timeout: 5s\n";

/// How long any single "eventually" may take before the test fails.
const WAIT: Duration = Duration::from_secs(15);

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// An MT delivery receipt (no keyword, no `to`).
fn mt_xml(tracking_id: &str, code: &str) -> String {
    format!(
        "<postback><origin>MMS_MT</origin><code>{code}</code><tracking-id>{tracking_id}</tracking-id>\
         <mms-id>77</mms-id><status>ok</status></postback>"
    )
}

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

/// Subjects received on `path`, sorted, repeats kept.
fn subjects(sink: &Sink, path: &str) -> Vec<String> {
    let mut all: Vec<String> = sink.received_on(path).iter().map(subject).collect();
    all.sort();
    all
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut items: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
    items.sort();
    items
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

/// Standard Webhooks verification written from the spec, independent of the
/// crate's signer: HMAC-SHA256 over "{id}.{timestamp}.{body}" with the
/// base64-decoded part of `whsec_...`.
fn expected_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[test]
fn the_test_verifier_matches_the_standard_webhooks_vector() {
    assert_eq!(
        expected_signature(
            SECRET,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#
        ),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
}

// 1. Routing, fan-out and `continue`.
#[tokio::test]
async fn routes_fan_out_and_continue() {
    let sink = Sink::start().await;
    let targets = ["optout", "inbox", "audit", "receipts", "archive"]
        .iter()
        .map(|name| format!("  {name}: {{url: \"{}\"}}\n", sink.url(&format!("/{name}"))))
        .collect::<String>();
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n{targets}routes:
  - name: stop
    match: {{keyword: [STOP, End]}}
    targets: [optout]
  - name: shortcode
    match: {{to: \"+28444\", origin: mms_mo}}
    targets: [inbox, audit]
    continue: true
  - name: receipts
    match: {{origin: MMS_MT, code: [N101, n102]}}
    targets: [receipts]
  - name: everything
    targets: [audit, archive, audit]
"
    ))
    .await;

    // Keyword match is case-insensitive, and the first match wins even though
    // `shortcode` would match too.
    accept(&relay, &mo_xml("stop-1", "stop", "28444")).await;
    accept(&relay, &mo_xml("end-1", "eNd", "99999")).await;
    // `shortcode` (to without `+`) continues into `everything`; audit is named
    // by both routes and receives once.
    accept(&relay, &mo_xml("short-1", "hello", "28444")).await;
    // Origin and code (case-insensitive); `receipts` does not continue.
    accept(&relay, &mt_xml("receipt-1", "N102")).await;
    // Neither keyword, short code nor receipt code: the catch-all.
    accept(&relay, &mt_xml("failed-1", "E101")).await;
    accept(&relay, &mo_xml("other-1", "hello", "12345")).await;

    let expected: BTreeMap<&str, Vec<String>> = [
        ("/optout", sorted(&["stop-1", "end-1"])),
        ("/inbox", sorted(&["short-1"])),
        ("/audit", sorted(&["short-1", "failed-1", "other-1"])),
        ("/receipts", sorted(&["receipt-1"])),
        ("/archive", sorted(&["short-1", "failed-1", "other-1"])),
    ]
    .into_iter()
    .collect();
    for (path, subjects) in &expected {
        sink.wait_for(path, subjects.len(), WAIT).await;
    }
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    // Nothing more arrives later (no second copy for audit, no stray target).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (path, wanted) in &expected {
        assert_eq!(&subjects(&sink, path), wanted, "deliveries on {path}");
    }
    assert_eq!(
        sink.received().len(),
        expected.values().map(Vec::len).sum::<usize>(),
        "requests on paths no route names"
    );
    assert!(dead_letters(&relay).is_empty());
    relay.shutdown().await;
}

// 2. No route: acknowledged, delivered nowhere, kept as a dead letter.
#[tokio::test]
async fn a_postback_without_route_is_kept_as_dead_letter() {
    let sink = Sink::start().await;
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - match: {{code: N999}}\n    targets: [inbox]\n",
        sink.url("/inbox")
    ))
    .await;
    let id = accept(&relay, &mo_xml("lonely-1", "hello", "28444")).await;

    // Kept once moved in from the intake journal (milliseconds).
    eventually_int(&relay, "SELECT COUNT(*) FROM dead_letters", 1).await;
    let dead = dead_letters(&relay);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event_id, id);
    assert_eq!(dead[0].target, "(no route)");
    assert_eq!(dead[0].reason, "no route");
    assert_eq!(int(&relay, "SELECT COUNT(*) FROM jobs"), 0);
    // The body is kept with the dead letter.
    assert_eq!(
        int(
            &relay,
            &format!("SELECT COUNT(*) FROM events WHERE id = '{id}'")
        ),
        1
    );

    // Gauges refresh every 2 s.
    eventually(Duration::from_secs(6), "dead letter gauge = 1", || async {
        let value = metric(&relay, "relay_dead_letters", &[("target", "(no route)")]).await;
        (value == Some(1.0)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sink.received().is_empty(), "delivered although unrouted");
    relay.shutdown().await;
}

// 3. 500, 500, 200: one success, three attempts, one id.
#[tokio::test]
async fn server_errors_are_retried_with_the_same_id() {
    let sink = Sink::start().await;
    sink.respond(|index, _| Reply::status(if index < 2 { 500 } else { 200 }));
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  inbox: {{url: \"{}\", secret: {SECRET}}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    ))
    .await;
    let id = accept(&relay, &mo_xml("retry-1", "hello", "28444")).await;

    sink.wait_for("/inbox", 3, WAIT).await;
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = sink.received_on("/inbox");
    assert_eq!(got.len(), 3, "attempts");
    for attempt in &got {
        assert_eq!(attempt.json()["id"], id.as_str());
        assert_eq!(attempt.header("webhook-id"), Some(id.as_str()));
    }
    assert!(dead_letters(&relay).is_empty());
    let counter = |outcome: &'static str| {
        let relay = &relay;
        async move {
            metric(
                relay,
                "relay_deliveries_total",
                &[("target", "inbox"), ("outcome", outcome)],
            )
            .await
        }
    };
    assert_eq!(counter("retried").await, Some(2.0));
    assert_eq!(counter("delivered").await, Some(1.0));
    assert_eq!(
        counter("dead").await,
        Some(0.0),
        "every outcome series exists from the start"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_comes_due_while_fresh_postbacks_keep_the_dispatcher_busy() {
    // Fresh postbacks reach the dispatcher in memory; the retry waits in the
    // store. A steady stream (every 40 ms, more often than the 250 ms poll)
    // must not keep the dispatcher from looking there.
    let sink = Sink::start().await;
    sink.respond(|_, _| Reply::status(503));
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  inbox: {{url: \"{}\", secret: {SECRET}}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    ))
    .await;
    accept(&relay, &mo_xml("RETRY-ME", "hello", "28444")).await;
    // The first attempt fails; from now on the target accepts everything.
    sink.wait_for("/inbox", 1, WAIT).await;
    sink.respond(|_, _| Reply::status(200));
    let mut sent = 0;
    let retried = loop {
        accept(&relay, &mo_xml(&format!("STREAM-{sent}"), "hello", "28444")).await;
        sent += 1;
        let delivered_again = sink
            .received_on("/inbox")
            .iter()
            .filter(|r| r.json()["data"]["tracking_id"] == "RETRY-ME")
            .count()
            == 2;
        if delivered_again || sent == 100 {
            break delivered_again;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    };
    assert!(
        retried,
        "the retry was not attempted during {sent} postbacks ({} ms of steady traffic)",
        sent * 40
    );
    relay.shutdown().await;
}

// 4. A target that is down, then comes back on the same address.
#[tokio::test]
async fn a_dead_target_that_comes_back_gets_everything() {
    let addr = dead_addr().await;
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  inbox: {{url: \"http://{addr}/inbox\"}}\nroutes:\n  - targets: [inbox]\n"
    ))
    .await;
    let mut ids = BTreeSet::new();
    for n in 0..5 {
        ids.insert(accept(&relay, &mo_xml(&format!("down-{n}"), "hello", "28444")).await);
    }
    // Every job has failed at least once (connection refused) and is still queued.
    eventually_int(
        &relay,
        "SELECT COUNT(*) FROM jobs WHERE attempts >= 1 AND last_error IS NOT NULL",
        5,
    )
    .await;
    assert!(dead_letters(&relay).is_empty());
    // The queue's lag shows while the target is down (gauges refresh every 2 s).
    let age = r#"relay_queue_oldest_age_seconds{target="inbox"}"#;
    let pending = r#"relay_queue_pending{target="inbox"}"#;
    eventually(
        Duration::from_secs(10),
        "all five pending, and the oldest's age, to show",
        || {
            let relay = &relay;
            async move {
                let lagging = relay.metric(age).await.unwrap_or(0.0) > 0.0;
                (lagging && relay.metric(pending).await == Some(5.0)).then_some(())
            }
        },
    )
    .await;

    let sink = Sink::start_at(addr).await;
    let got = sink.wait_for("/inbox", 5, WAIT).await;
    let delivered: BTreeSet<String> = got
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(delivered, ids);
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    assert!(dead_letters(&relay).is_empty());
    eventually(
        Duration::from_secs(10),
        "the oldest pending age to drop to 0",
        || {
            let relay = &relay;
            async move { (relay.metric(age).await == Some(0.0)).then_some(()) }
        },
    )
    .await;
    relay.shutdown().await;
}

// 5. Retry-After is honoured beyond the backoff cap; 429 is retried.
#[tokio::test]
async fn retry_after_is_honoured_and_429_is_retried() {
    let sink = Sink::start().await;
    // The first request on each path is refused, later ones accepted.
    let slow_down = sink.clone();
    sink.respond(move |_, received| {
        let seen_here = slow_down.received_on(&received.path).len();
        match (received.path.as_str(), seen_here) {
            ("/busy", 1) => Reply {
                status: 503,
                headers: vec![("retry-after", "1".to_owned())],
                delay: Duration::ZERO,
            },
            ("/limited", 1) => Reply::status(429),
            _ => Reply::status(200),
        }
    });
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  busy: {{url: \"{}\"}}\n  limited: {{url: \"{}\"}}\nroutes:\n  - match: {{keyword: busy}}\n    targets: [busy]\n  - targets: [limited]\n",
        sink.url("/busy"),
        sink.url("/limited"),
    ))
    .await;
    accept(&relay, &mo_xml("busy-1", "busy", "28444")).await;
    accept(&relay, &mo_xml("limited-1", "hello", "28444")).await;

    let busy = sink.wait_for("/busy", 2, WAIT).await;
    let limited = sink.wait_for("/limited", 2, WAIT).await;
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    let gap = busy[1].at.duration_since(busy[0].at);
    assert!(
        gap >= Duration::from_millis(950),
        "second attempt came {gap:?} after a 503 with Retry-After: 1"
    );
    assert_eq!(sink.received_on("/busy").len(), 2);
    assert_eq!(sink.received_on("/limited").len(), 2);
    assert_eq!(subject(&limited[1]), "limited-1");
    assert!(dead_letters(&relay).is_empty());
    relay.shutdown().await;
}

// 6. 4xx is final; max_attempts gives up.
#[tokio::test]
async fn client_errors_and_exhausted_attempts_become_dead_letters() {
    let sink = Sink::start().await;
    sink.respond(|_, received| {
        Reply::status(match received.path.as_str() {
            "/t400" => 400,
            "/t404" => 404,
            "/t410" => 410,
            _ => 500,
        })
    });
    let mut yaml = format!("{DELIVERY}targets:\n");
    for name in ["t400", "t404", "t410"] {
        yaml += &format!("  {name}: {{url: \"{}\"}}\n", sink.url(&format!("/{name}")));
    }
    yaml += &format!(
        "  t500: {{url: \"{}\", max_attempts: 3}}\nroutes:\n  - targets: [t400, t404, t410, t500]\n",
        sink.url("/t500")
    );
    let relay = start_relay(&yaml).await;
    let id = accept(&relay, &mo_xml("refused-1", "hello", "28444")).await;

    eventually_int(&relay, "SELECT COUNT(*) FROM dead_letters", 4).await;
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    // Long enough for a stray retry (backoff max is 200 ms) to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (name, code) in [("t400", 400), ("t404", 404), ("t410", 410)] {
        assert_eq!(
            sink.received_on(&format!("/{name}")).len(),
            1,
            "attempts on {name}"
        );
        let dead = dead_letters(&relay)
            .into_iter()
            .find(|d| d.target == name)
            .unwrap_or_else(|| panic!("no dead letter for {name}"));
        assert_eq!(dead.event_id, id);
        assert_eq!(dead.reason, "rejected by target");
        assert_eq!(dead.attempts, 1);
        assert_eq!(dead.last_status, Some(code));
        let error = dead.last_error.unwrap_or_default();
        assert!(error.contains(&code.to_string()), "{error}");
        assert!(error.contains("sink says hi"), "{error}");
    }
    assert_eq!(sink.received_on("/t500").len(), 3, "attempts on t500");
    let dead = dead_letters(&relay)
        .into_iter()
        .find(|d| d.target == "t500")
        .expect("dead letter for t500");
    assert_eq!(dead.reason, "max attempts reached");
    assert_eq!(dead.attempts, 3);
    assert_eq!(dead.last_status, Some(500));
    assert_eq!(
        metric(
            &relay,
            "relay_deliveries_total",
            &[("target", "t500"), ("outcome", "dead")]
        )
        .await,
        Some(1.0)
    );
    relay.shutdown().await;
}

// 7. Standard Webhooks signature and custom headers.
#[tokio::test]
async fn signed_requests_verify_and_carry_custom_headers() {
    let sink = Sink::start().await;
    // Secret headers come from a file or the environment (Cargo sets
    // CARGO_PKG_NAME for the tests it runs).
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("api-key");
    std::fs::write(&key_file, "k-123\n").unwrap();
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  inbox:\n    url: \"{}\"\n    secret: {SECRET}\n    headers: {{X-Api-Key: {{file: \"{}\"}}, X-Team: mms, X-Package: {{env: CARGO_PKG_NAME}}}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox"),
        key_file.display()
    ))
    .await;
    let id = accept(&relay, SEED_XML).await;
    let got = sink.wait_for("/inbox", 1, WAIT).await;
    let request = &got[0];
    assert_eq!(request.json()["id"], id.as_str());
    assert_eq!(request.header("webhook-id"), Some(id.as_str()));
    let timestamp = request.header("webhook-timestamp").expect("timestamp");
    let seconds: i64 = timestamp.parse().expect("timestamp is integer seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (seconds - now).abs() <= 60,
        "timestamp {seconds}, now {now}"
    );
    let signatures = request.header("webhook-signature").expect("signature");
    let expected = expected_signature(SECRET, &id, timestamp, &request.body);
    assert!(
        signatures.split(' ').any(|s| s == expected),
        "signature {signatures:?}, expected {expected:?}"
    );
    // A tampered body would not verify (the check above can fail).
    let mut tampered = request.body.to_vec();
    tampered.push(b' ');
    assert_ne!(
        expected_signature(SECRET, &id, timestamp, &tampered),
        expected
    );
    assert_eq!(request.header("x-api-key"), Some("k-123"));
    assert_eq!(request.header("x-team"), Some("mms"));
    assert_eq!(
        request.header("x-package"),
        Some(std::env::var("CARGO_PKG_NAME").unwrap().as_str())
    );
    assert_eq!(
        request.header("content-type"),
        Some("application/cloudevents+json")
    );
    relay.shutdown().await;
}

// 8. Raw payload: the exact bytes and Content-Type Sinch sent.
#[tokio::test]
async fn raw_targets_receive_the_original_bytes() {
    let sink = Sink::start().await;
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  raw: {{url: \"{}\", payload: raw}}\nroutes:\n  - targets: [raw]\n",
        sink.url("/raw")
    ))
    .await;
    let xml = SEED_XML;
    let (status, answer) = post(&relay.url, Some("text/xml"), xml).await;
    assert_eq!(status, 200, "{answer}");
    sink.wait_for("/raw", 1, WAIT).await;
    let json_type = "application/json; charset=utf-8";
    let (status, answer) = post(&relay.url, Some(json_type), SEED_JSON).await;
    assert_eq!(status, 200, "{answer}");
    let got = sink.wait_for("/raw", 2, WAIT).await;
    assert_eq!(&got[0].body[..], xml.as_bytes());
    assert_eq!(got[0].header("content-type"), Some("text/xml"));
    assert_eq!(&got[1].body[..], SEED_JSON.as_bytes());
    assert_eq!(got[1].header("content-type"), Some(json_type));
    relay.shutdown().await;
}

// 9. File target: one envelope per line.
#[tokio::test]
async fn file_targets_get_one_envelope_per_line() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.jsonl");
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  archive: {{kind: file, path: \"{}\"}}\nroutes:\n  - targets: [archive]\n",
        out.display()
    ))
    .await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(accept(&relay, &mo_xml(&format!("file-{n}"), "hello", "28444")).await);
    }
    let (status, answer) = post(&relay.url, Some("application/json"), SEED_JSON).await;
    assert_eq!(status, 200, "{answer}");
    ids.push(answer["id"].as_str().unwrap().to_owned());

    // Jobs exist only once moved in from the intake journal: wait for the
    // lines, then for the bookkeeping.
    eventually(WAIT, "four lines in the file", || {
        let lines = std::fs::read_to_string(&out).map_or(0, |text| text.lines().count());
        async move { (lines == 4).then_some(()) }
    })
    .await;
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    let content = std::fs::read_to_string(&out).expect("file written");
    assert!(content.ends_with('\n'));
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schema/envelope.schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let lines: Vec<&str> = content.lines().collect();
    assert_eq!(lines.len(), 4, "{content}");
    let mut seen = Vec::new();
    for line in lines {
        let envelope: Value = serde_json::from_str(line).expect("each line is JSON");
        if let Err(err) = jsonschema::validate(&schema, &envelope) {
            panic!("line does not match the envelope schema: {err}\n{line}");
        }
        assert_eq!(envelope["specversion"], "1.0");
        seen.push(envelope["id"].as_str().unwrap().to_owned());
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    relay.shutdown().await;
}

// 10. A slow target does not delay a fast one, nor ingest.
/// A write that fails half-way (here the file size limit, as a full disk
/// would) leaves no torn line behind: the file is cut back to its length
/// before the write, the attempt is retried, and once the write can succeed
/// the line is appended whole. The real binary runs with RLIMIT_FSIZE set
/// (and SIGXFSZ ignored, so the write fails with EFBIG rather than killing
/// it); the test lifts the limit with prlimit. No root needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_file_write_leaves_only_whole_lines() {
    use crate::common::process::RelayProcess;
    const LIMIT: u64 = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("postbacks.jsonl");
    // Whole lines up to 100 bytes short of the limit: the next line is cut.
    let mut before = String::new();
    while (before.len() as u64) < LIMIT - 100 {
        let room = (LIMIT - 100) as usize - before.len();
        let pad = room.min(1000).saturating_sub(12).max(1);
        before.push_str(&format!("{{\"pad\":\"{}\"}}\n", "x".repeat(pad)));
    }
    before.truncate((LIMIT - 100) as usize);
    if !before.ends_with('\n') {
        before.pop();
        before.push('\n');
    }
    std::fs::write(&out, &before).unwrap();
    let config = crate::common::process::write_config(
        dir.path(),
        &format!(
            "{DELIVERY}targets:\n  archive: {{kind: file, path: \"{}\"}}\nroutes:\n  - targets: [archive]\n",
            out.display()
        ),
    );
    let relay = tokio::task::spawn_blocking(move || {
        RelayProcess::start_customized(&config, &[], |command| {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let limit = libc::rlimit {
                        rlim_cur: LIMIT,
                        rlim_max: libc::RLIM_INFINITY,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    })
    .await
    .unwrap();
    let (status, answer) = post(
        &relay.url,
        Some("text/xml"),
        mo_xml("torn-1", "HI", "12345"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let retried = "relay_deliveries_total{outcome=\"retried\",target=\"archive\"}";
    eventually(WAIT, "a failed attempt", || async {
        (relay.metric(retried).await.unwrap_or(0.0) >= 2.0).then_some(())
    })
    .await;
    let after_failures = std::fs::read(&out).unwrap();
    assert_eq!(
        after_failures.len(),
        before.len(),
        "a failed write left {} bytes behind",
        after_failures.len() - before.len()
    );
    // The disk is fixed: the retry appends the line, whole.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain system call on a child this test owns.
    let lifted = unsafe {
        libc::prlimit(
            relay.pid() as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &unlimited,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(lifted, 0, "prlimit: {}", std::io::Error::last_os_error());
    let text = eventually(WAIT, "the line in the file", || {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        async move { text.contains("torn-1").then_some(text) }
    })
    .await;
    assert!(text.starts_with(&before) && text.ends_with('\n'));
    let lines: Vec<Value> = text[before.len()..]
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["data"]["tracking_id"], "torn-1", "{}", lines[0]);
}

#[tokio::test]
async fn a_slow_target_does_not_hold_up_a_fast_one() {
    const N: usize = 5;
    let sink = Sink::start().await;
    sink.respond(|_, received| {
        let mut reply = Reply::status(200);
        if received.path == "/slow" {
            reply.delay = Duration::from_secs(3);
        }
        reply
    });
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  slow: {{url: \"{}\", timeout: 5s}}\n  fast: {{url: \"{}\"}}\nroutes:\n  - targets: [slow, fast]\n",
        sink.url("/slow"),
        sink.url("/fast"),
    ))
    .await;
    let mut ids = BTreeSet::new();
    for n in 0..N {
        ids.insert(accept(&relay, &mo_xml(&format!("iso-{n}"), "hello", "28444")).await);
    }
    sink.wait_for("/fast", N, WAIT).await;
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs WHERE target = 'fast'", 0).await;
    // The fast target is done while the slow one still holds every job.
    assert_eq!(
        int(&relay, "SELECT COUNT(*) FROM jobs WHERE target = 'slow'"),
        N as i64,
        "slow target finished before the fast one"
    );
    // Ingest still answers while the slow deliveries hang.
    ids.insert(accept(&relay, &mo_xml("iso-late", "hello", "28444")).await);
    sink.wait_for("/fast", N + 1, WAIT).await;
    assert!(int(&relay, "SELECT COUNT(*) FROM jobs WHERE target = 'slow'") > 0);

    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    for path in ["/fast", "/slow"] {
        let got: BTreeSet<String> = sink
            .received_on(path)
            .iter()
            .map(|r| r.json()["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, ids, "deliveries on {path}");
        assert_eq!(sink.received_on(path).len(), N + 1, "no retries on {path}");
    }
    assert!(dead_letters(&relay).is_empty());
    relay.shutdown().await;
}

// 11. An attempt that outlives the target's timeout is retried, then given up.
#[tokio::test]
async fn timeouts_are_retried_then_dead_lettered() {
    let sink = Sink::start().await;
    sink.respond(|_, _| Reply {
        status: 200,
        headers: Vec::new(),
        delay: Duration::from_secs(3),
    });
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  hung: {{url: \"{}\", timeout: 500ms, max_attempts: 3}}\nroutes:\n  - targets: [hung]\n",
        sink.url("/hung")
    ))
    .await;
    let id = accept(&relay, &mo_xml("hung-1", "hello", "28444")).await;
    // After the first timeout the job is back in the queue with one attempt.
    eventually(WAIT, "a retry after a timeout", || {
        let rows = relay.query("SELECT attempts, last_error FROM jobs");
        async move {
            match rows.first().map(|row| (&row[0], &row[1])) {
                Some((Sql::Integer(n), Sql::Text(error)))
                    if *n >= 1 && error.contains("timed out") =>
                {
                    Some(())
                }
                _ => None,
            }
        }
    })
    .await;
    eventually_int(&relay, "SELECT COUNT(*) FROM dead_letters", 1).await;
    let dead = &dead_letters(&relay)[0];
    assert_eq!(dead.event_id, id);
    assert_eq!(dead.target, "hung");
    assert_eq!(dead.reason, "max attempts reached");
    assert_eq!(dead.attempts, 3);
    assert_eq!(dead.last_status, None);
    let error = dead.last_error.clone().unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    assert_eq!(sink.received_on("/hung").len(), 3);
    assert_eq!(int(&relay, "SELECT COUNT(*) FROM jobs"), 0);
    relay.shutdown().await;
}

// 12. Accepted while the target is down, delivered after a graceful restart.
#[tokio::test]
async fn pending_deliveries_survive_a_restart() {
    let addr = dead_addr().await;
    let rest = format!(
        "{DELIVERY}targets:\n  inbox: {{url: \"http://{addr}/inbox\"}}\nroutes:\n  - targets: [inbox]\n"
    );
    let relay = start_relay(&rest).await;
    let mut ids = BTreeSet::new();
    for n in 0..5 {
        ids.insert(accept(&relay, &mo_xml(&format!("restart-{n}"), "hello", "28444")).await);
    }
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs WHERE attempts >= 1", 5).await;
    let dir = relay.shutdown().await;

    let sink = Sink::start_at(addr).await;
    let relay = start_relay_in(dir, &rest).await;
    let got = sink.wait_for("/inbox", 5, WAIT).await;
    let delivered: BTreeSet<String> = got
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(delivered, ids);
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received_on("/inbox").len(), 5, "delivered twice");
    relay.shutdown().await;
}
