//! Malformed bodies: answered 400 with the problem named, quarantined once
//! within the quarantine's budget and retention, quoted only in short.

use rusqlite::types::Value as Sql;
use sha2::{Digest, Sha256};

use crate::common::*;

use super::{archive_to, assert_error_body, count, send, sql_bytes, sql_int, QUIET, WAIT};

fn sql_text(value: &Sql) -> &str {
    match value {
        Sql::Text(text) => text,
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_bodies_are_400_with_the_problem_named() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let xxe = r#"<?xml version="1.0"?><!DOCTYPE postback [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><postback><origin>MMS_MO</origin><code>N401</code><from>&xxe;</from></postback>"#;
    let billion_laughs = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]><postback><origin>&lol2;</origin><code>N401</code></postback>"#;
    let cases: Vec<(Option<&str>, Vec<u8>, &str)> = vec![
        (
            Some("text/plain"),
            b"hello, this is not a postback".to_vec(),
            "neither XML nor JSON",
        ),
        (
            None,
            b"origin=MMS_MO&code=N401".to_vec(),
            "neither XML nor JSON",
        ),
        (Some("application/json"), b"hello".to_vec(), "invalid JSON"),
        (Some("text/xml"), b"hello".to_vec(), "invalid XML"),
        (Some("text/xml"), b"".to_vec(), "empty body"),
        (None, b"  \r\n ".to_vec(), "empty body"),
        (
            Some("text/xml"),
            b"<postback><code>N401</code><tracking-id>T</tracking-id></postback>".to_vec(),
            "missing required field `origin`",
        ),
        (
            Some("application/json"),
            br#"{"origin":"MMS_MO","tracking-id":"T"}"#.to_vec(),
            "missing required field `code`",
        ),
        (
            Some("application/json"),
            br#"{"origin":"  ","code":"N401"}"#.to_vec(),
            "missing required field `origin`",
        ),
        (
            Some("text/xml"),
            b"<postback><origin>MMS_MO\xff\xfe</origin><code>N401</code></postback>".to_vec(),
            "not valid UTF-8",
        ),
        (
            Some("text/xml"),
            b"<postback><origin>MMS_MO</origin><code>N401</code>".to_vec(),
            "invalid XML",
        ),
        (
            Some("text/xml"),
            b"<postback><origin>MMS_MO</origin><code>N401</code></postbak>".to_vec(),
            "invalid XML",
        ),
        (
            Some("application/json"),
            br#"{"origin":"MMS_MO","code":"N401",}"#.to_vec(),
            "invalid JSON",
        ),
        (
            Some("application/json"),
            br#"{"origin":"MMS_MO","code":"N401""#.to_vec(),
            "invalid JSON",
        ),
        (
            Some("application/json"),
            br#"[{"origin":"MMS_MO","code":"N401"}]"#.to_vec(),
            "top level",
        ),
        (Some("text/xml"), xxe.as_bytes().to_vec(), "DOCTYPE"),
        (
            Some("text/xml"),
            billion_laughs.as_bytes().to_vec(),
            "DOCTYPE",
        ),
        (
            Some("text/xml"),
            b"<postback><origin>&xxe;</origin><code>N401</code></postback>".to_vec(),
            "xxe",
        ),
    ];
    for (content_type, body, needle) in &cases {
        let (status, headers, answer) = send("POST", &relay.url, *content_type, body.clone()).await;
        let shown = String::from_utf8_lossy(body);
        assert_eq!(status, 400, "{shown:?} answered {answer}");
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        assert_error_body(&answer, needle);
    }
    // Every distinct body is kept, none is delivered or stored as an event.
    let distinct: std::collections::BTreeSet<&Vec<u8>> = cases.iter().map(|c| &c.1).collect();
    assert_eq!(
        count(&relay, "SELECT COUNT(*) FROM quarantine") as usize,
        distinct.len()
    );
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM events"), 0);
    tokio::time::sleep(QUIET).await;
    assert!(sink.received().is_empty(), "nothing malformed is delivered");
    relay.shutdown().await;
}

// ---------------------------------------------------------------------------
// 6. Quarantine
// ---------------------------------------------------------------------------

/// Distinct bodies that are no postback (invalid UTF-8 from the first
/// byte), `size` bytes each, from a small xorshift generator.
fn random_bad_bodies(count: usize, size: usize) -> Vec<Vec<u8>> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..count)
        .map(|_| {
            let mut body = Vec::with_capacity(size);
            body.push(0xff);
            while body.len() < size {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                body.extend_from_slice(&state.to_le_bytes());
            }
            body.truncate(size);
            body
        })
        .collect()
}

/// Issue 13, item 9: the quarantine holds whole bodies only up to
/// `quarantine.max_bytes` (a running total); beyond it each new body keeps
/// its row (hash, size, error, content type) and a 1 KiB prefix.
#[tokio::test]
async fn the_quarantine_keeps_whole_bodies_only_within_its_budget() {
    const MIB: usize = 1024 * 1024;
    let relay =
        start_relay("ingest: {max_body_bytes: 2097152}\nquarantine: {max_bytes: 2097152}\n").await;
    let bodies = random_bad_bodies(20, MIB);
    for body in &bodies {
        let (status, answer) = post(&relay.url, Some("text/xml"), body.clone()).await;
        assert_eq!(status, 400, "{answer}");
        assert_error_body(&answer, "not valid UTF-8");
    }
    let stored = count(
        &relay,
        "SELECT COALESCE(SUM(length(body)), 0) FROM quarantine",
    );
    assert!(
        stored <= (2 * MIB + 20 * 1024) as i64,
        "the quarantine grew by {stored} bytes with a 2 MiB budget"
    );
    for body in &bodies {
        let rows = relay.query(&format!(
            "SELECT size, length(body), truncated, error, content_type, seen_count FROM quarantine \
             WHERE body_hash = '{}'",
            hex::encode(Sha256::digest(body))
        ));
        assert_eq!(rows.len(), 1, "every refused body keeps its row");
        let row = &rows[0];
        assert_eq!(sql_int(&row[0]), MIB as i64, "the size as received");
        assert!(
            sql_text(&row[3]).contains("not valid UTF-8"),
            "{:?}",
            row[3]
        );
        assert_eq!(sql_text(&row[4]), "text/xml");
        assert_eq!(sql_int(&row[5]), 1);
        let kept = sql_int(&row[1]);
        if sql_int(&row[2]) == 1 {
            assert_eq!(kept, 1024, "a truncated body keeps its first 1 KiB");
        } else {
            assert_eq!(kept, MIB as i64, "a body within the budget is kept whole");
        }
    }
    let whole: Vec<Vec<u8>> = relay
        .query("SELECT body FROM quarantine WHERE NOT truncated")
        .iter()
        .map(|row| sql_bytes(&row[0]).to_vec())
        .collect();
    assert_eq!(whole.len(), 2, "two 1 MiB bodies fit in 2 MiB");
    assert!(whole.iter().all(|body| bodies.contains(body)));
    let truncated = relay
        .query("SELECT body FROM quarantine WHERE truncated")
        .iter()
        .filter(|row| bodies.iter().any(|b| b[..1024] == *sql_bytes(&row[0])))
        .count();
    assert_eq!(truncated, 18, "the rest keep their prefix");
    assert_eq!(
        relay.metric("relay_quarantine_truncated_total").await,
        Some(18.0)
    );
    eventually(WAIT, "the quarantine gauges", || async {
        let bodies = relay.metric("relay_quarantine_bodies").await;
        let bytes = relay.metric("relay_quarantine_bytes").await;
        (bodies == Some(20.0) && bytes == Some(stored as f64)).then_some(())
    })
    .await;
    relay.shutdown().await;
}

/// Issue 13, item 9: bodies not seen again for `quarantine.retention` are
/// deleted by the store's janitor, and the gauges follow.
#[tokio::test]
async fn quarantined_bodies_past_their_retention_are_deleted() {
    let relay = start_relay("quarantine: {retention: 2s}\n").await;
    for body in ["<postback><origin>", "neither xml nor json"] {
        let (status, answer) = post(&relay.url, None, body).await;
        assert_eq!(status, 400, "{answer}");
    }
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM quarantine"), 2);
    relay
        .eventually_int(WAIT, "SELECT COUNT(*) FROM quarantine", 0)
        .await;
    eventually(WAIT, "the gauges read an empty quarantine", || async {
        let bodies = relay.metric("relay_quarantine_bodies").await;
        let bytes = relay.metric("relay_quarantine_bytes").await;
        (bodies == Some(0.0) && bytes == Some(0.0)).then_some(())
    })
    .await;
    // A body arriving after the janitor ran is kept again.
    let (status, _) = post(&relay.url, None, "<postback><origin>").await;
    assert_eq!(status, 400);
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM quarantine"), 1);
    relay.shutdown().await;
}

/// Issue 13, item 7: a 20 KB tag name (or JSON key) is not echoed: the 400
/// body, the log line and the quarantine's `error` quote a short excerpt.
#[tokio::test]
async fn parse_errors_quote_only_a_short_excerpt_of_the_body() {
    let store = TestStore::new();
    let config = store.write_config("");
    let relay = process::RelayProcess::spawn(&config).await;
    let name = "t".repeat(20 * 1024);
    let bodies = [
        format!("<postback><{name}>1</{name}x></postback>"),
        format!("<postback><origin>MMS_MO</origin><{name}>1</postback>"),
        format!("{{\"origin\":\"MMS_MO\",\"code\":\"N401\",\"{name}\":1,}}"),
        format!("{{\"origin\":\"MMS_MO\",\"{name}\":\"x\"}}"),
    ];
    let long = &name[..200];
    for body in &bodies {
        let (status, answer) = post(&relay.url, None, body.clone()).await;
        assert_eq!(status, 400, "{answer:.300}");
        let text = answer.to_string();
        assert!(
            text.len() < 1024,
            "a {} byte 400 body: {text:.300}",
            text.len()
        );
        assert!(
            !text.contains(long),
            "the 400 body echoes the name: {text:.300}"
        );
    }
    let expected = bodies.len();
    let lines = eventually(WAIT, "four quarantine log lines", || {
        let lines: Vec<String> = relay
            .lines()
            .into_iter()
            .filter(|line| line.contains("postback quarantined"))
            .collect();
        async move { (lines.len() == expected).then_some(lines) }
    })
    .await;
    for line in &lines {
        assert!(
            line.len() < 1024,
            "a {} byte log line: {line:.300}",
            line.len()
        );
        assert!(
            !line.contains(long),
            "the log line echoes the name: {line:.300}"
        );
    }
    let rows = store.query("SELECT error FROM quarantine");
    assert_eq!(rows.len(), bodies.len());
    for row in &rows {
        let error = sql_text(&row[0]);
        assert!(error.len() < 256 && !error.contains(long), "{error:.300}");
    }
    drop(relay);
}

#[tokio::test]
async fn a_malformed_body_is_quarantined_once_and_counted() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let body = "<postback><origin>MMS_MO</origin><code>N401</code><from>1408";
    let content_type = "text/xml; charset=utf-8";
    for _ in 0..2 {
        let (status, answer) = post(&relay.url, Some(content_type), body).await;
        assert_eq!(status, 400, "{answer}");
        assert_error_body(&answer, "invalid XML");
    }
    let rows = relay.query(
        "SELECT body_hash, body, content_type, error, seen_count, first_seen, last_seen FROM quarantine",
    );
    assert_eq!(rows.len(), 1, "one row per distinct body: {rows:?}");
    let row = &rows[0];
    assert_eq!(
        sql_text(&row[0]),
        hex::encode(Sha256::digest(body.as_bytes()))
    );
    assert_eq!(sql_bytes(&row[1]), body.as_bytes());
    assert_eq!(sql_text(&row[2]), content_type);
    assert!(sql_text(&row[3]).starts_with("invalid XML"), "{:?}", row[3]);
    assert_eq!(sql_int(&row[4]), 2);
    assert!(sql_int(&row[5]) <= sql_int(&row[6]));

    // Another malformed body, without a Content-Type: a second row.
    let (status, answer) = post(&relay.url, None, "{\"origin\": \"MMS_MO\"}").await;
    assert_eq!(status, 400, "{answer}");
    let rows = relay.query(&format!(
        "SELECT content_type, error, seen_count FROM quarantine WHERE body_hash = '{}'",
        hex::encode(Sha256::digest(b"{\"origin\": \"MMS_MO\"}"))
    ));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][0], Sql::Null);
    assert_eq!(sql_text(&rows[0][1]), "missing required field `code`");
    assert_eq!(sql_int(&rows[0][2]), 1);
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM quarantine"), 2);

    assert_eq!(count(&relay, "SELECT COUNT(*) FROM events"), 0);
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM jobs"), 0);
    tokio::time::sleep(QUIET).await;
    assert!(sink.received().is_empty(), "nothing is delivered");
    relay.shutdown().await;
}
