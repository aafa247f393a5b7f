//! The admin API (docs/admin-api.md) end to end: real HTTP on the admin
//! listener of a running relay, real store (SQLite, or PostgreSQL with
//! `RELAY_TEST_BACKEND=postgres`).

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use postback_relay::config::Config;
use rusqlite::types::Value as Sql;
use serde_json::{json, Value};
use sha2::Digest;

const TOKEN: &str = "test-admin-token-0123456789";

/// The `admin:` section with a token file written into the store's directory.
fn admin_section(store: &TestStore) -> String {
    let path = store.path().join("admin-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    format!("admin:\n  token_file: {}\n", path.display())
}

/// Starts a relay with the admin API on and `rest` as the rest of its config.
async fn relay_with_api(rest: &str) -> TestRelay {
    let store = TestStore::new();
    let admin = admin_section(&store);
    start_relay_in(store, &format!("{admin}{rest}")).await
}

/// One API call: status and JSON answer.
async fn call(
    relay: &TestRelay,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut request = Request::builder()
        .method(method)
        .uri(format!("{}{path}", relay.admin));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let response = tokio::time::timeout(
        Duration::from_secs(15),
        client.request(request.body(Full::new(Bytes::from(body))).unwrap()),
    )
    .await
    .expect("answer within 15 s")
    .expect("request succeeds");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
    (status, json, challenge)
}

async fn api_get(relay: &TestRelay, path: &str) -> Value {
    let (status, json, _) = call(relay, "GET", path, Some(TOKEN), None).await;
    assert_eq!(status, 200, "GET {path}: {json}");
    json
}

async fn api_post(relay: &TestRelay, path: &str, body: Value) -> Value {
    let (status, json, _) = call(relay, "POST", path, Some(TOKEN), Some(body)).await;
    assert_eq!(status, 200, "POST {path}: {json}");
    json
}

fn target<'a>(targets: &'a Value, name: &str) -> &'a Value {
    targets["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no target {name} in {targets}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_off_without_a_token_and_refuses_a_wrong_one() {
    bounded(Duration::from_secs(60), "auth", async {
        let relay = start_relay("").await;
        let (status, json, _) = call(&relay, "GET", "/api/v1/targets", Some(TOKEN), None).await;
        assert_eq!(status, 404);
        assert!(
            json["error"].as_str().unwrap().contains("admin.token_file"),
            "{json}"
        );
        assert_eq!(get(&format!("{}/metrics", relay.admin)).await.0, 200);
        relay.shutdown().await;

        let relay = relay_with_api("").await;
        for token in [None, Some("wrong-token-wrong-token"), Some("")] {
            let (status, json, challenge) =
                call(&relay, "GET", "/api/v1/targets", token, None).await;
            assert_eq!(status, 401, "{token:?}: {json}");
            assert_eq!(challenge.as_deref(), Some("Bearer"));
        }
        let (status, _, _) = call(&relay, "GET", "/api/v1/targets", Some(TOKEN), None).await;
        assert_eq!(status, 200);
        // Health stays open to the orchestrator.
        assert_eq!(get(&format!("{}/readyz", relay.admin)).await.0, 200);
        let (status, json, _) =
            call(&relay, "DELETE", "/api/v1/dead-letters", Some(TOKEN), None).await;
        assert_eq!(status, 405, "{json}");
        let (status, _, _) = call(&relay, "GET", "/api/v1/nothing", Some(TOKEN), None).await;
        assert_eq!(status, 404);
        relay.shutdown().await;
    })
    .await;
}

/// The OpenAPI document is served behind the same token as the rest of the
/// API (docs/admin-api.md says why), and it is the generated one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_served_behind_the_token() {
    bounded(Duration::from_secs(60), "openapi", async {
        let relay = relay_with_api("").await;
        let (status, _, challenge) = call(&relay, "GET", "/api/v1/openapi.json", None, None).await;
        assert_eq!(status, 401);
        assert_eq!(challenge.as_deref(), Some("Bearer"));
        let served = api_get(&relay, "/api/v1/openapi.json").await;
        let generated: Value =
            serde_json::from_str(&postback_relay::admin::openapi::pretty()).unwrap();
        assert_eq!(served, generated);
        let (status, json, _) =
            call(&relay, "POST", "/api/v1/openapi.json", Some(TOKEN), None).await;
        assert_eq!(status, 405, "{json}");
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_target_queues_and_delivers_after_resume_even_across_a_restart() {
    bounded(Duration::from_secs(90), "pause", async {
        let sink = Sink::start().await;
        let rest = format!(
            "targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
            sink.url("/inbox")
        );
        let store = TestStore::new();
        let admin = admin_section(&store);
        let rest = format!("{admin}{rest}");
        let relay = start_relay_in(store, &rest).await;

        let paused = api_post(&relay, "/api/v1/targets/inbox/pause", json!({})).await;
        assert_eq!(paused, json!({"target": "inbox", "paused": true}));
        assert_eq!(
            relay.metric(r#"relay_target_paused{target="inbox"}"#).await,
            Some(1.0)
        );
        let (status, json, _) = call(
            &relay,
            "POST",
            "/api/v1/targets/nowhere/pause",
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 404, "{json}");

        for i in 0..3 {
            let (status, _) =
                post(&relay.url, None, mo_xml(&format!("P-{i}"), "hi", "28444")).await;
            assert_eq!(status, 200);
        }
        let queue = eventually(Duration::from_secs(5), "3 pending, paused", || async {
            let targets = api_get(&relay, "/api/v1/targets").await;
            let inbox = target(&targets, "inbox").clone();
            (inbox["pending"] == 3).then_some(inbox)
        })
        .await;
        assert_eq!(queue["paused"], true);
        assert_eq!(queue["configured"], true);
        assert_eq!(queue["due"], 3);
        assert!(queue["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(sink.received_count(), 0, "a paused target delivers nothing");

        // The pause is stored: a restart keeps it.
        let store = relay.shutdown().await;
        let relay = start_relay_in(store, &rest).await;
        let targets = api_get(&relay, "/api/v1/targets").await;
        assert_eq!(target(&targets, "inbox")["paused"], true);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(sink.received_count(), 0, "still paused after the restart");

        let resumed = api_post(&relay, "/api/v1/targets/inbox/resume", json!({})).await;
        assert_eq!(resumed["paused"], false);
        sink.wait_for("/inbox", 3, Duration::from_secs(10)).await;
        assert_eq!(
            relay.metric(r#"relay_target_paused{target="inbox"}"#).await,
            Some(0.0)
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_replayed_and_purged() {
    bounded(Duration::from_secs(90), "dead letters", async {
        let sink = Sink::start().await;
        // The first three attempts are rejected (dead at once), then 200.
        sink.respond(|n, _| Reply::status(if n < 3 { 422 } else { 200 }));
        let relay = relay_with_api(&format!(
            "targets:\n  crm: {{url: \"{}\"}}\nroutes:\n  - match: {{keyword: hi}}\n    targets: [crm]\n",
            sink.url("/crm")
        ))
        .await;
        for i in 0..3 {
            let (status, _) = post(&relay.url, None, mo_xml(&format!("D-{i}"), "hi", "28444")).await;
            assert_eq!(status, 200);
        }
        // One that matches no route.
        let (status, _) = post(&relay.url, None, mo_xml("D-NR", "other", "28444")).await;
        assert_eq!(status, 200);
        eventually(Duration::from_secs(10), "3 dead letters for crm", || async {
            let list = api_get(&relay, "/api/v1/dead-letters?target=crm").await;
            (list["dead_letters"].as_array().unwrap().len() == 3).then_some(())
        })
        .await;

        // Pages, filters.
        let page = api_get(&relay, "/api/v1/dead-letters?limit=2").await;
        let items = page["dead_letters"].as_array().unwrap();
        assert_eq!(items.len(), 2);
        let next = page["next"].as_str().expect("a next cursor").to_owned();
        let rest = api_get(&relay, &format!("/api/v1/dead-letters?limit=2&after={next}")).await;
        assert_eq!(rest["dead_letters"].as_array().unwrap().len(), 2);
        assert_eq!(rest["next"], Value::Null, "4 letters: no third page");
        let no_route = api_get(&relay, "/api/v1/dead-letters?reason=no%20route").await;
        let no_route = no_route["dead_letters"].as_array().unwrap();
        let targets = api_get(&relay, "/api/v1/targets").await;
        assert_eq!(target(&targets, "(no route)")["paused"], Value::Null);
        assert_eq!(target(&targets, "(no route)")["configured"], false);
        assert_eq!(no_route.len(), 1);
        assert_eq!(no_route[0]["target"], "(no route)");
        let rejected = api_get(&relay, "/api/v1/dead-letters?target=crm&reason=rejected%20by%20target&since=2020-01-01T00:00:00Z").await;
        let rejected = rejected["dead_letters"].as_array().unwrap().clone();
        assert_eq!(rejected.len(), 3);
        assert_eq!(rejected[0]["last_status"], 422);
        assert_eq!(rejected[0]["attempts"], 1);
        let future = api_get(&relay, "/api/v1/dead-letters?since=4102444800000").await;
        assert!(future["dead_letters"].as_array().unwrap().is_empty());
        let (status, json, _) =
            call(&relay, "GET", "/api/v1/dead-letters?since=yesterday", Some(TOKEN), None).await;
        assert_eq!(status, 400);
        assert!(json["error"].as_str().unwrap().contains("`since`"), "{json}");
        let (status, _, _) =
            call(&relay, "GET", "/api/v1/dead-letters?limit=0", Some(TOKEN), None).await;
        assert_eq!(status, 400);

        // Show one: the envelope and the body Sinch sent.
        let first_id = rejected[0]["id"].as_i64().unwrap();
        let shown = api_get(&relay, &format!("/api/v1/dead-letters/{first_id}")).await;
        let tracking = shown["envelope"]["data"]["tracking_id"].as_str().unwrap().to_owned();
        assert!(tracking.starts_with("D-"), "{shown}");
        assert!(shown["raw_body"].as_str().unwrap().contains(&tracking));
        let (status, _, _) =
            call(&relay, "GET", "/api/v1/dead-letters/999999", Some(TOKEN), None).await;
        assert_eq!(status, 404);

        // Nothing chosen is refused, so nothing is replayed or purged by accident.
        for body in [json!({}), json!({"ids": [1], "all": true}), json!({"bogus": 1})] {
            let (status, json, _) =
                call(&relay, "POST", "/api/v1/dead-letters/purge", Some(TOKEN), Some(body.clone())).await;
            assert_eq!(status, 400, "{body}: {json}");
        }

        // An id that is no dead letter is reported, not silently ignored.
        let typo = api_post(&relay, "/api/v1/dead-letters/replay", json!({"ids": [999999]})).await;
        assert_eq!(typo["replayed"], 0);
        assert_eq!(typo["not_found"], json!([999999]));

        // Replay one by id, then the rest by filter: fresh attempts, delivered.
        let one = api_post(&relay, "/api/v1/dead-letters/replay", json!({"ids": [first_id]})).await;
        assert_eq!(one["replayed"], 1);
        let got = sink.wait_for("/crm", 4, Duration::from_secs(10)).await;
        assert_eq!(got[3].json()["data"]["tracking_id"], tracking.as_str());
        let rest = api_post(
            &relay,
            "/api/v1/dead-letters/replay",
            json!({"target": "crm", "reason": "rejected by target"}),
        )
        .await;
        assert_eq!(rest["replayed"], 2);
        sink.wait_for("/crm", 6, Duration::from_secs(10)).await;

        // The unrouted one stays unrouted until the routes change.
        let skipped = api_post(&relay, "/api/v1/dead-letters/replay", json!({"all": true})).await;
        assert_eq!(skipped["replayed"], 0);
        assert_eq!(skipped["skipped"], 1);
        assert!(skipped["skipped_examples"][0]["reason"].as_str().unwrap().contains("no route"));
        let path = relay.store.path().join("v2.yaml");
        let admin = admin_section(&relay.store);
        std::fs::write(
            &path,
            relay.store.config_yaml(&format!(
                "{admin}targets:\n  crm: {{url: \"{}\"}}\nroutes:\n  - targets: [crm]\n",
                sink.url("/crm")
            )),
        )
        .unwrap();
        relay
            .handle
            .as_ref()
            .unwrap()
            .reload_config(&Config::load(&path).unwrap())
            .unwrap();
        let routed = api_post(&relay, "/api/v1/dead-letters/replay", json!({"reason": "no route"})).await;
        assert_eq!(routed["replayed"], 1, "{routed}");
        let got = sink.wait_for("/crm", 7, Duration::from_secs(10)).await;
        assert_eq!(got[6].json()["data"]["tracking_id"], "D-NR");
        let empty = api_get(&relay, "/api/v1/dead-letters").await;
        assert!(empty["dead_letters"].as_array().unwrap().is_empty(), "{empty}");

        // Purge: new dead letters, then all of them.
        sink.respond(|_, _| Reply::status(410));
        for i in 0..2 {
            let (status, _) = post(&relay.url, None, mo_xml(&format!("G-{i}"), "hi", "28444")).await;
            assert_eq!(status, 200);
        }
        eventually(Duration::from_secs(10), "2 new dead letters", || async {
            let list = api_get(&relay, "/api/v1/dead-letters").await;
            (list["dead_letters"].as_array().unwrap().len() == 2).then_some(())
        })
        .await;
        // Replaying letters the target rejects again: each is taken once (the
        // walk stops at the newest letter it began with), and they come back.
        let before = sink.received_count();
        let again = api_post(&relay, "/api/v1/dead-letters/replay", json!({"all": true})).await;
        assert_eq!(again["replayed"], 2, "{again}");
        eventually(Duration::from_secs(10), "rejected again", || async {
            let list = api_get(&relay, "/api/v1/dead-letters?reason=rejected%20by%20target").await;
            (list["dead_letters"].as_array().unwrap().len() == 2).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sink.received_count(), before + 2, "one new attempt each");
        let purged = api_post(&relay, "/api/v1/dead-letters/purge", json!({"all": true})).await;
        assert_eq!(purged["purged"], 2);
        assert_eq!(relay.store.query_int("SELECT COUNT(*) FROM dead_letters"), 0);
        assert_eq!(
            relay.store.query_int("SELECT COUNT(*) FROM events"),
            0,
            "the bodies go with the last dead letter"
        );
        relay.shutdown().await;
    })
    .await;
}

/// Issue 13, item 9: beyond `quarantine.max_bytes` a body keeps only its
/// prefix; the API says so, and a replay refuses it with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_quarantined_body_is_shown_as_such_and_not_replayed() {
    bounded(Duration::from_secs(60), "truncated quarantine", async {
        let relay = relay_with_api("quarantine: {max_bytes: 4096}\n").await;
        let small = "not a postback, and short";
        let large = format!("<postback><origin>{}", "x".repeat(10_000));
        for body in [small.to_owned(), large.clone()] {
            let (status, _) = post(&relay.url, Some("text/xml"), body).await;
            assert_eq!(status, 400);
        }
        let large_hash = hex::encode(sha2::Sha256::digest(large.as_bytes()));
        let small_hash = hex::encode(sha2::Sha256::digest(small.as_bytes()));
        let list = api_get(&relay, "/api/v1/quarantine").await;
        let item = |hash: &str| {
            list["quarantine"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["body_hash"] == hash)
                .cloned()
                .unwrap_or_else(|| panic!("{hash} not in {list}"))
        };
        assert_eq!(item(&large_hash)["truncated"], true, "{list}");
        assert_eq!(
            item(&large_hash)["size"],
            large.len(),
            "the size as received"
        );
        assert_eq!(item(&small_hash)["truncated"], false, "{list}");
        let shown = api_get(&relay, &format!("/api/v1/quarantine/{large_hash}")).await;
        assert_eq!(shown["body"], &large[..1024], "the first 1 KiB is kept");

        let report = api_post(
            &relay,
            "/api/v1/quarantine/replay",
            json!({"hashes": [large_hash]}),
        )
        .await;
        assert_eq!(report["truncated"], 1, "{report}");
        assert_eq!(report["accepted"], 0, "{report}");
        assert_eq!(report["results"][0]["outcome"], "truncated", "{report}");
        let error = report["results"][0]["error"].as_str().unwrap();
        assert!(
            error.contains("quarantine.max_bytes") && error.contains("cannot be replayed"),
            "{error}"
        );
        let still = api_get(&relay, &format!("/api/v1/quarantine/{large_hash}")).await;
        assert_eq!(still["truncated"], true, "it stays in the quarantine");
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_bodies_are_listed_shown_replayed_and_purged() {
    bounded(Duration::from_secs(60), "quarantine", async {
        let sink = Sink::start().await;
        let relay = relay_with_api(&format!(
            "targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
            sink.url("/inbox")
        ))
        .await;
        // Refused today, and still refused at replay.
        let (status, _) = post(&relay.url, Some("text/plain"), "this is not a postback").await;
        assert_eq!(status, 400);
        // A body an older parser refused: quarantined as such, parseable now.
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

        let list = api_get(&relay, "/api/v1/quarantine").await;
        let items = list["quarantine"].as_array().unwrap();
        assert_eq!(items.len(), 2, "{list}");
        assert_eq!(items[0]["body_hash"], fixable_hash.as_str(), "oldest first");
        assert_eq!(items[0]["seen_count"], 2);
        assert_eq!(items[0]["first_seen"], "2023-11-14T22:13:20.000Z");
        assert!(items[1]["error"].as_str().unwrap().contains("neither XML nor JSON"));
        let page = api_get(&relay, "/api/v1/quarantine?limit=1").await;
        let next = page["next"].as_str().unwrap().to_owned();
        let second = api_get(&relay, &format!("/api/v1/quarantine?limit=1&after={next}")).await;
        assert_eq!(second["quarantine"][0]["body_hash"], items[1]["body_hash"]);
        let recent = api_get(&relay, "/api/v1/quarantine?since=2024-01-01T00:00:00Z").await;
        assert_eq!(recent["quarantine"].as_array().unwrap().len(), 1);

        let shown = api_get(&relay, &format!("/api/v1/quarantine/{fixable_hash}")).await;
        assert_eq!(shown["body"], fixable.as_str());
        let (status, _, _) =
            call(&relay, "GET", "/api/v1/quarantine/deadbeef", Some(TOKEN), None).await;
        assert_eq!(status, 404);

        let report = api_post(&relay, "/api/v1/quarantine/replay", json!({"all": true})).await;
        assert_eq!(report["accepted"], 1, "{report}");
        assert_eq!(report["still_invalid"], 1, "{report}");
        let got = sink.wait_for("/inbox", 1, Duration::from_secs(10)).await;
        let envelope = got[0].json();
        assert_eq!(envelope["data"]["tracking_id"], "REPLAYED-1");
        assert_eq!(
            envelope["receivedtime"], "2023-11-14T22:13:20Z",
            "the first arrival is the receive time"
        );

        // The same postback again (Sinch sent it meanwhile): a duplicate.
        relay.execute(
            "INSERT INTO quarantine (body_hash, body, content_type, error, first_seen, last_seen, seen_count)
             VALUES (?1, ?2, 'text/xml', 'old', 1700000000000, 1700000000000, 1)",
            vec![
                Sql::Text(fixable_hash.clone()),
                Sql::Blob(fixable.as_bytes().to_vec()),
            ],
        );
        let again = api_post(
            &relay,
            "/api/v1/quarantine/replay",
            json!({"hashes": [fixable_hash]}),
        )
        .await;
        assert_eq!(again["duplicate"], 1, "{again}");
        assert_eq!(again["results"][0]["outcome"], "duplicate");

        let purged = api_post(&relay, "/api/v1/quarantine/purge", json!({"until": now_rfc3339()})).await;
        assert_eq!(purged["purged"], 1);
        let list = api_get(&relay, "/api/v1/quarantine").await;
        assert!(list["quarantine"].as_array().unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sink.received_on("/inbox").len(), 1, "a duplicate is not delivered again");
        relay.shutdown().await;
    })
    .await;
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_target_keeps_its_jobs_as_dead_letters_to_replay_when_it_returns() {
    bounded(Duration::from_secs(90), "removed target", async {
        let sink = Sink::start().await;
        let both = format!(
            "targets:\n  old: {{url: \"{}\"}}\n  new: {{url: \"{}\"}}\nroutes:\n  - targets: [old, new]\n",
            sink.url("/old"),
            sink.url("/new")
        );
        let store = TestStore::new();
        let admin = admin_section(&store);
        let relay = start_relay_in(store, &format!("{admin}{both}")).await;
        let handle = relay.handle.as_ref().unwrap();
        api_post(&relay, "/api/v1/targets/old/pause", json!({})).await;
        for i in 0..2 {
            let (status, _) = post(&relay.url, None, mo_xml(&format!("RM-{i}"), "hi", "28444")).await;
            assert_eq!(status, 200);
        }
        sink.wait_for("/new", 2, Duration::from_secs(10)).await;

        let reload = |name: &str, rest: String| {
            let path = relay.store.path().join(name);
            std::fs::write(&path, relay.store.config_yaml(&format!("{admin}{rest}"))).unwrap();
            Config::load(&path).unwrap()
        };
        let without_old = reload(
            "v2.yaml",
            format!(
                "targets:\n  new: {{url: \"{}\"}}\nroutes:\n  - targets: [new]\n",
                sink.url("/new")
            ),
        );
        assert_eq!(handle.reload_config(&without_old), Ok(vec![]));
        eventually(Duration::from_secs(10), "old's jobs dead-lettered", || async {
            let list = api_get(&relay, "/api/v1/dead-letters?target=old&reason=target%20removed").await;
            (list["dead_letters"].as_array().unwrap().len() == 2).then_some(())
        })
        .await;
        assert_eq!(relay.store.query_int("SELECT COUNT(*) FROM jobs"), 0);
        let targets = api_get(&relay, "/api/v1/targets").await;
        assert_eq!(target(&targets, "old")["configured"], false);
        assert_eq!(target(&targets, "old")["dead"], 2);
        let skipped = api_post(&relay, "/api/v1/dead-letters/replay", json!({"target": "old"})).await;
        assert_eq!(skipped["skipped"], 2, "not configured: {skipped}");

        // Back: still paused (a pause holds until resumed), then resumed,
        // replayed and delivered.
        assert_eq!(handle.reload_config(&reload("v3.yaml", both.clone())), Ok(vec![]));
        let targets = api_get(&relay, "/api/v1/targets").await;
        assert_eq!(target(&targets, "old")["paused"], true);
        api_post(&relay, "/api/v1/targets/old/resume", json!({})).await;
        let replayed = api_post(&relay, "/api/v1/dead-letters/replay", json!({"target": "old"})).await;
        assert_eq!(replayed["replayed"], 2, "{replayed}");
        let got = sink.wait_for("/old", 2, Duration::from_secs(10)).await;
        let mut ids: Vec<String> = got
            .iter()
            .map(|r| r.json()["data"]["tracking_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        assert_eq!(ids, ["RM-0", "RM-1"]);
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_in_flight_finishes_when_its_target_is_removed() {
    bounded(
        Duration::from_secs(60),
        "in-flight delivery across a reload",
        async {
            let sink = Sink::start().await;
            sink.respond(|_, _| Reply {
                delay: Duration::from_millis(1500),
                ..Reply::status(200)
            });
            let store = TestStore::new();
            let admin = admin_section(&store);
            let relay = start_relay_in(
                store,
                &format!(
                    "{admin}targets:\n  slow: {{url: \"{}\"}}\nroutes:\n  - targets: [slow]\n",
                    sink.url("/slow")
                ),
            )
            .await;
            let (status, _) = post(&relay.url, None, mo_xml("FLIGHT-1", "hi", "28444")).await;
            assert_eq!(status, 200);
            // The attempt has reached the target and waits for its answer.
            sink.wait_for("/slow", 1, Duration::from_secs(10)).await;
            let reload = |name: &str, rest: String| {
                let path = relay.store.path().join(name);
                std::fs::write(&path, relay.store.config_yaml(&format!("{admin}{rest}"))).unwrap();
                relay
                    .handle
                    .as_ref()
                    .unwrap()
                    .reload_config(&Config::load(&path).unwrap())
            };
            // Changed (a new dispatcher; the old one keeps its attempt), then
            // removed while that attempt still runs.
            let changed = format!(
                "targets:\n  slow: {{url: \"{}\", timeout: 20s}}\nroutes:\n  - targets: [slow]\n",
                sink.url("/slow")
            );
            assert_eq!(reload("v2.yaml", changed), Ok(vec![]));
            assert_eq!(
                reload("v3.yaml", "targets: {}\nroutes: []\n".into()),
                Ok(vec![])
            );
            // The attempt finishes with its answer: delivered, not dead-lettered.
            eventually(Duration::from_secs(10), "the job finished", || async {
                (relay.store.query_int("SELECT COUNT(*) FROM jobs") == 0).then_some(())
            })
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                relay.store.query_int("SELECT COUNT(*) FROM dead_letters"),
                0
            );
            assert_eq!(
                relay
                    .metric(r#"relay_deliveries_total{outcome="delivered",target="slow"}"#)
                    .await,
                Some(1.0)
            );
            assert_eq!(sink.received_count(), 1, "attempted once");
            relay.shutdown().await;
        },
    )
    .await;
}
