//! Where postbacks go: the delivery defaults (`delivery`), the targets
//! (`targets`) and the CloudEvents labels they receive (`envelope`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::problems::Problems;
use super::signing_key::SigningKey;
use super::values::{HeaderKey, HeaderSetting, HumanDuration, WebhookUrl};

/// CloudEvents attributes that are the operator's to choose.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EnvelopeConfig {
    /// The CloudEvents `source` attribute of every envelope.
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

/// Delivery defaults shared by all targets; each target may override them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Time allowed for one delivery attempt, connect included (above 0).
    #[serde(default = "default_delivery_timeout")]
    pub timeout: HumanDuration,
    /// Deliveries in flight at once to one target (at least 1).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Attempts before a delivery becomes a dead letter. Unset (the default),
    /// only `max_age` ends the retries: a count would dead-letter long before
    /// `max_age` during an outage ([retry
    /// schedule](delivery.md#retry-schedule)).
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// Upper bound of the first retry delay (above 0, at most `max`).
    #[serde(default = "default_backoff_initial")]
    pub initial: HumanDuration,
    /// Cap on any single retry delay the relay chooses; a target's
    /// `Retry-After` is honoured even when longer (but never past `max_age`).
    #[serde(default = "default_backoff_max")]
    pub max: HumanDuration,
    /// Growth factor of the delay bound per attempt (at least 1).
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

/// Per-target overrides of [`BackoffConfig`], checked together with the
/// defaults they complete.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
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
#[cfg_attr(test, derive(schemars::JsonSchema, serde::Serialize))]
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
#[cfg_attr(test, derive(schemars::JsonSchema, serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// The CloudEvents envelope (`application/cloudevents+json`).
    #[default]
    Envelope,
    /// The original Sinch body with its original Content-Type, for services
    /// that already parse Sinch XML.
    Raw,
}

/// One delivery target: an internal service (or a file) postbacks are
/// delivered to, known by its name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// What the target is.
    #[serde(default)]
    pub kind: TargetKind,
    /// `http`: the webhook URL (`http://` or `https://`; system CA roots).
    pub url: Option<WebhookUrl>,
    /// `file`: the file that receives JSON lines.
    pub path: Option<PathBuf>,
    /// `http`: extra request headers (an API key, a routing header); a value
    /// is a string or, for a secret one, `{file: PATH}` / `{env: NAME}`, read
    /// at start and on reload (missing is a config error naming the header).
    #[serde(default)]
    pub headers: BTreeMap<HeaderKey, HeaderSetting>,
    /// `http`: what the target receives.
    #[serde(default)]
    pub payload: PayloadKind,
    /// `http`: a Standard Webhooks secret `whsec_<base64>`, the base64 of a
    /// 24–64 byte key (as the spec's libraries generate); when set, requests
    /// carry `webhook-id`, `webhook-timestamp` and `webhook-signature`.
    pub secret: Option<SigningKey>,
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

impl DeliveryConfig {
    /// The delivery defaults: every target inherits them.
    pub(super) fn validate(&self, problems: &mut Problems) {
        problems.positive("delivery.timeout", self.timeout);
        problems.at_least_one("delivery.concurrency", self.concurrency as u64);
        if let Some(attempts) = self.max_attempts {
            problems.at_least_one("delivery.max_attempts", attempts.into());
        }
        problems.positive("delivery.max_age", self.max_age);
        validate_backoff(
            "delivery.backoff",
            &self.backoff,
            &BackoffOverride::default(),
            problems,
        );
    }
}

impl TargetConfig {
    /// One target's keys, reported under `key` (`targets.NAME`); its URL,
    /// headers and secret were checked as they were read.
    pub(super) fn validate(&self, key: &str, delivery: &DeliveryConfig, problems: &mut Problems) {
        match self.kind {
            TargetKind::Http => {
                if self.url.is_none() {
                    problems.add(format!("{key}.url"), "an http target needs a `url`");
                }
                if self.path.is_some() {
                    problems.add(format!("{key}.path"), "`path` belongs to file targets");
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
