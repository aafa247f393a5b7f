//! The public endpoint over real HTTP: what Sinch sees. Runs on SQLite,
//! and on PostgreSQL with `RELAY_TEST_BACKEND=postgres`.

use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rusqlite::types::Value as Sql;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Upper bound of every wait for something that should happen.
const WAIT: Duration = Duration::from_secs(10);
/// How long to keep watching for something that must not happen (a second delivery).
const QUIET: Duration = Duration::from_millis(800);

fn archive_to(sink: &Sink) -> String {
    format!(
        "targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    )
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

static ENVELOPE_SCHEMA: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema/envelope.schema.json");
    let text = std::fs::read_to_string(path).expect("read schema/envelope.schema.json");
    let schema: Value = serde_json::from_str(&text).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema compiles")
});

/// Fails with every schema violation listed when `envelope` does not match
/// `schema/envelope.schema.json`.
fn assert_valid_envelope(envelope: &Value) {
    let errors: Vec<String> = ENVELOPE_SCHEMA
        .iter_errors(envelope)
        .map(|error| format!("{} (at `{}`)", error, error.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "envelope does not match schema/envelope.schema.json:\n  {}\nenvelope: {envelope:#}",
        errors.join("\n  ")
    );
}

/// Waits for the envelope with `id` on the sink's `/inbox`, checks it against the
/// schema and the delivery content type, and returns it.
async fn delivered(sink: &Sink, id: &str) -> Value {
    let received = eventually(WAIT, &format!("envelope {id} delivered"), || {
        let found = sink
            .received_on("/inbox")
            .into_iter()
            .find(|r| r.json()["id"] == id);
        async move { found }
    })
    .await;
    assert_eq!(
        received.header("content-type"),
        Some("application/cloudevents+json")
    );
    let envelope = received.json();
    assert_valid_envelope(&envelope);
    envelope
}

/// POSTs a postback that must be accepted and returns its delivered envelope.
async fn accepted(
    relay: &TestRelay,
    sink: &Sink,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Value {
    let body = body.into();
    let (status, answer) = post(&relay.url, content_type, body.clone()).await;
    assert_eq!(
        status,
        200,
        "{answer} for {content_type:?} {:?}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(answer["status"], "accepted", "{answer}");
    let id = answer["id"].as_str().expect("the answer names the id");
    delivered(sink, id).await
}

/// Sends one request with the hyper client; returns status, headers and JSON body
/// (Null when the body is not JSON).
async fn send(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> (u16, HeaderMap, Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let mut request = Request::builder().method(method).uri(url);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = tokio::time::timeout(
        WAIT,
        client.request(request.body(Full::new(body.into())).unwrap()),
    )
    .await
    .expect("answer within 10 s")
    .expect("request succeeds");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body within 10 s")
        .expect("body read")
        .to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Asserts an error answer is `{"error": "<message containing `needle`>"}` and nothing else.
fn assert_error_body(answer: &Value, needle: &str) {
    let object = answer
        .as_object()
        .unwrap_or_else(|| panic!("error body is not a JSON object: {answer}"));
    assert_eq!(object.len(), 1, "only `error` expected: {answer}");
    let message = object["error"]
        .as_str()
        .unwrap_or_else(|| panic!("`error` is not a string: {answer}"));
    assert!(
        message.contains(needle),
        "error message {message:?} should mention {needle:?}"
    );
}

/// A JSON MO postback with the given tracking id.
fn mo_json(tracking_id: &str) -> String {
    json!({
        "origin": "MMS_MO",
        "code": "N401",
        "from": "14085550000",
        "to": "28444",
        "tracking-id": tracking_id,
        "timestamp": "2021-02-03T18:27:54Z",
        "content": [{"file": format!("https://m.example/{tracking_id}.jpg")}]
    })
    .to_string()
}

fn ingest_addr(relay: &TestRelay) -> std::net::SocketAddr {
    relay.handle.as_ref().expect("relay running").ingest_addr
}

/// An HTTP/1.1 POST of `body` to the ingest path, as raw bytes.
fn raw_post(relay: &TestRelay, content_type: &str, body: &str) -> Vec<u8> {
    raw::post_bytes(ingest_addr(relay), "/sinch/postback", content_type, body)
}

/// Reads exactly one response from `stream`.
async fn read_response(stream: &mut TcpStream) -> raw::RawResponse {
    raw::read_response(stream, WAIT).await
}

fn sql_int(value: &Sql) -> i64 {
    match value {
        Sql::Integer(i) => *i,
        other => panic!("expected an integer, got {other:?}"),
    }
}

fn sql_text(value: &Sql) -> &str {
    match value {
        Sql::Text(text) => text,
        other => panic!("expected text, got {other:?}"),
    }
}

fn sql_bytes(value: &Sql) -> &[u8] {
    match value {
        Sql::Blob(bytes) => bytes,
        Sql::Text(text) => text.as_bytes(),
        other => panic!("expected a blob, got {other:?}"),
    }
}

fn count(relay: &TestRelay, sql: &str) -> i64 {
    sql_int(&relay.query(sql)[0][0])
}

// ---------------------------------------------------------------------------
// 1. The seed examples
// ---------------------------------------------------------------------------

#[tokio::test]
async fn seed_xml_is_acknowledged_and_delivered_as_an_envelope() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let (status, answer) = post(&relay.url, Some("text/xml"), SEED_XML).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "accepted");
    let got = sink.wait_for("/inbox", 1, Duration::from_secs(10)).await;
    let envelope = got[0].json();
    assert_eq!(
        got[0].header("content-type"),
        Some("application/cloudevents+json")
    );
    assert_eq!(envelope["id"], answer["id"]);
    assert_eq!(envelope["type"], "com.sinch.mms.mo");
    assert_eq!(envelope["data"]["tracking_id"], "MMS_MO_iLnCRrL6");
    assert_eq!(envelope["data"]["files"].as_array().unwrap().len(), 3);

    assert_valid_envelope(&envelope);
    assert_eq!(envelope["specversion"], "1.0");
    assert_eq!(envelope["source"], "sinch:mms");
    assert_eq!(envelope["subject"], "MMS_MO_iLnCRrL6");
    assert_eq!(envelope["time"], "2014-02-03T16:19:49Z");
    assert_eq!(envelope["datacontenttype"], "application/json");
    assert_eq!(envelope["sourceformat"], "xml");
    let file = json!({"url": "URL of Content Here"});
    assert_eq!(
        envelope["data"],
        json!({
            "origin": "MMS_MO",
            "code": "N401",
            "from": "14082257140",
            "to": "28444",
            "keyword": "all",
            "tracking_id": "MMS_MO_iLnCRrL6",
            "operator_id": "31002",
            "timestamp": "2014-02-03T11:19:49-05:00",
            "message_subject": "",
            "files": [file, file, file]
        })
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn seed_json_is_acknowledged_and_delivered_as_an_envelope() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let envelope = accepted(&relay, &sink, Some("application/json"), SEED_JSON).await;
    assert_eq!(envelope["type"], "com.sinch.mms.mo");
    assert_eq!(envelope["subject"], "MMS_MO_json0001");
    assert_eq!(envelope["time"], "2021-02-03T18:27:54.235957Z");
    assert_eq!(envelope["sourceformat"], "json");
    assert_eq!(envelope["source"], "sinch:mms");
    assert_eq!(
        envelope["data"],
        json!({
            "origin": "MMS_MO",
            "code": "N401",
            "from": "14082257140",
            "to": "28444",
            "message_subject": "Hello",
            "tracking_id": "MMS_MO_json0001",
            "timestamp": "2021-02-03T18:27:54.235957+00:00",
            "files": [
                {"url": "https://media.example/1.jpg"},
                {"url": "https://media.example/2.jpg"}
            ]
        })
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn the_envelope_schema_check_rejects_broken_envelopes() {
    // The schema helper is what points 1-3 rely on: prove it can fail.
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let good = accepted(&relay, &sink, None, SEED_JSON).await;
    assert!(ENVELOPE_SCHEMA.is_valid(&good));
    type Mutation = fn(&mut Value);
    let broken: [(&str, Mutation); 7] = [
        ("time with an offset", |e| {
            e["time"] = json!("2021-02-03T18:27:54+00:00")
        }),
        ("numeric data value", |e| {
            e["data"]["operator_id"] = json!(31002)
        }),
        ("missing origin", |e| {
            drop(e["data"].as_object_mut().unwrap().remove("origin"))
        }),
        ("file without url", |e| {
            e["data"]["files"] = json!([{"file": "x"}])
        }),
        ("unknown attribute", |e| e["extra"] = json!("x")),
        ("id not a ULID", |e| e["id"] = json!("not-a-ulid")),
        ("unknown type", |e| e["type"] = json!("com.example")),
    ];
    for (what, mutate) in broken {
        let mut envelope = good.clone();
        mutate(&mut envelope);
        assert!(
            !ENVELOPE_SCHEMA.is_valid(&envelope),
            "{what} should be invalid"
        );
    }
    relay.shutdown().await;
}

// ---------------------------------------------------------------------------
// 2. Tolerance rules
// ---------------------------------------------------------------------------

#[tokio::test]
async fn any_content_type_or_none_is_accepted_because_the_body_is_sniffed() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let cases: &[(Option<&str>, &str)] = &[
        (Some("application/xml"), "xml"),
        (Some("text/xml"), "xml"),
        (Some("application/xml; charset=utf-8"), "xml"),
        (Some("text/xml;charset=UTF-8"), "xml"),
        (None, "xml"),
        // Wrong labels: the body decides.
        (Some("application/json"), "xml"),
        (Some("application/x-www-form-urlencoded"), "xml"),
        (Some("application/json"), "json"),
        (Some("application/json; charset=utf-8"), "json"),
        (None, "json"),
        (Some("text/xml"), "json"),
        (Some("text/plain"), "json"),
    ];
    for (index, (content_type, format)) in cases.iter().enumerate() {
        let tracking_id = format!("CT_{index}");
        let body = match *format {
            "xml" => mo_xml(&tracking_id, "ct", "28444"),
            _ => mo_json(&tracking_id),
        };
        let envelope = accepted(&relay, &sink, *content_type, body).await;
        let case = format!("{format} body sent as {content_type:?}");
        assert_eq!(envelope["sourceformat"], *format, "{case}");
        assert_eq!(envelope["subject"], tracking_id, "{case}");
        assert_eq!(envelope["data"]["origin"], "MMS_MO", "{case}");
        assert_eq!(envelope["data"]["code"], "N401", "{case}");
        assert_eq!(envelope["data"]["to"], "28444", "{case}");
        assert_eq!(envelope["time"], "2021-02-03T18:27:54Z", "{case}");
        assert_eq!(
            envelope["data"]["files"],
            json!([{"url": format!("https://m.example/{tracking_id}.jpg")}]),
            "{case}"
        );
    }
    assert_eq!(sink.received_on("/inbox").len(), cases.len());
    relay.shutdown().await;
}

#[tokio::test]
async fn legacy_uppercase_xml_with_a_notification_wrapper_is_accepted() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;

    let wrapped = "<?xml version='1.0'?>\n<POSTBACK><NOTIFICATION><ORIGIN>MMS_MO</ORIGIN><CODE>N401</CODE>\
        <FROM>14085550101</FROM><TO>28444</TO><TRACKINGID>LEGACY_1</TRACKINGID><SUBJECT>Hi there</SUBJECT>\
        <SPID>31002</SPID><TIMESTAMP>2021-02-03T18:27:54Z</TIMESTAMP>\
        <CONTENT><FILE>https://m.example/a.jpg</FILE><FILE>https://m.example/b.gif</FILE></CONTENT>\
        </NOTIFICATION></POSTBACK>";
    let envelope = accepted(&relay, &sink, Some("text/xml"), wrapped).await;
    assert_eq!(envelope["type"], "com.sinch.mms.mo");
    assert_eq!(envelope["subject"], "LEGACY_1");
    assert_eq!(envelope["sourceformat"], "xml");
    assert_eq!(
        envelope["data"],
        json!({
            "origin": "MMS_MO",
            "code": "N401",
            "from": "14085550101",
            "to": "28444",
            "tracking_id": "LEGACY_1",
            "message_subject": "Hi there",
            "spid": "31002",
            "timestamp": "2021-02-03T18:27:54Z",
            "files": [{"url": "https://m.example/a.jpg"}, {"url": "https://m.example/b.gif"}]
        })
    );

    // Upper case without the wrapper, a single file.
    let flat = "<POSTBACK><ORIGIN>MMS_MT</ORIGIN><CODE>N102</CODE><TRACKINGID>LEGACY_2</TRACKINGID>\
        <SPID>7</SPID><SUBJECT></SUBJECT><CONTENT><FILE>https://m.example/c.png</FILE></CONTENT></POSTBACK>";
    let envelope = accepted(&relay, &sink, Some("application/xml"), flat).await;
    assert_eq!(envelope["type"], "com.sinch.mms.mt");
    assert_eq!(envelope["subject"], "LEGACY_2");
    assert_eq!(
        envelope["data"],
        json!({
            "origin": "MMS_MT",
            "code": "N102",
            "tracking_id": "LEGACY_2",
            "spid": "7",
            "message_subject": "",
            "files": [{"url": "https://m.example/c.png"}]
        })
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn xml_prologs_and_a_byte_order_mark_are_accepted() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    for (index, prolog) in [
        "<?xml version='1.0'?>",
        "<?xml version=\"1.0\"?>\n",
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
        "<?xml version='1.0' encoding='utf-8' standalone='yes'?>\r\n",
        "\u{feff}<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
        "\n  <!-- a comment before the root -->\n",
    ]
    .iter()
    .enumerate()
    {
        let tracking_id = format!("PROLOG_{index}");
        let body = format!("{prolog}{}", mo_xml(&tracking_id, "prolog", "28444"));
        let envelope = accepted(&relay, &sink, Some("text/xml"), body).await;
        assert_eq!(envelope["subject"], tracking_id, "prolog {prolog:?}");
        assert_eq!(envelope["data"]["keyword"], "prolog", "prolog {prolog:?}");
        assert_eq!(envelope["sourceformat"], "xml");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn field_name_spellings_fold_to_one_canonical_name() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let spellings = [
        ("tracking-id", "message-subject", "operator-id"),
        ("tracking_id", "message_subject", "operator_id"),
        ("trackingid", "subject", "operatorid"),
        ("TrackingId", "MessageSubject", "Operator-ID"),
    ];
    for (index, (tracking, subject, operator)) in spellings.iter().enumerate() {
        let expected = |format: &str| {
            json!({
                "origin": "MMS_MO",
                "code": "N401",
                "tracking_id": format!("SPELL_{format}_{index}"),
                "message_subject": format!("subject {index}"),
                "operator_id": "31002"
            })
        };
        let xml = format!(
            "<postback><origin>MMS_MO</origin><code>N401</code><{tracking}>SPELL_xml_{index}</{tracking}>\
             <{subject}>subject {index}</{subject}><{operator}>31002</{operator}></postback>"
        );
        let envelope = accepted(&relay, &sink, Some("text/xml"), xml).await;
        assert_eq!(envelope["data"], expected("xml"), "xml spelled {tracking}");
        assert_eq!(envelope["subject"], format!("SPELL_xml_{index}"));

        let json = format!(
            r#"{{"origin":"MMS_MO","code":"N401","{tracking}":"SPELL_json_{index}","{subject}":"subject {index}","{operator}":31002}}"#
        );
        let envelope = accepted(&relay, &sink, Some("application/json"), json).await;
        assert_eq!(
            envelope["data"],
            expected("json"),
            "json spelled {tracking}"
        );
        assert_eq!(envelope["subject"], format!("SPELL_json_{index}"));
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn json_numbers_and_booleans_become_strings() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let body = r#"{"origin":"MMS_MO","code":"N401","from":14085550123,"to":28444,
        "tracking-id":"NUMBERS_1","operator-id":31002,"dlr":true,"nothing":null}"#;
    let envelope = accepted(&relay, &sink, Some("application/json"), body).await;
    assert_eq!(
        envelope["data"],
        json!({
            "origin": "MMS_MO",
            "code": "N401",
            "from": "14085550123",
            "to": "28444",
            "tracking_id": "NUMBERS_1",
            "operator_id": "31002",
            "dlr": "true"
        })
    );
    // The same postback with a string operator id reads the same.
    let body =
        r#"{"origin":"MMS_MO","code":"N401","tracking-id":"NUMBERS_2","operator-id":"31002"}"#;
    let envelope = accepted(&relay, &sink, None, body).await;
    assert_eq!(envelope["data"]["operator_id"], "31002");
    relay.shutdown().await;
}

#[tokio::test]
async fn timestamps_are_converted_to_utc() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let cases = [
        ("2014-02-03T11:19:49-05:00", "2014-02-03T16:19:49Z"),
        (
            "2021-02-03T18:27:54.235957+00:00",
            "2021-02-03T18:27:54.235957Z",
        ),
        ("2021-02-03T18:27:54Z", "2021-02-03T18:27:54Z"),
        ("2021-02-03T23:57:54.5+05:30", "2021-02-03T18:27:54.500Z"),
        ("2021-02-03 18:27:54+01:00", "2021-02-03T17:27:54Z"),
        ("2021-02-03T18:27:54+0100", "2021-02-03T17:27:54Z"),
    ];
    for (index, (timestamp, utc)) in cases.iter().enumerate() {
        for format in ["xml", "json"] {
            let tracking_id = format!("TIME_{format}_{index}");
            let body = match format {
                "xml" => format!(
                    "<postback><origin>MMS_MO</origin><code>N401</code>\
                     <tracking-id>{tracking_id}</tracking-id><timestamp>{timestamp}</timestamp></postback>"
                ),
                _ => json!({"origin": "MMS_MO", "code": "N401", "tracking-id": tracking_id, "timestamp": timestamp})
                    .to_string(),
            };
            let envelope = accepted(&relay, &sink, None, body).await;
            assert_eq!(envelope["time"], *utc, "{format} timestamp {timestamp}");
            // The original string is kept untouched in data.
            assert_eq!(envelope["data"]["timestamp"], *timestamp);
        }
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn copy_to_lists_and_unknown_fields_are_kept() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let body = r#"{"origin":"MMS_MO","code":"N401","tracking-id":"GROUP_1",
        "copy-to":[{"number":"14085551212"},{"number":14085551313}],
        "x-carrier-flag":"yes","carrier-extra":{"hops":2,"names":["a","b"]}}"#;
    let envelope = accepted(&relay, &sink, Some("application/json"), body).await;
    assert_eq!(
        envelope["data"],
        json!({
            "origin": "MMS_MO",
            "code": "N401",
            "tracking_id": "GROUP_1",
            "copy_to": [{"number": "14085551212"}, {"number": "14085551313"}],
            "x_carrier_flag": "yes",
            "carrier_extra": {"hops": "2", "names": ["a", "b"]}
        })
    );

    let body =
        "<postback><origin>MMS_MO</origin><code>N401</code><tracking-id>GROUP_2</tracking-id>\
        <copy-to><number>14085551212</number><number>14085551313</number></copy-to>\
        <x-carrier-flag>yes</x-carrier-flag><brand-new>value</brand-new></postback>";
    let envelope = accepted(&relay, &sink, Some("text/xml"), body).await;
    assert_eq!(
        envelope["data"],
        json!({
            "origin": "MMS_MO",
            "code": "N401",
            "tracking_id": "GROUP_2",
            "copy_to": {"number": ["14085551212", "14085551313"]},
            "x_carrier_flag": "yes",
            "brand_new": "value"
        })
    );
    relay.shutdown().await;
}

// ---------------------------------------------------------------------------
// 3. Delivery receipts and other kinds
// ---------------------------------------------------------------------------

#[tokio::test]
async fn n101_and_n102_with_the_same_tracking_id_are_two_postbacks() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let n101 = "<postback><origin>MMS_MT</origin><code>N101</code><tracking-id>MT_SHARED_1</tracking-id>\
        <sent-as>MMS</sent-as><mms-id>98765</mms-id><status>Sent</status>\
        <client-reference>order-17</client-reference><timestamp>2021-02-03T18:27:54Z</timestamp></postback>";
    let n102 = r#"{"origin":"MMS_MT","code":"N102","tracking-id":"MT_SHARED_1","sent-as":"MMS",
        "mms-id":"98765","status":"Delivered","status-details":"delivered to handset",
        "handset":"iPhone","operator-name":"T-Mobile","client-reference":"order-17",
        "campaign-ref":"spring","timestamp":"2021-02-03T18:28:01.5+00:00"}"#;

    let sent = accepted(&relay, &sink, Some("text/xml"), n101).await;
    let delivered_receipt = accepted(&relay, &sink, Some("application/json"), n102).await;
    assert_ne!(sent["id"], delivered_receipt["id"]);
    for envelope in [&sent, &delivered_receipt] {
        assert_eq!(envelope["type"], "com.sinch.mms.mt");
        assert_eq!(envelope["subject"], "MT_SHARED_1");
    }
    assert_eq!(
        sent["data"],
        json!({
            "origin": "MMS_MT",
            "code": "N101",
            "tracking_id": "MT_SHARED_1",
            "sent_as": "MMS",
            "mms_id": "98765",
            "status": "Sent",
            "client_reference": "order-17",
            "timestamp": "2021-02-03T18:27:54Z"
        })
    );
    assert_eq!(
        delivered_receipt["data"],
        json!({
            "origin": "MMS_MT",
            "code": "N102",
            "tracking_id": "MT_SHARED_1",
            "sent_as": "MMS",
            "mms_id": "98765",
            "status": "Delivered",
            "status_details": "delivered to handset",
            "handset": "iPhone",
            "operator_name": "T-Mobile",
            "client_reference": "order-17",
            "campaign_ref": "spring",
            "timestamp": "2021-02-03T18:28:01.5+00:00"
        })
    );
    assert_eq!(delivered_receipt["time"], "2021-02-03T18:28:01.500Z");
    assert_eq!(sink.received_on("/inbox").len(), 2);
    relay.shutdown().await;
}

#[tokio::test]
async fn e101_with_only_origin_code_and_mms_id_uses_the_receive_time() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    for (content_type, body, mms_id) in [
        (
            Some("application/json"),
            r#"{"origin":"MMS_MT","code":"E101","mms-id":"4242"}"#.to_owned(),
            "4242",
        ),
        (
            Some("text/xml"),
            "<postback><origin>MMS_MT</origin><code>E101</code><mms-id>4243</mms-id></postback>"
                .to_owned(),
            "4243",
        ),
        // A timestamp without an offset is ambiguous: the receive time is used.
        (
            None,
            r#"{"origin":"MMS_MT","code":"E101","mms-id":"4244","timestamp":"2021-02-03 18:27:54"}"#
                .to_owned(),
            "4244",
        ),
    ] {
        let envelope = accepted(&relay, &sink, content_type, body).await;
        let after = chrono::Utc::now() + chrono::Duration::seconds(1);
        assert_eq!(envelope["type"], "com.sinch.mms.mt");
        assert!(
            envelope.get("subject").is_none(),
            "no tracking id, no subject: {envelope}"
        );
        assert_eq!(envelope["data"]["code"], "E101");
        assert_eq!(envelope["data"]["mms_id"], mms_id);
        assert_eq!(envelope["time"], envelope["receivedtime"], "{envelope}");
        let time = chrono::DateTime::parse_from_rfc3339(envelope["time"].as_str().unwrap())
            .expect("time is RFC 3339");
        assert!(
            time >= before && time <= after,
            "time {time} should be the receive time"
        );
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn sms_and_unknown_origins_get_their_event_types() {
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    for (origin, code, event_type) in [
        ("SMS_MO", "N211", "com.sinch.sms.mo"),
        ("SMS_MT", "N201", "com.sinch.sms.mt"),
        ("SMS_MT", "E202", "com.sinch.sms.mt"),
        ("MMS_MT", "N103", "com.sinch.mms.mt"),
        ("mms_mo", "N401", "com.sinch.mms.mo"),
        ("SUBSCRIPTION", "N301", "com.sinch.postback"),
        ("SOMETHING_NEW", "X1", "com.sinch.postback"),
    ] {
        let tracking_id = format!("KIND_{origin}_{code}");
        let xml = format!(
            "<postback><origin>{origin}</origin><code>{code}</code><tracking-id>{tracking_id}</tracking-id></postback>"
        );
        let envelope = accepted(&relay, &sink, Some("text/xml"), xml).await;
        assert_eq!(envelope["type"], event_type, "{origin} {code}");
        assert_eq!(envelope["data"]["origin"], origin);
        assert_eq!(envelope["data"]["code"], code);
        assert_eq!(envelope["subject"], tracking_id);
    }
    relay.shutdown().await;
}

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

// ---------------------------------------------------------------------------
// 5. HTTP errors and malformed bodies
// ---------------------------------------------------------------------------

#[tokio::test]
async fn other_methods_are_405_with_allow_post() {
    let relay = start_relay("").await;
    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        let (status, headers, answer) = send(method, &relay.url, None, "").await;
        assert_eq!(status, 405, "{method}");
        assert_eq!(
            headers.get("allow").and_then(|v| v.to_str().ok()),
            Some("POST"),
            "{method}"
        );
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        assert_error_body(&answer, "POST");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn other_paths_are_404() {
    let relay = start_relay("").await;
    let base = relay.url.trim_end_matches("/sinch/postback").to_owned();
    for path in [
        "/",
        "/sinch",
        "/sinch/postback/",
        "/sinch/postbacks",
        "/metrics",
    ] {
        let url = format!("{base}{path}");
        let (status, headers, answer) = send("POST", &url, Some("text/xml"), SEED_XML).await;
        assert_eq!(status, 404, "POST {path}");
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        assert_error_body(&answer, "not found");
        let (status, _, answer) = send("GET", &url, None, "").await;
        assert_eq!(status, 404, "GET {path}");
        assert_error_body(&answer, "not found");
    }
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM events"), 0);
    relay.shutdown().await;
}

const SMALL_LIMIT: &str = "ingest:\n  max_body_bytes: 1024\n";

/// A valid postback longer than `SMALL_LIMIT` (an unknown field pads it).
fn oversized_postback() -> String {
    format!(
        "<postback><origin>MMS_MO</origin><code>N401</code><tracking-id>BIG_1</tracking-id><padding>{}</padding></postback>",
        "x".repeat(3000)
    )
}

#[tokio::test]
async fn a_body_over_the_limit_with_content_length_is_413() {
    let relay = start_relay(SMALL_LIMIT).await;
    let body = oversized_postback();
    let (status, headers, answer) = send("POST", &relay.url, Some("text/xml"), body).await;
    assert_eq!(status, 413);
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert_error_body(&answer, "1024 bytes");

    // On a raw keep-alive connection: the unread body is never taken for the
    // next request. The connection either carries on or is closed.
    let mut stream = TcpStream::connect(ingest_addr(&relay)).await.unwrap();
    stream
        .write_all(&raw_post(&relay, "text/xml", &oversized_postback()))
        .await
        .unwrap();
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 413);
    assert_error_body(&response.json(), "1024 bytes");
    let next = raw_post(&relay, "text/xml", &mo_xml("AFTER_413", "k", "28444"));
    if stream.write_all(&next).await.is_ok() {
        let mut first = [0u8; 1];
        let peek = tokio::time::timeout(WAIT, stream.peek(&mut first))
            .await
            .expect("an answer or a close within 10 s");
        if matches!(peek, Ok(n) if n > 0) {
            let response = read_response(&mut stream).await;
            assert_eq!(response.status, 200, "{:?}", response.json());
            assert_eq!(response.json()["status"], "accepted");
        }
    }

    // At the limit exactly, it is fine.
    let head = "<postback><origin>MMS_MO</origin><code>N401</code><tracking-id>FITS_1</tracking-id><padding>";
    let tail = "</padding></postback>";
    let fits = format!("{head}{}{tail}", "y".repeat(1024 - head.len() - tail.len()));
    assert_eq!(fits.len(), 1024);
    let (status, answer) = post(&relay.url, Some("text/xml"), fits).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "accepted");

    assert_eq!(
        count(
            &relay,
            "SELECT COUNT(*) FROM dedupe WHERE key LIKE '%|BIG_1'"
        ),
        0,
        "an oversized body is not stored"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413() {
    let relay = start_relay(SMALL_LIMIT).await;
    let addr = ingest_addr(&relay);

    // A chunked body under the limit is read and accepted.
    let small = mo_xml("CHUNKED_OK", "chunk", "28444");
    let (a, b) = small.split_at(small.len() / 2);
    let request = format!(
        "POST /sinch/postback HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/xml\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 200, "{:?}", response.json());
    assert_eq!(response.json()["status"], "accepted");

    // Over the limit: 400-byte chunks, no Content-Length to refuse it up front.
    let body = oversized_postback();
    let mut request = format!(
        "POST /sinch/postback HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/xml\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    for chunk in body.as_bytes().chunks(400) {
        let chunk = std::str::from_utf8(chunk).unwrap();
        request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    request.push_str("0\r\n\r\n");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 413);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_error_body(&response.json(), "1024 bytes");
    assert_eq!(
        count(
            &relay,
            "SELECT COUNT(*) FROM dedupe WHERE key LIKE '%|BIG_1'"
        ),
        0
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_and_the_connection_closed() {
    let relay = start_relay("").await;
    let mut stream = TcpStream::connect(ingest_addr(&relay)).await.unwrap();
    // Promises 300 bytes, sends a few, then goes silent.
    let head = format!(
        "POST /sinch/postback HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml\r\nContent-Length: 300\r\n\r\n<postback><origin>MMS_MO",
        ingest_addr(&relay)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The relay gives up after 10 s (Sinch's own deadline); allow slack.
    let response = raw::read_response(&mut stream, Duration::from_secs(20)).await;
    assert_eq!(response.status, 408);
    assert_error_body(&response.json(), "body not received");
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(WAIT, stream.read(&mut buffer))
        .await
        .expect("the connection is closed after the timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM events"), 0);
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM quarantine"), 0);
    assert_eq!(
        relay
            .metric(r#"relay_postbacks_received_total{format="unknown",outcome="error"}"#)
            .await,
        Some(1.0)
    );
    relay.shutdown().await;
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

// ---------------------------------------------------------------------------
// 7. 503 when the store cannot commit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_locked_store_keeps_accepting_into_the_journal_and_moves_in_afterwards() {
    if skip_unless(
        Backend::Sqlite,
        "holds SQLite's write lock; tests/postgres.rs stops a PostgreSQL server instead",
    ) {
        return;
    }
    // No targets: accepted postbacks stay in `events` (as "no route" dead letters),
    // so what was moved in can be read back.
    let relay = start_relay("").await;
    let readyz = format!("{}/readyz", relay.admin);
    assert_eq!(get(&readyz).await.0, 200);

    let (status, answer) = post(&relay.url, None, mo_xml("BEFORE_LOCK", "k", "28444")).await;
    assert_eq!((status, &answer["status"]), (200, &json!("accepted")));
    relay
        .eventually_int(Duration::from_secs(5), "SELECT COUNT(*) FROM events", 1)
        .await;

    let lock = rusqlite::Connection::open(relay.db_path()).expect("open db");
    lock.busy_timeout(Duration::from_secs(5)).unwrap();
    let mode: String = lock
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    lock.execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");

    // Acknowledged from the intake journal although SQLite cannot be written.
    let locked_body = mo_xml("DURING_LOCK", "k", "28444");
    let (status, answer) = post(&relay.url, Some("text/xml"), locked_body.clone()).await;
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("accepted")),
        "{answer}"
    );
    let id = answer["id"].as_str().unwrap().to_owned();
    // Sinch's retry of it is a duplicate already, before it reached SQLite.
    let (status, again) = post(&relay.url, Some("text/xml"), locked_body.clone()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (&again["status"], &again["id"]),
        (&json!("duplicate"), &json!(id))
    );

    // A malformed body is quarantined in SQLite itself: 503, not 400.
    let (status, headers, answer) = send("POST", &relay.url, None, "garbage").await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("30")
    );
    assert_error_body(&answer, "retry later");

    // The writer cannot move it in: unready (deliveries are stuck), and
    // readers still see only what was there.
    let (status, body) = get(&readyz).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM events"), 1);
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM quarantine"), 0);

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    // Readiness recovers by itself, and the journaled postback is moved in.
    eventually(
        Duration::from_secs(10),
        "/readyz to recover without traffic",
        || {
            let readyz = readyz.clone();
            async move { (get(&readyz).await.0 == 200).then_some(()) }
        },
    )
    .await;
    relay
        .eventually_int(Duration::from_secs(5), "SELECT COUNT(*) FROM events", 2)
        .await;
    let rows = relay.query(&format!("SELECT raw_body FROM events WHERE id = '{id}'"));
    assert_eq!(rows.len(), 1);
    assert_eq!(sql_bytes(&rows[0][0]), locked_body.as_bytes());
    let (status, again) = post(&relay.url, Some("text/xml"), locked_body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (&again["status"], &again["id"]),
        (&json!("duplicate"), &json!(id))
    );
    assert_eq!(
        relay
            .metric(r#"relay_postbacks_received_total{format="unknown",outcome="error"}"#)
            .await,
        Some(1.0)
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_stalled_writer_holds_a_bounded_number_of_bytes_and_refuses_beyond_it_at_once() {
    if skip_unless(
        Backend::Sqlite,
        "holds SQLite's write lock; the PostgreSQL queue has its own bound",
    ) {
        return;
    }
    bounded(
        Duration::from_secs(120),
        "byte-bounded writer queue",
        async {
            let relay = start_relay("").await;
            let lock = rusqlite::Connection::open(relay.db_path()).expect("open db");
            lock.execute_batch("BEGIN EXCLUSIVE")
                .expect("take the write lock");

            // Postbacks of ~0.8 MiB of body each wait in the writer's queue
            // (64 MiB, bodies and envelopes). Sent one after the other, as Sinch
            // does.
            let big = |n: usize| {
                let extras: String = (0..13)
                    .map(|field| format!("<note-{field}>{}</note-{field}>", "k".repeat(60 * 1024)))
                    .collect();
                format!(
                    "<postback><origin>MMS_MO</origin><code>N401</code><from>14085550000</from>\
                 <to>28444</to><tracking-id>BIG-{n}</tracking-id>{extras}</postback>"
                )
            };
            let mut accepted = Vec::new();
            let mut refused = None;
            for n in 0..200 {
                let started = std::time::Instant::now();
                let (status, headers, answer) =
                    send("POST", &relay.url, Some("text/xml"), big(n)).await;
                match status {
                    200 => accepted.push(answer["id"].as_str().expect("id").to_owned()),
                    503 => {
                        refused = Some((n, headers, answer, started.elapsed()));
                        break;
                    }
                    other => panic!("postback {n}: {other} {answer}"),
                }
            }
            let (n, headers, answer, took) =
                refused.expect("the queue never filled: it is unbounded");
            eprintln!(
                "refused postback {n} after {} accepted, in {took:?}",
                accepted.len()
            );
            assert_eq!(
                headers.get("retry-after").and_then(|v| v.to_str().ok()),
                Some("30")
            );
            assert_error_body(&answer, "retry later");
            // Refused at once: not after the 2 s wait for room by count.
            assert!(took < Duration::from_secs(2), "{took:?}");

            // Once SQLite can be written again, every acknowledged one is moved
            // in, and the queue takes postbacks again.
            lock.execute_batch("ROLLBACK").unwrap();
            drop(lock);
            relay
                .eventually_int(
                    Duration::from_secs(30),
                    "SELECT COUNT(*) FROM events",
                    accepted.len() as i64,
                )
                .await;
            for id in &accepted {
                assert_eq!(
                    count(
                        &relay,
                        &format!("SELECT COUNT(*) FROM events WHERE id = '{id}'")
                    ),
                    1,
                    "{id}"
                );
            }
            // What waited was at most the bound, and the refused one would
            // have passed it.
            let held = count(
                &relay,
                "SELECT SUM(length(envelope) + length(raw_body)) FROM events",
            );
            let each = held / accepted.len() as i64;
            let bound = 64 * 1024 * 1024;
            assert!(held <= bound && held + each > bound, "{held} bytes held");
            let (status, _, answer) = send("POST", &relay.url, Some("text/xml"), big(n)).await;
            assert_eq!(
                (status, &answer["status"]),
                (200, &json!("accepted")),
                "{answer}"
            );
            relay.shutdown().await;
        },
    )
    .await;
}

// ---------------------------------------------------------------------------
// 8. Keep-alive
// ---------------------------------------------------------------------------

#[tokio::test]
async fn one_keep_alive_connection_carries_serial_postbacks_until_idle() {
    let sink = Sink::start().await;
    let relay = start_relay(&format!(
        "ingest:\n  idle_timeout: 2s\n{}",
        archive_to(&sink)
    ))
    .await;
    let mut stream = TcpStream::connect(ingest_addr(&relay))
        .await
        .expect("connect");
    let mut ids = Vec::new();
    for index in 0..4 {
        let request = if index % 2 == 0 {
            raw_post(
                &relay,
                "text/xml",
                &mo_xml(&format!("KA_{index}"), "ka", "28444"),
            )
        } else {
            raw_post(&relay, "application/json", &mo_json(&format!("KA_{index}")))
        };
        stream.write_all(&request).await.unwrap();
        let response = read_response(&mut stream).await;
        assert_eq!(
            response.status,
            200,
            "request {index}: {:?}",
            response.json()
        );
        assert_ne!(response.header("connection"), Some("close"));
        ids.push(response.json()["id"].as_str().unwrap().to_owned());
    }

    // Idle for less than the idle timeout: the same connection still works.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stream
        .write_all(&raw_post(
            &relay,
            "text/xml",
            &mo_xml("KA_after_pause", "ka", "28444"),
        ))
        .await
        .unwrap();
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 200, "{:?}", response.json());
    assert_eq!(response.json()["status"], "accepted");
    ids.push(response.json()["id"].as_str().unwrap().to_owned());

    // An error answer does not cost the connection either.
    stream
        .write_all(&raw_post(&relay, "text/xml", "not a postback"))
        .await
        .unwrap();
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 400);
    stream
        .write_all(&raw_post(
            &relay,
            "text/xml",
            &mo_xml("KA_after_400", "ka", "28444"),
        ))
        .await
        .unwrap();
    let response = read_response(&mut stream).await;
    assert_eq!(response.status, 200, "{:?}", response.json());
    ids.push(response.json()["id"].as_str().unwrap().to_owned());

    for id in &ids {
        delivered(&sink, id).await;
    }

    // Idle past the timeout: the server has closed the connection.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer))
        .await
        .expect("a closed connection reads at once, it does not hang");
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!(
            "expected the idle connection to be closed, read {:?}",
            String::from_utf8_lossy(&buffer[..n])
        ),
    }
    relay.shutdown().await;
}

// ---------------------------------------------------------------------------
// 10. Metrics
// ---------------------------------------------------------------------------

#[tokio::test]
async fn metrics_count_postbacks_by_format_and_outcome() {
    let relay = start_relay(SMALL_LIMIT).await;
    let sample = |format: &str, outcome: &str| {
        format!("relay_postbacks_received_total{{format=\"{format}\",outcome=\"{outcome}\"}}")
    };
    let expect = [
        (Some("text/xml"), mo_xml("M_1", "k", "1"), 200),
        (Some("text/xml"), mo_xml("M_2", "k", "1"), 200),
        (Some("application/json"), mo_xml("M_1", "k", "1"), 200), // duplicate
        (None, mo_xml("M_2", "k", "1"), 200),                     // duplicate
        (Some("text/xml"), mo_xml("M_1", "k", "1"), 200),         // duplicate
        (Some("application/json"), mo_json("M_3"), 200),
        (None, mo_json("M_3"), 200), // duplicate
        (Some("text/xml"), "<postback>".to_owned(), 400),
        (None, "nonsense".to_owned(), 400),
        (None, "{\"origin\":\"MMS_MO\"}".to_owned(), 400),
        (Some("text/xml"), oversized_postback(), 413),
    ];
    for (content_type, body, expected) in &expect {
        let (status, answer) = post(&relay.url, *content_type, body.clone()).await;
        assert_eq!(status, *expected, "{body:?} answered {answer}");
    }
    // Not postbacks at all: not counted.
    assert_eq!(request_text("GET", &relay.url).await.0, 405);
    let base = relay.url.trim_end_matches("/sinch/postback").to_owned();
    assert_eq!(post(&format!("{base}/other"), None, "x").await.0, 404);

    assert_eq!(relay.metric(&sample("xml", "accepted")).await, Some(2.0));
    assert_eq!(relay.metric(&sample("xml", "duplicate")).await, Some(3.0));
    assert_eq!(relay.metric(&sample("json", "accepted")).await, Some(1.0));
    assert_eq!(relay.metric(&sample("json", "duplicate")).await, Some(1.0));
    assert_eq!(relay.metric(&sample("unknown", "invalid")).await, Some(4.0));
    assert_eq!(relay.metric(&sample("xml", "error")).await, None);
    assert_eq!(
        relay.metric("relay_ingest_duration_seconds_count").await,
        Some(expect.len() as f64)
    );
    let sum = relay
        .metric("relay_ingest_duration_seconds_sum")
        .await
        .expect("histogram sum");
    assert!(sum >= 0.0);
    assert_eq!(
        relay
            .metric(&format!(
                "relay_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            ))
            .await,
        Some(1.0)
    );
    relay.shutdown().await;
}

// ---------------------------------------------------------------------------
// HTTP/2 when the client asks
// ---------------------------------------------------------------------------

#[tokio::test]
async fn http2_clients_are_served_too() {
    use http_body_util::{BodyExt, Full};
    let sink = Sink::start().await;
    let relay = start_relay(&archive_to(&sink)).await;
    let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let request = hyper::Request::post(&relay.url)
        .header("content-type", "text/xml")
        .body(Full::new(bytes::Bytes::from(mo_xml(
            "H2-1", "all", "28444",
        ))))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("answer within 10 s")
        .expect("HTTP/2 request succeeds");
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["status"], "accepted");
    let got = sink.wait_for("/inbox", 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].json()["id"], answer["id"]);
    relay.shutdown().await;
}
