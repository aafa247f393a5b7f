//! The HTTP surface: methods and paths, body size limits, a stalled body,
//! keep-alive connections and HTTP/2 clients.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

use super::{
    archive_to, assert_error_body, count, delivered, mo_json, oversized_postback, send,
    SMALL_LIMIT, WAIT,
};

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
