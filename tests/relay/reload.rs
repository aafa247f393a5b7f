//! Config reload: targets, routes and access rules change while the relay
//! runs; a config that cannot be applied is refused and the running one stays.

use std::time::Duration;

use crate::common::*;
use postback_relay::config::Config;
use tokio::io::AsyncReadExt;

const TARGETS: &str = "targets:\n  a: {url: \"URL_A\"}\n  b: {url: \"URL_B\"}\n";

fn load(relay: &TestRelay, name: &str, rest: &str) -> Config {
    let path = relay.store.path().join(name);
    std::fs::write(&path, relay.store.config_yaml(rest)).unwrap();
    Config::load(&path).expect("valid config")
}

#[tokio::test]
async fn routes_and_the_allowlist_change_without_a_restart() {
    let sink = Sink::start().await;
    let targets = TARGETS
        .replace("URL_A", &sink.url("/a"))
        .replace("URL_B", &sink.url("/b"));
    let relay = start_relay(&format!(
        "{targets}routes:\n  - match: {{keyword: stop}}\n    targets: [a]\n"
    ))
    .await;
    let handle = relay.handle.as_ref().unwrap();

    // Before: "hello" matches no route.
    let (status, _) = post(&relay.url, None, mo_xml("R-1", "hello", "28444")).await;
    assert_eq!(status, 200);

    // Everything to b from now on.
    let new = load(
        &relay,
        "v2.yaml",
        &format!("{targets}routes:\n  - targets: [b]\n"),
    );
    assert_eq!(handle.reload_config(&new), Ok(vec![]));
    let (status, _) = post(&relay.url, None, mo_xml("R-2", "hello", "28444")).await;
    assert_eq!(status, 200);
    let got = sink.wait_for("/b", 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].json()["data"]["tracking_id"], "R-2");
    assert!(sink.received_on("/a").is_empty());

    // A new target starts with the reload and gets what its route sends.
    let with_c = load(
        &relay,
        "v3.yaml",
        &format!(
            "{targets}  c: {{url: \"{}\"}}\nroutes:\n  - targets: [c]\n",
            sink.url("/c")
        ),
    );
    assert_eq!(handle.reload_config(&with_c), Ok(vec![]));
    let (status, _) = post(&relay.url, None, mo_xml("R-3", "hello", "28444")).await;
    assert_eq!(status, 200);
    let got = sink.wait_for("/c", 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].json()["data"]["tracking_id"], "R-3");

    // A config whose admin token file is missing is refused: c stays.
    let broken = load(
        &relay,
        "v3b.yaml",
        &format!(
            "{targets}  c: {{url: \"{}\"}}\nroutes:\n  - targets: [c]\n",
            sink.url("/c")
        ),
    );
    std::fs::write(relay.store.path().join("token"), "short").unwrap();
    let mut broken = broken;
    broken.admin.token_file = Some(relay.store.path().join("token"));
    let err = handle.reload_config(&broken).unwrap_err();
    assert!(err.contains("admin.token_file"), "{err}");
    let (status, _) = post(&relay.url, None, mo_xml("R-3b", "hello", "28444")).await;
    assert_eq!(status, 200);
    sink.wait_for("/c", 2, Duration::from_secs(10)).await;

    // The allowlist applies to the next connection; other changes are reported.
    let locked = load(
        &relay,
        "v4.yaml",
        &format!(
            "{targets}routes:\n  - targets: [b]\ningest:\n  allow: [203.0.113.0/24]\n  max_body_bytes: 4096\ndelivery:\n  timeout: 3s\n"
        ),
    );
    // (c left the config: its dispatcher drains; it had nothing queued.)
    assert_eq!(
        handle.reload_config(&locked),
        Ok(vec!["ingest (limits and timeouts)"])
    );
    // 127.0.0.1 is no longer allowed: closed at accept, unanswered.
    let mut refused = tokio::net::TcpStream::connect(handle.ingest_addr)
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), refused.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert_eq!(
        relay
            .metric(r#"relay_connections_refused_total{listener="ingest",reason="not_allowed"}"#)
            .await,
        Some(1.0)
    );

    assert_eq!(
        relay
            .metric(r#"relay_config_reloads_total{result="applied"}"#)
            .await,
        Some(3.0)
    );
    assert_eq!(
        relay
            .metric(r#"relay_config_reloads_total{result="refused"}"#)
            .await,
        Some(1.0)
    );
    relay.shutdown().await;
}
