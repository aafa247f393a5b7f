//! `postback-relay quarantine list|replay`, run as the real binary beside a
//! running relay on the same store (SQLite here; PostgreSQL as the
//! `quarantine_postgres` test target).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use rusqlite::types::Value as Sql;
use sha2::Digest;

fn cli(relay: &TestRelay, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_postback-relay"))
        .arg("quarantine")
        .args(args)
        .arg("--config")
        .arg(relay.config_path())
        .output()
        .expect("run the CLI");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_bodies_are_listed_and_replayed_once_they_parse() {
    let sink = Sink::start().await;
    let relay = start_relay(&format!(
        "targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    ))
    .await;
    // Refused today, and still refused at replay.
    let (status, _) = post(&relay.url, Some("text/plain"), "this is not a postback").await;
    assert_eq!(status, 400);
    // A body an older parser refused (say, before wrappers were understood):
    // quarantined as such, parseable now.
    let fixable = mo_xml("REPLAYED-1", "all", "28444");
    let fixable_hash = hex::encode(sha2::Sha256::digest(fixable.as_bytes()));
    relay.execute(
        "INSERT INTO quarantine (body_hash, body, content_type, error, first_seen, last_seen, seen_count)
         VALUES (?1, ?2, 'text/xml', 'unknown wrapper element', 1700000000000, 1700000300000, 2)",
        vec![
            Sql::Text(fixable_hash.clone()),
            Sql::Blob(fixable.as_bytes().to_vec()),
        ],
    );

    let (ok, table, stderr) = cli(&relay, &["list"]);
    assert!(ok, "{stderr}");
    assert!(table.contains(&fixable_hash[..12]), "{table}");
    assert!(table.contains("unknown wrapper element"), "{table}");
    assert!(table.contains("neither XML nor JSON"), "{table}");
    assert!(table.contains("2 quarantined bodies"), "{table}");

    let (ok, json, stderr) = cli(&relay, &["list", "--json"]);
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let fixable_line = lines
        .iter()
        .find(|l| l["body_hash"] == fixable_hash.as_str())
        .unwrap();
    assert_eq!(fixable_line["seen_count"], 2);
    assert_eq!(fixable_line["body"], fixable.as_str());
    assert_eq!(fixable_line["first_seen"], "2023-11-14T22:13:20Z");

    let (ok, _, stderr) = cli(&relay, &["replay", "deadbeefdeadbeef"]);
    assert!(!ok, "an unknown hash must fail");
    assert!(stderr.contains("no quarantined body matches"), "{stderr}");

    let (ok, report, stderr) = cli(&relay, &["replay", "--all"]);
    assert!(ok, "{stderr}");
    assert!(report.contains("1 replayed, 1 still invalid"), "{report}");

    // The running relay delivers the replayed postback.
    let got = sink.wait_for("/inbox", 1, Duration::from_secs(10)).await;
    let envelope = got[0].json();
    assert_eq!(envelope["data"]["tracking_id"], "REPLAYED-1");
    assert_eq!(
        envelope["receivedtime"], "2023-11-14T22:13:20Z",
        "the first arrival is the receive time"
    );
    let left = relay.query("SELECT body_hash FROM quarantine");
    assert_eq!(left.len(), 1, "only the still-invalid body stays");

    // Replaying the same postback again (say Sinch sent it meanwhile) is a duplicate.
    relay.execute(
        "INSERT INTO quarantine (body_hash, body, content_type, error, first_seen, last_seen, seen_count)
         VALUES (?1, ?2, 'text/xml', 'old', 1700000000000, 1700000000000, 1)",
        vec![
            Sql::Text(fixable_hash.clone()),
            Sql::Blob(fixable.as_bytes().to_vec()),
        ],
    );
    let (ok, report, stderr) = cli(&relay, &["replay", &fixable_hash[..10]]);
    assert!(ok, "{stderr}");
    assert!(report.contains("duplicate of"), "{report}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        sink.received_on("/inbox").len(),
        1,
        "a duplicate is not delivered again"
    );
    relay.shutdown().await;
}
