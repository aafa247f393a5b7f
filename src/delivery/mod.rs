//! Delivery: one dispatcher per target drains that target's queue from the store,
//! with its own concurrency, so a slow or dead target never delays another one
//! or the ingest side.
//!
//! A dispatcher leases due jobs a few rounds ahead of its free slots (bounded
//! by count and bytes, `ready.rs`), sends each on its own task, and records the
//! outcome: delivered, retry at a time computed by [`retry::RetryPolicy`], or
//! dead letter. Pending work lives in the store, so memory stays bounded
//! however long the backlog.

mod dispatcher;
pub mod fleet;
mod ready;
pub mod retry;
pub mod signing;
pub mod sink;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, IntCounter};

use crate::config::{Config, TargetKind};
use crate::metrics::Metrics;
use dispatcher::run_dispatcher;
use retry::RetryPolicy;
use sink::{FileSink, HttpClient, HttpSink, Sink};

/// A configured target, resolved for delivery.
pub struct Target {
    /// Name from the config; also the metrics label.
    pub name: String,
    /// Where attempts go.
    pub sink: Sink,
    /// Limit of one attempt.
    pub timeout: Duration,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// Backoff and give-up limits.
    pub policy: RetryPolicy,
    /// Its delivery metrics.
    counted: TargetMetrics,
}

/// A target's delivery metrics, resolved once: an attempt then counts
/// without hashing label values and locking the metric families.
struct TargetMetrics {
    duration: Histogram,
    delivered: IntCounter,
    retried: IntCounter,
    dead: IntCounter,
}

impl TargetMetrics {
    fn new(metrics: &Metrics, target: &str) -> TargetMetrics {
        let outcome = |label| metrics.deliveries.with_label_values(&[target, label]);
        TargetMetrics {
            duration: metrics.delivery_duration.with_label_values(&[target]),
            delivered: outcome("delivered"),
            retried: outcome("retried"),
            dead: outcome("dead"),
        }
    }
}

impl Target {
    /// How long a claimed job stays invisible to other claims: long enough for
    /// the attempt and its bookkeeping, short enough to recover a crashed worker.
    pub fn lease(&self) -> Duration {
        self.timeout * 2 + Duration::from_secs(30)
    }
}

/// Builds every target of a validated config.
fn build_targets(config: &Config, client: &HttpClient, metrics: &Metrics) -> Vec<Arc<Target>> {
    config
        .targets
        .iter()
        .map(|(name, target)| {
            let sink = match target.kind {
                TargetKind::Http => Sink::Http(HttpSink {
                    client: client.clone(),
                    url: target.url.clone().map(|url| url.0).unwrap_or_default(),
                    headers: target
                        .headers
                        .iter()
                        .map(|(name, header)| (name.0.clone(), header.value.clone()))
                        .collect(),
                    payload: target.payload,
                    signing: target.secret.clone(),
                }),
                TargetKind::File => {
                    Sink::File(FileSink::new(target.path.clone().unwrap_or_default()))
                }
            };
            Arc::new(Target {
                name: name.clone(),
                sink,
                timeout: target.timeout.unwrap_or(config.delivery.timeout).0,
                concurrency: target.concurrency.unwrap_or(config.delivery.concurrency),
                policy: RetryPolicy::new(
                    &config.delivery.backoff,
                    &target.backoff,
                    target.max_attempts.or(config.delivery.max_attempts),
                    target.max_age.unwrap_or(config.delivery.max_age).0,
                ),
                counted: TargetMetrics::new(metrics, name),
            })
        })
        .collect()
}

/// The outbound client: HTTP/1.1 and HTTP/2, https with the system's roots.
pub fn build_client() -> std::io::Result<HttpClient> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https),
    )
}
