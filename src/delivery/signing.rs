//! Standard Webhooks signatures, so internal services can verify that a request
//! came from the relay: `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">` with the secret's decoded key.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Shortest key the spec allows (192 bits).
pub const MIN_KEY_BYTES: usize = 24;
/// Longest key the spec allows (512 bits).
pub const MAX_KEY_BYTES: usize = 64;

/// A decoded signing secret.
#[derive(Clone)]
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

    /// The `webhook-signature` header value for one request.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_test_vector() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

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
