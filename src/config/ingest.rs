//! The public side (`ingest`, `tls`) and the admin API's token (`admin`).

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::problems::Problems;
use super::values::{Cidr, HumanDuration, SecretSource};

/// How postbacks are accepted on the public listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// The one URL path Sinch is given; anything else is 404.
    #[serde(default = "default_ingest_path")]
    pub path: String,
    /// Bodies above this size are refused with 413 before they are read in full.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// A postback seen again within this window (a Sinch retry) is answered
    /// 200 and not delivered twice.
    #[serde(default = "default_dedupe_window")]
    pub dedupe_window: HumanDuration,
    /// An idle keep-alive connection is kept at least this long, because Sinch
    /// sends every postback of an account over one persistent connection.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// A new connection, or one that started a request after an idle spell,
    /// must deliver the request's headers within this time (slowloris defence).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: HumanDuration,
    /// A request's body must arrive within this time, or it is answered 408.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout: HumanDuration,
    /// Connections served at once. A connection accepted while every slot is
    /// taken is closed at once (`relay_connections_refused_total{reason="no_slot"}`):
    /// the accept loop never stops, so refused peers cannot queue in front of
    /// allowed ones.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections open at once from one client address, at least 1, so one
    /// address cannot take every slot (Sinch keeps one persistent connection
    /// per account); more are closed at accept (`reason="per_source_limit"`).
    /// Counted per TCP peer, or per client a trusted balancer's PROXY header
    /// names; a trusted proxy's own address is not capped (it carries every
    /// client; `max_connections` bounds it).
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: NonZeroUsize,
    /// HTTP/2 streams (requests) in flight at once on one connection, at
    /// least 1, announced in the server's SETTINGS; without it one connection
    /// could run hundreds of requests at once past `max_connections`.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: NonZeroU32,
    /// IPs and CIDRs that may post (Sinch gives its list at onboarding); empty
    /// allows everyone, with a warning at start. Other peers are closed at
    /// accept; other clients behind a trusted proxy get 403 (`X-Forwarded-For`)
    /// or are closed after the PROXY header.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// CIDRs of load balancers: admitted at accept whatever `allow` says; only
    /// from them is `X-Forwarded-For` (right-most untrusted hop) or a PROXY
    /// header believed.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Expect a PROXY protocol v1/v2 header from trusted proxies (L4 balancers
    /// such as HAProxy or AWS NLB); needs `trusted_proxies`. On such a
    /// connection the header names the client and `X-Forwarded-For` is never
    /// read (an L4 balancer passes it through from the client); `UNKNOWN` and
    /// `LOCAL` name no client: the balancer's own address is the client
    /// (refused unless in `allow`).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Require HTTP basic auth (Sinch can be given `https://user:pass@host/...`).
    /// The SHA-256 digests of the given and expected credentials are compared
    /// in constant time (one length: not even the length leaks).
    pub basic_auth: Option<BasicAuthConfig>,
    /// Require a secret last path segment of at least 16 characters: Sinch
    /// posts to `{ingest.path}/{token}`.
    pub path_token: Option<SecretSource>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            path: default_ingest_path(),
            max_body_bytes: default_max_body_bytes(),
            dedupe_window: default_dedupe_window(),
            idle_timeout: default_idle_timeout(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_source: default_max_connections_per_source(),
            max_concurrent_streams: default_max_concurrent_streams(),
            allow: Vec::new(),
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            basic_auth: None,
            path_token: None,
        }
    }
}

/// HTTP basic auth credentials for the public endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// The user name Sinch sends (not empty, no `:`).
    pub username: String,
    /// Where the password comes from: a file or an environment variable,
    /// never inline in the file.
    pub password: SecretSource,
}

/// The admin API (`/api/v1/` on `admin_listen`): dead letters, quarantine,
/// pauses. It can replay and purge, so it needs a bearer token.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// A file holding the admin API's bearer token (one line, at least 16
    /// characters, no spaces): turns on `/api/v1/` on `admin_listen` (dead
    /// letters, quarantine, pauses; [docs/admin-api.md](admin-api.md)) and is
    /// what the `targets`, `pause`, `resume`, `dlq` and `quarantine` commands
    /// send. Unset, the API is off: the admin listener serves only metrics
    /// and health, and the relay says so at start. Re-read on reload.
    pub token_file: Option<PathBuf>,
}

/// Shortest admin token accepted: a guessable token guards replay and purge.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

impl AdminConfig {
    /// Reads the token (None: the API is off); the error names the problem.
    /// Read at every call: a reload picks up a rotated token file.
    pub fn token(&self) -> Result<Option<String>, String> {
        let Some(file) = &self.token_file else {
            return Ok(None);
        };
        let token = SecretSource {
            file: Some(file.clone()),
            env: None,
        }
        .resolve()?;
        if token.chars().count() < MIN_ADMIN_TOKEN_CHARS || token.contains(char::is_whitespace) {
            return Err(format!(
                "the token in {} must be at least {MIN_ADMIN_TOKEN_CHARS} characters without spaces",
                file.display()
            ));
        }
        Ok(Some(token))
    }
}

/// TLS on the public listener (HTTP/2 and HTTP/1.1 by ALPN), for deployments
/// without a TLS-terminating proxy. Both files are re-read on SIGHUP: new
/// connections get the new certificate, open ones are not dropped, a broken
/// file keeps the old one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

fn default_ingest_path() -> String {
    "/sinch/postback".to_owned()
}
fn default_max_body_bytes() -> usize {
    1024 * 1024
}
fn default_dedupe_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}
fn default_header_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_body_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_connections_per_source() -> NonZeroUsize {
    NonZeroUsize::new(8).expect("not zero")
}
fn default_max_concurrent_streams() -> NonZeroU32 {
    NonZeroU32::new(16).expect("not zero")
}

impl IngestConfig {
    /// Every check of the `ingest` section serde cannot express.
    pub(super) fn validate(&self, problems: &mut Problems) {
        if !self.path.starts_with('/') {
            problems.add(
                "ingest.path",
                format!("found `{}`, expected a path starting with `/`", self.path),
            );
        }
        problems.at_least_one("ingest.max_body_bytes", self.max_body_bytes as u64);
        problems.at_least_one("ingest.max_connections", self.max_connections as u64);
        problems.positive("ingest.idle_timeout", self.idle_timeout);
        problems.positive("ingest.header_read_timeout", self.header_read_timeout);
        problems.positive("ingest.body_read_timeout", self.body_read_timeout);
        if self.proxy_protocol && self.trusted_proxies.is_empty() {
            problems.add(
                "ingest.proxy_protocol",
                "found `true` without `ingest.trusted_proxies`: a PROXY header is only believed from them",
            );
        }
        if let Some(auth) = &self.basic_auth {
            if auth.username.is_empty() || auth.username.contains(':') {
                problems.add(
                    "ingest.basic_auth.username",
                    format!(
                        "found `{}`, expected a non-empty name without `:`",
                        auth.username
                    ),
                );
            }
            if let Err(message) = auth.password.resolve() {
                problems.add("ingest.basic_auth.password", message);
            }
        }
        if let Some(token) = &self.path_token {
            match token.resolve() {
                Ok(token) if token.contains('/') || token.len() < 16 => problems.add(
                    "ingest.path_token",
                    "expected a secret of at least 16 characters, without `/`",
                ),
                Ok(_) => {}
                Err(message) => problems.add("ingest.path_token", message),
            }
        }
    }
}
