//! One postback's trouble stays its own: a row the database refuses, a failed
//! commit racing a retry, a stalled server, and the server's flush setting.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::pg::TestDatabase;
use crate::common::process::*;
use crate::common::*;
use sha2::Digest;

use super::{counts, deliveries, readyz, DELIVERY};

// ---------------------------------------------------------------------------
// One postback's trouble stays its own (a refused row, a failed commit, a
// stalled server, the server's flush setting)
// ---------------------------------------------------------------------------

/// A relay in this process on database `db`, delivering everything to the
/// sink's `/inbox`; `store_extra` adds `store:` keys.
async fn relay_on(db: TestDatabase, sink: &Sink, store_extra: &str) -> TestRelay {
    let store = TestStore {
        dir: tempfile::tempdir().expect("temp dir"),
        db: Some(db),
        store_extra: store_extra.to_owned(),
    };
    // These tests post 30 postbacks at once, each on its own connection
    // from 127.0.0.1: above the per-source cap of 8.
    let rest = format!(
        "{DELIVERY}ingest: {{max_connections_per_source: 64}}\ntargets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    );
    start_relay_in(store, &rest).await
}

/// The relay's database URL.
fn db_url(relay: &TestRelay) -> String {
    relay
        .store
        .db
        .as_ref()
        .expect("a PostgreSQL store")
        .url
        .clone()
}

/// Waits until `sql` (one integer) is at least `at_least`, on `client`.
async fn until_at_least(client: &tokio_postgres::Client, sql: &str, at_least: i64) {
    eventually(Duration::from_secs(10), sql, || async {
        let got: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        (got >= at_least).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_refuses_is_answered_400_and_quarantined_while_its_batch_commits() {
    bounded(Duration::from_secs(90), "the refused-row test", async {
        // A LATIN1 database cannot hold a CJK tracking id: PostgreSQL refuses
        // the row (SQLSTATE 22P05) whatever the relay does with it. An
        // 8,000-character tracking id (beyond a btree entry) rides along.
        let db = TestDatabase::create_with(
            "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        );
        let sink = Sink::start().await;
        let relay = relay_on(db, &sink, "").await;
        const GOOD: usize = 30;
        let bad = mo_xml("東京-1", "hello", "28444");
        let long: String = (0..125u32)
            .map(|n| hex::encode(sha2::Sha256::digest(n.to_le_bytes())))
            .collect();
        let mut bodies: Vec<(String, String)> = (0..GOOD - 1)
            .map(|n| {
                let id = format!("batch-{n}");
                (id.clone(), mo_xml(&id, "hello", "28444"))
            })
            .collect();
        bodies.push((long.clone(), mo_xml(&long, "hello", "28444")));
        bodies.insert(GOOD / 2, ("bad".into(), bad.clone()));
        let client = http_client();
        let tasks: Vec<_> = bodies
            .into_iter()
            .map(|(id, body)| {
                let (client, url) = (client.clone(), relay.url.clone());
                tokio::spawn(async move { (id, try_post(&client, &url, body).await) })
            })
            .collect();
        let mut accepted = BTreeSet::new();
        for task in tasks {
            let (id, answer) = task.await.unwrap();
            let answer = answer.unwrap_or_else(|err| panic!("{id}: no answer: {err:?}"));
            if id == "bad" {
                assert_eq!(answer.status, 400, "the refused postback: {answer:?}");
                let error = answer.json["error"].as_str().unwrap_or_default();
                assert!(error.contains("22P05"), "the database's reason: {error}");
            } else {
                assert_eq!(answer.status, 200, "{id}: {answer:?}");
                assert_eq!(answer.json["status"], "accepted", "{id}: {answer:?}");
                accepted.insert(id);
            }
        }
        assert_eq!(accepted.len(), GOOD);

        // Nothing lost: the refused body is in the quarantine with the
        // database's error, and a retry is refused the same way (never 503).
        let rows = relay.query("SELECT error, body, seen_count FROM quarantine");
        assert_eq!(rows.len(), 1, "{rows:?}");
        let rusqlite::types::Value::Text(error) = &rows[0][0] else {
            panic!("{rows:?}")
        };
        assert!(error.contains("22P05"), "{error}");
        assert_eq!(
            rows[0][1],
            rusqlite::types::Value::Blob(bad.clone().into_bytes())
        );
        let again = try_post(&client, &relay.url, bad).await.expect("an answer");
        assert_eq!(again.status, 400, "{again:?}");
        assert_eq!(
            relay.store.query_int("SELECT seen_count FROM quarantine"),
            2
        );
        assert_eq!(
            readyz(relay.handle.as_ref().unwrap().admin_addr).await,
            200,
            "one refused postback does not make the store unready"
        );

        eventually(
            Duration::from_secs(30),
            "every accepted postback delivered",
            || {
                let got: BTreeSet<String> = deliveries(&sink).into_keys().collect();
                let done = got == accepted;
                async move { done.then_some(()) }
            },
        )
        .await;
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_its_original_is_acknowledged_only_once_something_is_committed() {
    bounded(Duration::from_secs(90), "the racing-retry test", async {
        let sink = Sink::start().await;
        let relay = relay_on(TestDatabase::create(), &sink, "").await;
        let admin = crate::common::pg::connect(&db_url(&relay)).await;
        // Every commit of an event takes a second (a deferred trigger runs
        // at COMMIT) and fails as `test_fail` says: all of them, or only the
        // first one (a sequence is not rolled back with its transaction).
        admin
            .batch_execute(
                r#"
CREATE SEQUENCE test_commits;
CREATE TABLE test_fail (mode TEXT NOT NULL);
CREATE FUNCTION test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE m TEXT;
BEGIN
    PERFORM pg_sleep(1);
    SELECT mode INTO m FROM test_fail;
    IF m = 'all' OR (m = 'first' AND nextval('test_commits') = 1) THEN
        RAISE EXCEPTION 'commit made to fail by the test';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER test_slow_commit AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_slow_commit();
"#,
            )
            .await
            .expect("install the trigger");
        let client = http_client();
        // The original is sent; once its COMMIT is under way, the retry.
        // The retry must be seen waiting for the original's key.
        let race = |tracking_id: &'static str| {
            let (client, url, admin) = (client.clone(), relay.url.clone(), &admin);
            async move {
                let body = mo_xml(tracking_id, "hello", "28444");
                let original = {
                    let (client, url, body) = (client.clone(), url.clone(), body.clone());
                    tokio::spawn(async move { try_post(&client, &url, body).await })
                };
                until_at_least(
                    admin,
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event = 'PgSleep'",
                    1,
                )
                .await;
                let retry = tokio::spawn(async move { try_post(&client, &url, body).await });
                until_at_least(
                    admin,
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    1,
                )
                .await;
                let original = original.await.unwrap().expect("original answered");
                let retry = retry.await.unwrap().expect("retry answered");
                (original, retry)
            }
        };
        let key_count = |tracking_id: &str| {
            relay.store.query_int(&format!(
                "SELECT COUNT(*) FROM dedupe WHERE key = 'MMS_MO|N401|{tracking_id}'"
            ))
        };

        // Every commit fails: neither is acknowledged.
        admin
            .batch_execute("INSERT INTO test_fail VALUES ('all')")
            .await
            .unwrap();
        let (original, retry) = race("race-all").await;
        assert_eq!(original.status, 503, "{original:?}");
        assert_eq!(
            retry.status, 503,
            "the retry of a postback whose commit failed: {retry:?}"
        );
        assert!(retry.retry_after.is_some(), "{retry:?}");
        assert_eq!(key_count("race-all"), 0);

        // Only the original's commit fails: the retry is committed on its
        // own and acknowledged as the original (not as a duplicate of an id
        // that is on no disk).
        admin
            .batch_execute("UPDATE test_fail SET mode = 'first'")
            .await
            .unwrap();
        let (original, retry) = race("race-first").await;
        assert_eq!(original.status, 503, "{original:?}");
        assert_eq!(retry.status, 200, "{retry:?}");
        assert_eq!(retry.json["status"], "accepted", "{retry:?}");
        let retry_id = retry.json["id"].as_str().unwrap().to_owned();
        assert_eq!(
            relay.query("SELECT event_id FROM dedupe WHERE key = 'MMS_MO|N401|race-first'"),
            vec![vec![rusqlite::types::Value::Text(retry_id)]],
            "the retry owns the key"
        );

        // Both commit: the retry is a duplicate naming the original, which
        // is committed by the time the retry is answered.
        admin.batch_execute("DELETE FROM test_fail").await.unwrap();
        let (original, retry) = race("race-none").await;
        assert_eq!(original.status, 200, "{original:?}");
        assert_eq!(original.json["status"], "accepted", "{original:?}");
        let original_id = original.json["id"].as_str().unwrap().to_owned();
        assert_eq!(retry.status, 200, "{retry:?}");
        assert_eq!(
            retry.json,
            serde_json::json!({"status": "duplicate", "id": original_id})
        );
        assert_eq!(key_count("race-none"), 1);

        eventually(
            Duration::from_secs(30),
            "both acknowledged postbacks delivered",
            || {
                let got = counts(&deliveries(&sink));
                async move { (got.len() == 2).then_some(got) }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = counts(&deliveries(&sink));
        assert_eq!(
            got,
            BTreeMap::from([("race-first".to_owned(), 1), ("race-none".to_owned(), 1)]),
            "each acknowledged postback once, the unacknowledged one never"
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_fills_the_byte_bounded_queue_and_the_rest_get_a_fast_503() {
    bounded(Duration::from_secs(90), "the queue-bound test", async {
        const SENT: usize = 30;
        let sink = Sink::start().await;
        // About 120 kB a postback (body and envelope): a handful fit.
        let relay = relay_on(
            TestDatabase::create(),
            &sink,
            "  max_queued_bytes: 400000\n",
        )
        .await;
        let admin = crate::common::pg::connect(&db_url(&relay)).await;
        admin
            .batch_execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock events");
        let padding = "p".repeat(60_000);
        let body = |n: usize| mo_xml(&format!("big-{n}"), &padding, "28444");
        let client = http_client();
        let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..SENT {
            let (client, url, body, answers) =
                (client.clone(), relay.url.clone(), body(n), answers.clone());
            tokio::spawn(async move {
                let answer = try_post(&client, &url, body).await;
                let _ = answers.send((n, answer));
            });
        }
        // While the table is locked (and well before the store's own 5 s
        // limit on a statement), the postbacks beyond the bound are answered.
        let mut while_locked = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(4), async {
            while while_locked.len() < SENT - 10 {
                match answered.recv().await {
                    Some(answer) => while_locked.push(answer),
                    None => break,
                }
            }
        })
        .await;
        admin.batch_execute("ROLLBACK").await.expect("unlock");
        assert!(
            while_locked.len() >= SENT - 10,
            "only {} of {SENT} answered while the database was stalled",
            while_locked.len()
        );
        let mut refused = BTreeSet::new();
        for (n, answer) in &while_locked {
            let answer = answer.as_ref().expect("an answer");
            assert_eq!(answer.status, 503, "big-{n} while stalled: {answer:?}");
            assert!(answer.retry_after.is_some(), "{answer:?}");
            refused.insert(*n);
        }
        // The queued ones are committed once the lock is gone.
        let mut acknowledged = BTreeSet::new();
        while refused.len() + acknowledged.len() < SENT {
            let (n, answer) = answered.recv().await.expect("every request answers");
            let answer = answer.expect("an answer");
            match answer.status {
                200 => acknowledged.insert(n),
                503 => refused.insert(n),
                other => panic!("big-{n}: {other} {answer:?}"),
            };
        }
        assert!(!acknowledged.is_empty(), "the queue itself was committed");
        // Sinch sends the refused ones again: now they are accepted.
        for n in refused.clone() {
            let answer = try_post(&client, &relay.url, body(n))
                .await
                .expect("answer");
            assert_eq!(answer.status, 200, "big-{n} again: {answer:?}");
        }
        let expected: BTreeSet<String> = (0..SENT).map(|n| format!("big-{n}")).collect();
        eventually(Duration::from_secs(30), "every postback delivered", || {
            let got: BTreeSet<String> = deliveries(&sink).into_keys().collect();
            let done = got == expected;
            async move { done.then_some(()) }
        })
        .await;
        println!(
            "{SENT} postbacks of ~120 kB against a locked table with a 400 kB queue: {} queued \
             and acknowledged after the unlock, {} refused at once",
            acknowledged.len(),
            SENT - acknowledged.len()
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_are_flushed_even_when_new_connections_default_to_asynchronous_commit() {
    bounded(
        Duration::from_secs(90),
        "the synchronous_commit test",
        async {
            let db = TestDatabase::create();
            let name = db.name.clone();
            let sink = Sink::start().await;
            let relay = relay_on(db, &sink, "").await;
            let admin = crate::common::pg::connect(&db_url(&relay)).await;
            // Record the setting each event is committed under.
            admin
                .batch_execute(
                    r#"
CREATE TABLE test_sync (setting TEXT NOT NULL);
CREATE FUNCTION test_record_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_sync VALUES (current_setting('synchronous_commit'));
    RETURN NULL;
END $$;
CREATE TRIGGER test_record_sync AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION test_record_sync();
"#,
                )
                .await
                .unwrap();
            // After the relay opened, the database's default turns off, and the
            // relay's connections are replaced by new ones that get it.
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE {name} SET synchronous_commit = off;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid();"
                ))
                .await
                .unwrap();
            let fresh = crate::common::pg::connect(&db_url(&relay)).await;
            let default: String = fresh
                .query_one("SHOW synchronous_commit", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(default, "off", "new connections get the database's default");

            let client = http_client();
            for n in 0..5 {
                let body = mo_xml(&format!("sync-{n}"), "hello", "28444");
                eventually(
                    Duration::from_secs(15),
                    "accepted on new connections",
                    || {
                        let (client, url, body) = (client.clone(), relay.url.clone(), body.clone());
                        async move {
                            let answer = try_post(&client, &url, body).await.ok()?;
                            (answer.status == 200).then_some(())
                        }
                    },
                )
                .await;
            }
            let settings = relay.query("SELECT setting FROM test_sync ORDER BY setting");
            assert_eq!(settings.len(), 5, "{settings:?}");
            for setting in &settings {
                assert_eq!(
                    setting[0],
                    rusqlite::types::Value::Text("on".into()),
                    "every accept commits with synchronous_commit on: {settings:?}"
                );
            }
            relay.shutdown().await;
        },
    )
    .await;
}
