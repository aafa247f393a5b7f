//! Who may post, and slow or hostile clients, over real loopback connections:
//! the allowlist (applied at accept), trusted proxies (X-Forwarded-For and the
//! PROXY protocol), basic auth, the path token, TLS with certificate reload,
//! the header and idle clocks, the connection caps (total, per source, HTTP/2
//! streams), and refused peers that must not starve allowed ones. Several
//! source addresses are played with loopback aliases (127.0.0.x).

use std::time::Duration;

use crate::common::raw::{post_bytes, read_response, RawResponse};
use crate::common::*;
use base64::Engine;
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

/// A connection to the ingest listener from the loopback alias `local`
/// (127.0.0.x works on Linux without setup), so tests can play several
/// source addresses.
async fn connect_from(relay: &TestRelay, local: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{local}:0").parse().unwrap())
        .expect("bind a loopback alias");
    socket.connect(ingest_addr(relay)).await.expect("connect")
}

/// Asserts the relay closed `stream` without answering a byte (a refusal at
/// accept, or right after the PROXY header), within `within`.
async fn assert_refused<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    within: Duration,
    what: &str,
) {
    // The request may or may not reach a socket the relay already closed.
    let _ = stream
        .write_all(b"POST /sinch/postback HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buffer = [0u8; 256];
    match tokio::time::timeout(within, stream.read(&mut buffer)).await {
        Err(_) => panic!("{what}: the connection is still open after {within:?}"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!(
            "{what}: answered instead of closed: {:?}",
            String::from_utf8_lossy(&buffer[..n])
        ),
    }
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
    // Closed at accept, before a byte is read or stored.
    let mut stream = connect(&refused).await;
    assert_refused(&mut stream, WAIT, "a peer not on the allowlist").await;
    assert!(refused.query("SELECT id FROM events").is_empty());
    assert!(refused.query("SELECT body_hash FROM quarantine").is_empty());
    assert_eq!(
        refused
            .metric(r#"relay_connections_refused_total{listener="ingest",reason="not_allowed"}"#)
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
        let mut stream = connect(&relay).await;
        let request =
            post_with_headers(&relay, "/sinch/postback", &format!("XFF-{index}"), headers);
        let response = exchange(&mut stream, &request).await;
        assert_eq!(
            response.status,
            *expected,
            "case {index} {headers:?}: {:?}",
            response.json()
        );
        if *expected == 403 {
            // A refused client keeps no keep-alive connection to sit on.
            assert_eq!(response.header("connection"), Some("close"));
            assert_closed(&mut stream, Duration::from_secs(2), "a 403 answer").await;
        }
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
    let _ = stream.write_all(&request).await;
    assert_refused(
        &mut stream,
        WAIT,
        "a forged X-Forwarded-For from an untrusted peer",
    )
    .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn proxy_protocol_headers_name_the_client() {
    let relay = start_relay(
        "ingest:\n  allow: [203.0.113.0/24, \"2001:db8::/32\"]\n  trusted_proxies: [127.0.0.1]\n  proxy_protocol: true\n",
    )
    .await;
    let allowed_v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 8080\r\n".to_vec();
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
    for (name, header) in [("v1", allowed_v1), ("v2", allowed_v2)] {
        let mut stream = connect(&relay).await;
        let mut bytes = header;
        bytes.extend(post_with_headers(
            &relay,
            "/sinch/postback",
            &format!("PP-{name}"),
            "",
        ));
        let response = exchange(&mut stream, &bytes).await;
        assert_eq!(response.status, 200, "{name}: {:?}", response.json());
        // The connection stays usable after the header.
        let again = post_with_headers(&relay, "/sinch/postback", &format!("PP-{name}-2"), "");
        assert_eq!(
            exchange(&mut stream, &again).await.status,
            200,
            "{name}, second request"
        );
    }
    // A client the header names that may not post: closed right after the header.
    let mut stream = connect(&relay).await;
    stream
        .write_all(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 8080\r\n")
        .await
        .unwrap();
    assert_refused(&mut stream, WAIT, "a PROXY client not on the allowlist").await;
    assert_eq!(
        relay
            .metric(r#"relay_connections_refused_total{listener="ingest",reason="not_allowed"}"#)
            .await,
        Some(1.0)
    );
    // A trusted peer that sends no PROXY header is not served.
    let mut stream = connect(&relay).await;
    stream
        .write_all(&post_with_headers(&relay, "/sinch/postback", "PP-none", ""))
        .await
        .unwrap();
    assert_closed(&mut stream, WAIT, "a request without the PROXY header").await;
    relay.shutdown().await;
}

/// An L4 balancer passes HTTP headers through untouched: on a connection
/// that carried a PROXY header, `X-Forwarded-For` is the client's own word
/// and is never read, even when the PROXY client lies in a trusted range, and
/// `PROXY UNKNOWN` names no client (the balancer is the client).
#[tokio::test]
async fn forwarded_for_is_never_read_on_a_proxy_protocol_connection() {
    let relay = start_relay(
        "ingest:\n  allow: [203.0.113.0/24]\n  trusted_proxies: [127.0.0.1, 203.0.113.0/24, 10.0.0.0/8]\n  proxy_protocol: true\n",
    )
    .await;
    let forged = |id: &str, xff: &str| {
        post_with_headers(
            &relay,
            "/sinch/postback",
            id,
            &format!("X-Forwarded-For: {xff}\r\n"),
        )
    };
    // An allowed client with a forged header naming a refused address: the
    // PROXY client decides.
    let mut stream = connect(&relay).await;
    let mut bytes = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 8080\r\n".to_vec();
    bytes.extend(forged("PPX-allowed", "198.51.100.1"));
    let response = exchange(&mut stream, &bytes).await;
    assert_eq!(response.status, 200, "{:?}", response.json());

    // A host in a trusted range impersonating Sinch through the header.
    let mut stream = connect(&relay).await;
    let mut bytes = b"PROXY TCP4 10.1.1.1 127.0.0.1 40000 8080\r\n".to_vec();
    bytes.extend(forged("PPX-impersonated", "203.0.113.9"));
    let _ = stream.write_all(&bytes).await;
    assert_refused(
        &mut stream,
        WAIT,
        "a trusted-range PROXY client with a forged XFF",
    )
    .await;

    // UNKNOWN carries no client: the balancer (127.0.0.1) is not allowed.
    let mut stream = connect(&relay).await;
    let mut bytes = b"PROXY UNKNOWN\r\n".to_vec();
    bytes.extend(forged("PPX-unknown", "203.0.113.9"));
    let _ = stream.write_all(&bytes).await;
    assert_refused(&mut stream, WAIT, "PROXY UNKNOWN with a forged XFF").await;
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
        let mut stream = connect(&relay).await;
        let request = post_with_headers(&relay, "/sinch/postback", &format!("BA-{index}"), header);
        let response = exchange(&mut stream, &request).await;
        assert_eq!(response.status, *expected, "case {index}");
        if *expected == 401 {
            assert!(response
                .header("www-authenticate")
                .unwrap()
                .starts_with("Basic"));
            // No next guess on the same connection.
            assert_eq!(response.header("connection"), Some("close"));
            assert_closed(&mut stream, Duration::from_secs(2), "a 401 answer").await;
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
async fn connections_beyond_the_cap_are_closed_and_counted() {
    let relay = start_relay("ingest:\n  max_connections: 2\n").await;
    let mut first = connect(&relay).await;
    let mut second = connect(&relay).await;
    for (stream, id) in [(&mut first, "CAP-1"), (&mut second, "CAP-2")] {
        let request = post_with_headers(&relay, "/sinch/postback", id, "");
        assert_eq!(exchange(stream, &request).await.status, 200);
    }
    // A third connection is closed at once rather than left waiting: the
    // accept loop keeps running whatever the slots.
    let mut third = connect(&relay).await;
    assert_refused(&mut third, WAIT, "a connection beyond the cap").await;
    assert_eq!(
        relay
            .metric(r#"relay_connections_refused_total{listener="ingest",reason="no_slot"}"#)
            .await,
        Some(1.0)
    );
    // A slot that frees up is given to the next connection.
    drop(first);
    eventually(WAIT, "a freed slot serves a new connection", || {
        let relay = &relay;
        async move {
            let mut stream = connect(relay).await;
            let request = post_with_headers(relay, "/sinch/postback", "CAP-4", "");
            stream.write_all(&request).await.ok()?;
            let mut status = [0u8; 12];
            let read = tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut status));
            matches!(read.await, Ok(Ok(_)) if &status == b"HTTP/1.1 200").then_some(())
        }
    })
    .await;
    relay.shutdown().await;
}

/// Issue 13, item 1: with every slot in reach of refused peers, an allowed
/// client must still be answered while any number of them hammer the port.
/// Before the fix, four idle connections from a refused address held all four
/// slots and the allowed postback waited in the backlog for the idle clock.
#[tokio::test]
async fn refused_peers_hammering_the_port_cannot_starve_an_allowed_client() {
    bounded(Duration::from_secs(60), "starvation test", async {
        let relay = start_relay(
            "ingest:\n  max_connections: 4\n  allow: [127.0.0.2/32]\n  idle_timeout: 120s\n  header_read_timeout: 60s\n",
        )
        .await;
        let addr = ingest_addr(&relay);
        let stop = tokio_util::sync::CancellationToken::new();
        let hammers: Vec<_> = (0..4)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    // Each holds its first 8 connections from 127.0.0.1 open
                    // (a started request, then silence), and opens and drops
                    // more as fast as it can.
                    let mut held = Vec::new();
                    let mut made = 0u64;
                    while !stop.is_cancelled() {
                        let socket = tokio::net::TcpSocket::new_v4().unwrap();
                        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
                        let connect = tokio::time::timeout(Duration::from_secs(1), socket.connect(addr));
                        if let Ok(Ok(mut stream)) = connect.await {
                            made += 1;
                            let _ = stream.write_all(b"POST /sinch/postback HTTP/1.1\r\n").await;
                            if held.len() < 8 {
                                held.push(stream);
                            }
                        }
                        tokio::task::yield_now().await;
                    }
                    made
                })
            })
            .collect();
        // Let the flood fill whatever it can.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for round in 0..3 {
            // Far below the idle and header clocks the refused peers would
            // hold a slot for.
            let answered = tokio::time::timeout(Duration::from_secs(5), async {
                let mut sinch = connect_from(&relay, "127.0.0.2").await;
                let request =
                    post_with_headers(&relay, "/sinch/postback", &format!("STARVE-{round}"), "");
                sinch.write_all(&request).await.unwrap();
                read_response(&mut sinch, WAIT).await
            });
            let response = answered
                .await
                .unwrap_or_else(|_| panic!("round {round}: the allowed client was not answered within 5 s"));
            assert_eq!(response.status, 200, "round {round}");
        }
        stop.cancel();
        let mut made = 0;
        for hammer in hammers {
            made += hammer.await.unwrap();
        }
        assert!(made > 4, "the flood made only {made} connections");
        let refused = relay
            .metric(r#"relay_connections_refused_total{listener="ingest",reason="not_allowed"}"#)
            .await
            .unwrap_or(0.0);
        assert!(refused >= 4.0, "refused {refused} of {made}");
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn one_source_address_cannot_take_every_slot() {
    let relay =
        start_relay("ingest:\n  max_connections: 20\n  allow: [127.0.0.2, 127.0.0.3]\n").await;
    // The default cap: 8 connections per source address.
    let mut held = Vec::new();
    for index in 0..8 {
        let mut stream = connect_from(&relay, "127.0.0.2").await;
        let request = post_with_headers(&relay, "/sinch/postback", &format!("SRC-{index}"), "");
        assert_eq!(
            exchange(&mut stream, &request).await.status,
            200,
            "connection {index}"
        );
        held.push(stream);
    }
    let mut ninth = connect_from(&relay, "127.0.0.2").await;
    assert_refused(&mut ninth, WAIT, "a ninth connection from one address").await;
    assert_eq!(
        relay
            .metric(
                r#"relay_connections_refused_total{listener="ingest",reason="per_source_limit"}"#
            )
            .await,
        Some(1.0)
    );
    // Another address is still served, and the first one on its open connections.
    let mut other = connect_from(&relay, "127.0.0.3").await;
    let request = post_with_headers(&relay, "/sinch/postback", "SRC-other", "");
    assert_eq!(exchange(&mut other, &request).await.status, 200);
    let request = post_with_headers(&relay, "/sinch/postback", "SRC-again", "");
    assert_eq!(exchange(&mut held[0], &request).await.status, 200);
    relay.shutdown().await;
}

/// The frames of an HTTP/2 connection opened with prior knowledge, read raw:
/// the server's first SETTINGS frame, as `(identifier, value)` pairs.
async fn server_settings(stream: &mut TcpStream) -> Vec<(u16, u32)> {
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    loop {
        let mut head = [0u8; 9];
        tokio::time::timeout(WAIT, stream.read_exact(&mut head))
            .await
            .expect("a frame in time")
            .expect("a frame head");
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; length];
        stream
            .read_exact(&mut payload)
            .await
            .expect("a frame payload");
        // SETTINGS (type 4) without the ACK flag.
        if head[3] == 4 && head[4] & 1 == 0 {
            return payload
                .chunks_exact(6)
                .map(|entry| {
                    (
                        u16::from_be_bytes([entry[0], entry[1]]),
                        u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]),
                    )
                })
                .collect();
        }
    }
}

#[tokio::test]
async fn http2_streams_per_connection_are_capped() {
    const MAX_CONCURRENT_STREAMS: u16 = 3;
    for (config, expected) in [("", 16), ("ingest:\n  max_concurrent_streams: 5\n", 5)] {
        let relay = start_relay(config).await;
        let mut stream = connect(&relay).await;
        let settings = server_settings(&mut stream).await;
        let announced = settings
            .iter()
            .find(|(id, _)| *id == MAX_CONCURRENT_STREAMS)
            .map(|(_, value)| *value);
        assert_eq!(announced, Some(expected), "{config:?}: {settings:?}");
        relay.shutdown().await;
    }
}

/// A 403 on HTTP/2 ends the connection too (GOAWAY, then close).
#[tokio::test]
async fn a_refusal_ends_an_http2_connection() {
    let relay =
        start_relay("ingest:\n  allow: [203.0.113.0/24]\n  trusted_proxies: [127.0.0.0/8]\n").await;
    let stream = connect(&relay).await;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let request = hyper::Request::post(format!("http://{}/sinch/postback", ingest_addr(&relay)))
        .header("content-type", "text/xml")
        .header("x-forwarded-for", "198.51.100.1")
        .body(http_body_util::Full::new(bytes::Bytes::from(mo_xml(
            "H2-403", "all", "28444",
        ))))
        .unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    assert_eq!(response.status(), 403);
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the relay closes the HTTP/2 connection after a 403")
        .expect("connection task")
        .ok();
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
