//! `postback-relay targets|pause|resume|dlq|quarantine`: the real binary
//! against a relay started in-process with its admin API on, found through
//! the relay's own config file (`--config`) or `--admin` and `--token-file`.
//! SQLite, or PostgreSQL with `RELAY_TEST_BACKEND=postgres`. Every wait
//! is bounded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use rusqlite::types::Value as Sql;
use serde_json::Value;
use sha2::Digest;

/// The admin token the test relays accept.
const TOKEN: &str = "ops-cli-test-token-5f0c2a9e";

/// Quick retries, so a target that fails is retried (and shows its error)
/// within a test.
const DELIVERY: &str =
    "delivery:\n  backoff: {initial: 50ms, max: 200ms}\n  max_attempts: 1000\n  timeout: 5s\n";

/// How long any single wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(15);

/// How long a whole test may take.
const TEST_LIMIT: Duration = Duration::from_secs(120);

/// What one run of the CLI did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Standard output as JSON (a `--json` run).
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.stdout))
    }
}

/// Runs the CLI with `args`, off the runtime's threads (the relay runs on them).
async fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let args: Vec<std::ffi::OsString> = args.iter().map(|a| a.as_ref().to_owned()).collect();
    tokio::task::spawn_blocking(move || cli_blocking(&args))
        .await
        .expect("the CLI ran")
}

fn cli_blocking<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_postback-relay"))
        .args(args)
        .output()
        .expect("run the CLI");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A relay with the admin API on, and the config file an operator's CLI
/// reads: the relay's own, with the admin port the relay got.
struct Ops {
    relay: TestRelay,
    config: PathBuf,
    token_file: PathBuf,
}

impl Ops {
    /// Starts a relay whose config is `rest` plus `admin.token_file`.
    async fn start(rest: &str) -> Ops {
        let store = TestStore::new();
        let token_file = store.path().join("admin-token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let rest = format!("admin:\n  token_file: {}\n{rest}", token_file.display());
        let relay = start_relay_in(store, &rest).await;
        let config = cli_config(&relay, &rest);
        Ops {
            relay,
            config,
            token_file,
        }
    }

    /// Runs `args` with `--config`.
    async fn run(&self, args: &[&str]) -> Run {
        let mut all: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        all.push("--config".into());
        all.push(self.config.clone().into());
        cli(&all).await
    }

    /// Runs `args` with `--config`, which must succeed; its standard output.
    async fn ok(&self, args: &[&str]) -> String {
        let run = self.run(args).await;
        assert_eq!(run.code, 0, "{args:?}: {}{}", run.stdout, run.stderr);
        run.stdout
    }

    /// Runs `args` with `--config --json`, which must succeed; the answer.
    async fn json(&self, args: &[&str]) -> Value {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let run = self.run(&with_json).await;
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
        run.json()
    }

    /// Polls `args --json` until `check` accepts the answer.
    async fn wait_json(&self, args: &[&str], what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(WAIT, what, || async {
            let answer = self.json(args).await;
            check(&answer).then_some(answer)
        })
        .await
    }

    /// The target named `name` in a `targets --json` answer.
    async fn target(&self, name: &str) -> Value {
        find_target(&self.json(&["targets"]).await, name)
    }
}

fn find_target(answer: &Value, name: &str) -> Value {
    answer["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no target {name} in {answer}"))
        .clone()
}

/// Writes the relay's config with its real admin address as `cli.yaml`.
fn cli_config(relay: &TestRelay, rest: &str) -> PathBuf {
    let admin = relay.handle.as_ref().expect("running").admin_addr;
    let yaml = relay.store.config_yaml(rest).replace(
        "admin_listen: 127.0.0.1:0",
        &format!("admin_listen: {admin}"),
    );
    let path = relay.store.path().join("cli.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// The headers of a table (its first line), split into words.
fn header_words(table: &str) -> Vec<&str> {
    table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

/// The table line that starts with `first`.
fn row<'a>(table: &'a str, first: &str) -> &'a str {
    table
        .lines()
        .find(|line| line.trim_start().starts_with(first))
        .unwrap_or_else(|| panic!("no row {first} in\n{table}"))
}

/// POSTs an XML postback, which must be accepted.
async fn accept(relay: &TestRelay, body: String) {
    let (status, answer) = post(&relay.url, Some("text/xml"), body).await;
    assert_eq!(status, 200, "ingest answer: {answer}");
}

/// The envelope subjects (tracking ids) a sink received on `path`, sorted.
fn subjects(sink: &Sink, path: &str) -> Vec<String> {
    let mut all: Vec<String> = sink
        .received_on(path)
        .iter()
        .map(|r| r.json()["subject"].as_str().unwrap_or_default().to_owned())
        .collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_are_shown_as_a_table_and_as_json() {
    bounded(TEST_LIMIT, "targets", async {
        let sink = Sink::start().await;
        let down = dead_addr().await;
        let ops = Ops::start(&format!(
            "{DELIVERY}targets:\n  crm: {{url: \"{}\"}}\n  billing: {{url: \"http://{down}/billing\"}}\nroutes:\n  - targets: [crm, billing]\n",
            sink.url("/crm")
        ))
        .await;
        accept(&ops.relay, mo_xml("T-1", "hello", "28444")).await;
        sink.wait_for("/crm", 1, WAIT).await;
        let answer = ops
            .wait_json(&["targets"], "billing pending with an error", |answer| {
                let billing = find_target(answer, "billing");
                billing["pending"] == 1 && billing["last_error"].is_string()
            })
            .await;
        assert_eq!(find_target(&answer, "crm")["pending"], 0);
        assert_eq!(find_target(&answer, "crm")["configured"], true);

        let table = ops.ok(&["targets"]).await;
        assert_eq!(
            header_words(&table),
            ["NAME", "PAUSED", "PENDING", "DUE", "DEAD", "OLDEST", "LAST", "ERROR"],
            "{table}"
        );
        let billing = row(&table, "billing");
        let header = table.lines().next().unwrap();
        assert_eq!(
            billing.find(" no ").map(|i| i + 1),
            header.find("PAUSED"),
            "columns line up:\n{table}"
        );
        assert!(billing.contains('s'), "an age in the OLDEST column: {billing}");
        assert!(row(&table, "crm").contains(" no "), "{table}");

        // Without the config file: --admin and --token-file are enough.
        let admin = ops.relay.admin.clone();
        let token_file = ops.token_file.display().to_string();
        let run = cli(&[
            "targets",
            "--json",
            "--admin",
            &admin,
            "--token-file",
            &token_file,
            "--config",
            "/nonexistent/relay.yaml",
        ])
        .await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert_eq!(find_target(&run.json(), "billing")["pending"], 1);
        ops.relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_target_receives_nothing_until_resumed() {
    bounded(TEST_LIMIT, "pause", async {
        let sink = Sink::start().await;
        let ops = Ops::start(&format!(
            "{DELIVERY}targets:\n  crm: {{url: \"{}\"}}\nroutes:\n  - targets: [crm]\n",
            sink.url("/crm")
        ))
        .await;
        let said = ops.ok(&["pause", "crm"]).await;
        assert!(said.starts_with("crm: paused"), "{said}");
        let answer = ops.json(&["pause", "crm"]).await;
        assert_eq!(answer, serde_json::json!({"target": "crm", "paused": true}));

        for n in 0..3 {
            accept(&ops.relay, mo_xml(&format!("P-{n}"), "hello", "28444")).await;
        }
        ops.wait_json(&["targets"], "3 jobs queued for crm", |answer| {
            find_target(answer, "crm")["pending"] == 3
        })
        .await;
        let table = ops.ok(&["targets"]).await;
        assert!(row(&table, "crm").contains(" yes "), "{table}");
        // Time enough for a delivery, had the pause let one through.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(sink.received_count(), 0, "a paused target receives nothing");
        assert_eq!(ops.target("crm").await["paused"], true);

        let said = ops.ok(&["resume", "crm"]).await;
        assert_eq!(said, "crm: delivering\n");
        sink.wait_for("/crm", 3, WAIT).await;
        assert_eq!(subjects(&sink, "/crm"), ["P-0", "P-1", "P-2"]);
        assert_eq!(ops.target("crm").await["paused"], false);

        let run = ops.run(&["pause", "nosuch"]).await;
        assert_eq!(run.code, 1, "{}", run.stdout);
        assert!(
            run.stderr.contains("404 Not Found: no target `nosuch`"),
            "{}",
            run.stderr
        );
        ops.relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_replayed_and_purged() {
    bounded(TEST_LIMIT, "dlq", async {
        let sink = Sink::start().await;
        sink.respond(|_, _| Reply::status(422));
        let ops = Ops::start(&format!(
            "{DELIVERY}targets:\n  crm: {{url: \"{}\"}}\nroutes:\n  - match: {{keyword: [HELLO]}}\n    targets: [crm]\n",
            sink.url("/crm")
        ))
        .await;
        for n in 1..=3 {
            accept(&ops.relay, mo_xml(&format!("D-{n}"), "hello", "28444")).await;
        }
        accept(&ops.relay, mo_xml("D-none", "unrouted", "28444")).await;
        ops.wait_json(&["dlq", "list"], "4 dead letters", |answer| {
            answer["dead_letters"].as_array().map(Vec::len) == Some(4)
        })
        .await;
        assert_eq!(sink.received_on("/crm").len(), 3, "one attempt each");

        let table = ops.ok(&["dlq", "list"]).await;
        assert_eq!(
            header_words(&table),
            ["ID", "TARGET", "REASON", "ATTEMPTS", "STATUS", "DEAD", "AT", "LAST", "ERROR"],
            "{table}"
        );
        assert_eq!(table.matches("rejected by target").count(), 3, "{table}");
        assert!(table.contains("(no route)"), "{table}");
        assert!(table.contains("422"), "{table}");
        assert!(table.ends_with("4 dead letters\n"), "{table}");

        // Pages: the cursor hint, then the rest.
        let crm = ops.json(&["dlq", "list", "--target", "crm"]).await;
        let ids: Vec<String> = crm["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["id"].to_string())
            .collect();
        assert_eq!(ids.len(), 3);
        let first_page = ops.ok(&["dlq", "list", "--target", "crm", "--limit", "2"]).await;
        let hint = format!("more: --after {}\n", ids[1]);
        assert!(first_page.ends_with(&hint), "{first_page}");
        let rest = ops
            .json(&["dlq", "list", "--target", "crm", "--limit", "2", "--after", &ids[1]])
            .await;
        assert_eq!(rest["dead_letters"][0]["id"].to_string(), ids[2]);
        assert_eq!(rest["next"], Value::Null);
        let all = ops
            .json(&["dlq", "list", "--target", "crm", "--limit", "2", "--all-pages"])
            .await;
        assert_eq!(all["dead_letters"], crm["dead_letters"]);
        assert_eq!(all["next"], Value::Null);

        // One dead letter: its fields, the envelope, the original body. (The
        // three were given up in whatever order their attempts finished.)
        let detail = ops.json(&["dlq", "show", &ids[0]]).await;
        let subject = detail["envelope"]["subject"].as_str().unwrap().to_owned();
        assert!(subject.starts_with("D-"), "{detail}");
        assert_eq!(detail["attempts"], 1);
        assert_eq!(detail["last_status"], 422);
        let shown = ops.ok(&["dlq", "show", &ids[0]]).await;
        assert!(shown.starts_with(&format!("id:           {}\n", ids[0])), "{shown}");
        assert!(shown.contains("reason:       rejected by target\n"), "{shown}");
        assert!(shown.contains("envelope:\n{"), "{shown}");
        assert!(shown.contains(&format!("\"subject\": \"{subject}\"")), "{shown}");
        assert!(
            shown.contains("raw_body:\n<postback>"),
            "{shown}"
        );

        // The target is fixed: replay one by id, then the rest by filter.
        sink.respond(|_, _| Reply::status(200));
        let said = ops.ok(&["dlq", "replay", &ids[0], "999999"]).await;
        assert_eq!(said, "replayed 1, skipped 0\nnot found: 999999\n");
        let got = sink.wait_for("/crm", 4, WAIT).await;
        assert_eq!(got[3].json()["subject"], subject.as_str());
        let said = ops.ok(&["dlq", "replay", "--target", "crm"]).await;
        assert_eq!(said, "replayed 2, skipped 0\n");
        sink.wait_for("/crm", 6, WAIT).await;
        assert_eq!(
            subjects(&sink, "/crm"),
            ["D-1", "D-1", "D-2", "D-2", "D-3", "D-3"]
        );

        // What still matches no route stays, and says why.
        let said = ops.ok(&["dlq", "replay", "--all"]).await;
        assert!(said.starts_with("replayed 0, skipped 1\n"), "{said}");
        assert!(said.contains("it still matches no route"), "{said}");
        let said = ops.ok(&["dlq", "purge", "--reason", "no route"]).await;
        assert_eq!(said, "purged 1\n");
        let empty = ops.json(&["dlq", "list"]).await;
        assert_eq!(empty["dead_letters"], serde_json::json!([]));
        assert!(ops.ok(&["dlq", "list"]).await.ends_with("0 dead letters\n"));

        let run = ops.run(&["dlq", "show", "999999"]).await;
        assert_eq!(run.code, 1);
        assert!(
            run.stderr.contains("404 Not Found: no dead letter 999999"),
            "{}",
            run.stderr
        );
        ops.relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_bodies_are_listed_shown_replayed_and_purged() {
    bounded(TEST_LIMIT, "quarantine", async {
        let sink = Sink::start().await;
        let ops = Ops::start(&format!(
            "{DELIVERY}targets:\n  crm: {{url: \"{}\"}}\nroutes:\n  - targets: [crm]\n",
            sink.url("/crm")
        ))
        .await;
        let (status, _) = post(&ops.relay.url, Some("text/plain"), "this is not a postback").await;
        assert_eq!(status, 400);
        let invalid_hash = hex::encode(sha2::Sha256::digest(b"this is not a postback"));
        // A body an older parser refused, parseable today.
        let fixable = mo_xml("Q-1", "hello", "28444");
        let fixable_hash = hex::encode(sha2::Sha256::digest(fixable.as_bytes()));
        ops.relay.execute(
            "INSERT INTO quarantine (body_hash, body, content_type, error, first_seen, last_seen, seen_count)
             VALUES (?1, ?2, 'text/xml', 'unknown wrapper element', 1700000000000, 1700000300000, 2)",
            vec![
                Sql::Text(fixable_hash.clone()),
                Sql::Blob(fixable.as_bytes().to_vec()),
            ],
        );

        let table = ops.ok(&["quarantine", "list"]).await;
        assert_eq!(
            header_words(&table),
            ["HASH", "FIRST", "SEEN", "LAST", "SEEN", "SEEN", "SIZE", "KEPT", "CONTENT", "TYPE", "ERROR"],
            "{table}"
        );
        let fixable_row = row(&table, &fixable_hash);
        assert!(fixable_row.contains("2023-11-14T22:13:20Z"), "{table}");
        assert!(fixable_row.contains("unknown wrapper element"), "{table}");
        assert!(row(&table, &invalid_hash).contains("neither XML nor JSON"), "{table}");
        assert!(table.ends_with("2 quarantined bodies\n"), "{table}");
        let listed = ops.json(&["quarantine", "list"]).await;
        assert_eq!(listed["quarantine"][0]["body_hash"], fixable_hash.as_str());
        assert_eq!(listed["quarantine"][0]["seen_count"], 2);

        let shown = ops.ok(&["quarantine", "show", &fixable_hash]).await;
        assert!(shown.starts_with("body_hash:"), "{shown}");
        assert!(shown.contains(&format!("body:\n{fixable}\n")), "{shown}");
        let detail = ops.json(&["quarantine", "show", &fixable_hash]).await;
        assert_eq!(detail["body"], fixable.as_str());

        let said = ops.ok(&["quarantine", "replay", &fixable_hash]).await;
        assert!(
            said.starts_with("accepted 1, duplicate 0, still invalid 0, truncated 0\n"),
            "{said}"
        );
        assert!(row(&said, &fixable_hash).contains("accepted"), "{said}");
        assert!(row(&said, &fixable_hash).ends_with("crm"), "{said}");
        sink.wait_for("/crm", 1, WAIT).await;
        assert_eq!(subjects(&sink, "/crm"), ["Q-1"]);

        let answer = ops.json(&["quarantine", "replay", "--all"]).await;
        assert_eq!(answer["still_invalid"], 1);
        assert_eq!(answer["results"][0]["body_hash"], invalid_hash.as_str());
        let said = ops.ok(&["quarantine", "purge", "--since", "0"]).await;
        assert_eq!(said, "purged 1\n");
        assert_eq!(
            ops.json(&["quarantine", "list"]).await["quarantine"],
            serde_json::json!([])
        );
        ops.relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused() {
    bounded(TEST_LIMIT, "wrong token", async {
        let ops = Ops::start("").await;
        let wrong = ops.relay.store.path().join("wrong-token");
        std::fs::write(&wrong, "not-the-admin-token-at-all\n").unwrap();
        let wrong = wrong.display().to_string();
        let run = ops.run(&["targets", "--token-file", &wrong]).await;
        assert_eq!(run.code, 1, "{}", run.stdout);
        assert!(run.stderr.contains("401 Unauthorized"), "{}", run.stderr);
        assert!(run.stderr.contains("Bearer"), "{}", run.stderr);
        assert!(run.stdout.is_empty(), "{}", run.stdout);
        ops.relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_file_the_api_is_disabled() {
    bounded(TEST_LIMIT, "API disabled", async {
        let relay = start_relay("").await;
        let config = cli_config(&relay, "");
        let run = cli(&[Path::new("targets"), Path::new("--config"), &config]).await;
        assert_eq!(run.code, 1, "{}", run.stdout);
        assert!(
            run.stderr
                .contains("404 Not Found: the admin API is disabled: set admin.token_file"),
            "{}",
            run.stderr
        );
        relay.shutdown().await;
    })
    .await;
}

#[test]
fn bad_arguments_and_configs_exit_2_and_an_unreachable_relay_1() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let token_file = token_file.display().to_string();
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = format!("http://{down}");
    let connection = [
        "--admin",
        down.as_str(),
        "--token-file",
        token_file.as_str(),
    ];
    let with = |args: &[&str]| -> Run {
        let all: Vec<&str> = args.iter().chain(&connection).copied().collect();
        cli_blocking(&all)
    };
    for args in [
        &["dlq", "replay"][..],
        &["dlq", "purge", "3", "--all"],
        &["dlq", "replay", "3", "--target", "crm"],
        &["dlq", "show", "not-a-number"],
        &["quarantine", "purge"],
        &["quarantine", "replay", "--all", "--since", "0"],
    ] {
        let run = with(args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
    }
    let run = cli_blocking(&["targets", "--config", "/nonexistent/relay.yaml"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let run = cli_blocking(&["targets", "--admin", "ftp://x", "--token-file", &token_file]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--admin"), "{}", run.stderr);

    let run = with(&["targets"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("cannot reach the relay's admin API at {down}")),
        "{}",
        run.stderr
    );
}
