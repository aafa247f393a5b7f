//! Several relay instances sharing one PostgreSQL database, always against a
//! real server: three processes with one SIGKILLed under load, a PostgreSQL
//! server stopped and started under load, one postback sent to two instances
//! at once, and the store itself (concurrent migrations, leases).
//!
//! Each test makes its own database on `RELAY_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and drops it at the end; the
//! restart test runs its own throwaway cluster (initdb and pg_ctl, as the
//! `postgres` OS user when run as root) on a random port.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::pg::{Cluster, TestDatabase};
use crate::common::process::*;
use crate::common::*;
use bytes::Bytes;
use postback_relay::clock::now_ms;
use postback_relay::store::{
    Acceptance, NewPostback, OperatorStore, Outcome, PostgresOptions, PostgresStore, Store,
};
use sha2::Digest;

/// Quick retries, enough attempts that nothing is given up during a test, and
/// a delivery timeout well inside the lease.
const DELIVERY: &str =
    "delivery:\n  backoff: {initial: 50ms, max: 200ms}\n  max_attempts: 1000\n  timeout: 2s\n";

/// Config for one instance on database `url`: ephemeral ports, `store_extra`
/// under `store:`, then `rest`.
fn instance_config(url: &str, store_extra: &str, rest: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nstore:\n  backend: postgres\n  url: \"{url}\"\n{store_extra}{rest}\n"
    )
}

/// Writes `yaml` to `dir/name` and returns the path.
fn write(dir: &std::path::Path, name: &str, yaml: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write config");
    path
}

/// Starts the processes at once (their migrations race for the lock).
async fn spawn_all(configs: &[std::path::PathBuf]) -> Vec<RelayProcess> {
    let starts: Vec<_> = configs
        .iter()
        .map(|config| {
            let config = config.clone();
            tokio::task::spawn_blocking(move || RelayProcess::start(&config))
        })
        .collect();
    let mut relays = Vec::new();
    for start in starts {
        relays.push(start.await.expect("start task"));
    }
    relays
}

/// Tracking id → deliveries, and the instance (`x-instance` header) and
/// arrival of each delivery.
fn deliveries(sink: &Sink) -> BTreeMap<String, Vec<(String, Instant)>> {
    let mut by_id: BTreeMap<String, Vec<(String, Instant)>> = BTreeMap::new();
    for request in sink.received() {
        let tracking_id = request.json()["data"]["tracking_id"]
            .as_str()
            .expect("tracking id")
            .to_owned();
        let instance = request.header("x-instance").unwrap_or("?").to_owned();
        by_id
            .entry(tracking_id)
            .or_default()
            .push((instance, request.at));
    }
    by_id
}

fn counts(deliveries: &BTreeMap<String, Vec<(String, Instant)>>) -> BTreeMap<String, usize> {
    deliveries
        .iter()
        .map(|(id, attempts)| (id.clone(), attempts.len()))
        .collect()
}

fn duplicates(counts: &BTreeMap<String, usize>) -> usize {
    counts.values().map(|n| n - 1).sum()
}

async fn readyz(admin: std::net::SocketAddr) -> u16 {
    let client = http_client();
    let request = hyper::Request::get(format!("http://{admin}/readyz"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), client.request(request)).await {
        Ok(Ok(response)) => response.status().as_u16(),
        _ => 0,
    }
}

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
// PostgreSQL stopped and started under load
// ---------------------------------------------------------------------------

/// What the restart test's senders saw.
#[derive(Default)]
struct Books {
    acknowledged: BTreeMap<String, String>,
    refused: usize,
    slowest_refusal: Duration,
    no_answer: usize,
    other: Vec<String>,
}

/// Posts distinct postbacks serially; a 503 (or no answer) is retried with
/// the same postback, as Sinch does, until stopped.
async fn patient_sender(
    url: String,
    prefix: String,
    stop: Arc<AtomicBool>,
    books: Arc<Mutex<Books>>,
) {
    let client = http_client();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let tracking_id = format!("{prefix}-{n}");
        let result = try_post(&client, &url, mo_xml(&tracking_id, "hello", "28444")).await;
        let answered = {
            let mut books = books.lock().unwrap();
            match result {
                Ok(answer) if answer.status == 200 => {
                    let id = answer.json["id"].as_str().unwrap_or_default().to_owned();
                    books.acknowledged.insert(tracking_id, id);
                    true
                }
                Ok(answer) if answer.status == 503 => {
                    books.refused += 1;
                    books.slowest_refusal = books.slowest_refusal.max(answer.elapsed);
                    false
                }
                Ok(answer) => {
                    let line = format!("{tracking_id}: {} {}", answer.status, answer.json);
                    books.other.push(line);
                    false
                }
                Err(no_answer) => {
                    books.no_answer += 1;
                    books
                        .other
                        .push(format!("{tracking_id}: {}", no_answer.message));
                    false
                }
            }
        };
        if answered {
            n += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_answers_503_meanwhile_and_loses_nothing() {
    bounded(Duration::from_secs(150), "the restart test", async {
        let password = "restart-test-secret";
        let cluster = tokio::task::spawn_blocking(move || Cluster::start_with_password(password))
            .await
            .unwrap();
        let cluster = Arc::new(cluster);
        let db = TestDatabase::create_on(&cluster.admin_url());
        let dir = tempfile::tempdir().unwrap();
        // The relays get the password from a file, never from the URL.
        let password_file = dir.path().join("db-password");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        let url = crate::common::pg::with_database(&cluster.url(), &db.name);
        let sink = Sink::start().await;
        let configs: Vec<_> = ["a", "b"]
            .iter()
            .map(|name| {
                let rest = format!(
                    "{DELIVERY}targets:\n  inbox: {{url: \"{}\", headers: {{x-instance: {name}}}}}\n\
                     routes:\n  - targets: [inbox]\n",
                    sink.url("/inbox")
                );
                let store = format!("  password: {{file: {}}}\n", password_file.display());
                write(dir.path(), &format!("relay-{name}.yaml"), &instance_config(&url, &store, &rest))
            })
            .collect();
        let relays = spawn_all(&configs).await;

        let stop = Arc::new(AtomicBool::new(false));
        let books = Arc::new(Mutex::new(Books::default()));
        let senders: Vec<_> = relays
            .iter()
            .enumerate()
            .flat_map(|(i, relay)| {
                (0..2).map({
                    let (stop, books) = (stop.clone(), books.clone());
                    let url = relay.url.clone();
                    move |s| tokio::spawn(patient_sender(url.clone(), format!("r{i}-s{s}"), stop.clone(), books.clone()))
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let before = books.lock().unwrap().acknowledged.len();
        assert!(before > 0, "nothing acknowledged before the restart");

        // Down: both instances refuse at once and say they are not ready.
        let stopping = cluster.clone();
        tokio::task::spawn_blocking(move || stopping.stop()).await.unwrap();
        let down_at = Instant::now();
        let refused_before = books.lock().unwrap().refused;
        eventually(Duration::from_secs(10), "both instances unready while PostgreSQL is down", || {
            let admins: Vec<_> = relays.iter().map(|r| r.admin).collect();
            async move {
                for admin in admins {
                    if readyz(admin).await != 503 {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
        let acknowledged_when_down = books.lock().unwrap().acknowledged.len();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (refused_while_down, acknowledged_while_down) = {
            let books = books.lock().unwrap();
            (
                books.refused - refused_before,
                books.acknowledged.len() - acknowledged_when_down,
            )
        };
        assert!(refused_while_down > 0, "no 503 while PostgreSQL was down");
        assert_eq!(acknowledged_while_down, 0, "a 200 while PostgreSQL was down");

        // Up again: both recover by themselves.
        let starting = cluster.clone();
        tokio::task::spawn_blocking(move || starting.start_server()).await.unwrap();
        let up_at = Instant::now();
        eventually(Duration::from_secs(20), "both instances ready again", || {
            let admins: Vec<_> = relays.iter().map(|r| r.admin).collect();
            async move {
                for admin in admins {
                    if readyz(admin).await != 200 {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await;
        let recovered_in = up_at.elapsed();
        let after_restart = books.lock().unwrap().acknowledged.len();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.store(true, Ordering::SeqCst);
        for sender in senders {
            tokio::time::timeout(Duration::from_secs(20), sender)
                .await
                .expect("sender ends")
                .expect("sender task");
        }
        let books = std::mem::take(&mut *books.lock().unwrap());
        assert!(
            books.acknowledged.len() > after_restart,
            "nothing acknowledged after the restart"
        );
        assert!(
            books.slowest_refusal < Duration::from_secs(3),
            "a 503 took {:?}: a store that is down must fail fast",
            books.slowest_refusal
        );
        let received = wait_for_all(&sink, &books.acknowledged, Duration::from_secs(60)).await;
        println!(
            "postgres restart: {} acknowledged ({before} in the first second, none while down, {} \
             after the restart), {} answered 503 (slowest {:?}), {} without an answer; down {:?}, \
             both ready again {:?} after the start; {} deliveries, {} duplicates; other answers: {:?}",
            books.acknowledged.len(),
            books.acknowledged.len() - after_restart,
            books.refused,
            books.slowest_refusal,
            books.no_answer,
            up_at.duration_since(down_at),
            recovered_in,
            received.values().sum::<usize>(),
            duplicates(&received),
            books.other
        );
        for relay in relays {
            let (status, lines) =
                tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));
            assert!(status.success(), "exit {status}:\n{}", lines.join("\n"));
        }
        drop(db);
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

// ---------------------------------------------------------------------------
// The store itself
// ---------------------------------------------------------------------------

fn options(url: &str) -> PostgresOptions {
    PostgresOptions {
        url: url.to_owned(),
        password: None,
        pool_size: 4,
        lease: None,
        dedupe_window: Duration::from_secs(3600),
        quarantine: Default::default(),
        max_queued_bytes: 64 * 1024 * 1024,
        background: true,
    }
}

fn postback(tracking_id: &str, targets: &[&str]) -> NewPostback {
    NewPostback {
        id: ulid::Ulid::generate().to_string(),
        dedupe_key: format!("MMS_MO|N401|{tracking_id}"),
        received_at_ms: now_ms(),
        envelope: Bytes::from(format!("{{\"subject\":\"{tracking_id}\"}}")),
        raw_body: Bytes::from_static(b"<postback/>"),
        content_type: Some("text/xml".into()),
        targets: targets.iter().map(|t| t.to_string()).collect(),
        tracking_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_opening_at_once_migrate_once() {
    let db = TestDatabase::create();
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let options = options(&db.url);
            tokio::spawn(async move { PostgresStore::open(options).await })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap().expect("every instance opens"));
    }
    assert_eq!(
        db.query("SELECT version FROM schema_migrations ORDER BY version"),
        vec![
            vec![rusqlite::types::Value::Integer(1)],
            vec![rusqlite::types::Value::Integer(2)],
            vec![rusqlite::types::Value::Integer(3)]
        ],
        "each schema version applied once"
    );
    for store in &stores {
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_a_dead_instance_runs_out_and_another_takes_the_job() {
    let db = TestDatabase::create();
    // A server that does not flush commits by default: the store asks for
    // the flush itself when it acknowledges.
    db.execute(
        &format!("ALTER DATABASE {} SET synchronous_commit TO off", db.name),
        Vec::new(),
    );
    let first = PostgresStore::open(options(&db.url)).await.unwrap();
    let second = PostgresStore::open(options(&db.url)).await.unwrap();
    let accepted = postback("lease-1", &["inbox", "archive"]);
    assert_eq!(
        first.accept(accepted.clone(), None).await.unwrap(),
        Acceptance::Accepted
    );
    // A copy through the other instance is a duplicate of the first.
    let mut copy = postback("lease-1", &["inbox", "archive"]);
    copy.received_at_ms = accepted.received_at_ms;
    assert_eq!(
        second.accept(copy, None).await.unwrap(),
        Acceptance::Duplicate {
            original_id: accepted.id.clone()
        }
    );

    let lease = Duration::from_millis(1500);
    let claimed = first.claim("inbox", 10, lease).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event_id, accepted.id);
    assert_eq!(&claimed[0].envelope[..], &accepted.envelope[..]);
    // The first instance "dies" holding the lease: nobody else gets the job
    // until the lease has run out.
    first.close().await.unwrap();
    drop(first);
    let leased_at = Instant::now();
    assert!(second.claim("inbox", 10, lease).await.unwrap().is_empty());
    let taken = loop {
        let jobs = second.claim("inbox", 10, lease).await.unwrap();
        if !jobs.is_empty() {
            break jobs;
        }
        assert!(
            leased_at.elapsed() < Duration::from_secs(10),
            "the lease never ran out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(leased_at.elapsed() + Duration::from_millis(100) >= lease);
    assert_eq!(taken[0].id, claimed[0].id);

    // Finishing the last job of an event deletes its bodies; a dead letter
    // keeps them.
    second
        .complete(vec![(taken[0].id, Outcome::Delivered)])
        .await
        .unwrap();
    assert_eq!(
        db.query("SELECT COUNT(*) FROM events")[0][0],
        rusqlite::types::Value::Integer(1),
        "the archive job still needs the event"
    );
    let archive = second.claim("archive", 10, lease).await.unwrap();
    second
        .complete(vec![(
            archive[0].id,
            Outcome::Dead {
                reason: "rejected by target".into(),
                status: Some(410),
                error: "gone\0with a NUL".into(),
            },
        )])
        .await
        .unwrap();
    assert_eq!(
        db.query("SELECT COUNT(*) FROM events")[0][0],
        rusqlite::types::Value::Integer(1),
        "the dead letter keeps the event"
    );
    let stats = second.stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(
        (stats[0].target.as_str(), stats[0].pending, stats[0].dead),
        ("archive", 0, 1)
    );
    second.close().await.unwrap();
}

#[test]
fn a_relay_whose_database_is_unreachable_does_not_start_and_says_why() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://relay:hunter2@127.0.0.1:{port}/relay");
    let config = write(dir.path(), "relay.yaml", &instance_config(&url, "", ""));
    let started = Instant::now();
    let (status, _, stderr) = run_to_end(
        &["run", "--config", config.to_str().unwrap()],
        Duration::from_secs(20),
    );
    assert!(!status.success(), "started without its database");
    assert!(
        stderr.contains(&format!(
            "cannot open the store (postgres 127.0.0.1:{port}/relay"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the password was logged: {stderr}"
    );
    assert!(!stderr.contains("listening"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_through_one_instance_holds_for_the_others() {
    bounded(Duration::from_secs(60), "the shared pause test", async {
        let db = TestDatabase::create();
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::start().await;
        let token = dir.path().join("token");
        std::fs::write(&token, "shared-admin-token-0123456789").unwrap();
        let rest = format!(
            "{DELIVERY}admin: {{token_file: {}}}\ntargets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
            token.display(),
            sink.url("/inbox")
        );
        let mut relays = Vec::new();
        for name in ["a", "b"] {
            let path = write(dir.path(), &format!("{name}.yaml"), &instance_config(&db.url, "", &rest));
            let config = postback_relay::config::Config::load(&path).unwrap();
            relays.push(postback_relay::relay::start(config).await.unwrap());
        }
        let admin = |i: usize| format!("http://{}", relays[i].admin_addr);
        let paused_on = |i: usize| {
            let url = format!("{}/metrics", admin(i));
            async move {
                let (_, text) = get(&url).await;
                metric_value(&text, r#"relay_target_paused{target="inbox"}"#)
            }
        };
        let control = |i: usize, action: &'static str| {
            let url = format!("{}/api/v1/targets/inbox/{action}", admin(i));
            async move {
                let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
                    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                        .build(hyper_util::client::legacy::connect::HttpConnector::new());
                let request = hyper::Request::post(url)
                    .header("authorization", "Bearer shared-admin-token-0123456789")
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
                let response = client.request(request).await.unwrap();
                assert_eq!(response.status(), 200);
            }
        };

        control(0, "pause").await;
        eventually(Duration::from_secs(10), "b sees a's pause", || async {
            (paused_on(1).await == Some(1.0)).then_some(())
        })
        .await;
        let url_b = format!("http://{}/sinch/postback", relays[1].ingest_addr);
        for i in 0..3 {
            let (status, _) = post(&url_b, None, mo_xml(&format!("SP-{i}"), "hi", "28444")).await;
            assert_eq!(status, 200);
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(sink.received_count(), 0, "paused on every instance");

        control(1, "resume").await;
        eventually(Duration::from_secs(10), "a sees b's resume", || async {
            (paused_on(0).await == Some(0.0)).then_some(())
        })
        .await;
        sink.wait_for("/inbox", 3, Duration::from_secs(10)).await;
        for relay in relays {
            relay.shutdown().await.unwrap();
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// One postback's trouble stays its own (a refused row, a failed commit, a
// stalled server, the server's flush setting)
// ---------------------------------------------------------------------------

/// A relay in this process on database `db`, delivering everything to the
/// sink's `/inbox`; `store_extra` adds `store:` keys.
async fn relay_on(db: TestDatabase, sink: &Sink, store_extra: &str) -> TestRelay {
    let store = TestStore {
        dir: tempfile::tempdir().expect("temp dir"),
        db: Some(db),
        store_extra: store_extra.to_owned(),
    };
    // These tests post 30 postbacks at once, each on its own connection
    // from 127.0.0.1: above the per-source cap of 8.
    let rest = format!(
        "{DELIVERY}ingest: {{max_connections_per_source: 64}}\ntargets:\n  inbox: {{url: \"{}\"}}\nroutes:\n  - targets: [inbox]\n",
        sink.url("/inbox")
    );
    start_relay_in(store, &rest).await
}

/// The relay's database URL.
fn db_url(relay: &TestRelay) -> String {
    relay
        .store
        .db
        .as_ref()
        .expect("a PostgreSQL store")
        .url
        .clone()
}

/// Waits until `sql` (one integer) is at least `at_least`, on `client`.
async fn until_at_least(client: &tokio_postgres::Client, sql: &str, at_least: i64) {
    eventually(Duration::from_secs(10), sql, || async {
        let got: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        (got >= at_least).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_refuses_is_answered_400_and_quarantined_while_its_batch_commits() {
    bounded(Duration::from_secs(90), "the refused-row test", async {
        // A LATIN1 database cannot hold a CJK tracking id: PostgreSQL refuses
        // the row (SQLSTATE 22P05) whatever the relay does with it. An
        // 8,000-character tracking id (beyond a btree entry) rides along.
        let db = TestDatabase::create_with(
            "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        );
        let sink = Sink::start().await;
        let relay = relay_on(db, &sink, "").await;
        const GOOD: usize = 30;
        let bad = mo_xml("東京-1", "hello", "28444");
        let long: String = (0..125u32)
            .map(|n| hex::encode(sha2::Sha256::digest(n.to_le_bytes())))
            .collect();
        let mut bodies: Vec<(String, String)> = (0..GOOD - 1)
            .map(|n| {
                let id = format!("batch-{n}");
                (id.clone(), mo_xml(&id, "hello", "28444"))
            })
            .collect();
        bodies.push((long.clone(), mo_xml(&long, "hello", "28444")));
        bodies.insert(GOOD / 2, ("bad".into(), bad.clone()));
        let client = http_client();
        let tasks: Vec<_> = bodies
            .into_iter()
            .map(|(id, body)| {
                let (client, url) = (client.clone(), relay.url.clone());
                tokio::spawn(async move { (id, try_post(&client, &url, body).await) })
            })
            .collect();
        let mut accepted = BTreeSet::new();
        for task in tasks {
            let (id, answer) = task.await.unwrap();
            let answer = answer.unwrap_or_else(|err| panic!("{id}: no answer: {err:?}"));
            if id == "bad" {
                assert_eq!(answer.status, 400, "the refused postback: {answer:?}");
                let error = answer.json["error"].as_str().unwrap_or_default();
                assert!(error.contains("22P05"), "the database's reason: {error}");
            } else {
                assert_eq!(answer.status, 200, "{id}: {answer:?}");
                assert_eq!(answer.json["status"], "accepted", "{id}: {answer:?}");
                accepted.insert(id);
            }
        }
        assert_eq!(accepted.len(), GOOD);

        // Nothing lost: the refused body is in the quarantine with the
        // database's error, and a retry is refused the same way (never 503).
        let rows = relay.query("SELECT error, body, seen_count FROM quarantine");
        assert_eq!(rows.len(), 1, "{rows:?}");
        let rusqlite::types::Value::Text(error) = &rows[0][0] else {
            panic!("{rows:?}")
        };
        assert!(error.contains("22P05"), "{error}");
        assert_eq!(
            rows[0][1],
            rusqlite::types::Value::Blob(bad.clone().into_bytes())
        );
        let again = try_post(&client, &relay.url, bad).await.expect("an answer");
        assert_eq!(again.status, 400, "{again:?}");
        assert_eq!(
            relay.store.query_int("SELECT seen_count FROM quarantine"),
            2
        );
        assert_eq!(
            readyz(relay.handle.as_ref().unwrap().admin_addr).await,
            200,
            "one refused postback does not make the store unready"
        );

        eventually(
            Duration::from_secs(30),
            "every accepted postback delivered",
            || {
                let got: BTreeSet<String> = deliveries(&sink).into_keys().collect();
                let done = got == accepted;
                async move { done.then_some(()) }
            },
        )
        .await;
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_its_original_is_acknowledged_only_once_something_is_committed() {
    bounded(Duration::from_secs(90), "the racing-retry test", async {
        let sink = Sink::start().await;
        let relay = relay_on(TestDatabase::create(), &sink, "").await;
        let admin = crate::common::pg::connect(&db_url(&relay)).await;
        // Every commit of an event takes a second (a deferred trigger runs
        // at COMMIT) and fails as `test_fail` says: all of them, or only the
        // first one (a sequence is not rolled back with its transaction).
        admin
            .batch_execute(
                r#"
CREATE SEQUENCE test_commits;
CREATE TABLE test_fail (mode TEXT NOT NULL);
CREATE FUNCTION test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE m TEXT;
BEGIN
    PERFORM pg_sleep(1);
    SELECT mode INTO m FROM test_fail;
    IF m = 'all' OR (m = 'first' AND nextval('test_commits') = 1) THEN
        RAISE EXCEPTION 'commit made to fail by the test';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER test_slow_commit AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_slow_commit();
"#,
            )
            .await
            .expect("install the trigger");
        let client = http_client();
        // The original is sent; once its COMMIT is under way, the retry.
        // The retry must be seen waiting for the original's key.
        let race = |tracking_id: &'static str| {
            let (client, url, admin) = (client.clone(), relay.url.clone(), &admin);
            async move {
                let body = mo_xml(tracking_id, "hello", "28444");
                let original = {
                    let (client, url, body) = (client.clone(), url.clone(), body.clone());
                    tokio::spawn(async move { try_post(&client, &url, body).await })
                };
                until_at_least(
                    admin,
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event = 'PgSleep'",
                    1,
                )
                .await;
                let retry = tokio::spawn(async move { try_post(&client, &url, body).await });
                until_at_least(
                    admin,
                    "SELECT COUNT(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    1,
                )
                .await;
                let original = original.await.unwrap().expect("original answered");
                let retry = retry.await.unwrap().expect("retry answered");
                (original, retry)
            }
        };
        let key_count = |tracking_id: &str| {
            relay.store.query_int(&format!(
                "SELECT COUNT(*) FROM dedupe WHERE key = 'MMS_MO|N401|{tracking_id}'"
            ))
        };

        // Every commit fails: neither is acknowledged.
        admin
            .batch_execute("INSERT INTO test_fail VALUES ('all')")
            .await
            .unwrap();
        let (original, retry) = race("race-all").await;
        assert_eq!(original.status, 503, "{original:?}");
        assert_eq!(
            retry.status, 503,
            "the retry of a postback whose commit failed: {retry:?}"
        );
        assert!(retry.retry_after.is_some(), "{retry:?}");
        assert_eq!(key_count("race-all"), 0);

        // Only the original's commit fails: the retry is committed on its
        // own and acknowledged as the original (not as a duplicate of an id
        // that is on no disk).
        admin
            .batch_execute("UPDATE test_fail SET mode = 'first'")
            .await
            .unwrap();
        let (original, retry) = race("race-first").await;
        assert_eq!(original.status, 503, "{original:?}");
        assert_eq!(retry.status, 200, "{retry:?}");
        assert_eq!(retry.json["status"], "accepted", "{retry:?}");
        let retry_id = retry.json["id"].as_str().unwrap().to_owned();
        assert_eq!(
            relay.query("SELECT event_id FROM dedupe WHERE key = 'MMS_MO|N401|race-first'"),
            vec![vec![rusqlite::types::Value::Text(retry_id)]],
            "the retry owns the key"
        );

        // Both commit: the retry is a duplicate naming the original, which
        // is committed by the time the retry is answered.
        admin.batch_execute("DELETE FROM test_fail").await.unwrap();
        let (original, retry) = race("race-none").await;
        assert_eq!(original.status, 200, "{original:?}");
        assert_eq!(original.json["status"], "accepted", "{original:?}");
        let original_id = original.json["id"].as_str().unwrap().to_owned();
        assert_eq!(retry.status, 200, "{retry:?}");
        assert_eq!(
            retry.json,
            serde_json::json!({"status": "duplicate", "id": original_id})
        );
        assert_eq!(key_count("race-none"), 1);

        eventually(
            Duration::from_secs(30),
            "both acknowledged postbacks delivered",
            || {
                let got = counts(&deliveries(&sink));
                async move { (got.len() == 2).then_some(got) }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = counts(&deliveries(&sink));
        assert_eq!(
            got,
            BTreeMap::from([("race-first".to_owned(), 1), ("race-none".to_owned(), 1)]),
            "each acknowledged postback once, the unacknowledged one never"
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_fills_the_byte_bounded_queue_and_the_rest_get_a_fast_503() {
    bounded(Duration::from_secs(90), "the queue-bound test", async {
        const SENT: usize = 30;
        let sink = Sink::start().await;
        // About 120 kB a postback (body and envelope): a handful fit.
        let relay = relay_on(
            TestDatabase::create(),
            &sink,
            "  max_queued_bytes: 400000\n",
        )
        .await;
        let admin = crate::common::pg::connect(&db_url(&relay)).await;
        admin
            .batch_execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock events");
        let padding = "p".repeat(60_000);
        let body = |n: usize| mo_xml(&format!("big-{n}"), &padding, "28444");
        let client = http_client();
        let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..SENT {
            let (client, url, body, answers) =
                (client.clone(), relay.url.clone(), body(n), answers.clone());
            tokio::spawn(async move {
                let answer = try_post(&client, &url, body).await;
                let _ = answers.send((n, answer));
            });
        }
        // While the table is locked (and well before the store's own 5 s
        // limit on a statement), the postbacks beyond the bound are answered.
        let mut while_locked = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(4), async {
            while while_locked.len() < SENT - 10 {
                match answered.recv().await {
                    Some(answer) => while_locked.push(answer),
                    None => break,
                }
            }
        })
        .await;
        admin.batch_execute("ROLLBACK").await.expect("unlock");
        assert!(
            while_locked.len() >= SENT - 10,
            "only {} of {SENT} answered while the database was stalled",
            while_locked.len()
        );
        let mut refused = BTreeSet::new();
        for (n, answer) in &while_locked {
            let answer = answer.as_ref().expect("an answer");
            assert_eq!(answer.status, 503, "big-{n} while stalled: {answer:?}");
            assert!(answer.retry_after.is_some(), "{answer:?}");
            refused.insert(*n);
        }
        // The queued ones are committed once the lock is gone.
        let mut acknowledged = BTreeSet::new();
        while refused.len() + acknowledged.len() < SENT {
            let (n, answer) = answered.recv().await.expect("every request answers");
            let answer = answer.expect("an answer");
            match answer.status {
                200 => acknowledged.insert(n),
                503 => refused.insert(n),
                other => panic!("big-{n}: {other} {answer:?}"),
            };
        }
        assert!(!acknowledged.is_empty(), "the queue itself was committed");
        // Sinch sends the refused ones again: now they are accepted.
        for n in refused.clone() {
            let answer = try_post(&client, &relay.url, body(n))
                .await
                .expect("answer");
            assert_eq!(answer.status, 200, "big-{n} again: {answer:?}");
        }
        let expected: BTreeSet<String> = (0..SENT).map(|n| format!("big-{n}")).collect();
        eventually(Duration::from_secs(30), "every postback delivered", || {
            let got: BTreeSet<String> = deliveries(&sink).into_keys().collect();
            let done = got == expected;
            async move { done.then_some(()) }
        })
        .await;
        println!(
            "{SENT} postbacks of ~120 kB against a locked table with a 400 kB queue: {} queued \
             and acknowledged after the unlock, {} refused at once",
            acknowledged.len(),
            SENT - acknowledged.len()
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_are_flushed_even_when_new_connections_default_to_asynchronous_commit() {
    bounded(
        Duration::from_secs(90),
        "the synchronous_commit test",
        async {
            let db = TestDatabase::create();
            let name = db.name.clone();
            let sink = Sink::start().await;
            let relay = relay_on(db, &sink, "").await;
            let admin = crate::common::pg::connect(&db_url(&relay)).await;
            // Record the setting each event is committed under.
            admin
                .batch_execute(
                    r#"
CREATE TABLE test_sync (setting TEXT NOT NULL);
CREATE FUNCTION test_record_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_sync VALUES (current_setting('synchronous_commit'));
    RETURN NULL;
END $$;
CREATE TRIGGER test_record_sync AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION test_record_sync();
"#,
                )
                .await
                .unwrap();
            // After the relay opened, the database's default turns off, and the
            // relay's connections are replaced by new ones that get it.
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE {name} SET synchronous_commit = off;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid();"
                ))
                .await
                .unwrap();
            let fresh = crate::common::pg::connect(&db_url(&relay)).await;
            let default: String = fresh
                .query_one("SHOW synchronous_commit", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(default, "off", "new connections get the database's default");

            let client = http_client();
            for n in 0..5 {
                let body = mo_xml(&format!("sync-{n}"), "hello", "28444");
                eventually(
                    Duration::from_secs(15),
                    "accepted on new connections",
                    || {
                        let (client, url, body) = (client.clone(), relay.url.clone(), body.clone());
                        async move {
                            let answer = try_post(&client, &url, body).await.ok()?;
                            (answer.status == 200).then_some(())
                        }
                    },
                )
                .await;
            }
            let settings = relay.query("SELECT setting FROM test_sync ORDER BY setting");
            assert_eq!(settings.len(), 5, "{settings:?}");
            for setting in &settings {
                assert_eq!(
                    setting[0],
                    rusqlite::types::Value::Text("on".into()),
                    "every accept commits with synchronous_commit on: {settings:?}"
                );
            }
            relay.shutdown().await;
        },
    )
    .await;
}
