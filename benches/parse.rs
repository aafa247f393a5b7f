//! Micro-benchmarks of the CPU work on the ingest path (issue 4): a body to
//! the envelope JSON targets receive, for the XML and JSON seeds, and the
//! router on a 10-route table. `cargo bench --bench parse`; the numbers are
//! in docs/performance.md ("Micro-benchmarks").

use std::hint::black_box;

use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use figment::providers::{Format, Yaml};
use postback_relay::config::Config;
use postback_relay::envelope::Envelope;
use postback_relay::postback;
use postback_relay::routing::Router;

const SEED_XML: &[u8] = include_bytes!("../tests/fixtures/seed-mo.xml");
const SEED_JSON: &[u8] = include_bytes!("../tests/fixtures/seed-mo.json");

/// Ten routes, the seed (keyword `all`, to 28444, MMS_MO N401) matches the
/// 8th (which continues) and the catch-all: most routes are evaluated and
/// miss, as in a real table.
const ROUTES: &str = r#"
routes:
  - name: opt-outs
    match: {keyword: [STOP, END, QUIT, CANCEL, UNSUBSCRIBE]}
    targets: [optout]
  - name: help
    match: {keyword: [HELP, INFO]}
    targets: [support]
  - name: receipts
    match: {origin: MMS_MT, code: [N101, N102, N103]}
    targets: [receipts]
  - name: failures
    match: {origin: MMS_MT, code: [E101, E102, E999]}
    targets: [receipts, alerts]
  - name: sms
    match: {origin: [SMS_MO, SMS_MT]}
    targets: [sms]
  - name: campaign-12345
    match: {to: ["+12345", "12346"], origin: MMS_MO}
    targets: [campaign]
  - name: subscriptions
    match: {code: [N301, N302, N303, N304]}
    targets: [subscriptions]
  - name: campaign-28444
    match: {keyword: [ALL, PROMO], to: "28444", origin: MMS_MO}
    targets: [inbox, analytics]
    continue: true
  - name: discovery
    match: {code: [N501, N502, E501, E502]}
    targets: [devices]
  - name: everything
    targets: [archive]
"#;

fn to_envelope_json(body: &[u8]) -> Vec<u8> {
    let postback = postback::parse(body, None).expect("the seed parses");
    let received = Utc.with_ymd_and_hms(2026, 11, 27, 10, 58, 55).unwrap();
    Envelope::new(
        &postback,
        "01M8EAH0V8XSWEQ67WNYRAAZX6".to_owned(),
        "sinch:mms",
        received,
    )
    .to_json()
}

fn envelope(c: &mut Criterion) {
    let mut group = c.benchmark_group("to_envelope_json");
    for (name, body) in [("xml_seed", SEED_XML), ("json_seed", SEED_JSON)] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| b.iter(|| to_envelope_json(black_box(body))));
    }
    group.finish();
    let mut group = c.benchmark_group("parse_only");
    for (name, body) in [("xml_seed", SEED_XML), ("json_seed", SEED_JSON)] {
        group.bench_function(name, |b| {
            b.iter(|| postback::parse(black_box(body), None).unwrap())
        });
    }
    group.finish();
}

fn router(c: &mut Criterion) {
    let config: Config = figment::Figment::new()
        .merge(Yaml::string(ROUTES))
        .extract()
        .expect("route table");
    let router = Router::new(&config);
    let postback = postback::parse(SEED_XML, None).unwrap();
    let decision = router.route(&postback);
    assert_eq!(decision.routes, ["campaign-28444", "everything"]);
    c.bench_function("router/10_routes_seed", |b| {
        b.iter(|| router.route(black_box(&postback)))
    });
}

criterion_group!(benches, envelope, router);
criterion_main!(benches);
