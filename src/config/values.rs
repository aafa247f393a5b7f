//! The value types of the config file: each one is parsed (and its secret
//! read) once, while the file is loaded, so consumers get a value they can
//! use as it is, and a bad value is reported at its key like any other.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};
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

/// A secret kept out of the config file: read from a file or an environment
/// variable when the relay starts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
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

/// A target's webhook URL: absolute, `http://` or `https://`, with a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(pub hyper::Uri);

impl<'de> Deserialize<'de> for WebhookUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let url = String::deserialize(deserializer)?;
        match url.parse::<hyper::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http") | Some("https"))
                    && uri.host().is_some() =>
            {
                Ok(WebhookUrl(uri))
            }
            Ok(_) => Err(serde::de::Error::custom(format!(
                "found `{url}`, expected an absolute http:// or https:// URL"
            ))),
            Err(err) => Err(serde::de::Error::custom(format!(
                "found `{url}`, expected a URL ({err})"
            ))),
        }
    }
}

/// A target header's name, checked when the file is read; ordered by name
/// so a target's headers keep one order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeaderKey(pub HeaderName);

impl Ord for HeaderKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.as_str().cmp(other.0.as_str())
    }
}

impl PartialOrd for HeaderKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<'de> Deserialize<'de> for HeaderKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        HeaderName::from_bytes(name.as_bytes())
            .map(HeaderKey)
            .map_err(|_| {
                serde::de::Error::custom(format!("found `{name}`, expected a header name"))
            })
    }
}

/// A target header's value: written in the file (`X-Team: mms`), or, for a
/// secret one, read from a file or the environment like the other secrets
/// (`X-Api-Key: {env: INBOX_KEY}`), once, while the config is loaded.
#[derive(Clone, PartialEq, Eq)]
pub struct HeaderSetting {
    /// The value sent.
    pub value: HeaderValue,
    /// Where a secret value was read from (None: written in the file).
    pub secret: Option<SecretSource>,
}

/// A secret value is never printed, only where it came from.
impl fmt::Debug for HeaderSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.secret {
            Some(source) => f.debug_tuple("Secret").field(source).finish(),
            None => f.debug_tuple("Plain").field(&self.value).finish(),
        }
    }
}

impl HeaderSetting {
    fn new(value: String, secret: Option<SecretSource>) -> Result<HeaderSetting, String> {
        let value = HeaderValue::from_str(&value)
            .map_err(|_| "expected a header value (visible ASCII, no line breaks)".to_owned())?;
        Ok(HeaderSetting { value, secret })
    }
}

impl<'de> Deserialize<'de> for HeaderSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = HeaderSetting;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header value, or `{file: PATH}` / `{env: NAME}`")
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<HeaderSetting, E> {
                HeaderSetting::new(value.to_owned(), None).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<HeaderSetting, E> {
                self.visit_str(&value.to_string())
            }
            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<HeaderSetting, E> {
                self.visit_str(&value.to_string())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<HeaderSetting, A::Error> {
                let source =
                    SecretSource::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                source
                    .resolve()
                    .and_then(|value| HeaderSetting::new(value, Some(source)))
                    .map_err(serde::de::Error::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}
