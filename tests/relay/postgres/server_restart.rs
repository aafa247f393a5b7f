//! The PostgreSQL server stopped and started under load: the relay answers
//! 503 meanwhile and loses nothing acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::pg::{Cluster, TestDatabase};
use crate::common::process::*;
use crate::common::*;

use super::{duplicates, instance_config, readyz, spawn_all, write, DELIVERY};

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
