//! The public endpoint over real HTTP: what Sinch sees.

mod common;

use std::time::Duration;

use common::*;

fn archive_to(sink: &Sink) -> String {
    format!(
        "targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    )
}

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
    relay.shutdown().await;
}
