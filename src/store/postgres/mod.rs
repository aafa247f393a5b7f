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

mod errors;
mod janitor;
mod operator;
mod schema;
mod statements;
mod store_impl;
#[cfg(test)]
mod tests;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::{Acceptance, NewPostback, QuarantineLimits, StoreError};
use crate::config::describe_url;

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
// The config's smallest pool (`store.pool_size`) must leave room for
// delivery next to the accept writers.
const _: () = assert!(ACCEPT_WRITERS + 2 <= crate::config::MIN_POOL_SIZE);

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

/// The PostgreSQL implementation of [`Store`](super::Store).
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
        let mut config: tokio_postgres::Config = options.url.parse().map_err(|err| {
            StoreError::database_from(format!("invalid PostgreSQL URL: {err}"), err)
        })?;
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
            .map_err(|err| {
                StoreError::database_from(format!("cannot create the pool: {err}"), err)
            })?;
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
            return Err(StoreError::database(format!(
                "{before} bytes of postbacks are waiting for PostgreSQL \
                 (store.max_queued_bytes: {}); try again later",
                self.max_queued_bytes
            )));
        }
        Ok(held)
    }
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
