//! Configuration: one YAML file plus `RELAY_`-prefixed environment overrides,
//! loaded with figment and validated completely before anything starts.
//!
//! Every struct here is the reference for the README's config table: each field's
//! doc comment says why the knob exists. Unknown keys are rejected so that a typo
//! never silently falls back to a default.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Yaml};
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
    /// Connections served at once; more wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
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
    /// Attempts before a delivery becomes a dead letter.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
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
            max_attempts: default_max_attempts(),
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
    /// For `http`: extra request headers (an API key, a routing header).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
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
    /// Targets that receive a matching postback (fan-out).
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
fn default_store_path() -> PathBuf {
    PathBuf::from("data/relay.db")
}
fn default_min_free_bytes() -> u64 {
    64 * 1024 * 1024
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
fn default_max_attempts() -> u32 {
    15
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

/// A configuration that cannot be used, with the key and the file to blame.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing, is not YAML, or a value has the wrong type or an unknown key.
    #[error("invalid config {file}: {message}")]
    Load {
        /// The config file given on the command line.
        file: String,
        /// figment's message, which names the key path.
        message: String,
    },
    /// The values parse but do not make sense together.
    #[error("invalid config {file}: key `{key}`: {message}")]
    Invalid {
        /// The config file given on the command line.
        file: String,
        /// Dotted path of the offending key.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl Config {
    /// Loads `file` with `RELAY_*` environment overrides, then validates it.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let shown = file.display().to_string();
        if !file.is_file() {
            return Err(ConfigError::Load {
                file: shown,
                message: "file not found".to_owned(),
            });
        }
        let config: Config = Figment::new()
            .merge(Yaml::file_exact(file))
            .merge(
                Env::prefixed(ENV_PREFIX)
                    .filter(|key| is_config_key(key.as_str()))
                    .split("__"),
            )
            .extract()
            .map_err(|err| ConfigError::Load {
                file: shown.clone(),
                message: describe_figment_error(err),
            })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                file: shown,
                key,
                message,
            })?;
        Ok(config)
    }

    /// Cross-field checks that serde cannot express; returns (key, message).
    fn validate(&self) -> Result<(), (String, String)> {
        let fail = |key: String, message: String| Err((key, message));
        if !self.ingest.path.starts_with('/') {
            return fail("ingest.path".into(), "must start with `/`".into());
        }
        if self.ingest.max_body_bytes == 0 {
            return fail("ingest.max_body_bytes".into(), "must be above 0".into());
        }
        if self.ingest.max_connections == 0 {
            return fail("ingest.max_connections".into(), "must be at least 1".into());
        }
        if self.ingest.proxy_protocol && self.ingest.trusted_proxies.is_empty() {
            return fail(
                "ingest.proxy_protocol".into(),
                "needs `ingest.trusted_proxies`: a PROXY header is only believed from them".into(),
            );
        }
        self.admin
            .token()
            .map_err(|message| ("admin.token_file".to_owned(), message))?;
        if let Some(auth) = &self.ingest.basic_auth {
            if auth.username.is_empty() || auth.username.contains(':') {
                return fail(
                    "ingest.basic_auth.username".into(),
                    "must be non-empty and without `:`".into(),
                );
            }
            auth.password
                .resolve()
                .map_err(|message| ("ingest.basic_auth.password".to_owned(), message))?;
        }
        if let Some(token) = &self.ingest.path_token {
            let token = token
                .resolve()
                .map_err(|message| ("ingest.path_token".to_owned(), message))?;
            if token.contains('/') || token.len() < 16 {
                return fail(
                    "ingest.path_token".into(),
                    "must be at least 16 characters, without `/`".into(),
                );
            }
        }
        if let Some(tls) = &self.tls {
            crate::tls::load_server_config(&tls.cert, &tls.key)
                .map_err(|message| ("tls".to_owned(), message))?;
        }
        self.validate_store()?;
        if self.delivery.concurrency == 0 {
            return fail("delivery.concurrency".into(), "must be at least 1".into());
        }
        if self.delivery.max_attempts == 0 {
            return fail("delivery.max_attempts".into(), "must be at least 1".into());
        }
        if self.delivery.backoff.multiplier < 1.0 {
            return fail(
                "delivery.backoff.multiplier".into(),
                "must be at least 1.0".into(),
            );
        }
        for (name, target) in &self.targets {
            target
                .validate()
                .or_else(|(field, message)| fail(format!("targets.{name}.{field}"), message))?;
        }
        let mut route_names = BTreeSet::new();
        for (index, route) in self.routes.iter().enumerate() {
            let name = route_name(index, route);
            if !route_names.insert(name.clone()) {
                return fail(
                    format!("routes[{index}].name"),
                    format!("route name `{name}` is used twice"),
                );
            }
            if route.targets.is_empty() {
                return fail(
                    format!("routes[{index}].targets"),
                    "a route needs at least one target".into(),
                );
            }
            for target in &route.targets {
                if !self.targets.contains_key(target) {
                    let known: Vec<&str> = self.targets.keys().map(String::as_str).collect();
                    return fail(
                        format!("routes[{index}].targets"),
                        format!(
                            "unknown target `{target}` (defined targets: {})",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

impl Config {
    /// The store section: a PostgreSQL store needs a usable URL; a URL with
    /// the SQLite backend is most likely a forgotten `backend: postgres`
    /// (several instances, each with its own file, would not share anything).
    fn validate_store(&self) -> Result<(), (String, String)> {
        let store = &self.store;
        match store.backend {
            StoreBackend::Sqlite => {
                if store.url.is_some() {
                    return Err((
                        "store.url".into(),
                        "is set but `store.backend` is `sqlite`; add `backend: postgres` to use PostgreSQL"
                            .into(),
                    ));
                }
            }
            StoreBackend::Postgres => {
                let Some(url) = &store.url else {
                    return Err((
                        "store.url".into(),
                        "`backend: postgres` needs a connection URL like \
                         `postgres://relay@db.internal:5432/relay`"
                            .into(),
                    ));
                };
                // The parser's message, never the URL: it may hold a password.
                let parsed = url.parse::<tokio_postgres::Config>().map_err(|err| {
                    (
                        "store.url".to_owned(),
                        format!("not a PostgreSQL URL: {err}"),
                    )
                })?;
                if parsed.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                    return Err((
                        "store.url".into(),
                        "sslmode=require: TLS to PostgreSQL is not supported yet; keep the \
                         database on a private network (sslmode=disable or prefer)"
                            .into(),
                    ));
                }
                if let Some(password) = &store.password {
                    password
                        .resolve()
                        .map_err(|message| ("store.password".to_owned(), message))?;
                }
                if store.pool_size < crate::store::MIN_POOL_SIZE {
                    return Err((
                        "store.pool_size".into(),
                        format!("must be at least {}", crate::store::MIN_POOL_SIZE),
                    ));
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
                        return Err((
                            "store.lease".into(),
                            format!(
                                "must be longer than the longest delivery timeout ({})",
                                humantime::format_duration(longest)
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl TargetConfig {
    fn validate(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, message: String| Err((key.to_owned(), message));
        match self.kind {
            TargetKind::Http => {
                let Some(url) = &self.url else {
                    return fail("url", "an http target needs a `url`".into());
                };
                match url.parse::<hyper::Uri>() {
                    Ok(uri)
                        if matches!(uri.scheme_str(), Some("http") | Some("https"))
                            && uri.host().is_some() => {}
                    Ok(_) => {
                        return fail(
                            "url",
                            format!("`{url}` is not an absolute http:// or https:// URL"),
                        )
                    }
                    Err(err) => return fail("url", format!("`{url}` is not a URL: {err}")),
                }
                if self.path.is_some() {
                    return fail("path", "`path` belongs to file targets".into());
                }
                for (header, value) in &self.headers {
                    if hyper::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                        return fail("headers", format!("`{header}` is not a header name"));
                    }
                    if hyper::header::HeaderValue::from_str(value).is_err() {
                        return fail("headers", format!("value of `{header}` is not valid"));
                    }
                }
                if let Some(secret) = &self.secret {
                    crate::delivery::signing::SigningKey::parse(secret)
                        .map_err(|message| ("secret".to_owned(), message))?;
                }
            }
            TargetKind::File => {
                if self.path.is_none() {
                    return fail("path", "a file target needs a `path`".into());
                }
                if self.url.is_some() {
                    return fail("url", "`url` belongs to http targets".into());
                }
                if self.payload == PayloadKind::Raw {
                    return fail(
                        "payload",
                        "file targets write envelopes (JSON lines) only".into(),
                    );
                }
            }
        }
        if self.concurrency == Some(0) {
            return fail("concurrency", "must be at least 1".into());
        }
        if self.max_attempts == Some(0) {
            return fail("max_attempts", "must be at least 1".into());
        }
        if matches!(self.backoff.multiplier, Some(m) if m < 1.0) {
            return fail("backoff.multiplier", "must be at least 1.0".into());
        }
        Ok(())
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
