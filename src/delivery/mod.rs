//! Delivery: one dispatcher per target drains that target's queue from the store,
//! with its own concurrency, so a slow or dead target never delays another one
//! or the ingest side.
//!
//! A dispatcher leases due jobs a few rounds ahead of its free slots (bounded
//! by count and bytes, `ready.rs`), sends each on its own task, and records the
//! outcome: delivered, retry at a time computed by [`retry::RetryPolicy`], or
//! dead letter. Pending work lives in the store, so memory stays bounded
//! however long the backlog.

pub mod fleet;
mod ready;
pub mod retry;
pub mod signing;
pub mod sink;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::header::{HeaderName, HeaderValue};
use prometheus::{Histogram, IntCounter};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::now_ms;
use crate::config::{Config, TargetKind};
use crate::metrics::Metrics;
use crate::store::{Job, JobId, Outcome, Store, StoreError};
use fleet::{Control, IngestLoad};
use ready::Ready;
use retry::{Next, RetryPolicy, Verdict};
use signing::SigningKey;
use sink::{FileSink, HttpClient, HttpSink, Sink};

/// How often an idle dispatcher looks for jobs that came due (retries); new
/// postbacks wake it at once.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Pause after the store refused a claim, so a broken disk is not hammered.
const STORE_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// After a wake-up, how long a dispatcher lets new jobs gather before it
/// claims: under load, one claim then takes many jobs instead of one each.
const CLAIM_GATHER: Duration = Duration::from_millis(2);
/// How long a dispatcher with no room (ingest busy) waits before looking again.
const MAKING_ROOM: Duration = Duration::from_millis(2);
/// How long finished attempts gather before their outcomes are written in one
/// store call, and how many at most.
const OUTCOME_GATHER: Duration = Duration::from_millis(2);
const OUTCOME_BATCH: usize = 256;
/// Longest pause of a target that answers nothing, so its return is noticed soon.
const UNREACHABLE_PAUSE_MAX: Duration = Duration::from_secs(30);

/// A configured target, resolved for delivery.
pub struct Target {
    /// Name from the config; also the metrics label.
    pub name: String,
    /// Where attempts go.
    pub sink: Sink,
    /// Limit of one attempt.
    pub timeout: Duration,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// Backoff and give-up limits.
    pub policy: RetryPolicy,
    /// Its delivery metrics.
    counted: TargetMetrics,
}

/// A target's delivery metrics, resolved once: an attempt then counts
/// without hashing label values and locking the metric families.
struct TargetMetrics {
    duration: Histogram,
    delivered: IntCounter,
    retried: IntCounter,
    dead: IntCounter,
}

impl TargetMetrics {
    fn new(metrics: &Metrics, target: &str) -> TargetMetrics {
        let outcome = |label| metrics.deliveries.with_label_values(&[target, label]);
        TargetMetrics {
            duration: metrics.delivery_duration.with_label_values(&[target]),
            delivered: outcome("delivered"),
            retried: outcome("retried"),
            dead: outcome("dead"),
        }
    }
}

impl Target {
    /// How long a claimed job stays invisible to other claims: long enough for
    /// the attempt and its bookkeeping, short enough to recover a crashed worker.
    pub fn lease(&self) -> Duration {
        self.timeout * 2 + Duration::from_secs(30)
    }
}

/// Builds every target of a validated config.
fn build_targets(config: &Config, client: &HttpClient, metrics: &Metrics) -> Vec<Arc<Target>> {
    config
        .targets
        .iter()
        .map(|(name, target)| {
            let sink = match target.kind {
                TargetKind::Http => Sink::Http(HttpSink {
                    client: client.clone(),
                    url: target
                        .url
                        .as_deref()
                        .unwrap_or_default()
                        .parse()
                        .expect("validated with the config"),
                    headers: target
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            // Secrets are read again here: validation read them moments ago.
                            let value = v.value().expect("validated with the config");
                            (
                                HeaderName::from_bytes(k.as_bytes())
                                    .expect("validated with the config"),
                                HeaderValue::from_str(&value).expect("validated with the config"),
                            )
                        })
                        .collect(),
                    payload: target.payload,
                    signing: target
                        .secret
                        .as_deref()
                        .map(|s| SigningKey::parse(s).expect("validated with the config")),
                }),
                TargetKind::File => {
                    Sink::File(FileSink::new(target.path.clone().unwrap_or_default()))
                }
            };
            Arc::new(Target {
                name: name.clone(),
                sink,
                timeout: target.timeout.unwrap_or(config.delivery.timeout).0,
                concurrency: target.concurrency.unwrap_or(config.delivery.concurrency),
                policy: RetryPolicy::new(
                    &config.delivery.backoff,
                    &target.backoff,
                    target.max_attempts.or(config.delivery.max_attempts),
                    target.max_age.unwrap_or(config.delivery.max_age).0,
                ),
                counted: TargetMetrics::new(metrics, name),
            })
        })
        .collect()
}

/// The outbound client: HTTP/1.1 and HTTP/2, https with the system's roots.
pub fn build_client() -> std::io::Result<HttpClient> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https),
    )
}

/// Drains one target's queue until `shutdown`, then waits for attempts in flight
/// (each bounded by the target's timeout) so their outcomes are recorded.
///
/// Jobs come from two places: fresh ones in memory from ingest (`hot`,
/// already leased), and due ones from the store (retries, replays, jobs no
/// one handed over), claimed a round or more (`concurrency` jobs) at a time
/// into a [`Ready`] buffer several rounds deep. A claim runs on its own task beside the
/// attempts ([`Claiming`]), so a freed slot never waits for the store. The
/// store is asked when woken, every [`IDLE_POLL`], and while its last claim
/// came back full. While paused it claims nothing; attempts in flight finish.
async fn run_dispatcher(
    target: Arc<Target>,
    store: Arc<dyn Store>,
    control: Arc<Control>,
    mut hot: mpsc::Receiver<Job>,
    ingest: Arc<IngestLoad>,
    shutdown: CancellationToken,
) {
    let mut paused = control.paused.subscribe();
    let round = target.concurrency.max(1);
    let slots = Arc::new(Semaphore::new(round));
    let attempts = TaskTracker::new();
    let (outcomes, finished) = mpsc::unbounded_channel();
    // Attempts in a row that got no answer at all (refused, timed out): a
    // target that is down is paused rather than hammered job after job.
    let unanswered = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let recorder = tokio::spawn(record_outcomes(
        store.clone(),
        target.name.clone(),
        finished,
    ));
    let mut ready = Ready::new(round);
    let mut claiming = Claiming::default();
    // Whether the store may hold due jobs: at start, after a wake-up, every
    // poll interval (even while hand-overs keep it busy: retries come due in
    // the store), and while claims come back full.
    let mut backlog = true;
    let mut next_poll = tokio::time::Instant::now() + IDLE_POLL;
    loop {
        if tokio::time::Instant::now() >= next_poll {
            backlog = true;
            next_poll = tokio::time::Instant::now() + IDLE_POLL;
        }
        if *paused.borrow_and_update() {
            // Jobs taken would outlive their lease while paused (one handed
            // over after this is checked against its lease on resume).
            control.set_takes_hot(false);
            release(ready.drain(), &outcomes);
            if let Some(Ok(jobs)) = claiming.finish().await {
                release(jobs.into_iter(), &outcomes);
            }
            while let Ok(job) = hot.try_recv() {
                release(std::iter::once(job), &outcomes);
            }
            tokio::select! {
                _ = paused.wait_for(|paused| !*paused) => continue,
                () = shutdown.cancelled() => break,
            }
        }
        if claiming.is_finished() {
            match claiming.finish().await {
                Some(Ok(claimed)) => {
                    backlog = claimed.len() == claiming.wanted;
                    ready.extend(claimed);
                }
                Some(Err(err)) => {
                    tracing::warn!(target = %target.name, error = %err, "cannot claim deliveries");
                    tokio::select! {
                        () = tokio::time::sleep(STORE_ERROR_PAUSE) => {},
                        () = shutdown.cancelled() => break,
                    }
                    continue;
                }
                None => {}
            }
        }
        if slots.available_permits() == 0 {
            tokio::select! {
                permit = slots.acquire() => {
                    drop(permit);
                    // Attempts finishing together free their slots
                    // together: let them, so one pass fills several.
                    tokio::task::yield_now().await;
                }
                () = claiming.done() => continue,
                () = shutdown.cancelled() => break,
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        let misses = unanswered.load(std::sync::atomic::Ordering::Relaxed);
        let answering = misses < round as u32;
        control.set_takes_hot(answering && !*paused.borrow());
        if !answering {
            let pause = target
                .policy
                .delay_bound(misses / round as u32)
                .min(UNREACHABLE_PAUSE_MAX);
            tracing::warn!(target = %target.name, attempts = misses, pause_ms = pause.as_millis() as u64,
                "target does not answer; pausing its deliveries");
            tokio::select! {
                () = tokio::time::sleep(pause) => {},
                () = shutdown.cancelled() => break,
            }
        }
        // Refilled whenever a round is missing: the jobs in hand must
        // outlast a claim's wait behind the writer's outcome batches.
        let wanted = ready.wanted();
        if wanted > 0 && backlog && claiming.is_idle() {
            claiming.start(&store, &target, wanted);
        }
        if *paused.borrow() {
            continue; // paused meanwhile: nothing new starts
        }
        // Ingest comes first: while it is busy, a quarter of the slots.
        let in_flight = round - slots.available_permits();
        let allowed = if ingest.is_busy() {
            (round / 4).max(1)
        } else {
            round
        };
        let room = allowed.saturating_sub(in_flight);
        if room == 0 {
            tokio::select! {
                () = tokio::time::sleep(MAKING_ROOM) => continue,
                () = shutdown.cancelled() => break,
            }
        }
        let mut jobs = Vec::with_capacity(room);
        while jobs.len() < room {
            let next = match ready.pop() {
                Some(job) => job,
                None => match hot.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            jobs.extend(in_time(&target, next, &outcomes));
        }
        if jobs.is_empty() && ready.is_empty() {
            tokio::select! {
                Some(job) = hot.recv() => jobs.extend(in_time(&target, job, &outcomes)),
                () = claiming.done() => continue,
                () = control.wake.notified() => {
                    tokio::time::sleep(CLAIM_GATHER).await;
                    backlog = true;
                    continue;
                }
                () = tokio::time::sleep_until(next_poll) => continue,
                () = shutdown.cancelled() => break,
            }
        }
        for job in jobs {
            let permit = slots
                .clone()
                .try_acquire_owned()
                .expect("took no more jobs than free slots");
            let target = target.clone();
            let outcomes = outcomes.clone();
            let unanswered = unanswered.clone();
            attempts.spawn(async move {
                let outcome = attempt(&target, &job).await;
                if matches!(outcome, Outcome::Retry { status: None, .. }) {
                    unanswered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    unanswered.store(0, std::sync::atomic::Ordering::Relaxed);
                }
                // The slot frees now; the job stays leased until its outcome
                // is written, so no claim can take it twice.
                let _ = outcomes.send((job.id, outcome));
                drop(permit);
            });
        }
    }
    // Jobs taken but not attempted go back to the queue at once rather than
    // waiting for their lease to run out.
    control.set_takes_hot(false);
    hot.close();
    release(ready.drain(), &outcomes);
    if let Some(Ok(jobs)) = claiming.finish().await {
        release(jobs.into_iter(), &outcomes);
    }
    // Ends once no hand-over reserved before the close is outstanding.
    while let Some(job) = hot.recv().await {
        release(std::iter::once(job), &outcomes);
    }
    attempts.close();
    attempts.wait().await;
    drop(outcomes);
    let _ = recorder.await;
}

/// A dispatcher's claim in flight: it runs on its own task so the dispatcher
/// goes on starting attempts from its ready buffer and the hand-over queue
/// meanwhile. At most one at a time.
#[derive(Default)]
struct Claiming {
    task: Option<tokio::task::JoinHandle<Result<Vec<Job>, StoreError>>>,
    /// The finished claim's answer, until the dispatcher takes it.
    answer: Option<Result<Vec<Job>, StoreError>>,
    /// How many jobs the last claim asked for: fewer back means the store
    /// has no more due now.
    wanted: usize,
}

impl Claiming {
    fn start(&mut self, store: &Arc<dyn Store>, target: &Target, wanted: usize) {
        let (store, name, lease) = (store.clone(), target.name.clone(), target.lease());
        self.wanted = wanted;
        self.task = Some(tokio::spawn(async move {
            store.claim(&name, wanted, lease).await
        }));
    }

    fn is_idle(&self) -> bool {
        self.task.is_none() && self.answer.is_none()
    }

    fn is_finished(&self) -> bool {
        self.answer.is_some() || self.task.as_ref().is_some_and(|task| task.is_finished())
    }

    /// Resolves once the claim in flight has an answer (kept for
    /// [`Claiming::finish`]); never without a claim. Cancel-safe.
    async fn done(&mut self) {
        match &mut self.task {
            Some(task) => {
                let answer = task.await.unwrap_or_else(|err| {
                    Err(StoreError::database_from(
                        format!("claim task failed: {err}"),
                        err,
                    ))
                });
                self.task = None;
                self.answer = Some(answer);
            }
            None if self.answer.is_some() => {}
            None => std::future::pending().await,
        }
    }

    /// The claim's answer (waiting for it), or None without a claim.
    async fn finish(&mut self) -> Option<Result<Vec<Job>, StoreError>> {
        if self.task.is_some() {
            self.done().await;
        }
        self.answer.take()
    }
}

/// The job to attempt, unless its lease could run out during the attempt
/// (it waited too long): then it is released to be claimed afresh, so it is
/// never attempted twice at once. (A fresh lease always suffices: leases are
/// longer than the timeout, which `store.lease` is validated against.)
fn in_time(
    target: &Target,
    mut job: Job,
    outcomes: &mpsc::UnboundedSender<(JobId, Outcome)>,
) -> Option<Job> {
    if now_ms() + (target.timeout.as_millis() as i64) < job.leased_until_ms {
        if job.tracking_id.is_none() {
            job.tracking_id = crate::store::tracking_id_of(&job.envelope);
        }
        return Some(job);
    }
    release(std::iter::once(job), outcomes);
    None
}

/// Gives jobs back to the store unattempted (each only if its lease is
/// still the one it was taken under).
fn release(jobs: impl Iterator<Item = Job>, outcomes: &mpsc::UnboundedSender<(JobId, Outcome)>) {
    for job in jobs {
        let released = Outcome::Released {
            leased_until_ms: job.leased_until_ms,
        };
        let _ = outcomes.send((job.id, released));
    }
}

/// Writes attempt outcomes to the store in batches. If a write fails, the
/// jobs' leases run out and they are attempted again: at-least-once, never lost.
async fn record_outcomes(
    store: Arc<dyn Store>,
    target: String,
    mut finished: mpsc::UnboundedReceiver<(JobId, Outcome)>,
) {
    while let Some(first) = finished.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + OUTCOME_GATHER;
        while batch.len() < OUTCOME_BATCH {
            tokio::select! {
                next = finished.recv() => match next {
                    Some(outcome) => batch.push(outcome),
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let count = batch.len();
        if let Err(err) = store.complete(batch).await {
            tracing::error!(target = %target, error = %err, jobs = count,
                "cannot record delivery outcomes; the jobs will be attempted again after their lease");
        }
    }
}

/// Sends one job; counts and logs what happened and returns it.
async fn attempt(target: &Target, job: &Job) -> Outcome {
    let started = Instant::now();
    let result = target.sink.send(job, target.timeout).await;
    target
        .counted
        .duration
        .observe(started.elapsed().as_secs_f64());
    let attempt_number = job.attempts + 1;
    // 0 when the target gave no HTTP answer (connection error, timeout, file).
    let status = result.status.unwrap_or(0);
    let (counter, outcome) = match result.verdict {
        Verdict::Delivered => {
            tracing::info!(
                id = %job.event_id, tracking_id = job.tracking_id.as_deref().unwrap_or(""),
                target = %target.name, attempt = attempt_number,
                status, "delivered"
            );
            (&target.counted.delivered, Outcome::Delivered)
        }
        Verdict::Reject => give_up(target, job, &result, "rejected by target"),
        Verdict::Retry => {
            let age =
                Duration::from_millis(now_ms().saturating_sub(job.created_at_ms).max(0) as u64);
            match target.policy.after_failure(
                attempt_number,
                age,
                result.retry_after,
                rand::random::<f64>(),
            ) {
                Next::RetryIn(delay) => {
                    tracing::warn!(
                            id = %job.event_id, tracking_id = job.tracking_id.as_deref().unwrap_or(""),
                    target = %target.name, attempt = attempt_number,
                            status, error = %result.error,
                            retry_in_ms = delay.as_millis() as u64, "delivery failed; will retry"
                        );
                    (
                        &target.counted.retried,
                        Outcome::Retry {
                            next_at_ms: now_ms() + delay.as_millis() as i64,
                            status: result.status,
                            error: result.error.clone(),
                        },
                    )
                }
                Next::GiveUp(reason) => give_up(target, job, &result, reason),
            }
        }
    };
    counter.inc();
    outcome
}

/// The dead-letter outcome of an attempt, logged.
fn give_up<'t>(
    target: &'t Target,
    job: &Job,
    result: &sink::Attempt,
    reason: &str,
) -> (&'t IntCounter, Outcome) {
    tracing::error!(
        id = %job.event_id, tracking_id = job.tracking_id.as_deref().unwrap_or(""),
        target = %target.name, attempt = job.attempts + 1,
        status = result.status.unwrap_or(0), error = %result.error, reason,
        "delivery given up; kept as dead letter"
    );
    (
        &target.counted.dead,
        Outcome::Dead {
            reason: reason.into(),
            status: result.status,
            error: result.error.clone(),
        },
    )
}
