//! The dispatcher driven with tokio's paused clock against a real SQLite
//! store in a temporary directory and a fake target: its rests, polls,
//! pauses and shutdown are timed by the paused clock, with no real sleep.
//!
//! The paused clock jumps to the next timer whenever the runtime has
//! nothing to do, also while the store's writer thread works: so these
//! tests assert what must have happened and lower bounds of time, never
//! that something happened soon.

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::*;
use crate::config::SyncMode;
use crate::delivery::fleet::Control;
use crate::delivery::retry::{RetryPolicy, Verdict};
use crate::delivery::sink::{self, FileSink, Sink};
use crate::delivery::TargetMetrics;
use crate::metrics::Metrics;
use crate::store::{
    AfterCommit, JobId, NewPostback, OperatorStore, QuarantineLimits, SqliteOptions, SqliteStore,
};

const TARGET: &str = "hooks";
/// Longest a test waits for attempts to start, on the paused clock (the
/// dispatcher always has a timer armed then: its poll, a rest).
const PATIENCE: Duration = Duration::from_secs(3600);

/// How the fake target answers one attempt.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Delivered,
    /// An HTTP status, with a `Retry-After`.
    Status(u16, Option<Duration>),
    /// No answer at all (refused, timed out).
    Nothing,
}

/// One attempt the fake saw.
#[derive(Debug, Clone)]
struct Seen {
    event_id: String,
    /// Attempts made before this one.
    attempts: u32,
    /// When it started, on the paused clock.
    at: Instant,
}

/// A target that answers as scripted (delivered once the script runs out)
/// and notes each attempt. Attempts wait at its gate for a permit.
struct Fake {
    script: Mutex<VecDeque<Answer>>,
    gate: Semaphore,
    seen: watch::Sender<Vec<Seen>>,
}

impl Fake {
    fn new(script: &[Answer], open: bool) -> Arc<Fake> {
        Arc::new(Fake {
            script: Mutex::new(script.iter().copied().collect()),
            gate: Semaphore::new(if open { Semaphore::MAX_PERMITS } else { 0 }),
            seen: watch::Sender::new(Vec::new()),
        })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.borrow().clone()
    }

    /// Waits until `count` attempts started.
    async fn started(&self, count: usize) -> Vec<Seen> {
        let mut seen = self.seen.subscribe();
        let started = tokio::time::timeout(PATIENCE, seen.wait_for(|seen| seen.len() >= count))
            .await
            .expect("the attempts started")
            .expect("the fake is alive")
            .clone();
        started
    }
}

impl Endpoint for Fake {
    fn send(&self, job: &Job, _timeout: Duration) -> impl Future<Output = sink::Attempt> + Send {
        let answer = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Answer::Delivered);
        self.seen.send_modify(|seen| {
            seen.push(Seen {
                event_id: job.event_id.clone(),
                attempts: job.attempts,
                at: Instant::now(),
            })
        });
        async move {
            let _held = self.gate.acquire().await;
            let (verdict, status, retry_after) = match answer {
                Answer::Delivered => (Verdict::Delivered, Some(200), None),
                Answer::Status(status, retry_after) => (Verdict::Retry, Some(status), retry_after),
                Answer::Nothing => (Verdict::Retry, None, None),
            };
            sink::Attempt {
                verdict,
                status,
                error: format!("fake answer {answer:?}"),
                retry_after,
            }
        }
    }
}

/// A dispatcher at work on `jobs` queued postbacks.
struct Running {
    _dir: tempfile::TempDir,
    store: Arc<dyn OperatorStore>,
    control: Arc<Control>,
    /// Ingest's way in: hand-overs.
    handover: mpsc::Sender<Job>,
    fake: Arc<Fake>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    /// When it started, on the paused clock.
    started_at: Instant,
}

/// Starts a dispatcher with `concurrency` slots for `fake`, after queueing
/// `jobs` postbacks for it (event-0 first).
async fn start(jobs: usize, concurrency: usize, paused: bool, fake: Arc<Fake>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn OperatorStore> = Arc::new(
        SqliteStore::open(SqliteOptions {
            path: dir.path().join("relay.db"),
            sync: SyncMode::Normal,
            busy_timeout: Duration::from_secs(1),
            dedupe_window: Duration::from_secs(60),
            min_free_bytes: 0,
            quarantine: QuarantineLimits::default(),
        })
        .unwrap(),
    );
    for n in 0..jobs {
        queue(&store, n, None).await;
    }
    let control = Arc::new(Control::new(paused));
    let shutdown = CancellationToken::new();
    let (handover, hot) = mpsc::channel(1);
    let started_at = Instant::now();
    let wiring = Wiring {
        store: store.clone() as Arc<dyn Store>,
        control: control.clone(),
        hot,
        ingest: Arc::new(IngestLoad::default()),
        shutdown: shutdown.clone(),
    };
    let target = Arc::new(target(dir.path(), concurrency));
    let dispatcher = Dispatcher::new(target, fake.clone(), wiring);
    Running {
        _dir: dir,
        store,
        control,
        handover,
        fake,
        shutdown,
        task: tokio::spawn(dispatcher.run()),
        started_at,
    }
}

/// The target's settings: backoff bounds of 5 s, 10 s, 20 s…
fn target(dir: &Path, concurrency: usize) -> Target {
    Target {
        name: TARGET.into(),
        // Never used: the fake stands in for it.
        sink: Sink::File(FileSink::new(dir.join("unused.jsonl"))),
        timeout: Duration::from_secs(10),
        concurrency,
        policy: RetryPolicy {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(600),
            multiplier: 2.0,
            max_attempts: None,
            max_age: Duration::from_secs(24 * 3600),
        },
        counted: TargetMetrics::new(&Metrics::new(), TARGET),
    }
}

/// Commits postback `n` for the target, its job leased until
/// `leased_until_ms` if given, and waits until the job exists: its id.
async fn queue(
    store: &Arc<dyn OperatorStore>,
    n: usize,
    leased_until_ms: Option<i64>,
) -> Vec<JobId> {
    let (committed, jobs_exist) = oneshot::channel();
    store
        .accept(
            NewPostback {
                id: format!("event-{n}"),
                dedupe_key: format!("key-{n}"),
                received_at_ms: now_ms(),
                envelope: Bytes::from(format!(r#"{{"subject":"tracking-{n}"}}"#)),
                raw_body: Bytes::from_static(b"<xml/>"),
                content_type: None,
                targets: vec![TARGET.into()],
                tracking_id: Some(format!("tracking-{n}")),
            },
            Some(AfterCommit {
                leased_until_ms,
                run: Box::new(move |ids| {
                    let _ = committed.send(ids.to_vec());
                }),
            }),
        )
        .await
        .unwrap();
    jobs_exist.await.unwrap()
}

impl Running {
    /// Pauses or resumes the target as the fleet does.
    fn set_paused(&self, paused: bool) {
        self.control.paused.send_replace(paused);
        self.control.wake.notify_one();
    }

    /// Shuts the dispatcher down and waits until it has ended. Without a
    /// deadline: a shutdown arms no timer, so the paused clock would jump
    /// straight to one while the store's writer thread works.
    async fn stop(self) -> Stopped {
        self.shutdown.cancel();
        self.task.await.expect("the dispatcher ended");
        Stopped {
            _dir: self._dir,
            store: self.store,
        }
    }
}

/// The store once its dispatcher ended.
struct Stopped {
    _dir: tempfile::TempDir,
    store: Arc<dyn OperatorStore>,
}

impl Stopped {
    /// The jobs due now (taking them), each checked to have been given
    /// back unattempted.
    async fn due_unattempted(&self) -> Vec<String> {
        let jobs = self
            .store
            .claim(TARGET, 100, Duration::from_secs(60))
            .await
            .unwrap();
        for job in &jobs {
            assert_eq!(job.attempts, 0, "{} was attempted", job.event_id);
        }
        jobs.into_iter().map(|job| job.event_id).collect()
    }

    /// Asserts that the store holds just `events`' jobs, given back
    /// unattempted and due at once.
    async fn holds_only(&self, events: &[&str]) {
        assert_eq!(self.due_unattempted().await, events);
        assert_eq!(self.pending().await, events.len() as u64);
    }

    /// Jobs not yet delivered.
    async fn pending(&self) -> u64 {
        let stats = self.store.stats().await.unwrap();
        stats
            .iter()
            .find(|s| s.target == TARGET)
            .map_or(0, |s| s.pending)
    }
}

fn events(seen: &[Seen]) -> Vec<&str> {
    seen.iter().map(|s| s.event_id.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn claimed_jobs_are_delivered_oldest_first_and_recorded() {
    let running = start(3, 4, false, Fake::new(&[], true)).await;
    let seen = running.fake.started(3).await;
    assert_eq!(events(&seen), ["event-0", "event-1", "event-2"]);
    let stopped = running.stop().await;
    assert_eq!(stopped.pending().await, 0, "every delivery was recorded");
}

#[tokio::test(start_paused = true)]
async fn a_silent_target_rests_for_its_backoff_bound_before_each_next_round() {
    let script = [Answer::Nothing, Answer::Nothing, Answer::Delivered];
    let running = start(3, 1, false, Fake::new(&script, true)).await;
    let seen = running.fake.started(3).await;
    let rests: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        rests[0] >= Duration::from_secs(5),
        "one round missed: rest 5 s, {rests:?}"
    );
    assert!(
        rests[1] >= Duration::from_secs(10),
        "two rounds missed: rest 10 s, {rests:?}"
    );
    let stopped = running.stop().await;
    let queue = stopped.store.queue().await.unwrap();
    let queue = queue.iter().find(|q| q.stats.target == TARGET).unwrap();
    assert_eq!(
        queue.last_error.as_deref(),
        Some("fake answer Nothing"),
        "the misses were recorded as retries"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_is_claimed_again_on_the_poll_once_it_is_due() {
    let script = [
        Answer::Status(503, Some(Duration::ZERO)),
        Answer::Status(503, Some(Duration::from_secs(3600))),
    ];
    let running = start(1, 1, false, Fake::new(&script, true)).await;
    let seen = running.fake.started(2).await;
    assert_eq!(
        (seen[1].event_id.as_str(), seen[1].attempts),
        ("event-0", 1),
        "the retry came back from the store with its attempt counted"
    );
    assert!(
        seen[1].at >= running.started_at + IDLE_POLL,
        "nothing woke the dispatcher: the poll found the retry"
    );
    // Asked to wait an hour, the job stays in the store meanwhile.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(running.fake.seen().len(), 2);
    let stopped = running.stop().await;
    assert_eq!(stopped.pending().await, 1);
    assert!(
        stopped.due_unattempted().await.is_empty(),
        "due only after Retry-After"
    );
}

#[tokio::test(start_paused = true)]
async fn a_paused_target_launches_nothing_until_resumed() {
    let running = start(3, 4, true, Fake::new(&[], true)).await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(running.fake.seen().is_empty(), "paused: nothing started");
    running.set_paused(false);
    let seen = running.fake.started(3).await;
    assert_eq!(events(&seen), ["event-0", "event-1", "event-2"]);
    let stopped = running.stop().await;
    assert_eq!(stopped.pending().await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_pause_gives_back_the_claimed_jobs_and_lets_the_attempt_in_flight_finish() {
    let running = start(4, 1, false, Fake::new(&[], false)).await;
    running.fake.started(1).await;
    running.set_paused(true);
    running.fake.gate.add_permits(1);
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        events(&running.fake.seen()),
        ["event-0"],
        "nothing new started"
    );
    // event-0 was delivered; the jobs claimed after it were given back.
    let stopped = running.stop().await;
    stopped.holds_only(&["event-1", "event-2", "event-3"]).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_gives_back_what_waits_and_drains_the_attempts_in_flight() {
    let running = start(5, 2, false, Fake::new(&[], false)).await;
    running.fake.started(2).await;
    running.shutdown.cancel();
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(
        !running.task.is_finished(),
        "it waits for the attempts in flight"
    );
    running.fake.gate.add_permits(2);
    // Both attempts were recorded; the jobs not started went back.
    let stopped = running.stop().await;
    stopped.holds_only(&["event-2", "event-3", "event-4"]).await;
}

#[tokio::test(start_paused = true)]
async fn a_job_handed_over_in_memory_is_sent_and_recorded() {
    let running = start(0, 2, false, Fake::new(&[], true)).await;
    let leased_until_ms = now_ms() + 60_000;
    let ids = queue(&running.store, 7, Some(leased_until_ms)).await;
    assert_eq!(ids.len(), 1, "the store leased the job at insert");
    let job = Job {
        id: ids[0],
        event_id: "event-7".into(),
        tracking_id: None,
        target: TARGET.into(),
        attempts: 0,
        created_at_ms: now_ms(),
        envelope: Bytes::from_static(br#"{"subject":"tracking-7"}"#),
        raw_body: Bytes::from_static(b"<xml/>"),
        content_type: None,
        leased_until_ms,
    };
    running.handover.send(job).await.unwrap();
    let seen = running.fake.started(1).await;
    assert_eq!(events(&seen), ["event-7"]);
    let stopped = running.stop().await;
    assert_eq!(stopped.pending().await, 0, "its delivery was recorded");
}
