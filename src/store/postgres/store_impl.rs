//! [`PostgresStore`] as a [`Store`]: each call runs on a pooled connection
//! or joins an accept writer's batch.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::Object;
use tokio::sync::oneshot;

use super::statements::{
    OutcomeBatch, BEGIN_BOOKKEEPING, CLAIM_SQL, DEAD_LETTER_TARGET_SQL, PROBE_SQL, QUARANTINE_SQL,
};
use super::writer::in_transaction;
use super::{clean, Accept, PostgresStore};
use crate::clock::now_ms;
use crate::store::{
    Acceptance, AfterCommit, Job, JobId, Kept, NewPostback, Outcome, QuarantineEntry, Store,
    StoreError, QUARANTINE_PREFIX_BYTES,
};

#[async_trait]
impl Store for PostgresStore {
    async fn accept(
        &self,
        postback: NewPostback,
        after: Option<AfterCommit>,
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
        if let (Acceptance::Accepted, Some(after)) = (&acceptance, after) {
            (after.run)(&[]);
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
