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

mod housekeeping;
mod intake;
mod leases;
mod operator;
mod schema;
mod statements;
mod store_impl;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use self::housekeeping::{
    start_quarantine_janitor, Checkpointer, CHECKPOINT_BUSY_TIMEOUT, WAL_SIZE_LIMIT_BYTES,
};
use self::intake::Intake;
use self::leases::Leases;
use self::schema::{create_parent_dirs, migrate, open_connection};
use self::statements::insert_postback;
use self::writer::{Maintenance, Moving, Watermark, Work, Writer};
use crate::clock::now_ms;
use crate::config::SyncMode;
use crate::store::{Job, JobId, Kept, Outcome, QuarantineEntry, QuarantineLimits, StoreError};

/// Commands waiting for the writer before callers wait for room.
const QUEUE_CAPACITY: usize = 4 * 1024;
/// How long an accept waits for room in the writer's queue before it gives
/// up with a 503: a flood waits its turn, a locked database is reported.
const QUEUE_WAIT: Duration = Duration::from_secs(2);

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

/// The SQLite implementation of [`Store`](super::Store).
pub struct SqliteStore {
    commands: mpsc::Sender<Command>,
    /// The database's directory, whose filesystem readiness watches.
    directory: PathBuf,
    min_free_bytes: u64,
    quarantine: QuarantineLimits,
    reader: Arc<Mutex<Connection>>,
    intake: Arc<Intake>,
    /// Bytes of the moves not yet done (see [`QUEUE_BYTES`](writer::QUEUE_BYTES)).
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
            .map_err(|err| {
                StoreError::database_from(format!("cannot start writer thread: {err}"), err)
            })?;
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
            insert_postback(&tx, &record.postback, None).map_err(db_error)?;
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

pub(super) fn db_error(err: rusqlite::Error) -> StoreError {
    StoreError::database_from(err.to_string(), err)
}
