//! The real binary: crash (SIGKILL) and restart on the same store, graceful
//! shutdown (SIGTERM), `check-config`, and JSON logs.
//!
//! The harness (the process guard, the load senders and their books) is in
//! `common/process.rs`, shared with the fault tests in `faults.rs`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use common::process::*;
use common::*;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

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
        let mut acknowledged = BTreeMap::new();
        for (round, run_for) in [900u64, 1100, 1300].into_iter().enumerate() {
            let mut relay = RelayProcess::spawn(&config).await;
            let load = Load::start(&relay.url, &format!("r{round}"), 4, OnFault::Stop);
            tokio::time::sleep(Duration::from_millis(run_for)).await;
            // Mark first, so every failure from here on is the kill's doing.
            load.expect_faults();
            tokio::task::block_in_place(|| relay.kill());
            let sent = load.finish().await;
            assert!(sent.unexpected.is_empty(), "{:?}", sent.unexpected);
            assert!(!sent.acknowledged.is_empty(), "round {round}: nothing acknowledged");
            println!(
                "round {round}: {} acknowledged, {} requests cut off by SIGKILL",
                sent.acknowledged.len(),
                sent.cut_off
            );
            acknowledged.extend(sent.acknowledged);
        }
        let relay = RelayProcess::spawn(&config).await;
        // Also checks that the id answered is the id delivered.
        let received = wait_for_all(&sink, &acknowledged, Duration::from_secs(30)).await;
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
        let load = Load::start(&relay.url, "term", 4, OnFault::Stop);
        // Deliveries are in flight (each takes 1 s) and senders are busy.
        sink.wait_for("/inbox", 1, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        load.expect_faults();
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        let sent = load.finish().await;
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
        assert!(
            lines.iter().any(|l| l.contains("stopped cleanly")),
            "{}",
            lines.join("\n")
        );
        assert!(sent.unexpected.is_empty(), "{:?}", sent.unexpected);
        let (acknowledged, cut_off) = (sent.acknowledged, sent.cut_off);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tls_certificate() {
    use tokio::io::AsyncWriteExt;
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let first = tls::write_certificate(dir.path());
        let config = write_config(
            dir.path(),
            &format!(
                "tls:\n  cert: {}\n  key: {}\n",
                dir.path().join("cert.pem").display(),
                dir.path().join("key.pem").display()
            ),
        );
        let relay = RelayProcess::spawn(&config).await;
        let addr: std::net::SocketAddr = relay
            .url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let post = |id: &str| {
            raw::post_bytes(
                addr,
                "/sinch/postback",
                "text/xml",
                &mo_xml(id, "all", "28444"),
            )
        };
        let mut before = tls::connect(addr, &first).await;
        before.write_all(&post("HUP-1")).await.unwrap();
        assert_eq!(
            raw::read_response(&mut before, Duration::from_secs(10))
                .await
                .status,
            200
        );

        let second = tls::write_certificate(dir.path());
        relay.signal("HUP");
        let reloaded = async {
            loop {
                if relay.log().contains("TLS certificate reloaded") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), reloaded)
            .await
            .unwrap_or_else(|_| panic!("no reload logged:\n{}", relay.log()));
        let mut after = tls::connect(addr, &second).await;
        after.write_all(&post("HUP-2")).await.unwrap();
        assert_eq!(
            raw::read_response(&mut after, Duration::from_secs(10))
                .await
                .status,
            200
        );
        // The connection from before the reload is still served.
        before.write_all(&post("HUP-3")).await.unwrap();
        assert_eq!(
            raw::read_response(&mut before, Duration::from_secs(10))
                .await
                .status,
            200
        );
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
    })
    .await
    .expect("the SIGHUP test ends within 60 s");
}
