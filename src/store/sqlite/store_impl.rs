//! [`SqliteStore`] as a [`Store`]: each call becomes a read on the reader
//! connection or a command for the writer thread.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{params, OptionalExtension};

use super::intake::{Appended, Journaled};
use super::statements::{
    dead_letter_row, forget_events, quarantined_body, read_quarantine, read_stats,
};
use super::writer::{Moving, QueuedBytes};
use super::{Command, SqliteStore, QUEUE_WAIT};
use crate::store::{
    now_ms, Acceptance, DeadLetter, DeadLetterDetail, DeadLetterFilter, DeadLetterId, Job, JobId,
    Kept, NewPostback, OnCommit, Outcome, Page, QuarantineEntry, QuarantineFilter, QuarantineUsage,
    QuarantinedBody, Store, StoreError, TargetQueue, TargetStats, DEAD_LETTER_COLUMNS,
    DEAD_LETTER_FROM, QUARANTINE_SELECT,
};

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
