//! Troubled targets: down for a while, hung, refusing for good, and returning
//! with a backlog; each gets everything once and no retry storm.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::process::*;
use crate::common::*;

use super::{duplicates, latency_summary, percentile, post_serially, LIMIT};

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
