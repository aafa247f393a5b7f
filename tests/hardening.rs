//! Who may post, and slow or hostile clients, over real loopback connections:
//! the allowlist, trusted proxies (X-Forwarded-For and the PROXY protocol),
//! basic auth, the path token, TLS with certificate reload, the header and idle
//! clocks, and the connection cap.

mod common;

use std::time::Duration;

use base64::Engine;
use common::raw::{post_bytes, read_response, RawResponse};
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

fn ingest_addr(relay: &TestRelay) -> std::net::SocketAddr {
    relay.handle.as_ref().expect("relay running").ingest_addr
}

/// Sends one raw request on `stream` and reads the answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    request: &[u8],
) -> RawResponse {
    stream.write_all(request).await.expect("send request");
    read_response(stream, WAIT).await
}

/// A raw POST of a distinct postback with extra header lines (each ending in `\r\n`).
fn post_with_headers(relay: &TestRelay, path: &str, tracking_id: &str, extra: &str) -> Vec<u8> {
    let body = mo_xml(tracking_id, "all", "28444");
    let request = post_bytes(ingest_addr(relay), path, "text/xml", &body);
    let text = String::from_utf8(request).unwrap();
    let (first_line, rest) = text.split_once("\r\n").unwrap();
    format!("{first_line}\r\n{extra}{rest}").into_bytes()
}

async fn connect(relay: &TestRelay) -> TcpStream {
    TcpStream::connect(ingest_addr(relay))
        .await
        .expect("connect to ingest")
}

/// Reads until the peer closes; panics if it does not within `within`.
async fn assert_closed<S: AsyncRead + Unpin>(stream: &mut S, within: Duration, what: &str) {
    let mut buffer = [0u8; 256];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buffer)).await {
            Err(_) => panic!("{what}: the connection is still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue, // a 408 or similar before the close is fine
        }
    }
}

#[tokio::test]
async fn the_allowlist_admits_listed_sources_only_and_counts_the_rest() {
    let refused = start_relay("ingest:\n  allow: [203.0.113.0/24, 10.0.0.1]\n").await;
    let (status, answer) = post(&refused.url, None, SEED_XML).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("may not post"));
    // Refused before anything is read or stored.
    assert!(refused.query("SELECT id FROM events").is_empty());
    assert!(refused.query("SELECT body_hash FROM quarantine").is_empty());
    assert_eq!(
        refused
            .metric(r#"relay_postbacks_received_total{format="unknown",outcome="forbidden"}"#)
            .await,
        Some(1.0)
    );
    refused.shutdown().await;

    let admitted = start_relay("ingest:\n  allow: [127.0.0.1]\n").await;
    let (status, answer) = post(&admitted.url, None, SEED_XML).await;
    assert_eq!(status, 200, "{answer}");
    admitted.shutdown().await;
}

#[tokio::test]
async fn forwarded_for_is_believed_from_trusted_proxies_only() {
    // Loopback plays the load balancer.
    let relay =
        start_relay("ingest:\n  allow: [203.0.113.0/24]\n  trusted_proxies: [127.0.0.0/8]\n").await;
    let mut stream = connect(&relay).await;
    let cases = [
        ("X-Forwarded-For: 203.0.113.9\r\n", 200),
        // A client forging an allowed address on the left; the balancer appended the truth.
        ("X-Forwarded-For: 203.0.113.9, 198.51.100.1\r\n", 403),
        (
            "X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 203.0.113.10, 127.0.0.2\r\n",
            200,
        ),
        ("", 403),
    ];
    for (index, (headers, expected)) in cases.iter().enumerate() {
        let request =
            post_with_headers(&relay, "/sinch/postback", &format!("XFF-{index}"), headers);
        let response = exchange(&mut stream, &request).await;
        assert_eq!(
            response.status,
            *expected,
            "case {index} {headers:?}: {:?}",
            response.json()
        );
    }
    relay.shutdown().await;

    // The same forged header from a peer that is not a trusted proxy is ignored.
    let relay =
        start_relay("ingest:\n  allow: [203.0.113.0/24]\n  trusted_proxies: [10.0.0.0/8]\n").await;
    let mut stream = connect(&relay).await;
    let request = post_with_headers(
        &relay,
        "/sinch/postback",
        "XFF-forged",
        "X-Forwarded-For: 203.0.113.9\r\n",
    );
    assert_eq!(exchange(&mut stream, &request).await.status, 403);
    relay.shutdown().await;
}

#[tokio::test]
async fn proxy_protocol_headers_name_the_client() {
    let relay = start_relay(
        "ingest:\n  allow: [203.0.113.0/24, \"2001:db8::/32\"]\n  trusted_proxies: [127.0.0.1]\n  proxy_protocol: true\n",
    )
    .await;
    let allowed_v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 8080\r\n".to_vec();
    let refused_v1 = b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 8080\r\n".to_vec();
    let allowed_v2 = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "[2001:db8::7]:40000"
                .parse::<std::net::SocketAddr>()
                .unwrap(),
            "[2001:db8::1]:8080"
                .parse::<std::net::SocketAddr>()
                .unwrap(),
        ),
    )
    .build()
    .unwrap();
    for (name, header, expected) in [
        ("v1 allowed", allowed_v1, 200),
        ("v1 refused", refused_v1, 403),
        ("v2 allowed", allowed_v2, 200),
    ] {
        let mut stream = connect(&relay).await;
        let mut bytes = header;
        bytes.extend(post_with_headers(
            &relay,
            "/sinch/postback",
            &format!("PP-{name}"),
            "",
        ));
        let response = exchange(&mut stream, &bytes).await;
        assert_eq!(response.status, expected, "{name}: {:?}", response.json());
        // The connection stays usable after the header.
        let again = post_with_headers(&relay, "/sinch/postback", &format!("PP-{name}-2"), "");
        assert_eq!(
            exchange(&mut stream, &again).await.status,
            expected,
            "{name}, second request"
        );
    }
    // A trusted peer that sends no PROXY header is not served.
    let mut stream = connect(&relay).await;
    stream
        .write_all(&post_with_headers(&relay, "/sinch/postback", "PP-none", ""))
        .await
        .unwrap();
    assert_closed(&mut stream, WAIT, "a request without the PROXY header").await;
    relay.shutdown().await;
}

#[tokio::test]
async fn basic_auth_with_the_password_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "correct horse\n").unwrap();
    let relay = start_relay(&format!(
        "ingest:\n  basic_auth:\n    username: sinch\n    password: {{file: {}}}\n",
        password_file.display()
    ))
    .await;
    let encode = |credentials: &str| base64::engine::general_purpose::STANDARD.encode(credentials);
    let mut stream = connect(&relay).await;
    for (index, (header, expected)) in [
        (
            format!("Authorization: Basic {}\r\n", encode("sinch:correct horse")),
            200,
        ),
        (
            format!("Authorization: Basic {}\r\n", encode("sinch:wrong")),
            401,
        ),
        (
            format!("Authorization: Basic {}\r\n", encode("other:correct horse")),
            401,
        ),
        (String::new(), 401),
    ]
    .iter()
    .enumerate()
    {
        let request = post_with_headers(&relay, "/sinch/postback", &format!("BA-{index}"), header);
        let response = exchange(&mut stream, &request).await;
        assert_eq!(response.status, *expected, "case {index}");
        if *expected == 401 {
            assert!(response
                .header("www-authenticate")
                .unwrap()
                .starts_with("Basic"));
        }
    }
    assert_eq!(
        relay
            .metric(r#"relay_postbacks_received_total{format="unknown",outcome="unauthorized"}"#)
            .await,
        Some(3.0)
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_secret_path_token_is_required() {
    std::env::set_var("HARDENING_TEST_PATH_TOKEN", "tok-0123456789abcdef");
    let relay = start_relay("ingest:\n  path_token: {env: HARDENING_TEST_PATH_TOKEN}\n").await;
    let base = relay.url.clone();
    let (status, answer) = post(&format!("{base}/tok-0123456789abcdef"), None, SEED_XML).await;
    assert_eq!(status, 200, "{answer}");
    for wrong in [
        base.clone(),
        format!("{base}/tok-0123456789abcdeX"),
        format!("{base}/"),
    ] {
        let (status, _) = post(&wrong, None, SEED_XML).await;
        assert_eq!(status, 401, "{wrong}");
    }
    let (status, _) = post(&format!("{base}x/tok-0123456789abcdef"), None, SEED_XML).await;
    assert_eq!(status, 404);
    relay.shutdown().await;
}

#[tokio::test]
async fn slow_headers_are_cut_but_idle_keep_alive_is_not() {
    let relay = start_relay("ingest:\n  header_read_timeout: 1s\n  idle_timeout: 10s\n").await;

    // An idle keep-alive connection outlives the header deadline many times over.
    let mut sinch = connect(&relay).await;
    let first = post_with_headers(&relay, "/sinch/postback", "IDLE-1", "");
    assert_eq!(exchange(&mut sinch, &first).await.status, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = post_with_headers(&relay, "/sinch/postback", "IDLE-2", "");
    assert_eq!(
        exchange(&mut sinch, &second).await.status,
        200,
        "idle connection was cut"
    );

    // A client that trickles its headers is cut off and counted.
    let mut slow = connect(&relay).await;
    slow.write_all(b"POST /sinch/postback HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let trickle = async {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if slow.write_all(b"X-Slow: y\r\n").await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(4), trickle).await;
    assert_closed(&mut slow, Duration::from_secs(3), "a slowloris client").await;

    // A connection that never sends a byte is cut too.
    let mut silent = connect(&relay).await;
    assert_closed(&mut silent, Duration::from_secs(4), "a silent connection").await;

    let headers_cut = relay
        .metric(r#"relay_connection_timeouts_total{listener="ingest",phase="headers"}"#)
        .await;
    assert_eq!(headers_cut, Some(2.0));
    // Sinch's connection is still fine.
    let third = post_with_headers(&relay, "/sinch/postback", "IDLE-3", "");
    assert_eq!(exchange(&mut sinch, &third).await.status, 200);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_and_counted() {
    let relay = start_relay("ingest:\n  body_read_timeout: 1s\n").await;
    let mut stream = connect(&relay).await;
    stream
        .write_all(
            b"POST /sinch/postback HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n<postback>",
        )
        .await
        .unwrap();
    let response = read_response(&mut stream, WAIT).await;
    assert_eq!(response.status, 408);
    assert_eq!(
        relay
            .metric(r#"relay_connection_timeouts_total{listener="ingest",phase="body"}"#)
            .await,
        Some(1.0)
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let relay = start_relay("ingest:\n  max_connections: 2\n").await;
    let mut first = connect(&relay).await;
    let mut second = connect(&relay).await;
    for (stream, id) in [(&mut first, "CAP-1"), (&mut second, "CAP-2")] {
        let request = post_with_headers(&relay, "/sinch/postback", id, "");
        assert_eq!(exchange(stream, &request).await.status, 200);
    }
    // The third connection is accepted by the kernel but not served...
    let mut third = connect(&relay).await;
    third
        .write_all(&post_with_headers(&relay, "/sinch/postback", "CAP-3", ""))
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(700), third.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "a third connection was served beyond the cap"
    );
    // ...until a slot frees up.
    drop(first);
    let response = read_response(&mut third, WAIT).await;
    assert_eq!(response.status, 200);
    relay.shutdown().await;
}

/// A TLS connection to the relay that trusts only `root`.
async fn tls_connect(
    relay: &TestRelay,
    root: &rustls_pki_types::CertificateDer<'static>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    tls::connect(ingest_addr(relay), root).await
}

#[tokio::test]
async fn tls_serves_postbacks_and_reloads_the_certificate_without_dropping_connections() {
    let certs = tempfile::tempdir().unwrap();
    let first_cert = tls::write_certificate(certs.path());
    let relay = start_relay(&format!(
        "tls:\n  cert: {}\n  key: {}\n",
        certs.path().join("cert.pem").display(),
        certs.path().join("key.pem").display()
    ))
    .await;
    let mut old = tls_connect(&relay, &first_cert).await;
    let request = post_with_headers(&relay, "/sinch/postback", "TLS-1", "");
    assert_eq!(exchange(&mut old, &request).await.status, 200);

    // Plain HTTP on the TLS port gets nowhere.
    let mut plain = connect(&relay).await;
    plain
        .write_all(&post_with_headers(
            &relay,
            "/sinch/postback",
            "TLS-plain",
            "",
        ))
        .await
        .unwrap();
    assert_closed(&mut plain, WAIT, "plain HTTP on the TLS listener").await;

    // Rotate: new files, then the reload SIGHUP triggers.
    let second_cert = tls::write_certificate(certs.path());
    relay.handle.as_ref().unwrap().reload();
    let mut new = tls_connect(&relay, &second_cert).await;
    let request = post_with_headers(&relay, "/sinch/postback", "TLS-2", "");
    assert_eq!(exchange(&mut new, &request).await.status, 200);
    // The connection opened before the reload keeps working.
    let request = post_with_headers(&relay, "/sinch/postback", "TLS-3", "");
    assert_eq!(exchange(&mut old, &request).await.status, 200);

    // A broken reload keeps the current certificate.
    std::fs::write(certs.path().join("cert.pem"), "not a certificate").unwrap();
    relay.handle.as_ref().unwrap().reload();
    let mut after_bad = tls_connect(&relay, &second_cert).await;
    let request = post_with_headers(&relay, "/sinch/postback", "TLS-4", "");
    assert_eq!(exchange(&mut after_bad, &request).await.status, 200);
    relay.shutdown().await;
}
