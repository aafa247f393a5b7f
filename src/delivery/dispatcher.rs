//! One target's dispatcher: drains its queue until shutdown, then waits for
//! the attempts in flight (each bounded by the target's timeout) so their
//! outcomes are recorded.
//!
//! Jobs come from two places: fresh ones in memory from ingest (`hot`,
//! already leased), and due ones from the store (retries, replays, jobs no
//! one handed over), claimed a round or more (`concurrency` jobs) at a time
//! into a [`Ready`] buffer several rounds deep. A claim runs on its own task
//! beside the attempts ([`Claiming`]), so a freed slot never waits for the
//! store. The store is asked when woken, every [`IDLE_POLL`], and while its
//! last claim came back full. While paused it claims nothing; attempts in
//! flight finish.
//!
//! Each turn of the loop is a few named steps: take a finished claim's jobs
//! (refill), wait for a free slot, decide ([`admission::admit`], a pure
//! function), claim more, start attempts (launch); outcomes go to a recorder
//! task that writes them back in batches (drain). Pauses, wake-ups and
//! shutdown each have their own step.

mod admission;
mod attempt;
mod claiming;
mod outcomes;
#[cfg(test)]
mod tests;

use std::ops::ControlFlow::{self, Break, Continue};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fleet::Control;
use super::ready::Ready;
use super::Target;
use crate::clock::now_ms;
use crate::load::IngestLoad;
use crate::store::{Job, Outcome, Store};
use admission::{admit, Admission, Go, Launch, View};
use attempt::{attempt, Endpoint};
use claiming::Claiming;
use outcomes::{release, start_recorder, Outcomes};

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

/// Why a turn ended before starting attempts.
enum Exit {
    /// Begin the next turn.
    Again,
    /// Shutdown: stop turning.
    Stop,
}

/// A step's result: go on with the turn (with a value), or end it.
type Step<T = ()> = ControlFlow<Exit, T>;

/// Drains `target`'s queue until `shutdown` (see the module docs).
pub(super) async fn run_dispatcher(
    target: Arc<Target>,
    store: Arc<dyn Store>,
    control: Arc<Control>,
    hot: mpsc::Receiver<Job>,
    ingest: Arc<IngestLoad>,
    shutdown: CancellationToken,
) {
    let wiring = Wiring {
        store,
        control,
        hot,
        ingest,
        shutdown,
    };
    Dispatcher::new(target.clone(), target, wiring).run().await
}

/// What a dispatcher is connected to besides its target.
struct Wiring {
    store: Arc<dyn Store>,
    control: Arc<Control>,
    hot: mpsc::Receiver<Job>,
    ingest: Arc<IngestLoad>,
    shutdown: CancellationToken,
}

/// A running dispatcher's state.
struct Dispatcher<E: Endpoint> {
    /// The target's settings and metrics.
    target: Arc<Target>,
    /// Where its attempts go.
    endpoint: Arc<E>,
    store: Arc<dyn Store>,
    /// What ingest and operators tell it (wake-ups, the pause); it tells
    /// ingest whether it takes hand-overs.
    control: Arc<Control>,
    paused: watch::Receiver<bool>,
    /// Fresh jobs handed over by ingest, already leased.
    hot: mpsc::Receiver<Job>,
    ingest: Arc<IngestLoad>,
    shutdown: CancellationToken,
    /// Attempts in flight at most (the target's concurrency, at least 1).
    round: usize,
    /// One permit per attempt in flight.
    slots: Arc<Semaphore>,
    attempts: TaskTracker,
    /// Attempts in a row that got no answer at all (refused, timed out): a
    /// target that is down is paused rather than hammered job after job.
    unanswered: Arc<AtomicU32>,
    /// To the recorder, which writes outcomes to the store.
    outcomes: Outcomes,
    recorder: JoinHandle<()>,
    /// Jobs claimed and not started yet.
    ready: Ready,
    claiming: Claiming,
    /// Whether the store may hold due jobs: at start, after a wake-up, every
    /// poll interval (even while hand-overs keep it busy: retries come due
    /// in the store), and while claims come back full.
    backlog: bool,
    next_poll: Instant,
}

impl<E: Endpoint> Dispatcher<E> {
    /// Ready to run; its recorder already runs.
    fn new(target: Arc<Target>, endpoint: Arc<E>, wiring: Wiring) -> Dispatcher<E> {
        let Wiring {
            store,
            control,
            hot,
            ingest,
            shutdown,
        } = wiring;
        let round = target.concurrency.max(1);
        let (outcomes, recorder) = start_recorder(store.clone(), target.name.clone());
        Dispatcher {
            paused: control.paused.subscribe(),
            endpoint,
            store,
            control,
            hot,
            ingest,
            shutdown,
            round,
            slots: Arc::new(Semaphore::new(round)),
            attempts: TaskTracker::new(),
            unanswered: Arc::new(AtomicU32::new(0)),
            outcomes,
            recorder,
            ready: Ready::new(round),
            claiming: Claiming::default(),
            backlog: true,
            next_poll: Instant::now() + IDLE_POLL,
            target,
        }
    }

    /// Turns until shutdown, then shuts down.
    async fn run(mut self) {
        while !matches!(self.turn().await, Break(Exit::Stop)) {}
        self.shut_down().await;
    }

    /// One turn of the loop.
    async fn turn(&mut self) -> Step {
        self.note_poll();
        if *self.paused.borrow_and_update() {
            return self.sit_out_pause().await;
        }
        self.collect_claim().await?;
        self.wait_for_slot().await?;
        if self.shutdown.is_cancelled() {
            return Break(Exit::Stop);
        }
        let go = self.decide().await?;
        self.refill(&go);
        let jobs = self.take_jobs(go.launch).await?;
        self.launch(jobs);
        Continue(())
    }

    /// Once the poll interval is over, the store may hold jobs that came due.
    fn note_poll(&mut self) {
        if Instant::now() >= self.next_poll {
            self.backlog = true;
            self.next_poll = Instant::now() + IDLE_POLL;
        }
    }

    /// Paused: gives back every job taken (it would outlive its lease while
    /// paused; one handed over after this is checked against its lease on
    /// resume) and waits for the resume.
    async fn sit_out_pause(&mut self) -> Step {
        self.control.set_takes_hot(false);
        self.give_back_claimed().await;
        while let Ok(job) = self.hot.try_recv() {
            release(std::iter::once(job), &self.outcomes);
        }
        tokio::select! {
            _ = self.paused.wait_for(|paused| !*paused) => Break(Exit::Again),
            () = self.shutdown.cancelled() => Break(Exit::Stop),
        }
    }

    /// Refill, first half: a finished claim's jobs join the ready buffer. A
    /// store that refused the claim is left alone a moment.
    async fn collect_claim(&mut self) -> Step {
        if !self.claiming.is_finished() {
            return Continue(());
        }
        match self.claiming.finish().await {
            Some(Ok(claimed)) => {
                self.backlog = claimed.len() == self.claiming.wanted;
                self.ready.extend(claimed);
                Continue(())
            }
            Some(Err(err)) => {
                tracing::warn!(target = %self.target.name, error = %err, "cannot claim deliveries");
                tokio::select! {
                    () = tokio::time::sleep(STORE_ERROR_PAUSE) => Break(Exit::Again),
                    () = self.shutdown.cancelled() => Break(Exit::Stop),
                }
            }
            None => Continue(()),
        }
    }

    /// With every slot taken, waits until one frees (or a claim answers).
    async fn wait_for_slot(&mut self) -> Step {
        if self.slots.available_permits() > 0 {
            return Continue(());
        }
        tokio::select! {
            permit = self.slots.acquire() => {
                drop(permit);
                // Attempts finishing together free their slots together:
                // let them, so one pass fills several.
                tokio::task::yield_now().await;
                Continue(())
            }
            () = self.claiming.done() => Break(Exit::Again),
            () = self.shutdown.cancelled() => Break(Exit::Stop),
        }
    }

    /// Admit: what this turn may do ([`admit`]). A target that answers
    /// nothing rests here first, then gets one round.
    async fn decide(&mut self) -> Step<Go> {
        let mut view = self.view();
        loop {
            match admit(&view, &self.target.policy) {
                Admission::Go(go) => {
                    self.control.set_takes_hot(go.takes_hot);
                    return Continue(go);
                }
                Admission::Rest(pause) => {
                    self.control.set_takes_hot(false);
                    tracing::warn!(target = %self.target.name, attempts = view.unanswered,
                        pause_ms = pause.as_millis() as u64,
                        "target does not answer; pausing its deliveries");
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {},
                        () = self.shutdown.cancelled() => return Break(Exit::Stop),
                    }
                    // The misses that called for the rest still stand.
                    view = View {
                        rested: true,
                        unanswered: view.unanswered,
                        ..self.view()
                    };
                }
            }
        }
    }

    /// What [`admit`] decides from, read now.
    fn view(&self) -> View {
        View {
            round: self.round,
            in_flight: self.round - self.slots.available_permits(),
            ingest_busy: self.ingest.is_busy(),
            paused: *self.paused.borrow(),
            unanswered: self.unanswered.load(Ordering::Relaxed),
            rested: false,
            room_ahead: self.ready.wanted(),
            backlog: self.backlog,
            claim_idle: self.claiming.is_idle(),
        }
    }

    /// Refill, second half: claims what was admitted, on the claim's own
    /// task. Refilled whenever a round is missing: the jobs in hand must
    /// outlast a claim's wait behind the writer's outcome batches.
    fn refill(&mut self, go: &Go) {
        if go.claim > 0 {
            self.claiming.start(&self.store, &self.target, go.claim);
        }
    }

    /// The jobs to start now: claimed ones first, then hand-overs. With
    /// none at all, it waits ([`Dispatcher::idle`]).
    async fn take_jobs(&mut self, launch: Launch) -> Step<Vec<Job>> {
        let room = match launch {
            // Paused meanwhile: the next turn gives back what is held.
            Launch::Hold => return Break(Exit::Again),
            Launch::MakeRoom => {
                return tokio::select! {
                    () = tokio::time::sleep(MAKING_ROOM) => Break(Exit::Again),
                    () = self.shutdown.cancelled() => Break(Exit::Stop),
                }
            }
            Launch::Up(room) => room,
        };
        let mut jobs = Vec::with_capacity(room);
        while jobs.len() < room {
            let next = match self.ready.pop() {
                Some(job) => job,
                None => match self.hot.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            jobs.extend(in_time(&self.target, next, &self.outcomes));
        }
        if jobs.is_empty() && self.ready.is_empty() {
            let job = self.idle().await?;
            jobs.extend(in_time(&self.target, job, &self.outcomes));
        }
        Continue(jobs)
    }

    /// Nothing to start: waits for a hand-over, a claim's answer, a wake-up
    /// (jobs committed or replayed, a pause or resume) or the poll.
    async fn idle(&mut self) -> Step<Job> {
        tokio::select! {
            Some(job) = self.hot.recv() => Continue(job),
            () = self.claiming.done() => Break(Exit::Again),
            () = self.control.wake.notified() => {
                tokio::time::sleep(CLAIM_GATHER).await;
                self.backlog = true;
                Break(Exit::Again)
            }
            () = tokio::time::sleep_until(self.next_poll) => Break(Exit::Again),
            () = self.shutdown.cancelled() => Break(Exit::Stop),
        }
    }

    /// Launch: one attempt per job, each on its own task holding a slot.
    fn launch(&mut self, jobs: Vec<Job>) {
        for job in jobs {
            let permit = self
                .slots
                .clone()
                .try_acquire_owned()
                .expect("took no more jobs than free slots");
            let target = self.target.clone();
            let endpoint = self.endpoint.clone();
            let outcomes = self.outcomes.clone();
            let unanswered = self.unanswered.clone();
            self.attempts.spawn(async move {
                let outcome = attempt(&target, &*endpoint, &job).await;
                if matches!(outcome, Outcome::Retry { status: None, .. }) {
                    unanswered.fetch_add(1, Ordering::Relaxed);
                } else {
                    unanswered.store(0, Ordering::Relaxed);
                }
                // The slot frees now; the job stays leased until its outcome
                // is written, so no claim can take it twice.
                let _ = outcomes.send((job.id, outcome));
                drop(permit);
            });
        }
    }

    /// Gives back the jobs claimed but not started: the ready buffer's and
    /// the claim in flight's.
    async fn give_back_claimed(&mut self) {
        release(self.ready.drain(), &self.outcomes);
        if let Some(Ok(jobs)) = self.claiming.finish().await {
            release(jobs.into_iter(), &self.outcomes);
        }
    }

    /// Jobs taken but not attempted go back to the queue at once rather than
    /// waiting for their lease to run out; attempts in flight finish and
    /// every outcome is written before it returns.
    async fn shut_down(mut self) {
        self.control.set_takes_hot(false);
        self.hot.close();
        self.give_back_claimed().await;
        // Ends once no hand-over reserved before the close is outstanding.
        while let Some(job) = self.hot.recv().await {
            release(std::iter::once(job), &self.outcomes);
        }
        self.attempts.close();
        self.attempts.wait().await;
        let Dispatcher {
            outcomes, recorder, ..
        } = self;
        drop(outcomes);
        let _ = recorder.await;
    }
}

/// The job to attempt, unless its lease could run out during the attempt
/// (it waited too long): then it is released to be claimed afresh, so it is
/// never attempted twice at once. (A fresh lease always suffices: leases are
/// longer than the timeout, which `store.lease` is validated against.)
fn in_time(target: &Target, mut job: Job, outcomes: &Outcomes) -> Option<Job> {
    if now_ms() + (target.timeout.as_millis() as i64) < job.leased_until_ms {
        if job.tracking_id.is_none() {
            job.tracking_id = crate::store::tracking_id_of(&job.envelope);
        }
        return Some(job);
    }
    release(std::iter::once(job), outcomes);
    None
}
