//! [`SqliteStore`] as an [`OperatorStore`]: listings and counts on the
//! reader connection, repairs as maintenance commands for the writer.

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{params, OptionalExtension};

use super::statements::{
    dead_letter_row, forget_events, quarantined_body, read_quarantine, read_stats,
};
use super::SqliteStore;
use crate::clock::now_ms;
use crate::store::{
    DeadLetter, DeadLetterDetail, DeadLetterFilter, DeadLetterId, OperatorStore, Page,
    QuarantineFilter, QuarantineUsage, QuarantinedBody, StoreError, TargetQueue, TargetStats,
    DEAD_LETTER_COLUMNS, DEAD_LETTER_FROM, QUARANTINE_SELECT,
};

#[async_trait]
impl OperatorStore for SqliteStore {
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

    async fn stats(&self) -> Result<Vec<TargetStats>, StoreError> {
        self.read(read_stats).await
    }
}
