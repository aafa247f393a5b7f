//! Configuration: one YAML file plus `RELAY_`-prefixed environment overrides,
//! loaded with figment and validated completely before anything starts.
//!
//! Every struct here is the reference for `docs/configuration.md`, which is
//! generated from the field doc comments (`reference.rs`): each says what the
//! knob does and why it exists. Unknown keys are rejected so that a typo never
//! silently falls back to a default.
//!
//! Values are parsed while the file is read (URLs, header names and values,
//! signing keys, durations; `values.rs`), and secret header values are read
//! then, once: consumers use them as they are. Loading reports every problem
//! of a file at once (`problems.rs`), each with its key path
//! (`routes[0].targets`), the value found and what was expected.

mod delivery;
mod ingest;
mod problems;
#[cfg(test)]
mod reference;
mod routes;
mod signing_key;
mod store;
#[cfg(test)]
mod tests;
mod values;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use figment::providers::{Env, Format, Yaml};
use figment::value::Dict;
use figment::Figment;
use serde::Deserialize;

pub use delivery::{
    BackoffConfig, BackoffOverride, DeliveryConfig, EnvelopeConfig, PayloadKind, TargetConfig,
    TargetKind,
};
pub use ingest::{AdminConfig, BasicAuthConfig, IngestConfig, TlsConfig, MIN_ADMIN_TOKEN_CHARS};
pub use problems::{ConfigError, Problem};
pub use routes::{route_name, MatchConfig, RouteConfig};
pub use signing_key::SigningKey;
pub use store::{
    describe_url, QuarantineConfig, StoreBackend, StoreConfig, SyncMode, MIN_POOL_SIZE,
};
pub use values::{
    Cidr, HeaderKey, HeaderSetting, HumanDuration, OneOrMany, SecretSource, WebhookUrl,
};

use problems::{extract_collecting, Problems};

/// One YAML file (`--config`, default `config/relay.yaml`) plus environment
/// overrides: `RELAY_` followed by the key path with `__` for nesting, e.g.
/// `RELAY_LISTEN=0.0.0.0:8080`, `RELAY_INGEST__MAX_BODY_BYTES=65536`,
/// `RELAY_TARGETS__INBOX__SECRET=whsec_…` (keep secrets out of the file).
/// Durations are written `500ms`, `10s`, `5m`, `24h`. Relative paths are
/// relative to the working directory.
///
/// The config is validated completely before anything starts: unknown keys,
/// bad types, bad durations, bad URLs, routes naming missing targets, and
/// values that mean nothing (a `0s` timeout, `backoff.initial` above
/// `backoff.max`, a multiplier below 1, a concurrency of 0, a signing secret
/// that is not `whsec_` and the base64 of a 24–64 byte key) stop the relay
/// (and `check-config`) with exit code 2. Every problem of the file is
/// reported in one run, one line each with the file, the key path
/// (`routes[0].targets`, `targets.inbox.timeout`), the value found and what
/// was expected; an unknown key gets the closest known one. A value set by a
/// `RELAY_*` variable says so at the end of its line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Public address Sinch posts to (the shipped file: `127.0.0.1:8080`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Private address for `/metrics`, `/healthz`, `/readyz` (and the admin
    /// API); keep it off the internet.
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

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

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

    /// Every check serde cannot express, one section at a time.
    fn validate(&self, problems: &mut Problems) {
        self.ingest.validate(problems);
        if let Err(message) = self.admin.token() {
            problems.add("admin.token_file", message);
        }
        if let Some(tls) = &self.tls {
            if let Err(message) = crate::tls::load_server_config(&tls.cert, &tls.key) {
                problems.add("tls", message);
            }
        }
        let longest_timeout = self
            .targets
            .values()
            .map(|t| t.timeout.unwrap_or(self.delivery.timeout).0)
            .max()
            .unwrap_or(self.delivery.timeout.0);
        self.store.validate(longest_timeout, problems);
        // Zero would delete every refused body within moments of its arrival.
        problems.positive("quarantine.retention", self.quarantine.retention);
        self.delivery.validate(problems);
        for (name, target) in &self.targets {
            target.validate(&format!("targets.{name}"), &self.delivery, problems);
        }
        routes::validate_routes(&self.routes, &self.targets, problems);
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

/// figment's own message already names the key path and the file; one error per line.
fn describe_figment_error(err: figment::Error) -> String {
    // figment names keys by profile (`default.ingest.path`); users wrote `ingest.path`.
    let lines: Vec<String> = err
        .into_iter()
        .map(|e| e.to_string().replace("for key \"default.", "for key \""))
        .collect();
    lines.join("; ")
}
