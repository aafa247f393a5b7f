//! The store seam: everything the relay must not lose goes through [`Store`].
//! What operators read and repair (listings, counts, replay, purge) goes
//! through [`OperatorStore`], kept off that hot path.
//!
//! The contract every backend keeps (SQLite for one instance, PostgreSQL when
//! several instances share one queue):
//! - [`Store::accept`] returns only after the postback and its routed targets
//!   are durably written (PostgreSQL: committed with its dedupe key and one
//!   delivery job per target; SQLite: in the intake journal, from which the
//!   writer moves it into the database within milliseconds, or a restart
//!   does); ingest answers 200 only then. The jobs exist once
//!   [`AfterCommit`] runs: the [`Committer`] hands them to delivery there. An error means nothing was acknowledged (ingest answers 503); a
//!   journaled record whose fdatasync then failed may still be delivered
//!   (at least once, never lost).
//! - Jobs are claimed with a lease ([`Store::claim`]): a job claimed by a worker
//!   that dies becomes due again when the lease runs out.
//! - Every finished attempt is recorded with [`Store::complete`]: delivered
//!   (the job is gone), retry later, or dead letter (kept with its reason).
//! - A refused body ([`Store::quarantine`]) is kept whole while the
//!   quarantine's stored bytes (a running total, never a scan) stay within
//!   `quarantine.max_bytes`, else as its hash, size, error and first 1 KiB;
//!   a janitor deletes bodies past `quarantine.retention` ([`QuarantineLimits`]).
//!
//! Times are Unix milliseconds; backends do their own batching.
//!
//! Two backends: [`SqliteStore`] (embedded, one instance, the default) and
//! [`PostgresStore`] (several instances sharing one queue); [`open`] picks the
//! one the config names.

mod dedupe;
mod handoff;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::clock::now_ms;
use crate::config::{Config, QuarantineConfig, StoreBackend};

pub use dedupe::{dedupe_key, MAX_DEDUPE_KEY_BYTES};
pub use handoff::{Committer, FreshJobs, Reservation};
pub use postgres::{PostgresOptions, PostgresStore};
pub use sqlite::{SqliteOptions, SqliteStore};

/// Opens the backend the config names (`store.backend`) for the relay
/// daemon. With SQLite it is the only instance: leases left by a previous
/// process are void and its intake journal is moved in. With PostgreSQL other
/// instances' leases are alive and are left to run out.
pub async fn open(config: &Config) -> Result<Arc<dyn OperatorStore>, StoreError> {
    let store = &config.store;
    Ok(match store.backend {
        StoreBackend::Sqlite => Arc::new(SqliteStore::open(SqliteOptions {
            path: store.path.clone(),
            sync: store.sync,
            busy_timeout: store.busy_timeout.0,
            min_free_bytes: store.min_free_bytes,
            dedupe_window: config.ingest.dedupe_window.0,
            quarantine: QuarantineLimits::from(&config.quarantine),
        })?),
        StoreBackend::Postgres => {
            let password = match &store.password {
                Some(source) => Some(
                    source
                        .resolve()
                        .map_err(|err| StoreError::database(format!("store.password: {err}")))?,
                ),
                None => None,
            };
            Arc::new(
                PostgresStore::open(PostgresOptions {
                    url: store.url.clone().unwrap_or_default(),
                    password,
                    pool_size: store.pool_size,
                    lease: store.lease.map(|lease| lease.0),
                    dedupe_window: config.ingest.dedupe_window.0,
                    quarantine: QuarantineLimits::from(&config.quarantine),
                    max_queued_bytes: store.max_queued_bytes,
                    background: true,
                })
                .await?,
            )
        }
    })
}

/// Columns 0–8 of a dead letter listing (both backends share the schema):
/// the dead letter and its postback's receive time.
const DEAD_LETTER_COLUMNS: &str = "d.id, d.event_id, d.target, d.reason, d.attempts, \
     d.last_status, d.last_error, d.dead_at, e.received_at";
const DEAD_LETTER_FROM: &str = "FROM dead_letters d JOIN events e ON e.id = d.event_id";
/// Columns of a quarantined body, in [`QuarantinedBody`]'s order.
const QUARANTINE_SELECT: &str = "SELECT body_hash, body, content_type, error, first_seen, \
     last_seen, seen_count, size, truncated FROM quarantine";
/// Bytes kept of a refused body beyond the quarantine's budget: enough to
/// see what it was (its start names the format and usually the sender).
pub const QUARANTINE_PREFIX_BYTES: usize = 1024;
/// Quarantined bodies deleted per statement by the retention janitor, so a
/// large expiry never holds the writer (or PostgreSQL's locks) for long.
const QUARANTINE_PRUNE_LIMIT: i64 = 1_000;

/// How much of the refused bodies a store keeps, and for how long
/// (`quarantine.*` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantineLimits {
    /// Bytes of stored bodies beyond which a new body keeps only its prefix.
    pub max_bytes: u64,
    /// Bodies whose last arrival is older than this are deleted.
    pub retention: Duration,
}

impl QuarantineLimits {
    /// How often the janitor deletes expired bodies: every minute, or twice
    /// per retention when that is shorter (never more than ten times a second).
    pub fn prune_every(&self) -> Duration {
        (self.retention / 2).clamp(Duration::from_millis(100), Duration::from_secs(60))
    }

    /// Bodies last seen before this (Unix ms) are expired.
    fn expired_before_ms(&self) -> i64 {
        now_ms().saturating_sub(self.retention.as_millis().min(i64::MAX as u128) as i64)
    }
}

impl Default for QuarantineLimits {
    fn default() -> Self {
        QuarantineLimits::from(&QuarantineConfig::default())
    }
}

impl From<&QuarantineConfig> for QuarantineLimits {
    fn from(config: &QuarantineConfig) -> Self {
        QuarantineLimits {
            max_bytes: config.max_bytes,
            retention: config.retention.0,
        }
    }
}

/// Label under which dead letters of unrouted postbacks are counted.
pub const NO_ROUTE_TARGET: &str = "(no route)";

/// A parsed, routed postback ready to be committed.
#[derive(Debug, Clone)]
pub struct NewPostback {
    /// Envelope id (ULID) assigned by the ingest side.
    pub id: String,
    /// `origin|code|tracking-id`, or the body hash when there is no tracking
    /// id; at most [`MAX_DEDUPE_KEY_BYTES`] long (longer keys
    /// are replaced by their digest where they are built).
    pub dedupe_key: String,
    /// When ingest received it.
    pub received_at_ms: i64,
    /// The CloudEvents JSON targets receive.
    pub envelope: Bytes,
    /// The body exactly as Sinch sent it, for `payload: raw` targets.
    pub raw_body: Bytes,
    /// Sinch's Content-Type, replayed with raw payloads.
    pub content_type: Option<String>,
    /// Routed targets; empty means "no route" (kept as a dead letter).
    pub targets: Vec<String>,
    /// Sinch's tracking id, carried by the jobs handed over at commit.
    pub tracking_id: Option<String>,
}

/// What the [`Committer`] asks a backend to do once an accepted postback's
/// jobs exist. The SQLite store acknowledges before its writer thread has
/// inserted the jobs (see `store::sqlite::intake`), so whatever starts them must
/// wait for this.
pub struct AfterCommit {
    /// Insert the jobs leased to this process until then, so they can be
    /// handed over in memory with no claim transaction. A backend may ignore
    /// it (the jobs are then due at once and claimed as usual).
    pub leased_until_ms: Option<i64>,
    /// Run with the jobs' ids in target order when they were inserted
    /// leased, empty otherwise; on the committing thread: it must not block.
    pub run: OnCommit,
}

/// [`AfterCommit::run`].
pub type OnCommit = Box<dyn FnOnce(&[JobId]) + Send>;

/// What [`Store::accept`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    /// Durably committed (as `store.sync` promises); its jobs follow.
    Accepted,
    /// Seen within the dedupe window; nothing new was stored.
    Duplicate {
        /// Envelope id of the first copy.
        original_id: String,
    },
}

/// A body that could not be parsed, kept so nothing Sinch sent is lost.
#[derive(Debug, Clone)]
pub struct QuarantineEntry {
    /// Hex SHA-256 of the body; repeats of one body share one row.
    pub body_hash: String,
    /// The body as received.
    pub body: Bytes,
    /// The Content-Type it came with.
    pub content_type: Option<String>,
    /// The parse error returned to the sender.
    pub error: String,
    /// When it arrived.
    pub received_at_ms: i64,
}

/// A quarantined body as kept, for inspection and replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedBody {
    /// Hex SHA-256 of the body; its identity.
    pub body_hash: String,
    /// The body as received.
    pub body: Bytes,
    /// The Content-Type it came with.
    pub content_type: Option<String>,
    /// The parse error of its last arrival.
    pub error: String,
    /// First arrival.
    pub first_seen_ms: i64,
    /// Last arrival.
    pub last_seen_ms: i64,
    /// Arrivals (Sinch retries a 400 like any other failure).
    pub seen_count: u64,
    /// Bytes of the body as received (`body` may hold only a prefix).
    pub size: u64,
    /// Only the first [`QUARANTINE_PREFIX_BYTES`] were kept (the budget,
    /// `quarantine.max_bytes`, was spent): it cannot be replayed.
    pub truncated: bool,
}

/// How [`Store::quarantine`] kept a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// A new body, kept whole.
    Whole,
    /// A new body beyond the budget: only its prefix, hash, size and error.
    Prefix,
    /// Seen before: its row counts one more arrival.
    Again,
}

/// What the quarantine holds, for the gauges; a running total the store
/// keeps as it writes, never a scan of the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuarantineUsage {
    /// Rows (distinct bodies).
    pub bodies: u64,
    /// Bytes of their stored bodies (whole ones and prefixes).
    pub bytes: u64,
}

/// Backend-assigned id of one delivery job (one postback × one target).
pub type JobId = i64;

/// A claimed delivery job with everything needed to send it.
#[derive(Debug, Clone)]
pub struct Job {
    /// Identifies the job in [`Store::complete`].
    pub id: JobId,
    /// Envelope id; the same for every target and every retry.
    pub event_id: String,
    /// Sinch's tracking id (the envelope's `subject`), for the log lines
    /// that follow a postback end to end. Claims leave it to the dispatcher
    /// ([`tracking_id_of`]), off the store's single writer.
    pub tracking_id: Option<String>,
    /// Target name from the config.
    pub target: String,
    /// Attempts already made before this one.
    pub attempts: u32,
    /// When the job was created, for `max_age`.
    pub created_at_ms: i64,
    /// CloudEvents JSON.
    pub envelope: Bytes,
    /// Original Sinch body.
    pub raw_body: Bytes,
    /// Original Sinch Content-Type.
    pub content_type: Option<String>,
    /// When its lease runs out: after that a claim may take it again, so it
    /// must not be started late.
    pub leased_until_ms: i64,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The target took it; the job is finished.
    Delivered,
    /// Try again at `next_at_ms`.
    Retry {
        /// When the job is due again.
        next_at_ms: i64,
        /// HTTP status, when there was an answer.
        status: Option<u16>,
        /// What went wrong, for operators.
        error: String,
    },
    /// Not attempted (its dispatcher stopped or paused first, or it waited
    /// too long): due again now, with its attempt count unchanged — unless
    /// its lease is no longer the one given (`leased_until_ms`): then a later
    /// claim owns the job and it is left alone.
    Released {
        /// The lease the job was taken under.
        leased_until_ms: i64,
    },
    /// Give up: keep it as a dead letter.
    Dead {
        /// Why it was given up (`rejected by target`, `max attempts reached`, `max age exceeded`, ...).
        reason: String,
        /// HTTP status, when there was an answer.
        status: Option<u16>,
        /// The last error.
        error: String,
    },
}

/// Queue figures of one target, for the gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStats {
    /// Target name ([`NO_ROUTE_TARGET`] for unrouted dead letters).
    pub target: String,
    /// Jobs waiting or in flight.
    pub pending: u64,
    /// Dead letters kept.
    pub dead: u64,
    /// When the oldest job still waiting was created (None: no job waits).
    pub oldest_pending_ms: Option<i64>,
}

/// A target's queue in detail, for operators (`GET /api/v1/targets`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetQueue {
    /// Counts and the oldest pending job, as the gauges show them.
    pub stats: TargetStats,
    /// Pending jobs whose attempt time has come (waiting for a slot, or in flight).
    pub due: u64,
    /// The error of the most recent failed attempt among its pending jobs.
    pub last_error: Option<String>,
}

/// Which dead letters an operator means; every field set narrows the choice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    /// Only this target (`(no route)` included).
    pub target: Option<String>,
    /// Only this reason, exactly.
    pub reason: Option<String>,
    /// Given up at or after (Unix ms).
    pub since_ms: Option<i64>,
    /// Given up at or before (Unix ms).
    pub until_ms: Option<i64>,
}

/// Which quarantined bodies an operator means, by last arrival.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuarantineFilter {
    /// Last seen at or after (Unix ms).
    pub since_ms: Option<i64>,
    /// Last seen at or before (Unix ms).
    pub until_ms: Option<i64>,
}

/// Where a page of a listing starts and how long it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page<C> {
    /// The last item of the previous page (exclusive); None: from the start.
    pub after: Option<C>,
    /// Items at most.
    pub limit: usize,
}

/// Identity of a dead letter.
pub type DeadLetterId = i64;

/// A given-up delivery, as operators list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its identity in the admin API.
    pub id: DeadLetterId,
    /// Envelope id of the postback.
    pub event_id: String,
    /// The target it was given up for ([`NO_ROUTE_TARGET`] when none matched).
    pub target: String,
    /// Why (`rejected by target`, `max attempts reached`, `max age exceeded`, `no route`, `target removed`).
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// HTTP status of the last attempt, when there was an answer.
    pub last_status: Option<u16>,
    /// The last error.
    pub last_error: Option<String>,
    /// When it was given up.
    pub dead_at_ms: i64,
    /// When ingest received the postback.
    pub received_at_ms: i64,
}

/// A dead letter with the postback it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterDetail {
    /// The listing fields.
    pub letter: DeadLetter,
    /// CloudEvents JSON.
    pub envelope: Bytes,
    /// The body as Sinch sent it.
    pub raw_body: Bytes,
    /// Its Content-Type.
    pub content_type: Option<String>,
}

/// Why the store could not do what was asked. Ingest answers `Refused`
/// with 400 (after quarantining the body) and every other variant with 503.
///
/// A variant keeps the error underneath it as its [`source`](std::error::Error::source)
/// (so a caller can walk or downcast it), while its message already carries
/// that error's text: the Display stays what logs and operators know.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed (disk full, locked, I/O error).
    #[error("store error: {message}")]
    Database {
        /// What failed, with its cause's text.
        message: String,
        /// The failure underneath, when there was one.
        #[source]
        source: Option<Cause>,
    },
    /// The database refused this one postback's data (a value it cannot
    /// store): retrying it can never succeed, unlike a [`StoreError::Database`]
    /// failure; the rest of its batch was committed.
    #[error("the database refused this postback: {message}")]
    Refused {
        /// Why, in the database's words.
        message: String,
        /// The database's error.
        #[source]
        source: Option<Cause>,
    },
    /// The store is shutting down or its writer has stopped.
    #[error("store is closed")]
    Closed,
}

/// The error underneath a [`StoreError`]; shared, because a failed batch
/// answers every caller in it with a clone of one error.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

impl StoreError {
    /// A database failure with no error underneath (a full queue, a state
    /// the store refuses to go on from).
    pub fn database(message: impl Into<String>) -> StoreError {
        StoreError::Database {
            message: message.into(),
            source: None,
        }
    }

    /// A database failure caused by `source`, whose text `message` includes.
    pub fn database_from(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StoreError {
        StoreError::Database {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// The database refused one postback's data with `source`, whose text
    /// `message` includes.
    pub fn refused_from(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> StoreError {
        StoreError::Refused {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }
}

/// The hot path of the durable queue: what ingest and delivery need to
/// take postbacks in (accept, quarantine a refused body), hand jobs out and
/// record their ends (claim, complete), follow pauses and removed targets,
/// and report readiness. See the module docs for the contract.
///
/// Operators' reads and repairs live apart, in [`OperatorStore`], so the
/// request and delivery paths cannot reach a listing or a purge, and a
/// reader of this trait sees only what a postback's way through the relay
/// depends on.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Commits a postback and its jobs (or finds it a duplicate); runs
    /// `after` once the jobs exist (never for a duplicate). Callers go
    /// through the [`Committer`], which hands the jobs to delivery.
    async fn accept(
        &self,
        postback: NewPostback,
        after: Option<AfterCommit>,
    ) -> Result<Acceptance, StoreError>;
    /// Keeps an unparseable body: whole while the stored bodies stay
    /// within `quarantine.max_bytes` (a running total, no scan), else its prefix.
    async fn quarantine(&self, entry: QuarantineEntry) -> Result<Kept, StoreError>;
    /// Turns the jobs of `target` into dead letters with `reason` (its
    /// target left the config; this process's dispatcher for it has
    /// stopped); jobs leased by another instance are left. Returns how many.
    async fn dead_letter_target(&self, target: &str, reason: &str) -> Result<u64, StoreError>;
    /// Records that `target` is paused (or not) for every instance.
    async fn set_paused(&self, target: &str, paused: bool) -> Result<(), StoreError>;
    /// The targets paused now.
    async fn paused_targets(&self) -> Result<Vec<String>, StoreError>;
    /// Leases up to `limit` due jobs of `target` for `lease`.
    async fn claim(
        &self,
        target: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, StoreError>;
    /// Records the end of attempts, in one batch.
    async fn complete(&self, outcomes: Vec<(JobId, Outcome)>) -> Result<(), StoreError>;
    /// A small durable write, so readiness recovers by itself once the store
    /// can commit again, even when no postback arrives.
    async fn probe(&self) -> Result<(), StoreError>;
    /// Whether the last write succeeded; drives `/readyz`.
    fn is_ready(&self) -> bool;
    /// Damaged intake journal segments kept aside for an operator (SQLite
    /// only): above 0, acknowledged postbacks may have been lost.
    fn damaged_journal_segments(&self) -> u64 {
        0
    }
    /// Finishes queued writes and closes cleanly.
    async fn close(&self) -> Result<(), StoreError>;
}

/// What operators (the admin API, the gauges, quarantine replay) read and
/// repair: queue detail and counts, dead letters and quarantined bodies
/// (listing, detail, replay, purge). Every backend implements it beside
/// [`Store`]; it is kept out of the hot path so ingest and delivery depend
/// on the few calls they make, and its methods may be costlier (scans,
/// joins) than anything on that path.
#[async_trait]
pub trait OperatorStore: Store {
    /// What the quarantine holds (the running total).
    async fn quarantine_usage(&self) -> Result<QuarantineUsage, StoreError>;
    /// Quarantined bodies by first arrival (then hash); the page cursor is
    /// the previous page's last `(first_seen_ms, body_hash)`.
    async fn list_quarantine(
        &self,
        filter: &QuarantineFilter,
        page: &Page<(i64, String)>,
    ) -> Result<Vec<QuarantinedBody>, StoreError>;
    /// One quarantined body.
    async fn quarantined(&self, body_hash: &str) -> Result<Option<QuarantinedBody>, StoreError>;
    /// Drops quarantined bodies (re-ingested or purged); returns how many were there.
    async fn remove_quarantined(&self, body_hashes: &[String]) -> Result<u64, StoreError>;
    /// Dead letters by id (oldest first); the cursor is the previous page's last id.
    async fn list_dead_letters(
        &self,
        filter: &DeadLetterFilter,
        page: &Page<DeadLetterId>,
    ) -> Result<Vec<DeadLetter>, StoreError>;
    /// The id of the newest dead letter (None: there are none), which bounds
    /// a replay walking a filter: letters a replay sends straight back to the
    /// dead letters get newer ids and are not taken again.
    async fn newest_dead_letter_id(&self) -> Result<Option<DeadLetterId>, StoreError>;
    /// One dead letter with its postback.
    async fn dead_letter(&self, id: DeadLetterId) -> Result<Option<DeadLetterDetail>, StoreError>;
    /// Puts dead letters back in the queue: each one still there leaves the
    /// dead letters and becomes one fresh job (no attempts, created now, due
    /// now) per given target (at least one), in one transaction. Returns
    /// how many moved.
    async fn requeue_dead_letters(
        &self,
        letters: Vec<(DeadLetterId, Vec<String>)>,
    ) -> Result<u64, StoreError>;
    /// Deletes dead letters (and bodies nothing needs any more); returns how many.
    async fn purge_dead_letters(&self, ids: &[DeadLetterId]) -> Result<u64, StoreError>;
    /// The queue per target in detail (costlier than [`OperatorStore::stats`]).
    async fn queue(&self) -> Result<Vec<TargetQueue>, StoreError>;
    /// Pending and dead counts per target.
    async fn stats(&self) -> Result<Vec<TargetStats>, StoreError>;
}

/// The envelope's `subject` (Sinch's tracking id), read without parsing the
/// rest of it.
pub fn tracking_id_of(envelope: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Subject {
        subject: Option<String>,
    }
    serde_json::from_slice::<Subject>(envelope).ok()?.subject
}
