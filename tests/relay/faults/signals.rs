//! The relay killed or stopped under load: repeated SIGKILL, postbacks only
//! in the intake journal, and SIGTERM all lose nothing acknowledged.

use std::time::{Duration, Instant};

use crate::common::process::*;
use crate::common::*;

use super::{duplicates, post_serially, LIMIT};

// ---------------------------------------------------------------------------
// 1. Repeated SIGKILL under sustained load, fan-out to two targets
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sigkill_under_load_loses_nothing_on_any_target() {
    bounded(LIMIT, "repeated SIGKILL under load", async {
        let inbox = Sink::start().await;
        let archive = Sink::start().await;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("relay.db");
        let config = write_config(
            dir.path(),
            &format!(
                "{DELIVERY}targets:\n  inbox: {{url: \"{}\"}}\n  archive: {{url: \"{}\"}}\n\
                 routes:\n  - targets: [inbox, archive]\n",
                inbox.url("/inbox"),
                archive.url("/archive")
            ),
        );
        let mut relay = RelayProcess::spawn(&config).await;
        // Like Sinch, a sender sends a postback that got no answer again, to
        // whichever relay is running by then.
        let load = Load::start(&relay.url, "chaos", 4, OnFault::Resend);
        // The kills come at any moment: from the start, a request without an
        // answer is the test's doing.
        load.expect_faults();
        let chaos = Instant::now();
        let mut kills = 0u64;
        let mut acknowledged_at_kill = vec![0];
        while chaos.elapsed() < Duration::from_secs(20) {
            // About 2 s apart, not in step with anything.
            tokio::time::sleep(Duration::from_millis(1700 + (kills * 173) % 600)).await;
            tokio::task::block_in_place(|| relay.kill());
            kills += 1;
            acknowledged_at_kill.push(load.sent().acknowledged.len());
            relay = RelayProcess::spawn(&config).await;
            load.follow(&relay.url);
        }
        // The last relay takes some load too, then the senders stop.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent = load.finish().await;
        assert!(sent.unexpected.is_empty(), "{:?}", sent.unexpected);
        let per_life: Vec<usize> = acknowledged_at_kill.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            per_life.iter().all(|&n| n > 0),
            "a relay life without any acknowledged postback: the load was not sustained: {per_life:?}"
        );
        let acknowledged = sent.acknowledged;
        println!(
            "sigkill: {kills} kills in {:.1?}; {} acknowledged (per life {per_life:?}); \
             {} requests without an answer {:?}; {} resent postbacks answered `duplicate` \
             (committed, answer lost)",
            chaos.elapsed(),
            acknowledged.len(),
            sent.cut_off,
            sent.cut_off_by_kind,
            sent.duplicate_answers
        );

        let caught_up = Instant::now();
        for (name, sink) in [("inbox", &inbox), ("archive", &archive)] {
            let received = wait_for_all(sink, &acknowledged, Duration::from_secs(45)).await;
            let unacknowledged = received
                .keys()
                .filter(|id| !acknowledged.contains_key(*id))
                .count();
            println!(
                "sigkill: target {name}: every acknowledged postback delivered; {} deliveries, \
                 {} duplicates, {unacknowledged} delivered without a 200",
                received.values().sum::<usize>(),
                duplicates(&received),
            );
        }
        println!(
            "sigkill: caught up {:.1?} after the load stopped",
            caught_up.elapsed()
        );
        // Nothing given up, nothing left behind.
        eventually(Duration::from_secs(15), "the queue to drain", || {
            let pending = query_int(&db, "SELECT COUNT(*) FROM jobs");
            async move { (pending == 0).then_some(()) }
        })
        .await;
        assert_eq!(query_int(&db, "SELECT COUNT(*) FROM dead_letters"), 0);
        // A postback is forgotten with its last job: no crash left one behind.
        assert_eq!(query_int(&db, "SELECT COUNT(*) FROM events"), 0);
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
    })
    .await
}

// ---------------------------------------------------------------------------
// 5. Targets answering 410 and 422: one attempt, a dead letter, no retry storm
// ---------------------------------------------------------------------------

/// Segments of the intake journal and the bytes they hold.
fn journal_segments(journal: &std::path::Path) -> (usize, u64) {
    std::fs::read_dir(journal)
        .expect("the intake journal's directory")
        .map(|entry| {
            entry
                .expect("a journal entry")
                .metadata()
                .expect("metadata")
                .len()
        })
        .fold((0, 0), |(files, bytes), len| (files + 1, bytes + len))
}

/// While SQLite cannot be written, the intake journal is the only copy of an
/// acknowledged postback: a SIGKILL then must not lose it, the restart moves
/// it in and delivers it, and a clean stop leaves no journal behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postbacks_only_in_the_intake_journal_survive_sigkill() {
    tokio::time::timeout(LIMIT, async {
        let sink = Sink::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write_config(
            dir.path(),
            &format!(
                "{DELIVERY}targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
                sink.url("/inbox")
            ),
        );
        let db = dir.path().join("relay.db");
        let journal = dir.path().join("relay.db.intake");
        let mut relay = RelayProcess::spawn(&config).await;

        let lock = rusqlite::Connection::open(&db).expect("open db");
        lock.execute_batch("BEGIN EXCLUSIVE").expect("take the write lock");
        let (acknowledged, _) = post_serially(&relay.url, "journal-only", 10).await;
        assert_eq!(query_int(&db, "SELECT COUNT(*) FROM events"), 0);
        tokio::task::block_in_place(|| relay.kill());
        lock.execute_batch("ROLLBACK").expect("release the write lock");
        drop(lock);
        let (_, journaled) = journal_segments(&journal);
        assert!(journaled > 0, "the killed relay left no journal");
        assert_eq!(sink.received_count(), 0, "delivered before the restart");

        let relay = RelayProcess::spawn(&config).await;
        let received = wait_for_all(&sink, &acknowledged, Duration::from_secs(20)).await;
        assert_eq!(received.len(), acknowledged.len());
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
        assert!(
            lines.iter().any(|line| line.contains("moved acknowledged postbacks from the intake journal")),
            "the restart did not report the journal it moved in"
        );
        assert_eq!(journal_segments(&journal), (0, 0), "a clean stop left journal segments");
        println!("journal-only postbacks: {} acknowledged while SQLite was locked ({journaled} journal bytes), all delivered after SIGKILL and restart", acknowledged.len());
    })
    .await
    .expect("the journal test ends in time");
}

// ---------------------------------------------------------------------------
// 6. Graceful shutdown under load
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    bounded(LIMIT, "SIGTERM under load", async {
        let sink = Sink::start().await;
        let slow = Reply {
            status: 200,
            headers: Vec::new(),
            delay: Duration::from_millis(300),
        };
        sink.respond(move |_, _| slow.clone());
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("relay.db");
        let config = write_config(
            dir.path(),
            &format!(
                "{DELIVERY}targets:\n  inbox: {{url: \"{}\", concurrency: 4, timeout: 5s}}\n\
                 routes:\n  - targets: [inbox]\n",
                sink.url("/inbox")
            ),
        );
        let relay = RelayProcess::spawn(&config).await;
        let load = Load::start(&relay.url, "term", 4, OnFault::Resend);
        // Senders busy, deliveries in flight.
        load.wait_acknowledged(40, Duration::from_secs(20)).await;
        sink.wait_for("/inbox", 4, Duration::from_secs(10)).await;
        load.expect_faults();
        let terminated = Instant::now();
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(30)));
        let exit_time = terminated.elapsed();
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
        assert!(
            lines.iter().any(|l| l.contains("stopped cleanly")),
            "{}",
            lines.join("\n")
        );
        // Attempts in flight were finished and recorded, not abandoned with a lease.
        assert_eq!(
            query_int(&db, "SELECT COUNT(*) FROM jobs WHERE lease_until > 0"),
            0,
            "deliveries abandoned in flight"
        );
        let pending_at_exit = query_int(&db, "SELECT COUNT(*) FROM jobs");
        let acknowledged_at_exit = load.sent().acknowledged.len();

        // Restart; the senders find the new relay and go on.
        sink.respond(|_, _| Reply::status(200));
        let relay = RelayProcess::spawn(&config).await;
        load.follow(&relay.url);
        load.wait_acknowledged(acknowledged_at_exit + 20, Duration::from_secs(20))
            .await;
        let sent = load.finish().await;
        assert!(sent.unexpected.is_empty(), "{:?}", sent.unexpected);
        let received = wait_for_all(&sink, &sent.acknowledged, Duration::from_secs(30)).await;
        assert_eq!(query_int(&db, "SELECT COUNT(*) FROM dead_letters"), 0);
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
        println!(
            "sigterm: exit 0 {exit_time:.2?} after SIGTERM with {pending_at_exit} jobs pending; \
             {} acknowledged in all ({acknowledged_at_exit} before the restart), all delivered \
             ({} duplicates); {} requests without a complete answer, counted as not \
             acknowledged: {:?}; {} resent postbacks answered `duplicate`",
            sent.acknowledged.len(),
            duplicates(&received),
            sent.cut_off,
            sent.cut_off_by_kind,
            sent.duplicate_answers
        );
    })
    .await
}
