//! Several relay processes on one database: three instances share the load
//! and a SIGKILLed one loses nothing; one postback sent to two instances at
//! once is delivered once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::common::pg::TestDatabase;
use crate::common::process::*;
use crate::common::*;

use super::{counts, deliveries, duplicates, instance_config, spawn_all, write, DELIVERY};

// ---------------------------------------------------------------------------
// Three instances, one killed
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_the_load_and_a_killed_one_loses_nothing() {
    bounded(Duration::from_secs(150), "the three-instance test", async {
        const LEASE: Duration = Duration::from_secs(4);
        // The archive answers slowly, so every instance has attempts in
        // flight when one of them is killed.
        const ARCHIVE_DELAY: Duration = Duration::from_millis(250);
        let db = TestDatabase::create();
        let dir = tempfile::tempdir().unwrap();
        let inbox = Sink::start().await;
        let archive = Sink::start().await;
        archive.respond(|_, _| Reply {
            status: 200,
            headers: Vec::new(),
            delay: ARCHIVE_DELAY,
        });
        let configs: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|name| {
                let rest = format!(
                    "{DELIVERY}targets:\n  inbox: {{url: \"{}\", headers: {{x-instance: {name}}}}}\n  \
                     archive: {{url: \"{}\", headers: {{x-instance: {name}}}, concurrency: 16}}\n\
                     routes:\n  - targets: [inbox, archive]\n",
                    inbox.url("/inbox"),
                    archive.url("/archive")
                );
                let yaml = instance_config(&db.url, &format!("  lease: {}s\n", LEASE.as_secs()), &rest);
                write(dir.path(), &format!("relay-{name}.yaml"), &yaml)
            })
            .collect();
        let mut relays = spawn_all(&configs).await;
        assert_eq!(
            db.query("SELECT COUNT(*) FROM schema_migrations")[0][0],
            rusqlite::types::Value::Integer(3),
            "three instances starting at once migrate once (one row per schema version)"
        );

        // Load on all three, each sender serially on its own connection.
        let loads: Vec<Load> = relays
            .iter()
            .enumerate()
            .map(|(i, relay)| {
                let on_fault = if i == 1 { OnFault::Resend } else { OnFault::Stop };
                Load::start(&relay.url, &format!("i{i}"), 2, on_fault)
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;

        // Kill B mid-run; its senders go on to A (the load balancer's job),
        // resending what B never answered.
        loads[1].expect_faults();
        let killed_at = Instant::now();
        tokio::task::block_in_place(|| relays[1].kill());
        loads[1].follow(&relays[0].url);
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let mut acknowledged = BTreeMap::new();
        let mut duplicate_answers = 0;
        let mut cut_off = 0;
        for (i, load) in loads.into_iter().enumerate() {
            let sent = load.finish().await;
            assert!(sent.unexpected.is_empty(), "instance {i}: {:?}", sent.unexpected);
            assert!(!sent.acknowledged.is_empty(), "instance {i} acknowledged nothing");
            duplicate_answers += sent.duplicate_answers;
            cut_off += sent.cut_off;
            println!(
                "load on instance {i}: {} acknowledged, {} cut off by the kill, {} answered duplicate",
                sent.acknowledged.len(),
                sent.cut_off,
                sent.duplicate_answers
            );
            acknowledged.extend(sent.acknowledged);
        }

        wait_for_all(&inbox, &acknowledged, Duration::from_secs(90)).await;
        wait_for_all(&archive, &acknowledged, Duration::from_secs(90)).await;
        eventually(Duration::from_secs(30), "every job finished", || {
            let pending = db.query("SELECT COUNT(*) FROM jobs");
            async move { (pending[0][0] == rusqlite::types::Value::Integer(0)).then_some(()) }
        })
        .await;

        // Counted once every job is finished: repeats of jobs taken over
        // after their lease are in.
        let inbox_counts = counts(&deliveries(&inbox));
        let archive_counts = counts(&deliveries(&archive));

        // Jobs B held when it died were taken over once their lease ran out.
        let by_id = deliveries(&archive);
        let mut taken_over = Vec::new();
        for (tracking_id, attempts) in &by_id {
            let Some(&(_, at_b)) = attempts.iter().find(|(instance, at)| {
                instance == "b" && *at + ARCHIVE_DELAY > killed_at && *at <= killed_at
            }) else {
                continue;
            };
            let later = attempts
                .iter()
                .filter(|(instance, at)| instance != "b" && *at > at_b)
                .map(|(_, at)| at.duration_since(killed_at))
                .min()
                .unwrap_or_else(|| {
                    panic!("{tracking_id}: in flight at B when it was killed, never delivered again")
                });
            taken_over.push(later);
        }
        assert!(
            !taken_over.is_empty(),
            "B had no archive delivery in flight when killed: the test proves nothing"
        );
        let earliest = *taken_over.iter().min().unwrap();
        let latest = *taken_over.iter().max().unwrap();
        // (Claimed at most ARCHIVE_DELAY before the kill, plus scheduling
        // slack on a busy machine; a job taken early would go within ms.)
        assert!(
            earliest + ARCHIVE_DELAY + Duration::from_secs(1) >= LEASE,
            "a job leased by the dead instance was taken over after {earliest:?}, before its lease ({LEASE:?}) ended"
        );

        let served: BTreeMap<String, usize> = ["a", "b", "c"]
            .iter()
            .map(|name| {
                let n = by_id
                    .values()
                    .flatten()
                    .filter(|(instance, _)| instance == name)
                    .count();
                (name.to_string(), n)
            })
            .collect();
        println!(
            "three instances: {} acknowledged, {cut_off} cut off by SIGKILL, {duplicate_answers} resent \
             and answered duplicate by another instance; inbox {} deliveries ({} duplicates), archive {} \
             deliveries ({} duplicates); archive attempts by instance {served:?}; {} archive jobs leased by \
             the killed instance delivered by the others {:.1}-{:.1} s after the kill (lease {}s)",
            acknowledged.len(),
            inbox_counts.values().sum::<usize>(),
            duplicates(&inbox_counts),
            archive_counts.values().sum::<usize>(),
            duplicates(&archive_counts),
            taken_over.len(),
            earliest.as_secs_f64(),
            latest.as_secs_f64(),
            LEASE.as_secs()
        );
        assert!(
            served.values().all(|n| *n > 0),
            "every instance delivered: {served:?}"
        );
        let unrouted = db.query("SELECT COUNT(*) FROM dead_letters");
        assert_eq!(unrouted[0][0], rusqlite::types::Value::Integer(0));
        let events = db.query("SELECT COUNT(*) FROM events");
        assert_eq!(
            events[0][0],
            rusqlite::types::Value::Integer(0),
            "bodies are deleted once delivered everywhere"
        );
        for (i, relay) in relays.into_iter().enumerate() {
            if i == 1 {
                continue;
            }
            let (status, lines) =
                tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
            assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// One postback, two instances, at once
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_sent_to_two_instances_at_once_is_delivered_once() {
    bounded(Duration::from_secs(90), "the two-instance dedupe test", async {
        const PAIRS: usize = 60;
        let db = TestDatabase::create();
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start().await;
        let rest = format!(
            // Every pair comes from 127.0.0.1: above the per-source cap of 8.
            "{DELIVERY}ingest: {{dedupe_window: 2s, max_connections_per_source: 256}}\ntargets:\n  inbox: {{url: \"{}\"}}\n\
             routes:\n  - targets: [inbox]\n",
            sink.url("/inbox")
        );
        let configs: Vec<_> = ["a", "b"]
            .iter()
            .map(|name| write(dir.path(), &format!("relay-{name}.yaml"), &instance_config(&db.url, "", &rest)))
            .collect();
        let relays = spawn_all(&configs).await;
        let (url_a, url_b) = (relays[0].url.clone(), relays[1].url.clone());

        // Each postback to both at the same moment, several at a time.
        let send_pairs = |round: &'static str| {
            let (url_a, url_b) = (url_a.clone(), url_b.clone());
            async move {
                let tasks: Vec<_> = (0..PAIRS)
                    .map(|n| {
                        let (url_a, url_b) = (url_a.clone(), url_b.clone());
                        tokio::spawn(async move {
                            let body = mo_xml(&format!("pair-{n}"), "hello", "28444");
                            let (a, b) = tokio::join!(
                                post(&url_a, Some("text/xml"), body.clone()),
                                post(&url_b, Some("text/xml"), body)
                            );
                            (n, a, b)
                        })
                    })
                    .collect();
                let mut ids = BTreeMap::new();
                for task in tasks {
                    let (n, (status_a, a), (status_b, b)) = task.await.unwrap();
                    assert_eq!((status_a, status_b), (200, 200), "{round} pair {n}: {a} {b}");
                    assert_eq!(a["id"], b["id"], "{round} pair {n}: one id for both: {a} {b}");
                    let mut statuses = [a["status"].as_str().unwrap(), b["status"].as_str().unwrap()];
                    statuses.sort();
                    assert_eq!(statuses, ["accepted", "duplicate"], "{round} pair {n}: {a} {b}");
                    ids.insert(format!("pair-{n}"), a["id"].as_str().unwrap().to_owned());
                }
                ids
            }
        };
        let first = send_pairs("first").await;
        let received = wait_for_all(&sink, &first, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        let received_first = sink.received_count();
        assert_eq!(received_first, PAIRS, "each pair delivered once: {received:?}");

        // Once the window has passed, the same postbacks are new again:
        // accepted once more, exactly once per pair.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let second = send_pairs("after the window").await;
        for (tracking_id, id) in &second {
            assert_ne!(Some(id), first.get(tracking_id), "{tracking_id}: a new id after the window");
        }
        eventually(Duration::from_secs(30), "the second round delivered", || {
            let count = sink.received_count();
            async move { (count >= 2 * PAIRS).then_some(()) }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(800)).await;
        let ids: BTreeSet<String> = sink
            .received()
            .iter()
            .map(|r| r.json()["id"].as_str().unwrap().to_owned())
            .collect();
        println!(
            "two instances, {PAIRS} postbacks each sent to both at once, twice (the second time after \
             the dedupe window): {} deliveries, {} distinct envelopes, 0 duplicates",
            sink.received_count(),
            ids.len()
        );
        assert_eq!(sink.received_count(), 2 * PAIRS);
        assert_eq!(ids.len(), 2 * PAIRS);
        for relay in relays {
            let (status, lines) =
                tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
            assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
        }
    })
    .await;
}
