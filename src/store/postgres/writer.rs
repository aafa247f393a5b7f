//! The accept writers and the pooled-connection plumbing every statement
//! goes through: batching, pipelined transactions, timeouts, readiness.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use deadpool_postgres::Object;
use futures_util::future::join3;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use super::errors::{describe, is_data_error, pool_error, refuses_data, timed_out};
use super::statements::{OutcomeBatch, ACCEPT_SQL, BEGIN_FLUSHED};
use super::{clean, storable_key, Accept, Failure, Shared, MAX_BATCH, OP_TIMEOUT};
use crate::store::{Acceptance, NewPostback, StoreError, NO_ROUTE_TARGET};

impl Shared {
    /// Runs `work` on a pooled connection within [`OP_TIMEOUT`], keeping the
    /// ready flag: a connection that fails or times out marks the store
    /// unready, and a successful `write` marks it ready.
    pub(super) async fn with_client<T>(
        &self,
        write: bool,
        work: impl AsyncFnOnce(&Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        self.run(write, work).await.map_err(|failure| failure.error)
    }

    /// [`Shared::with_client`], telling whether the items might succeed alone.
    pub(super) async fn run<T>(
        &self,
        write: bool,
        work: impl AsyncFnOnce(&Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, Failure> {
        // The pool bounds its own waits (connect, free slot).
        let outcome = match self.pool.get().await {
            Err(err) => Err(Failure {
                error: pool_error(err),
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
                        error: StoreError::database_from(describe(&err), err),
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
    pub(super) fn durable_begin(&self) -> &'static str {
        BEGIN_FLUSHED
    }

    pub(super) fn not_ready(&self, error: &StoreError) {
        if self.ready.swap(false, Ordering::Relaxed) {
            tracing::error!(error = %error, "PostgreSQL store failed; answering 503 until a write succeeds");
        }
    }

    /// Writes one batch of outcomes in one transaction.
    pub(super) async fn write_outcomes(&self, batch: &OutcomeBatch) -> Result<(), Failure> {
        self.run(true, async |client: &Object| batch.write(client).await)
            .await
    }

    /// One accept writer: takes every postback waiting, commits them in one
    /// transaction, answers. Stops after answering what was queued at close.
    pub(super) async fn run_writer(
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
    pub(super) async fn accept_batch(&self, connection: &mut Option<Object>, batch: Vec<Accept>) {
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
            Ok(_) | Err(StoreError::Refused { .. }) => {}
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
                    (None, None) => Err(StoreError::database(
                        "the dedupe key was not returned by the commit",
                    )),
                },
            };
            let _ = reply.send(answer);
        }
    }

    /// One transaction for `items` (distinct keys): returns who owns each key.
    /// The writer keeps its connection between batches while it works.
    pub(super) async fn write_accepts(
        &self,
        connection: &mut Option<Object>,
        items: &[(String, &NewPostback)],
    ) -> Result<HashMap<String, String>, Failure> {
        if connection.as_ref().is_some_and(|c| c.is_closed()) {
            *connection = None;
        }
        if connection.is_none() {
            *connection = Some(self.pool.get().await.map_err(|err| Failure {
                error: pool_error(err),
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
                error: StoreError::refused_from(describe(&err), err),
            }),
            Ok(Err(err)) => Err(Failure {
                per_item: is_data_error(&err),
                error: StoreError::database_from(describe(&err), err),
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
}

/// Runs the accept statement for `items` in one pipelined transaction.
pub(super) async fn accept_statement(
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
pub(super) async fn step_by_step<T>(
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

/// Sends `begin`, the statement and `COMMIT` at once (pipelined: one round
/// trip) and returns the statement's result once `COMMIT` has returned. If the
/// statement fails, the server turns the `COMMIT` into a rollback.
///
/// `work` must send its one request when first polled, as every
/// `tokio_postgres` query does with an already prepared statement.
pub(super) async fn in_transaction<T>(
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
