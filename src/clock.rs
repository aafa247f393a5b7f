//! Wall-clock time as the relay stores and compares it: Unix milliseconds.
//! A leaf, so every layer (metrics, store, delivery, ingest) can read the
//! clock without importing the store.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 for a clock set before it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
