//! When the store cannot commit: a locked store keeps accepting into the
//! journal, and a stalled writer holds a bounded number of bytes and refuses
//! the rest at once.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

use super::{assert_error_body, count, send, sql_bytes};

// ---------------------------------------------------------------------------
// 7. 503 when the store cannot commit
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_locked_store_keeps_accepting_into_the_journal_and_moves_in_afterwards() {
    if skip_unless(
        Backend::Sqlite,
        "holds SQLite's write lock; tests/postgres.rs stops a PostgreSQL server instead",
    ) {
        return;
    }
    // No targets: accepted postbacks stay in `events` (as "no route" dead letters),
    // so what was moved in can be read back.
    let relay = start_relay("").await;
    let readyz = format!("{}/readyz", relay.admin);
    assert_eq!(get(&readyz).await.0, 200);

    let (status, answer) = post(&relay.url, None, mo_xml("BEFORE_LOCK", "k", "28444")).await;
    assert_eq!((status, &answer["status"]), (200, &json!("accepted")));
    relay
        .eventually_int(Duration::from_secs(5), "SELECT COUNT(*) FROM events", 1)
        .await;

    let lock = rusqlite::Connection::open(relay.db_path()).expect("open db");
    lock.busy_timeout(Duration::from_secs(5)).unwrap();
    let mode: String = lock
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    lock.execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");

    // Acknowledged from the intake journal although SQLite cannot be written.
    let locked_body = mo_xml("DURING_LOCK", "k", "28444");
    let (status, answer) = post(&relay.url, Some("text/xml"), locked_body.clone()).await;
    assert_eq!(
        (status, &answer["status"]),
        (200, &json!("accepted")),
        "{answer}"
    );
    let id = answer["id"].as_str().unwrap().to_owned();
    // Sinch's retry of it is a duplicate already, before it reached SQLite.
    let (status, again) = post(&relay.url, Some("text/xml"), locked_body.clone()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (&again["status"], &again["id"]),
        (&json!("duplicate"), &json!(id))
    );

    // A malformed body is quarantined in SQLite itself: 503, not 400.
    let (status, headers, answer) = send("POST", &relay.url, None, "garbage").await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("30")
    );
    assert_error_body(&answer, "retry later");

    // The writer cannot move it in: unready (deliveries are stuck), and
    // readers still see only what was there.
    let (status, body) = get(&readyz).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM events"), 1);
    assert_eq!(count(&relay, "SELECT COUNT(*) FROM quarantine"), 0);

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    // Readiness recovers by itself, and the journaled postback is moved in.
    eventually(
        Duration::from_secs(10),
        "/readyz to recover without traffic",
        || {
            let readyz = readyz.clone();
            async move { (get(&readyz).await.0 == 200).then_some(()) }
        },
    )
    .await;
    relay
        .eventually_int(Duration::from_secs(5), "SELECT COUNT(*) FROM events", 2)
        .await;
    let rows = relay.query(&format!("SELECT raw_body FROM events WHERE id = '{id}'"));
    assert_eq!(rows.len(), 1);
    assert_eq!(sql_bytes(&rows[0][0]), locked_body.as_bytes());
    let (status, again) = post(&relay.url, Some("text/xml"), locked_body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (&again["status"], &again["id"]),
        (&json!("duplicate"), &json!(id))
    );
    assert_eq!(
        relay
            .metric(r#"relay_postbacks_received_total{format="unknown",outcome="error"}"#)
            .await,
        Some(1.0)
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_stalled_writer_holds_a_bounded_number_of_bytes_and_refuses_beyond_it_at_once() {
    if skip_unless(
        Backend::Sqlite,
        "holds SQLite's write lock; the PostgreSQL queue has its own bound",
    ) {
        return;
    }
    bounded(
        Duration::from_secs(120),
        "byte-bounded writer queue",
        async {
            let relay = start_relay("").await;
            let lock = rusqlite::Connection::open(relay.db_path()).expect("open db");
            lock.execute_batch("BEGIN EXCLUSIVE")
                .expect("take the write lock");

            // Postbacks of ~0.8 MiB of body each wait in the writer's queue
            // (64 MiB, bodies and envelopes). Sent one after the other, as Sinch
            // does.
            let big = |n: usize| {
                let extras: String = (0..13)
                    .map(|field| format!("<note-{field}>{}</note-{field}>", "k".repeat(60 * 1024)))
                    .collect();
                format!(
                    "<postback><origin>MMS_MO</origin><code>N401</code><from>14085550000</from>\
                 <to>28444</to><tracking-id>BIG-{n}</tracking-id>{extras}</postback>"
                )
            };
            let mut accepted = Vec::new();
            let mut refused = None;
            for n in 0..200 {
                let started = std::time::Instant::now();
                let (status, headers, answer) =
                    send("POST", &relay.url, Some("text/xml"), big(n)).await;
                match status {
                    200 => accepted.push(answer["id"].as_str().expect("id").to_owned()),
                    503 => {
                        refused = Some((n, headers, answer, started.elapsed()));
                        break;
                    }
                    other => panic!("postback {n}: {other} {answer}"),
                }
            }
            let (n, headers, answer, took) =
                refused.expect("the queue never filled: it is unbounded");
            eprintln!(
                "refused postback {n} after {} accepted, in {took:?}",
                accepted.len()
            );
            assert_eq!(
                headers.get("retry-after").and_then(|v| v.to_str().ok()),
                Some("30")
            );
            assert_error_body(&answer, "retry later");
            // Refused at once: not after the 2 s wait for room by count.
            assert!(took < Duration::from_secs(2), "{took:?}");

            // Once SQLite can be written again, every acknowledged one is moved
            // in, and the queue takes postbacks again.
            lock.execute_batch("ROLLBACK").unwrap();
            drop(lock);
            relay
                .eventually_int(
                    Duration::from_secs(30),
                    "SELECT COUNT(*) FROM events",
                    accepted.len() as i64,
                )
                .await;
            for id in &accepted {
                assert_eq!(
                    count(
                        &relay,
                        &format!("SELECT COUNT(*) FROM events WHERE id = '{id}'")
                    ),
                    1,
                    "{id}"
                );
            }
            // What waited was at most the bound, and the refused one would
            // have passed it.
            let held = count(
                &relay,
                "SELECT SUM(length(envelope) + length(raw_body)) FROM events",
            );
            let each = held / accepted.len() as i64;
            let bound = 64 * 1024 * 1024;
            assert!(held <= bound && held + each > bound, "{held} bytes held");
            let (status, _, answer) = send("POST", &relay.url, Some("text/xml"), big(n)).await;
            assert_eq!(
                (status, &answer["status"]),
                (200, &json!("accepted")),
                "{answer}"
            );
            relay.shutdown().await;
        },
    )
    .await;
}
