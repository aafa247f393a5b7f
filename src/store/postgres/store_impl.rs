//! [`PostgresStore`] as a [`Store`]: each call runs on a pooled connection
//! or joins an accept writer's batch.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::Object;
use tokio::sync::oneshot;

use super::statements::{
    dead_letter_row, quarantined_body, OutcomeBatch, BEGIN_BOOKKEEPING, CLAIM_SQL,
    DEAD_LETTER_TARGET_SQL, FORGET_EVENTS_SQL, LOCK_EVENTS_BY_ID_SQL, PROBE_SQL, PURGE_SQL,
    QUARANTINE_SQL, QUEUE_DETAIL_SQL, REQUEUE_SQL, STATS_SQL,
};
use super::writer::{in_transaction, step_by_step};
use super::{clean, Accept, PostgresStore};
use crate::store::{
    now_ms, Acceptance, DeadLetter, DeadLetterDetail, DeadLetterFilter, DeadLetterId, Job, JobId,
    Kept, NewPostback, OnCommit, Outcome, Page, QuarantineEntry, QuarantineFilter, QuarantineUsage,
    QuarantinedBody, Store, StoreError, TargetQueue, TargetStats, DEAD_LETTER_COLUMNS,
    DEAD_LETTER_FROM, QUARANTINE_PREFIX_BYTES, QUARANTINE_SELECT,
};

#[async_trait]
impl Store for PostgresStore {
    async fn accept(
        &self,
        postback: NewPostback,
        on_commit: Option<OnCommit>,
    ) -> Result<Acceptance, StoreError> {
        let held = self.hold(&postback)?;
        let (reply, answer) = oneshot::channel();
        self.accepts
            .send(Accept {
                postback,
                reply,
                _held: held,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        let acceptance = answer.await.map_err(|_| StoreError::Closed)??;
        // Committed, and the jobs are due at once (this backend does not
        // lease fresh jobs): whoever waits for them may claim now.
        if let (Acceptance::Accepted, Some(on_commit)) = (&acceptance, on_commit) {
            on_commit(&[]);
        }
        Ok(acceptance)
    }

    async fn quarantine(&self, entry: QuarantineEntry) -> Result<Kept, StoreError> {
        let shared = &self.shared;
        let max_bytes = shared.quarantine.max_bytes.min(i64::MAX as u64) as i64;
        let prefix = QUARANTINE_PREFIX_BYTES as i32;
        shared
            .with_client(true, async |client: &Object| {
                let statement = client.prepare_cached(QUARANTINE_SQL).await?;
                let content_type = entry.content_type.as_deref().map(clean);
                let error = clean(&entry.error);
                let row = in_transaction(
                    client,
                    shared.durable_begin(),
                    client.query_one(
                        &statement,
                        &[
                            &entry.body_hash,
                            &&entry.body[..],
                            &content_type,
                            &error,
                            &entry.received_at_ms,
                            &max_bytes,
                            &prefix,
                        ],
                    ),
                )
                .await?;
                Ok(match (row.get::<_, i64>(0), row.get::<_, bool>(1)) {
                    (1, false) => Kept::Whole,
                    (1, true) => Kept::Prefix,
                    _ => Kept::Again,
                })
            })
            .await
    }

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

    async fn dead_letter_target(&self, target: &str, reason: &str) -> Result<u64, StoreError> {
        let now = now_ms();
        let shared = &self.shared;
        shared
            .with_client(true, async |client: &Object| {
                let statement = client.prepare_cached(DEAD_LETTER_TARGET_SQL).await?;
                in_transaction(
                    client,
                    shared.durable_begin(),
                    client.execute(&statement, &[&target, &reason, &now]),
                )
                .await
            })
            .await
    }

    async fn set_paused(&self, target: &str, paused: bool) -> Result<(), StoreError> {
        let now = now_ms();
        let shared = &self.shared;
        shared
            .with_client(true, async |client: &Object| {
                if paused {
                    let statement = client
                        .prepare_cached(
                            "INSERT INTO target_pauses (target, paused_at) VALUES ($1, $2) \
                             ON CONFLICT (target) DO NOTHING",
                        )
                        .await?;
                    in_transaction(
                        client,
                        shared.durable_begin(),
                        client.execute(&statement, &[&target, &now]),
                    )
                    .await
                } else {
                    let statement = client
                        .prepare_cached("DELETE FROM target_pauses WHERE target = $1")
                        .await?;
                    in_transaction(
                        client,
                        shared.durable_begin(),
                        client.execute(&statement, &[&target]),
                    )
                    .await
                }
                .map(drop)
            })
            .await
    }

    async fn paused_targets(&self) -> Result<Vec<String>, StoreError> {
        self.shared
            .with_client(false, async |client: &Object| {
                let statement = client
                    .prepare_cached("SELECT target FROM target_pauses ORDER BY target")
                    .await?;
                let rows = client.query(&statement, &[]).await?;
                Ok(rows.iter().map(|row| row.get(0)).collect())
            })
            .await
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

    async fn claim(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, StoreError> {
        let lease = self.shared.lease.unwrap_or(lease);
        let now = now_ms();
        let lease_until = now + lease.as_millis() as i64;
        let limit = limit as i64;
        let jobs = self
            .shared
            .with_client(false, async |client: &Object| {
                let statement = client.prepare_cached(CLAIM_SQL).await?;
                let rows = in_transaction(
                    client,
                    BEGIN_BOOKKEEPING,
                    client.query(&statement, &[&target, &now, &lease_until, &limit]),
                )
                .await?;
                Ok(rows
                    .iter()
                    .map(|row| Job {
                        id: row.get(0),
                        tracking_id: None,
                        event_id: row.get(1),
                        target: target.to_owned(),
                        attempts: row.get::<_, i32>(2).max(0) as u32,
                        created_at_ms: row.get(3),
                        envelope: Bytes::from(row.get::<_, Vec<u8>>(4)),
                        raw_body: Bytes::from(row.get::<_, Vec<u8>>(5)),
                        content_type: row.get(6),
                        leased_until_ms: lease_until,
                    })
                    .collect::<Vec<Job>>())
            })
            .await?;
        if !jobs.is_empty() {
            // Rows were written: the store can commit.
            self.shared.ready.store(true, Ordering::Relaxed);
        }
        Ok(jobs)
    }

    async fn complete(&self, outcomes: Vec<(JobId, Outcome)>) -> Result<(), StoreError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let batch = OutcomeBatch::new(&outcomes);
        match self.shared.write_outcomes(&batch).await {
            Err(failure) if failure.per_item && outcomes.len() > 1 => {
                // Something in the batch upset the server: write them one by
                // one so that only the culprit fails.
                let mut first_error = None;
                for single in outcomes.chunks(1) {
                    if let Err(failure) =
                        self.shared.write_outcomes(&OutcomeBatch::new(single)).await
                    {
                        first_error.get_or_insert(failure.error);
                    }
                }
                first_error.map_or(Ok(()), Err)
            }
            result => result.map_err(|failure| failure.error),
        }
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let shared = &self.shared;
        shared
            .with_client(true, async |client: &Object| {
                let statement = client.prepare_cached(PROBE_SQL).await?;
                in_transaction(
                    client,
                    shared.durable_begin(),
                    client.execute(&statement, &[&shared.instance, &now_ms()]),
                )
                .await
                .map(drop)
            })
            .await
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

    fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Writers answer everything already queued, then stop.
        self.closing.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
        self.shared.pool.close();
        Ok(())
    }
}
