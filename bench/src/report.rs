//! The report: the table on stdout (docs/performance.md quotes it, so its
//! layout stays put) and the JSON results.

use std::process::Command;

use serde_json::{json, Value};

use crate::cli::{Load, Settings};
use crate::stats::{median, round2, round3, s2pg2_vs_s2, summarize, verdict, Paired, RunStats};
use crate::REPO;

/// KiB per MiB (and bytes per KiB): memory is read in KiB, shown in MiB.
pub const MIB: f64 = 1024.0;

/// A number for the table: thousands separated by commas when whole, "-"
/// when there is no data.
fn num(value: f64, decimals: usize) -> String {
    if !value.is_finite() {
        return "-".into();
    }
    if decimals == 0 {
        let text = format!("{:.0}", value);
        let (sign, digits) = text.split_at(if text.starts_with('-') { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else {
        format!("{value:.decimals$}")
    }
}

/// The table the benchmark prints.
pub fn render(s: &Settings, paired: &[Paired], s5: Option<&Value>, s2_rss: &[f64]) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "relay-bench {} | {} | {} round(s), medians | {:.1} s measured after {:.1} s warm-up | {} CPUs{}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        if s.quick { "quick" } else { "full" },
        s.rounds,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64(),
        s.workers,
        match &s.load {
            Load::Builtin => String::new(),
            Load::Wrk { .. } => format!(" | load: {}", load_label(&s.load)),
        },
    );
    let _ = writeln!(
        t,
        "ratio = relay / baseline (median of per-round ratios): ≥ 1 is better for rates, ≤ 1 for latencies"
    );
    if !paired.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "{:<4} {:<46} {:>12} {:>9} {:>9} {:>9} {:>7}",
            "", "", "rate", "p50 ms", "p99 ms", "p99.9 ms", "errors"
        );
    }
    for p in paired {
        let sum = summarize(p);
        let lat = |v: &[f64; 4], i: usize| num(v[i], 3);
        let _ = writeln!(t, "{:<4} {} ({})", p.id, p.title, p.unit);
        for (label, values, errors) in [
            (
                format!("relay: {}", p.relay_label),
                &sum.relay,
                sum.errors.0,
            ),
            (
                format!("baseline: {}", p.baseline_label),
                &sum.baseline,
                sum.errors.1,
            ),
        ] {
            let _ = writeln!(
                t,
                "{:<4} {:<46} {:>12} {:>9} {:>9} {:>9} {:>7}",
                "",
                label,
                num(values[0], 0),
                lat(values, 1),
                lat(values, 2),
                lat(values, 3),
                errors
            );
        }
        let target = match (p.target, verdict(p, &sum)) {
            (Some((_, text)), Some(true)) => format!("target {text}: met"),
            (Some((_, text)), Some(false)) => format!("target {text}: NOT met"),
            (Some((_, text)), None) => format!("target {text}: no data"),
            (None, _) => String::new(),
        };
        let _ = writeln!(
            t,
            "{:<4} {:<46} {:>12} {:>9} {:>9} {:>9}   {}",
            "",
            "ratio relay/baseline",
            num(sum.ratio[0], 2),
            num(sum.ratio[1], 2),
            num(sum.ratio[2], 2),
            num(sum.ratio[3], 2),
            target
        );
        if p.id == "S4" {
            if let Some(fill) = p.relay.first().and_then(|r| r.extra.get("fill")) {
                let fill_rate = fill["postbacks_per_s"].as_f64().unwrap_or(f64::NAN);
                let drain = median(
                    p.relay
                        .iter()
                        .filter_map(|r| r.extra.get("drain_seconds").and_then(Value::as_f64)),
                );
                let fill_wal = fill["max_wal_bytes"].as_f64().unwrap_or(f64::NAN) / MIB / MIB;
                let drain_wal = median(
                    p.relay
                        .iter()
                        .filter_map(|r| r.extra.get("wal_bytes_at_end").and_then(Value::as_f64)),
                ) / MIB
                    / MIB;
                let _ = writeln!(
                    t,
                    "{:<4} backlog filled at {} postbacks/s (WAL up to {} MiB); drain time {} s, WAL at the end of the drain {} MiB (medians)",
                    "",
                    num(fill_rate, 0),
                    num(fill_wal, 0),
                    num(drain, 2),
                    num(drain_wal, 0)
                );
            }
        }
        let accepted = median(
            p.relay
                .iter()
                .filter_map(|r| r.extra.get("postbacks_accepted").and_then(Value::as_f64)),
        );
        let delivered = median(p.relay.iter().filter_map(|r| {
            r.extra
                .get("deliveries_seen_by_sink")
                .and_then(Value::as_f64)
        }));
        let wal = median(
            p.relay
                .iter()
                .filter_map(|r| r.extra.get("wal_bytes_at_end").and_then(Value::as_f64)),
        ) / MIB
            / MIB;
        let busy = |runs: &[RunStats]| {
            median(
                runs.iter()
                    .filter_map(|r| r.extra.get("machine_cpu_busy").and_then(Value::as_f64)),
            )
        };
        let relay_cpu = median(p.relay.iter().filter_map(|r| {
            r.extra
                .get("relay_cpu_us_per_postback")
                .and_then(Value::as_f64)
        }));
        if relay_cpu.is_finite() {
            let _ = writeln!(
                t,
                "{:<4} CPU: relay {} µs per postback (its deliveries included); machine busy {} % (relay run) vs {} % (baseline run)",
                "",
                num(relay_cpu, 0),
                num(100.0 * busy(&p.relay), 0),
                num(100.0 * busy(&p.baseline), 0),
            );
        }
        if accepted.is_finite() && delivered.is_finite() {
            let _ = writeln!(
                t,
                "{:<4} relay run: {} postbacks accepted (warm-up included) → {} of {} deliveries reached the sink by the stop{}",
                "",
                num(accepted, 0),
                num(delivered, 0),
                num(2.0 * accepted, 0),
                if wal.is_finite() {
                    format!("; WAL {} MiB", num(wal, 1))
                } else {
                    String::new()
                }
            );
        }
        if p.id == "S2" {
            let per_sync = median(
                p.baseline
                    .iter()
                    .filter_map(|r| r.extra.get("records_per_fdatasync").and_then(Value::as_f64)),
            );
            if per_sync.is_finite() {
                let _ = writeln!(
                    t,
                    "{:<4} baseline wrote {} records per fdatasync",
                    "",
                    num(per_sync, 1)
                );
            }
        }
        if p.id == "S2pg2" {
            if let Some(vs) = s2pg2_vs_s2(paired) {
                let target = vs["target"].as_str().unwrap_or("?");
                let line = match vs.get("error") {
                    Some(err) => format!("target {target}: {}", err.as_str().unwrap_or("?")),
                    None => format!(
                        "rate / S2 SQLite relay rate {}, p99 {} ms: target {target}: {}",
                        num(vs["share_of_s2_sqlite"].as_f64().unwrap_or(f64::NAN), 2),
                        num(vs["p99_ms"].as_f64().unwrap_or(f64::NAN), 3),
                        match vs["target_met"].as_bool() {
                            Some(true) => "met",
                            Some(false) => "NOT met",
                            None => "no data",
                        }
                    ),
                };
                let _ = writeln!(t, "{:<4} {line}", "");
            }
        }
        for note in &p.notes {
            let _ = writeln!(t, "{:<4} note: {}", "", note.replace('\n', "\n           "));
        }
    }
    if s5.is_some() || !s2_rss.is_empty() {
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "S5   peak RSS of the relay (VmHWM); target ≤ 100 MiB, bounded"
        );
        let mib = |v: &Value| v.as_f64().map(|k| k / MIB).unwrap_or(f64::NAN);
        let mut peaks = Vec::new();
        if let Some(s5) = s5 {
            if let Some(err) = s5.get("error") {
                let _ = writeln!(t, "     error: {}", err.as_str().unwrap_or("?"));
            }
            let fill = &s5["fill"];
            if fill.is_object() {
                let peak = mib(&fill["peak_rss_kib"]);
                peaks.push(peak);
                let _ = writeln!(
                    t,
                    "     {:<64} {:>8} MiB",
                    format!(
                        "filling {} postbacks (64 conns, sync normal, target hung)",
                        num(fill["postbacks"].as_f64().unwrap_or(f64::NAN), 0)
                    ),
                    num(peak, 1)
                );
                let samples = fill["rss_samples"].as_array().cloned().unwrap_or_default();
                if !samples.is_empty() {
                    let mut line = String::from(
                        "       RSS while filling (postbacks answered → MiB, WAL MiB):",
                    );
                    let picks = 6.min(samples.len());
                    for k in 1..=picks {
                        let sample = &samples[k * samples.len() / picks - 1];
                        let _ = write!(
                            line,
                            "{} {} → {} (WAL {})",
                            if k == 1 { "" } else { "," },
                            num(sample["answered"].as_f64().unwrap_or(f64::NAN), 0),
                            num(mib(&sample["rss_kib"]), 1),
                            num(
                                sample["wal_bytes"].as_f64().unwrap_or(f64::NAN) / MIB / MIB,
                                0
                            )
                        );
                    }
                    let _ = writeln!(t, "{line}");
                }
            }
            let restart = &s5["restart"];
            if restart.is_object() {
                let peak = mib(&restart["peak_rss_kib"]);
                peaks.push(peak);
                let _ = writeln!(
                    t,
                    "     {:<64} {:>8} MiB",
                    format!(
                        "restarted with {} pending, targets refusing, {} s",
                        num(restart["pending"].as_f64().unwrap_or(f64::NAN), 0),
                        num(restart["observed_seconds"].as_f64().unwrap_or(f64::NAN), 0)
                    ),
                    num(peak, 1)
                );
                let _ = writeln!(
                    t,
                    "       startup with the backlog {} s; store after: {}",
                    num(restart["startup_seconds"].as_f64().unwrap_or(f64::NAN), 2),
                    restart["store_after"]
                );
                let _ = writeln!(
                    t,
                    "       relay log meanwhile: {} lines ({} WARN, {} ERROR)",
                    num(restart["log"]["lines"].as_f64().unwrap_or(f64::NAN), 0),
                    num(restart["log"]["warn"].as_f64().unwrap_or(f64::NAN), 0),
                    num(restart["log"]["error"].as_f64().unwrap_or(f64::NAN), 0)
                );
                if let Some(crash) = restart["crashed"].as_str() {
                    let _ = writeln!(t, "       note: the relay exited on its own: {crash}");
                }
            }
        }
        if !s2_rss.is_empty() {
            let peak = median(s2_rss.iter().copied()) / MIB;
            peaks.push(peak);
            let _ = writeln!(
                t,
                "     {:<64} {:>8} MiB",
                "during S2 (64 conns, sync full), median of rounds",
                num(peak, 1)
            );
        }
        let worst = peaks.iter().copied().fold(f64::NAN, f64::max);
        if worst.is_finite() {
            let _ = writeln!(
                t,
                "     largest peak {} MiB: target ≤ 100 MiB {}",
                num(worst, 1),
                if worst <= 100.0 { "met" } else { "NOT met" }
            );
        }
    }
    t
}

/// The JSON results (the table included), for tools and later comparison.
pub fn results_json(
    s: &Settings,
    paired: &[Paired],
    s5: Option<&Value>,
    s2_rss: &[f64],
    table: &str,
) -> Value {
    let mut scenarios = serde_json::Map::new();
    for p in paired {
        let sum = summarize(p);
        let four = |v: [f64; 4], digits: fn(f64) -> f64| json!({"rate": round2(v[0]), "p50_ms": digits(v[1]), "p99_ms": digits(v[2]), "p999_ms": digits(v[3])});
        let mut value = json!({
                "title": p.title,
                "unit": p.unit,
                "relay_label": p.relay_label,
                "baseline_label": p.baseline_label,
                "relay": four(sum.relay, round3),
                "baseline": four(sum.baseline, round3),
                "ratio": four(sum.ratio, round3),
                "errors": {"relay": sum.errors.0, "baseline": sum.errors.1},
                "target": p.target.map(|(_, text)| text),
                "target_met": verdict(p, &sum),
                "rounds": {
                    "relay": p.relay.iter().map(RunStats::json).collect::<Vec<_>>(),
                    "baseline": p.baseline.iter().map(RunStats::json).collect::<Vec<_>>(),
                },
                "notes": p.notes,
        });
        if p.id == "S2pg2" {
            value["vs_s2_sqlite"] = s2pg2_vs_s2(paired).unwrap_or(Value::Null);
        }
        scenarios.insert(p.id.into(), value);
    }
    if s5.is_some() || !s2_rss.is_empty() {
        let mut value = s5.cloned().unwrap_or_else(|| json!({}));
        value["during_s2_peak_rss_kib"] = json!(s2_rss);
        value["target"] = json!("peak RSS ≤ 100 MiB, bounded");
        scenarios.insert("S5".into(), value);
    }
    json!({
        "date": chrono::Utc::now().to_rfc3339(),
        "mode": if s.quick { "quick" } else { "full" },
        "rounds": s.rounds,
        "warmup_s": s.warmup.as_secs_f64(),
        "duration_s": s.duration.as_secs_f64(),
        "cpus": s.workers,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|k| k.trim().to_owned()).ok(),
        "git": git_describe(),
        "relay_bin": s.relay_bin.display().to_string(),
        "relay_log": s.relay_log,
        "load": load_label(&s.load),
        "scenarios": scenarios,
        "table": table,
    })
}

/// Which generator sent the timed loads, for the table's first line (with
/// wrk only, so the built-in runs print what they always printed) and the JSON.
fn load_label(load: &Load) -> String {
    match load {
        Load::Builtin => "built-in".into(),
        Load::Wrk { threads, version } => format!(
            "{version}, {threads} thread{}",
            if *threads == 1 { "" } else { "s" }
        ),
    }
}

/// The commit measured (with `+dirty` when the tree has changes).
fn git_describe() -> Option<String> {
    let dir = REPO;
    let head = Command::new("git")
        .args(["-C", dir, "rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    let mut text = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    if text.is_empty() {
        return None;
    }
    if let Ok(status) = Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .output()
    {
        if !status.stdout.is_empty() {
            text.push_str("+dirty");
        }
    }
    Some(text)
}
