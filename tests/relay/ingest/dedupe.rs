//! Deduplication: a retried or concurrent copy of a postback is acknowledged
//! and delivered once, by tracking id or, without one, by body hash.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::*;

use super::{archive_to, count, delivered, mo_json, QUIET, WAIT};

// ---------------------------------------------------------------------------
// 4. Dedupe
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_retried_postback_is_acknowledged_but_delivered_once() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let (status, first) = post(&relay.url, Some("text/xml"), SEED_XML).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "accepted");
    let original_id = first["id"].as_str().unwrap().to_owned();
    delivered(&sink, &original_id).await;

    let (status, second) = post(&relay.url, Some("text/xml"), SEED_XML).await;
    assert_eq!(status, 200, "a duplicate is still a success for Sinch");
    assert_eq!(second, json!({"status": "duplicate", "id": original_id}));

    // Same origin, code and tracking id with other bytes (a re-serialised retry).
    let reformatted = SEED_XML.replace("\n    ", "");
    let (status, third) = post(&relay.url, None, reformatted).await;
    assert_eq!(status, 200);
    assert_eq!(third, json!({"status": "duplicate", "id": original_id}));

    tokio::time::sleep(QUIET).await;
    assert_eq!(
        sink.received_on("/inbox").len(),
        1,
        "a duplicate must not be delivered again"
    );
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM dedupe"), 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn concurrent_copies_of_one_postback_are_accepted_once() {
    // A retry can overlap the first attempt (Sinch stops waiting after 10 s).
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let body = mo_xml("CONCURRENT_1", "k", "28444");
    let answers = join_all(
        (0..8)
            .map(|_| {
                let url = relay.url.clone();
                let body = body.clone();
                tokio::spawn(async move { post(&url, Some("text/xml"), body).await })
            })
            .collect(),
    )
    .await;
    let accepted: Vec<&Value> = answers
        .iter()
        .filter(|(_, a)| a["status"] == "accepted")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(accepted.len(), 1, "{answers:?}");
    let id = &accepted[0]["id"];
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(&answer["id"], id, "every copy names the one id: {answer}");
    }
    delivered(&sink, id.as_str().unwrap()).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(sink.received_on("/inbox").len(), 1);
    relay.shutdown().await;
}

/// Awaits spawned tasks in order.
async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("task did not panic"));
    }
    out
}

#[tokio::test]
async fn without_a_tracking_id_identical_bodies_dedupe_by_hash() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let body = r#"{"origin":"MMS_MT","code":"E101","mms-id":"555"}"#;
    let (status, first) = post(&relay.url, Some("application/json"), body).await;
    assert_eq!((status, &first["status"]), (200, &json!("accepted")));
    let (status, again) = post(&relay.url, Some("application/json"), body).await;
    assert_eq!(status, 200);
    assert_eq!(again, json!({"status": "duplicate", "id": first["id"]}));

    // Different bodies are different postbacks, even when they mean the same.
    let other_id = r#"{"origin":"MMS_MT","code":"E101","mms-id":"556"}"#;
    let other_spacing = r#"{"origin": "MMS_MT", "code": "E101", "mms-id": "555"}"#;
    let mut ids = vec![first["id"].clone()];
    for other in [other_id, other_spacing] {
        let (status, answer) = post(&relay.url, Some("application/json"), other).await;
        assert_eq!(status, 200);
        assert_eq!(answer["status"], "accepted", "{other}");
        ids.push(answer["id"].clone());
    }
    for id in &ids {
        delivered(&sink, id.as_str().unwrap()).await;
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(sink.received_on("/inbox").len(), 3);
    relay.shutdown().await;
}

#[tokio::test]
async fn n101_and_n102_are_not_duplicates_but_their_retries_are() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let receipt = |code: &str| {
        format!(
            "<postback><origin>MMS_MT</origin><code>{code}</code><tracking-id>MT_DUP_1</tracking-id></postback>"
        )
    };
    let (_, n101) = post(&relay.url, Some("text/xml"), receipt("N101")).await;
    let (_, n102) = post(&relay.url, Some("text/xml"), receipt("N102")).await;
    assert_eq!(n101["status"], "accepted", "{n101}");
    assert_eq!(n102["status"], "accepted", "{n102}");
    assert_ne!(n101["id"], n102["id"]);
    let (_, n102_again) = post(&relay.url, Some("text/xml"), receipt("N102")).await;
    assert_eq!(n102_again, json!({"status": "duplicate", "id": n102["id"]}));
    let (_, n101_again) = post(&relay.url, Some("text/xml"), receipt("N101")).await;
    assert_eq!(n101_again, json!({"status": "duplicate", "id": n101["id"]}));

    let first = delivered(&sink, n101["id"].as_str().unwrap()).await;
    let second = delivered(&sink, n102["id"].as_str().unwrap()).await;
    assert_eq!(first["data"]["code"], "N101");
    assert_eq!(second["data"]["code"], "N102");
    tokio::time::sleep(QUIET).await;
    assert_eq!(sink.received_on("/inbox").len(), 2);
    relay.shutdown().await;
}

/// A tracking id of `len` hex digits that does not compress (PostgreSQL
/// compresses a long repetitive value until it fits in an index entry).
fn incompressible_id(len: usize) -> String {
    let mut id = String::with_capacity(len + 64);
    let mut n = 0u32;
    while id.len() < len {
        id.push_str(&hex::encode(Sha256::digest(n.to_be_bytes())));
        n += 1;
    }
    id.truncate(len);
    id
}

#[tokio::test]
async fn a_very_long_tracking_id_is_kept_as_a_digest_and_deduplicated() {
    // 8,000 characters: more than a PostgreSQL btree entry may hold, so the
    // key is stored as its digest (on both backends alike).
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let tracking_id = incompressible_id(8000);
    let body = mo_json(&tracking_id);
    let (status, first) = post(&relay.url, Some("application/json"), body.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "accepted", "{first}");
    let envelope = delivered(&sink, first["id"].as_str().unwrap()).await;
    assert_eq!(
        envelope["data"]["tracking_id"].as_str(),
        Some(tracking_id.as_str()),
        "the envelope keeps the whole tracking id"
    );
    let (status, again) = post(&relay.url, Some("application/json"), body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, json!({"status": "duplicate", "id": first["id"]}));

    let key = format!(
        "sha256:{}",
        hex::encode(Sha256::digest(format!("MMS_MO|N401|{tracking_id}")))
    );
    relay
        .eventually_int(
            WAIT,
            &format!("SELECT COUNT(*) FROM dedupe WHERE key = '{key}'"),
            1,
        )
        .await;
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM dedupe"), 1);
    tokio::time::sleep(QUIET).await;
    assert_eq!(sink.received_on("/inbox").len(), 1, "delivered once");
    relay.shutdown().await;
}
