//! What one run measured and what the rounds add up to: per-run stats,
//! a scenario's paired runs, medians and the ratios relay/baseline.

use serde_json::{json, Value};

use crate::loadgen::LoadResult;
use crate::relay_proc::machine_ticks;

/// Issue 4, part 4: two instances on PostgreSQL sustain at least this share
/// of the single-instance SQLite rate in S2…
pub const S2PG2_MIN_SHARE: f64 = 0.5;
/// …with p99 answer time at most this (ms).
pub const S2PG2_MAX_P99_MS: f64 = 50.0;

/// What a timed load measured, whichever generator sent it (the built-in
/// one or wrk), so both feed the same table.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The table's numbers (rate in the measured window, latencies in ms,
    /// NaN without data; 200s and errors); `extra` empty.
    pub stats: RunStats,
    /// The first few errors, for the report.
    pub error_samples: Vec<String>,
    /// 200 answers in the whole run, warm-up included (CPU per postback).
    pub answered_total: u64,
}

impl Measured {
    /// The built-in generator's result, reduced to what the table shows.
    pub fn from_builtin(load: &LoadResult) -> Measured {
        Measured {
            stats: RunStats {
                rps: load.rps(),
                p50: load.quantile_ms(0.50),
                p99: load.quantile_ms(0.99),
                p999: load.quantile_ms(0.999),
                ok: load.ok,
                errors: load.errors,
                extra: serde_json::Map::new(),
            },
            error_samples: load.error_samples.clone(),
            answered_total: load.answered_total,
        }
    }
}

/// One measured run (relay or baseline): the table's numbers, and `extra`
/// for the JSON (memory, CPU, log counts ...).
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub ok: u64,
    pub errors: u64,
    pub extra: serde_json::Map<String, Value>,
}

impl RunStats {
    /// The run as the JSON results list it.
    pub fn json(&self) -> Value {
        let mut value = json!({
            "rps": round2(self.rps), "p50_ms": round3(self.p50), "p99_ms": round3(self.p99),
            "p999_ms": round3(self.p999), "ok": self.ok, "errors": self.errors,
        });
        for (key, extra) in &self.extra {
            value[key] = extra.clone();
        }
        value
    }
}

/// A paired scenario's results: relay and baseline runs, round by round.
pub struct Paired {
    pub id: &'static str,
    pub title: String,
    pub relay_label: String,
    pub baseline_label: String,
    pub unit: &'static str,
    pub target: Option<(f64, &'static str)>,
    pub relay: Vec<RunStats>,
    pub baseline: Vec<RunStats>,
    pub notes: Vec<String>,
}

/// Adds how busy the machine's CPUs were since `before` (load generator,
/// server or relay, sink: everything), to show which runs are CPU-bound.
pub fn insert_cpu(stats: &mut RunStats, before: Option<(u64, u64)>) {
    if let (Some((busy0, total0)), Some((busy1, total1))) = (before, machine_ticks()) {
        let busy = (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64;
        stats
            .extra
            .insert("machine_cpu_busy".into(), json!(round2(busy)));
    }
}

/// The median of the finite values (NaN when there are none): rounds are
/// few and one may be disturbed, so medians, not means.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Medians over rounds, and ratios relay/baseline as the median of the
/// per-round ratios (each pair ran back to back, so drift cancels).
pub struct Summary {
    /// rate, p50, p99, p99.9.
    pub relay: [f64; 4],
    pub baseline: [f64; 4],
    pub ratio: [f64; 4],
    /// Errors summed over the rounds: (relay, baseline).
    pub errors: (u64, u64),
}

/// The scenario's medians and ratios, as the table and the JSON show them.
pub fn summarize(p: &Paired) -> Summary {
    let pick = |r: &RunStats| [r.rps, r.p50, r.p99, r.p999];
    let med = |runs: &[RunStats]| -> [f64; 4] {
        let mut out = [f64::NAN; 4];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = median(runs.iter().map(|r| pick(r)[i]));
        }
        out
    };
    let mut ratio = [f64::NAN; 4];
    for (i, slot) in ratio.iter_mut().enumerate() {
        *slot = median(
            p.relay
                .iter()
                .zip(&p.baseline)
                .map(|(a, b)| pick(a)[i] / pick(b)[i]),
        );
    }
    Summary {
        relay: med(&p.relay),
        baseline: med(&p.baseline),
        ratio,
        errors: (
            p.relay.iter().map(|r| r.errors).sum(),
            p.baseline.iter().map(|r| r.errors).sum(),
        ),
    }
}

/// Whether the scenario met its target (None: no target or no data).
pub fn verdict(p: &Paired, s: &Summary) -> Option<bool> {
    let (threshold, _) = p.target?;
    if !s.ratio[0].is_finite() {
        return None;
    }
    let mut met = s.ratio[0] >= threshold;
    if p.id == "S2" {
        met &= s.ratio[2] <= 3.0;
    }
    Some(met)
}

/// Issue 4, part 4: S2pg2's relay rate as a share of the S2 (SQLite) relay
/// rate of the same invocation, and its p99, against the target.
pub fn s2pg2_vs_s2(paired: &[Paired]) -> Option<Value> {
    let pg2 = paired.iter().find(|p| p.id == "S2pg2")?;
    let target = format!(
        "S2pg2 rate ≥ {S2PG2_MIN_SHARE} × S2 SQLite relay rate, p99 ≤ {S2PG2_MAX_P99_MS} ms"
    );
    let pg2 = summarize(pg2);
    let Some(s2) = paired.iter().find(|p| p.id == "S2") else {
        return Some(json!({
            "target": target,
            "p99_ms": round3(pg2.relay[2]),
            "error": "S2 (SQLite) was not run in this invocation; no ratio",
        }));
    };
    let share = pg2.relay[0] / summarize(s2).relay[0];
    let met = (share.is_finite() && pg2.relay[2].is_finite())
        .then(|| share >= S2PG2_MIN_SHARE && pg2.relay[2] <= S2PG2_MAX_P99_MS);
    Some(json!({
        "target": target,
        "share_of_s2_sqlite": round3(share),
        "p99_ms": round3(pg2.relay[2]),
        "target_met": met,
    }))
}

/// Rounds for the JSON (two decimals).
pub fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Rounds for the JSON (three decimals).
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
