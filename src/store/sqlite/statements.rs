//! The SQL the writer and the reader run: one function per statement or
//! short group of statements, each on a connection it is given.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension};

use super::leases::Leases;
use super::writer::DEDUPE_PRUNE_LIMIT;
use crate::clock::now_ms;
use crate::store::{
    DeadLetter, Job, JobId, Kept, NewPostback, Outcome, Page, QuarantineEntry, QuarantineFilter,
    QuarantinedBody, TargetStats, NO_ROUTE_TARGET, QUARANTINE_PREFIX_BYTES, QUARANTINE_PRUNE_LIMIT,
    QUARANTINE_SELECT,
};

pub(super) fn read_stats(conn: &Connection) -> rusqlite::Result<Vec<TargetStats>> {
    let mut counts: BTreeMap<String, TargetStats> = BTreeMap::new();
    // Both scans read only the (target, next_at) index; job ids grow with
    // creation, so the smallest id per target is its oldest job.
    let mut pending =
        conn.prepare_cached("SELECT target, COUNT(*), MIN(id) FROM jobs GROUP BY target")?;
    let mut created = conn.prepare_cached("SELECT created_at FROM jobs WHERE id = ?1")?;
    let rows: Vec<(String, i64, i64)> = pending
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (target, count, oldest_id) in rows {
        let oldest_pending_ms = created
            .query_row([oldest_id], |row| row.get(0))
            .optional()?;
        counts.insert(
            target.clone(),
            TargetStats {
                target,
                pending: count.max(0) as u64,
                dead: 0,
                oldest_pending_ms,
            },
        );
    }
    let mut dead =
        conn.prepare_cached("SELECT target, COUNT(*) FROM dead_letters GROUP BY target")?;
    let rows = dead.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })?;
    for row in rows {
        let (target, count) = row?;
        counts
            .entry(target.clone())
            .or_insert(TargetStats {
                target,
                pending: 0,
                dead: 0,
                oldest_pending_ms: None,
            })
            .dead = count.max(0) as u64;
    }
    Ok(counts.into_values().collect())
}

pub(super) fn quarantined_body(row: &rusqlite::Row<'_>) -> rusqlite::Result<QuarantinedBody> {
    Ok(QuarantinedBody {
        body_hash: row.get(0)?,
        body: Bytes::from(row.get::<_, Vec<u8>>(1)?),
        content_type: row.get(2)?,
        error: row.get(3)?,
        first_seen_ms: row.get(4)?,
        last_seen_ms: row.get(5)?,
        seen_count: row.get::<_, i64>(6)?.max(0) as u64,
        size: row.get::<_, i64>(7)?.max(0) as u64,
        truncated: row.get(8)?,
    })
}

pub(super) fn read_quarantine(
    conn: &Connection,
    filter: &QuarantineFilter,
    page: &Page<(i64, String)>,
) -> rusqlite::Result<Vec<QuarantinedBody>> {
    let (after_seen, after_hash) = page.after.clone().unwrap_or((i64::MIN, String::new()));
    conn.prepare_cached(&format!(
        "{QUARANTINE_SELECT}
         WHERE (first_seen, body_hash) > (?1, ?2)
           AND (?3 IS NULL OR last_seen >= ?3) AND (?4 IS NULL OR last_seen <= ?4)
         ORDER BY first_seen, body_hash LIMIT ?5"
    ))?
    .query_map(
        params![
            after_seen,
            after_hash,
            filter.since_ms,
            filter.until_ms,
            page.limit as i64
        ],
        quarantined_body,
    )?
    .collect()
}

pub(super) fn dead_letter_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: row.get(0)?,
        event_id: row.get(1)?,
        target: row.get(2)?,
        reason: row.get(3)?,
        attempts: row.get(4)?,
        last_status: row.get(5)?,
        last_error: row.get(6)?,
        dead_at_ms: row.get(7)?,
        received_at_ms: row.get(8)?,
    })
}

/// Inserts an acknowledged postback with its jobs and dedupe key; returns
/// the jobs' ids in target order. A postback already there (moved before a
/// crash left the journal behind) is skipped: no jobs, no ids. With
/// `leased_until_ms` the jobs are inserted leased to this process (see
/// [`AfterCommit`](crate::store::AfterCommit)).
pub(super) fn insert_postback(
    conn: &Connection,
    postback: &NewPostback,
    leased_until_ms: Option<i64>,
) -> rusqlite::Result<Vec<JobId>> {
    let now = postback.received_at_ms;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO events (id, received_at, envelope, raw_body, content_type) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            postback.id,
            now,
            &postback.envelope[..],
            &postback.raw_body[..],
            postback.content_type
        ])?;
    if inserted == 0 {
        return Ok(Vec::new());
    }
    conn.prepare_cached(
        "INSERT INTO dedupe (key, event_id, accepted_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET event_id = excluded.event_id, accepted_at = excluded.accepted_at",
    )?
    .execute(params![postback.dedupe_key, postback.id, now])?;
    if postback.targets.is_empty() {
        conn.prepare_cached(
            "INSERT INTO dead_letters (event_id, target, reason, attempts, dead_at) VALUES (?1, ?2, 'no route', 0, ?3)",
        )?
        .execute(params![postback.id, NO_ROUTE_TARGET, now])?;
    }
    let mut insert_job = conn.prepare_cached(
        "INSERT INTO jobs (event_id, target, created_at, next_at, lease_until) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let (next_at, lease_until) = match leased_until_ms {
        None => (now, 0),
        Some(until) => (until, until),
    };
    let mut ids = Vec::with_capacity(postback.targets.len());
    for target in &postback.targets {
        insert_job.execute(params![postback.id, target, now, next_at, lease_until])?;
        ids.push(conn.last_insert_rowid());
    }
    Ok(ids)
}

/// Keeps a refused body whole while the running total (`quarantine_usage`,
/// kept by triggers) leaves room for it, else its prefix.
pub(super) fn quarantine(
    conn: &Connection,
    entry: &QuarantineEntry,
    max_bytes: u64,
) -> rusqlite::Result<Kept> {
    conn.prepare_cached(
        "INSERT INTO quarantine (body_hash, body, size, truncated, content_type, error,
             first_seen, last_seen, seen_count)
         SELECT ?1, CASE WHEN u.bytes + length(?2) <= ?6 THEN ?2 ELSE substr(?2, 1, ?7) END,
             length(?2), u.bytes + length(?2) > ?6, ?3, ?4, ?5, ?5, 1
         FROM quarantine_usage u WHERE u.id = 1
         ON CONFLICT (body_hash) DO UPDATE SET last_seen = excluded.last_seen,
             seen_count = seen_count + 1, error = excluded.error
         RETURNING seen_count, truncated",
    )?
    .query_row(
        params![
            entry.body_hash,
            &entry.body[..],
            entry.content_type,
            entry.error,
            entry.received_at_ms,
            max_bytes.min(i64::MAX as u64) as i64,
            QUARANTINE_PREFIX_BYTES as i64,
        ],
        |row| {
            Ok(match (row.get::<_, i64>(0)?, row.get::<_, bool>(1)?) {
                (1, false) => Kept::Whole,
                (1, true) => Kept::Prefix,
                _ => Kept::Again,
            })
        },
    )
}

/// Deletes quarantined bodies last seen before `before_ms`, a bounded number
/// at a time; returns how many.
pub(super) fn prune_quarantine(conn: &Connection, before_ms: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM quarantine WHERE body_hash IN
             (SELECT body_hash FROM quarantine WHERE last_seen < ?1 LIMIT ?2)",
    )?
    .execute(params![before_ms, QUARANTINE_PRUNE_LIMIT])
}

/// A target's due jobs, oldest first: the `jobs_due` index range yields them
/// in `(next_at, id)` order, and the claim stops reading once it has enough.
/// No `ORDER BY` (beside the bound target), no bound `LIMIT`, no join:
/// SQLite, built with STAT4 as rusqlite bundles it, compiles each of those
/// anew for every new binding — a statement compile per claim, measured as
/// 14 % of the writer's samples while draining a backlog.
pub(super) const CLAIM_DUE: &str =
    "SELECT id, event_id, attempts, created_at FROM jobs INDEXED BY jobs_due
     WHERE target = ?1 AND next_at <= ?2";

/// The bodies a claimed job is sent with.
pub(super) const CLAIM_EVENT: &str =
    "SELECT envelope, raw_body, content_type FROM events WHERE id = ?1";

/// Leases due jobs in memory ([`Leases`]): a read, stepping over the due
/// jobs already leased (at most the dispatchers' rounds in flight).
///
/// See [`CLAIM_DUE`] for why the scan is written as it is.
pub(super) fn claim(
    conn: &Connection,
    leases: &mut Leases,
    target: &str,
    limit: usize,
    lease: Duration,
) -> rusqlite::Result<Vec<Job>> {
    let now = now_ms();
    let lease_until = now + lease.as_millis() as i64;
    let mut due = conn.prepare_cached(CLAIM_DUE)?;
    let mut rows = due.query(params![target, now])?;
    let mut claimed: Vec<(JobId, String, u32, i64)> = Vec::with_capacity(limit);
    while claimed.len() < limit {
        let Some(row) = rows.next()? else { break };
        let id = row.get(0)?;
        if !leases.is_held(id, now) {
            claimed.push((id, row.get(1)?, row.get(2)?, row.get(3)?));
        }
    }
    drop(rows);
    let mut event = conn.prepare_cached(CLAIM_EVENT)?;
    let mut jobs = Vec::with_capacity(claimed.len());
    for (id, event_id, attempts, created_at_ms) in claimed {
        let (envelope, raw_body, content_type): (Vec<u8>, Vec<u8>, Option<String>) = event
            .query_row([&event_id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?;
        jobs.push(Job {
            id,
            tracking_id: None,
            event_id,
            target: target.to_owned(),
            attempts,
            created_at_ms,
            envelope: Bytes::from(envelope),
            raw_body: Bytes::from(raw_body),
            content_type,
            leased_until_ms: lease_until,
        });
    }
    for job in &jobs {
        leases.hold(job.id, lease_until);
    }
    jobs.sort_by_key(|job| job.id);
    Ok(jobs)
}

/// Records a batch of outcomes; once all are written, their leases end
/// with the transaction's commit.
pub(super) fn complete_all(
    conn: &Connection,
    leases: &mut Leases,
    outcomes: &[(JobId, Outcome)],
) -> rusqlite::Result<()> {
    let mut delivered = Vec::with_capacity(outcomes.len());
    for (job, outcome) in outcomes {
        match outcome {
            Outcome::Delivered => delivered.push(*job),
            Outcome::Released { leased_until_ms } => {
                conn.prepare_cached(
                    "UPDATE jobs SET next_at = ?2, lease_until = 0 WHERE id = ?1 AND lease_until = ?3",
                )?
                .execute(params![job, now_ms(), leased_until_ms])?;
            }
            Outcome::Retry {
                next_at_ms,
                status,
                error,
            } => {
                conn.prepare_cached(
                    "UPDATE jobs SET attempts = attempts + 1, next_at = ?2, lease_until = 0,
                         last_status = ?3, last_error = ?4, last_attempt_at = ?5 WHERE id = ?1",
                )?
                .execute(params![job, next_at_ms, status, error, now_ms()])?;
            }
            Outcome::Dead {
                reason,
                status,
                error,
            } => {
                conn.prepare_cached(
                    "INSERT INTO dead_letters (event_id, target, reason, attempts, last_status, last_error, dead_at)
                     SELECT event_id, target, ?2, attempts + 1, ?3, ?4, ?5 FROM jobs WHERE id = ?1",
                )?
                .execute(params![job, reason, status, error, now_ms()])?;
                conn.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
                    .execute([job])?;
            }
        }
    }
    delete_delivered(conn, &delivered)?;
    for (job, outcome) in outcomes {
        let under = match outcome {
            Outcome::Released { leased_until_ms } => Some(*leased_until_ms),
            _ => None,
        };
        leases.end(*job, under);
    }
    Ok(())
}

/// Deletes a batch of delivered jobs (a JSON array of ids), returning their events.
pub(super) const DELETE_DELIVERED: &str =
    "DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?1)) RETURNING event_id";
/// Deletes the events (a JSON array of ids) that no job or dead letter needs.
pub(super) const FORGET_EVENTS: &str =
    "DELETE FROM events WHERE id IN (SELECT value FROM json_each(?1))
       AND NOT EXISTS (SELECT 1 FROM jobs WHERE event_id = events.id)
       AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE event_id = events.id)";

/// Two statements for a whole batch of delivered jobs (nearly every outcome):
/// per job, the statement overhead was most of the cost (8.0 → 5.8 µs per
/// job in a stand-alone SQLite benchmark).
pub(super) fn delete_delivered(conn: &Connection, jobs: &[JobId]) -> rusqlite::Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids = serde_json::Value::from(jobs.to_vec()).to_string();
    let events: Vec<String> = conn
        .prepare_cached(DELETE_DELIVERED)?
        .query_map([ids], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    forget_events(conn, events)
}

/// Drops the bodies of those events that no job and no dead letter needs.
pub(super) fn forget_events(conn: &Connection, mut events: Vec<String>) -> rusqlite::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    events.sort_unstable();
    events.dedup();
    let events = serde_json::Value::from(events).to_string();
    conn.prepare_cached(FORGET_EVENTS)?.execute([events])?;
    Ok(())
}

/// Deletes dedupe keys older than the window, a bounded number at a time.
pub(super) fn prune_dedupe(conn: &Connection, before_ms: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM dedupe WHERE key IN (SELECT key FROM dedupe WHERE accepted_at < ?1 LIMIT ?2)",
    )?
    .execute(params![before_ms, DEDUPE_PRUNE_LIMIT as i64])
}
