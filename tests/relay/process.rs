//! The real binary: crash (SIGKILL) and restart on the same store, graceful
//! shutdown (SIGTERM), `check-config`, and JSON logs. Runs on SQLite, and on
//! PostgreSQL with `RELAY_TEST_BACKEND=postgres`.
//!
//! The harness (the process guard, the load senders and their books) is in
//! `common/process.rs`, shared with the fault tests in `faults.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::common::process::*;
use crate::common::*;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_postbacks_survive_sigkill() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let sink = Sink::start().await;
        // With PostgreSQL, leases of a killed relay are not voided at
        // restart (other instances may hold live ones): they run out.
        let store = TestStore::new().with_store("  lease: 4s\n");
        let config = store.write_config(&format!(
            "{DELIVERY}targets:\n  inbox: {{url: \"{}\", timeout: 2s}}\nroutes:\n  - targets: [inbox]\n",
            sink.url("/inbox")
        ));
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
        let store = TestStore::new();
        let config = store.write_config(&format!(
            "{DELIVERY}targets:\n  inbox: {{url: \"{}\", concurrency: 4, timeout: 5s}}\nroutes:\n  - targets: [inbox]\n",
            sink.url("/inbox")
        ));
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
        let pending: BTreeSet<String> = store
            .query("SELECT event_id FROM jobs")
            .into_iter()
            .map(|row| match &row[0] {
                rusqlite::types::Value::Text(id) => id.clone(),
                other => panic!("event_id: {other:?}"),
            })
            .collect();
        let dead = store.query_int("SELECT COUNT(*) FROM dead_letters");
        // Attempts in flight at SIGTERM were finished and recorded, not
        // abandoned with a lease.
        let leased = store.query_int("SELECT COUNT(*) FROM jobs WHERE lease_until > 0");
        assert_eq!(leased, 0, "deliveries abandoned in flight");
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
    if skip_unless(
        Backend::Sqlite,
        "config checks are the same for every backend",
    ) {
        return;
    }
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
        (
            "postgres-without-url.yaml",
            "store: {backend: postgres}\n",
            "store.url",
        ),
        (
            "postgres-bad-url.yaml",
            "store: {backend: postgres, url: \"postgres://relay@db:notaport/relay\"}\n",
            "store.url",
        ),
        (
            "url-but-sqlite.yaml",
            "store: {url: \"postgres://relay@db/relay\"}\n",
            "store.url",
        ),
        (
            "postgres-password-missing.yaml",
            "store: {backend: postgres, url: \"postgres://relay@db/relay\", password: {env: RELAY_TEST_NO_SUCH_VARIABLE}}\n",
            "store.password",
        ),
        (
            "postgres-short-lease.yaml",
            "store: {backend: postgres, url: \"postgres://relay@db/relay\", lease: 5s}\ndelivery: {timeout: 10s}\n",
            "store.lease",
        ),
        (
            "unknown-backend.yaml",
            "store: {backend: mysql}\n",
            "store.backend",
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
    // A PostgreSQL store is checked without connecting; the password never shows.
    let (_, status, stdout, stderr) = check(
        "postgres.yaml",
        "store:\n  backend: postgres\n  url: \"postgres://relay:hunter2@db.internal:6432/relay\"\n  pool_size: 6\n",
    );
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stdout.contains("store postgres db.internal:6432/relay"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");

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

/// Every problem of a file in one run, each on its own line with the file
/// and the key; an unknown key gets the closest known one.
#[test]
fn check_config_reports_every_problem_of_a_file_at_once() {
    if skip_unless(
        Backend::Sqlite,
        "config checks are the same for every backend",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many-problems.yaml");
    std::fs::write(
        &path,
        config_yaml(
            dir.path(),
            "delivery:\n  timeout: 0s\n  backoff: {initial: 20m, max: 10m}\n\
             targets:\n  inbox:\n    url: \"http://127.0.0.1:9/hook\"\n    timout: 5s\n    secret: not-a-whsec-key\n\
             \x20   headers: {X-Api-Key: {env: RELAY_TEST_NO_SUCH_VARIABLE}}\n\
             routes:\n  - targets: [inbx]\n",
        ),
    )
    .unwrap();
    let path = path.display().to_string();
    let expected = [
        ("delivery.timeout", "0s"),
        ("delivery.backoff.initial", "20m"),
        ("targets.inbox.timout", "did you mean `timeout`?"),
        ("targets.inbox.secret", "whsec_"),
        (
            "targets.inbox.headers.X-Api-Key",
            "RELAY_TEST_NO_SUCH_VARIABLE",
        ),
        ("routes[0].targets", "inbx"),
    ];
    for command in ["check-config", "run"] {
        let (status, stdout, stderr) =
            run_to_end(&[command, "--config", &path], Duration::from_secs(20));
        assert_eq!(status.code(), Some(2), "{command}: {stdout}{stderr}");
        let problems: Vec<&str> = stderr
            .lines()
            .filter(|line| line.starts_with(&format!("invalid config {path}: ")))
            .collect();
        for (key, value) in expected {
            assert!(
                problems
                    .iter()
                    .any(|line| line.contains(&format!(": {key}: ")) && line.contains(value)),
                "{command}: no line for `{key}` with `{value}` in:\n{stderr}"
            );
        }
        assert_eq!(problems.len(), expected.len(), "{command}:\n{stderr}");
        // `run` refuses before it opens the store or listens on anything.
        assert!(!stderr.contains("listening"), "{command}: {stderr}");
        assert!(
            !dir.path().join("relay.db").exists(),
            "{command} opened the store"
        );
    }
}

/// The store and the file target hold phone numbers and message texts: the
/// relay creates them readable by its own user only, whatever its umask.
#[test]
fn the_relay_creates_its_files_private() {
    use std::os::unix::fs::PermissionsExt;
    if skip_unless(Backend::Sqlite, "the files checked are SQLite's") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("out");
    let config = dir.path().join("relay.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nstore:\n  path: {}\n  min_free_bytes: 131072\n\
             targets:\n  archive: {{kind: file, path: {}}}\nroutes:\n  - targets: [archive]\n",
            state.join("relay.db").display(),
            out.join("postbacks.jsonl").display()
        ),
    )
    .unwrap();
    let relay = RelayProcess::start(&config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (status, answer) = post(&relay.url, None, mo_xml("private-1", "HI", "12345")).await;
        assert_eq!(status, 200, "{answer}");
        eventually(
            Duration::from_secs(15),
            "the line in the file target",
            || {
                let text = std::fs::read_to_string(out.join("postbacks.jsonl")).unwrap_or_default();
                async move { text.contains("private-1").then_some(()) }
            },
        )
        .await;
    });
    let mut checked = 0;
    let mut pending = vec![state.clone(), out.clone()];
    while let Some(path) = pending.pop() {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        if path.is_dir() {
            assert_eq!(mode, 0o700, "{} is {mode:o}", path.display());
            pending.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{} is {mode:o}", path.display());
        }
        checked += 1;
    }
    assert!(
        checked >= 4,
        "only {checked} paths checked: {}",
        relay.log()
    );
}

#[test]
fn the_kubernetes_config_maps_hold_valid_configs() {
    if skip_unless(
        Backend::Sqlite,
        "config checks are the same for every backend",
    ) {
        return;
    }
    for (variant, store) in [("postgres", "store postgres"), ("sqlite", "store sqlite")] {
        // The `relay.yaml` block of the ConfigMap, as the pods get it.
        let manifest = std::fs::read_to_string(format!(
            "{}/deploy/kubernetes/{variant}/configmap.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("read the ConfigMap");
        let yaml: String = manifest
            .lines()
            .skip_while(|line| line.trim() != "relay.yaml: |")
            .skip(1)
            .take_while(|line| line.is_empty() || line.starts_with("    "))
            .map(|line| format!("{}\n", line.get(4..).unwrap_or_default()))
            .collect();
        assert!(yaml.contains("token_file"), "{variant}: {yaml}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, &yaml).unwrap();
        // What the pod mounts from its Secrets and volumes, here.
        let token = dir.path().join("token");
        std::fs::write(&token, "a-token-from-the-secret-0123456789\n").unwrap();
        let output = relay_command(&["check-config", "--config", path.to_str().unwrap()])
            .env("POSTBACK_RELAY_DB_PASSWORD", "from-the-secret")
            .env("RELAY_ADMIN__TOKEN_FILE", &token)
            .env("RELAY_STORE__PATH", dir.path().join("relay.db"))
            .output()
            .expect("run check-config");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{variant}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains(store), "{variant}: {stdout}");
    }
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
        let store = TestStore::new();
        let config = store.write_config(&format!(
            "{DELIVERY}targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
            sink.url("/inbox")
        ));
        // The first attempt fails: the retry is claimed from the store, so
        // both ways a job reaches a dispatcher are logged.
        sink.respond(|n, _| Reply::status(if n == 0 { 503 } else { 200 }));
        let relay = RelayProcess::spawn(&config).await;
        let (status, answer) = post(&relay.url, Some("text/xml"), SEED_XML).await;
        assert_eq!(status, 200, "{answer}");
        let id = answer["id"].as_str().unwrap().to_owned();
        sink.wait_for("/inbox", 2, Duration::from_secs(10)).await;
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
        // Every line about the postback carries both ids, to follow it end to end.
        let about: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|j| j["id"] == id.as_str())
            .collect();
        let messages: BTreeSet<&str> = about.iter().filter_map(|j| j["message"].as_str()).collect();
        assert_eq!(
            messages,
            BTreeSet::from(["postback", "delivery failed; will retry", "delivered"]),
            "{about:?}"
        );
        for line in &about {
            assert_eq!(line["tracking_id"], "MMS_MO_iLnCRrL6", "{line}");
        }
    })
    .await
    .expect("the log test ends within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tls_certificate() {
    use tokio::io::AsyncWriteExt;
    if skip_unless(Backend::Sqlite, "TLS reload does not involve the store") {
        return;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_target_removed_across_a_restart_become_dead_letters() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let addr = dead_addr().await;
        let store = TestStore::new();
        let old = store.write_config(&format!(
            "targets:\n  legacy: {{url: \"http://{addr}/x\"}}\nroutes:\n  - targets: [legacy]\n"
        ));
        let relay = RelayProcess::spawn(&old).await;
        let (status, _) = post(
            &relay.url,
            Some("text/xml"),
            mo_xml("ORPHAN-1", "all", "28444"),
        )
        .await;
        assert_eq!(status, 200);
        let (exit, _) = tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(exit.success());
        // The target is renamed: its queued job becomes a dead letter
        // ("target removed", replayable), and the start says so.
        let renamed = store.write_config(&format!(
            "targets:\n  inbox: {{url: \"http://{addr}/x\"}}\nroutes:\n  - targets: [inbox]\n"
        ));
        let relay = RelayProcess::spawn(&renamed).await;
        let log = relay.log();
        assert!(
            log.contains("not in the config") && log.contains("legacy"),
            "{log}"
        );
        let (exit, _) = tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(exit.success());
        assert_eq!(
            store.query_int("SELECT COUNT(*) FROM jobs WHERE target = 'legacy'"),
            0
        );
        let kept = store.query_int(
            "SELECT COUNT(*) FROM dead_letters WHERE target = 'legacy' AND reason = 'target removed'",
        );
        assert_eq!(kept, 1, "the job of the removed target is kept as a dead letter");
        assert_eq!(
            store.query_int("SELECT COUNT(*) FROM events"),
            1,
            "with its postback"
        );
    })
    .await
    .expect("within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_and_refuses_a_broken_file() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let sink = Sink::start().await;
        let store = TestStore::new();
        let targets = format!(
            "targets:\n  a: {{url: \"{}\"}}\n  b: {{url: \"{}\"}}\n",
            sink.url("/a"),
            sink.url("/b")
        );
        let config = store.write_config(&format!("{targets}routes:\n  - targets: [a]\n"));
        let relay = RelayProcess::spawn(&config).await;
        let wait_log = |needle: &'static str| {
            let relay = &relay;
            async move {
                eventually(Duration::from_secs(10), needle, || async move {
                    relay.log().contains(needle).then_some(())
                })
                .await
            }
        };
        // A broken file: refused, the relay keeps serving with its routes.
        std::fs::write(&config, "routes: [this is not a route]\n").unwrap();
        relay.signal("HUP");
        wait_log("config reload refused").await;
        let (status, _) = post(&relay.url, None, mo_xml("HUP-R1", "all", "28444")).await;
        assert_eq!(status, 200);
        sink.wait_for("/a", 1, Duration::from_secs(10)).await;
        // A good one: applied to the next postback.
        store.write_config(&format!("{targets}routes:\n  - targets: [b]\n"));
        relay.signal("HUP");
        wait_log("config reloaded").await;
        let (status, _) = post(&relay.url, None, mo_xml("HUP-R2", "all", "28444")).await;
        assert_eq!(status, 200);
        let got = sink.wait_for("/b", 1, Duration::from_secs(10)).await;
        assert_eq!(got[0].json()["data"]["tracking_id"], "HUP-R2");
        assert_eq!(
            relay
                .metric(r#"relay_config_reloads_total{result="refused"}"#)
                .await,
            Some(1.0)
        );
        let (exit, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(exit.success(), "{}", lines.join("\n"));
    })
    .await
    .expect("within 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reloads_when_the_file_changes_even_through_a_symlink_swap() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let sink = Sink::start().await;
        let store = TestStore::new();
        let targets = format!(
            "targets:\n  a: {{url: \"{}\"}}\n  b: {{url: \"{}\"}}\n",
            sink.url("/a"),
            sink.url("/b")
        );
        // As Kubernetes mounts a ConfigMap: the file is a symlink into a
        // directory that an update replaces by swapping the link.
        let dir = store.path();
        let version = |name: &str, routes: &str| {
            let versioned = dir.join(name);
            std::fs::create_dir_all(&versioned).unwrap();
            std::fs::write(
                versioned.join("relay.yaml"),
                store.config_yaml(&format!("{targets}{routes}")),
            )
            .unwrap();
            versioned
        };
        let config = dir.join("mounted.yaml");
        let v1 = version("v1", "routes:\n  - targets: [a]\n");
        std::os::unix::fs::symlink(v1.join("relay.yaml"), &config).unwrap();
        let config_arg = config.clone();
        let relay = tokio::task::spawn_blocking(move || {
            RelayProcess::start_with(&config_arg, &["--watch"])
        })
        .await
        .unwrap();
        let reloads = |result: &'static str| {
            let relay = &relay;
            async move {
                relay
                    .metric(&format!(
                        r#"relay_config_reloads_total{{result="{result}"}}"#
                    ))
                    .await
                    .unwrap_or(0.0)
            }
        };

        let v2 = version("v2", "routes:\n  - targets: [b]\n");
        let swap = dir.join("swap.yaml");
        std::os::unix::fs::symlink(v2.join("relay.yaml"), &swap).unwrap();
        std::fs::rename(&swap, &config).unwrap();
        eventually(Duration::from_secs(10), "the swap applied", || async {
            (reloads("applied").await == 1.0).then_some(())
        })
        .await;
        let (status, _) = post(&relay.url, None, mo_xml("W-1", "all", "28444")).await;
        assert_eq!(status, 200);
        let got = sink.wait_for("/b", 1, Duration::from_secs(10)).await;
        assert_eq!(got[0].json()["data"]["tracking_id"], "W-1");

        // A broken edit in place: refused, b stays; nothing reloads while
        // the file stays the same.
        std::fs::write(v2.join("relay.yaml"), "routes: [this is not a route]\n").unwrap();
        eventually(
            Duration::from_secs(10),
            "the broken file refused",
            || async { (reloads("refused").await == 1.0).then_some(()) },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(reloads("refused").await, 1.0, "one change, one reload");
        assert_eq!(reloads("applied").await, 1.0);
        let (status, _) = post(&relay.url, None, mo_xml("W-2", "all", "28444")).await;
        assert_eq!(status, 200);
        sink.wait_for("/b", 2, Duration::from_secs(10)).await;
        assert!(sink.received_on("/a").is_empty());
        let (exit, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(exit.success(), "{}", lines.join("\n"));
    })
    .await
    .expect("within 60 s");
}
