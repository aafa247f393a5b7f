//! Fault tests: the relay under SIGKILL, SIGTERM, dead, hung and refusing
//! targets, a returning target with a backlog, and a full disk.
//!
//! Each test proves that nothing acknowledged is lost: it keeps the books of
//! every postback answered with a complete 200 and checks that each one reaches
//! every target it was routed to, with the id its 200 answered. Each runs under
//! a hard time limit and ends by itself; everything listens on loopback on
//! ephemeral ports. Assertions are about correctness only; times (latencies,
//! recovery) are printed, never asserted, apart from generous bounds that stand
//! for "it does happen".
//!
//! The harness is shared with the other test files: `common` (in-process relay,
//! sinks, hung listener, tmpfs) and `common::process` (the real binary and the
//! load senders).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::process::*;
use crate::common::*;

/// The hard limit of every test here.
const LIMIT: Duration = Duration::from_secs(90);

/// Postbacks `PREFIX-0` … `PREFIX-(count-1)` posted one after the other on one
/// keep-alive connection; each must be answered 200 `accepted`. Returns the
/// books (tracking id → envelope id) and each answer's time.
async fn post_serially(
    url: &str,
    prefix: &str,
    count: usize,
) -> (BTreeMap<String, String>, Vec<Duration>) {
    let client = http_client();
    let mut acknowledged = BTreeMap::new();
    let mut times = Vec::with_capacity(count);
    for n in 0..count {
        let tracking_id = format!("{prefix}-{n}");
        let answer = try_post(&client, url, mo_xml(&tracking_id, "hello", "28444"))
            .await
            .unwrap_or_else(|err| panic!("{tracking_id}: no answer: {err:?}"));
        assert_eq!(
            (answer.status, &answer.json["status"]),
            (200, &serde_json::json!("accepted")),
            "{tracking_id}: {answer:?}"
        );
        let id = answer.json["id"].as_str().expect("id").to_owned();
        acknowledged.insert(tracking_id, id);
        times.push(answer.elapsed);
    }
    (acknowledged, times)
}

/// The `p`-th percentile (0–100) of some durations, nearest rank.
fn percentile(times: &[Duration], p: f64) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// "p50 … p99 … max …" of some durations.
fn latency_summary(times: &[Duration]) -> String {
    format!(
        "p50 {:.2?}, p99 {:.2?}, max {:.2?} (n = {})",
        percentile(times, 50.0),
        percentile(times, 99.0),
        percentile(times, 100.0),
        times.len()
    )
}

/// How many postbacks were received more than once.
fn duplicates(received: &BTreeMap<String, usize>) -> usize {
    received.values().map(|n| n - 1).sum()
}

/// The status of `/readyz` on a relay process.
async fn readyz(relay: &RelayProcess) -> u16 {
    get(&relay.admin_url("/readyz")).await.0
}

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
// 2. A target down for a while, then back
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_for_a_while_gets_everything_once_back() {
    bounded(LIMIT, "a target down, then back", async {
        let addr = dead_addr().await;
        let relay = start_relay(&format!(
            "delivery:\n  backoff: {{initial: 100ms, max: 1s}}\n  max_attempts: 1000\n\
             targets:\n  late: {{url: \"http://{addr}/late\"}}\nroutes:\n  - targets: [late]\n"
        ))
        .await;
        // Postbacks keep coming while nobody listens: all accepted.
        let mut acknowledged = BTreeMap::new();
        for round in 0..3 {
            let (batch, _) = post_serially(&relay.url, &format!("down{round}"), 20).await;
            acknowledged.extend(batch);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let retried = r#"relay_deliveries_total{outcome="retried",target="late"}"#;
        assert!(
            relay.metric(retried).await.unwrap_or(0.0) > 0.0,
            "no failed attempt while the target was down"
        );

        let sink = Sink::start_at(addr).await;
        let back = Instant::now();
        let received = wait_for_all(&sink, &acknowledged, Duration::from_secs(30)).await;
        println!(
            "down then back: {} postbacks accepted during ~3 s of downtime, all delivered \
             {:.2?} after the target came back ({} duplicates, {} failed attempts before)",
            acknowledged.len(),
            back.elapsed(),
            duplicates(&received),
            relay.metric(retried).await.unwrap_or(0.0)
        );
        relay.shutdown().await;
    })
    .await
}

// ---------------------------------------------------------------------------
// 3. A hung target
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_target_is_retried_and_slows_neither_ingest_nor_other_targets() {
    bounded(LIMIT, "a hung target", async {
        const N: usize = 200;
        let healthy = Sink::start().await;
        let hung = HungListener::start().await;
        let healthy_target = format!("  healthy: {{url: \"{}\"}}\n", healthy.url("/healthy"));

        // Baseline: only the healthy target.
        let solo_dir = tempfile::tempdir().unwrap();
        let config = write_config(
            solo_dir.path(),
            &format!("{DELIVERY}targets:\n{healthy_target}routes:\n  - targets: [healthy]\n"),
        );
        let relay = RelayProcess::spawn(&config).await;
        let (solo, solo_times) = post_serially(&relay.url, "solo", N).await;
        wait_for_all(&healthy, &solo, Duration::from_secs(20)).await;
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));

        // The same with a hung target added to the route.
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("relay.db");
        let config = write_config(
            dir.path(),
            &format!(
                "{DELIVERY}targets:\n{healthy_target}  hung: {{url: \"{}\", timeout: 500ms}}\n\
                 routes:\n  - targets: [healthy, hung]\n",
                hung.url("/hung")
            ),
        );
        let relay = RelayProcess::spawn(&config).await;
        let (acknowledged, times) = post_serially(&relay.url, "hung", N).await;
        let posted = Instant::now();
        let received = wait_for_all(&healthy, &acknowledged, Duration::from_secs(20)).await;
        let healthy_done = posted.elapsed();

        // The hung target's attempts time out and are retried.
        let retried = r#"relay_deliveries_total{outcome="retried",target="hung"}"#;
        eventually(Duration::from_secs(20), "hung jobs with 2+ attempts", || {
            let attempts = query_int(&db, "SELECT MAX(attempts) FROM jobs WHERE target = 'hung'");
            async move { (attempts >= 2).then_some(()) }
        })
        .await;
        let first = relay.metric(retried).await.unwrap_or(0.0);
        assert!(first > 0.0, "no retried attempt counted");
        eventually(Duration::from_secs(20), "more retries of the hung target", || {
            let relay = &relay;
            async move { (relay.metric(retried).await.unwrap_or(0.0) > first).then_some(()) }
        })
        .await;
        let errors = query_db(
            &db,
            "SELECT DISTINCT last_error FROM jobs WHERE target = 'hung' AND attempts > 0",
        );
        assert!(
            errors
                .iter()
                .all(|row| matches!(&row[0], rusqlite::types::Value::Text(e) if e.contains("timed out"))),
            "{errors:?}"
        );
        assert!(hung.accepted() > 0);
        assert_eq!(query_int(&db, "SELECT COUNT(*) FROM dead_letters"), 0);
        assert_eq!(
            query_int(&db, "SELECT COUNT(*) FROM jobs WHERE target = 'healthy'"),
            0,
            "the healthy target has work left"
        );
        let retried_total = relay.metric(retried).await.unwrap_or(0.0);
        // Shutdown waits for the hung attempts in flight (each bounded by its timeout).
        let stopping = Instant::now();
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));

        println!(
            "hung target: ingest latency with the healthy target only: {}",
            latency_summary(&solo_times)
        );
        println!(
            "hung target: ingest latency with the hung target added:   {}",
            latency_summary(&times)
        );
        println!(
            "hung target: p99 {:.2?} without vs {:.2?} with the hung target; healthy target had all \
             {N} {healthy_done:.2?} after the last answer ({} duplicates); the hung one: {} \
             connections, {} retried attempts; SIGTERM exit in {:.2?}",
            percentile(&solo_times, 99.0),
            percentile(&times, 99.0),
            duplicates(&received),
            hung.accepted(),
            retried_total,
            stopping.elapsed()
        );
    })
    .await
}

// ---------------------------------------------------------------------------
// 4. The store cannot write: a full disk
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_recovers_by_itself() {
    bounded(LIMIT, "a full disk", async {
        // Declared first so it is dropped (unmounted) after the relay is killed.
        let disk = Tmpfs::mount("2m");
        let sink = Sink::start().await;
        let db = disk.path().join("relay.db");
        let config = write_config(
            disk.path(),
            &format!(
                "{DELIVERY}targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
                sink.url("/inbox")
            ),
        );
        let relay = RelayProcess::spawn(&config).await;
        let (mut acknowledged, _) = post_serially(&relay.url, "before", 5).await;
        wait_for_all(&sink, &acknowledged, Duration::from_secs(15)).await;
        assert_eq!(readyz(&relay).await, 200);

        let filler = disk.path().join("filler");
        let filled = disk.fill("filler");

        // A few postbacks may still be journaled into space the filesystem
        // had left: those are durable and answered 200 (and must be moved in
        // and delivered once space returns). Once the journal truly cannot
        // write, every postback is 503 with Retry-After, at once.
        let client = http_client();
        let mut refused = Vec::new();
        let mut refusal_times = Vec::new();
        let mut accepted_while_full = 0;
        for n in 0..500 {
            if refused.len() == 20 {
                break;
            }
            let tracking_id = format!("full-{n}");
            let answer = try_post(&client, &relay.url, mo_xml(&tracking_id, "hello", "28444"))
                .await
                .unwrap_or_else(|err| panic!("{tracking_id}: no answer in time: {err:?}"));
            if answer.status == 200 && refused.is_empty() {
                accepted_while_full += 1;
                acknowledged.insert(
                    tracking_id,
                    answer.json["id"].as_str().expect("accepted id").to_owned(),
                );
                continue;
            }
            assert_eq!(
                answer.status, 503,
                "{tracking_id} on a full disk, after a 503: {answer:?}"
            );
            assert_eq!(answer.retry_after.as_deref(), Some("30"), "{answer:?}");
            refused.push(tracking_id);
            refusal_times.push(answer.elapsed);
        }
        assert_eq!(refused.len(), 20, "the store never refused on a full disk");
        // Unready, and it stays so while the disk is full (background writes
        // that change nothing must not make it look ready).
        for _ in 0..10 {
            assert_eq!(readyz(&relay).await, 503, "/readyz with a full disk");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }

        // Space comes back: the relay recovers without any traffic.
        std::fs::remove_file(&filler).expect("remove the filler");
        let freed = Instant::now();
        eventually(
            Duration::from_secs(15),
            "/readyz 200 after space came back",
            || {
                let relay = &relay;
                async move { (readyz(relay).await == 200).then_some(()) }
            },
        )
        .await;
        let ready_after = freed.elapsed();
        // What was acknowledged while the disk was full is moved in from the
        // intake journal; the 503s committed nothing.
        eventually(
            Duration::from_secs(10),
            "postbacks acknowledged on the full disk moved into SQLite",
            || {
                let db = &db;
                async move {
                    (query_int(db, "SELECT COUNT(*) FROM dedupe WHERE key LIKE '%|full-%'")
                        >= accepted_while_full)
                        .then_some(())
                }
            },
        )
        .await;
        assert_eq!(
            query_int(&db, "SELECT COUNT(*) FROM dedupe WHERE key LIKE '%|full-%'"),
            accepted_while_full,
            "a postback answered 503 was committed"
        );
        let (after, _) = post_serially(&relay.url, "after", 5).await;
        let accepting_after = freed.elapsed();
        acknowledged.extend(after);
        let received = wait_for_all(&sink, &acknowledged, Duration::from_secs(30)).await;
        let refused_delivered = refused.iter().filter(|t| received.contains_key(*t)).count();
        assert_eq!(
            refused_delivered, 0,
            "a postback answered 503 was delivered"
        );
        let (status, lines) =
            tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
        assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
        println!(
            "full disk: filler {filled} bytes; {accepted_while_full} accepted into allocated WAL space first; 503 answer times: {}; {:?}",
            latency_summary(&refusal_times),
            refusal_times
        );
        println!(
            "full disk: /readyz 200 {ready_after:.2?} after the filler was removed, postbacks \
             accepted again by {accepting_after:.2?}; {} acknowledged, all delivered",
            acknowledged.len()
        );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_refusing_for_good_gets_one_attempt_and_a_dead_letter() {
    bounded(LIMIT, "410 and 422 targets", async {
        const N: usize = 5;
        let gone = Sink::start().await;
        gone.respond(|_, _| Reply::status(410));
        let unprocessable = Sink::start().await;
        unprocessable.respond(|_, _| Reply::status(422));
        let relay = start_relay(&format!(
            "{DELIVERY}targets:\n  gone: {{url: \"{}\"}}\n  unprocessable: {{url: \"{}\"}}\n\
             routes:\n  - targets: [gone, unprocessable]\n",
            gone.url("/gone"),
            unprocessable.url("/unprocessable")
        ))
        .await;
        let db = relay.db_path();
        let (acknowledged, _) = post_serially(&relay.url, "refused", N).await;
        eventually(Duration::from_secs(15), "2 × N dead letters", || {
            let dead = query_int(&db, "SELECT COUNT(*) FROM dead_letters");
            async move { (dead == 2 * N as i64).then_some(()) }
        })
        .await;
        // Time for a retry storm to show, if there were one.
        tokio::time::sleep(Duration::from_secs(2)).await;

        for (target, sink, status) in [("gone", &gone, 410), ("unprocessable", &unprocessable, 422)]
        {
            let received = wait_for_all(sink, &acknowledged, Duration::from_secs(5)).await;
            assert!(
                received.values().all(|&n| n == 1) && received.len() == N,
                "{target}: not exactly one attempt per postback: {received:?}"
            );
            let rows = query_db(
                &db,
                &format!(
                    "SELECT reason, attempts, last_status, last_error FROM dead_letters \
                     WHERE target = '{target}'"
                ),
            );
            assert_eq!(rows.len(), N);
            for row in rows {
                use rusqlite::types::Value::{Integer, Text};
                assert!(
                    matches!(
                        (&row[0], &row[1], &row[2], &row[3]),
                        (Text(reason), Integer(1), Integer(s), Text(error))
                            if reason == "rejected by target" && *s == status
                                && error.starts_with(&format!("HTTP {status}"))
                                && error.contains("sink says hi")
                    ),
                    "{target}: {row:?}"
                );
            }
            let sample = |outcome: &str| {
                format!(r#"relay_deliveries_total{{outcome="{outcome}",target="{target}"}}"#)
            };
            assert_eq!(relay.metric(&sample("dead")).await, Some(N as f64));
            assert_eq!(relay.metric(&sample("retried")).await, Some(0.0));
        }
        assert_eq!(query_int(&db, "SELECT COUNT(*) FROM jobs"), 0);
        println!(
            "refusing targets: {N} postbacks → {N} attempts and {N} dead letters per target, \
             none retried 2 s later"
        );
        relay.shutdown().await;
    })
    .await
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

// ---------------------------------------------------------------------------
// 7. No retry storm: a returning target never gets more than its concurrency
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_target_with_a_backlog_gets_at_most_its_concurrency() {
    bounded(LIMIT, "a backlog for a returning target", async {
        const N: usize = 200;
        const CONCURRENCY: usize = 4;
        let addr = dead_addr().await;
        let relay = start_relay(&format!(
            "delivery:\n  backoff: {{initial: 100ms, max: 1s}}\n  max_attempts: 1000\n\
             targets:\n  storm: {{url: \"http://{addr}/storm\", concurrency: {CONCURRENCY}}}\n\
             routes:\n  - targets: [storm]\n"
        ))
        .await;
        let (acknowledged, _) = post_serially(&relay.url, "storm", N).await;
        // The target is known to be down: several rounds of attempts failed
        // (the dispatcher then pauses it rather than trying every job).
        let retried = r#"relay_deliveries_total{outcome="retried",target="storm"}"#;
        eventually(
            Duration::from_secs(20),
            "several rounds of failed attempts",
            || {
                let relay = &relay;
                async move {
                    let failed = relay.metric(retried).await.unwrap_or(0.0);
                    (failed >= (3 * CONCURRENCY) as f64).then_some(())
                }
            },
        )
        .await;
        // Paused, not hammered: a down target costs a few attempts per pause,
        // not one per job.
        let before = relay.metric(retried).await.unwrap_or(0.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let during = relay.metric(retried).await.unwrap_or(0.0) - before;
        assert!(
            during <= (4 * CONCURRENCY) as f64,
            "{during} attempts in 0.5 s on a target that does not answer"
        );

        let sink = Sink::start_at_responding(addr, |_, _| Reply {
            status: 200,
            headers: Vec::new(),
            delay: Duration::from_millis(50),
        })
        .await;
        let back = Instant::now();
        let received = wait_for_all(&sink, &acknowledged, Duration::from_secs(45)).await;
        let drained = back.elapsed();
        let max = sink.max_in_flight();
        println!(
            "retry storm: backlog of {N} delivered {drained:.2?} after the target came back; \
             at most {max} requests in flight (limit {CONCURRENCY}); {} duplicates",
            duplicates(&received)
        );
        assert!(
            max <= CONCURRENCY,
            "{max} requests in flight at once, concurrency is {CONCURRENCY}"
        );
        relay.shutdown().await;
    })
    .await
}
