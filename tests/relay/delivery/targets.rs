//! What each kind of target receives: signed requests with custom headers,
//! the original bytes for raw targets, and whole lines for file targets.

use crate::common::*;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::{accept, eventually_int, DELIVERY, SECRET, WAIT};

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
