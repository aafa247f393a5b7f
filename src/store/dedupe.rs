//! The dedupe key a postback is stored under: what makes Sinch's retries of
//! one postback one row, and what keeps the key within what both backends
//! can index. It lives with the store because the store's schema depends on
//! its bound ([`MAX_DEDUPE_KEY_BYTES`]).

use sha2::{Digest, Sha256};

use crate::postback::Postback;

/// Longest dedupe key stored as it is. Longer ones (a tracking id of
/// thousands of characters) are stored as `sha256:<hex>` of the whole key, on
/// both backends alike: an index entry has a size limit (PostgreSQL's btree
/// refuses entries above ~2.7 kB), and a key is compared, never shown.
pub const MAX_DEDUPE_KEY_BYTES: usize = 200;

/// Retries of one postback must map to one key. N101 and N102 share a tracking
/// id, so origin and code are part of it; without a tracking id the body is the
/// only identity there is. A digest never collides with a readable key
/// (those contain `|`), nor with a body hash: the bytes hashed are the key,
/// which is no postback body.
pub fn dedupe_key(postback: &Postback, body: &[u8]) -> String {
    match postback.tracking_id() {
        Some(tracking_id) => {
            let key = format!(
                "{}|{}|{}",
                postback.origin().trim().to_ascii_uppercase(),
                postback.code().trim().to_ascii_uppercase(),
                tracking_id
            );
            if key.len() > MAX_DEDUPE_KEY_BYTES {
                format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
            } else {
                key
            }
        }
        None => format!("sha256:{}", hex::encode(Sha256::digest(body))),
    }
}
