//! `postback-relay simulate`: behaves like the aggregator, so operators can
//! prove a deployment end to end (firewall, TLS, allowlist, routing) before
//! going live. Postbacks go serially over one keep-alive connection; anything
//! but a 200 within the timeout is a failure, retried later like Sinch does
//! (5 times, about 5 minutes apart by default).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Uri};

use crate::delivery::build_client;

/// What to send and how (the `simulate` command's flags).
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateOptions {
    /// The postback URL, as given to Sinch.
    #[arg(long)]
    pub url: Uri,
    /// Postbacks to send (cycling through the samples or files).
    #[arg(long, default_value_t = 10)]
    pub count: usize,
    /// At most this many requests per second (default: as fast as answered).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Send the files of this directory (`.xml`, `.json`) instead of samples.
    #[arg(long)]
    pub files: Option<PathBuf>,
    /// Answer deadline of one request (Sinch: 10 s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Retries of a failed postback (Sinch: 5).
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Wait before a retry (Sinch: about 5 minutes).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub retry_interval: Duration,
}

/// What happened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Distinct postbacks.
    pub postbacks: usize,
    /// Postbacks finally answered 200.
    pub accepted: usize,
    /// Retry attempts made.
    pub retried: usize,
    /// Postbacks that failed every attempt.
    pub given_up: usize,
    /// Answer times of all requests, sorted.
    pub answer_times: Vec<Duration>,
    /// The first few failures, for the operator.
    pub failures: Vec<String>,
}

impl Summary {
    /// The `p`-th percentile (0–100) of the answer times, nearest rank.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.answer_times.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * self.answer_times.len() as f64).ceil() as usize;
        Some(self.answer_times[rank.clamp(1, self.answer_times.len()) - 1])
    }
}

/// One postback to deliver, with its retry state.
struct Pending {
    body: Bytes,
    content_type: &'static str,
    attempts: u32,
    due: Instant,
}

/// Sends the postbacks and returns the summary.
pub async fn run(options: &SimulateOptions) -> anyhow::Result<Summary> {
    let samples = match &options.files {
        Some(dir) => read_files(dir)?,
        None => Vec::new(),
    };
    let run_id = ulid::Ulid::generate().to_string();
    let mut queue: VecDeque<Pending> = (0..options.count)
        .map(|n| {
            let (body, content_type) = if samples.is_empty() {
                sample(n, &format!("SIM_{run_id}_{n}"))
            } else {
                samples[n % samples.len()].clone()
            };
            Pending {
                body,
                content_type,
                attempts: 0,
                due: Instant::now(),
            }
        })
        .collect();
    let client = build_client()?;
    let pace = options
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut summary = Summary {
        postbacks: options.count,
        ..Summary::default()
    };
    while let Some(mut next) = pop_due(&mut queue).await {
        let started = Instant::now();
        let request = Request::post(options.url.clone())
            .header(CONTENT_TYPE, next.content_type)
            .body(Full::new(next.body.clone()))?;
        let exchange = async {
            let response = client.request(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let _ = response.into_body().collect().await;
            Ok::<_, String>(status)
        };
        let outcome = match tokio::time::timeout(options.timeout, exchange).await {
            Ok(Ok(status)) if status == hyper::StatusCode::OK => Ok(()),
            Ok(Ok(status)) => Err(format!("HTTP {status}")),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(options.timeout)
            )),
        };
        summary.answer_times.push(started.elapsed());
        match outcome {
            Ok(()) => summary.accepted += 1,
            Err(err) => {
                if summary.failures.len() < 5 {
                    summary.failures.push(err);
                }
                if next.attempts < options.retries {
                    next.attempts += 1;
                    next.due = Instant::now() + options.retry_interval;
                    summary.retried += 1;
                    queue.push_back(next);
                } else {
                    summary.given_up += 1;
                }
            }
        }
        if let Some(pace) = pace {
            tokio::time::sleep(pace.saturating_sub(started.elapsed())).await;
        }
    }
    summary.answer_times.sort();
    Ok(summary)
}

/// The next postback whose time has come, waiting for it if needed.
async fn pop_due(queue: &mut VecDeque<Pending>) -> Option<Pending> {
    let index = (0..queue.len()).min_by_key(|&i| queue[i].due)?;
    let next = queue.remove(index)?;
    tokio::time::sleep_until(next.due.into()).await;
    Some(next)
}

/// Built-in samples, in turn: an MO in XML and in JSON, delivery receipts
/// (N101, N102 sharing the tracking id, E101 with almost nothing).
fn sample(n: usize, tracking_id: &str) -> (Bytes, &'static str) {
    let xml = "text/xml";
    let json = "application/json";
    let (body, content_type) = match n % 5 {
        0 => (
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<postback><origin>MMS_MO</origin><code>N401</code>\
                 <from>14085550100</from><to>28444</to><keyword>TEST</keyword><tracking-id>{tracking_id}</tracking-id>\
                 <operator-id>31002</operator-id><timestamp>{now}</timestamp><message-subject>simulated</message-subject>\
                 <content><file>https://media.example/simulated.jpg</file></content></postback>",
                now = chrono::Utc::now().to_rfc3339()
            ),
            xml,
        ),
        1 => (
            serde_json::json!({
                "origin": "MMS_MO", "code": "N401", "from": "14085550100", "to": "28444",
                "keyword": "TEST", "tracking-id": tracking_id, "operator-id": 31002,
                "timestamp": chrono::Utc::now().to_rfc3339(),
                "content": [{"file": "https://media.example/simulated.jpg"}]
            })
            .to_string(),
            json,
        ),
        2 => (
            format!(
                "<postback><origin>MMS_MT</origin><code>N101</code><tracking-id>{tracking_id}</tracking-id>\
                 <sent-as>MMS</sent-as><mms-id>1001</mms-id><status>Sent</status></postback>"
            ),
            xml,
        ),
        3 => (
            serde_json::json!({
                "origin": "MMS_MT", "code": "N102", "tracking-id": tracking_id, "mms-id": "1001",
                "status": "Delivered", "handset": "simulated", "sent-as": "MMS"
            })
            .to_string(),
            json,
        ),
        _ => (
            format!("<postback><origin>MMS_MT</origin><code>E101</code><mms-id>{tracking_id}</mms-id></postback>"),
            xml,
        ),
    };
    (Bytes::from(body), content_type)
}

/// The files of `dir` (sorted), each with a Content-Type from its extension.
fn read_files(dir: &std::path::Path) -> anyhow::Result<Vec<(Bytes, &'static str)>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|err| anyhow::anyhow!("cannot read {}: {err}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    let files: Vec<(Bytes, &'static str)> = paths
        .iter()
        .map(|path| {
            let content_type = match path.extension().and_then(|e| e.to_str()) {
                Some("json") => "application/json",
                _ => "text/xml",
            };
            std::fs::read(path)
                .map(|body| (Bytes::from(body), content_type))
                .map_err(|err| anyhow::anyhow!("cannot read {}: {err}", path.display()))
        })
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!files.is_empty(), "no files in {}", dir.display());
    Ok(files)
}
