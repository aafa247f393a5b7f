//! The Standard Webhooks signing key of a target (`targets.NAME.secret`),
//! decoded and checked when the config is loaded; delivery signs with it.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Deserializer};

/// Shortest key the spec allows (192 bits).
const MIN_KEY_BYTES: usize = 24;
/// Longest key the spec allows (512 bits).
const MAX_KEY_BYTES: usize = 64;

/// A decoded signing secret; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Parses `whsec_<base64>` as the Standard Webhooks spec writes it: a key
    /// of 24 to 64 bytes. Anything else is refused rather than guessed at, so
    /// a pasted password never becomes a weak or misread key.
    pub fn parse(secret: &str) -> Result<SigningKey, String> {
        let expected = format!(
            "expected `whsec_` followed by the base64 of a {MIN_KEY_BYTES} to {MAX_KEY_BYTES} byte key"
        );
        let Some(encoded) = secret.trim().strip_prefix("whsec_") else {
            return Err(format!(
                "found a secret without the `whsec_` prefix, {expected}"
            ));
        };
        let key = STANDARD
            .decode(encoded)
            .map_err(|err| format!("found invalid base64 ({err}), {expected}"))?;
        if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
            return Err(format!("found a {} byte key, {expected}", key.len()));
        }
        Ok(SigningKey(key))
    }

    /// The decoded key, for the HMAC.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl<'de> Deserialize<'de> for SigningKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        SigningKey::parse(&String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_secrets_are_refused() {
        assert!(SigningKey::parse("whsec_***").is_err());
        assert!(SigningKey::parse("whsec_").is_err());
        // Valid base64, but no prefix, or too short a key.
        assert!(SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(SigningKey::parse("whsec_c2VjcmV0").is_err());
        assert!(SigningKey::parse(&format!("whsec_{}", STANDARD.encode([7u8; 65]))).is_err());
        assert!(SigningKey::parse(&format!("whsec_{}", STANDARD.encode([7u8; 64]))).is_ok());
    }
}
