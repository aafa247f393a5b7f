//! What the running binary leaves behind: private files and JSON logs of one
//! object per line.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use crate::common::process::*;
use crate::common::*;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

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
