//! Background upkeep beside the writer: WAL checkpoints on their own
//! thread, and the quarantine's retention janitor.

use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::statements::prune_quarantine;
use super::writer::Work;
use super::Command;
use crate::store::{QuarantineLimits, StoreError, QUARANTINE_PRUNE_LIMIT};

/// How often committed WAL frames are copied into the database file.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// How long a checkpoint waits for a lock before trying again next time.
pub(super) const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_millis(20);
/// WAL length (frames of 4 KiB) past which the checkpointer forces the WAL
/// to start over, and the size the file is truncated back to afterwards.
pub(super) const WAL_RESTART_FRAMES: i64 = 16 * 1024;
pub(super) const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// Runs a checkpoint and returns the WAL's length in frames.
pub(super) fn wal_frames(conn: &Connection, mode: &str) -> rusqlite::Result<i64> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        row.get(1)
    })
}

/// Copies committed WAL frames into the database file on its own connection
/// and thread, so no commit anyone waits for runs a checkpoint. It uses the
/// configured `synchronous` level, which keeps SQLite's ordering (WAL synced
/// before the database is written) even though bookkeeping commits skip their
/// fsync. Dropping it stops the thread.
pub(super) struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    pub(super) fn start(conn: Connection) -> Result<Checkpointer, StoreError> {
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
                StoreError::database_from(format!("cannot start checkpoint thread: {err}"), err)
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

/// The quarantine's retention janitor: a thread that, every
/// [`QuarantineLimits::prune_every`], has the writer delete expired bodies
/// (in bounded transactions). It holds the writer's queue weakly: it ends
/// with the store.
pub(super) fn start_quarantine_janitor(
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
        .map_err(|err| {
            StoreError::database_from(format!("cannot start the quarantine janitor: {err}"), err)
        })
}
