use std::path::Path;

use bytes::Bytes;
use rusqlite::params;

use super::intake::Appended;
use super::statements::{
    claim, complete_all, CLAIM_DUE, CLAIM_EVENT, DELETE_DELIVERED, FORGET_EVENTS,
};
use super::*;
use crate::store::{Acceptance, NewPostback, Store};

#[test]
fn the_watermark_passes_a_gap_only_once_it_is_filled() {
    let start = Watermark {
        through: 10,
        ahead: BTreeSet::new(),
    };
    // 12 and 13 were moved before 11 (two requests raced to the writer).
    let early = start.with([12, 13].into_iter());
    assert_eq!(
        early.through, 10,
        "11 is not moved yet: a restart must move it"
    );
    let filled = early.with([11].into_iter());
    assert_eq!(filled.through, 13);
    assert!(filled.ahead.is_empty());
    // The original is untouched until the transaction commits.
    assert_eq!((start.through, start.ahead.len()), (10, 0));
}

/// A database with `per_target` due jobs for targets "a" and "b".
fn backlog(dir: &Path, per_target: i64) -> Connection {
    let options = SqliteOptions {
        path: dir.join("relay.db"),
        sync: SyncMode::Normal,
        busy_timeout: Duration::from_secs(1),
        dedupe_window: Duration::from_secs(60),
        min_free_bytes: 0,
        quarantine: QuarantineLimits::default(),
    };
    let mut conn = open_connection(&options.path, &options).unwrap();
    migrate(&mut conn).unwrap();
    for n in 0..per_target {
        let postback = NewPostback {
            id: format!("event-{n}"),
            dedupe_key: format!("key-{n}"),
            received_at_ms: 1_000 + n,
            envelope: Bytes::from_static(b"{}"),
            raw_body: Bytes::from_static(b"<xml/>"),
            content_type: None,
            targets: vec!["a".into(), "b".into()],
            tracking_id: None,
        };
        insert_postback(&conn, &postback, None).unwrap();
    }
    conn
}

fn event_ids(jobs: &[Job]) -> Vec<&str> {
    jobs.iter().map(|job| job.event_id.as_str()).collect()
}

#[test]
fn claims_take_the_oldest_due_jobs_and_step_over_leased_ones() {
    let dir = tempfile::tempdir().unwrap();
    let conn = backlog(dir.path(), 10);
    let mut leases = Leases::default();
    let lease = Duration::from_secs(60);
    let first = claim(&conn, &mut leases, "a", 3, lease).unwrap();
    assert_eq!(event_ids(&first), ["event-0", "event-1", "event-2"]);
    assert!(first.iter().all(|job| job.target == "a"));
    let second = claim(&conn, &mut leases, "a", 3, lease).unwrap();
    assert_eq!(
        event_ids(&second),
        ["event-3", "event-4", "event-5"],
        "leased ones are skipped"
    );
    // A rolled-back claim leaves its jobs free; a delivered job is gone
    // once its outcome commits.
    leases.rollback();
    complete_all(&conn, &mut leases, &[(first[0].id, Outcome::Delivered)]).unwrap();
    leases.commit(now_ms());
    let third = claim(&conn, &mut leases, "a", 4, lease).unwrap();
    assert_eq!(
        event_ids(&third),
        ["event-1", "event-2", "event-3", "event-4"]
    );
}

#[test]
fn a_claim_whose_lease_ran_out_is_claimed_again() {
    let dir = tempfile::tempdir().unwrap();
    let conn = backlog(dir.path(), 2);
    let mut leases = Leases::default();
    let first = claim(&conn, &mut leases, "a", 1, Duration::from_millis(1)).unwrap();
    leases.commit(now_ms());
    std::thread::sleep(Duration::from_millis(5));
    let again = claim(&conn, &mut leases, "a", 1, Duration::from_secs(60)).unwrap();
    assert_eq!(again[0].id, first[0].id, "its worker never answered");
    assert!(again[0].leased_until_ms > first[0].leased_until_ms);
}

#[test]
fn an_event_goes_once_no_job_or_dead_letter_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let conn = backlog(dir.path(), 2);
    let mut leases = Leases::default();
    let lease = Duration::from_secs(60);
    let a = claim(&conn, &mut leases, "a", 2, lease).unwrap();
    let b = claim(&conn, &mut leases, "b", 2, lease).unwrap();
    let events = |conn: &Connection| -> i64 {
        conn.query_row("SELECT COUNT(*) FROM events", [], |row| row.get(0))
            .unwrap()
    };
    complete_all(
        &conn,
        &mut leases,
        &[(a[0].id, Outcome::Delivered), (a[1].id, Outcome::Delivered)],
    )
    .unwrap();
    assert_eq!(events(&conn), 2, "target b still needs both");
    let dead = Outcome::Dead {
        reason: "rejected by target".into(),
        status: Some(410),
        error: String::new(),
    };
    complete_all(
        &conn,
        &mut leases,
        &[(b[0].id, Outcome::Delivered), (b[1].id, dead)],
    )
    .unwrap();
    assert_eq!(events(&conn), 1, "event-1 stays with its dead letter");
    let kept: String = conn
        .query_row("SELECT id FROM events", [], |row| row.get(0))
        .unwrap();
    assert_eq!(kept, "event-1");
}

#[test]
fn claim_and_outcome_statements_are_compiled_once() {
    let dir = tempfile::tempdir().unwrap();
    let conn = backlog(dir.path(), 20);
    let mut leases = Leases::default();
    for (round, target) in ["a", "b", "a", "b"].into_iter().enumerate() {
        let jobs = claim(
            &conn,
            &mut leases,
            target,
            2 + round,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(jobs.len(), 2 + round);
        let delivered: Vec<_> = jobs
            .iter()
            .map(|job| (job.id, Outcome::Delivered))
            .collect();
        complete_all(&conn, &mut leases, &delivered).unwrap();
    }
    for sql in [CLAIM_DUE, CLAIM_EVENT, DELETE_DELIVERED, FORGET_EVENTS] {
        let statement = conn.prepare_cached(sql).unwrap();
        assert_eq!(
            statement.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "{sql}"
        );
        assert!(statement.get_status(rusqlite::StatementStatus::VmStep) > 0);
    }
}

/// A fresh store's journal directory must itself survive a power cut:
/// the segment's name is made durable by an fsync of the journal
/// directory, but the journal directory's own name lives in the
/// database's directory. Runs on lossyfs (tests/lossyfs), which drops
/// every directory entry no fsync made durable; needs root and /dev/fuse.
#[test]
fn a_new_intake_journal_survives_a_power_cut_with_sync_full() {
    acknowledged_record_survives_a_power_cut("relay.db");
}

/// The same for a store whose directories the relay creates: their
/// names live in directories SQLite never fsyncs.
#[test]
fn a_new_data_directory_survives_a_power_cut_with_sync_full() {
    acknowledged_record_survives_a_power_cut("new/data/relay.db");
}

/// Opens a new store at `path` (on lossyfs), journals one postback as
/// `sync: full` does before a 200, cuts the power and reads it back.
fn acknowledged_record_survives_a_power_cut(path: &str) {
    if let Err(why) = lossyfs::prerequisites() {
        panic!("this test mounts lossyfs: {why}");
    }
    let mount = tempfile::tempdir().unwrap();
    let mut volume = lossyfs::Volume::mount(mount.path()).unwrap();
    let options = SqliteOptions {
        path: mount.path().join(path),
        ..options(mount.path(), SyncMode::Full)
    };
    create_parent_dirs(&options.path, options.sync).unwrap();
    let mut conn = open_connection(&options.path, &options).unwrap();
    migrate(&mut conn).unwrap();
    let open_intake = || {
        let dedupe = open_connection(&options.path, &options).unwrap();
        Intake::open(&options.path, SyncMode::Full, 60_000, 0, dedupe).unwrap()
    };
    let (intake, _, _) = open_intake();
    let postback = NewPostback {
        id: "event-1".into(),
        dedupe_key: "key-1".into(),
        received_at_ms: 1_000,
        envelope: Bytes::from_static(b"{}"),
        raw_body: Bytes::from_static(b"<xml/>"),
        content_type: None,
        targets: vec!["a".into()],
        tracking_id: None,
    };
    let Appended::New(seq) = intake.append(&postback).unwrap() else {
        panic!("a fresh store has no duplicate");
    };
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(intake.sync_through(seq))
        .expect("synced: the 200 would be sent now");
    // The power goes: nothing lands any more while the process dies.
    volume.freeze();
    let dying = std::thread::spawn(move || drop((intake, conn)));
    volume.power_cut().unwrap();
    dying.join().unwrap();
    let (_intake, records, _) = open_intake();
    let ids: Vec<&str> = records.iter().map(|r| r.postback.id.as_str()).collect();
    assert_eq!(ids, ["event-1"], "the acknowledged record survives the cut");
}

fn options(dir: &Path, sync: SyncMode) -> SqliteOptions {
    SqliteOptions {
        path: dir.join("relay.db"),
        sync,
        busy_timeout: Duration::from_secs(1),
        dedupe_window: Duration::from_secs(60),
        min_free_bytes: 0,
        quarantine: QuarantineLimits::default(),
    }
}

fn new_postback(id: &str, key: &str) -> NewPostback {
    NewPostback {
        id: id.into(),
        dedupe_key: key.into(),
        received_at_ms: now_ms(),
        envelope: Bytes::from_static(b"{}"),
        raw_body: Bytes::from_static(b"<xml/>"),
        content_type: None,
        targets: Vec::new(),
        tracking_id: None,
    }
}

fn events(store: &SqliteStore) -> i64 {
    store
        .reader
        .lock()
        .unwrap()
        .query_row("SELECT COUNT(*) FROM events", [], |row| row.get(0))
        .unwrap()
}

/// The original's fdatasync is held until the test says how it ends.
fn gated_sync(store: &SqliteStore) -> std::sync::mpsc::Sender<std::io::Result<()>> {
    let (release, gate) = std::sync::mpsc::channel();
    store
        .intake
        .inject_sync_fault(move || gate.recv().unwrap_or(Ok(())));
    release
}

/// Accepts postback `id` (dedupe key "key") on a task of its own, as a
/// request would.
fn accept_on_a_task(
    store: &Arc<SqliteStore>,
    id: &'static str,
) -> tokio::task::JoinHandle<Result<Acceptance, StoreError>> {
    let store = store.clone();
    tokio::spawn(async move { store.accept(new_postback(id, "key"), None).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_waits_for_the_originals_fdatasync_and_fails_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(options(dir.path(), SyncMode::Full)).unwrap());
    let release = gated_sync(&store);
    let original = accept_on_a_task(&store, "first");
    // The writer moves the original into SQLite meanwhile: the retry
    // must not be answered from there either.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while events(&store) == 0 {
        assert!(std::time::Instant::now() < deadline, "never moved");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let retry = accept_on_a_task(&store, "second");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !retry.is_finished(),
        "the duplicate was answered before the original is on disk: {:?}",
        retry.await
    );
    assert!(!original.is_finished());
    release
        .send(Err(std::io::Error::from_raw_os_error(5)))
        .unwrap();
    let original = original.await.unwrap();
    let retry = retry.await.unwrap();
    assert!(original.is_err(), "{original:?}");
    assert!(retry.is_err(), "EIO on the original's sync: {retry:?}");
    // The unsynced record is believed by nobody later either.
    let later = store.accept(new_postback("third", "key"), None).await;
    assert!(later.is_err(), "{later:?}");
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_of_a_synced_original_is_answered_once_the_sync_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(options(dir.path(), SyncMode::Full)).unwrap());
    let release = gated_sync(&store);
    let original = accept_on_a_task(&store, "first");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let retry = accept_on_a_task(&store, "second");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!retry.is_finished(), "answered before the original's sync");
    release.send(Ok(())).unwrap();
    assert!(matches!(original.await.unwrap(), Ok(Acceptance::Accepted)));
    match retry.await.unwrap() {
        Ok(Acceptance::Duplicate { original_id }) => assert_eq!(original_id, "first"),
        other => panic!("{other:?}"),
    }
    drop(release); // later fdatasyncs run at once
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pruning_round_deletes_every_expired_dedupe_key() {
    let dir = tempfile::tempdir().unwrap();
    let options = options(dir.path(), SyncMode::Normal);
    SqliteStore::open(options.clone())
        .unwrap()
        .close()
        .await
        .unwrap();
    let expired = 50_000;
    {
        let mut conn = Connection::open(&options.path).unwrap();
        let tx = conn.transaction().unwrap();
        let mut insert = tx
            .prepare("INSERT INTO dedupe (key, event_id, accepted_at) VALUES (?1, ?1, ?2)")
            .unwrap();
        for n in 0..expired {
            insert.execute(params![format!("old-{n}"), 1_000]).unwrap();
        }
        insert.execute(params!["fresh", now_ms()]).unwrap();
        drop(insert);
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(options).unwrap();
    let count = |sql: &str| -> i64 {
        store
            .reader
            .lock()
            .unwrap()
            .query_row(sql, [], |row| row.get(0))
            .unwrap()
    };
    // Well within DEDUPE_PRUNE_EVERY: one round, batch after batch.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while count("SELECT COUNT(*) FROM dedupe") > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} expired keys left",
            count("SELECT COUNT(*) FROM dedupe") - 1
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count("SELECT COUNT(*) FROM dedupe WHERE key = 'fresh'"), 1);
    store.close().await.unwrap();
}
