//! Routing: fan-out and `continue`, a postback without a route kept as a dead
//! letter, and targets that do not hold each other up.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::*;

use super::{accept, dead_letters, eventually_int, int, metric, subject, DELIVERY, WAIT};

/// An MT delivery receipt (no keyword, no `to`).
fn mt_xml(tracking_id: &str, code: &str) -> String {
    format!(
        "<postback><origin>MMS_MT</origin><code>{code}</code><tracking-id>{tracking_id}</tracking-id>\
         <mms-id>77</mms-id><status>ok</status></postback>"
    )
}

/// Subjects received on `path`, sorted, repeats kept.
fn subjects(sink: &Sink, path: &str) -> Vec<String> {
    let mut all: Vec<String> = sink.received_on(path).iter().map(subject).collect();
    all.sort();
    all
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut items: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
    items.sort();
    items
}

// 1. Routing, fan-out and `continue`.
#[tokio::test]
async fn routes_fan_out_and_continue() {
    let sink = Sink::start().await;
    let targets = ["optout", "inbox", "audit", "receipts", "archive"]
        .iter()
        .map(|name| format!("  {name}: {{url: \"{}\"}}\n", sink.url(&format!("/{name}"))))
        .collect::<String>();
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n{targets}routes:
  - name: stop
    match: {{keyword: [STOP, End]}}
    targets: [optout]
  - name: shortcode
    match: {{to: \"+28444\", origin: mms_mo}}
    targets: [inbox, audit]
    continue: true
  - name: receipts
    match: {{origin: MMS_MT, code: [N101, n102]}}
    targets: [receipts]
  - name: everything
    targets: [audit, archive, audit]
"
    ))
    .await;

    // Keyword match is case-insensitive, and the first match wins even though
    // `shortcode` would match too.
    accept(&relay, &mo_xml("stop-1", "stop", "28444")).await;
    accept(&relay, &mo_xml("end-1", "eNd", "99999")).await;
    // `shortcode` (to without `+`) continues into `everything`; audit is named
    // by both routes and receives once.
    accept(&relay, &mo_xml("short-1", "hello", "28444")).await;
    // Origin and code (case-insensitive); `receipts` does not continue.
    accept(&relay, &mt_xml("receipt-1", "N102")).await;
    // Neither keyword, short code nor receipt code: the catch-all.
    accept(&relay, &mt_xml("failed-1", "E101")).await;
    accept(&relay, &mo_xml("other-1", "hello", "12345")).await;

    let expected: BTreeMap<&str, Vec<String>> = [
        ("/optout", sorted(&["stop-1", "end-1"])),
        ("/inbox", sorted(&["short-1"])),
        ("/audit", sorted(&["short-1", "failed-1", "other-1"])),
        ("/receipts", sorted(&["receipt-1"])),
        ("/archive", sorted(&["short-1", "failed-1", "other-1"])),
    ]
    .into_iter()
    .collect();
    for (path, subjects) in &expected {
        sink.wait_for(path, subjects.len(), WAIT).await;
    }
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    // Nothing more arrives later (no second copy for audit, no stray target).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (path, wanted) in &expected {
        assert_eq!(&subjects(&sink, path), wanted, "deliveries on {path}");
    }
    assert_eq!(
        sink.received().len(),
        expected.values().map(Vec::len).sum::<usize>(),
        "requests on paths no route names"
    );
    assert!(dead_letters(&relay).is_empty());
    relay.shutdown().await;
}

// 2. No route: acknowledged, delivered nowhere, kept as a dead letter.
#[tokio::test]
async fn a_postback_without_route_is_kept_as_dead_letter() {
    let sink = Sink::start().await;
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - match: {{code: N999}}\n    targets: [inbox]\n",
        sink.url("/inbox")
    ))
    .await;
    let id = accept(&relay, &mo_xml("lonely-1", "hello", "28444")).await;

    // Kept once moved in from the intake journal (milliseconds).
    eventually_int(&relay, "SELECT COUNT(*) FROM dead_letters", 1).await;
    let dead = dead_letters(&relay);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event_id, id);
    assert_eq!(dead[0].target, "(no route)");
    assert_eq!(dead[0].reason, "no route");
    assert_eq!(int(&relay, "SELECT COUNT(*) FROM jobs"), 0);
    // The body is kept with the dead letter.
    assert_eq!(
        int(
            &relay,
            &format!("SELECT COUNT(*) FROM events WHERE id = '{id}'")
        ),
        1
    );

    // Gauges refresh every 2 s.
    eventually(Duration::from_secs(6), "dead letter gauge = 1", || async {
        let value = metric(&relay, "relay_dead_letters", &[("target", "(no route)")]).await;
        (value == Some(1.0)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sink.received().is_empty(), "delivered although unrouted");
    relay.shutdown().await;
}

#[tokio::test]
async fn a_slow_target_does_not_hold_up_a_fast_one() {
    const N: usize = 5;
    let sink = Sink::start().await;
    sink.respond(|_, received| {
        let mut reply = Reply::status(200);
        if received.path == "/slow" {
            reply.delay = Duration::from_secs(3);
        }
        reply
    });
    let relay = start_relay(&format!(
        "{DELIVERY}targets:\n  slow: {{url: \"{}\", timeout: 5s}}\n  fast: {{url: \"{}\"}}\nroutes:\n  - targets: [slow, fast]\n",
        sink.url("/slow"),
        sink.url("/fast"),
    ))
    .await;
    let mut ids = BTreeSet::new();
    for n in 0..N {
        ids.insert(accept(&relay, &mo_xml(&format!("iso-{n}"), "hello", "28444")).await);
    }
    sink.wait_for("/fast", N, WAIT).await;
    eventually_int(&relay, "SELECT COUNT(*) FROM jobs WHERE target = 'fast'", 0).await;
    // The fast target is done while the slow one still holds every job.
    assert_eq!(
        int(&relay, "SELECT COUNT(*) FROM jobs WHERE target = 'slow'"),
        N as i64,
        "slow target finished before the fast one"
    );
    // Ingest still answers while the slow deliveries hang.
    ids.insert(accept(&relay, &mo_xml("iso-late", "hello", "28444")).await);
    sink.wait_for("/fast", N + 1, WAIT).await;
    assert!(int(&relay, "SELECT COUNT(*) FROM jobs WHERE target = 'slow'") > 0);

    eventually_int(&relay, "SELECT COUNT(*) FROM jobs", 0).await;
    for path in ["/fast", "/slow"] {
        let got: BTreeSet<String> = sink
            .received_on(path)
            .iter()
            .map(|r| r.json()["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, ids, "deliveries on {path}");
        assert_eq!(sink.received_on(path).len(), N + 1, "no retries on {path}");
    }
    assert!(dead_letters(&relay).is_empty());
    relay.shutdown().await;
}
