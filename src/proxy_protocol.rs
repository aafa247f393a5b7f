//! PROXY protocol v1/v2 (HAProxy, AWS NLB): an L4 balancer prefixes the TCP
//! stream with the real client's address. The header is read only from peers
//! in `ingest.trusted_proxies`; parsing is the `ppp` crate's.
//!
//! What the header said is kept with the connection ([`ProxyHeader`]): an L4
//! balancer never cleans HTTP headers, so on such a connection the client is
//! the one named here and `X-Forwarded-For` is never read.

use std::net::SocketAddr;

use ppp::{HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest header there is (v2 with addresses and TLVs is bounded by its
/// 16-bit length; real balancers send far less).
const MAX_HEADER: usize = 16 + 65_535;

/// What a connection's PROXY header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// `PROXY TCP4/TCP6` (v1) or a v2 `PROXY` command: the real client.
    Client(SocketAddr),
    /// `PROXY UNKNOWN` (v1), or v2 `LOCAL`/unspecified: the balancer speaks for
    /// itself (health checks); it names no client, so the balancer's own
    /// address is the client.
    Local,
}

/// Reads the PROXY header at the start of `stream`. Returns what it says and
/// any bytes read past the header, which belong to the HTTP stream.
pub async fn read_header(stream: &mut TcpStream) -> Result<(ProxyHeader, Vec<u8>), String> {
    let mut buffer = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let read = stream
            .read(&mut chunk)
            .await
            .map_err(|err| format!("reading the PROXY header: {err}"))?;
        if read == 0 {
            return Err("connection closed before the PROXY header ended".into());
        }
        buffer.extend_from_slice(&chunk[..read]);
        let header = HeaderResult::parse(&buffer);
        if header.is_incomplete() {
            if buffer.len() > MAX_HEADER {
                return Err("PROXY header too long".into());
            }
            continue;
        }
        let (client, length) = match header {
            HeaderResult::V1(Ok(header)) => (
                match header.addresses {
                    ppp::v1::Addresses::Tcp4(ip) => {
                        Some(SocketAddr::from((ip.source_address, ip.source_port)))
                    }
                    ppp::v1::Addresses::Tcp6(ip) => {
                        Some(SocketAddr::from((ip.source_address, ip.source_port)))
                    }
                    ppp::v1::Addresses::Unknown => None,
                },
                header.header.len(),
            ),
            HeaderResult::V2(Ok(header)) => (
                match header.addresses {
                    ppp::v2::Addresses::IPv4(ip) => {
                        Some(SocketAddr::from((ip.source_address, ip.source_port)))
                    }
                    ppp::v2::Addresses::IPv6(ip) => {
                        Some(SocketAddr::from((ip.source_address, ip.source_port)))
                    }
                    ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
                },
                header.len(),
            ),
            HeaderResult::V1(Err(err)) => return Err(format!("invalid PROXY v1 header: {err}")),
            HeaderResult::V2(Err(err)) => return Err(format!("invalid PROXY v2 header: {err}")),
        };
        let rest = buffer.split_off(length);
        return Ok((client.map_or(ProxyHeader::Local, ProxyHeader::Client), rest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn through_socket(bytes: &'static [u8]) -> Result<(ProxyHeader, Vec<u8>), String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(bytes).await.unwrap();
            stream
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let _client = client.await.unwrap();
        read_header(&mut server).await
    }

    #[tokio::test]
    async fn v1_header_and_the_bytes_after_it() {
        let (client, rest) =
            through_socket(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 8080\r\nPOST / HTTP/1.1\r\n")
                .await
                .unwrap();
        assert_eq!(
            client,
            ProxyHeader::Client("203.0.113.7:40000".parse().unwrap())
        );
        assert_eq!(rest, b"POST / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn v2_header() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "[2001:db8::7]:40000".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:8080".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let bytes: &'static [u8] =
            Box::leak([header.as_slice(), b"GET"].concat().into_boxed_slice());
        let (client, rest) = through_socket(bytes).await.unwrap();
        assert_eq!(
            client,
            ProxyHeader::Client("[2001:db8::7]:40000".parse().unwrap())
        );
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn unknown_and_local_name_no_client() {
        let (header, rest) = through_socket(b"PROXY UNKNOWN\r\nGET").await.unwrap();
        assert_eq!(header, ProxyHeader::Local);
        assert_eq!(rest, b"GET");
        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        let bytes: &'static [u8] = Box::leak(local.into_boxed_slice());
        let (header, rest) = through_socket(bytes).await.unwrap();
        assert_eq!(header, ProxyHeader::Local);
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn garbage_is_an_error() {
        assert!(through_socket(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_err());
    }
}
