//! `postback-relay route`: the dry-run operators use to test routing rules
//! before deploying them. Runs the real binary; nothing is stored.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::common::*;

const ROUTES: &str = "targets:
  optout: {url: \"http://127.0.0.1:9/optout\"}
  inbox: {url: \"http://127.0.0.1:9/inbox\"}
  archive: {kind: file, path: archive.jsonl}
routes:
  - name: opt-outs
    match: {keyword: [STOP, END]}
    targets: [optout]
  - name: campaign
    match: {to: \"28444\"}
    targets: [inbox]
    continue: true
  - name: everything
    match: {origin: MMS_MO}
    targets: [archive]
";

fn dry_run(dir: &std::path::Path, body: &str, args: &[&str]) -> (i32, String) {
    let config = dir.join("relay.yaml");
    std::fs::write(&config, config_yaml(dir, ROUTES)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_postback-relay"))
        .args(["route", "--config"])
        .arg(&config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the CLI");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn the_dry_run_prints_the_envelope_the_routes_and_the_targets() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = dry_run(dir.path(), SEED_XML, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("\"type\": \"com.sinch.mms.mo\""), "{text}");
    assert!(
        text.contains("routes matched: campaign, everything"),
        "{text}"
    );
    assert!(text.contains("delivered to:   inbox, archive"), "{text}");

    let (code, json) = dry_run(dir.path(), &mo_xml("T1", "stop", "28444"), &["--json"]);
    assert_eq!(code, 0, "{json}");
    let report: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(report["routes"], serde_json::json!(["opt-outs"]));
    assert_eq!(report["targets"], serde_json::json!(["optout"]));
    assert_eq!(report["envelope"]["data"]["tracking_id"], "T1");

    let receipt = r#"{"origin":"MMS_MT","code":"N102","to":"99999"}"#;
    let (code, text) = dry_run(dir.path(), receipt, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("no route matches"), "{text}");

    let (code, text) = dry_run(dir.path(), "hello", &["--content-type", "text/plain"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("neither XML nor JSON") && text.contains("400"),
        "{text}"
    );
    // A dry run stores nothing.
    assert!(!dir.path().join("relay.db").exists());
}
