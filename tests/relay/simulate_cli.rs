//! `postback-relay simulate` against a real relay: the tool operators use to
//! prove a deployment end to end before going live.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn simulate(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_postback-relay"))
        .arg("simulate")
        .args(args)
        .output()
        .expect("run the CLI");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_postbacks_are_accepted_and_delivered() {
    let sink = Sink::start().await;
    let relay = start_relay(&format!(
        "targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    ))
    .await;
    let url = relay.url.clone();
    let (code, report) =
        tokio::task::spawn_blocking(move || simulate(&["--url", &url, "--count", "10"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains("10 accepted, 0 retries, 0 given up"),
        "{report}"
    );
    assert!(report.contains("answer time: p50"), "{report}");
    // Every sample is a distinct postback: all ten are delivered, of every kind.
    let got = sink.wait_for("/inbox", 10, Duration::from_secs(10)).await;
    let mut codes: Vec<String> = got
        .iter()
        .map(|r| r.json()["data"]["code"].as_str().unwrap().to_owned())
        .collect();
    codes.sort();
    codes.dedup();
    assert_eq!(codes, ["E101", "N101", "N102", "N401"]);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_like_sinch_then_given_up() {
    // A relay that refuses everyone: 403 on every attempt (loopback plays a
    // trusted proxy, so the refusal is an answer, not a close at accept).
    let relay =
        start_relay("ingest:\n  allow: [203.0.113.0/24]\n  trusted_proxies: [127.0.0.0/8]\n").await;
    let url = relay.url.clone();
    let (code, report) = tokio::task::spawn_blocking(move || {
        simulate(&[
            "--url",
            &url,
            "--count",
            "3",
            "--retries",
            "2",
            "--retry-interval",
            "50ms",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("0 accepted, 6 retries, 3 given up"),
        "{report}"
    );
    assert!(report.contains("failure: HTTP 403"), "{report}");
    assert!(report.contains("(9 requests)"), "{report}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_sent_as_given() {
    let sink = Sink::start().await;
    let relay = start_relay(&format!(
        "targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.xml"), SEED_XML).unwrap();
    std::fs::write(dir.path().join("b.json"), SEED_JSON).unwrap();
    let (url, files) = (relay.url.clone(), dir.path().to_str().unwrap().to_owned());
    let (code, report) = tokio::task::spawn_blocking(move || {
        simulate(&["--url", &url, "--count", "2", "--files", &files])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{report}");
    let got = sink.wait_for("/inbox", 2, Duration::from_secs(10)).await;
    let mut tracking: Vec<String> = got
        .iter()
        .map(|r| r.json()["data"]["tracking_id"].as_str().unwrap().to_owned())
        .collect();
    tracking.sort();
    assert_eq!(tracking, ["MMS_MO_iLnCRrL6", "MMS_MO_json0001"]);
    relay.shutdown().await;

    // Nothing listens on port 9: one attempt, given up, the error named.
    let (code, report) = simulate(&[
        "--url",
        "http://127.0.0.1:9/sinch/postback",
        "--count",
        "1",
        "--retries",
        "0",
        "--timeout",
        "2s",
    ]);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("0 accepted, 0 retries, 1 given up"),
        "{report}"
    );
    assert!(report.contains("failure:"), "{report}");
}
