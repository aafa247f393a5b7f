//! A full disk: the relay answers 503 and recovers by itself.

use std::time::{Duration, Instant};

use crate::common::process::*;
use crate::common::*;

use super::{latency_summary, post_serially, LIMIT};

/// The status of `/readyz` on a relay process.
async fn readyz(relay: &RelayProcess) -> u16 {
    get(&relay.admin_url("/readyz")).await.0
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
