//! Fault tests: the relay under SIGKILL, SIGTERM, dead, hung and refusing
//! targets, a returning target with a backlog, and a full disk.
//!
//! Each test proves that nothing acknowledged is lost: it keeps the books of
//! every postback answered with a complete 200 and checks that each one reaches
//! every target it was routed to, with the id its 200 answered. Each runs under
//! a hard time limit and ends by itself; everything listens on loopback on
//! ephemeral ports. Assertions are about correctness only; times (latencies,
//! recovery) are printed, never asserted, apart from generous bounds that stand
//! for "it does happen".
//!
//! The harness is shared with the other test files: `common` (in-process relay,
//! sinks, hung listener, tmpfs) and `common::process` (the real binary and the
//! load senders).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::process::*;
use crate::common::*;

mod disk;
mod signals;
mod targets;

/// The hard limit of every test here.
const LIMIT: Duration = Duration::from_secs(90);

/// Postbacks `PREFIX-0` … `PREFIX-(count-1)` posted one after the other on one
/// keep-alive connection; each must be answered 200 `accepted`. Returns the
/// books (tracking id → envelope id) and each answer's time.
async fn post_serially(
    url: &str,
    prefix: &str,
    count: usize,
) -> (BTreeMap<String, String>, Vec<Duration>) {
    let client = http_client();
    let mut acknowledged = BTreeMap::new();
    let mut times = Vec::with_capacity(count);
    for n in 0..count {
        let tracking_id = format!("{prefix}-{n}");
        let answer = try_post(&client, url, mo_xml(&tracking_id, "hello", "28444"))
            .await
            .unwrap_or_else(|err| panic!("{tracking_id}: no answer: {err:?}"));
        assert_eq!(
            (answer.status, &answer.json["status"]),
            (200, &serde_json::json!("accepted")),
            "{tracking_id}: {answer:?}"
        );
        let id = answer.json["id"].as_str().expect("id").to_owned();
        acknowledged.insert(tracking_id, id);
        times.push(answer.elapsed);
    }
    (acknowledged, times)
}

/// The `p`-th percentile (0–100) of some durations, nearest rank.
fn percentile(times: &[Duration], p: f64) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// "p50 … p99 … max …" of some durations.
fn latency_summary(times: &[Duration]) -> String {
    format!(
        "p50 {:.2?}, p99 {:.2?}, max {:.2?} (n = {})",
        percentile(times, 50.0),
        percentile(times, 99.0),
        percentile(times, 100.0),
        times.len()
    )
}

/// How many postbacks were received more than once.
fn duplicates(received: &BTreeMap<String, usize>) -> usize {
    received.values().map(|n| n - 1).sum()
}
