//! The ingest metrics count postbacks by format and outcome.

use crate::common::*;

use super::{mo_json, oversized_postback, SMALL_LIMIT};

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
