//! One delivery attempt to one target: an HTTP POST, or a line appended to a file.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use super::retry::{classify, parse_retry_after, Verdict};
use super::signing::SigningKey;
use crate::config::PayloadKind;
use crate::envelope;
use crate::store::Job;

/// The outbound HTTP client shared by all HTTP targets (one connection pool).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How much of a target's error answer is kept for the dead letter.
const ERROR_BODY_LIMIT: usize = 512;

/// The result of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Delivered, worth retrying, or refused for good.
    pub verdict: Verdict,
    /// The HTTP status, when the target answered.
    pub status: Option<u16>,
    /// What went wrong (empty when delivered).
    pub error: String,
    /// The target's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
}

impl Attempt {
    fn failed(error: String) -> Attempt {
        Attempt {
            verdict: Verdict::Retry,
            status: None,
            error,
            retry_after: None,
        }
    }
}

/// Where a target's deliveries go.
#[allow(clippy::large_enum_variant)] // one per target, never moved in a hot path
pub enum Sink {
    /// An HTTP(S) webhook.
    Http(HttpSink),
    /// A local JSON-lines file.
    File(FileSink),
}

impl Sink {
    /// Makes one attempt, bounded by `timeout`.
    pub async fn send(&self, job: &Job, timeout: Duration) -> Attempt {
        match self {
            Sink::Http(http) => http.send(job, timeout).await,
            Sink::File(file) => file.send(job, timeout).await,
        }
    }
}

/// An HTTP target.
pub struct HttpSink {
    /// Shared client.
    pub client: HttpClient,
    /// Webhook URL.
    pub url: Uri,
    /// Extra headers from the config.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Envelope or raw body.
    pub payload: PayloadKind,
    /// Standard Webhooks key, when configured.
    pub signing: Option<SigningKey>,
}

impl HttpSink {
    async fn send(&self, job: &Job, timeout: Duration) -> Attempt {
        let (body, content_type) = match self.payload {
            PayloadKind::Envelope => (
                job.envelope.clone(),
                HeaderValue::from_static(envelope::CONTENT_TYPE),
            ),
            PayloadKind::Raw => (
                job.raw_body.clone(),
                job.content_type
                    .as_deref()
                    .and_then(|value| HeaderValue::from_str(value).ok())
                    .unwrap_or(HeaderValue::from_static("application/octet-stream")),
            ),
        };
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(
                USER_AGENT,
                HeaderValue::from_static(concat!("postback-relay/", env!("CARGO_PKG_VERSION"))),
            )
            .header(CONTENT_TYPE, content_type);
        if let Some(headers) = request.headers_mut() {
            // Configured headers replace the defaults above (a custom
            // Content-Type, say) rather than doubling them.
            for (name, value) in &self.headers {
                headers.insert(name, value.clone());
            }
        }
        if let Some(key) = &self.signing {
            let timestamp = chrono::Utc::now().timestamp();
            request = request
                .header("webhook-id", &job.event_id)
                .header("webhook-timestamp", timestamp.to_string())
                .header(
                    "webhook-signature",
                    key.sign(&job.event_id, timestamp, &body),
                );
        }
        let request = match request.body(Full::new(body)) {
            Ok(request) => request,
            Err(err) => return Attempt::failed(format!("cannot build request: {err}")),
        };
        let exchange = async {
            let response = self.client.request(request).await.map_err(|err| {
                // The source chain holds the useful part ("connection refused").
                let mut message = err.to_string();
                let mut source = std::error::Error::source(&err);
                while let Some(cause) = source {
                    message = format!("{message}: {cause}");
                    source = cause.source();
                }
                message
            })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
            // Read (a bounded part of) the body so the connection can be reused.
            let body = Limited::new(response.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .unwrap_or_default();
            Ok::<_, String>((status, retry_after, body))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Err(_) => Attempt::failed(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
            Ok(Err(error)) => Attempt::failed(error),
            Ok(Ok((status, retry_after, body))) => {
                let verdict = classify(status);
                let error = if verdict == Verdict::Delivered {
                    String::new()
                } else {
                    let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_LIMIT)]);
                    format!("HTTP {status}: {}", text.trim())
                };
                Attempt {
                    verdict,
                    status: Some(status.as_u16()),
                    error,
                    retry_after,
                }
            }
        }
    }
}

/// A file target: appends one envelope per line and fsyncs, so the default
/// config delivers somewhere real with no other service running. A failed
/// write is rolled back to the file's previous length: the file only ever
/// holds whole lines.
pub struct FileSink {
    path: PathBuf,
    file: Arc<Mutex<Option<std::fs::File>>>,
}

impl FileSink {
    /// The file is opened (and created) on the first delivery.
    pub fn new(path: PathBuf) -> FileSink {
        FileSink {
            path,
            file: Arc::new(Mutex::new(None)),
        }
    }

    async fn send(&self, job: &Job, timeout: Duration) -> Attempt {
        let path = self.path.clone();
        let file = self.file.clone();
        let mut line = job.envelope.to_vec();
        line.push(b'\n');
        let write = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut guard = file.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                *guard = Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)?,
                );
            }
            let handle = guard.as_mut().expect("opened above");
            let before = handle.metadata()?.len();
            let result = handle.write_all(&line).and_then(|()| handle.sync_data());
            if result.is_err() {
                // A full disk or a size limit can cut the line short: cut it
                // off again, or the retry would glue its line to the torn one.
                if let Err(err) = handle.set_len(before) {
                    tracing::error!(file = %path.display(), error = %err,
                        "cannot remove a partly written line from the file target");
                }
                // Reopen next time: the file may have been moved or the disk fixed.
                *guard = None;
            }
            result
        });
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(Ok(()))) => Attempt {
                verdict: Verdict::Delivered,
                status: None,
                error: String::new(),
                retry_after: None,
            },
            Ok(Ok(Err(err))) => {
                Attempt::failed(format!("cannot write {}: {err}", self.path.display()))
            }
            Ok(Err(err)) => Attempt::failed(format!("file writer failed: {err}")),
            Err(_) => Attempt::failed(format!("writing {} timed out", self.path.display())),
        }
    }
}
