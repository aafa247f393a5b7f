//! Retries: server errors, `Retry-After` and 429, a dead target coming back,
//! timeouts, final client errors and exhausted attempts becoming dead letters,
//! and pending deliveries surviving a restart.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use rusqlite::types::Value as Sql;

use super::{accept, dead_letters, eventually_int, int, metric, subject, DELIVERY, SECRET, WAIT};

// 3. 500, 500, 200: one success, three attempts, one id.
#[tokio::test]
async fn server_errors_are_retried_with_the_same_id() {
    let sink = Sink::start().await;
    sink.respond(|index, _| Reply::status(if index < 2 { 500 } else { 200 }));
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  inbox: {{url: \"{}\", secret: {SECRET}}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    ))
    .await;
    let id = accept(&relay, &mo_xml("retry-1", "hello", "28444")).await;

    sink.wait_for("/inbox", 3, WAIT).await;
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = sink.received_on("/inbox");
    assert_eq!(got.len(), 3, "attempts");
    for attempt in &got {
        assert_eq!(attempt.json()["id"], id.as_str());
        assert_eq!(attempt.header("webhook-id"), Some(id.as_str()));
    }
    assert!(dead_letters(&relay).is_empty());
    let counter = |outcome: &'static str| {
        let relay = &relay;
        async move {
            metric(
                relay,
                "relay_deliveries_total",
                &[("target", "inbox"), ("outcome", outcome)],
            )
            .await
        }
    };
    assert_eq!(counter("retried").await, Some(2.0));
    assert_eq!(counter("delivered").await, Some(1.0));
    assert_eq!(
        counter("dead").await,
        Some(0.0),
        "every outcome series exists from the start"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_comes_due_while_fresh_postbacks_keep_the_dispatcher_busy() {
    // Fresh postbacks reach the dispatcher in memory; the retry waits in the
    // store. A steady stream (every 40 ms, more often than the 250 ms poll)
    // must not keep the dispatcher from looking there.
    let sink = Sink::start().await;
    sink.respond(|_, _| Reply::status(503));
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  inbox: {{url: \"{}\", secret: {SECRET}}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    ))
    .await;
    accept(&relay, &mo_xml("RETRY-ME", "hello", "28444")).await;
    // The first attempt fails; from now on the target accepts everything.
    sink.wait_for("/inbox", 1, WAIT).await;
    sink.respond(|_, _| Reply::status(200));
    let mut sent = 0;
    let retried = loop {
        accept(&relay, &mo_xml(&format!("STREAM-{sent}"), "hello", "28444")).await;
        sent += 1;
        let delivered_again = sink
            .received_on("/inbox")
            .iter()
            .filter(|r| r.json()["data"]["tracking_id"] == "RETRY-ME")
            .count()
            == 2;
        if delivered_again || sent == 100 {
            break delivered_again;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    };
    assert!(
        retried,
        "the retry was not attempted during {sent} postbacks ({} ms of steady traffic)",
        sent * 40
    );
    relay.shutdown().await;
}

// 4. A target that is down, then comes back on the same address.
#[tokio::test]
async fn a_dead_target_that_comes_back_gets_everything() {
    let addr = dead_addr().await;
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  inbox: {{url: \"http://{addr}/inbox\"}}\nroutes:\n  - targets: [inbox]\n"
    ))
    .await;
    let mut ids = BTreeSet::new();
    for n in 0..5 {
        ids.insert(accept(&relay, &mo_xml(&format!("down-{n}"), "hello", "28444")).await);
    }
    // Every job has failed at least once (connection refused) and is still queued.
    eventually_int(
        &relay,
        "SELECT COUNT(*) FROM jobs WHERE attempts >= 1 AND last_error IS NOT NULL",
        5,
    )
    .await;
    assert!(dead_letters(&relay).is_empty());
    // The queue's lag shows while the target is down (gauges refresh every 2 s).
    let age = r#"relay_queue_oldest_age_seconds{target="inbox"}"#;
    let pending = r#"relay_queue_pending{target="inbox"}"#;
    eventually(
        Duration::from_secs(10),
        "all five pending, and the oldest's age, to show",
        || {
            let relay = &relay;
            async move {
                let lagging = relay.metric(age).await.unwrap_or(0.0) > 0.0;
                (lagging && relay.metric(pending).await == Some(5.0)).then_some(())
            }
        },
    )
    .await;

    let sink = Sink::start_at(addr).await;
    let got = sink.wait_for("/inbox", 5, WAIT).await;
    let delivered: BTreeSet<String> = got
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(delivered, ids);
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    assert!(dead_letters(&relay).is_empty());
    eventually(
        Duration::from_secs(10),
        "the oldest pending age to drop to 0",
        || {
            let relay = &relay;
            async move { (relay.metric(age).await == Some(0.0)).then_some(()) }
        },
    )
    .await;
    relay.shutdown().await;
}

// 5. Retry-After is honoured beyond the backoff cap; 429 is retried.
#[tokio::test]
async fn retry_after_is_honoured_and_429_is_retried() {
    let sink = Sink::start().await;
    // The first request on each path is refused, later ones accepted.
    let slow_down = sink.clone();
    sink.respond(move |_, received| {
        let seen_here = slow_down.received_on(&received.path).len();
        match (received.path.as_str(), seen_here) {
            ("/busy", 1) => Reply {
                status: 503,
                headers: vec![("retry-after", "1".to_owned())],
                delay: Duration::ZERO,
            },
            ("/limited", 1) => Reply::status(429),
            _ => Reply::status(200),
        }
    });
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  busy: {{url: \"{}\"}}\n  limited: {{url: \"{}\"}}\nroutes:\n  - match: {{keyword: busy}}\n    targets: [busy]\n  - targets: [limited]\n",
        sink.url("/busy"),
        sink.url("/limited"),
    ))
    .await;
    accept(&relay, &mo_xml("busy-1", "busy", "28444")).await;
    accept(&relay, &mo_xml("limited-1", "hello", "28444")).await;

    let busy = sink.wait_for("/busy", 2, WAIT).await;
    let limited = sink.wait_for("/limited", 2, WAIT).await;
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    let gap = busy[1].at.duration_since(busy[0].at);
    assert!(
        gap >= Duration::from_millis(950),
        "second attempt came {gap:?} after a 503 with Retry-After: 1"
    );
    assert_eq!(sink.received_on("/busy").len(), 2);
    assert_eq!(sink.received_on("/limited").len(), 2);
    assert_eq!(subject(&limited[1]), "limited-1");
    assert!(dead_letters(&relay).is_empty());
    relay.shutdown().await;
}

// 6. 4xx is final; max_attempts gives up.
#[tokio::test]
async fn client_errors_and_exhausted_attempts_become_dead_letters() {
    let sink = Sink::start().await;
    sink.respond(|_, received| {
        Reply::status(match received.path.as_str() {
            "/t400" => 400,
            "/t404" => 404,
            "/t410" => 410,
            _ => 500,
        })
    });
    let mut yaml = format!("{DELIVERY}targets:\n");
    for name in ["t400", "t404", "t410"] {
        yaml += &format!("  {name}: {{url: \"{}\"}}\n", sink.url(&format!("/{name}")));
    }
    yaml += &format!(
        "  t500: {{url: \"{}\", max_attempts: 3}}\nroutes:\n  - targets: [t400, t404, t410, t500]\n",
        sink.url("/t500")
    );
    let relay = start_relay(&yaml).await;
    let id = accept(&relay, &mo_xml("refused-1", "hello", "28444")).await;

    eventually_int(&relay, "SELECT COUNT(*) FROM dead_letters", 4).await;
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    // Long enough for a stray retry (backoff max is 200 ms) to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (name, code) in [("t400", 400), ("t404", 404), ("t410", 410)] {
        assert_eq!(
            sink.received_on(&format!("/{name}")).len(),
            1,
            "attempts on {name}"
        );
        let dead = dead_letters(&relay)
            .into_iter()
            .find(|d| d.target == name)
            .unwrap_or_else(|| panic!("no dead letter for {name}"));
        assert_eq!(dead.event_id, id);
        assert_eq!(dead.reason, "rejected by target");
        assert_eq!(dead.attempts, 1);
        assert_eq!(dead.last_status, Some(code));
        let error = dead.last_error.unwrap_or_default();
        assert!(error.contains(&code.to_string()), "{error}");
        assert!(error.contains("sink says hi"), "{error}");
    }
    assert_eq!(sink.received_on("/t500").len(), 3, "attempts on t500");
    let dead = dead_letters(&relay)
        .into_iter()
        .find(|d| d.target == "t500")
        .expect("dead letter for t500");
    assert_eq!(dead.reason, "max attempts reached");
    assert_eq!(dead.attempts, 3);
    assert_eq!(dead.last_status, Some(500));
    assert_eq!(
        metric(
            &relay,
            "relay_deliveries_total",
            &[("target", "t500"), ("outcome", "dead")]
        )
        .await,
        Some(1.0)
    );
    relay.shutdown().await;
}

// 11. An attempt that outlives the target's timeout is retried, then given up.
#[tokio::test]
async fn timeouts_are_retried_then_dead_lettered() {
    let sink = Sink::start().await;
    sink.respond(|_, _| Reply {
        status: 200,
        headers: Vec::new(),
        delay: Duration::from_secs(3),
    });
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  hung: {{url: \"{}\", timeout: 500ms, max_attempts: 3}}\nroutes:\n  - targets: [hung]\n",
        sink.url("/hung")
    ))
    .await;
    let id = accept(&relay, &mo_xml("hung-1", "hello", "28444")).await;
    // After the first timeout the job is back in the queue with one attempt.
    eventually(WAIT, "a retry after a timeout", || {
        let rows = relay.query("SELECT attempts, last_error FROM jobs");
        async move {
            match rows.first().map(|row| (&row[0], &row[1])) {
                Some((Sql::Integer(n), Sql::Text(error)))
                    if *n >= 1 && error.contains("timed out") =>
                {
                    Some(())
                }
                _ => None,
            }
        }
    })
    .await;
    eventually_int(&relay, "SELECT COUNT(*) FROM dead_letters", 1).await;
    let dead = &dead_letters(&relay)[0];
    assert_eq!(dead.event_id, id);
    assert_eq!(dead.target, "hung");
    assert_eq!(dead.reason, "max attempts reached");
    assert_eq!(dead.attempts, 3);
    assert_eq!(dead.last_status, None);
    let error = dead.last_error.clone().unwrap_or_default();
    assert!(error.contains("timed out"), "{error}");
    assert_eq!(sink.received_on("/hung").len(), 3);
    assert_eq!(int(&relay, "SELECT COUNT(*) FROM jobs"), 0);
    relay.shutdown().await;
}

// 12. Accepted while the target is down, delivered after a graceful restart.
#[tokio::test]
async fn pending_deliveries_survive_a_restart() {
    let addr = dead_addr().await;
    let rest = format!(
        "{DELIVERY}targets:\n  inbox: {{url: \"http://{addr}/inbox\"}}\nroutes:\n  - targets: [inbox]\n"
    );
    let relay = start_relay(&rest).await;
    let mut ids = BTreeSet::new();
    for n in 0..5 {
        ids.insert(accept(&relay, &mo_xml(&format!("restart-{n}"), "hello", "28444")).await);
    }
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs WHERE attempts >= 1", 5).await;
    let dir = relay.shutdown().await;

    let sink = Sink::start_at(addr).await;
    let relay = start_relay_in(dir, &rest).await;
    let got = sink.wait_for("/inbox", 5, WAIT).await;
    let delivered: BTreeSet<String> = got
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(delivered, ids);
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received_on("/inbox").len(), 5, "delivered twice");
    relay.shutdown().await;
}
