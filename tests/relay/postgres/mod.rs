//! Several relay instances sharing one PostgreSQL database, always against a
//! real server: three processes with one SIGKILLed under load, a PostgreSQL
//! server stopped and started under load, one postback sent to two instances
//! at once, and the store itself (concurrent migrations, leases).
//!
//! Each test makes its own database on `RELAY_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and drops it at the end; the
//! restart test runs its own throwaway cluster (initdb and pg_ctl, as the
//! `postgres` OS user when run as root) on a random port.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::process::*;
use crate::common::*;
use bytes::Bytes;
use postback_relay::clock::now_ms;
use postback_relay::store::NewPostback;

mod instances;
mod isolation;
mod server_restart;
mod store;

/// Quick retries, enough attempts that nothing is given up during a test, and
/// a delivery timeout well inside the lease.
const DELIVERY: &str =
    "delivery:\n  backoff: {initial: 50ms, max: 200ms}\n  max_attempts: 1000\n  timeout: 2s\n";

/// Config for one instance on database `url`: ephemeral ports, `store_extra`
/// under `store:`, then `rest`.
fn instance_config(url: &str, store_extra: &str, rest: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nstore:\n  backend: postgres\n  url: \"{url}\"\n{store_extra}{rest}\n"
    )
}

/// Writes `yaml` to `dir/name` and returns the path.
fn write(dir: &std::path::Path, name: &str, yaml: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write config");
    path
}

/// Starts the processes at once (their migrations race for the lock).
async fn spawn_all(configs: &[std::path::PathBuf]) -> Vec<RelayProcess> {
    let starts: Vec<_> = configs
        .iter()
        .map(|config| {
            let config = config.clone();
            tokio::task::spawn_blocking(move || RelayProcess::start(&config))
        })
        .collect();
    let mut relays = Vec::new();
    for start in starts {
        relays.push(start.await.expect("start task"));
    }
    relays
}

/// Tracking id → deliveries, and the instance (`x-instance` header) and
/// arrival of each delivery.
fn deliveries(sink: &Sink) -> BTreeMap<String, Vec<(String, Instant)>> {
    let mut by_id: BTreeMap<String, Vec<(String, Instant)>> = BTreeMap::new();
    for request in sink.received() {
        let tracking_id = request.json()["data"]["tracking_id"]
            .as_str()
            .expect("tracking id")
            .to_owned();
        let instance = request.header("x-instance").unwrap_or("?").to_owned();
        by_id
            .entry(tracking_id)
            .or_default()
            .push((instance, request.at));
    }
    by_id
}

fn counts(deliveries: &BTreeMap<String, Vec<(String, Instant)>>) -> BTreeMap<String, usize> {
    deliveries
        .iter()
        .map(|(id, attempts)| (id.clone(), attempts.len()))
        .collect()
}

fn duplicates(counts: &BTreeMap<String, usize>) -> usize {
    counts.values().map(|n| n - 1).sum()
}

async fn readyz(admin: std::net::SocketAddr) -> u16 {
    let client = http_client();
    let request = hyper::Request::get(format!("http://{admin}/readyz"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), client.request(request)).await {
        Ok(Ok(response)) => response.status().as_u16(),
        _ => 0,
    }
}

fn postback(tracking_id: &str, targets: &[&str]) -> NewPostback {
    NewPostback {
        id: ulid::Ulid::generate().to_string(),
        dedupe_key: format!("MMS_MO|N401|{tracking_id}"),
        received_at_ms: now_ms(),
        envelope: Bytes::from(format!("{{\"subject\":\"{tracking_id}\"}}")),
        raw_body: Bytes::from_static(b"<postback/>"),
        content_type: Some("text/xml".into()),
        targets: targets.iter().map(|t| t.to_string()).collect(),
        tracking_id: None,
    }
}
