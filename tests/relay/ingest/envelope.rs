//! What a postback becomes: the seed examples, the tolerance rules (content
//! types, spellings, prologs, numbers, timestamps) and each kind of postback,
//! checked against the envelope schema as delivered.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

use super::{accepted, archive_to, assert_valid_envelope, mo_json, ENVELOPE_SCHEMA};

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
