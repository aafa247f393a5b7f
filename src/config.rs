//! Configuration: one YAML file plus `RELAY_`-prefixed environment overrides,
//! loaded with figment and validated completely before anything starts.
//!
//! Every struct here is the reference for the README's config table: each field's
//! doc comment says why the knob exists. Unknown keys are rejected so that a typo
//! never silently falls back to a default.
//!
//! Loading reports every problem of a file at once: unknown keys and values of
//! the wrong type are collected by dropping each one and deserializing again
//! (serde stops at the first), then the values are checked one section at a
//! time (`validate_*`), each problem with its key path (`routes[0].targets`),
//! the value found and what was expected.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::value::{Dict, Value};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// A duration written the human way (`500ms`, `10s`, `5m`, `24h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|err| {
                serde::de::Error::custom(format!(
                    "invalid duration `{text}` ({err}); write it like `500ms`, `10s`, `5m` or `24h`"
                ))
            })
    }
}

/// An address range written as a CIDR (`203.0.113.0/24`) or a single address
/// (`203.0.113.7`, `2001:db8::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl Cidr {
    /// Whether `addr` is inside the range; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, addr: std::net::IpAddr) -> bool {
        let addr = match addr {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(addr),
            v4 => v4,
        };
        self.0.contains(&addr)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let text = text.trim();
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
            .map(Cidr)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{text}` is not an IP address or CIDR range (like 203.0.113.0/24)"
                ))
            })
    }
}

/// One value or a list of them, so that `keyword: stop` and `keyword: [stop, end]`
/// both read naturally in YAML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Raw::deserialize(deserializer)? {
            Raw::One(value) => OneOrMany(vec![value]),
            Raw::Many(values) => OneOrMany(values),
        })
    }
}

/// The whole configuration of one relay process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Public address Sinch posts to.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Private address for `/metrics`, `/healthz` and `/readyz`; keep it off the internet.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// The admin API on the admin listener; off unless a token is given.
    #[serde(default)]
    pub admin: AdminConfig,
    /// How postbacks are accepted.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// Serve the public listener over TLS.
    pub tls: Option<TlsConfig>,
    /// Where accepted postbacks and pending deliveries live.
    #[serde(default)]
    pub store: StoreConfig,
    /// How much of the refused bodies is kept, and for how long.
    #[serde(default)]
    pub quarantine: QuarantineConfig,
    /// How the CloudEvents envelope is labelled.
    #[serde(default)]
    pub envelope: EnvelopeConfig,
    /// Defaults for every target; each target may override them.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Internal services (or files) postbacks are delivered to, by name.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    /// Ordered routing rules: first match wins unless a route says `continue: true`.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// The public side.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// The one URL path Sinch is given; anything else is 404.
    #[serde(default = "default_ingest_path")]
    pub path: String,
    /// Bodies above this size are refused with 413 before they are read in full.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// A postback seen again within this window (a Sinch retry) is answered 200
    /// and not delivered twice.
    #[serde(default = "default_dedupe_window")]
    pub dedupe_window: HumanDuration,
    /// An idle keep-alive connection is kept at least this long, because Sinch
    /// sends every postback of an account over one persistent connection.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// A new connection, or one that started a request after being idle, must
    /// deliver the request's headers within this time (slowloris defence).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: HumanDuration,
    /// A request's body must arrive within this time, or it is answered 408.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout: HumanDuration,
    /// Connections served at once. A connection accepted while every slot is
    /// taken is closed at once (and counted): the accept loop never stops, so
    /// refused peers cannot queue in front of allowed ones.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections open at once from one client address (the TCP peer, or the
    /// client a trusted balancer's PROXY header names), so one address cannot
    /// take every slot. Sinch keeps one persistent connection per account.
    /// A trusted proxy's own address is not capped: it carries every client.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: std::num::NonZeroUsize,
    /// HTTP/2 streams (requests) open at once on one connection, announced in
    /// the server's SETTINGS; without it one connection could run hundreds
    /// of requests at once past `max_connections`.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: std::num::NonZeroU32,
    /// Source addresses (IPs or CIDRs) allowed to post; empty allows everyone
    /// (with a warning at start). Sinch gives its list at onboarding.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Load balancers whose `X-Forwarded-For` or PROXY header is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Expect a PROXY protocol v1/v2 header from trusted proxies (L4 balancers
    /// such as HAProxy or AWS NLB).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Require HTTP basic auth (Sinch can be given `https://user:pass@host/...`).
    pub basic_auth: Option<BasicAuthConfig>,
    /// Require a secret last path segment: Sinch posts to `{path}/{token}`.
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// The user name Sinch sends.
    pub username: String,
    /// Where the password comes from (never inline in the file).
    pub password: SecretSource,
}

/// The admin API (`/api/v1/` on `admin_listen`): dead letters, quarantine,
/// pauses. It can replay and purge, so it needs a bearer token.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// A file holding the bearer token (one line, at least 16 characters);
    /// without it the admin API is off and only metrics and health are served.
    pub token_file: Option<PathBuf>,
}

/// Shortest admin token accepted: a guessable token guards replay and purge.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

impl AdminConfig {
    /// Reads the token (None: the API is off); the error names the problem.
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

/// A secret kept out of the config file: read from a file or an environment
/// variable when the relay starts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// A file holding the secret (trailing newline ignored).
    pub file: Option<PathBuf>,
    /// An environment variable holding the secret.
    pub env: Option<String>,
}

impl SecretSource {
    /// Reads the secret; the error says what is missing.
    pub fn resolve(&self) -> Result<String, String> {
        let secret = match (&self.file, &self.env) {
            (Some(file), None) => std::fs::read_to_string(file)
                .map_err(|err| format!("cannot read {}: {err}", file.display()))?,
            (None, Some(name)) => std::env::var(name)
                .map_err(|_| format!("environment variable `{name}` is not set"))?,
            _ => return Err("give exactly one of `file` or `env`".into()),
        };
        let secret = secret.trim_end_matches(['\r', '\n']).to_owned();
        if secret.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(secret)
    }
}

/// A target header's value: written in the file (`X-Team: mms`), or, for a
/// secret one, read from a file or the environment like the other secrets
/// (`X-Api-Key: {env: INBOX_KEY}`).
#[derive(Debug, Clone)]
pub enum HeaderSource {
    /// The value as written.
    Plain(String),
    /// The value kept out of the file.
    Secret(SecretSource),
}

impl HeaderSource {
    /// The value to send; the error says what is missing or invalid.
    pub fn value(&self) -> Result<String, String> {
        let value = match self {
            HeaderSource::Plain(value) => value.clone(),
            HeaderSource::Secret(source) => source.resolve()?,
        };
        hyper::header::HeaderValue::from_str(&value)
            .map(|_| value)
            .map_err(|_| "expected a header value (visible ASCII, no line breaks)".to_owned())
    }
}

impl<'de> Deserialize<'de> for HeaderSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = HeaderSource;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header value, or `{file: PATH}` / `{env: NAME}`")
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<HeaderSource, E> {
                Ok(HeaderSource::Plain(value.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<HeaderSource, E> {
                Ok(HeaderSource::Plain(value.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<HeaderSource, E> {
                Ok(HeaderSource::Plain(value.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<HeaderSource, A::Error> {
                SecretSource::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(HeaderSource::Secret)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// TLS on the public listener, for deployments without a TLS-terminating proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first; re-read on SIGHUP.
    pub cert: PathBuf,
    /// PEM private key; re-read on SIGHUP.
    pub key: PathBuf,
}

/// Where postbacks and the delivery queue live: the embedded SQLite file (one
/// instance) or a PostgreSQL database shared by several instances.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite` (default) or `postgres`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// SQLite: database file; its directory is created when missing.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// SQLite: `full` fsyncs before every 200 (survives power loss); `normal`
    /// survives a process crash but may lose the last commits on power loss.
    #[serde(default)]
    pub sync: SyncMode,
    /// SQLite: how long a commit waits for a lock held by another process (a
    /// backup, an operator's sqlite3 shell) before the postback is answered 503.
    #[serde(default = "default_busy_timeout")]
    pub busy_timeout: HumanDuration,
    /// SQLite: `/readyz` reports unready while the store's filesystem has less
    /// free space than this, before commits start to fail.
    #[serde(default = "default_min_free_bytes")]
    pub min_free_bytes: u64,
    /// PostgreSQL: connection URL (`postgres://user@host:5432/dbname`, libpq
    /// style; key=value strings work too). Keep the password out of it.
    pub url: Option<String>,
    /// PostgreSQL: the password, from a file or an environment variable.
    pub password: Option<SecretSource>,
    /// PostgreSQL: connections per instance (two are held by the ingest writers).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// PostgreSQL: how long a claimed delivery stays leased to the instance
    /// that claimed it; after a crash, another instance takes it over once
    /// the lease ends. Default: per target, `2 × timeout + 30s`.
    pub lease: Option<HumanDuration>,
    /// PostgreSQL: bytes (bodies and envelopes) of postbacks waiting to be
    /// committed; beyond it postbacks are answered 503 at once, so a slow
    /// server cannot make the relay hold gigabytes in memory.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::default(),
            path: default_store_path(),
            sync: SyncMode::default(),
            busy_timeout: default_busy_timeout(),
            min_free_bytes: default_min_free_bytes(),
            url: None,
            password: None,
            pool_size: default_pool_size(),
            lease: None,
            max_queued_bytes: default_max_queued_bytes(),
        }
    }
}

/// Bounds of the quarantine (bodies the parser refused): without them every
/// distinct bad body is kept whole forever, and a sender of random bodies
/// fills the disk until real postbacks get 503.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineConfig {
    /// Bytes of refused bodies kept whole (a running total, both backends);
    /// beyond it only their hash, size, error and first 1 KiB are kept, and
    /// they cannot be replayed.
    #[serde(default = "default_quarantine_max_bytes")]
    pub max_bytes: u64,
    /// Refused bodies not seen again for this long (by last arrival) are
    /// deleted: long enough for an operator to notice and replay them.
    #[serde(default = "default_quarantine_retention")]
    pub retention: HumanDuration,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            max_bytes: default_quarantine_max_bytes(),
            retention: default_quarantine_retention(),
        }
    }
}

impl StoreConfig {
    /// What the store is, for logs and `check-config` (never a password).
    pub fn describe(&self) -> String {
        match self.backend {
            StoreBackend::Sqlite => {
                format!("sqlite {} with sync={}", self.path.display(), self.sync)
            }
            StoreBackend::Postgres => format!(
                "postgres {} with pool_size={}",
                crate::store::describe_url(self.url.as_deref().unwrap_or_default()),
                self.pool_size
            ),
        }
    }
}

/// Which store backend keeps the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One SQLite file: one relay instance.
    #[default]
    Sqlite,
    /// One PostgreSQL database shared by any number of relay instances.
    Postgres,
}

impl fmt::Display for StoreBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreBackend::Sqlite => "sqlite",
            StoreBackend::Postgres => "postgres",
        })
    }
}

/// SQLite's `synchronous` setting, named for what it promises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync on every commit: an acknowledged postback survives a power cut.
    #[default]
    Full,
    /// fsync at checkpoints only: survives a process crash, not a power cut.
    Normal,
}

/// CloudEvents attributes that are the operator's to choose.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeConfig {
    /// The CloudEvents `source` attribute.
    #[serde(default = "default_source")]
    pub source: String,
}

impl Default for EnvelopeConfig {
    fn default() -> Self {
        EnvelopeConfig {
            source: default_source(),
        }
    }
}

/// Delivery defaults shared by all targets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Time allowed for one delivery attempt, connect included.
    #[serde(default = "default_delivery_timeout")]
    pub timeout: HumanDuration,
    /// Deliveries in flight at once to one target.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Attempts before a delivery becomes a dead letter. Unset (the
    /// default), only `max_age` ends the retries: a count would dead-letter
    /// long before `max_age` during an outage (README "Retry schedule").
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Age after which a delivery becomes a dead letter, however few attempts it had.
    #[serde(default = "default_max_age")]
    pub max_age: HumanDuration,
    /// Exponential backoff between attempts.
    #[serde(default)]
    pub backoff: BackoffConfig,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            timeout: default_delivery_timeout(),
            concurrency: default_concurrency(),
            max_attempts: None,
            max_age: default_max_age(),
            backoff: BackoffConfig::default(),
        }
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// Upper bound of the first retry delay.
    #[serde(default = "default_backoff_initial")]
    pub initial: HumanDuration,
    /// Cap on any single retry delay the relay chooses; a target's `Retry-After`
    /// is honoured even when longer (but never past `max_age`).
    #[serde(default = "default_backoff_max")]
    pub max: HumanDuration,
    /// Growth factor of the delay bound per attempt.
    #[serde(default = "default_backoff_multiplier")]
    pub multiplier: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
            multiplier: default_backoff_multiplier(),
        }
    }
}

/// Per-target overrides of [`BackoffConfig`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffOverride {
    /// Overrides `delivery.backoff.initial`.
    pub initial: Option<HumanDuration>,
    /// Overrides `delivery.backoff.max`.
    pub max: Option<HumanDuration>,
    /// Overrides `delivery.backoff.multiplier`.
    pub multiplier: Option<f64>,
}

/// What a target is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// An HTTP(S) webhook.
    #[default]
    Http,
    /// A local file that receives one JSON line per postback.
    File,
}

/// What a target receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// The CloudEvents envelope (`application/cloudevents+json`).
    #[default]
    Envelope,
    /// The original Sinch body with its original Content-Type, for services
    /// that already parse Sinch XML.
    Raw,
}

/// One delivery target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `http` (default) or `file`.
    #[serde(default)]
    pub kind: TargetKind,
    /// For `http`: the webhook URL (http or https).
    pub url: Option<String>,
    /// For `file`: the file that receives JSON lines.
    pub path: Option<PathBuf>,
    /// For `http`: extra request headers (an API key, a routing header);
    /// a secret one can come from a file or the environment.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderSource>,
    /// `envelope` (default) or `raw`.
    #[serde(default)]
    pub payload: PayloadKind,
    /// For `http`: a Standard Webhooks secret (`whsec_<base64>`); when set,
    /// requests carry `webhook-id`, `webhook-timestamp` and `webhook-signature`.
    pub secret: Option<String>,
    /// Overrides `delivery.timeout`.
    pub timeout: Option<HumanDuration>,
    /// Overrides `delivery.concurrency`.
    pub concurrency: Option<usize>,
    /// Overrides `delivery.max_attempts`.
    pub max_attempts: Option<u32>,
    /// Overrides `delivery.max_age`.
    pub max_age: Option<HumanDuration>,
    /// Overrides parts of `delivery.backoff`.
    #[serde(default)]
    pub backoff: BackoffOverride,
}

/// One routing rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shown in logs and the dry-run; defaults to `route-N`.
    pub name: Option<String>,
    /// What the postback must look like; an empty match matches everything.
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// Targets that receive a matching postback (fan-out); at least one.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Keep evaluating later routes after this one matched.
    #[serde(default, rename = "continue")]
    pub continue_matching: bool,
}

/// Conditions of a route; all given conditions must hold, each is "any of".
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Keywords, compared case-insensitively.
    #[serde(default)]
    pub keyword: OneOrMany,
    /// Short codes or numbers the postback was sent to.
    #[serde(default)]
    pub to: OneOrMany,
    /// Origins such as `MMS_MO` or `MMS_MT`.
    #[serde(default)]
    pub origin: OneOrMany,
    /// Codes such as `N401` or `N102`.
    #[serde(default)]
    pub code: OneOrMany,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_ingest_path() -> String {
    "/sinch/postback".to_owned()
}
fn default_max_queued_bytes() -> usize {
    64 * 1024 * 1024
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
fn default_max_connections_per_source() -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(8).expect("not zero")
}
fn default_max_concurrent_streams() -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(16).expect("not zero")
}
fn default_store_path() -> PathBuf {
    PathBuf::from("data/relay.db")
}
fn default_min_free_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_quarantine_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_quarantine_retention() -> HumanDuration {
    HumanDuration(Duration::from_secs(30 * 24 * 3600))
}
fn default_busy_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_pool_size() -> usize {
    10
}
fn default_source() -> String {
    "sinch:mms".to_owned()
}
fn default_delivery_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_concurrency() -> usize {
    16
}
fn default_max_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}
fn default_backoff_initial() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}
fn default_backoff_multiplier() -> f64 {
    2.0
}

/// One thing wrong with a config file: the key it concerns, written one way
/// (`routes[0].targets`, `targets.inbox.timeout`), and what was found and expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path of the offending key.
    pub key: String,
    /// The value found and what was expected instead.
    pub message: String,
}

/// A configuration that cannot be used, with the keys and the file to blame.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing or is not YAML at all.
    #[error("invalid config {file}: {message}")]
    Load {
        /// The config file given on the command line.
        file: String,
        /// What stopped the file from being read.
        message: String,
    },
    /// Keys that are unknown, of the wrong type, or that mean nothing: every
    /// one found in the file, so that one run shows them all.
    #[error("{}", render_problems(file, problems))]
    Invalid {
        /// The config file given on the command line.
        file: String,
        /// Every problem found, in the order of the file's sections.
        problems: Vec<Problem>,
    },
}

/// One line per problem, each naming the file and the key.
fn render_problems(file: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("invalid config {file}: {}: {}", p.key, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The problems of one file, collected rather than returned at the first.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// A duration that must be above zero.
    fn positive(&mut self, key: impl Into<String>, value: HumanDuration) {
        if value.0.is_zero() {
            self.add(key, "found `0s`, expected a duration above 0 (like `10s`)");
        }
    }

    /// A count that must be at least 1.
    fn at_least_one(&mut self, key: impl Into<String>, value: u64) {
        if value == 0 {
            self.add(key, "found `0`, expected at least 1");
        }
    }
}

/// How often a file is repaired (the offending key dropped) and deserialized
/// again to find the next structural problem: far more than a real file has.
const MAX_STRUCTURE_ROUNDS: usize = 64;

impl Config {
    /// Loads `file` with `RELAY_*` environment overrides, then validates it;
    /// the error lists every problem found, not only the first.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let shown = file.display().to_string();
        if !file.is_file() {
            return Err(ConfigError::Load {
                file: shown,
                message: "file not found".to_owned(),
            });
        }
        let figment = Figment::new().merge(Yaml::file_exact(file)).merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| is_config_key(key.as_str()))
                .split("__"),
        );
        let tree: Dict = figment.extract().map_err(|err| ConfigError::Load {
            file: shown.clone(),
            message: describe_figment_error(err),
        })?;
        let (config, mut problems) = extract_collecting(tree);
        if let Some(config) = config {
            let mut semantic = Problems::default();
            config.validate(&mut semantic);
            // A key already refused for its type was dropped to look further;
            // what its absence then "means" is not news.
            semantic.0.retain(|p| {
                !problems
                    .iter()
                    .any(|seen| p.key == seen.key || p.key.starts_with(&format!("{}.", seen.key)))
            });
            problems.extend(semantic.0);
            if problems.is_empty() {
                return Ok(config);
            }
        }
        // A value from a `RELAY_*` variable is not in the file: say so.
        for problem in &mut problems {
            let dotted = problem.key.replace('[', ".").replace(']', "");
            if figment
                .find_metadata(&dotted)
                .is_some_and(|m| m.name.contains("environment"))
            {
                problem
                    .message
                    .push_str(" (set by a RELAY_ environment variable)");
            }
        }
        Err(ConfigError::Invalid {
            file: shown,
            problems,
        })
    }

    /// Every check serde cannot express, one function per section.
    fn validate(&self, problems: &mut Problems) {
        self.validate_ingest(problems);
        if let Err(message) = self.admin.token() {
            problems.add("admin.token_file", message);
        }
        if let Some(tls) = &self.tls {
            if let Err(message) = crate::tls::load_server_config(&tls.cert, &tls.key) {
                problems.add("tls", message);
            }
        }
        self.validate_store(problems);
        // Zero would delete every refused body within moments of its arrival.
        problems.positive("quarantine.retention", self.quarantine.retention);
        self.validate_delivery(problems);
        for (name, target) in &self.targets {
            target.validate(&format!("targets.{name}"), &self.delivery, problems);
        }
        self.validate_routes(problems);
    }

    fn validate_ingest(&self, problems: &mut Problems) {
        let ingest = &self.ingest;
        if !ingest.path.starts_with('/') {
            problems.add(
                "ingest.path",
                format!("found `{}`, expected a path starting with `/`", ingest.path),
            );
        }
        problems.at_least_one("ingest.max_body_bytes", ingest.max_body_bytes as u64);
        problems.at_least_one("ingest.max_connections", ingest.max_connections as u64);
        problems.positive("ingest.idle_timeout", ingest.idle_timeout);
        problems.positive("ingest.header_read_timeout", ingest.header_read_timeout);
        problems.positive("ingest.body_read_timeout", ingest.body_read_timeout);
        if ingest.proxy_protocol && ingest.trusted_proxies.is_empty() {
            problems.add(
                "ingest.proxy_protocol",
                "found `true` without `ingest.trusted_proxies`: a PROXY header is only believed from them",
            );
        }
        if let Some(auth) = &ingest.basic_auth {
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
        if let Some(token) = &ingest.path_token {
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

    /// The store section: a PostgreSQL store needs a usable URL; a URL with
    /// the SQLite backend is most likely a forgotten `backend: postgres`
    /// (several instances, each with its own file, would not share anything).
    fn validate_store(&self, problems: &mut Problems) {
        let store = &self.store;
        match store.backend {
            StoreBackend::Sqlite => {
                if store.url.is_some() {
                    problems.add(
                        "store.url",
                        "is set but `store.backend` is `sqlite`; add `backend: postgres` to use PostgreSQL",
                    );
                }
            }
            StoreBackend::Postgres => {
                match &store.url {
                    None => problems.add(
                        "store.url",
                        "`backend: postgres` needs a connection URL like \
                         `postgres://relay@db.internal:5432/relay`",
                    ),
                    // The parser's message, never the URL: it may hold a password.
                    Some(url) => match url.parse::<tokio_postgres::Config>() {
                        Err(err) => problems.add("store.url", format!("not a PostgreSQL URL: {err}")),
                        Ok(parsed)
                            if parsed.get_ssl_mode()
                                == tokio_postgres::config::SslMode::Require =>
                        {
                            problems.add(
                                "store.url",
                                "sslmode=require: TLS to PostgreSQL is not supported yet; keep the \
                                 database on a private network (sslmode=disable or prefer)",
                            )
                        }
                        Ok(_) => {}
                    },
                }
                if let Some(Err(message)) = store.password.as_ref().map(SecretSource::resolve) {
                    problems.add("store.password", message);
                }
                if store.pool_size < crate::store::MIN_POOL_SIZE {
                    problems.add(
                        "store.pool_size",
                        format!(
                            "found `{}`, expected at least {}",
                            store.pool_size,
                            crate::store::MIN_POOL_SIZE
                        ),
                    );
                }
                if let Some(lease) = store.lease {
                    // A lease that ends while its attempt may still run would
                    // hand the job to a second instance mid-delivery.
                    let longest = self
                        .targets
                        .values()
                        .map(|t| t.timeout.unwrap_or(self.delivery.timeout).0)
                        .max()
                        .unwrap_or(self.delivery.timeout.0);
                    if lease.0 <= longest {
                        problems.add(
                            "store.lease",
                            format!(
                                "found `{}`, expected longer than the longest delivery timeout ({})",
                                humantime::format_duration(lease.0),
                                humantime::format_duration(longest)
                            ),
                        );
                    }
                }
            }
        }
    }

    /// The delivery defaults: every target inherits them.
    fn validate_delivery(&self, problems: &mut Problems) {
        let delivery = &self.delivery;
        problems.positive("delivery.timeout", delivery.timeout);
        problems.at_least_one("delivery.concurrency", delivery.concurrency as u64);
        if let Some(attempts) = delivery.max_attempts {
            problems.at_least_one("delivery.max_attempts", attempts.into());
        }
        problems.positive("delivery.max_age", delivery.max_age);
        validate_backoff(
            "delivery.backoff",
            &delivery.backoff,
            &BackoffOverride::default(),
            problems,
        );
    }

    fn validate_routes(&self, problems: &mut Problems) {
        let mut route_names = BTreeSet::new();
        for (index, route) in self.routes.iter().enumerate() {
            let name = route_name(index, route);
            if !route_names.insert(name.clone()) {
                problems.add(
                    format!("routes[{index}].name"),
                    format!("found `{name}` a second time, expected a name used once"),
                );
            }
            if route.targets.is_empty() {
                problems.add(
                    format!("routes[{index}].targets"),
                    "found no target, expected at least one",
                );
            }
            for target in &route.targets {
                if !self.targets.contains_key(target) {
                    let known: Vec<&str> = self.targets.keys().map(String::as_str).collect();
                    problems.add(
                        format!("routes[{index}].targets"),
                        format!(
                            "found unknown target `{target}`, expected one of the defined targets ({}){}",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            },
                            suggestion(target, &known)
                        ),
                    );
                }
            }
        }
    }
}

/// The backoff in force at `key` (the delivery defaults with a target's
/// overrides): a first delay above the cap, a zero first delay (retries in
/// a hot loop) or a bound that shrinks mean nothing. A problem is reported
/// at the key that causes it: the override when there is one.
fn validate_backoff(
    key: &str,
    defaults: &BackoffConfig,
    overrides: &BackoffOverride,
    problems: &mut Problems,
) {
    let initial = overrides.initial.unwrap_or(defaults.initial);
    let max = overrides.max.unwrap_or(defaults.max);
    let multiplier = overrides.multiplier.unwrap_or(defaults.multiplier);
    let is_default = key == "delivery.backoff";
    if is_default || overrides.initial.is_some() {
        problems.positive(format!("{key}.initial"), initial);
    }
    if (is_default || overrides.initial.is_some() || overrides.max.is_some()) && initial.0 > max.0 {
        let culprit = if overrides.max.is_some() && overrides.initial.is_none() {
            "max"
        } else {
            "initial"
        };
        problems.add(
            format!("{key}.{culprit}"),
            format!(
                "found initial `{}` above max `{}`, expected initial <= max",
                humantime::format_duration(initial.0),
                humantime::format_duration(max.0)
            ),
        );
    }
    if (is_default || overrides.multiplier.is_some()) && !(1.0..=1e6).contains(&multiplier) {
        problems.add(
            format!("{key}.multiplier"),
            format!("found `{multiplier}`, expected a number from 1 (constant delays) up"),
        );
    }
}

/// ` (did you mean `x`?)` when one of `known` is close to `found`, else nothing.
fn suggestion(found: &str, known: &[&str]) -> String {
    closest(found, known)
        .map(|best| format!(": did you mean `{best}`?"))
        .unwrap_or_default()
}

/// The known name most like `found`, when one is close enough to be a typo.
fn closest<'k>(found: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|candidate| (strsim::jaro_winkler(found, candidate), *candidate))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, best)| best)
}

/// Deserializes the merged tree; on an unknown key or a value of the wrong
/// type it records the problem, drops that key and tries again, so that one
/// run reports every structural problem (serde stops at the first).
fn extract_collecting(mut tree: Dict) -> (Option<Config>, Vec<Problem>) {
    let mut problems = Vec::new();
    for _ in 0..MAX_STRUCTURE_ROUNDS {
        let errors = match Figment::from(Serialized::defaults(&tree)).extract::<Config>() {
            Ok(config) => return (Some(config), problems),
            Err(errors) => errors,
        };
        let mut repaired = false;
        for error in errors {
            problems.push(describe_structural(&tree, &error));
            repaired |= remove_key(&mut tree, &error.path);
        }
        if !repaired {
            break;
        }
    }
    (None, problems)
}

/// One figment error as a [`Problem`] at its key path.
fn describe_structural(tree: &Dict, error: &figment::Error) -> Problem {
    use figment::error::Kind;
    let key = key_path(tree, &error.path);
    let parent = key_path(tree, &error.path[..error.path.len().saturating_sub(1)]);
    let within = if parent.is_empty() {
        "at the top level".to_owned()
    } else {
        format!("in {parent}")
    };
    let message = match &error.kind {
        Kind::UnknownField(found, expected) => format!(
            "unknown key `{found}` {within}{}",
            match closest(found, expected) {
                Some(best) => format!(": did you mean `{best}`?"),
                None => format!(" (known keys: {})", expected.join(", ")),
            }
        ),
        Kind::UnknownVariant(found, expected) => format!(
            "found `{found}`, expected one of {}{}",
            expected.join(", "),
            suggestion(found, expected)
        ),
        Kind::MissingField(field) => format!("missing key `{field}`"),
        other => other.to_string(),
    };
    Problem { key, message }
}

/// `path` written one way: map keys joined by `.`, list indices as `[i]`.
fn key_path(tree: &Dict, path: &[String]) -> String {
    let mut shown = String::new();
    let mut at: Option<&Value> = None;
    for (depth, segment) in path.iter().enumerate() {
        let next = match at {
            None => tree.get(segment),
            Some(Value::Dict(_, dict)) => dict.get(segment),
            Some(Value::Array(_, items)) => {
                segment.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            Some(_) => None,
        };
        if matches!(at, Some(Value::Array(..))) {
            shown.push_str(&format!("[{segment}]"));
        } else {
            if depth > 0 {
                shown.push('.');
            }
            shown.push_str(segment);
        }
        at = next;
    }
    shown
}

/// Drops the value at `path` so that deserialization can go on past it; a
/// list element itself is never dropped (later indices would shift): false
/// when nothing could be dropped.
fn remove_key(tree: &mut Dict, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => tree.remove(last).is_some(),
        [first, rest @ ..] => tree
            .get_mut(first)
            .is_some_and(|value| remove_in(value, rest)),
    }
}

fn remove_in(value: &mut Value, path: &[String]) -> bool {
    match value {
        Value::Dict(_, dict) => remove_key(dict, path),
        Value::Array(_, items) if path.len() > 1 => path[0]
            .parse::<usize>()
            .ok()
            .and_then(|index| items.get_mut(index))
            .is_some_and(|item| remove_in(item, &path[1..])),
        _ => false,
    }
}

impl TargetConfig {
    /// One target's keys, reported under `key` (`targets.NAME`).
    fn validate(&self, key: &str, delivery: &DeliveryConfig, problems: &mut Problems) {
        match self.kind {
            TargetKind::Http => {
                match &self.url {
                    None => problems.add(format!("{key}.url"), "an http target needs a `url`"),
                    Some(url) => match url.parse::<hyper::Uri>() {
                        Ok(uri)
                            if matches!(uri.scheme_str(), Some("http") | Some("https"))
                                && uri.host().is_some() => {}
                        Ok(_) => problems.add(
                            format!("{key}.url"),
                            format!("found `{url}`, expected an absolute http:// or https:// URL"),
                        ),
                        Err(err) => problems.add(
                            format!("{key}.url"),
                            format!("found `{url}`, expected a URL ({err})"),
                        ),
                    },
                }
                if self.path.is_some() {
                    problems.add(format!("{key}.path"), "`path` belongs to file targets");
                }
                for (header, value) in &self.headers {
                    let at = format!("{key}.headers.{header}");
                    if hyper::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                        problems.add(&at, format!("found `{header}`, expected a header name"));
                    }
                    if let Err(message) = value.value() {
                        problems.add(&at, message);
                    }
                }
                if let Some(secret) = &self.secret {
                    if let Err(message) = crate::delivery::signing::SigningKey::parse(secret) {
                        problems.add(format!("{key}.secret"), message);
                    }
                }
            }
            TargetKind::File => {
                if self.path.is_none() {
                    problems.add(format!("{key}.path"), "a file target needs a `path`");
                }
                if self.url.is_some() {
                    problems.add(format!("{key}.url"), "`url` belongs to http targets");
                }
                if self.payload == PayloadKind::Raw {
                    problems.add(
                        format!("{key}.payload"),
                        "found `raw`, expected `envelope`: file targets write envelopes (JSON lines) only",
                    );
                }
            }
        }
        if let Some(timeout) = self.timeout {
            problems.positive(format!("{key}.timeout"), timeout);
        }
        if let Some(concurrency) = self.concurrency {
            problems.at_least_one(format!("{key}.concurrency"), concurrency as u64);
        }
        if let Some(attempts) = self.max_attempts {
            problems.at_least_one(format!("{key}.max_attempts"), attempts.into());
        }
        if let Some(max_age) = self.max_age {
            problems.positive(format!("{key}.max_age"), max_age);
        }
        validate_backoff(
            &format!("{key}.backoff"),
            &delivery.backoff,
            &self.backoff,
            problems,
        );
    }
}

/// Environment variables with this prefix override config keys.
const ENV_PREFIX: &str = "RELAY_";
/// Top-level config keys; `RELAY_` variables outside them (say
/// `RELAY_LOG_FORMAT`, read by the command line) are not config overrides.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "admin",
    "tls",
    "ingest",
    "store",
    "quarantine",
    "envelope",
    "delivery",
    "targets",
    "routes",
];
/// `RELAY_` variables the command line reads itself.
const CLI_ENV: &[&str] = &["LOG_FORMAT"];

fn is_config_key(key_after_prefix: &str) -> bool {
    let first = key_after_prefix.split("__").next().unwrap_or_default();
    TOP_LEVEL_KEYS.iter().any(|k| k.eq_ignore_ascii_case(first))
}

/// `RELAY_*` variables that are neither config overrides nor command-line
/// settings: most likely typos, worth a warning at start.
pub fn unrecognized_env_overrides() -> Vec<String> {
    std::env::vars()
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix(ENV_PREFIX)?;
            let known = is_config_key(rest) || CLI_ENV.iter().any(|k| k.eq_ignore_ascii_case(rest));
            (!known).then_some(name)
        })
        .collect()
}

/// The name a route is known by: its own, or `route-N` (1-based).
pub fn route_name(index: usize, route: &RouteConfig) -> String {
    route
        .name
        .clone()
        .unwrap_or_else(|| format!("route-{}", index + 1))
}

/// figment's own message already names the key path and the file; one error per line.
fn describe_figment_error(err: figment::Error) -> String {
    // figment names keys by profile (`default.ingest.path`); users wrote `ingest.path`.
    let lines: Vec<String> = err
        .into_iter()
        .map(|e| e.to_string().replace("for key \"default.", "for key \""))
        .collect();
    lines.join("; ")
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncMode::Full => "full",
            SyncMode::Normal => "normal",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads `yaml` from a temporary file: the config, or every problem as
    /// (key, message).
    fn load(yaml: &str) -> Result<Config, Vec<(String, String)>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, yaml).unwrap();
        match Config::load(&path) {
            Ok(config) => Ok(config),
            Err(ConfigError::Invalid { file, problems }) => {
                assert_eq!(file, path.display().to_string());
                Err(problems.into_iter().map(|p| (p.key, p.message)).collect())
            }
            Err(other) => panic!("not a key problem: {other}"),
        }
    }

    fn problem<'p>(problems: &'p [(String, String)], key: &str) -> &'p str {
        problems
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, message)| message.as_str())
            .unwrap_or_else(|| panic!("no problem at `{key}` in {problems:#?}"))
    }

    #[test]
    fn every_problem_of_a_file_is_reported_at_once() {
        let problems = load(
            "delivery:\n  timeout: 0s\n  concurrency: 0\n  backoff: {initial: 20m, max: 10m, multiplier: 0.5}\n\
             ingest: {max_connections: many, max_connections_per_source: 0}\n\
             quarantine: {retention: 0s}\n\
             targets:\n  inbox:\n    url: http://127.0.0.1:9/\n    timout: 5s\n    secret: hunter2\n    timeout: 0s\n    backoff: {max: 1s}\n\
             routes:\n  - targets: [inbx]\n  - targets: [inbox]\n    match: {colour: red}\n",
        )
        .unwrap_err();
        assert!(problem(&problems, "delivery.timeout").contains("0s"));
        assert!(problem(&problems, "delivery.concurrency").contains("at least 1"));
        assert!(problem(&problems, "quarantine.retention").contains("0s"));
        problem(&problems, "ingest.max_connections_per_source");
        let backoff = problem(&problems, "delivery.backoff.initial");
        assert!(
            backoff.contains("20m") && backoff.contains("10m"),
            "{backoff}"
        );
        assert!(problem(&problems, "delivery.backoff.multiplier").contains("0.5"));
        assert!(problem(&problems, "ingest.max_connections").contains("many"));
        assert_eq!(
            problem(&problems, "targets.inbox.timout"),
            "unknown key `timout` in targets.inbox: did you mean `timeout`?"
        );
        assert!(problem(&problems, "targets.inbox.secret").contains("whsec_"));
        assert!(problem(&problems, "targets.inbox.timeout").contains("0s"));
        // The override makes the target's max smaller than the global initial.
        assert!(problem(&problems, "targets.inbox.backoff.max").contains("initial"));
        assert!(problem(&problems, "routes[0].targets").contains("did you mean `inbox`?"));
        assert!(problem(&problems, "routes[1].match.colour").contains("unknown key"));
        assert_eq!(problems.len(), 13, "{problems:#?}");
    }

    #[test]
    fn a_value_refused_for_its_type_is_not_reported_twice() {
        let problems =
            load("targets:\n  a: {url: \"http://127.0.0.1:9/\"}\nroutes:\n  - targets: a\n")
                .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].0 == "routes[0].targets", "{problems:#?}");
    }

    #[test]
    fn the_standard_webhooks_secret_and_the_shipped_config_pass() {
        load("targets:\n  inbox: {url: \"http://127.0.0.1:9/\", secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}\nroutes:\n  - targets: [inbox]\n")
            .unwrap();
        Config::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/relay.yaml"
        )))
        .unwrap();
    }

    #[test]
    fn secret_headers_come_from_the_environment_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "from-a-file\n").unwrap();
        let config = load(&format!(
            "targets:\n  inbox:\n    url: http://127.0.0.1:9/\n    headers:\n      X-Team: mms\n      X-Key: {{file: {}}}\n",
            key_file.display()
        ))
        .unwrap();
        let headers = &config.targets["inbox"].headers;
        assert_eq!(headers["X-Team"].value().unwrap(), "mms");
        assert_eq!(headers["X-Key"].value().unwrap(), "from-a-file");

        let problems = load(
            "targets:\n  inbox:\n    url: http://127.0.0.1:9/\n    headers: {X-Api-Key: {env: RELAY_TEST_NO_SUCH_VARIABLE}}\n",
        )
        .unwrap_err();
        assert!(problem(&problems, "targets.inbox.headers.X-Api-Key")
            .contains("RELAY_TEST_NO_SUCH_VARIABLE"));
    }

    #[test]
    fn a_target_backoff_is_checked_with_the_defaults_it_inherits() {
        let problems =
            load("targets:\n  slow: {url: \"http://127.0.0.1:9/\", backoff: {initial: 1h}}\n")
                .unwrap_err();
        assert!(problem(&problems, "targets.slow.backoff.initial").contains("1h"));
        assert_eq!(problems.len(), 1, "{problems:#?}");
    }
}
