//! The real binary as a test subject, and the load that is sent to it.
//!
//! [`RelayProcess`] runs `postback-relay run`: every child is owned by a guard
//! that kills and reaps it on drop, so no relay outlives a test, and its stderr
//! is drained by a thread so it never blocks on a full pipe. Every wait has a
//! deadline.
//!
//! [`Load`] posts distinct postbacks the way Sinch does (each sender serially on
//! its own keep-alive connection) and keeps the books a fault test needs: every
//! postback acknowledged with a complete `200` answer, and every request that
//! got no complete answer, which counts as not acknowledged.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::{config_yaml, get, metric_value, mo_xml, Sink};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_postback-relay");

/// Quick retries and enough attempts that nothing is given up during a test.
pub const DELIVERY: &str =
    "delivery:\n  backoff: {initial: 50ms, max: 200ms}\n  max_attempts: 1000\n";

/// How long a sender waits for an answer: what Sinch waits before it gives up
/// and sends the postback again.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The binary with a predictable environment: no `RELAY_*` overrides from
/// the caller's shell, `info` logs.
pub fn relay_command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RELAY_") {
            command.env_remove(key);
        }
    }
    command.env("RUST_LOG", "info").stdin(Stdio::null());
    command
}

/// Polls `child` until it exits, or kills it and panics after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: the process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Collects a pipe into a string on its own thread.
fn read_all(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// Runs a command that should end by itself: (status, stdout, stderr).
pub fn run_to_end(args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    let mut child = relay_command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the relay binary");
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let status = wait_exit(&mut child, timeout, &format!("{args:?}"));
    (status, stdout.join().unwrap(), stderr.join().unwrap())
}

/// Writes the ephemeral-ports config (store in `dir`) plus `rest` to
/// `dir/relay.yaml`.
pub fn write_config(dir: &Path, rest: &str) -> PathBuf {
    let path = dir.join("relay.yaml");
    std::fs::write(&path, config_yaml(dir, rest)).expect("write config");
    path
}

/// A running `postback-relay run`; SIGKILLed and reaped when dropped.
pub struct RelayProcess {
    child: Child,
    /// Full URL of the postback endpoint.
    pub url: String,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Every stderr line so far, appended by the drain thread.
    lines: Arc<Mutex<Vec<String>>>,
    /// Ends when stderr closes (the process exited).
    drain: Option<std::thread::JoinHandle<()>>,
}

impl RelayProcess {
    /// Starts the binary and waits (bounded) for its "listening" log line.
    pub fn start(config: &Path) -> RelayProcess {
        RelayProcess::start_with(config, &[])
    }

    /// [`RelayProcess::start`] with more `run` arguments (e.g. `--watch`).
    pub fn start_with(config: &Path, extra: &[&str]) -> RelayProcess {
        RelayProcess::start_customized(config, extra, |_| {})
    }

    /// [`RelayProcess::start_with`], with the command adjusted first (say,
    /// resource limits set in `pre_exec`).
    pub fn start_customized(
        config: &Path,
        extra: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> RelayProcess {
        let mut args = vec![
            "run",
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
        ];
        args.extend_from_slice(extra);
        let mut command = relay_command(&args);
        customize(&mut command);
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the relay binary");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let drain = std::thread::spawn({
            let lines = lines.clone();
            move || {
                for line in stderr.lines() {
                    match line {
                        Ok(line) => lines.lock().unwrap().push(line),
                        Err(_) => break,
                    }
                }
            }
        });
        let mut relay = RelayProcess {
            child,
            url: String::new(),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            lines,
            drain: Some(drain),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let listening = loop {
            let found = relay.lines().iter().find_map(|line| {
                let json: Value = serde_json::from_str(line).ok()?;
                (json["message"] == "postback-relay listening").then_some(json)
            });
            if let Some(json) = found {
                break json;
            }
            if let Some(status) = relay.child.try_wait().unwrap() {
                panic!("relay exited ({status}) before listening:\n{}", relay.log());
            }
            if Instant::now() >= deadline {
                panic!("relay not listening after 20 s:\n{}", relay.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let addr = |key: &str| -> SocketAddr {
            listening[key]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("`{key}` address in {listening}"))
        };
        relay.url = format!("http://{}/sinch/postback", addr("ingest"));
        relay.admin = addr("admin");
        relay
    }

    /// Starts it from async code without blocking a runtime thread.
    pub async fn spawn(config: &Path) -> RelayProcess {
        let config = config.to_owned();
        tokio::task::spawn_blocking(move || RelayProcess::start(&config))
            .await
            .expect("start task")
    }

    /// The process id, for limits set from outside (`prlimit`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The whole stderr so far, for failure messages.
    pub fn log(&self) -> String {
        self.lines().join("\n")
    }

    /// A URL on the admin listener, e.g. `admin_url("/readyz")`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The value of one metric sample, e.g. `relay_dead_letters{target="a"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let (status, body) = get(&self.admin_url("/metrics")).await;
        assert_eq!(status, 200);
        metric_value(&body, sample)
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().expect("reap");
        assert!(!status.success(), "a killed relay cannot exit cleanly");
    }

    /// Sends a signal by name (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{name} failed");
    }

    /// SIGTERM, then wait (bounded) for the exit; returns the status and the
    /// whole stderr.
    pub fn terminate(mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        self.signal("TERM");
        let status = wait_exit(&mut self.child, timeout, "graceful shutdown");
        if let Some(drain) = self.drain.take() {
            drain.join().expect("stderr drain thread");
        }
        (status, self.lines())
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client a sender uses: one pooled keep-alive connection per host.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A new client with its own connection pool.
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A complete answer to a POST.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The body as JSON (Null when it is not JSON).
    pub json: Value,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    /// From sending the request to the end of the answer.
    pub elapsed: Duration,
}

/// A request that got no complete answer: whatever it was, it is not an
/// acknowledgement.
#[derive(Debug, Clone)]
pub struct NoAnswer {
    /// `refused` (no connection: the request was never sent), `no answer`
    /// (the connection broke before an answer), `cut mid-answer` (the status
    /// line came but the body did not) or `timed out`.
    pub kind: &'static str,
    /// The error with its causes.
    pub message: String,
}

/// The error with its whole source chain (hyper puts "connection refused" deep).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// One XML POST that may fail (the relay may be killed mid-request), bounded
/// by [`ANSWER_TIMEOUT`].
pub async fn try_post(client: &HttpClient, url: &str, body: String) -> Result<Answer, NoAnswer> {
    let request = hyper::Request::post(url)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let started = Instant::now();
    let exchange = async {
        let response = client.request(request).await.map_err(|err| NoAnswer {
            kind: if err.is_connect() {
                "refused"
            } else {
                "no answer"
            },
            message: error_chain(&err),
        })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap_or("(not text)").to_owned());
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| NoAnswer {
                kind: "cut mid-answer",
                message: error_chain(&err),
            })?
            .to_bytes();
        Ok(Answer {
            status,
            json: serde_json::from_slice(&body).unwrap_or(Value::Null),
            retry_after,
            elapsed: started.elapsed(),
        })
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(NoAnswer {
                kind: "timed out",
                message: format!("no answer within {ANSWER_TIMEOUT:?}"),
            })
        })
}

/// What a load's senders saw.
#[derive(Debug, Default, Clone)]
pub struct Sent {
    /// Tracking id → envelope id of every postback answered 200 (`accepted`,
    /// or `duplicate` for a resent one whose first copy was committed).
    pub acknowledged: BTreeMap<String, String>,
    /// How many of those were answered `duplicate`: resent after a request
    /// that got no answer although its postback had been committed.
    pub duplicate_answers: usize,
    /// Other answers, and failures while no fault was expected (there must be
    /// none).
    pub unexpected: Vec<String>,
    /// Requests without a complete answer while faults were expected.
    pub cut_off: usize,
    /// Those by [`NoAnswer::kind`].
    pub cut_off_by_kind: BTreeMap<&'static str, usize>,
}

/// What a sender does after a request got no complete answer while faults
/// are expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFault {
    /// Stop sending (the relay is gone for good).
    Stop,
    /// Send the same postback again after a short pause, to the current URL,
    /// until it is answered (what Sinch does).
    Resend,
}

struct LoadState {
    url: Mutex<String>,
    faults_expected: AtomicBool,
    stop: AtomicBool,
    on_fault: OnFault,
    sent: Mutex<Sent>,
}

/// Concurrent senders posting distinct postbacks (`mo_xml` with tracking ids
/// `PREFIX-sS-N`) until stopped, each serially on its own keep-alive
/// connection, the way Sinch does.
pub struct Load {
    state: Arc<LoadState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts `senders` senders posting to `url`.
    pub fn start(url: &str, prefix: &str, senders: usize, on_fault: OnFault) -> Load {
        let state = Arc::new(LoadState {
            url: Mutex::new(url.to_owned()),
            faults_expected: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            on_fault,
            sent: Mutex::default(),
        });
        let tasks = (0..senders)
            .map(|s| tokio::spawn(sender(state.clone(), format!("{prefix}-s{s}"))))
            .collect();
        Load { state, tasks }
    }

    /// From now on a request without an answer is the test's doing (a kill,
    /// a shutdown), not a failure.
    pub fn expect_faults(&self) {
        self.state.faults_expected.store(true, Ordering::SeqCst);
    }

    /// Sends the next requests to `url` (a restarted relay on new ports).
    pub fn follow(&self, url: &str) {
        *self.state.url.lock().unwrap() = url.to_owned();
    }

    /// The books so far.
    pub fn sent(&self) -> MutexGuard<'_, Sent> {
        self.state.sent.lock().unwrap()
    }

    /// Waits until at least `count` postbacks are acknowledged.
    pub async fn wait_acknowledged(&self, count: usize, timeout: Duration) {
        super::eventually(timeout, &format!("{count} acknowledged postbacks"), || {
            let done = self.sent().acknowledged.len() >= count;
            async move { done.then_some(()) }
        })
        .await
    }

    /// Stops the senders (each finishes or loses its request in flight) and
    /// returns the books.
    pub async fn finish(self) -> Sent {
        self.state.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            tokio::time::timeout(ANSWER_TIMEOUT + Duration::from_secs(5), task)
                .await
                .expect("a sender ends once its request in flight is answered or times out")
                .expect("sender task");
        }
        let sent = self.state.sent.lock().unwrap().clone();
        sent
    }
}

async fn sender(state: Arc<LoadState>, prefix: String) {
    let client = http_client();
    let mut n = 0u64;
    while !state.stop.load(Ordering::SeqCst) {
        let tracking_id = format!("{prefix}-{n}");
        let url = state.url.lock().unwrap().clone();
        let result = try_post(&client, &url, mo_xml(&tracking_id, "hello", "28444")).await;
        let resend = {
            let mut sent = state.sent.lock().unwrap();
            match result {
                Ok(answer)
                    if answer.status == 200
                        && (answer.json["status"] == "accepted"
                            || answer.json["status"] == "duplicate") =>
                {
                    if answer.json["status"] == "duplicate" {
                        sent.duplicate_answers += 1;
                    }
                    let id = answer.json["id"].as_str().unwrap_or_default().to_owned();
                    sent.acknowledged.insert(tracking_id, id);
                    n += 1;
                    false
                }
                Err(no_answer) if state.faults_expected.load(Ordering::SeqCst) => {
                    sent.cut_off += 1;
                    *sent.cut_off_by_kind.entry(no_answer.kind).or_default() += 1;
                    match state.on_fault {
                        OnFault::Stop => return,
                        OnFault::Resend => true,
                    }
                }
                other => {
                    sent.unexpected.push(format!("{tracking_id}: {other:?}"));
                    return;
                }
            }
        };
        if resend {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until `sink` has received every acknowledged postback (matched by
/// tracking id), checking on the way that each carries the envelope id its
/// 200 answered; returns tracking id → how many times it was received.
pub async fn wait_for_all(
    sink: &Sink,
    acknowledged: &BTreeMap<String, String>,
    timeout: Duration,
) -> BTreeMap<String, usize> {
    let (counts, missing) = deliveries(sink, acknowledged, timeout).await;
    if !missing.is_empty() {
        panic!(
            "{} of {} acknowledged postbacks never delivered to {}, e.g. {:?}",
            missing.len(),
            acknowledged.len(),
            sink.addr,
            &missing[..missing.len().min(5)]
        );
    }
    counts
}

/// What [`wait_for_all`] waits for, without failing: the deliveries (tracking
/// id → how many times received) and the acknowledged postbacks still
/// missing when `timeout` ran out (none if it returned early).
pub async fn deliveries(
    sink: &Sink,
    acknowledged: &BTreeMap<String, String>,
    timeout: Duration,
) -> (BTreeMap<String, usize>, Vec<String>) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = 0;
    loop {
        let new = sink.received_from(seen);
        seen += new.len();
        for request in new {
            let envelope = request.json();
            let tracking_id = envelope["data"]["tracking_id"]
                .as_str()
                .expect("tracking id in the envelope data");
            if let Some(id) = acknowledged.get(tracking_id) {
                assert_eq!(
                    envelope["id"].as_str(),
                    Some(id.as_str()),
                    "{tracking_id} delivered with another id than its 200 answered"
                );
            }
            *counts.entry(tracking_id.to_owned()).or_insert(0) += 1;
        }
        let missing: Vec<String> = acknowledged
            .keys()
            .filter(|id| !counts.contains_key(*id))
            .cloned()
            .collect();
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            return (counts, missing);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
