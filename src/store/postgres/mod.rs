//! The shared store: PostgreSQL, for several relay instances behind one load
//! balancer. Same contract as the SQLite store (see the module docs of
//! [`crate::store`]); what differs is who else is writing.
//!
//! - **Accepts** go to a channel drained by two writer tasks, each holding one
//!   pooled connection. A writer takes every postback waiting and commits them
//!   with one statement in one transaction (`BEGIN`, the statement and `COMMIT`
//!   pipelined: one round trip and one WAL flush per batch). The commit waits
//!   for the WAL flush: every transaction whose commit is acknowledged sets
//!   `synchronous_commit` on for itself (`SET LOCAL`, in the same round trip),
//!   whatever the server's, database's or role's default, on every connection
//!   (also behind a transaction-pooling proxy, where a session setting would
//!   not stick). Callers hear "accepted" only after `COMMIT` returned.
//! - The queue of postbacks waiting for a writer is bounded in bytes
//!   (`store.max_queued_bytes`, bodies and envelopes): beyond it a postback
//!   is refused at once (503, Sinch retries) instead of piling up in memory
//!   while the server is slow.
//! - A row the server refuses for its data (SQLSTATE classes 22, 23, 54)
//!   fails its batch; the batch is then written again one postback per
//!   transaction, so only the culprit is refused ([`StoreError::Refused`]:
//!   ingest quarantines it and answers 400) and the rest are committed.
//! - **Dedupe** is a unique key: `INSERT ... ON CONFLICT (key) DO UPDATE` that
//!   takes the key over only when the stored one is older than the window, and
//!   returns whose key it is. Two instances racing on one key are serialised by
//!   the key's index entry: the second waits for the first to commit, then sees
//!   its key and is answered "duplicate" (after its own commit, which flushes
//!   the WAL past the first one's commit: a duplicate is never acknowledged
//!   before its original is durable). If the first one's transaction fails,
//!   the second takes the key and is committed as the original. Keys are
//!   inserted in sorted order, so two batches never wait on each other in a
//!   circle.
//! - **Claims** lease due jobs with `FOR UPDATE SKIP LOCKED` by moving their
//!   `next_at` (and `lease_until`) past the lease: instances never wait on
//!   each other's claims, and a job claimed by an instance that died is due
//!   again when its lease runs out. Leases are never voided at start: the other
//!   instances' leases are alive.
//! - **Outcomes** of a batch of attempts are written in one transaction with a
//!   few array (`UNNEST`) statements. Claims and outcomes are bookkeeping and
//!   commit with `synchronous_commit = off`: a server crash may forget the last
//!   of them, which costs a repeated delivery, never a lost postback.
//! - An event's bodies are deleted once no job and no dead letter needs them;
//!   the event row is locked first, so two instances finishing the last two
//!   jobs of one event cannot both miss the other's delete.
//! - Anything that cannot reach the server fails fast (connect and pool waits
//!   of 2 s, 5 s for any operation), marks the store unready and is answered
//!   503 by ingest; the relay's probe brings readiness back when a write
//!   succeeds again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures_util::future::{join3, join_all, BoxFuture};
use futures_util::FutureExt;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::{
    now_ms, Acceptance, DeadLetter, DeadLetterDetail, DeadLetterFilter, DeadLetterId, Job, JobId,
    Kept, NewPostback, OnCommit, Outcome, Page, QuarantineEntry, QuarantineFilter,
    QuarantineLimits, QuarantineUsage, QuarantinedBody, Store, StoreError, TargetQueue,
    TargetStats, DEAD_LETTER_COLUMNS, DEAD_LETTER_FROM, NO_ROUTE_TARGET, QUARANTINE_PREFIX_BYTES,
    QUARANTINE_PRUNE_LIMIT, QUARANTINE_SELECT,
};

/// Connecting to the server, and waiting for a free pooled connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Any one store operation (a batch, a claim, a query), pool wait included.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Writer tasks for accepts: while one batch commits, the next one gathers.
const ACCEPT_WRITERS: usize = 2;
/// Postbacks committed in one statement at most.
const MAX_BATCH: usize = 512;
/// Postbacks waiting for a writer before callers wait for room.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// How often expired dedupe keys and stale heartbeats are deleted, and how
/// many dedupe keys per statement.
const JANITOR_EVERY: Duration = Duration::from_secs(60);
const DEDUPE_PRUNE_LIMIT: i64 = 10_000;
const DEDUPE_PRUNE_ROUNDS: usize = 30;
/// Heartbeats of instances not seen for this long are deleted.
const HEARTBEAT_KEEP_MS: i64 = 7 * 24 * 3600 * 1000;
/// Key of the advisory lock that serialises migrations of instances starting
/// at once ("relaymig" in ASCII).
const MIGRATION_LOCK: i64 = 0x7265_6c61_796d_6967;
/// Smallest pool that leaves room for delivery next to the accept writers.
pub const MIN_POOL_SIZE: usize = ACCEPT_WRITERS + 2;

/// The schema, one entry per version; each migrates from the previous one.
/// Table and column names are those of the SQLite store.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    id           TEXT PRIMARY KEY,
    received_at  BIGINT NOT NULL,
    envelope     BYTEA NOT NULL,
    raw_body     BYTEA NOT NULL,
    content_type TEXT
);
CREATE TABLE jobs (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    TEXT NOT NULL,
    target      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL,
    next_at     BIGINT NOT NULL,
    lease_until BIGINT NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error  TEXT
);
CREATE INDEX jobs_due ON jobs (target, next_at, id);
CREATE INDEX jobs_event ON jobs (event_id);
CREATE TABLE dead_letters (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    TEXT NOT NULL,
    target      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    last_status INTEGER,
    last_error  TEXT,
    dead_at     BIGINT NOT NULL
);
CREATE INDEX dead_letters_event ON dead_letters (event_id);
CREATE TABLE dedupe (
    key         TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    accepted_at BIGINT NOT NULL
);
CREATE INDEX dedupe_age ON dedupe (accepted_at);
CREATE TABLE heartbeat (
    id TEXT PRIMARY KEY,
    at BIGINT NOT NULL
);
CREATE TABLE quarantine (
    body_hash    TEXT PRIMARY KEY,
    body         BYTEA NOT NULL,
    content_type TEXT,
    error        TEXT NOT NULL,
    first_seen   BIGINT NOT NULL,
    last_seen    BIGINT NOT NULL,
    seen_count   BIGINT NOT NULL
);
"#,
    // Operations (admin API): when a job's last attempt failed, for the
    // queue's "last error"; pauses that hold across restarts and instances.
    r#"
ALTER TABLE jobs ADD COLUMN last_attempt_at BIGINT;
CREATE TABLE target_pauses (
    target    TEXT PRIMARY KEY,
    paused_at BIGINT NOT NULL
);
"#,
    // The quarantine's budget and retention: the size as received (the body
    // may be only its prefix), a running total of what it holds kept by a
    // trigger (so the budget check never scans the table), and an index for
    // the retention janitor.
    r#"
ALTER TABLE quarantine ADD COLUMN size BIGINT NOT NULL DEFAULT 0;
ALTER TABLE quarantine ADD COLUMN truncated BOOLEAN NOT NULL DEFAULT false;
UPDATE quarantine SET size = length(body);
CREATE INDEX quarantine_age ON quarantine (last_seen);
CREATE TABLE quarantine_usage (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    bodies BIGINT NOT NULL,
    bytes  BIGINT NOT NULL
);
INSERT INTO quarantine_usage (id, bodies, bytes)
    SELECT 1, COUNT(*), COALESCE(SUM(length(body)), 0) FROM quarantine;
CREATE FUNCTION quarantine_usage_track() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE quarantine_usage SET bodies = bodies + 1, bytes = bytes + length(NEW.body) WHERE id = 1;
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE quarantine_usage SET bodies = bodies - 1, bytes = bytes - length(OLD.body) WHERE id = 1;
    ELSE
        UPDATE quarantine_usage SET bytes = bytes + length(NEW.body) - length(OLD.body) WHERE id = 1;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER quarantine_usage_track AFTER INSERT OR DELETE OR UPDATE OF body ON quarantine
    FOR EACH ROW EXECUTE FUNCTION quarantine_usage_track();
"#,
];

/// Commits a batch of postbacks: dedupe keys (sorted), then the events whose
/// key this batch won, their jobs, and a "no route" dead letter for those
/// without targets. Returns every key with the event id that owns it now.
const ACCEPT_SQL: &str = r#"
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
const CLAIM_SQL: &str = r#"
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
const LOCK_EVENTS_SQL: &str = "SELECT id FROM events WHERE id IN \
     (SELECT event_id FROM jobs WHERE id = ANY($1::bigint[])) ORDER BY id FOR UPDATE";
const RETRY_SQL: &str = r#"
UPDATE jobs SET attempts = jobs.attempts + u.counted, next_at = u.next_at, lease_until = 0,
    last_status = CASE WHEN u.counted = 1 THEN u.status ELSE jobs.last_status END,
    last_error = COALESCE(u.error, jobs.last_error),
    last_attempt_at = CASE WHEN u.counted = 1 THEN $7 ELSE jobs.last_attempt_at END
FROM unnest($1::bigint[], $2::bigint[], $3::integer[], $4::text[], $5::integer[], $6::bigint[])
    AS u(id, next_at, status, error, counted, lease)
WHERE jobs.id = u.id AND (u.lease IS NULL OR jobs.lease_until = u.lease)
"#;
const DEAD_SQL: &str = r#"
INSERT INTO dead_letters (event_id, target, reason, attempts, last_status, last_error, dead_at)
SELECT j.event_id, j.target, u.reason, j.attempts + 1, u.status, u.error, $5
FROM unnest($1::bigint[], $2::text[], $3::integer[], $4::text[]) AS u(id, reason, status, error)
JOIN jobs j ON j.id = u.id
ORDER BY u.id
"#;
const DELETE_JOBS_SQL: &str = "DELETE FROM jobs WHERE id = ANY($1::bigint[])";
const FORGET_EVENTS_SQL: &str = "DELETE FROM events e WHERE e.id = ANY($1::text[]) \
     AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.event_id = e.id) \
     AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = e.id)";
/// Keeps a refused body whole while the running total leaves room for it,
/// else its prefix ($6 the budget, $7 the prefix). The total's row is locked
/// first, so instances sharing the database cannot both take the last room.
const QUARANTINE_SQL: &str = r#"
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
const PRUNE_QUARANTINE_SQL: &str = "DELETE FROM quarantine WHERE body_hash IN \
     (SELECT body_hash FROM quarantine WHERE last_seen < $1 LIMIT $2)";
const PROBE_SQL: &str = "INSERT INTO heartbeat (id, at) VALUES ($1, $2) \
     ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at";
const STATS_SQL: &str = r#"
SELECT target, SUM(pending)::bigint, SUM(dead)::bigint, MIN(oldest)::bigint FROM (
    SELECT target, COUNT(*) AS pending, 0::bigint AS dead, MIN(created_at) AS oldest
    FROM jobs GROUP BY target
    UNION ALL
    SELECT target, 0::bigint, COUNT(*), NULL::bigint FROM dead_letters GROUP BY target
) counts GROUP BY target ORDER BY target
"#;
/// Moves dead letters back to the queue: $1 the letters, ($2, $3) one row per
/// (letter, target) to queue, $4 now. Returns how many letters moved.
const REQUEUE_SQL: &str = r#"
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
const PURGE_SQL: &str = "WITH gone AS (DELETE FROM dead_letters WHERE id = ANY($1::bigint[]) \
     RETURNING event_id) SELECT event_id FROM gone";
const LOCK_EVENTS_BY_ID_SQL: &str =
    "SELECT id FROM events WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE";
/// Turns the unleased jobs of a target ($1) into dead letters with reason $2.
const DEAD_LETTER_TARGET_SQL: &str = r#"
WITH gone AS (
    DELETE FROM jobs WHERE target = $1 AND lease_until <= $3
    RETURNING event_id, target, attempts, last_status, last_error
)
INSERT INTO dead_letters (event_id, target, reason, attempts, last_status, last_error, dead_at)
SELECT event_id, target, $2, attempts, last_status, last_error, $3 FROM gone
"#;
/// Per target: jobs due or in flight at $1, and the last error of a pending job.
const QUEUE_DETAIL_SQL: &str = r#"
SELECT target,
    COUNT(*) FILTER (WHERE next_at <= $1 OR lease_until > $1),
    (ARRAY_AGG(last_error ORDER BY last_attempt_at DESC NULLS LAST)
        FILTER (WHERE last_error IS NOT NULL))[1]
FROM jobs GROUP BY target
"#;
const PRUNE_DEDUPE_SQL: &str = "DELETE FROM dedupe WHERE key IN \
     (SELECT key FROM dedupe WHERE accepted_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Starts a transaction whose commit does not wait for the WAL flush.
const BEGIN_BOOKKEEPING: &str = "BEGIN; SET LOCAL synchronous_commit TO OFF";
/// Starts a transaction whose commit waits for the WAL flush even where the
/// server's, database's or role's default says otherwise (set per
/// transaction: a default can change, and a pooling proxy may hand each
/// transaction another server connection).
const BEGIN_FLUSHED: &str = "BEGIN; SET LOCAL synchronous_commit TO ON";

/// Options the PostgreSQL store is opened with.
#[derive(Clone)]
pub struct PostgresOptions {
    /// `postgres://user@host:port/dbname?...` (libpq URL or key=value form).
    pub url: String,
    /// Overrides any password in the URL.
    pub password: Option<String>,
    /// Connections in the pool (two are held by the accept writers).
    pub pool_size: usize,
    /// Replaces the lease the dispatcher asks for, when set.
    pub lease: Option<Duration>,
    /// A postback seen again within this window is a duplicate.
    pub dedupe_window: Duration,
    /// The quarantine's budget and retention.
    pub quarantine: QuarantineLimits,
    /// Bytes (envelopes and bodies) of postbacks waiting for a writer or
    /// being written; beyond it, accepts fail at once.
    pub max_queued_bytes: usize,
    /// Start the accept writers and the janitor (the daemon); a command-line
    /// tool beside running relays needs neither.
    pub background: bool,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &describe_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("lease", &self.lease)
            .field("dedupe_window", &self.dedupe_window)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .finish_non_exhaustive()
    }
}

/// Where a PostgreSQL URL points, without its password: `host:port/dbname`.
pub fn describe_url(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "(invalid URL)".to_owned();
    };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            let port = config
                .get_ports()
                .get(i)
                .or(config.get_ports().first())
                .copied()
                .unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    format!(
        "{}/{}",
        hosts.join(","),
        config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres")
    )
}

/// The PostgreSQL implementation of [`Store`].
pub struct PostgresStore {
    /// The pool and flags the background tasks use too.
    shared: Arc<Shared>,
    /// Postbacks on their way to the accept writers.
    accepts: mpsc::Sender<Accept>,
    /// Bytes held by the postbacks queued or being written.
    queued_bytes: Arc<AtomicUsize>,
    /// `store.max_queued_bytes`.
    max_queued_bytes: usize,
    /// Tells the writers to answer what is queued and stop, and the janitor
    /// to stop.
    closing: CancellationToken,
    /// The writers and the janitor, awaited at close.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// What the writers, the janitor and the trait methods share.
struct Shared {
    /// Connections to the server (the accept writers hold one each).
    pool: Pool,
    /// Whether the last write succeeded; drives `/readyz`.
    ready: AtomicBool,
    /// `store.lease`: replaces the lease the dispatchers ask for.
    lease: Option<Duration>,
    /// `ingest.dedupe_window`, in milliseconds.
    dedupe_window_ms: i64,
    /// `quarantine.*`.
    quarantine: QuarantineLimits,
    /// This instance's row in `heartbeat`.
    instance: String,
}

/// One postback waiting for a writer, with the channel its caller waits on.
struct Accept {
    /// What to commit.
    postback: NewPostback,
    /// Answered after the commit (or its failure).
    reply: oneshot::Sender<Result<Acceptance, StoreError>>,
    /// Its bytes in the queue's count, given back when it is dropped
    /// (answered, or dropped unanswered at close).
    _held: QueuedBytes,
}

/// Bytes of one postback counted in [`PostgresStore::queued_bytes`] until
/// dropped.
struct QueuedBytes {
    /// The count it is part of.
    count: Arc<AtomicUsize>,
    /// Its share.
    bytes: usize,
}

impl Drop for QueuedBytes {
    fn drop(&mut self) {
        self.count.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Why a write failed, and whether its items may succeed one by one.
struct Failure {
    /// What the callers are told.
    error: StoreError,
    /// The server refused the statement for something in its data (a
    /// constraint, a deadlock): worth retrying each item on its own.
    per_item: bool,
}

impl PostgresStore {
    /// Connects, creates or migrates the schema (serialised between instances
    /// by an advisory lock) and starts the writers.
    pub async fn open(options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        let mut config: tokio_postgres::Config = options
            .url
            .parse()
            .map_err(|err| StoreError::Database(format!("invalid PostgreSQL URL: {err}")))?;
        if let Some(password) = &options.password {
            config.password(password.as_bytes());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("postback-relay");
        }
        // Notice a server that vanished without closing the connection.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        config.tcp_user_timeout(Duration::from_secs(30));
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|err| StoreError::Database(format!("cannot create the pool: {err}")))?;
        let shared = Arc::new(Shared {
            pool,
            ready: AtomicBool::new(true),
            lease: options.lease,
            dedupe_window_ms: options.dedupe_window.as_millis() as i64,
            quarantine: options.quarantine,
            instance: instance_name(),
        });
        let version = shared.migrate().await?;
        tracing::info!(
            database = %describe_url(&options.url), schema_version = version,
            pool_size = options.pool_size, "PostgreSQL store ready"
        );
        let (accepts, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let closing = CancellationToken::new();
        let mut tasks = Vec::new();
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let writers = if options.background {
            ACCEPT_WRITERS
        } else {
            1
        };
        for _ in 0..writers {
            tasks.push(tokio::spawn(
                shared.clone().run_writer(receiver.clone(), closing.clone()),
            ));
        }
        if options.background {
            tasks.push(tokio::spawn(shared.clone().run_janitor(closing.clone())));
            tasks.push(tokio::spawn(
                shared.clone().run_quarantine_janitor(closing.clone()),
            ));
        }
        Ok(PostgresStore {
            shared,
            accepts,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            max_queued_bytes: options.max_queued_bytes,
            closing,
            tasks: Mutex::new(tasks),
        })
    }

    /// Counts a postback's bytes into the queue, or refuses it at once when
    /// the queue is full (one postback is always let into an empty queue).
    fn hold(&self, postback: &NewPostback) -> Result<QueuedBytes, StoreError> {
        let bytes = postback.envelope.len() + postback.raw_body.len();
        let before = self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        let held = QueuedBytes {
            count: self.queued_bytes.clone(),
            bytes,
        };
        if before > 0 && before + bytes > self.max_queued_bytes {
            return Err(StoreError::Database(format!(
                "{before} bytes of postbacks are waiting for PostgreSQL \
                 (store.max_queued_bytes: {}); try again later",
                self.max_queued_bytes
            )));
        }
        Ok(held)
    }
}

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

impl Shared {
    /// Creates or migrates the schema. Instances starting at once take turns
    /// on an advisory lock held until each one's transaction ends.
    async fn migrate(&self) -> Result<usize, StoreError> {
        let mut client = self.pool.get().await.map_err(|err| pool_error(&err))?;
        let work = async {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version    INTEGER PRIMARY KEY,
                     applied_at BIGINT NOT NULL
                 )",
            )
            .await?;
            let current: i32 = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                    &[],
                )
                .await?
                .get(0);
            let current = current.max(0) as usize;
            if current > MIGRATIONS.len() {
                return Ok(Err(StoreError::Database(format!(
                    "the database schema is at version {current}, newer than this relay knows \
                     ({}): run a newer relay",
                    MIGRATIONS.len()
                ))));
            }
            for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                    &[&(index as i32 + 1), &now_ms()],
                )
                .await?;
                tracing::info!(version = index + 1, "PostgreSQL schema migrated");
            }
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(Ok(MIGRATIONS.len()))
        };
        match tokio::time::timeout(Duration::from_secs(60), work).await {
            Ok(Ok(result)) => result,
            Ok(Err(err)) => Err(StoreError::Database(format!(
                "migrating the schema: {}",
                describe(&err)
            ))),
            Err(_) => Err(StoreError::Database(
                "migrating the schema took over 60 s (another instance holding the migration lock?)"
                    .into(),
            )),
        }
    }

    /// Runs `work` on a pooled connection within [`OP_TIMEOUT`], keeping the
    /// ready flag: a connection that fails or times out marks the store
    /// unready, and a successful `write` marks it ready.
    async fn with_client<T>(
        &self,
        write: bool,
        work: impl AsyncFnOnce(&Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        self.run(write, work).await.map_err(|failure| failure.error)
    }

    /// [`Shared::with_client`], telling whether the items might succeed alone.
    async fn run<T>(
        &self,
        write: bool,
        work: impl AsyncFnOnce(&Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, Failure> {
        // The pool bounds its own waits (connect, free slot).
        let outcome = match self.pool.get().await {
            Err(err) => Err(Failure {
                error: pool_error(&err),
                per_item: false,
            }),
            Ok(client) => match tokio::time::timeout(OP_TIMEOUT, work(&client)).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(err)) => {
                    let per_item = is_data_error(&err);
                    if !per_item {
                        // A broken connection is not handed out again.
                        drop(Object::take(client));
                    }
                    Err(Failure {
                        error: StoreError::Database(describe(&err)),
                        per_item,
                    })
                }
                Err(_) => {
                    // Mid-transaction or hung: never handed out again.
                    drop(Object::take(client));
                    Err(Failure {
                        error: timed_out(),
                        per_item: false,
                    })
                }
            },
        };
        match &outcome {
            Ok(_) if write => self.ready.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(failure) if write || !failure.per_item => self.not_ready(&failure.error),
            Err(_) => {}
        }
        outcome
    }

    /// `BEGIN` for what is acknowledged: flushed at commit, on every
    /// connection and whatever the defaults (see [`BEGIN_FLUSHED`]).
    fn durable_begin(&self) -> &'static str {
        BEGIN_FLUSHED
    }

    fn not_ready(&self, error: &StoreError) {
        if self.ready.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %error, "PostgreSQL store failed; answering 503 until a write succeeds");
        }
    }

    /// Writes one batch of outcomes in one transaction.
    async fn write_outcomes(&self, batch: &OutcomeBatch) -> Result<(), Failure> {
        self.run(true, async |client: &Object| batch.write(client).await)
            .await
    }

    /// One accept writer: takes every postback waiting, commits them in one
    /// transaction, answers. Stops after answering what was queued at close.
    async fn run_writer(
        self: Arc<Self>,
        receiver: Arc<tokio::sync::Mutex<mpsc::Receiver<Accept>>>,
        closing: CancellationToken,
    ) {
        let mut connection: Option<Object> = None;
        loop {
            let batch = {
                let mut receiver = receiver.lock().await;
                let first = tokio::select! {
                    biased;
                    first = receiver.recv() => first,
                    () = closing.cancelled() => {
                        receiver.close();
                        receiver.recv().await
                    }
                };
                let Some(first) = first else { break };
                let mut batch = Vec::with_capacity(16);
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match receiver.try_recv() {
                        Ok(accept) => batch.push(accept),
                        Err(_) => break,
                    }
                }
                batch
            };
            self.accept_batch(&mut connection, batch).await;
        }
    }

    /// Commits a batch and answers each caller after the commit.
    async fn accept_batch(&self, connection: &mut Option<Object>, batch: Vec<Accept>) {
        // Copies of one key in one batch: the first one goes to the
        // database, the others are its duplicates.
        let mut leaders: Vec<(String, &NewPostback)> = Vec::with_capacity(batch.len());
        let mut seen: HashSet<String> = HashSet::with_capacity(batch.len());
        for accept in &batch {
            let key = storable_key(&accept.postback.dedupe_key);
            if seen.insert(key.clone()) {
                leaders.push((key, &accept.postback));
            }
        }
        let owners = match self.write_accepts(connection, &leaders).await {
            Err(failure) if failure.per_item && leaders.len() > 1 => {
                // Retry one by one, so that only the postback the server
                // refuses is refused.
                let mut owners = HashMap::new();
                let mut errors = HashMap::new();
                for leader in &leaders {
                    match self
                        .write_accepts(connection, std::slice::from_ref(leader))
                        .await
                    {
                        Ok(owner) => owners.extend(owner),
                        Err(failure) => {
                            errors.insert(leader.0.clone(), failure.error);
                        }
                    }
                }
                Ok((owners, errors))
            }
            Err(failure) => Err(failure.error),
            Ok(owners) => Ok((owners, HashMap::new())),
        };
        match &owners {
            Ok((owners, _)) if !owners.is_empty() => self.ready.store(true, Ordering::Relaxed),
            Ok(_) | Err(StoreError::Refused(_)) => {}
            Err(error) => self.not_ready(error),
        }
        for Accept {
            postback, reply, ..
        } in batch
        {
            let key = storable_key(&postback.dedupe_key);
            let answer = match &owners {
                Err(error) => Err(error.clone()),
                Ok((owners, errors)) => match (owners.get(&key), errors.get(&key)) {
                    (Some(owner), _) if *owner == postback.id => Ok(Acceptance::Accepted),
                    (Some(owner), _) => Ok(Acceptance::Duplicate {
                        original_id: owner.clone(),
                    }),
                    (None, Some(error)) => Err(error.clone()),
                    (None, None) => Err(StoreError::Database(
                        "the dedupe key was not returned by the commit".into(),
                    )),
                },
            };
            let _ = reply.send(answer);
        }
    }

    /// One transaction for `items` (distinct keys): returns who owns each key.
    /// The writer keeps its connection between batches while it works.
    async fn write_accepts(
        &self,
        connection: &mut Option<Object>,
        items: &[(String, &NewPostback)],
    ) -> Result<HashMap<String, String>, Failure> {
        if connection.as_ref().is_some_and(|c| c.is_closed()) {
            *connection = None;
        }
        if connection.is_none() {
            *connection = Some(self.pool.get().await.map_err(|err| Failure {
                error: pool_error(&err),
                per_item: false,
            })?);
        }
        let client = connection.as_ref().expect("connected above");
        let outcome = tokio::time::timeout(
            OP_TIMEOUT,
            accept_statement(client, self.durable_begin(), items, self.dedupe_window_ms),
        )
        .await;
        let outcome = match outcome {
            Ok(Ok(owners)) => Ok(owners),
            // One postback alone, refused for its data: it is the culprit.
            Ok(Err(err)) if items.len() == 1 && refuses_data(&err) => Err(Failure {
                per_item: true,
                error: StoreError::Refused(describe(&err)),
            }),
            Ok(Err(err)) => Err(Failure {
                per_item: is_data_error(&err),
                error: StoreError::Database(describe(&err)),
            }),
            Err(_) => Err(Failure {
                error: timed_out(),
                per_item: false,
            }),
        };
        if let Err(failure) = &outcome {
            if !failure.per_item {
                // Broken, or in an unknown state after a timeout: never reuse.
                if let Some(client) = connection.take() {
                    drop(Object::take(client));
                }
            }
        }
        outcome
    }

    /// Runs `sql`, a DELETE of at most `$2` rows older than `$1`, again while
    /// it deletes a full batch, at most `rounds` times (or until closing):
    /// a backlog is cleared without one statement holding locks for long.
    /// Returns the rows deleted; a failure is logged and ends the round.
    async fn delete_in_batches(
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
    /// [`QuarantineLimits::prune_every`], in bounded statements.
    async fn run_quarantine_janitor(self: Arc<Self>, closing: CancellationToken) {
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
    async fn run_janitor(self: Arc<Self>, closing: CancellationToken) {
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

/// Runs the accept statement for `items` in one pipelined transaction.
async fn accept_statement(
    client: &Object,
    begin: &str,
    items: &[(String, &NewPostback)],
    window_ms: i64,
) -> Result<HashMap<String, String>, tokio_postgres::Error> {
    let statement = client.prepare_cached(ACCEPT_SQL).await?;
    let count = items.len();
    let mut keys: Vec<&str> = Vec::with_capacity(count);
    let mut ids: Vec<&str> = Vec::with_capacity(count);
    let mut received: Vec<i64> = Vec::with_capacity(count);
    let mut envelopes: Vec<&[u8]> = Vec::with_capacity(count);
    let mut raw_bodies: Vec<&[u8]> = Vec::with_capacity(count);
    let mut content_types: Vec<Option<String>> = Vec::with_capacity(count);
    let mut job_events: Vec<&str> = Vec::new();
    let mut job_targets: Vec<&str> = Vec::new();
    for (key, postback) in items {
        keys.push(key);
        ids.push(&postback.id);
        received.push(postback.received_at_ms);
        envelopes.push(&postback.envelope[..]);
        raw_bodies.push(&postback.raw_body[..]);
        content_types.push(postback.content_type.as_deref().map(clean));
        for target in &postback.targets {
            job_events.push(&postback.id);
            job_targets.push(target);
        }
    }
    let params: [&(dyn ToSql + Sync); 10] = [
        &keys,
        &ids,
        &received,
        &envelopes,
        &raw_bodies,
        &content_types,
        &job_events,
        &job_targets,
        &window_ms,
        &NO_ROUTE_TARGET,
    ];
    let rows = in_transaction(client, begin, client.query(&statement, &params)).await?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
        .collect())
}

/// Runs `work` between `begin` and `COMMIT` one statement after another,
/// for operator writes that need a statement's answer before the next one
/// (rare: no pipelining). Rolls back when `work` fails.
async fn step_by_step<T>(
    client: &Object,
    begin: &str,
    work: impl AsyncFnOnce(&Object) -> Result<T, tokio_postgres::Error>,
) -> Result<T, tokio_postgres::Error> {
    client.batch_execute(begin).await?;
    match work(client).await {
        Ok(value) => {
            client.batch_execute("COMMIT").await?;
            Ok(value)
        }
        Err(err) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(err)
        }
    }
}

fn quarantined_body(row: &tokio_postgres::Row) -> QuarantinedBody {
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

fn dead_letter_row(row: &tokio_postgres::Row) -> DeadLetter {
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

/// Sends `begin`, the statement and `COMMIT` at once (pipelined: one round
/// trip) and returns the statement's result once `COMMIT` has returned. If the
/// statement fails, the server turns the `COMMIT` into a rollback.
///
/// `work` must send its one request when first polled, as every
/// `tokio_postgres` query does with an already prepared statement.
async fn in_transaction<T>(
    client: &Object,
    begin: &str,
    work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    let (begun, result, committed) = join3(
        client.batch_execute(begin),
        work,
        client.batch_execute("COMMIT"),
    )
    .await;
    begun?;
    let value = result?;
    committed?;
    Ok(value)
}

/// The outcomes of one batch, sorted into the arrays the statements take.
struct OutcomeBatch {
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
    fn new(outcomes: &[(JobId, Outcome)]) -> OutcomeBatch {
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
    async fn write(&self, client: &Object) -> Result<(), tokio_postgres::Error> {
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

/// Whether the server refused the statement for its data (worth retrying the
/// items one by one) rather than because it cannot be reached or written.
fn is_data_error(err: &tokio_postgres::Error) -> bool {
    let Some(code) = err.code() else {
        return false;
    };
    if *code == SqlState::T_R_DEADLOCK_DETECTED || *code == SqlState::T_R_SERIALIZATION_FAILURE {
        return true;
    }
    // 21 cardinality violation, or a refusal of the data itself.
    code.code().starts_with("21") || refuses_data(err)
}

/// Whether the server refused a value it was given, so that sending the same
/// row again can never succeed: 22 data exception (a character the database
/// encoding lacks, a value out of range), 23 integrity constraint violation
/// (the dedupe conflict is expected and handled by `ON CONFLICT`, so any
/// other), 54 program limit exceeded (an index entry too large).
fn refuses_data(err: &tokio_postgres::Error) -> bool {
    err.code()
        .is_some_and(|code| matches!(&code.code()[..2], "22" | "23" | "54"))
}

/// The message and SQLSTATE of a server error, or the whole cause chain of a
/// connection error (tokio_postgres's own message is terse).
fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!(
            "PostgreSQL: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        );
    }
    let mut message = format!("PostgreSQL: {err}");
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// A pool that could not hand out a connection (cannot connect, all busy).
fn pool_error(err: &deadpool_postgres::PoolError) -> StoreError {
    match err {
        deadpool_postgres::PoolError::Backend(err) => StoreError::Database(describe(err)),
        other => StoreError::Database(format!("PostgreSQL pool: {other}")),
    }
}

fn timed_out() -> StoreError {
    StoreError::Database(format!(
        "PostgreSQL did not answer within {}s",
        OP_TIMEOUT.as_secs()
    ))
}

/// PostgreSQL text cannot hold NUL characters; informational text (errors,
/// Content-Types) keeps a replacement character in their place.
fn clean(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// Dedupe keys are compared, never shown: a key with a NUL character (a JSON
/// tracking id may carry `\u0000`) is stored as its hash. No other key looks
/// like that: tracking-id keys contain `|` and body keys start `sha256:`.
fn storable_key(key: &str) -> String {
    if key.contains('\0') {
        format!("nul-sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
    } else {
        key.to_owned()
    }
}

/// This instance's name in `heartbeat`: host and process id.
fn instance_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_nul_are_hashed_and_cannot_collide_with_real_keys() {
        assert_eq!(storable_key("MMS_MO|N401|abc"), "MMS_MO|N401|abc");
        let hashed = storable_key("MMS_MO|N401|a\0b");
        assert!(hashed.starts_with("nul-sha256:"), "{hashed}");
        assert!(!hashed.contains('|') && !hashed.contains('\0'));
        assert_ne!(hashed, storable_key("MMS_MO|N401|a\0c"));
    }

    #[test]
    fn urls_are_described_without_their_password() {
        assert_eq!(
            describe_url("postgres://relay:s3cret@db.internal:6432/relay?sslmode=disable"),
            "db.internal:6432/relay"
        );
        assert_eq!(
            describe_url("postgres://postgres@127.0.0.1/postgres"),
            "127.0.0.1:5432/postgres"
        );
        assert_eq!(
            describe_url("host=a,b port=5432 dbname=relay user=x password=y"),
            "a:5432,b:5432/relay"
        );
        assert_eq!(describe_url("nonsense://"), "(invalid URL)");
    }

    #[test]
    fn nul_characters_are_replaced_in_text() {
        assert_eq!(clean("a\0b"), "a\u{FFFD}b");
        assert_eq!(clean("plain"), "plain");
    }
}
