//! The single writer thread: takes the waiting commands, applies them in one
//! transaction (each in its own savepoint), commits once, then answers.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::mpsc;

use super::housekeeping::Checkpointer;
use super::intake::{Intake, Journaled};
use super::leases::Leases;
use super::statements::{claim, complete_all, insert_postback, prune_dedupe, quarantine};
use super::{db_error, Command, Reply};
use crate::clock::now_ms;
use crate::config::SyncMode;
use crate::store::{AfterCommit, JobId, NewPostback, StoreError};

/// How often expired dedupe keys are deleted, and how many per transaction:
/// a round deletes batch after batch until none is left, one per
/// transaction, so the writer serves its queue between batches.
pub(super) const DEDUPE_PRUNE_EVERY: Duration = Duration::from_secs(60);
pub(super) const DEDUPE_PRUNE_LIMIT: usize = 10_000;
/// Commands taken into one transaction at most; bounds the latency of a batch.
pub(super) const MAX_BATCH: usize = 512;
/// Bytes of postbacks (body and envelope) on their way from the journal into
/// SQLite, queued or stalled, beyond which an accept is refused at once (a
/// 503 with Retry-After): moves carry whole bodies, and with large ones the
/// count above alone would let a stalled writer hold gigabytes.
pub(super) const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// How often the writer makes its moves from the intake journal durable
/// (one fsync), after which the journal's covered segments are deleted.
pub(super) const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// How long the writer lets moves gather before it takes them in: nobody
/// waits for a move (the postback is acknowledged from the journal), and one
/// transaction for many postbacks writes each b-tree page once instead of
/// once per postback. It delays the start of fresh deliveries by as much.
pub(super) const MOVE_GATHER: Duration = Duration::from_millis(1);
/// How long the writer waits before trying again to move postbacks that
/// SQLite refused (a full disk); they stay safe in the journal meanwhile.
pub(super) const STALLED_RETRY: Duration = Duration::from_millis(100);

/// The single writer: owns the write connection.
pub(super) struct Writer {
    pub(super) conn: Connection,
    /// The configured `synchronous` level for acknowledged writes.
    pub(super) sync: SynchronousLevel,
    /// The level the connection is at now (None: unknown).
    pub(super) current_sync: Option<SynchronousLevel>,
    /// Runs WAL checkpoints beside the writer; stopped before closing.
    pub(super) checkpointer: Option<Checkpointer>,
    pub(super) dedupe_window_ms: i64,
    pub(super) ready: Arc<AtomicBool>,
    /// When expired dedupe keys were last deleted.
    pub(super) last_prune: std::time::Instant,
    /// A pruning round is under way: the last batch was full.
    pub(super) pruning: bool,
    /// Where accepted postbacks wait to be moved in.
    pub(super) intake: Arc<Intake>,
    /// How far the journal is moved into SQLite (committed).
    pub(super) watermark: Watermark,
    /// How far a durable commit holds the moves: the journal may go that far.
    pub(super) durable_through: u64,
    pub(super) last_durable: std::time::Instant,
    /// Moves SQLite refused (a full disk), tried again after [`STALLED_RETRY`].
    pub(super) stalled: Vec<Moving>,
    /// The dispatchers' claims (see `store::sqlite::leases`).
    pub(super) leases: Leases,
}

/// An acknowledged postback on its way from the journal into SQLite.
pub(super) struct Moving {
    pub(super) journaled: Journaled,
    pub(super) after: Option<AfterCommit>,
    /// Its share of [`QUEUE_BYTES`], given back when the move is done.
    pub(super) _queued: QueuedBytes,
}

/// A postback's bytes counted against [`QUEUE_BYTES`] until dropped.
pub(super) struct QueuedBytes {
    total: Arc<AtomicUsize>,
    bytes: usize,
}

impl QueuedBytes {
    /// Counts `postback` in, or refuses it when the queue holds too much
    /// already (one postback alone is always let in).
    pub(super) fn take(
        total: &Arc<AtomicUsize>,
        postback: &NewPostback,
    ) -> Result<QueuedBytes, StoreError> {
        let bytes = postback.raw_body.len() + postback.envelope.len();
        let before = total.fetch_add(bytes, Ordering::AcqRel);
        let queued = QueuedBytes {
            total: total.clone(),
            bytes,
        };
        if before > 0 && before + bytes > QUEUE_BYTES {
            return Err(StoreError::database(format!(
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
pub(super) struct Watermark {
    pub(super) through: u64,
    pub(super) ahead: BTreeSet<u64>,
}

impl Watermark {
    pub(super) fn with(&self, moved: impl Iterator<Item = u64>) -> Watermark {
        let mut next = self.clone();
        next.ahead.extend(moved);
        while next.ahead.remove(&(next.through + 1)) {
            next.through += 1;
        }
        next
    }
}

/// A computed answer, held back until the batch commits.
pub(super) trait Pending: Send {
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
pub(super) struct Applied {
    answers: Vec<Box<dyn Pending>>,
    moves: Vec<Moved>,
}

/// A move with its inserted jobs' ids, or why SQLite refused it.
pub(super) type Moved = (Box<Moving>, Result<Vec<JobId>, StoreError>);

impl Writer {
    pub(super) fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
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
            if let Some(after) = moving.after {
                (after.run)(&ids);
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
                        let lease = moving.after.as_ref().and_then(|a| a.leased_until_ms);
                        insert_postback(c, &moving.journaled.postback, lease)
                    });
                    applied.moves.push((moving, result));
                }
                other => applied.answers.push(self.apply_one(other)),
            }
            // Some errors (disk full, I/O) roll back the whole transaction:
            // then nothing of this batch can be committed.
            if self.conn.is_autocommit() {
                aborted = Some(StoreError::database(
                    "transaction rolled back by the database",
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
        let wanted = if durable {
            self.sync
        } else {
            SynchronousLevel::Off
        };
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
pub(super) fn isolated<T>(
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
pub(super) trait Maintenance: Send {
    /// Runs it in the current transaction; the answer waits for the commit.
    fn apply(self: Box<Self>, conn: &Connection) -> Box<dyn Pending>;
    /// Answers `err` without running it.
    fn fail(self: Box<Self>, err: &StoreError);
}

pub(super) struct Work<T, F> {
    pub(super) work: F,
    pub(super) reply: Reply<T>,
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

/// Runs a statement without parameters or rows, prepared once per connection
/// (transaction control is on every batch's path).
pub(super) fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
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

/// SQLite `PRAGMA synchronous` levels the writer switches between: the
/// configured one ([`SyncMode`]) for acknowledged writes, `Off` for
/// writes no caller is answered on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SynchronousLevel {
    Full,
    Normal,
    Off,
}

impl SynchronousLevel {
    fn pragma(self) -> &'static str {
        match self {
            SynchronousLevel::Full => "PRAGMA synchronous = FULL",
            SynchronousLevel::Normal => "PRAGMA synchronous = NORMAL",
            SynchronousLevel::Off => "PRAGMA synchronous = OFF",
        }
    }
}

impl From<SyncMode> for SynchronousLevel {
    fn from(mode: SyncMode) -> SynchronousLevel {
        match mode {
            SyncMode::Full => SynchronousLevel::Full,
            SyncMode::Normal => SynchronousLevel::Normal,
        }
    }
}

/// Answers a command that cannot run because its batch already failed.
pub(super) fn fail(command: Command, error: &StoreError) {
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
