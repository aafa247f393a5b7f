//! The SQL the store runs, and the mapping of its rows and outcome
//! batches to and from Rust values.

use bytes::Bytes;
use deadpool_postgres::Object;
use futures_util::future::{join_all, BoxFuture};
use futures_util::FutureExt;
use tokio_postgres::types::ToSql;

use super::clean;
use crate::clock::now_ms;
use crate::store::{DeadLetter, JobId, Outcome, QuarantinedBody};

/// Commits a batch of postbacks: dedupe keys (sorted), then the events whose
/// key this batch won, their jobs, and a "no route" dead letter for those
/// without targets. Returns every key with the event id that owns it now.
pub(super) const ACCEPT_SQL: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[], $5::bytea[], $6::text[])
        AS i(key, id, received_at, envelope, raw_body, content_type)
), keyed AS (
    INSERT INTO dedupe AS d (key, event_id, accepted_at)
    SELECT key, id, received_at FROM input ORDER BY key
    ON CONFLICT (key) DO UPDATE SET
        event_id = CASE WHEN d.accepted_at < EXCLUDED.accepted_at - $9
                        THEN EXCLUDED.event_id ELSE d.event_id END,
        accepted_at = CASE WHEN d.accepted_at < EXCLUDED.accepted_at - $9
                           THEN EXCLUDED.accepted_at ELSE d.accepted_at END
    RETURNING d.key, d.event_id
), fresh AS (
    INSERT INTO events (id, received_at, envelope, raw_body, content_type)
    SELECT i.id, i.received_at, i.envelope, i.raw_body, i.content_type
    FROM input i JOIN keyed k ON k.key = i.key AND k.event_id = i.id
    RETURNING id, received_at
), queued AS (
    INSERT INTO jobs (event_id, target, created_at, next_at)
    SELECT f.id, t.target, f.received_at, f.received_at
    FROM unnest($7::text[], $8::text[]) AS t(event_id, target) JOIN fresh f ON f.id = t.event_id
    RETURNING 1
), unrouted AS (
    INSERT INTO dead_letters (event_id, target, reason, attempts, dead_at)
    SELECT f.id, $10::text, 'no route', 0, f.received_at FROM fresh f
    WHERE NOT EXISTS (SELECT 1 FROM unnest($7::text[]) AS t(event_id) WHERE t.event_id = f.id)
    RETURNING 1
)
SELECT key, event_id FROM keyed
"#;

/// Leases due jobs of one target; instances skip each other's locked rows.
pub(super) const CLAIM_SQL: &str = r#"
WITH due AS (
    SELECT id FROM jobs WHERE target = $1 AND next_at <= $2
    ORDER BY next_at, id LIMIT $4
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE jobs j SET next_at = $3, lease_until = $3 FROM due WHERE j.id = due.id
    RETURNING j.id, j.event_id, j.attempts, j.created_at
)
SELECT l.id, l.event_id, l.attempts, l.created_at, e.envelope, e.raw_body, e.content_type
FROM leased l JOIN events e ON e.id = l.event_id
ORDER BY l.id
"#;

/// Locks the events of the jobs being finished (in id order, the same in every
/// transaction), so deciding whether an event is still needed is serialised.
pub(super) const LOCK_EVENTS_SQL: &str = "SELECT id FROM events WHERE id IN \
     (SELECT event_id FROM jobs WHERE id = ANY($1::bigint[])) ORDER BY id FOR UPDATE";
pub(super) const RETRY_SQL: &str = r#"
UPDATE jobs SET attempts = jobs.attempts + u.counted, next_at = u.next_at, lease_until = 0,
    last_status = CASE WHEN u.counted = 1 THEN u.status ELSE jobs.last_status END,
    last_error = COALESCE(u.error, jobs.last_error),
    last_attempt_at = CASE WHEN u.counted = 1 THEN $7 ELSE jobs.last_attempt_at END
FROM unnest($1::bigint[], $2::bigint[], $3::integer[], $4::text[], $5::integer[], $6::bigint[])
    AS u(id, next_at, status, error, counted, lease)
WHERE jobs.id = u.id AND (u.lease IS NULL OR jobs.lease_until = u.lease)
"#;
pub(super) const DEAD_SQL: &str = r#"
INSERT INTO dead_letters (event_id, target, reason, attempts, last_status, last_error, dead_at)
SELECT j.event_id, j.target, u.reason, j.attempts + 1, u.status, u.error, $5
FROM unnest($1::bigint[], $2::text[], $3::integer[], $4::text[]) AS u(id, reason, status, error)
JOIN jobs j ON j.id = u.id
ORDER BY u.id
"#;
pub(super) const DELETE_JOBS_SQL: &str = "DELETE FROM jobs WHERE id = ANY($1::bigint[])";
pub(super) const FORGET_EVENTS_SQL: &str = "DELETE FROM events e WHERE e.id = ANY($1::text[]) \
     AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id) \
     AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = e.id)";
/// Keeps a refused body whole while the running total leaves room for it,
/// else its prefix ($6 the budget, $7 the prefix). The total's row is locked
/// first, so instances sharing the database cannot both take the last room.
pub(super) const QUARANTINE_SQL: &str = r#"
WITH usage AS (SELECT bytes FROM quarantine_usage WHERE id = 1 FOR UPDATE)
INSERT INTO quarantine (body_hash, body, size, truncated, content_type, error,
    first_seen, last_seen, seen_count)
SELECT $1, CASE WHEN u.bytes + length($2::bytea) <= $6 THEN $2::bytea
                ELSE substring($2::bytea FROM 1 FOR $7::integer) END,
    length($2::bytea), u.bytes + length($2::bytea) > $6, $3, $4, $5, $5, 1
FROM usage u
ON CONFLICT (body_hash) DO UPDATE SET last_seen = EXCLUDED.last_seen,
    seen_count = quarantine.seen_count + 1, error = EXCLUDED.error
RETURNING seen_count, truncated
"#;
/// Deletes quarantined bodies last seen before $1, at most $2 of them.
pub(super) const PRUNE_QUARANTINE_SQL: &str = "DELETE FROM quarantine WHERE body_hash IN \
     (SELECT body_hash FROM quarantine WHERE last_seen < $1 LIMIT $2)";
pub(super) const PROBE_SQL: &str = "INSERT INTO heartbeat (id, at) VALUES ($1, $2) \
     ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at";
pub(super) const STATS_SQL: &str = r#"
SELECT target, SUM(pending)::bigint, SUM(dead)::bigint, MIN(oldest)::bigint FROM (
    SELECT target, COUNT(*) AS pending, 0::bigint AS dead, MIN(created_at) AS oldest
    FROM jobs GROUP BY target
    UNION ALL
    SELECT target, 0::bigint, COUNT(*), NULL::bigint FROM dead_letters GROUP BY target
) counts GROUP BY target ORDER BY target
"#;
/// Moves dead letters back to the queue: $1 the letters, ($2, $3) one row per
/// (letter, target) to queue, $4 now. Returns how many letters moved.
pub(super) const REQUEUE_SQL: &str = r#"
WITH taken AS (
    DELETE FROM dead_letters WHERE id = ANY($1::bigint[]) RETURNING id, event_id
), queued AS (
    INSERT INTO jobs (event_id, target, created_at, next_at)
    SELECT t.event_id, p.target, $4, $4
    FROM taken t JOIN unnest($2::bigint[], $3::text[]) AS p(id, target) ON p.id = t.id
    RETURNING 1
)
SELECT COUNT(*) FROM taken
"#;
pub(super) const PURGE_SQL: &str =
    "WITH gone AS (DELETE FROM dead_letters WHERE id = ANY($1::bigint[]) \
     RETURNING event_id) SELECT event_id FROM gone";
pub(super) const LOCK_EVENTS_BY_ID_SQL: &str =
    "SELECT id FROM events WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE";
/// Turns the unleased jobs of a target ($1) into dead letters with reason $2.
pub(super) const DEAD_LETTER_TARGET_SQL: &str = r#"
WITH gone AS (
    DELETE FROM jobs WHERE target = $1 AND lease_until <= $3
    RETURNING event_id, target, attempts, last_status, last_error
)
INSERT INTO dead_letters (event_id, target, reason, attempts, last_status, last_error, dead_at)
SELECT event_id, target, $2, attempts, last_status, last_error, $3 FROM gone
"#;
/// Per target: jobs due or in flight at $1, and the last error of a pending job.
pub(super) const QUEUE_DETAIL_SQL: &str = r#"
SELECT target,
    COUNT(*) FILTER (WHERE next_at <= $1 OR lease_until > $1),
    (ARRAY_AGG(last_error ORDER BY last_attempt_at DESC NULLS LAST)
        FILTER (WHERE last_error IS NOT NULL))[1]
FROM jobs GROUP BY target
"#;
pub(super) const PRUNE_DEDUPE_SQL: &str = "DELETE FROM dedupe WHERE key IN \
     (SELECT key FROM dedupe WHERE accepted_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Starts a transaction whose commit does not wait for the WAL flush.
pub(super) const BEGIN_BOOKKEEPING: &str = "BEGIN; SET LOCAL synchronous_commit TO OFF";
/// Starts a transaction whose commit waits for the WAL flush even where the
/// server's, database's or role's default says otherwise (set per
/// transaction: a default can change, and a pooling proxy may hand each
/// transaction another server connection).
pub(super) const BEGIN_FLUSHED: &str = "BEGIN; SET LOCAL synchronous_commit TO ON";

pub(super) fn quarantined_body(row: &tokio_postgres::Row) -> QuarantinedBody {
    QuarantinedBody {
        body_hash: row.get(0),
        body: Bytes::from(row.get::<_, Vec<u8>>(1)),
        content_type: row.get(2),
        error: row.get(3),
        first_seen_ms: row.get(4),
        last_seen_ms: row.get(5),
        seen_count: row.get::<_, i64>(6).max(0) as u64,
        size: row.get::<_, i64>(7).max(0) as u64,
        truncated: row.get(8),
    }
}

pub(super) fn dead_letter_row(row: &tokio_postgres::Row) -> DeadLetter {
    DeadLetter {
        id: row.get(0),
        event_id: row.get(1),
        target: row.get(2),
        reason: row.get(3),
        attempts: row.get::<_, i32>(4).max(0) as u32,
        last_status: row.get::<_, Option<i32>>(5).map(|s| s.clamp(0, 999) as u16),
        last_error: row.get(6),
        dead_at_ms: row.get(7),
        received_at_ms: row.get(8),
    }
}

/// The outcomes of one batch, sorted into the arrays the statements take.
pub(super) struct OutcomeBatch {
    /// Jobs to delete: delivered, and dead after their dead letter is written.
    finished: Vec<i64>,
    /// Jobs to try again, with when, and the last answer (one array per
    /// column, for `UNNEST`).
    retry_ids: Vec<i64>,
    retry_next: Vec<i64>,
    retry_status: Vec<Option<i32>>,
    /// None keeps the job's last error (a released job was not attempted).
    retry_error: Vec<Option<String>>,
    /// 1 for an attempt made, 0 for a job released unattempted.
    retry_counted: Vec<i32>,
    /// For a released job, the lease it was taken under: only that lease
    /// is given back.
    retry_lease: Vec<Option<i64>>,
    /// Jobs given up, with why and the last answer.
    dead_ids: Vec<i64>,
    dead_reason: Vec<String>,
    dead_status: Vec<Option<i32>>,
    dead_error: Vec<String>,
}

impl OutcomeBatch {
    pub(super) fn new(outcomes: &[(JobId, Outcome)]) -> OutcomeBatch {
        let mut batch = OutcomeBatch {
            finished: Vec::new(),
            retry_ids: Vec::new(),
            retry_next: Vec::new(),
            retry_status: Vec::new(),
            retry_error: Vec::new(),
            retry_counted: Vec::new(),
            retry_lease: Vec::new(),
            dead_ids: Vec::new(),
            dead_reason: Vec::new(),
            dead_status: Vec::new(),
            dead_error: Vec::new(),
        };
        for (job, outcome) in outcomes {
            match outcome {
                Outcome::Delivered => batch.finished.push(*job),
                Outcome::Retry {
                    next_at_ms,
                    status,
                    error,
                } => {
                    batch.retry_ids.push(*job);
                    batch.retry_next.push(*next_at_ms);
                    batch.retry_status.push(status.map(i32::from));
                    batch.retry_error.push(Some(clean(error)));
                    batch.retry_counted.push(1);
                    batch.retry_lease.push(None);
                }
                Outcome::Released { leased_until_ms } => {
                    batch.retry_ids.push(*job);
                    batch.retry_next.push(now_ms());
                    batch.retry_status.push(None);
                    batch.retry_error.push(None);
                    batch.retry_counted.push(0);
                    batch.retry_lease.push(Some(*leased_until_ms));
                }
                Outcome::Dead {
                    reason,
                    status,
                    error,
                } => {
                    batch.finished.push(*job);
                    batch.dead_ids.push(*job);
                    batch.dead_reason.push(clean(reason));
                    batch.dead_status.push(status.map(i32::from));
                    batch.dead_error.push(clean(error));
                }
            }
        }
        batch
    }

    /// Two round trips when jobs finish (lock their events, then write and
    /// commit), one when they are only rescheduled.
    pub(super) async fn write(&self, client: &Object) -> Result<(), tokio_postgres::Error> {
        let (retry, dead, delete, lock, forget) = futures_util::try_join!(
            client.prepare_cached(RETRY_SQL),
            client.prepare_cached(DEAD_SQL),
            client.prepare_cached(DELETE_JOBS_SQL),
            client.prepare_cached(LOCK_EVENTS_SQL),
            client.prepare_cached(FORGET_EVENTS_SQL),
        )?;
        let now = now_ms();
        let events: Vec<String> = if self.finished.is_empty() {
            Vec::new()
        } else {
            let (begun, locked) = futures_util::future::join(
                client.batch_execute(BEGIN_BOOKKEEPING),
                client.query(&lock, &[&self.finished]),
            )
            .await;
            begun?;
            match locked {
                Ok(rows) => rows.iter().map(|row| row.get(0)).collect(),
                Err(err) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    return Err(err);
                }
            }
        };
        let retry_params: [&(dyn ToSql + Sync); 7] = [
            &self.retry_ids,
            &self.retry_next,
            &self.retry_status,
            &self.retry_error,
            &self.retry_counted,
            &self.retry_lease,
            &now,
        ];
        let dead_params: [&(dyn ToSql + Sync); 5] = [
            &self.dead_ids,
            &self.dead_reason,
            &self.dead_status,
            &self.dead_error,
            &now,
        ];
        let finished_params: [&(dyn ToSql + Sync); 1] = [&self.finished];
        let events_params: [&(dyn ToSql + Sync); 1] = [&events];
        let mut steps: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> = Vec::new();
        if self.finished.is_empty() {
            let begin = client.batch_execute(BEGIN_BOOKKEEPING);
            steps.push(begin.map(|r| r.map(|()| 0)).boxed());
        }
        if !self.retry_ids.is_empty() {
            steps.push(client.execute(&retry, &retry_params).boxed());
        }
        if !self.dead_ids.is_empty() {
            steps.push(client.execute(&dead, &dead_params).boxed());
        }
        if !self.finished.is_empty() {
            steps.push(client.execute(&delete, &finished_params).boxed());
        }
        if !events.is_empty() {
            steps.push(client.execute(&forget, &events_params).boxed());
        }
        let commit = client.batch_execute("COMMIT");
        steps.push(commit.map(|r| r.map(|()| 0)).boxed());
        // join_all polls in order, so the statements go out in this order,
        // all at once; the server runs them one after the other, and turns the
        // COMMIT into a rollback if one of them failed.
        for result in join_all(steps).await {
            result?;
        }
        Ok(())
    }
}
