//! [`PostgresStore`] as an [`OperatorStore`]: listings, counts and repairs,
//! each on a pooled connection.

use std::collections::HashMap;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::Object;

use super::statements::{
    dead_letter_row, quarantined_body, FORGET_EVENTS_SQL, LOCK_EVENTS_BY_ID_SQL, PURGE_SQL,
    QUEUE_DETAIL_SQL, REQUEUE_SQL, STATS_SQL,
};
use super::writer::{in_transaction, step_by_step};
use super::PostgresStore;
use crate::clock::now_ms;
use crate::store::{
    DeadLetter, DeadLetterDetail, DeadLetterFilter, DeadLetterId, OperatorStore, Page,
    QuarantineFilter, QuarantineUsage, QuarantinedBody, StoreError, TargetQueue, TargetStats,
    DEAD_LETTER_COLUMNS, DEAD_LETTER_FROM, QUARANTINE_SELECT,
};

#[async_trait]
impl OperatorStore for PostgresStore {
    async fn quarantine_usage(&self) -> Result<QuarantineUsage, StoreError> {
        self.shared
            .with_client(false, async |client: &Object| {
                let row = client
                    .query_one(
                        "SELECT bodies, bytes FROM quarantine_usage WHERE id = 1",
                        &[],
                    )
                    .await?;
                Ok(QuarantineUsage {
                    bodies: row.get::<_, i64>(0).max(0) as u64,
                    bytes: row.get::<_, i64>(1).max(0) as u64,
                })
            })
            .await
    }

    async fn list_quarantine(
        &self,
        filter: &QuarantineFilter,
        page: &Page<(i64, String)>,
    ) -> Result<Vec<QuarantinedBody>, StoreError> {
        let (after_seen, after_hash) = page.after.clone().unwrap_or((i64::MIN, String::new()));
        let limit = page.limit as i64;
        self.shared
            .with_client(false, async |client: &Object| {
                let statement = client
                    .prepare_cached(&format!(
                        "{QUARANTINE_SELECT}
                         WHERE (first_seen, body_hash) > ($1, $2)
                           AND ($3::bigint IS NULL OR last_seen >= $3)
                           AND ($4::bigint IS NULL OR last_seen <= $4)
                         ORDER BY first_seen, body_hash LIMIT $5"
                    ))
                    .await?;
                let rows = client
                    .query(
                        &statement,
                        &[
                            &after_seen,
                            &after_hash,
                            &filter.since_ms,
                            &filter.until_ms,
                            &limit,
                        ],
                    )
                    .await?;
                Ok(rows.iter().map(quarantined_body).collect())
            })
            .await
    }

    async fn quarantined(&self, body_hash: &str) -> Result<Option<QuarantinedBody>, StoreError> {
        self.shared
            .with_client(false, async |client: &Object| {
                let statement = client
                    .prepare_cached(&format!("{QUARANTINE_SELECT} WHERE body_hash = $1"))
                    .await?;
                let row = client.query_opt(&statement, &[&body_hash]).await?;
                Ok(row.as_ref().map(quarantined_body))
            })
            .await
    }

    async fn remove_quarantined(&self, body_hashes: &[String]) -> Result<u64, StoreError> {
        let shared = &self.shared;
        shared
            .with_client(true, async |client: &Object| {
                let statement = client
                    .prepare_cached("DELETE FROM quarantine WHERE body_hash = ANY($1::text[])")
                    .await?;
                in_transaction(
                    client,
                    shared.durable_begin(),
                    client.execute(&statement, &[&body_hashes]),
                )
                .await
            })
            .await
    }

    async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        page: &Page<DeadLetterId>,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let after = page.after.unwrap_or(0);
        let limit = page.limit as i64;
        self.shared
            .with_client(false, async |client: &Object| {
                let statement = client
                    .prepare_cached(&format!(
                        "SELECT {DEAD_LETTER_COLUMNS} {DEAD_LETTER_FROM}
                         WHERE d.id > $1 AND ($2::text IS NULL OR d.target = $2)
                           AND ($3::text IS NULL OR d.reason = $3)
                           AND ($4::bigint IS NULL OR d.dead_at >= $4)
                           AND ($5::bigint IS NULL OR d.dead_at <= $5)
                         ORDER BY d.id LIMIT $6"
                    ))
                    .await?;
                let rows = client
                    .query(
                        &statement,
                        &[
                            &after,
                            &filter.target,
                            &filter.reason,
                            &filter.since_ms,
                            &filter.until_ms,
                            &limit,
                        ],
                    )
                    .await?;
                Ok(rows.iter().map(dead_letter_row).collect())
            })
            .await
    }

    async fn newest_dead_letter_id(&self) -> Result<Option<DeadLetterId>, StoreError> {
        self.shared
            .with_client(false, async |client: &Object| {
                let row = client
                    .query_one("SELECT MAX(id) FROM dead_letters", &[])
                    .await?;
                Ok(row.get(0))
            })
            .await
    }

    async fn dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetterDetail>, StoreError> {
        self.shared
            .with_client(false, async |client: &Object| {
                let statement = client
                    .prepare_cached(&format!(
                        "SELECT {DEAD_LETTER_COLUMNS}, e.envelope, e.raw_body, e.content_type {DEAD_LETTER_FROM} WHERE d.id = $1"
                    ))
                    .await?;
                let row = client.query_opt(&statement, &[&id]).await?;
                Ok(row.map(|row| DeadLetterDetail {
                    letter: dead_letter_row(&row),
                    envelope: Bytes::from(row.get::<_, Vec<u8>>(9)),
                    raw_body: Bytes::from(row.get::<_, Vec<u8>>(10)),
                    content_type: row.get(11),
                }))
            })
            .await
    }

    async fn requeue_dead_letters(
        &self,
        letters: Vec<(DeadLetterId, Vec<String>)>,
    ) -> Result<u64, StoreError> {
        let ids: Vec<i64> = letters.iter().map(|(id, _)| *id).collect();
        let (plan_ids, plan_targets): (Vec<i64>, Vec<String>) = letters
            .iter()
            .flat_map(|(id, targets)| targets.iter().map(move |t| (*id, t.clone())))
            .unzip();
        let now = now_ms();
        let shared = &self.shared;
        shared
            .with_client(true, async |client: &Object| {
                let statement = client.prepare_cached(REQUEUE_SQL).await?;
                let row = in_transaction(
                    client,
                    shared.durable_begin(),
                    client.query_one(&statement, &[&ids, &plan_ids, &plan_targets, &now]),
                )
                .await?;
                Ok(row.get::<_, i64>(0).max(0) as u64)
            })
            .await
    }

    async fn purge_dead_letters(&self, ids: &[DeadLetterId]) -> Result<u64, StoreError> {
        let shared = &self.shared;
        let events: Vec<String> = shared
            .with_client(true, async |client: &Object| {
                let statement = client.prepare_cached(PURGE_SQL).await?;
                let rows = in_transaction(
                    client,
                    shared.durable_begin(),
                    client.query(&statement, &[&ids]),
                )
                .await?;
                Ok(rows.iter().map(|row| row.get(0)).collect())
            })
            .await?;
        let purged = events.len() as u64;
        // Bodies nothing needs any more go, once their events are locked
        // (as delivery does: whoever finishes last deletes them).
        let mut events = events;
        events.sort();
        events.dedup();
        let forgotten = shared
            .with_client(true, async |client: &Object| {
                let (lock, forget) = futures_util::try_join!(
                    client.prepare_cached(LOCK_EVENTS_BY_ID_SQL),
                    client.prepare_cached(FORGET_EVENTS_SQL),
                )?;
                step_by_step(client, shared.durable_begin(), async |client: &Object| {
                    client.query(&lock, &[&events]).await?;
                    client.execute(&forget, &[&events]).await
                })
                .await
            })
            .await;
        // The purge itself committed: say so even if the clean-up failed
        // (the bodies then stay, unused, until deleted by hand).
        if let Err(err) = forgotten {
            tracing::warn!(error = %err, events = events.len(),
                "dead letters purged, but their postbacks' bodies could not be deleted");
        }
        Ok(purged)
    }

    async fn queue(&self) -> Result<Vec<TargetQueue>, StoreError> {
        let stats = self.stats().await?;
        let now = now_ms();
        let details: HashMap<String, (i64, Option<String>)> = self
            .shared
            .with_client(false, async |client: &Object| {
                let statement = client.prepare_cached(QUEUE_DETAIL_SQL).await?;
                let rows = client.query(&statement, &[&now]).await?;
                Ok(rows
                    .iter()
                    .map(|row| (row.get(0), (row.get(1), row.get(2))))
                    .collect())
            })
            .await?;
        Ok(stats
            .into_iter()
            .map(|stats| {
                let (due, last_error) = details.get(&stats.target).cloned().unwrap_or_default();
                TargetQueue {
                    due: due.max(0) as u64,
                    last_error,
                    stats,
                }
            })
            .collect())
    }

    async fn stats(&self) -> Result<Vec<TargetStats>, StoreError> {
        self.shared
            .with_client(false, async |client: &Object| {
                let statement = client.prepare_cached(STATS_SQL).await?;
                let rows = client.query(&statement, &[]).await?;
                Ok(rows
                    .iter()
                    .map(|row| TargetStats {
                        target: row.get(0),
                        pending: row.get::<_, i64>(1).max(0) as u64,
                        dead: row.get::<_, i64>(2).max(0) as u64,
                        oldest_pending_ms: row.get(3),
                    })
                    .collect())
            })
            .await
    }
}
