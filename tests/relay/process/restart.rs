//! Crash and restart on the same store: SIGKILL loses nothing acknowledged,
//! SIGTERM drains, and jobs of a target removed across a restart become dead
//! letters.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::process::*;
use crate::common::*;

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
