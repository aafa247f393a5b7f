//! The external load generator: wrk (Debian package `wrk`) sends the timed
//! loads instead of loadgen.rs, so a well-known program that shares nothing
//! with the benchmark measures the relay and its baseline alike.
//!
//! Each run is two wrk processes against the same server: a warm-up (its
//! numbers are dropped) and the measured run, `wrk --latency` both. A Lua
//! script written per process POSTs the seed postback with a tracking id
//! unique to the process, thread and request (the relay drops repeated
//! postbacks, so repeated ids would flatter it). The rate, p50, p99 and the
//! errors are read from wrk's own report; p99.9, which wrk does not print,
//! from a line the script's `done()` adds.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::stats::{Measured, RunStats};

/// The program run (found on PATH).
const WRK: &str = "wrk";
/// How long a request may take before wrk counts it as a timeout (the
/// built-in generator's limit: Sinch gives up after 10 s).
const REQUEST_TIMEOUT: &str = "10s";
/// The line the script's `done()` prints: p99.9 in microseconds.
const P999_LINE: &str = "relay-bench p99.9 us:";

/// wrk's version line (`wrk -v`), checked before anything runs so a missing
/// wrk fails at once with how to install it.
pub fn version() -> Result<String, String> {
    let output = Command::new(WRK).arg("-v").output().map_err(|err| {
        format!(
            "`--load wrk` runs wrk, which cannot be started ({err}); install it \
             (Debian/Ubuntu: apt-get install wrk) or use the built-in generator"
        )
    })?;
    // wrk -v prints "wrk <version> [<engine>] Copyright (C) ..." and exits 1.
    let text = String::from_utf8_lossy(&output.stdout);
    let first = text.lines().next().unwrap_or_default();
    let version = first.split(" Copyright").next().unwrap_or_default().trim();
    if version.starts_with("wrk") {
        Ok(version.to_owned())
    } else {
        Err(format!("`{WRK} -v` did not print a wrk version: {first:?}"))
    }
}

/// One timed load for wrk.
pub struct WrkSpec<'a> {
    /// The server (a relay's ingest listener or a baseline).
    pub addr: SocketAddr,
    /// The request path.
    pub path: &'a str,
    /// Keep-alive connections (`wrk -c`).
    pub connections: usize,
    /// wrk's threads (`wrk -t`), at most `connections`.
    pub threads: usize,
    /// Whole seconds each (wrk's `-d`); a zero warm-up is skipped.
    pub warmup: Duration,
    pub duration: Duration,
    /// The seed body before and after its tracking id.
    pub seed: (&'a str, &'a str),
    /// A tracking-id prefix no other run uses.
    pub prefix: String,
    /// Where the Lua scripts are written.
    pub dir: &'a Path,
}

/// Runs the warm-up and the measured wrk, and reads the measured one.
pub fn run(spec: &WrkSpec) -> Result<Measured, String> {
    let warmed = if spec.warmup.is_zero() {
        0
    } else {
        invoke(spec, "w", spec.warmup)?.ok()
    };
    let measured = invoke(spec, "m", spec.duration)?;
    let ok = measured.ok();
    let latency = |us: f64| if ok > 0 { us / 1000.0 } else { f64::NAN };
    Ok(Measured {
        stats: RunStats {
            rps: if measured.seconds > 0.0 {
                ok as f64 / measured.seconds
            } else {
                0.0
            },
            p50: latency(measured.p50_us),
            p99: latency(measured.p99_us),
            p999: latency(measured.p999_us),
            ok,
            errors: measured.non_2xx + measured.socket_errors,
            extra: serde_json::Map::new(),
        },
        error_samples: measured.error_lines,
        answered_total: warmed + ok,
    })
}

/// One wrk process: writes its script, runs it, parses its report.
fn invoke(spec: &WrkSpec, phase: &str, duration: Duration) -> Result<Report, String> {
    let script = spec.dir.join(format!("wrk-{phase}.lua"));
    let prefix = format!("{}{phase}-", spec.prefix);
    std::fs::write(&script, lua_script(spec.path, spec.seed, &prefix))
        .map_err(|err| format!("cannot write {}: {err}", script.display()))?;
    let url = format!("http://{}{}", spec.addr, spec.path);
    let output = Command::new(WRK)
        .arg("--latency")
        .arg(format!(
            "--threads={}",
            spec.threads.clamp(1, spec.connections)
        ))
        .arg(format!("--connections={}", spec.connections))
        .arg(format!("--duration={}s", duration.as_secs().max(1)))
        .arg(format!("--timeout={REQUEST_TIMEOUT}"))
        .arg("--script")
        .arg(&script)
        .arg(&url)
        .output()
        .map_err(|err| format!("cannot run {WRK}: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{WRK} against {url} exited with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            stdout.trim()
        ));
    }
    parse(&stdout).map_err(|err| format!("{err}; wrk printed:\n{stdout}"))
}

/// What one wrk process reported.
#[derive(Debug, Default, PartialEq)]
struct Report {
    /// Completed requests, whatever their status.
    requests: u64,
    /// The run's length, from "N requests in 2.00s".
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// "Non-2xx or 3xx responses: N".
    non_2xx: u64,
    /// connect + read + write + timeout from "Socket errors: ...".
    socket_errors: u64,
    /// The error lines as wrk printed them, for the report's notes.
    error_lines: Vec<String>,
}

impl Report {
    /// Requests answered with a success status.
    fn ok(&self) -> u64 {
        self.requests.saturating_sub(self.non_2xx)
    }
}

/// Reads wrk 4's report (`--latency`) and the script's p99.9 line.
fn parse(stdout: &str) -> Result<Report, String> {
    let mut report = Report::default();
    let (mut p50, mut p99, mut p999, mut count) = (None, None, None, None);
    for line in stdout.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["50%", value] = words[..] {
            p50 = time_us(value);
        } else if let ["99%", value] = words[..] {
            p99 = time_us(value);
        } else if let [n, "requests", "in", took, ..] = words[..] {
            count = n.parse().ok();
            report.seconds = time_us(took.trim_end_matches(',')).unwrap_or(0.0) / 1e6;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            report.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
            report.error_lines.push(line.to_owned());
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            report.non_2xx = rest
                .trim()
                .parse()
                .map_err(|_| format!("bad line {line:?}"))?;
            report.error_lines.push(line.to_owned());
        } else if let Some(rest) = line.strip_prefix(P999_LINE) {
            p999 = rest.trim().parse().ok();
        }
    }
    report.requests = count.ok_or("no \"N requests in T\" line")?;
    report.p50_us = p50.ok_or("no 50% line (was --latency given?)")?;
    report.p99_us = p99.ok_or("no 99% line (was --latency given?)")?;
    report.p999_us = p999.ok_or_else(|| format!("no {P999_LINE:?} line from the script"))?;
    Ok(report)
}

/// A wrk duration ("211.00us", "1.20ms", "2.00s", "1.00m", "1.00h") in
/// whole microseconds (wrk measures in microseconds).
fn time_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some((number.parse::<f64>().ok()? * scale).round())
}

/// The Lua script of one wrk process: POST `path` with the seed body, the
/// tracking id `<prefix><thread>-<n>`; `done()` prints p99.9.
fn lua_script(path: &str, (before, after): (&str, &str), prefix: &str) -> String {
    format!(
        r#"-- Written by relay-bench for one wrk process (see bench/src/wrk.rs).
local before = {before}
local after = {after}
local prefix = {prefix}
wrk.method = "POST"
wrk.path = {path}
wrk.headers["Content-Type"] = "text/xml"

-- Each thread has its own Lua state: number them so their ids differ.
local threads = 0
function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

local sent = 0
function request()
  sent = sent + 1
  return wrk.format(nil, nil, nil, before .. prefix .. thread_id .. "-" .. sent .. after)
end

function done(summary, latency, requests)
  io.write(string.format("{P999_LINE} %d\n", math.floor(latency:percentile(99.9))))
end
"#,
        before = lua_string(before),
        after = lua_string(after),
        prefix = lua_string(prefix),
        path = lua_string(path),
    )
}

/// `text` as a double-quoted Lua string literal (control bytes as `\ddd`).
fn lua_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\{:03}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What wrk 4.1.0 (Debian) prints with --latency and the script's line.
    const REPORT: &str = "Running 2s test @ http://127.0.0.1:41234/sinch/postback
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.11ms    1.20ms  31.62ms   91.30%
    Req/Sec    15.60k   812.31    16.90k    70.00%
  Latency Distribution
     50%    3.98ms
     75%    4.30ms
     90%    4.87ms
     99%    8.12ms
  31046 requests in 2.00s, 2.46MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  15519.87
Transfer/sec:      1.23MB
relay-bench p99.9 us: 17250
";

    #[test]
    fn reads_wrk_report() {
        let report = parse(REPORT).unwrap();
        assert_eq!(report.requests, 31046);
        assert_eq!(report.seconds, 2.0);
        assert_eq!(report.p50_us, 3980.0);
        assert_eq!(report.p99_us, 8120.0);
        assert_eq!(report.p999_us, 17250.0);
        assert_eq!(report.non_2xx, 7);
        assert_eq!(report.socket_errors, 3);
        assert_eq!(report.ok(), 31039);
        assert_eq!(report.error_lines.len(), 2);
    }

    #[test]
    fn a_report_without_latency_lines_is_refused() {
        let plain: String = REPORT
            .lines()
            .filter(|line| !line.contains('%') || line.contains("Stdev"))
            .map(|line| format!("{line}\n"))
            .collect();
        assert!(parse(&plain).unwrap_err().contains("--latency"));
        let no_script = REPORT.replace(P999_LINE, "something else");
        assert!(parse(&no_script).is_err());
    }

    #[test]
    fn reads_wrk_durations() {
        assert_eq!(time_us("211.00us"), Some(211.0));
        assert_eq!(time_us("1.20ms"), Some(1200.0));
        assert_eq!(time_us("5.00s"), Some(5e6));
        assert_eq!(time_us("1.00m"), Some(60e6));
        assert_eq!(time_us("12"), None);
        assert_eq!(time_us("3.0xs"), None);
    }

    #[test]
    fn lua_strings_are_quoted() {
        assert_eq!(lua_string("a\"b\\c\nd\te"), r#""a\"b\\c\nd\009e""#);
        let script = lua_script("/p", ("<x>\n", "</x>"), "P-");
        assert!(script.contains(r#"local before = "<x>\n""#));
        assert!(script.contains(P999_LINE));
    }
}
