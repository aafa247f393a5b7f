//! The embedded store: SQLite in WAL mode, written by one thread with group commit.
//!
//! Accepted postbacks are made durable in the intake journal on the request's
//! own task (see `store::sqlite::intake`) and moved into SQLite by the writer thread
//! afterwards. Every other write (quarantine, complete, an operator's change)
//! is a command sent to that one writer thread, and so is every claim: a read,
//! but the writer holds the leases (`store::sqlite::leases`). The thread takes
//! whatever commands are waiting, applies them in one transaction (each in its
//! own savepoint, so one bad command cannot spoil the others), commits once,
//! and only then answers every caller. Reads for the gauges use a second
//! connection, so a `COUNT(*)` over a large backlog never delays a commit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

mod intake;
mod leases;

use intake::{Appended, Intake, Journaled};
use leases::Leases;
use super::{
    now_ms, Acceptance, DeadLetter, DeadLetterDetail, DeadLetterFilter, DeadLetterId, Job, JobId,
    Kept, NewPostback, OnCommit, Outcome, Page, QuarantineEntry, QuarantineFilter,
    QuarantineLimits, QuarantineUsage, QuarantinedBody, Store, StoreError, TargetQueue,
    TargetStats, DEAD_LETTER_COLUMNS, DEAD_LETTER_FROM, NO_ROUTE_TARGET, QUARANTINE_PREFIX_BYTES,
    QUARANTINE_PRUNE_LIMIT, QUARANTINE_SELECT,
};
use crate::config::SyncMode;

/// How often expired dedupe keys are deleted, and how many per transaction:
/// a round deletes batch after batch until none is left, one per
/// transaction, so the writer serves its queue between batches.
const DEDUPE_PRUNE_EVERY: Duration = Duration::from_secs(60);
const DEDUPE_PRUNE_LIMIT: usize = 10_000;
/// Commands taken into one transaction at most; bounds the latency of a batch.
const MAX_BATCH: usize = 512;
/// Commands waiting for the writer before callers wait for room.
const QUEUE_CAPACITY: usize = 4 * 1024;
/// Bytes of postbacks (body and envelope) on their way from the journal into
/// SQLite, queued or stalled, beyond which an accept is refused at once (a
/// 503 with Retry-After): moves carry whole bodies, and with large ones the
/// count above alone would let a stalled writer hold gigabytes.
const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// How long an accept waits for room in the writer's queue before it gives
/// up with a 503: a flood waits its turn, a locked database is reported.
const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// How often the writer makes its moves from the intake journal durable
/// (one fsync), after which the journal's covered segments are deleted.
const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// How long the writer lets moves gather before it takes them in: nobody
/// waits for a move (the postback is acknowledged from the journal), and one
/// transaction for many postbacks writes each b-tree page once instead of
/// once per postback. It delays the start of fresh deliveries by as much.
const MOVE_GATHER: Duration = Duration::from_millis(1);
/// How long the writer waits before trying again to move postbacks that
/// SQLite refused (a full disk); they stay safe in the journal meanwhile.
const STALLED_RETRY: Duration = Duration::from_millis(100);

/// The schema, versioned with `PRAGMA user_version`; each entry migrates from the
/// previous version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    id           TEXT PRIMARY KEY,
    received_at  INTEGER NOT NULL,
    envelope     BLOB NOT NULL,
    raw_body     BLOB NOT NULL,
    content_type TEXT
);
CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL,
    target      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    next_at     INTEGER NOT NULL,
    lease_until INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error  TEXT
);
CREATE INDEX jobs_due ON jobs (target, next_at);
CREATE INDEX jobs_event ON jobs (event_id);
CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL,
    target      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    last_status INTEGER,
    last_error  TEXT,
    dead_at     INTEGER NOT NULL
);
CREATE INDEX dead_letters_event ON dead_letters (event_id);
CREATE TABLE dedupe (
    key         TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    accepted_at INTEGER NOT NULL
);
CREATE INDEX dedupe_age ON dedupe (accepted_at);
CREATE TABLE heartbeat (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL
);
CREATE TABLE quarantine (
    body_hash    TEXT PRIMARY KEY,
    body         BLOB NOT NULL,
    content_type TEXT,
    error        TEXT NOT NULL,
    first_seen   INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL,
    seen_count   INTEGER NOT NULL
);
"#,
    // Dedupe keys arrive in random order: as a rowid table plus an index,
    // every accept dirtied a table page and a random index page (8 KiB of
    // WAL per postback, which the commit's fsync then waits for). Without
    // rowid the key's b-tree is the table: one page.
    r#"
CREATE TABLE dedupe_by_key (
    key         TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    accepted_at INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO dedupe_by_key (key, event_id, accepted_at) SELECT key, event_id, accepted_at FROM dedupe;
DROP TABLE dedupe;
ALTER TABLE dedupe_by_key RENAME TO dedupe;
CREATE INDEX dedupe_age ON dedupe (accepted_at);
"#,
    // Operations (admin API): when a job's last attempt failed, for the
    // queue's "last error"; pauses that hold across restarts.
    r#"
ALTER TABLE jobs ADD COLUMN last_attempt_at INTEGER;
CREATE TABLE target_pauses (
    target    TEXT PRIMARY KEY,
    paused_at INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    // The intake journal (store::sqlite::intake): every record up to `seq` is moved.
    r#"
CREATE TABLE intake_moved (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO intake_moved (id, seq) VALUES (1, 0);
"#,
    // The quarantine's budget and retention: the size as received (the body
    // may be only its prefix), a running total of what it holds kept by
    // triggers (so the budget check never scans the table), and an index
    // for the retention janitor.
    r#"
ALTER TABLE quarantine ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
ALTER TABLE quarantine ADD COLUMN truncated INTEGER NOT NULL DEFAULT 0;
UPDATE quarantine SET size = length(body);
CREATE INDEX quarantine_age ON quarantine (last_seen);
CREATE TABLE quarantine_usage (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    bodies INTEGER NOT NULL,
    bytes  INTEGER NOT NULL
);
INSERT INTO quarantine_usage (id, bodies, bytes)
    SELECT 1, COUNT(*), COALESCE(SUM(length(body)), 0) FROM quarantine;
CREATE TRIGGER quarantine_added AFTER INSERT ON quarantine BEGIN
    UPDATE quarantine_usage SET bodies = bodies + 1, bytes = bytes + length(NEW.body) WHERE id = 1;
END;
CREATE TRIGGER quarantine_removed AFTER DELETE ON quarantine BEGIN
    UPDATE quarantine_usage SET bodies = bodies - 1, bytes = bytes - length(OLD.body) WHERE id = 1;
END;
CREATE TRIGGER quarantine_body_changed AFTER UPDATE OF body ON quarantine BEGIN
    UPDATE quarantine_usage SET bytes = bytes + length(NEW.body) - length(OLD.body) WHERE id = 1;
END;
"#,
];

/// Options the SQLite store is opened with.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Database file.
    pub path: PathBuf,
    /// fsync on every commit, or only at checkpoints.
    pub sync: SyncMode,
    /// Wait for a lock held by another process before failing.
    pub busy_timeout: Duration,
    /// A postback seen again within this window is a duplicate.
    pub dedupe_window: Duration,
    /// Below this much free space on the store's filesystem, `is_ready` is false.
    pub min_free_bytes: u64,
    /// The quarantine's budget and retention.
    pub quarantine: QuarantineLimits,
}

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    commands: mpsc::Sender<Command>,
    /// The database's directory, whose filesystem readiness watches.
    directory: PathBuf,
    min_free_bytes: u64,
    quarantine: QuarantineLimits,
    reader: Arc<Mutex<Connection>>,
    intake: Arc<Intake>,
    /// Bytes of the moves not yet done (see [`QUEUE_BYTES`]).
    queued_bytes: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One write, with the channel its caller waits on.
enum Command {
    /// An acknowledged postback on its way from the journal into SQLite.
    Move(Box<Moving>),
    /// A refused body, and the budget beyond which only its prefix is kept.
    Quarantine(QuarantineEntry, u64, Reply<Kept>),
    /// An operator's write (admin API, tools): rare, so one generic shape.
    Maintenance(Box<dyn Maintenance>),
    Claim {
        target: String,
        limit: usize,
        lease: Duration,
        reply: Reply<Vec<Job>>,
    },
    Complete(Vec<(JobId, Outcome)>, Reply<()>),
    Probe(Reply<()>),
    Close(Reply<()>),
}

impl SqliteStore {
    /// Opens (creating and migrating) the database, moves in what the
    /// intake journal holds, and starts the writer thread. The relay is the
    /// only instance: leases left by a crashed process are void.
    pub fn open(options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        create_parent_dirs(&options.path, options.sync)?;
        let mut writer = open_connection(&options.path, &options)?;
        migrate(&mut writer)?;
        let (intake, moved_through) = recover_intake(&mut writer, &options)?;
        writer
            .execute(
                "UPDATE jobs SET next_at = ?1, lease_until = 0 WHERE lease_until > 0",
                [now_ms()],
            )
            .map_err(db_error)?;
        let reader = open_connection(&options.path, &options)?;
        let (commands, receiver) = mpsc::channel(QUEUE_CAPACITY);
        start_quarantine_janitor(commands.downgrade(), options.quarantine)?;
        let ready = Arc::new(AtomicBool::new(true));
        // Checkpoints run on their own thread (see `Checkpointer`), never in
        // the middle of a commit that someone is waiting for.
        writer
            .execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES};"
            ))
            .map_err(db_error)?;
        let checkpointer_conn = open_connection(&options.path, &options)?;
        // A checkpoint that must wait for readers gives up quickly instead of
        // holding the WAL lock the writer's next commit needs.
        checkpointer_conn
            .busy_timeout(CHECKPOINT_BUSY_TIMEOUT)
            .map_err(db_error)?;
        let checkpointer = Checkpointer::start(checkpointer_conn)?;
        let intake = Arc::new(intake);
        let worker = Writer {
            intake: intake.clone(),
            watermark: Watermark {
                through: moved_through,
                ahead: BTreeSet::new(),
            },
            durable_through: moved_through,
            last_durable: std::time::Instant::now(),
            stalled: Vec::new(),
            leases: Leases::default(),
            conn: writer,
            sync: options.sync.into(),
            current_sync: None,
            checkpointer: Some(checkpointer),
            dedupe_window_ms: options.dedupe_window.as_millis() as i64,
            ready: ready.clone(),
            last_prune: std::time::Instant::now(),
            // Keys that expired while the relay was stopped go at once.
            pruning: true,
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || worker.run(receiver))
            .map_err(|err| StoreError::Database(format!("cannot start writer thread: {err}")))?;
        let directory = match options.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        Ok(SqliteStore {
            commands,
            directory,
            min_free_bytes: options.min_free_bytes,
            quarantine: options.quarantine,
            reader: Arc::new(Mutex::new(reader)),
            intake,
            queued_bytes: Arc::default(),
            ready,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Free space for unprivileged writers on the store's filesystem, if known.
    fn free_bytes(&self) -> Option<u64> {
        let stats = rustix::fs::statvfs(&self.directory).ok()?;
        Some(stats.f_bavail.saturating_mul(stats.f_frsize))
    }

    /// Runs a query on the read connection, off the async workers.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            query(&conn).map_err(db_error)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// Runs an operator's write on the writer thread, durably committed.
    async fn maintain<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(|reply| Command::Maintenance(Box::new(Work { work, reply })))
            .await
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn accept(
        &self,
        postback: NewPostback,
        on_commit: Option<OnCommit>,
    ) -> Result<Acceptance, StoreError> {
        let queued = QueuedBytes::take(&self.queued_bytes, &postback)?;
        // Room for the move first: from the append to the send nothing
        // awaits, so a caller that goes away cannot strand a journaled
        // record outside the writer's reach. A writer that stays behind (a
        // locked or full database) gets a 503, not an endless wait.
        let room = tokio::time::timeout(QUEUE_WAIT, self.commands.reserve())
            .await
            .map_err(|_| {
                StoreError::Database("the store's writer is too far behind; retry later".into())
            })?
            .map_err(|_| StoreError::Closed)?;
        let seq = match self.intake.append(&postback)? {
            Appended::New(seq) => seq,
            Appended::Duplicate { original_id, seq } => {
                drop((room, queued));
                // The original is answered only once it is durable: so is
                // its duplicate, and it fails as the original does.
                if let Some(seq) = seq {
                    self.intake.sync_through(seq).await?;
                }
                return Ok(Acceptance::Duplicate { original_id });
            }
        };
        room.send(Command::Move(Box::new(Moving {
            journaled: Journaled { seq, postback },
            on_commit,
            _queued: queued,
        })));
        self.intake.sync_through(seq).await?;
        Ok(Acceptance::Accepted)
    }

    async fn quarantine(&self, entry: QuarantineEntry) -> Result<Kept, StoreError> {
        let max_bytes = self.quarantine.max_bytes;
        self.call(|reply| Command::Quarantine(entry, max_bytes, reply))
            .await
    }

    async fn quarantine_usage(&self) -> Result<QuarantineUsage, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT bodies, bytes FROM quarantine_usage WHERE id = 1")?
                .query_row([], |row| {
                    Ok(QuarantineUsage {
                        bodies: row.get::<_, i64>(0)?.max(0) as u64,
                        bytes: row.get::<_, i64>(1)?.max(0) as u64,
                    })
                })
        })
        .await
    }

    async fn list_quarantine(
        &self,
        filter: &QuarantineFilter,
        page: &Page<(i64, String)>,
    ) -> Result<Vec<QuarantinedBody>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.read(move |conn| read_quarantine(conn, &filter, &page))
            .await
    }

    async fn quarantined(&self, body_hash: &str) -> Result<Option<QuarantinedBody>, StoreError> {
        let hash = body_hash.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!("{QUARANTINE_SELECT} WHERE body_hash = ?1"))?
                .query_row([hash], quarantined_body)
                .optional()
        })
        .await
    }

    async fn remove_quarantined(&self, body_hashes: &[String]) -> Result<u64, StoreError> {
        let hashes = body_hashes.to_vec();
        self.maintain(move |conn| {
            let mut delete = conn.prepare_cached("DELETE FROM quarantine WHERE body_hash = ?1")?;
            let mut removed = 0;
            for hash in &hashes {
                removed += delete.execute([hash])? as u64;
            }
            Ok(removed)
        })
        .await
    }

    async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        page: &Page<DeadLetterId>,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let (filter, page) = (filter.clone(), page.clone());
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {DEAD_LETTER_COLUMNS} {DEAD_LETTER_FROM}
                 WHERE d.id > ?1 AND (?2 IS NULL OR d.target = ?2) AND (?3 IS NULL OR d.reason = ?3)
                   AND (?4 IS NULL OR d.dead_at >= ?4) AND (?5 IS NULL OR d.dead_at <= ?5)
                 ORDER BY d.id LIMIT ?6"
            ))?
            .query_map(
                params![
                    page.after.unwrap_or(0),
                    filter.target,
                    filter.reason,
                    filter.since_ms,
                    filter.until_ms,
                    page.limit as i64
                ],
                dead_letter_row,
            )?
            .collect()
        })
        .await
    }

    async fn newest_dead_letter_id(&self) -> Result<Option<DeadLetterId>, StoreError> {
        self.read(|conn| conn.query_row("SELECT MAX(id) FROM dead_letters", [], |row| row.get(0)))
            .await
    }

    async fn dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetterDetail>, StoreError> {
        self.read(move |conn| {
            conn.prepare_cached(&format!(
                "SELECT {DEAD_LETTER_COLUMNS}, e.envelope, e.raw_body, e.content_type {DEAD_LETTER_FROM} WHERE d.id = ?1"
            ))?
            .query_row([id], |row| {
                Ok(DeadLetterDetail {
                    letter: dead_letter_row(row)?,
                    envelope: Bytes::from(row.get::<_, Vec<u8>>(9)?),
                    raw_body: Bytes::from(row.get::<_, Vec<u8>>(10)?),
                    content_type: row.get(11)?,
                })
            })
            .optional()
        })
        .await
    }

    async fn requeue_dead_letters(
        &self,
        letters: Vec<(DeadLetterId, Vec<String>)>,
    ) -> Result<u64, StoreError> {
        self.maintain(move |conn| {
            let mut take =
                conn.prepare_cached("DELETE FROM dead_letters WHERE id = ?1 RETURNING event_id")?;
            let mut insert_job = conn.prepare_cached(
                "INSERT INTO jobs (event_id, target, created_at, next_at) VALUES (?1, ?2, ?3, ?3)",
            )?;
            let now = now_ms();
            let mut moved = 0;
            for (id, targets) in &letters {
                let Some(event_id) = take
                    .query_row([id], |row| row.get::<_, String>(0))
                    .optional()?
                else {
                    continue; // replayed or purged meanwhile
                };
                for target in targets {
                    insert_job.execute(params![event_id, target, now])?;
                }
                moved += 1;
            }
            Ok(moved)
        })
        .await
    }

    async fn purge_dead_letters(&self, ids: &[DeadLetterId]) -> Result<u64, StoreError> {
        let ids = ids.to_vec();
        self.maintain(move |conn| {
            let mut delete =
                conn.prepare_cached("DELETE FROM dead_letters WHERE id = ?1 RETURNING event_id")?;
            let mut events = Vec::with_capacity(ids.len());
            for id in &ids {
                if let Some(event_id) = delete
                    .query_row([id], |row| row.get::<_, String>(0))
                    .optional()?
                {
                    events.push(event_id);
                }
            }
            let purged = events.len() as u64;
            forget_events(conn, events)?;
            Ok(purged)
        })
        .await
    }

    async fn dead_letter_target(&self, target: &str, reason: &str) -> Result<u64, StoreError> {
        let (target, reason) = (target.to_owned(), reason.to_owned());
        self.maintain(move |conn| {
            let now = now_ms();
            conn.prepare_cached(
                "INSERT INTO dead_letters (event_id, target, reason, attempts, last_status, last_error, dead_at)
                 SELECT event_id, target, ?2, attempts, last_status, last_error, ?3 FROM jobs
                 WHERE target = ?1",
            )?
            .execute(params![target, reason, now])?;
            // One instance, whose dispatcher for the target has stopped: no
            // lease on its jobs is alive, not even one handed over in memory.
            conn.prepare_cached("DELETE FROM jobs WHERE target = ?1")?
                .execute(params![target])
                .map(|moved| moved as u64)
        })
        .await
    }

    async fn set_paused(&self, target: &str, paused: bool) -> Result<(), StoreError> {
        let target = target.to_owned();
        self.maintain(move |conn| {
            if paused {
                conn.prepare_cached(
                    "INSERT INTO target_pauses (target, paused_at) VALUES (?1, ?2) ON CONFLICT (target) DO NOTHING",
                )?
                .execute(params![target, now_ms()])?;
            } else {
                conn.prepare_cached("DELETE FROM target_pauses WHERE target = ?1")?
                    .execute([target])?;
            }
            Ok(())
        })
        .await
    }

    async fn paused_targets(&self) -> Result<Vec<String>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT target FROM target_pauses ORDER BY target")?
                .query_map([], |row| row.get(0))?
                .collect()
        })
        .await
    }

    async fn queue(&self) -> Result<Vec<TargetQueue>, StoreError> {
        self.read(|conn| {
            let now = now_ms();
            let mut due = conn.prepare_cached(
                "SELECT COUNT(*) FROM jobs WHERE target = ?1 AND (next_at <= ?2 OR lease_until > ?2)",
            )?;
            let mut last_error = conn.prepare_cached(
                "SELECT last_error FROM jobs WHERE target = ?1 AND last_error IS NOT NULL
                 ORDER BY last_attempt_at DESC LIMIT 1",
            )?;
            read_stats(conn)?
                .into_iter()
                .map(|stats| {
                    Ok(TargetQueue {
                        due: due.query_row(params![stats.target, now], |row| row.get::<_, i64>(0))?
                            as u64,
                        last_error: last_error
                            .query_row([&stats.target], |row| row.get(0))
                            .optional()?,
                        stats,
                    })
                })
                .collect()
        })
        .await
    }

    async fn claim(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, StoreError> {
        let target = target.to_owned();
        self.call(|reply| Command::Claim {
            target,
            limit,
            lease,
            reply,
        })
        .await
    }

    async fn complete(&self, outcomes: Vec<(JobId, Outcome)>) -> Result<(), StoreError> {
        self.call(|reply| Command::Complete(outcomes, reply)).await
    }

    async fn probe(&self) -> Result<(), StoreError> {
        self.call(Command::Probe).await
    }

    async fn stats(&self) -> Result<Vec<TargetStats>, StoreError> {
        self.read(read_stats).await
    }

    fn damaged_journal_segments(&self) -> u64 {
        self.intake.damaged_segments()
    }

    /// The last commit succeeded, and the disk is not about to fill up: a
    /// full disk can still take small commits into WAL space SQLite had
    /// already allocated, which would make readiness flap.
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && !self.commands.is_closed()
            && self.intake.failure().is_none()
            && self
                .free_bytes()
                .is_none_or(|free| free >= self.min_free_bytes)
    }

    async fn close(&self) -> Result<(), StoreError> {
        let result = self.call(Command::Close).await;
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        result
    }
}

/// Creates the directories the database lives in. With `sync: full` the
/// new ones are made durable (an fsync of each one's parent): SQLite fsyncs
/// only the database's own directory, so a power cut could otherwise take a
/// new data directory with every acknowledged postback in it.
fn create_parent_dirs(database: &Path, sync: SyncMode) -> Result<(), StoreError> {
    let Some(dir) = database.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    std::fs::create_dir_all(dir)
        .map_err(|err| StoreError::Database(format!("cannot create {}: {err}", dir.display())))?;
    if sync == SyncMode::Full {
        for created in missing {
            let parent = match created.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            intake::sync_dir(parent)?;
        }
    }
    Ok(())
}

fn open_connection(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)
        .map_err(|err| StoreError::Database(format!("cannot open {}: {err}", path.display())))?;
    conn.busy_timeout(options.busy_timeout).map_err(db_error)?;
    let synchronous = match options.sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};"
    ))
    .map_err(db_error)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(db_error)?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction().map_err(db_error)?;
        tx.execute_batch(sql).map_err(db_error)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))
            .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
    }
    Ok(())
}

fn read_stats(conn: &Connection) -> rusqlite::Result<Vec<TargetStats>> {
    let mut counts: BTreeMap<String, TargetStats> = BTreeMap::new();
    // Both scans read only the (target, next_at) index; job ids grow with
    // creation, so the smallest id per target is its oldest job.
    let mut pending =
        conn.prepare_cached("SELECT target, COUNT(*), MIN(id) FROM jobs GROUP BY target")?;
    let mut created = conn.prepare_cached("SELECT created_at FROM jobs WHERE id = ?1")?;
    let rows: Vec<(String, i64, i64)> = pending
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (target, count, oldest_id) in rows {
        let oldest_pending_ms = created
            .query_row([oldest_id], |row| row.get(0))
            .optional()?;
        counts.insert(
            target.clone(),
            TargetStats {
                target,
                pending: count.max(0) as u64,
                dead: 0,
                oldest_pending_ms,
            },
        );
    }
    let mut dead =
        conn.prepare_cached("SELECT target, COUNT(*) FROM dead_letters GROUP BY target")?;
    let rows = dead.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })?;
    for row in rows {
        let (target, count) = row?;
        counts
            .entry(target.clone())
            .or_insert(TargetStats {
                target,
                pending: 0,
                dead: 0,
                oldest_pending_ms: None,
            })
            .dead = count.max(0) as u64;
    }
    Ok(counts.into_values().collect())
}

fn quarantined_body(row: &rusqlite::Row<'_>) -> rusqlite::Result<QuarantinedBody> {
    Ok(QuarantinedBody {
        body_hash: row.get(0)?,
        body: Bytes::from(row.get::<_, Vec<u8>>(1)?),
        content_type: row.get(2)?,
        error: row.get(3)?,
        first_seen_ms: row.get(4)?,
        last_seen_ms: row.get(5)?,
        seen_count: row.get::<_, i64>(6)?.max(0) as u64,
        size: row.get::<_, i64>(7)?.max(0) as u64,
        truncated: row.get(8)?,
    })
}

fn read_quarantine(
    conn: &Connection,
    filter: &QuarantineFilter,
    page: &Page<(i64, String)>,
) -> rusqlite::Result<Vec<QuarantinedBody>> {
    let (after_seen, after_hash) = page.after.clone().unwrap_or((i64::MIN, String::new()));
    conn.prepare_cached(&format!(
        "{QUARANTINE_SELECT}
         WHERE (first_seen, body_hash) > (?1, ?2)
           AND (?3 IS NULL OR last_seen >= ?3) AND (?4 IS NULL OR last_seen <= ?4)
         ORDER BY first_seen, body_hash LIMIT ?5"
    ))?
    .query_map(
        params![
            after_seen,
            after_hash,
            filter.since_ms,
            filter.until_ms,
            page.limit as i64
        ],
        quarantined_body,
    )?
    .collect()
}

fn dead_letter_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: row.get(0)?,
        event_id: row.get(1)?,
        target: row.get(2)?,
        reason: row.get(3)?,
        attempts: row.get(4)?,
        last_status: row.get(5)?,
        last_error: row.get(6)?,
        dead_at_ms: row.get(7)?,
        received_at_ms: row.get(8)?,
    })
}

pub(super) fn db_error(err: rusqlite::Error) -> StoreError {
    StoreError::Database(err.to_string())
}

/// The single writer: owns the write connection.
struct Writer {
    conn: Connection,
    /// The configured `synchronous` level for acknowledged writes.
    sync: Sync,
    /// The level the connection is at now (None: unknown).
    current_sync: Option<Sync>,
    /// Runs WAL checkpoints beside the writer; stopped before closing.
    checkpointer: Option<Checkpointer>,
    dedupe_window_ms: i64,
    ready: Arc<AtomicBool>,
    /// When expired dedupe keys were last deleted.
    last_prune: std::time::Instant,
    /// A pruning round is under way: the last batch was full.
    pruning: bool,
    /// Where accepted postbacks wait to be moved in.
    intake: Arc<Intake>,
    /// How far the journal is moved into SQLite (committed).
    watermark: Watermark,
    /// How far a durable commit holds the moves: the journal may go that far.
    durable_through: u64,
    last_durable: std::time::Instant,
    /// Moves SQLite refused (a full disk), tried again after [`STALLED_RETRY`].
    stalled: Vec<Moving>,
    /// The dispatchers' claims (see `store::sqlite::leases`).
    leases: Leases,
}

/// An acknowledged postback on its way from the journal into SQLite.
struct Moving {
    journaled: Journaled,
    on_commit: Option<OnCommit>,
    /// Its share of [`QUEUE_BYTES`], given back when the move is done.
    _queued: QueuedBytes,
}

/// A postback's bytes counted against [`QUEUE_BYTES`] until dropped.
struct QueuedBytes {
    total: Arc<AtomicUsize>,
    bytes: usize,
}

impl QueuedBytes {
    /// Counts `postback` in, or refuses it when the queue holds too much
    /// already (one postback alone is always let in).
    fn take(total: &Arc<AtomicUsize>, postback: &NewPostback) -> Result<QueuedBytes, StoreError> {
        let bytes = postback.raw_body.len() + postback.envelope.len();
        let before = total.fetch_add(bytes, Ordering::AcqRel);
        let queued = QueuedBytes {
            total: total.clone(),
            bytes,
        };
        if before > 0 && before + bytes > QUEUE_BYTES {
            return Err(StoreError::Database(format!(
                "the store's writer queue holds {} MiB of postbacks not yet moved into SQLite; retry later",
                before / (1024 * 1024)
            )));
        }
        Ok(queued)
    }
}

impl Drop for QueuedBytes {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The journal position up to which every record is in SQLite. Records
/// reach the writer roughly, not exactly, in order: those moved past a gap
/// wait in `ahead` until the gap is filled.
#[derive(Debug, Clone)]
struct Watermark {
    through: u64,
    ahead: BTreeSet<u64>,
}

impl Watermark {
    fn with(&self, moved: impl Iterator<Item = u64>) -> Watermark {
        let mut next = self.clone();
        next.ahead.extend(moved);
        while next.ahead.remove(&(next.through + 1)) {
            next.through += 1;
        }
        next
    }
}

/// A computed answer, held back until the batch commits.
trait Pending: Send {
    /// Sends the answer, or `failure` when the commit did not happen.
    fn send(self: Box<Self>, failure: Option<&StoreError>);
}

impl<T: Send> Pending for (Reply<T>, Result<T, StoreError>) {
    fn send(self: Box<Self>, failure: Option<&StoreError>) {
        let (reply, result) = *self;
        let _ = reply.send(match failure {
            Some(err) => Err(err.clone()),
            None => result,
        });
    }
}

/// What one transaction did besides answering callers.
#[derive(Default)]
struct Applied {
    answers: Vec<Box<dyn Pending>>,
    moves: Vec<Moved>,
}

/// A move with its inserted jobs' ids, or why SQLite refused it.
type Moved = (Box<Moving>, Result<Vec<JobId>, StoreError>);

impl Writer {
    fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            if self.stalled.is_empty() {
                // During a pruning round the next batch is due at once.
                let first = if self.pruning {
                    receiver.try_recv().ok()
                } else {
                    match receiver.blocking_recv() {
                        Some(first) => Some(first),
                        None => return,
                    }
                };
                if let Some(first) = first {
                    let gather = matches!(first, Command::Move(_));
                    batch.push(first);
                    if gather {
                        std::thread::sleep(MOVE_GATHER);
                    }
                }
            } else {
                std::thread::sleep(STALLED_RETRY);
                if receiver.is_closed() && receiver.is_empty() {
                    // Dropped without a close: the stalled moves stay in the
                    // journal for the next start.
                    return;
                }
                batch.extend(self.take_stalled());
            }
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            let mut close = None;
            let commands = batch.drain(..).filter_map(|command| match command {
                Command::Close(reply) => {
                    close = Some(reply);
                    None
                }
                other => Some(other),
            });
            let commands: Vec<Command> = commands.collect();
            if !commands.is_empty() || self.pruning {
                self.apply_batch(commands);
            }
            self.intake.prepare_spare();
            if let Some(reply) = close {
                receiver.close();
                while let Ok(command) = receiver.try_recv() {
                    match command {
                        // A second close: answered once this one is done.
                        Command::Close(again) => drop(again.send(Ok(()))),
                        other => batch.push(other),
                    }
                }
                batch.extend(self.take_stalled());
                let rest: Vec<Command> = std::mem::take(&mut batch);
                if !rest.is_empty() {
                    self.apply_batch(rest);
                }
                drop(self.checkpointer.take());
                let result = self
                    .set_sync(true)
                    .and_then(|()| self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
                    .map_err(db_error);
                // The checkpoint synced everything moved: the journal may go,
                // except what is still stalled (moved at the next start).
                let durable = if result.is_ok() {
                    self.watermark.through
                } else {
                    self.durable_through
                };
                self.intake.close(durable);
                let _ = reply.send(result);
                return;
            }
        }
    }

    /// The stalled moves, as commands to try again.
    fn take_stalled(&mut self) -> impl Iterator<Item = Command> + use<> {
        std::mem::take(&mut self.stalled)
            .into_iter()
            .map(|moving| Command::Move(Box::new(moving)))
    }

    /// Applies `commands` in one transaction and answers them after the commit.
    fn apply_batch(&mut self, commands: Vec<Command>) {
        let mut applied = Applied::default();
        let changes_before = self.conn.total_changes();
        let outcome = self.transaction(commands, &mut applied);
        match &outcome {
            // Only a commit that wrote something shows that the store can
            // commit: a batch that changed nothing (an idle dispatcher's empty
            // claim, a duplicate) commits without writing, even to a full disk.
            Ok(()) => {
                if self.conn.total_changes() != changes_before {
                    self.ready.store(true, Ordering::Relaxed);
                }
            }
            Err(err) => {
                self.ready.store(false, Ordering::Relaxed);
                // Pruning resumes at its next turn, not in a loop of failures.
                self.pruning = false;
                tracing::error!(error = %err, "store commit failed; answering 503 until it recovers");
            }
        }
        for answer in applied.answers {
            answer.send(outcome.as_ref().err());
        }
        self.finish_moves(applied.moves, outcome.is_ok());
    }

    /// Starts the jobs of moved postbacks; keeps refused moves for later.
    fn finish_moves(&mut self, moves: Vec<Moved>, committed: bool) {
        let mut started = Vec::with_capacity(moves.len());
        for (moving, result) in moves {
            match result {
                Ok(ids) if committed => started.push((moving, ids)),
                Ok(_) => self.stalled.push(*moving),
                Err(err) => {
                    self.ready.store(false, Ordering::Relaxed);
                    tracing::error!(error = %err, id = %moving.journaled.postback.id,
                        "an acknowledged postback could not be moved into SQLite; it stays in the intake journal and is tried again");
                    self.stalled.push(*moving);
                }
            }
        }
        self.intake
            .moved(started.iter().map(|(moving, _)| &moving.journaled.postback));
        for (moving, ids) in started {
            if let Some(on_commit) = moving.on_commit {
                on_commit(&ids);
            }
        }
    }

    fn transaction(
        &mut self,
        commands: Vec<Command>,
        applied: &mut Applied,
    ) -> Result<(), StoreError> {
        // Only what is acknowledged on the strength of this commit needs its
        // fsync: delivery bookkeeping (claims, outcomes) is written without
        // one, and the next durable commit's fsync covers it. Losing it to a
        // power cut costs a repeated delivery, never a lost postback. Moves
        // are covered by the journal until a durable commit, once a second.
        let moves_due = self.watermark.through > self.durable_through
            && self.last_durable.elapsed() >= DURABLE_EVERY;
        let durable = moves_due || commands.iter().any(Command::is_acknowledged);
        let begin = self
            .set_sync(durable)
            .and_then(|()| run(&self.conn, "BEGIN IMMEDIATE"));
        let mut aborted = begin.err().map(db_error);
        for command in commands {
            if let Some(err) = &aborted {
                match command {
                    Command::Move(moving) => self.stalled.push(*moving),
                    other => fail(other, err),
                }
                continue;
            }
            match command {
                Command::Move(moving) => {
                    let result = isolated(&self.conn, |c| {
                        insert_postback(c, &moving.journaled.postback)
                    });
                    applied.moves.push((moving, result));
                }
                other => applied.answers.push(self.apply_one(other)),
            }
            // Some errors (disk full, I/O) roll back the whole transaction:
            // then nothing of this batch can be committed.
            if self.conn.is_autocommit() {
                aborted = Some(StoreError::Database(
                    "transaction rolled back by the database".into(),
                ));
            }
        }
        if let Some(err) = aborted {
            let _ = run(&self.conn, "ROLLBACK");
            self.leases.rollback();
            return Err(err);
        }
        let watermark = self.watermark.with(
            applied
                .moves
                .iter()
                .filter(|(_, result)| result.is_ok())
                .map(|(moving, _)| moving.journaled.seq),
        );
        if watermark.through != self.watermark.through {
            if let Err(err) = self
                .conn
                .prepare_cached("UPDATE intake_moved SET seq = ?1 WHERE id = 1")
                .and_then(|mut statement| statement.execute([watermark.through as i64]))
            {
                let _ = run(&self.conn, "ROLLBACK");
                self.leases.rollback();
                return Err(db_error(err));
            }
        }
        if self.pruning || self.last_prune.elapsed() >= DEDUPE_PRUNE_EVERY {
            self.last_prune = std::time::Instant::now();
            self.pruning = match prune_dedupe(&self.conn, now_ms() - self.dedupe_window_ms) {
                Ok(deleted) => deleted == DEDUPE_PRUNE_LIMIT,
                Err(err) => {
                    tracing::warn!(error = %err, "could not prune expired dedupe keys");
                    false
                }
            };
        }
        if let Err(err) = run(&self.conn, "COMMIT") {
            let _ = run(&self.conn, "ROLLBACK");
            self.leases.rollback();
            return Err(db_error(err));
        }
        self.leases.commit(now_ms());
        self.watermark = watermark;
        if durable {
            self.durable_through = self.watermark.through;
            self.last_durable = std::time::Instant::now();
            self.intake.forget_through(self.durable_through);
        }
        Ok(())
    }

    /// Switches `synchronous` between the configured level (for batches that
    /// carry something acknowledged) and OFF (bookkeeping only).
    fn set_sync(&mut self, durable: bool) -> rusqlite::Result<()> {
        let wanted = if durable { self.sync } else { Sync::Off };
        if self.current_sync != Some(wanted) {
            run(&self.conn, wanted.pragma())?;
            self.current_sync = Some(wanted);
        }
        Ok(())
    }

    /// Runs one command inside a savepoint; its own failure is its own answer.
    fn apply_one(&mut self, command: Command) -> Box<dyn Pending> {
        let (conn, leases) = (&self.conn, &mut self.leases);
        match command {
            Command::Quarantine(entry, max_bytes, reply) => {
                Box::new((reply, isolated(conn, |c| quarantine(c, &entry, max_bytes))))
            }
            Command::Maintenance(work) => work.apply(conn),
            Command::Claim {
                target,
                limit,
                lease,
                reply,
            } => Box::new((
                reply,
                isolated(conn, |c| claim(c, leases, &target, limit, lease)),
            )),
            Command::Complete(outcomes, reply) => Box::new((
                reply,
                isolated(conn, |c| complete_all(c, leases, &outcomes)),
            )),
            Command::Probe(reply) => Box::new((
                reply,
                isolated(conn, |c| {
                    c.prepare_cached(
                        "INSERT INTO heartbeat (id, at) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                    )?
                    .execute([now_ms()])
                    .map(drop)
                }),
            )),
            Command::Move(_) | Command::Close(_) => {
                unreachable!("moves and close are handled by the transaction and the run loop")
            }
        }
    }
}

/// Runs one command's work inside a savepoint, so its failure is its own.
fn isolated<T>(
    conn: &Connection,
    work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> Result<T, StoreError> {
    run(conn, "SAVEPOINT command").map_err(db_error)?;
    match work(conn) {
        Ok(value) => {
            run(conn, "RELEASE command").map_err(db_error)?;
            Ok(value)
        }
        Err(err) => {
            if !conn.is_autocommit() {
                let _ = run(conn, "ROLLBACK TO command");
                let _ = run(conn, "RELEASE command");
            }
            Err(db_error(err))
        }
    }
}

/// A write whose result type the writer does not need to know.
trait Maintenance: Send {
    /// Runs it in the current transaction; the answer waits for the commit.
    fn apply(self: Box<Self>, conn: &Connection) -> Box<dyn Pending>;
    /// Answers `err` without running it.
    fn fail(self: Box<Self>, err: &StoreError);
}

struct Work<T, F> {
    work: F,
    reply: Reply<T>,
}

impl<T, F> Maintenance for Work<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send,
{
    fn apply(self: Box<Self>, conn: &Connection) -> Box<dyn Pending> {
        let Work { work, reply } = *self;
        Box::new((reply, isolated(conn, work)))
    }

    fn fail(self: Box<Self>, err: &StoreError) {
        let _ = self.reply.send(Err(err.clone()));
    }
}

/// How often committed WAL frames are copied into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// How long a checkpoint waits for a lock before trying again next time.
const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_millis(20);
/// WAL length (frames of 4 KiB) past which the checkpointer forces the WAL
/// to start over, and the size the file is truncated back to afterwards.
const WAL_RESTART_FRAMES: i64 = 16 * 1024;
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// Runs a checkpoint and returns the WAL's length in frames.
fn wal_frames(conn: &Connection, mode: &str) -> rusqlite::Result<i64> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        row.get(1)
    })
}

/// Copies committed WAL frames into the database file on its own connection
/// and thread, so no commit anyone waits for runs a checkpoint. It uses the
/// configured `synchronous` level, which keeps SQLite's ordering (WAL synced
/// before the database is written) even though bookkeeping commits skip their
/// fsync. Dropping it stops the thread.
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(conn: Connection) -> Result<Checkpointer, StoreError> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    // PASSIVE never blocks the writer; a busy or failed
                    // checkpoint is simply tried again next time. Under
                    // sustained load the writer may never leave the WAL
                    // fully copied, so it could not start over and would
                    // grow without end: past a bound, RESTART makes the next
                    // commit wait for the copy once and then reuse the file.
                    let mode = match wal_frames(&conn, "PASSIVE") {
                        Ok(frames) if frames > WAL_RESTART_FRAMES => "RESTART",
                        Ok(_) => continue,
                        Err(err) => {
                            tracing::debug!(error = %err, "WAL checkpoint did not run");
                            continue;
                        }
                    };
                    if let Err(err) = wal_frames(&conn, mode) {
                        tracing::debug!(error = %err, "WAL restart checkpoint did not run");
                    }
                }
            })
            .map_err(|err| {
                StoreError::Database(format!("cannot start checkpoint thread: {err}"))
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs a statement without parameters or rows, prepared once per connection
/// (transaction control is on every batch's path).
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

impl Command {
    /// Whether someone is answered on the strength of this write (ingest's
    /// 400 for a quarantined body; accepted postbacks are in the journal).
    fn is_acknowledged(&self) -> bool {
        // An operator's write (a replay, a pause) is committed durably too:
        // the API answers "done" on the strength of it.
        matches!(self, Command::Quarantine(..) | Command::Maintenance(..))
    }
}

/// SQLite `synchronous` levels the writer switches between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    Full,
    Normal,
    Off,
}

impl Sync {
    fn pragma(self) -> &'static str {
        match self {
            Sync::Full => "PRAGMA synchronous = FULL",
            Sync::Normal => "PRAGMA synchronous = NORMAL",
            Sync::Off => "PRAGMA synchronous = OFF",
        }
    }
}

impl From<SyncMode> for Sync {
    fn from(mode: SyncMode) -> Sync {
        match mode {
            SyncMode::Full => Sync::Full,
            SyncMode::Normal => Sync::Normal,
        }
    }
}

/// Answers a command that cannot run because its batch already failed.
fn fail(command: Command, error: &StoreError) {
    let err = Err(error.clone());
    match command {
        Command::Move(_) => unreachable!("a failed move is kept, not answered"),
        Command::Quarantine(_, _, reply) => drop(reply.send(Err(error.clone()))),
        Command::Claim { reply, .. } => drop(reply.send(err.map(|()| Vec::new()))),
        Command::Maintenance(work) => work.fail(error),
        Command::Complete(_, reply) | Command::Probe(reply) | Command::Close(reply) => {
            drop(reply.send(err))
        }
    }
}

/// Inserts an acknowledged postback with its jobs and dedupe key; returns
/// the jobs' ids in target order. A postback already there (moved before a
/// crash left the journal behind) is skipped: no jobs, no ids.
fn insert_postback(conn: &Connection, postback: &NewPostback) -> rusqlite::Result<Vec<JobId>> {
    let now = postback.received_at_ms;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO events (id, received_at, envelope, raw_body, content_type) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            postback.id,
            now,
            &postback.envelope[..],
            &postback.raw_body[..],
            postback.content_type
        ])?;
    if inserted == 0 {
        return Ok(Vec::new());
    }
    conn.prepare_cached(
        "INSERT INTO dedupe (key, event_id, accepted_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET event_id = excluded.event_id, accepted_at = excluded.accepted_at",
    )?
    .execute(params![postback.dedupe_key, postback.id, now])?;
    if postback.targets.is_empty() {
        conn.prepare_cached(
            "INSERT INTO dead_letters (event_id, target, reason, attempts, dead_at) VALUES (?1, ?2, 'no route', 0, ?3)",
        )?
        .execute(params![postback.id, NO_ROUTE_TARGET, now])?;
    }
    let mut insert_job = conn.prepare_cached(
        "INSERT INTO jobs (event_id, target, created_at, next_at, lease_until) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let (next_at, lease_until) = match postback.leased_until_ms {
        None => (now, 0),
        Some(until) => (until, until),
    };
    let mut ids = Vec::with_capacity(postback.targets.len());
    for target in &postback.targets {
        insert_job.execute(params![postback.id, target, now, next_at, lease_until])?;
        ids.push(conn.last_insert_rowid());
    }
    Ok(ids)
}

/// Opens the intake journal and moves in, durably, what an earlier process
/// acknowledged but did not move; returns the journal and how far it is moved.
fn recover_intake(
    conn: &mut Connection,
    options: &SqliteOptions,
) -> Result<(Intake, u64), StoreError> {
    let moved: i64 = conn
        .query_row("SELECT seq FROM intake_moved WHERE id = 1", [], |row| {
            row.get(0)
        })
        .map_err(db_error)?;
    let (intake, records, written) = Intake::open(
        &options.path,
        options.sync,
        options.dedupe_window.as_millis() as i64,
        moved as u64,
        open_connection(&options.path, options)?,
    )?;
    if written > moved as u64 {
        let tx = conn.transaction().map_err(db_error)?;
        for record in &records {
            insert_postback(&tx, &record.postback).map_err(db_error)?;
        }
        tx.execute(
            "UPDATE intake_moved SET seq = ?1 WHERE id = 1",
            [written as i64],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        tracing::info!(
            postbacks = records.len(),
            "moved acknowledged postbacks from the intake journal into the store"
        );
    }
    intake.forget_through(written);
    Ok((intake, written))
}

/// Keeps a refused body whole while the running total (`quarantine_usage`,
/// kept by triggers) leaves room for it, else its prefix.
fn quarantine(
    conn: &Connection,
    entry: &QuarantineEntry,
    max_bytes: u64,
) -> rusqlite::Result<Kept> {
    conn.prepare_cached(
        "INSERT INTO quarantine (body_hash, body, size, truncated, content_type, error,
             first_seen, last_seen, seen_count)
         SELECT ?1, CASE WHEN u.bytes + length(?2) <= ?6 THEN ?2 ELSE substr(?2, 1, ?7) END,
             length(?2), u.bytes + length(?2) > ?6, ?3, ?4, ?5, ?5, 1
         FROM quarantine_usage u WHERE u.id = 1
         ON CONFLICT (body_hash) DO UPDATE SET last_seen = excluded.last_seen,
             seen_count = seen_count + 1, error = excluded.error
         RETURNING seen_count, truncated",
    )?
    .query_row(
        params![
            entry.body_hash,
            &entry.body[..],
            entry.content_type,
            entry.error,
            entry.received_at_ms,
            max_bytes.min(i64::MAX as u64) as i64,
            QUARANTINE_PREFIX_BYTES as i64,
        ],
        |row| {
            Ok(match (row.get::<_, i64>(0)?, row.get::<_, bool>(1)?) {
                (1, false) => Kept::Whole,
                (1, true) => Kept::Prefix,
                _ => Kept::Again,
            })
        },
    )
}

/// Deletes quarantined bodies last seen before `before_ms`, a bounded number
/// at a time; returns how many.
fn prune_quarantine(conn: &Connection, before_ms: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM quarantine WHERE body_hash IN
             (SELECT body_hash FROM quarantine WHERE last_seen < ?1 LIMIT ?2)",
    )?
    .execute(params![before_ms, QUARANTINE_PRUNE_LIMIT])
}

/// The quarantine's retention janitor: a thread that, every
/// [`QuarantineLimits::prune_every`], has the writer delete expired bodies
/// (in bounded transactions). It holds the writer's queue weakly: it ends
/// with the store.
fn start_quarantine_janitor(
    commands: mpsc::WeakSender<Command>,
    limits: QuarantineLimits,
) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("quarantine-janitor".into())
        .spawn(move || loop {
            std::thread::sleep(limits.prune_every());
            let before = limits.expired_before_ms();
            let mut pruned = 0;
            loop {
                let Some(sender) = commands.upgrade() else {
                    return;
                };
                let (reply, answer) = oneshot::channel();
                let work = move |conn: &Connection| prune_quarantine(conn, before);
                if sender
                    .blocking_send(Command::Maintenance(Box::new(Work { work, reply })))
                    .is_err()
                {
                    return;
                }
                drop(sender);
                match answer.blocking_recv() {
                    Ok(Ok(deleted)) => {
                        pruned += deleted;
                        if deleted < QUARANTINE_PRUNE_LIMIT as usize {
                            break;
                        }
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(error = %err, "could not delete expired quarantined bodies");
                        break;
                    }
                    Err(_) => return,
                }
            }
            if pruned > 0 {
                tracing::info!(
                    deleted = pruned,
                    "quarantined bodies past quarantine.retention deleted"
                );
            }
        })
        .map(drop)
        .map_err(|err| StoreError::Database(format!("cannot start the quarantine janitor: {err}")))
}

/// A target's due jobs, oldest first: the `jobs_due` index range yields them
/// in `(next_at, id)` order, and the claim stops reading once it has enough.
/// No `ORDER BY` (beside the bound target), no bound `LIMIT`, no join:
/// SQLite, built with STAT4 as rusqlite bundles it, compiles each of those
/// anew for every new binding — a statement compile per claim, measured as
/// 14 % of the writer's samples while draining a backlog.
const CLAIM_DUE: &str = "SELECT id, event_id, attempts, created_at FROM jobs INDEXED BY jobs_due
     WHERE target = ?1 AND next_at <= ?2";

/// The bodies a claimed job is sent with.
const CLAIM_EVENT: &str = "SELECT envelope, raw_body, content_type FROM events WHERE id = ?1";

/// Leases due jobs in memory ([`Leases`]): a read, stepping over the due
/// jobs already leased (at most the dispatchers' rounds in flight).
///
/// See [`CLAIM_DUE`] for why the scan is written as it is.
fn claim(
    conn: &Connection,
    leases: &mut Leases,
    target: &str,
    limit: usize,
    lease: Duration,
) -> rusqlite::Result<Vec<Job>> {
    let now = now_ms();
    let lease_until = now + lease.as_millis() as i64;
    let mut due = conn.prepare_cached(CLAIM_DUE)?;
    let mut rows = due.query(params![target, now])?;
    let mut claimed: Vec<(JobId, String, u32, i64)> = Vec::with_capacity(limit);
    while claimed.len() < limit {
        let Some(row) = rows.next()? else { break };
        let id = row.get(0)?;
        if !leases.is_held(id, now) {
            claimed.push((id, row.get(1)?, row.get(2)?, row.get(3)?));
        }
    }
    drop(rows);
    let mut event = conn.prepare_cached(CLAIM_EVENT)?;
    let mut jobs = Vec::with_capacity(claimed.len());
    for (id, event_id, attempts, created_at_ms) in claimed {
        let (envelope, raw_body, content_type): (Vec<u8>, Vec<u8>, Option<String>) = event
            .query_row([&event_id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?;
        jobs.push(Job {
            id,
            tracking_id: None,
            event_id,
            target: target.to_owned(),
            attempts,
            created_at_ms,
            envelope: Bytes::from(envelope),
            raw_body: Bytes::from(raw_body),
            content_type,
            leased_until_ms: lease_until,
        });
    }
    for job in &jobs {
        leases.hold(job.id, lease_until);
    }
    jobs.sort_by_key(|job| job.id);
    Ok(jobs)
}

/// Records a batch of outcomes; once all are written, their leases end
/// with the transaction's commit.
fn complete_all(
    conn: &Connection,
    leases: &mut Leases,
    outcomes: &[(JobId, Outcome)],
) -> rusqlite::Result<()> {
    let mut delivered = Vec::with_capacity(outcomes.len());
    for (job, outcome) in outcomes {
        match outcome {
            Outcome::Delivered => delivered.push(*job),
            Outcome::Released { leased_until_ms } => {
                conn.prepare_cached(
                    "UPDATE jobs SET next_at = ?2, lease_until = 0 WHERE id = ?1 AND lease_until = ?3",
                )?
                .execute(params![job, now_ms(), leased_until_ms])?;
            }
            Outcome::Retry {
                next_at_ms,
                status,
                error,
            } => {
                conn.prepare_cached(
                    "UPDATE jobs SET attempts = attempts + 1, next_at = ?2, lease_until = 0,
                         last_status = ?3, last_error = ?4, last_attempt_at = ?5 WHERE id = ?1",
                )?
                .execute(params![job, next_at_ms, status, error, now_ms()])?;
            }
            Outcome::Dead {
                reason,
                status,
                error,
            } => {
                conn.prepare_cached(
                    "INSERT INTO dead_letters (event_id, target, reason, attempts, last_status, last_error, dead_at)
                     SELECT event_id, target, ?2, attempts + 1, ?3, ?4, ?5 FROM jobs WHERE id = ?1",
                )?
                .execute(params![job, reason, status, error, now_ms()])?;
                conn.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
                    .execute([job])?;
            }
        }
    }
    delete_delivered(conn, &delivered)?;
    for (job, outcome) in outcomes {
        let under = match outcome {
            Outcome::Released { leased_until_ms } => Some(*leased_until_ms),
            _ => None,
        };
        leases.end(*job, under);
    }
    Ok(())
}

/// Deletes a batch of delivered jobs (a JSON array of ids), returning their events.
const DELETE_DELIVERED: &str =
    "DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?1)) RETURNING event_id";
/// Deletes the events (a JSON array of ids) that no job or dead letter needs.
const FORGET_EVENTS: &str = "DELETE FROM events WHERE id IN (SELECT value FROM json_each(?1))
       AND NOT EXISTS (SELECT 1 FROM jobs WHERE event_id = events.id)
       AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE event_id = events.id)";

/// Two statements for a whole batch of delivered jobs (nearly every outcome):
/// per job, the statement overhead was most of the cost (8.0 → 5.8 µs per
/// job in a stand-alone SQLite benchmark).
fn delete_delivered(conn: &Connection, jobs: &[JobId]) -> rusqlite::Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids = serde_json::Value::from(jobs.to_vec()).to_string();
    let events: Vec<String> = conn
        .prepare_cached(DELETE_DELIVERED)?
        .query_map([ids], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    forget_events(conn, events)
}

/// Drops the bodies of those events that no job and no dead letter needs.
fn forget_events(conn: &Connection, mut events: Vec<String>) -> rusqlite::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    events.sort_unstable();
    events.dedup();
    let events = serde_json::Value::from(events).to_string();
    conn.prepare_cached(FORGET_EVENTS)?.execute([events])?;
    Ok(())
}

/// Deletes dedupe keys older than the window, a bounded number at a time.
fn prune_dedupe(conn: &Connection, before_ms: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM dedupe WHERE key IN (SELECT key FROM dedupe WHERE accepted_at < ?1 LIMIT ?2)",
    )?
    .execute(params![before_ms, DEDUPE_PRUNE_LIMIT as i64])
}

#[cfg(test)]
mod tests {
    use super::*;

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
                leased_until_ms: None,
            };
            insert_postback(&conn, &postback).unwrap();
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
            leased_until_ms: None,
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
            leased_until_ms: None,
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
}
