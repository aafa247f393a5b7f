//! Background upkeep: the dedupe and heartbeat janitor and the
//! quarantine's retention janitor, each deleting in bounded batches.

use std::sync::Arc;

use deadpool_postgres::Object;
use tokio_util::sync::CancellationToken;

use super::statements::{PRUNE_DEDUPE_SQL, PRUNE_QUARANTINE_SQL};
use super::{Shared, DEDUPE_PRUNE_LIMIT, DEDUPE_PRUNE_ROUNDS, HEARTBEAT_KEEP_MS, JANITOR_EVERY};
use crate::clock::now_ms;
use crate::store::QUARANTINE_PRUNE_LIMIT;

impl Shared {
    /// Runs `sql`, a DELETE of at most `$2` rows older than `$1`, again while
    /// it deletes a full batch, at most `rounds` times (or until closing):
    /// a backlog is cleared without one statement holding locks for long.
    /// Returns the rows deleted; a failure is logged and ends the round.
    pub(super) async fn delete_in_batches(
        &self,
        sql: &'static str,
        before: i64,
        limit: i64,
        rounds: usize,
        closing: &CancellationToken,
        what: &str,
    ) -> u64 {
        let mut total = 0;
        for _ in 0..rounds {
            let result = self
                .with_client(false, async |client: &Object| {
                    client.execute(sql, &[&before, &limit]).await
                })
                .await;
            match result {
                Ok(deleted) => {
                    total += deleted;
                    if deleted < limit as u64 || closing.is_cancelled() {
                        break;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not delete {what}");
                    break;
                }
            }
        }
        total
    }

    /// Deletes quarantined bodies past `quarantine.retention` every
    /// [`QuarantineLimits::prune_every`](crate::store::QuarantineLimits::prune_every), in bounded statements.
    pub(super) async fn run_quarantine_janitor(self: Arc<Self>, closing: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.quarantine.prune_every()) => {},
                () = closing.cancelled() => return,
            }
            let before = self.quarantine.expired_before_ms();
            let total = self
                .delete_in_batches(
                    PRUNE_QUARANTINE_SQL,
                    before,
                    QUARANTINE_PRUNE_LIMIT,
                    usize::MAX,
                    &closing,
                    "expired quarantined bodies",
                )
                .await;
            if total > 0 {
                tracing::info!(
                    deleted = total,
                    "quarantined bodies past quarantine.retention deleted"
                );
            }
        }
    }

    /// Deletes expired dedupe keys and old heartbeats now and then.
    pub(super) async fn run_janitor(self: Arc<Self>, closing: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(JANITOR_EVERY) => {},
                () = closing.cancelled() => return,
            }
            let before = now_ms() - self.dedupe_window_ms;
            // A bounded number of bounded deletes, so a large backlog of
            // expired keys never holds locks for long.
            let total = self
                .delete_in_batches(
                    PRUNE_DEDUPE_SQL,
                    before,
                    DEDUPE_PRUNE_LIMIT,
                    DEDUPE_PRUNE_ROUNDS,
                    &closing,
                    "expired dedupe keys",
                )
                .await;
            if total > 0 {
                tracing::debug!(pruned = total, "expired dedupe keys deleted");
            }
            let stale = now_ms() - HEARTBEAT_KEEP_MS;
            let _ = self
                .with_client(false, async |client: &Object| {
                    client
                        .execute("DELETE FROM heartbeat WHERE at < $1", &[&stale])
                        .await
                })
                .await;
        }
    }
}
