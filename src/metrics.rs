//! Prometheus metrics, all prefixed `relay_`. Labels are bounded: formats,
//! outcomes and configured target names, never a tracking id or a number.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::store::{QuarantineUsage, TargetStats};

/// Every metric of the relay, cheap to clone (the handles are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Postbacks by format (`xml`, `json`, `unknown`) and outcome (`accepted`,
    /// `duplicate`, `invalid`, `error`, `forbidden`, `unauthorized`).
    pub postbacks_received: IntCounterVec,
    /// Time from the request's arrival to its answer; Sinch waits on this.
    pub ingest_duration: Histogram,
    /// Delivery attempts by target and outcome (`delivered`, `retried`, `dead`).
    pub deliveries: IntCounterVec,
    /// Time of one delivery attempt by target.
    pub delivery_duration: HistogramVec,
    /// Jobs waiting or in flight, by target (read from the store).
    pub queue_pending: IntGaugeVec,
    /// Dead letters kept, by target (read from the store).
    pub dead_letters: IntGaugeVec,
    /// Age of the oldest delivery still waiting, by target: the queue's lag,
    /// which says more than its length.
    pub queue_oldest_age: prometheus::GaugeVec,
    /// Clients cut off for being too slow, by listener and phase
    /// (`headers`, `body`, `tls_handshake`, `proxy_header`).
    pub connection_timeouts: IntCounterVec,
    /// Connections closed at accept (or right after a PROXY header) without
    /// being served, by listener and reason (`not_allowed`,
    /// `per_source_limit`, `no_slot`): a flood shows here, not in the log.
    pub connections_refused: IntCounterVec,
    /// Always 1, labelled with the running version: dashboards and alerts
    /// can tell which build each instance runs.
    pub build_info: IntGaugeVec,
    /// Config reloads by result (`applied`, `refused`).
    pub config_reloads: IntCounterVec,
    /// 1 while an operator has paused the target (it queues, delivers nothing).
    pub target_paused: IntGaugeVec,
    /// Damaged intake journal segments kept aside (SQLite): above 0, some
    /// acknowledged postbacks may be lost; an operator must look.
    pub journal_damaged_segments: IntGauge,
    /// Distinct refused bodies the quarantine holds (read from the store).
    pub quarantine_bodies: IntGauge,
    /// Bytes of the bodies it holds, whole ones and prefixes: what
    /// `quarantine.max_bytes` bounds (read from the store).
    pub quarantine_bytes: IntGauge,
    /// New refused bodies kept only as a prefix (the budget was spent):
    /// they cannot be replayed.
    pub quarantine_truncated: IntCounter,
    /// Target labels the queue gauges were last set for, so a target that
    /// left both the config and the store stops being reported.
    queue_labels: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl Metrics {
    /// Registers all metrics, plus the process collector on Linux.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let postbacks_received = IntCounterVec::new(
            Opts::new(
                "relay_postbacks_received_total",
                "Postbacks received, by format and outcome.",
            ),
            &["format", "outcome"],
        )
        .expect("valid metric");
        let ingest_duration = Histogram::with_opts(
            HistogramOpts::new(
                "relay_ingest_duration_seconds",
                "Time from receiving a postback request to answering it.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        let deliveries = IntCounterVec::new(
            Opts::new(
                "relay_deliveries_total",
                "Delivery attempts, by target and outcome.",
            ),
            &["target", "outcome"],
        )
        .expect("valid metric");
        let delivery_duration = HistogramVec::new(
            HistogramOpts::new(
                "relay_delivery_duration_seconds",
                "Time of one delivery attempt, by target.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["target"],
        )
        .expect("valid metric");
        let queue_pending = IntGaugeVec::new(
            Opts::new(
                "relay_queue_pending",
                "Deliveries waiting or in flight, by target.",
            ),
            &["target"],
        )
        .expect("valid metric");
        let dead_letters = IntGaugeVec::new(
            Opts::new("relay_dead_letters", "Dead letters kept, by target."),
            &["target"],
        )
        .expect("valid metric");
        let queue_oldest_age = prometheus::GaugeVec::new(
            Opts::new(
                "relay_queue_oldest_age_seconds",
                "Age of the oldest delivery still waiting, by target (0 when none waits).",
            ),
            &["target"],
        )
        .expect("valid metric");
        let connection_timeouts = IntCounterVec::new(
            Opts::new(
                "relay_connection_timeouts_total",
                "Clients cut off for being too slow, by listener and phase.",
            ),
            &["listener", "phase"],
        )
        .expect("valid metric");
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "relay_connections_refused_total",
                "Connections closed without being served, by listener and reason.",
            ),
            &["listener", "reason"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("relay_build_info", "The running build; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "relay_config_reloads_total",
                "Config reloads (SIGHUP or --watch), by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let target_paused = IntGaugeVec::new(
            Opts::new(
                "relay_target_paused",
                "1 while the target is paused by an operator (jobs queue, nothing is delivered).",
            ),
            &["target"],
        )
        .expect("valid metric");
        let journal_damaged_segments = IntGauge::new(
            "relay_journal_damaged_segments",
            "Damaged intake journal segments kept aside for inspection (SQLite store).",
        )
        .expect("valid metric");
        let quarantine_bodies = IntGauge::new(
            "relay_quarantine_bodies",
            "Distinct refused bodies kept in the quarantine.",
        )
        .expect("valid metric");
        let quarantine_bytes = IntGauge::new(
            "relay_quarantine_bytes",
            "Bytes of the refused bodies kept in the quarantine (whole bodies and prefixes).",
        )
        .expect("valid metric");
        let quarantine_truncated = IntCounter::new(
            "relay_quarantine_truncated_total",
            "Refused bodies kept only as a prefix because quarantine.max_bytes was reached.",
        )
        .expect("valid metric");
        for collector in [
            Box::new(postbacks_received.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ingest_duration.clone()),
            Box::new(deliveries.clone()),
            Box::new(delivery_duration.clone()),
            Box::new(queue_pending.clone()),
            Box::new(dead_letters.clone()),
            Box::new(queue_oldest_age.clone()),
            Box::new(connection_timeouts.clone()),
            Box::new(connections_refused.clone()),
            Box::new(build_info.clone()),
            Box::new(config_reloads.clone()),
            Box::new(target_paused.clone()),
            Box::new(journal_damaged_segments.clone()),
            Box::new(quarantine_bodies.clone()),
            Box::new(quarantine_bytes.clone()),
            Box::new(quarantine_truncated.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
        Metrics {
            registry,
            postbacks_received,
            ingest_duration,
            deliveries,
            delivery_duration,
            queue_pending,
            dead_letters,
            queue_oldest_age,
            connection_timeouts,
            connections_refused,
            build_info,
            config_reloads,
            target_paused,
            journal_damaged_segments,
            quarantine_bodies,
            quarantine_bytes,
            quarantine_truncated,
            queue_labels: Default::default(),
        }
    }

    /// Shows whether `target` is paused.
    pub fn set_paused(&self, target: &str, paused: bool) {
        self.target_paused
            .with_label_values(&[target])
            .set(i64::from(paused));
    }

    /// Drops the per-target series that only a configured target has.
    pub fn forget_target(&self, target: &str) {
        let _ = self.target_paused.remove_label_values(&[target]);
    }

    /// Sets the queue gauges from the store's figures; targets without jobs
    /// read 0 rather than vanish.
    pub fn set_queue(&self, targets: &[String], stats: &[TargetStats]) {
        let now_shown: std::collections::BTreeSet<String> = targets
            .iter()
            .cloned()
            .chain(stats.iter().map(|s| s.target.clone()))
            .collect();
        let mut shown = self.queue_labels.lock().unwrap_or_else(|p| p.into_inner());
        for gone in shown.difference(&now_shown) {
            let _ = self.queue_pending.remove_label_values(&[gone]);
            let _ = self.dead_letters.remove_label_values(&[gone]);
            let _ = self.queue_oldest_age.remove_label_values(&[gone]);
        }
        *shown = now_shown;
        drop(shown);
        for target in targets {
            self.queue_pending.with_label_values(&[target]).set(0);
            self.dead_letters.with_label_values(&[target]).set(0);
            self.queue_oldest_age.with_label_values(&[target]).set(0.0);
        }
        let now = crate::clock::now_ms();
        for stat in stats {
            self.queue_pending
                .with_label_values(&[&stat.target])
                .set(stat.pending as i64);
            self.dead_letters
                .with_label_values(&[&stat.target])
                .set(stat.dead as i64);
            let age = stat
                .oldest_pending_ms
                .map_or(0, |oldest| (now - oldest).max(0));
            self.queue_oldest_age
                .with_label_values(&[&stat.target])
                .set(age as f64 / 1000.0);
        }
    }

    /// Sets the quarantine gauges from the store's running total.
    pub fn set_quarantine(&self, usage: QuarantineUsage) {
        self.quarantine_bodies
            .set(usage.bodies.min(i64::MAX as u64) as i64);
        self.quarantine_bytes
            .set(usage.bytes.min(i64::MAX as u64) as i64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(target: &str, dead: u64) -> TargetStats {
        TargetStats {
            target: target.into(),
            pending: 0,
            dead,
            oldest_pending_ms: None,
        }
    }

    #[test]
    fn a_target_gone_from_config_and_store_stops_being_reported() {
        let metrics = Metrics::new();
        metrics.set_queue(&["inbox".into()], &[stats("removed", 3)]);
        assert!(metrics
            .render()
            .contains("relay_dead_letters{target=\"removed\"} 3"));
        // Its dead letters were purged: it is in neither list any more.
        metrics.set_queue(&["inbox".into()], &[]);
        let text = metrics.render();
        assert!(!text.contains("target=\"removed\""), "{text}");
        assert!(
            text.contains("relay_dead_letters{target=\"inbox\"} 0"),
            "{text}"
        );
    }
}
