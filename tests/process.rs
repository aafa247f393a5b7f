//! The real binary: crash (SIGKILL) and restart on the same store, graceful
//! shutdown (SIGTERM), `check-config`, and JSON logs.
//!
//! Every child process is owned by a guard that kills and reaps it on drop, so
//! no relay outlives a test, and its stderr is drained by a thread so it never
//! blocks on a full pipe. Every wait has a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_postback-relay");

/// Quick retries and enough attempts that nothing is given up during a test.
const DELIVERY: &str = "delivery:\n  backoff: {initial: 50ms, max: 200ms}\n  max_attempts: 1000\n";

/// The binary with a predictable environment: no `RELAY_*` overrides from
/// the caller's shell, `info` logs.
fn relay_command(args: &[&str]) -> Command {
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
fn wait_exit(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
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
fn run_to_end(args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
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

/// Writes the ephemeral-ports config (store in `dir`) plus `rest`.
fn write_config(dir: &Path, rest: &str) -> PathBuf {
    let path = dir.join("relay.yaml");
    std::fs::write(&path, config_yaml(dir, rest)).expect("write config");
    path
}

/// A running `postback-relay run`; SIGKILLed and reaped when dropped.
struct RelayProcess {
    child: Child,
    /// Full URL of the postback endpoint.
    url: String,
    /// The admin listener.
    admin: SocketAddr,
    /// Every stderr line so far, appended by the drain thread.
    lines: Arc<Mutex<Vec<String>>>,
    /// Ends when stderr closes (the process exited).
    drain: Option<std::thread::JoinHandle<()>>,
}

impl RelayProcess {
    /// Starts the binary and waits (bounded) for its "listening" log line.
    fn start(config: &Path) -> RelayProcess {
        let mut child = relay_command(&[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
        ])
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
    async fn spawn(config: &Path) -> RelayProcess {
        let config = config.to_owned();
        tokio::task::spawn_blocking(move || RelayProcess::start(&config))
            .await
            .expect("start task")
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn log(&self) -> String {
        self.lines().join("\n")
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let status = self.child.wait().expect("reap");
        assert!(!status.success(), "a killed relay cannot exit cleanly");
    }

    /// SIGTERM, then wait (bounded) for the exit; returns the status and the
    /// whole stderr.
    fn terminate(mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
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

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// One POST that may fail (the relay may be killed mid-request).
async fn try_post(client: &HttpClient, url: &str, body: String) -> Result<(u16, Value), String> {
    let request = hyper::Request::post(url)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let exchange = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
}

/// What the senders of one relay run saw.
#[derive(Default)]
struct Sent {
    /// Tracking id → envelope id of every postback answered 200 "accepted".
    acknowledged: BTreeMap<String, String>,
    /// Failures before the relay was told to stop (there must be none).
    unexpected: Vec<String>,
    /// Requests that failed after the kill or SIGTERM (in flight at that moment).
    cut_off: usize,
}

/// Posts distinct postbacks serially on one keep-alive connection, the way
/// Sinch does, until the relay goes away or `limit` is reached.
async fn sender(
    url: String,
    prefix: String,
    limit: usize,
    stopping: Arc<AtomicBool>,
    sent: Arc<Mutex<Sent>>,
) {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    for n in 0..limit {
        let tracking_id = format!("{prefix}-{n}");
        let result = try_post(&client, &url, mo_xml(&tracking_id, "hello", "28444")).await;
        let mut sent = sent.lock().unwrap();
        match result {
            Ok((200, answer)) if answer["status"] == "accepted" => {
                let id = answer["id"].as_str().unwrap_or_default().to_owned();
                sent.acknowledged.insert(tracking_id, id);
            }
            _ if stopping.load(Ordering::SeqCst) => {
                sent.cut_off += 1;
                return;
            }
            other => {
                sent.unexpected.push(format!("{tracking_id}: {other:?}"));
                return;
            }
        }
    }
}

/// Starts `count` senders against `url`.
fn senders(
    url: &str,
    prefix: &str,
    count: usize,
    limit: usize,
    stopping: &Arc<AtomicBool>,
    sent: &Arc<Mutex<Sent>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count)
        .map(|s| {
            tokio::spawn(sender(
                url.to_owned(),
                format!("{prefix}-s{s}"),
                limit,
                stopping.clone(),
                sent.clone(),
            ))
        })
        .collect()
}

async fn join_senders(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("sender ends within 10 s (requests time out after 5 s)")
            .expect("sender task");
    }
}

/// Tracking id → how many times the sink received it.
fn received_by_tracking_id(sink: &Sink) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for request in sink.received() {
        let envelope = request.json();
        let tracking_id = envelope["data"]["tracking_id"]
            .as_str()
            .expect("tracking id in the envelope data")
            .to_owned();
        *counts.entry(tracking_id).or_insert(0) += 1;
    }
    counts
}

/// Waits until the sink has every acknowledged postback.
async fn wait_for_all(sink: &Sink, acknowledged: &BTreeMap<String, String>, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let received = received_by_tracking_id(sink);
        let missing: Vec<&String> = acknowledged
            .keys()
            .filter(|id| !received.contains_key(*id))
            .collect();
        if missing.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "{} of {} acknowledged postbacks never delivered, e.g. {:?}",
                missing.len(),
                acknowledged.len(),
                &missing[..missing.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_postbacks_survive_sigkill() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let sink = Sink::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            &format!(
                "{DELIVERY}targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
                sink.url("/inbox")
            ),
        );
        let sent = Arc::new(Mutex::new(Sent::default()));
        for (round, run_for) in [900u64, 1100, 1300].into_iter().enumerate() {
            let mut relay = RelayProcess::spawn(&config).await;
            let stopping = Arc::new(AtomicBool::new(false));
            let (before, cut_before) = {
                let sent = sent.lock().unwrap();
                (sent.acknowledged.len(), sent.cut_off)
            };
            let tasks = senders(&relay.url, &format!("r{round}"), 4, usize::MAX, &stopping, &sent);
            tokio::time::sleep(Duration::from_millis(run_for)).await;
            // Mark first, so every failure from here on is the kill's doing.
            stopping.store(true, Ordering::SeqCst);
            tokio::task::block_in_place(|| relay.kill());
            join_senders(tasks).await;
            let sent = sent.lock().unwrap();
            assert!(sent.unexpected.is_empty(), "{:?}", sent.unexpected);
            let acknowledged = sent.acknowledged.len() - before;
            assert!(acknowledged > 0, "round {round}: nothing acknowledged");
            println!(
                "round {round}: {acknowledged} acknowledged, {} requests cut off by SIGKILL",
                sent.cut_off - cut_before
            );
        }
        let acknowledged = sent.lock().unwrap().acknowledged.clone();
        let relay = RelayProcess::spawn(&config).await;
        wait_for_all(&sink, &acknowledged, Duration::from_secs(30)).await;

        let received = received_by_tracking_id(&sink);
        let duplicates: usize = received.values().map(|n| n - 1).sum();
        let unacknowledged = received
            .keys()
            .filter(|id| !acknowledged.contains_key(*id))
            .count();
        println!(
            "crash test: {} acknowledged, all delivered; {} deliveries in all, {duplicates} duplicates, \
             {unacknowledged} delivered without a 200 (committed when killed)",
            acknowledged.len(),
            received.values().sum::<usize>(),
        );
        // Envelope ids are stable: the id answered is the id delivered.
        for request in sink.received() {
            let envelope = request.json();
            let tracking_id = envelope["data"]["tracking_id"].as_str().unwrap();
            if let Some(id) = acknowledged.get(tracking_id) {
                assert_eq!(envelope["id"].as_str(), Some(id.as_str()));
            }
        }
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
    })
    .await
    .expect("the crash test ends within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_loses_nothing() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let sink = Sink::start().await;
        sink.respond(|_, _| Reply {
            status: 200,
            headers: Vec::new(),
            delay: Duration::from_secs(1),
        });
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            &format!(
                "{DELIVERY}targets:\n  inbox: {{url: \"{}\", concurrency: 4, timeout: 5s}}\nroutes:\n  - targets: [inbox]\n",
                sink.url("/inbox")
            ),
        );
        let relay = RelayProcess::spawn(&config).await;
        let stopping = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Sent::default()));
        let tasks = senders(&relay.url, "term", 4, usize::MAX, &stopping, &sent);
        // Deliveries are in flight (each takes 1 s) and senders are busy.
        sink.wait_for("/inbox", 1, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stopping.store(true, Ordering::SeqCst);
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        join_senders(tasks).await;
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
        assert!(
            lines.iter().any(|l| l.contains("stopped cleanly")),
            "{}",
            lines.join("\n")
        );
        let (acknowledged, cut_off) = {
            let sent = sent.lock().unwrap();
            assert!(sent.unexpected.is_empty(), "{:?}", sent.unexpected);
            (sent.acknowledged.clone(), sent.cut_off)
        };
        assert!(!acknowledged.is_empty());

        // Every 200 is delivered or still queued in the store.
        let conn = rusqlite::Connection::open_with_flags(
            dir.path().join("relay.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let pending: BTreeSet<String> = conn
            .prepare("SELECT event_id FROM jobs")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let dead: i64 = conn
            .query_row("SELECT COUNT(*) FROM dead_letters", [], |row| row.get(0))
            .unwrap();
        // Attempts in flight at SIGTERM were finished and recorded, not
        // abandoned with a lease.
        let leased: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM jobs WHERE lease_until > 0",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(leased, 0, "deliveries abandoned in flight");
        drop(conn);
        assert_eq!(dead, 0);
        let delivered: BTreeSet<String> = sink
            .received()
            .iter()
            .map(|r| r.json()["id"].as_str().unwrap().to_owned())
            .collect();
        let lost: Vec<&String> = acknowledged
            .values()
            .filter(|id| !delivered.contains(*id) && !pending.contains(*id))
            .collect();
        assert!(lost.is_empty(), "acknowledged but neither delivered nor queued: {lost:?}");
        assert!(!pending.is_empty(), "nothing left pending: the test proves nothing");
        println!(
            "graceful: {} acknowledged, {cut_off} cut off, {} pending at exit",
            acknowledged.len(),
            pending.len()
        );

        // A restart delivers the rest.
        sink.respond(|_, _| Reply::status(200));
        let relay = RelayProcess::spawn(&config).await;
        wait_for_all(&sink, &acknowledged, Duration::from_secs(20)).await;
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
    })
    .await
    .expect("the graceful shutdown test ends within 60 s");
}

#[test]
fn check_config_accepts_good_files_and_names_the_culprit_in_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, yaml: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, yaml).unwrap();
        let path_text = path.display().to_string();
        let (status, stdout, stderr) = run_to_end(
            &["check-config", "--config", &path_text],
            Duration::from_secs(20),
        );
        (path_text, status, stdout, stderr)
    };

    let good = config_yaml(
        dir.path(),
        "targets:\n  inbox: {url: \"http://127.0.0.1:9/hook\"}\nroutes:\n  - targets: [inbox]\n",
    );
    let (path, status, stdout, stderr) = check("good.yaml", &good);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(stdout.contains(&path), "{stdout}");

    for (name, yaml, key) in [
        (
            "unknown-key.yaml",
            "ingest: {colour: red}\n",
            "ingest.colour",
        ),
        (
            "bad-duration.yaml",
            "ingest: {dedupe_window: 5 parsecs}\n",
            "ingest.dedupe_window",
        ),
        (
            "missing-target.yaml",
            "targets:\n  inbox: {url: \"http://127.0.0.1:9/\"}\nroutes:\n  - targets: [nowhere]\n",
            "routes[0].targets",
        ),
        (
            "bad-url.yaml",
            "targets:\n  x: {url: \"ftp://x\"}\n",
            "targets.x.url",
        ),
    ] {
        let (path, status, stdout, stderr) = check(name, yaml);
        assert!(!status.success(), "{name} accepted: {stdout}");
        assert!(
            stderr.contains(&path),
            "{name}: file not named in {stderr:?}"
        );
        assert!(
            stderr.contains(key),
            "{name}: `{key}` not named in {stderr:?}"
        );
    }
    let missing = dir.path().join("does-not-exist.yaml").display().to_string();
    let (status, stdout, stderr) = run_to_end(
        &["check-config", "--config", &missing],
        Duration::from_secs(20),
    );
    assert!(!status.success(), "missing file accepted: {stdout}");
    assert!(
        stderr.contains(&missing),
        "missing file not named: {stderr}"
    );

    // `run` refuses an invalid config before it listens on anything.
    let bad = dir.path().join("bad-run.yaml");
    std::fs::write(
        &bad,
        config_yaml(dir.path(), "targets:\n  x: {url: \"ftp://x\"}\n"),
    )
    .unwrap();
    let bad = bad.display().to_string();
    let (status, _, stderr) = run_to_end(
        &["run", "--config", &bad, "--log-format", "json"],
        Duration::from_secs(20),
    );
    assert!(!status.success(), "run started with an invalid config");
    assert!(stderr.contains("targets.x.url"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
}

/// The keys of one JSON object, repeats kept (serde_json's `Value` would
/// silently keep only one of two equal keys).
struct Keys(Vec<String>);

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Keys, D::Error> {
        struct ObjectKeys;
        impl<'de> Visitor<'de> for ObjectKeys {
            type Value = Keys;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((key, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                    keys.push(key);
                }
                Ok(Keys(keys))
            }
        }
        deserializer.deserialize_map(ObjectKeys)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let sink = Sink::start().await;
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            &format!(
                "{DELIVERY}targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
                sink.url("/inbox")
            ),
        );
        let relay = RelayProcess::spawn(&config).await;
        let (status, answer) = post(&relay.url, Some("text/xml"), SEED_XML).await;
        assert_eq!(status, 200, "{answer}");
        let id = answer["id"].as_str().unwrap().to_owned();
        sink.wait_for("/inbox", 1, Duration::from_secs(10)).await;
        let delivered_line = |lines: &[String]| {
            lines.iter().any(|l| {
                serde_json::from_str::<Value>(l)
                    .is_ok_and(|j| j["message"] == "delivered" && j["id"] == id.as_str())
            })
        };
        eventually(Duration::from_secs(10), "a `delivered` log line", || {
            let found = delivered_line(&relay.lines());
            async move { found.then_some(()) }
        })
        .await;
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}");

        assert!(lines.len() >= 4, "{lines:?}");
        for line in &lines {
            let json: Value =
                serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
            assert!(json.is_object(), "{line}");
            for key in ["timestamp", "level", "message"] {
                assert!(json.get(key).is_some(), "no `{key}` in {line}");
            }
            let Keys(keys) = serde_json::from_str(line).unwrap();
            let unique: BTreeSet<&String> = keys.iter().collect();
            assert_eq!(unique.len(), keys.len(), "a key appears twice in {line}");
        }
        let accepted: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|j| j["outcome"] == "accepted")
            .collect();
        assert_eq!(accepted.len(), 1, "{lines:?}");
        let line = &accepted[0];
        assert_eq!(line["id"], id.as_str());
        assert_eq!(line["origin"], "MMS_MO");
        assert_eq!(line["code"], "N401");
        assert_eq!(line["tracking_id"], "MMS_MO_iLnCRrL6");
        assert_eq!(line["level"], "INFO");
        let delivered = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|j| j["message"] == "delivered")
            .unwrap();
        assert_eq!(delivered["target"], "inbox", "{delivered}");
        assert!(delivered_line(&lines));
    })
    .await
    .expect("the log test ends within 60 s");
}
