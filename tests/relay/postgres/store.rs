//! The PostgreSQL store itself: concurrent migrations, leases of a dead
//! instance, an unreachable database at start, and a pause seen by all
//! instances.

use std::time::{Duration, Instant};

use crate::common::pg::TestDatabase;
use crate::common::process::*;
use crate::common::*;
use bytes::Bytes;
use postback_relay::store::{
    Acceptance, OperatorStore, Outcome, PostgresOptions, PostgresStore, Store,
};

use super::{instance_config, postback, write, DELIVERY};

// ---------------------------------------------------------------------------
// The store itself
// ---------------------------------------------------------------------------

fn options(url: &str) -> PostgresOptions {
    PostgresOptions {
        url: url.to_owned(),
        password: None,
        pool_size: 4,
        lease: None,
        dedupe_window: Duration::from_secs(3600),
        quarantine: Default::default(),
        max_queued_bytes: 64 * 1024 * 1024,
        background: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_opening_at_once_migrate_once() {
    let db = TestDatabase::create();
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let options = options(&db.url);
            tokio::spawn(async move { PostgresStore::open(options).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap().expect("every instance opens"));
    }
    assert_eq!(
        db.query("SELECT version FROM schema_migrations ORDER BY version"),
        vec![
            vec![rusqlite::types::Value::Integer(1)],
            vec![rusqlite::types::Value::Integer(2)],
            vec![rusqlite::types::Value::Integer(3)]
        ],
        "each schema version applied once"
    );
    for store in &stores {
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_a_dead_instance_runs_out_and_another_takes_the_job() {
    let db = TestDatabase::create();
    // A server that does not flush commits by default: the store asks for
    // the flush itself when it acknowledges.
    db.execute(
        &format!("ALTER DATABASE {} SET synchronous_commit TO off", db.name),
        Vec::new(),
    );
    let first = PostgresStore::open(options(&db.url)).await.unwrap();
    let second = PostgresStore::open(options(&db.url)).await.unwrap();
    let accepted = postback("lease-1", &["inbox", "archive"]);
    assert_eq!(
        first.accept(accepted.clone(), None).await.unwrap(),
        Acceptance::Accepted
    );
    // A copy through the other instance is a duplicate of the first.
    let mut copy = postback("lease-1", &["inbox", "archive"]);
    copy.received_at_ms = accepted.received_at_ms;
    assert_eq!(
        second.accept(copy, None).await.unwrap(),
        Acceptance::Duplicate {
            original_id: accepted.id.clone()
        }
    );

    let lease = Duration::from_millis(1500);
    let claimed = first.claim("inbox", 10, lease).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event_id, accepted.id);
    assert_eq!(&claimed[0].envelope[..], &accepted.envelope[..]);
    // The first instance "dies" holding the lease: nobody else gets the job
    // until the lease has run out.
    first.close().await.unwrap();
    drop(first);
    let leased_at = Instant::now();
    assert!(second.claim("inbox", 10, lease).await.unwrap().is_empty());
    let taken = loop {
        let jobs = second.claim("inbox", 10, lease).await.unwrap();
        if !jobs.is_empty() {
            break jobs;
        }
        assert!(
            leased_at.elapsed() < Duration::from_secs(10),
            "the lease never ran out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(leased_at.elapsed() + Duration::from_millis(100) >= lease);
    assert_eq!(taken[0].id, claimed[0].id);

    // Finishing the last job of an event deletes its bodies; a dead letter
    // keeps them.
    second
        .complete(vec![(taken[0].id, Outcome::Delivered)])
        .await
        .unwrap();
    assert_eq!(
        db.query("SELECT COUNT(*) FROM events")[0][0],
        rusqlite::types::Value::Integer(1),
        "the archive job still needs the event"
    );
    let archive = second.claim("archive", 10, lease).await.unwrap();
    second
        .complete(vec![(
            archive[0].id,
            Outcome::Dead {
                reason: "rejected by target".into(),
                status: Some(410),
                error: "gone\0with a NUL".into(),
            },
        )])
        .await
        .unwrap();
    assert_eq!(
        db.query("SELECT COUNT(*) FROM events")[0][0],
        rusqlite::types::Value::Integer(1),
        "the dead letter keeps the event"
    );
    let stats = second.stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(
        (stats[0].target.as_str(), stats[0].pending, stats[0].dead),
        ("archive", 0, 1)
    );
    second.close().await.unwrap();
}

#[test]
fn a_relay_whose_database_is_unreachable_does_not_start_and_says_why() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://relay:hunter2@127.0.0.1:{port}/relay");
    let config = write(dir.path(), "relay.yaml", &instance_config(&url, "", ""));
    let started = Instant::now();
    let (status, _, stderr) = run_to_end(
        &["run", "--config", config.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert!(!status.success(), "started without its database");
    assert!(
        stderr.contains(&format!(
            "cannot open the store (postgres 127.0.0.1:{port}/relay"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password was logged: {stderr}"
    );
    assert!(!stderr.contains("listening"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_through_one_instance_holds_for_the_others() {
    bounded(Duration::from_secs(60), "the shared pause test", async {
        let db = TestDatabase::create();
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start().await;
        let token = dir.path().join("token");
        std::fs::write(&token, "shared-admin-token-0123456789").unwrap();
        let rest = format!(
            "{DELIVERY}admin: {{token_file: {}}}\ntargets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
            token.display(),
            sink.url("/inbox")
        );
        let mut relays = Vec::new();
        for name in ["a", "b"] {
            let path = write(dir.path(), &format!("{name}.yaml"), &instance_config(&db.url, "", &rest));
            let config = postback_relay::config::Config::load(&path).unwrap();
            relays.push(postback_relay::relay::start(config).await.unwrap());
        }
        let admin = |i: usize| format!("http://{}", relays[i].admin_addr);
        let paused_on = |i: usize| {
            let url = format!("{}/metrics", admin(i));
            async move {
                let (_, text) = get(&url).await;
                metric_value(&text, r#"relay_target_paused{target="inbox"}"#)
            }
        };
        let control = |i: usize, action: &'static str| {
            let url = format!("{}/api/v1/targets/inbox/{action}", admin(i));
            async move {
                let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
                    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                        .build(hyper_util::client::legacy::connect::HttpConnector::new());
                let request = hyper::Request::post(url)
                    .header("authorization", "Bearer shared-admin-token-0123456789")
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
                let response = client.request(request).await.unwrap();
                assert_eq!(response.status(), 200);
            }
        };

        control(0, "pause").await;
        eventually(Duration::from_secs(10), "b sees a's pause", || async {
            (paused_on(1).await == Some(1.0)).then_some(())
        })
        .await;
        let url_b = format!("http://{}/sinch/postback", relays[1].ingest_addr);
        for i in 0..3 {
            let (status, _) = post(&url_b, None, mo_xml(&format!("SP-{i}"), "hi", "28444")).await;
            assert_eq!(status, 200);
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(sink.received_count(), 0, "paused on every instance");

        control(1, "resume").await;
        eventually(Duration::from_secs(10), "a sees b's resume", || async {
            (paused_on(0).await == Some(0.0)).then_some(())
        })
        .await;
        sink.wait_for("/inbox", 3, Duration::from_secs(10)).await;
        for relay in relays {
            relay.shutdown().await.unwrap();
        }
    })
    .await;
}
