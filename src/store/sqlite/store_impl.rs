//! [`SqliteStore`] as a [`Store`]: each call becomes a read on the reader
//! connection or a command for the writer thread.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::params;

use super::intake::{Appended, Journaled};
use super::writer::{Moving, QueuedBytes};
use super::{Command, SqliteStore, QUEUE_WAIT};
use crate::clock::now_ms;
use crate::store::{
    Acceptance, AfterCommit, Job, JobId, Kept, NewPostback, Outcome, QuarantineEntry, Store,
    StoreError,
};

#[async_trait]
impl Store for SqliteStore {
    async fn accept(
        &self,
        postback: NewPostback,
        after: Option<AfterCommit>,
    ) -> Result<Acceptance, StoreError> {
        let queued = QueuedBytes::take(&self.queued_bytes, &postback)?;
        // Room for the move first: from the append to the send nothing
        // awaits, so a caller that goes away cannot strand a journaled
        // record outside the writer's reach. A writer that stays behind (a
        // locked or full database) gets a 503, not an endless wait.
        let room = tokio::time::timeout(QUEUE_WAIT, self.commands.reserve())
            .await
            .map_err(|_| StoreError::database("the store's writer is too far behind; retry later"))?
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
            after,
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
