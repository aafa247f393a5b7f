//! Who may post: the source allowlist, the trusted proxies whose word about the
//! client address is believed, and the optional credentials (basic auth, a
//! secret path token). Every decision here is a pure function of the
//! connection and the request headers, so it is tested without sockets.
//!
//! The allowlist is applied twice. At accept, to the TCP peer
//! ([`AccessPolicy::admit`]): a peer that may not post is closed before a
//! byte is read or a connection slot is taken, so refused clients cannot
//! crowd out Sinch. Behind a trusted proxy the client is known only later
//! (from the PROXY header, or per request from `X-Forwarded-For`), so the
//! check runs again then ([`AccessPolicy::check`]).

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hyper::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{Cidr, IngestConfig};
use crate::proxy_protocol::ProxyHeader;

/// What the accept loop learned about a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The TCP peer.
    pub peer: std::net::SocketAddr,
    /// What the PROXY header of a trusted L4 balancer said, when the
    /// connection carried one: then `X-Forwarded-For` is never read.
    pub proxy: Option<ProxyHeader>,
}

/// The access rules of the public listener.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    allow: Vec<Cidr>,
    trusted_proxies: Vec<Cidr>,
    /// SHA-256 of `Basic base64(user:password)`: the compare of two digests
    /// (one length) reveals not even the credentials' length, and the
    /// credentials themselves are not kept.
    basic_auth: Option<Vec<u8>>,
    /// SHA-256 of the secret last path segment.
    path_token: Option<Vec<u8>>,
}

/// Why a request is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The client address is not on the allowlist (403).
    Forbidden,
    /// Credentials missing or wrong (401).
    Unauthorized,
}

/// What the accept loop does with a TCP peer, before reading from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Not on the allowlist and not a trusted proxy: closed at once.
    Refused,
    /// May post (on the allowlist, or the allowlist is empty).
    Client,
    /// A load balancer in `trusted_proxies`: the client it speaks for is
    /// checked once known (PROXY header, or each request's `X-Forwarded-For`).
    TrustedProxy,
}

impl AccessPolicy {
    /// Builds the policy from a validated config (secrets are read here).
    pub fn new(config: &IngestConfig) -> Result<AccessPolicy, String> {
        let basic_auth = match &config.basic_auth {
            Some(auth) => {
                let password = auth
                    .password
                    .resolve()
                    .map_err(|e| format!("ingest.basic_auth.password: {e}"))?;
                let encoded = STANDARD.encode(format!("{}:{password}", auth.username));
                Some(Sha256::digest(format!("Basic {encoded}")).to_vec())
            }
            None => None,
        };
        let path_token = match &config.path_token {
            Some(token) => {
                let token = token
                    .resolve()
                    .map_err(|e| format!("ingest.path_token: {e}"))?;
                Some(Sha256::digest(token.as_bytes()).to_vec())
            }
            None => None,
        };
        Ok(AccessPolicy {
            allow: config.allow.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            basic_auth,
            path_token,
        })
    }

    /// Whether the allowlist is empty (everyone may post).
    pub fn allows_everyone(&self) -> bool {
        self.allow.is_empty()
    }

    /// Whether Sinch posts to `{path}/{token}` rather than `{path}`.
    pub fn uses_path_token(&self) -> bool {
        self.path_token.is_some()
    }

    /// Whether basic auth is required (401 answers then carry a challenge).
    pub fn uses_basic_auth(&self) -> bool {
        self.basic_auth.is_some()
    }

    /// Whether `addr` is a load balancer whose headers are believed.
    pub fn is_trusted_proxy(&self, addr: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(addr))
    }

    /// Whether `client` is on the allowlist (an empty one allows everyone).
    pub fn is_allowed(&self, client: IpAddr) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|net| net.contains(client))
    }

    /// The accept-time decision on a TCP peer. A trusted proxy is admitted
    /// whatever the allowlist says (its clients are checked later).
    pub fn admit(&self, peer: IpAddr) -> Admission {
        if self.is_trusted_proxy(peer) {
            Admission::TrustedProxy
        } else if self.is_allowed(peer) {
            Admission::Client
        } else {
            Admission::Refused
        }
    }

    /// The address of the real client.
    ///
    /// On a connection that carried a PROXY header, the client it named (or,
    /// after `UNKNOWN`/`LOCAL`, the balancer itself); `X-Forwarded-For` is
    /// then never read: an L4 balancer passes HTTP headers through untouched,
    /// so they are the client's own words. Otherwise, starting from the TCP
    /// peer, as long as the address is a trusted proxy, step to the right-most
    /// `X-Forwarded-For` hop not yet used. A forged header from an untrusted
    /// peer is never read.
    pub fn client_addr(&self, connection: &ConnectionInfo, headers: &HeaderMap) -> IpAddr {
        match connection.proxy {
            Some(ProxyHeader::Client(client)) => return client.ip(),
            Some(ProxyHeader::Local) => return connection.peer.ip(),
            None => {}
        }
        let mut addr = connection.peer.ip();
        if !self.is_trusted_proxy(addr) {
            return addr;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev() {
            match parse_hop(hop) {
                Ok(hop) => {
                    addr = hop;
                    if !self.is_trusted_proxy(hop) {
                        break;
                    }
                }
                // Garbage in the chain: stop at the last address we could trust.
                Err(_) => break,
            }
        }
        addr
    }

    /// Checks the allowlist and the credentials; `path_rest` is what follows
    /// `ingest.path` in the request path.
    pub fn check(
        &self,
        client: IpAddr,
        headers: &HeaderMap,
        path_rest: &str,
    ) -> Result<(), Denied> {
        if !self.is_allowed(client) {
            return Err(Denied::Forbidden);
        }
        if let Some(token) = &self.path_token {
            let given = path_rest.strip_prefix('/').unwrap_or("");
            // Digests have one length: the compare reveals not even the
            // token's length.
            let given = Sha256::digest(given.as_bytes());
            if !bool::from(given.as_slice().ct_eq(token.as_slice())) {
                return Err(Denied::Unauthorized);
            }
        }
        if let Some(expected) = &self.basic_auth {
            let given = headers
                .get(AUTHORIZATION)
                .map(|value| value.as_bytes())
                .unwrap_or_default();
            // As for the path token: digests of one length, so the compare
            // does not stop early at a length mismatch.
            let given = Sha256::digest(given);
            if !bool::from(given.as_slice().ct_eq(expected.as_slice())) {
                return Err(Denied::Unauthorized);
            }
        }
        Ok(())
    }
}

/// One `X-Forwarded-For` hop: an address, possibly with a port
/// (`203.0.113.7:5678`, `[2001:db8::7]:443`), as some balancers write it.
fn parse_hop(hop: &str) -> Result<IpAddr, std::net::AddrParseError> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|addr| addr.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BasicAuthConfig, SecretSource};

    fn cidr(text: &str) -> Cidr {
        serde_json::from_value(serde_json::json!(text)).unwrap()
    }

    fn policy(allow: &[&str], trusted: &[&str]) -> AccessPolicy {
        AccessPolicy {
            allow: allow.iter().map(|c| cidr(c)).collect(),
            trusted_proxies: trusted.iter().map(|c| cidr(c)).collect(),
            ..AccessPolicy::default()
        }
    }

    fn connection(peer: &str) -> ConnectionInfo {
        ConnectionInfo {
            peer: format!("{peer}:40000").parse().unwrap(),
            proxy: None,
        }
    }

    fn xff(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().unwrap());
        headers
    }

    #[test]
    fn forged_forwarded_for_from_an_untrusted_peer_is_ignored() {
        let p = policy(&["203.0.113.0/24"], &["10.0.0.0/8"]);
        let client = p.client_addr(&connection("198.51.100.9"), &xff("203.0.113.5"));
        assert_eq!(client, "198.51.100.9".parse::<IpAddr>().unwrap());
        assert_eq!(
            p.check(client, &HeaderMap::new(), ""),
            Err(Denied::Forbidden)
        );
    }

    #[test]
    fn right_most_untrusted_hop_behind_trusted_proxies() {
        let p = policy(&["203.0.113.0/24"], &["10.0.0.0/8"]);
        // The client forged the left-most entry; the balancers appended the truth.
        let headers = xff("203.0.113.66, 198.51.100.9, 10.1.1.1");
        let client = p.client_addr(&connection("10.2.2.2"), &headers);
        assert_eq!(client, "198.51.100.9".parse::<IpAddr>().unwrap());
        let headers = xff("203.0.113.5");
        let client = p.client_addr(&connection("10.2.2.2"), &headers);
        assert_eq!(p.check(client, &headers, ""), Ok(()));
    }

    #[test]
    fn forwarded_hops_with_ports() {
        let p = policy(&["203.0.113.0/24"], &["10.0.0.0/8"]);
        for (value, expected) in [
            ("203.0.113.9:5678", "203.0.113.9"),
            ("[2001:db8::7]:443", "2001:db8::7"),
            ("203.0.113.9:5678, 10.1.1.1:80", "203.0.113.9"),
        ] {
            let client = p.client_addr(&connection("10.2.2.2"), &xff(value));
            assert_eq!(client, expected.parse::<IpAddr>().unwrap(), "{value}");
        }
    }

    fn proxied(header: ProxyHeader) -> ConnectionInfo {
        ConnectionInfo {
            peer: "10.0.0.1:5000".parse().unwrap(),
            proxy: Some(header),
        }
    }

    #[test]
    fn proxy_protocol_source_counts_as_the_peer() {
        let p = policy(&["203.0.113.0/24"], &["10.0.0.0/8"]);
        let conn = proxied(ProxyHeader::Client("203.0.113.7:6000".parse().unwrap()));
        let client = p.client_addr(&conn, &HeaderMap::new());
        assert_eq!(client, "203.0.113.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_for_is_never_read_on_a_proxy_protocol_connection() {
        // The PROXY client is itself in a trusted range: its forged header
        // must still not name the client.
        let p = policy(&["203.0.113.0/24"], &["10.0.0.0/8"]);
        let conn = proxied(ProxyHeader::Client("10.9.9.9:6000".parse().unwrap()));
        let client = p.client_addr(&conn, &xff("203.0.113.5"));
        assert_eq!(client, "10.9.9.9".parse::<IpAddr>().unwrap());
        assert_eq!(
            p.check(client, &HeaderMap::new(), ""),
            Err(Denied::Forbidden)
        );
        // An allowed PROXY client with a forged header stays itself.
        let conn = proxied(ProxyHeader::Client("203.0.113.7:6000".parse().unwrap()));
        let client = p.client_addr(&conn, &xff("198.51.100.1"));
        assert_eq!(client, "203.0.113.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn unknown_or_local_proxy_header_means_the_balancer_is_the_client() {
        let p = policy(&["203.0.113.0/24"], &["10.0.0.0/8"]);
        let client = p.client_addr(&proxied(ProxyHeader::Local), &xff("203.0.113.5"));
        assert_eq!(client, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            p.check(client, &HeaderMap::new(), ""),
            Err(Denied::Forbidden)
        );
        // Unless the balancer is listed itself.
        let p = policy(&["203.0.113.0/24", "10.0.0.1"], &["10.0.0.0/8"]);
        let client = p.client_addr(&proxied(ProxyHeader::Local), &HeaderMap::new());
        assert_eq!(p.check(client, &HeaderMap::new(), ""), Ok(()));
    }

    #[test]
    fn admission_at_accept() {
        let p = policy(&["203.0.113.0/24"], &["10.0.0.0/8"]);
        for (peer, expected) in [
            ("203.0.113.9", Admission::Client),
            ("198.51.100.1", Admission::Refused),
            ("10.1.2.3", Admission::TrustedProxy),
        ] {
            assert_eq!(p.admit(peer.parse().unwrap()), expected, "{peer}");
        }
        // An empty allowlist admits everyone.
        let open = policy(&[], &[]);
        assert_eq!(
            open.admit("198.51.100.1".parse().unwrap()),
            Admission::Client
        );
    }

    #[test]
    fn single_addresses_and_mapped_ipv6() {
        let p = policy(&["203.0.113.7", "2001:db8::/32"], &[]);
        for (addr, allowed) in [
            ("203.0.113.7", true),
            ("203.0.113.8", false),
            ("::ffff:203.0.113.7", true),
            ("2001:db8::1", true),
        ] {
            let result = p.check(addr.parse().unwrap(), &HeaderMap::new(), "");
            assert_eq!(result.is_ok(), allowed, "{addr}");
        }
    }

    #[test]
    fn credentials() {
        std::env::set_var("ACCESS_TEST_PASSWORD", "s3cret");
        std::env::set_var("ACCESS_TEST_TOKEN", "0123456789abcdef");
        let config = IngestConfig {
            basic_auth: Some(BasicAuthConfig {
                username: "sinch".into(),
                password: SecretSource {
                    file: None,
                    env: Some("ACCESS_TEST_PASSWORD".into()),
                },
            }),
            path_token: Some(SecretSource {
                file: None,
                env: Some("ACCESS_TEST_TOKEN".into()),
            }),
            ..IngestConfig::default()
        };
        let p = AccessPolicy::new(&config).unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut good = HeaderMap::new();
        good.insert(
            AUTHORIZATION,
            format!("Basic {}", STANDARD.encode("sinch:s3cret"))
                .parse()
                .unwrap(),
        );
        let mut bad = HeaderMap::new();
        bad.insert(
            AUTHORIZATION,
            format!("Basic {}", STANDARD.encode("sinch:guess"))
                .parse()
                .unwrap(),
        );
        assert_eq!(p.check(ip, &good, "/0123456789abcdef"), Ok(()));
        assert_eq!(
            p.check(ip, &bad, "/0123456789abcdef"),
            Err(Denied::Unauthorized)
        );
        assert_eq!(
            p.check(ip, &HeaderMap::new(), "/0123456789abcdef"),
            Err(Denied::Unauthorized)
        );
        assert_eq!(p.check(ip, &good, "/wrong"), Err(Denied::Unauthorized));
        assert_eq!(p.check(ip, &good, ""), Err(Denied::Unauthorized));
        assert!(p.uses_path_token() && p.uses_basic_auth());
    }

    /// The timing of the compare cannot be measured reliably in a test; what
    /// is checked is its shape: wrong credentials of every length (shorter,
    /// a prefix, equal, longer) are refused, and the policy keeps only a
    /// digest of one fixed length, so the compare has nothing of the
    /// credentials' length to reveal.
    #[test]
    fn basic_auth_compares_digests_of_one_length() {
        std::env::set_var("ACCESS_TEST_DIGEST_PASSWORD", "correct horse");
        let config = IngestConfig {
            basic_auth: Some(BasicAuthConfig {
                username: "sinch".into(),
                password: SecretSource {
                    file: None,
                    env: Some("ACCESS_TEST_DIGEST_PASSWORD".into()),
                },
            }),
            ..IngestConfig::default()
        };
        let p = AccessPolicy::new(&config).unwrap();
        let encoded = STANDARD.encode("sinch:correct horse");
        let expected = p.basic_auth.as_deref().unwrap();
        assert_eq!(expected.len(), 32, "a SHA-256 digest is kept");
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, value.parse().unwrap());
            headers
        };
        let right = format!("Basic {encoded}");
        assert_eq!(p.check(ip, &with(&right), ""), Ok(()));
        let same_length = format!("Basic {}", STANDARD.encode("sinch:correct horsE"));
        assert_eq!(same_length.len(), right.len());
        for wrong in [
            "Basic".to_owned(),
            right[..right.len() - 1].to_owned(),
            same_length,
            format!("{right}x"),
            format!("{right}{}", "A".repeat(4096)),
        ] {
            assert_eq!(
                p.check(ip, &with(&wrong), ""),
                Err(Denied::Unauthorized),
                "{} bytes",
                wrong.len()
            );
        }
    }
}
