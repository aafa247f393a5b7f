//! The running dispatchers, one per configured target: started, replaced and
//! retired as the config is reloaded, paused and resumed by operators.
//!
//! A target whose settings change gets a new dispatcher at once; the old one
//! stops claiming and finishes its attempts in flight (leases keep the two
//! from taking the same job). A removed target's dispatcher is drained the
//! same way, then its queued jobs become dead letters ("target removed"), so
//! nothing is dropped and a replay brings them back once the target returns.
//!
//! Fresh jobs take a short cut: the fleet is the store's [`FreshJobs`]
//! outlet. Before a commit the store reserves room in each routed target's
//! hand-over queue ([`FreshJobs::reserve`]), inserts the jobs leased to this
//! process, and after the commit hands them to the dispatchers in memory
//! ([`Reservation::hand_over`]), so a fresh delivery costs no claim
//! transaction. Anything that goes wrong on the way (no room, a paused or
//! unreachable target, a backend that does not lease at insert, a crash)
//! leaves the jobs in the store, where a claim finds them: at worst once
//! their lease ran out.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::sink::HttpClient;
use super::{build_targets, run_dispatcher};
use crate::clock::now_ms;
use crate::config::{Config, DeliveryConfig, TargetConfig};
use crate::live::Live;
use crate::load::IngestLoad;
use crate::metrics::Metrics;
use crate::store::{FreshJobs, Job, Reservation, Store, StoreError};

/// Reason recorded on the dead letters of a target that left the config.
pub const TARGET_REMOVED: &str = "target removed";

/// When a removed target's queue is looked at a second time: longer than a
/// store operation may take (a postback routed by the old routes commits
/// within it, or is answered 503).
const SECOND_SWEEP_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// What ingest and operators tell one target's dispatcher; it outlives a
/// dispatcher replaced by a reload, so a pause survives the reload.
pub struct Control {
    /// Rung when new jobs were committed or replayed.
    pub(super) wake: Notify,
    /// True while the target is paused.
    pub(super) paused: watch::Sender<bool>,
    /// Whether fresh jobs may be handed over (not paused, answering).
    takes_hot: AtomicBool,
}

impl Control {
    pub(super) fn new(paused: bool) -> Control {
        Control {
            wake: Notify::new(),
            paused: watch::Sender::new(paused),
            takes_hot: AtomicBool::new(false),
        }
    }

    /// Set by the dispatcher: a paused or unreachable target gets no fresh
    /// jobs in memory (they would wait there, leased, instead of queueing).
    pub(super) fn set_takes_hot(&self, takes: bool) {
        self.takes_hot.store(takes, Ordering::Relaxed);
    }
}

/// What ingest reaches a running target through.
struct Inlet {
    control: Arc<Control>,
    hot: mpsc::Sender<Job>,
    /// How long a handed-over job stays leased.
    lease: std::time::Duration,
}

/// One running dispatcher.
struct Running {
    /// The target's settings it runs with, to tell whether a reload changed them.
    settings: (Option<TargetConfig>, DeliveryConfig),
    inlet: Arc<Inlet>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// Dispatchers of the same target that reloads replaced and that may
    /// still be finishing their attempts.
    predecessors: Vec<JoinHandle<()>>,
}

/// Room reserved in the hand-over queues of a postback's targets, for the
/// jobs the store is about to insert leased.
struct Handoff {
    permits: Vec<mpsc::OwnedPermit<Job>>,
    leased_until_ms: i64,
}

impl Reservation for Handoff {
    fn leased_until_ms(&self) -> i64 {
        self.leased_until_ms
    }

    fn hand_over(self: Box<Self>, jobs: Vec<Job>) {
        for (permit, job) in self.permits.into_iter().zip(jobs) {
            permit.send(job);
        }
    }
}

/// What a reload did to the targets.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TargetChanges {
    /// Targets that were not running before.
    pub started: Vec<String>,
    /// Targets whose settings changed (new dispatcher, old one drained).
    pub replaced: Vec<String>,
    /// Targets no longer configured (drained, then their jobs dead-lettered).
    pub removed: Vec<String>,
}

/// Why a pause or resume did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// No such target in the running config.
    #[error("no target `{0}` in the running config")]
    UnknownTarget(String),
    /// The store could not record it.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The set of running dispatchers.
pub struct Fleet {
    store: Arc<dyn Store>,
    metrics: Metrics,
    client: HttpClient,
    running: Mutex<BTreeMap<String, Running>>,
    /// Name → inlet, read by ingest on every postback without the lock above.
    inlets: Arc<Live<HashMap<String, Arc<Inlet>>>>,
    /// Dispatchers being drained after a reload replaced or removed them.
    retiring: TaskTracker,
    /// Counts pauses and resumes made here, so a periodic re-read of the
    /// store's pauses that started before one of them does not undo it.
    pause_changes: AtomicU64,
    /// The stored pauses as last read: a target a reload (re)adds starts
    /// paused when an operator paused it and nobody resumed it.
    stored_pauses: Mutex<Vec<String>>,
    /// Postbacks being answered now (counted by ingest); many at once make
    /// deliveries yield.
    ingest_load: Arc<IngestLoad>,
    /// Cancelled at shutdown: retiring work that only waits stops waiting.
    stopping: CancellationToken,
    /// Where the dispatchers and their attempts run.
    runtime: DeliveryRuntime,
}

/// The dispatchers' own tokio runtime, beside the one that answers Sinch.
///
/// On one runtime, ingest and delivery share its run queues: a postback's
/// answer waited behind the attempts of the postbacks before it (two per
/// postback with two targets). On their own threads the kernel shares the
/// CPUs between answering and delivering, and an answer is never queued
/// behind delivery work. Same-hour A/B on two vCPUs (docs/performance.md,
/// fourth pass): S1 0.71–0.89 → 0.94–1.03 of the fdatasync baseline, S3
/// 0.34–0.50 → 1.09–1.26 of bare hyper; deliveries then trail a
/// flood of postbacks and catch up from the store afterwards.
pub struct DeliveryRuntime(Option<tokio::runtime::Runtime>);

impl DeliveryRuntime {
    /// One worker thread per CPU, like the main runtime, named `delivery`.
    pub fn start() -> std::io::Result<DeliveryRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("delivery")
            .enable_all()
            .build()?;
        Ok(DeliveryRuntime(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for DeliveryRuntime {
    /// Without waiting: the fleet is dropped on the main runtime, where a
    /// blocking shutdown is not allowed (its dispatchers ended already).
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Fleet {
    /// Starts a dispatcher for every target of `config`, paused where the
    /// store says so.
    pub async fn start(
        config: &Config,
        store: Arc<dyn Store>,
        metrics: Metrics,
        client: HttpClient,
        runtime: DeliveryRuntime,
        ingest_load: Arc<IngestLoad>,
    ) -> Result<Fleet, StoreError> {
        let paused = store.paused_targets().await?;
        let fleet = Fleet {
            store,
            metrics,
            client,
            running: Mutex::new(BTreeMap::new()),
            inlets: Arc::new(Live::new(HashMap::new())),
            retiring: TaskTracker::new(),
            pause_changes: AtomicU64::new(0),
            stored_pauses: Mutex::new(paused),
            ingest_load,
            stopping: CancellationToken::new(),
            runtime,
        };
        fleet.apply(config);
        Ok(fleet)
    }

    /// Makes the running dispatchers match `config`'s targets.
    pub fn apply(&self, config: &Config) -> TargetChanges {
        let mut changes = TargetChanges::default();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut wanted = BTreeMap::new();
        let mut retired = Vec::new();
        for target in build_targets(config, &self.client, &self.metrics) {
            let settings = (
                config.targets.get(&target.name).cloned(),
                config.delivery.clone(),
            );
            let mut predecessors = Vec::new();
            let control = match running.remove(&target.name) {
                Some(old) if old.settings == settings => {
                    wanted.insert(target.name.clone(), old);
                    continue;
                }
                Some(old) => {
                    // It stops claiming now and finishes its attempts.
                    changes.replaced.push(target.name.clone());
                    old.stop.cancel();
                    predecessors = old.predecessors;
                    predecessors.retain(|task| !task.is_finished());
                    predecessors.push(old.task);
                    old.inlet.control.clone()
                }
                None => {
                    changes.started.push(target.name.clone());
                    let paused = self
                        .stored_pauses
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(&target.name);
                    Arc::new(Control::new(paused))
                }
            };
            let stop = CancellationToken::new();
            // One round of attempts: a handed-over job never waits long.
            let (hot, hot_receiver) = mpsc::channel(target.concurrency.max(1));
            let task = self.runtime.handle().spawn(run_dispatcher(
                target.clone(),
                self.store.clone(),
                control.clone(),
                hot_receiver,
                self.ingest_load.clone(),
                stop.clone(),
            ));
            let inlet = Arc::new(Inlet {
                control,
                hot,
                lease: target.lease(),
            });
            wanted.insert(
                target.name.clone(),
                Running {
                    settings,
                    inlet,
                    stop,
                    task,
                    predecessors,
                },
            );
        }
        for (name, old) in std::mem::take(&mut *running) {
            changes.removed.push(name.clone());
            self.metrics.forget_target(&name);
            retired.push((old, name));
        }
        *running = wanted;
        self.inlets.set(
            running
                .iter()
                .map(|(name, r)| (name.clone(), r.inlet.clone()))
                .collect(),
        );
        // After the new set is visible: a retired target's drain checks it.
        for (old, name) in retired {
            self.retire(old, name);
        }
        self.publish_pauses(&running);
        changes
    }

    /// Stops the removed target `name`'s dispatcher and drains it (and any
    /// predecessor still finishing), then turns its queued jobs into dead
    /// letters, unless a later reload brought the target back meanwhile. It
    /// looks once more after [`SECOND_SWEEP_AFTER`]: a postback routed by the
    /// old routes may commit a job for the target after the first look.
    fn retire(&self, old: Running, name: String) {
        old.stop.cancel();
        let store = self.store.clone();
        let inlets = self.inlets.clone();
        let stopping = self.stopping.clone();
        self.retiring.spawn(async move {
            let _ = old.task.await;
            for predecessor in old.predecessors {
                let _ = predecessor.await;
            }
            for sweep in 0..2 {
                if sweep == 1 {
                    tokio::select! {
                        () = tokio::time::sleep(SECOND_SWEEP_AFTER) => {},
                        () = stopping.cancelled() => return,
                    }
                }
                if inlets.get().contains_key(&name) {
                    return;
                }
                match store.dead_letter_target(&name, TARGET_REMOVED).await {
                    Ok(0) if sweep == 0 => tracing::info!(target = %name, "target removed; no jobs were queued for it"),
                    Ok(0) => {}
                    Ok(moved) => tracing::warn!(target = %name, jobs = moved,
                        "target removed; its queued jobs are kept as dead letters (reason \"target removed\"): replay them once it is back"),
                    Err(err) => tracing::error!(target = %name, error = %err,
                        "target removed, but its queued jobs could not be dead-lettered; they stay queued and are dead-lettered at the next start"),
                }
            }
        });
    }

    /// Tells `target`'s dispatcher that jobs are waiting in the store.
    pub fn wake(&self, target: &str) {
        if let Some(inlet) = self.inlets.get().get(target) {
            inlet.control.wake.notify_one();
        }
    }

    /// The configured targets' names, in order.
    pub fn targets(&self) -> Vec<String> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Whether `target` is paused here (None: not configured).
    pub fn is_paused(&self, target: &str) -> Option<bool> {
        self.inlets
            .get()
            .get(target)
            .map(|inlet| *inlet.control.paused.borrow())
    }

    /// Pauses or resumes `target`: recorded in the store first (so it holds
    /// across restarts and for other instances), then applied here.
    pub async fn set_paused(&self, target: &str, paused: bool) -> Result<(), PauseError> {
        if self.is_paused(target).is_none() {
            return Err(PauseError::UnknownTarget(target.to_owned()));
        }
        self.pause_changes.fetch_add(1, Ordering::SeqCst);
        self.store.set_paused(target, paused).await?;
        // Again: a re-read of the pauses that began before the write must
        // not be applied after it.
        self.pause_changes.fetch_add(1, Ordering::SeqCst);
        {
            let mut stored = self.stored_pauses.lock().unwrap_or_else(|p| p.into_inner());
            stored.retain(|name| name != target);
            if paused {
                stored.push(target.to_owned());
            }
        }
        if let Some(inlet) = self.inlets.get().get(target) {
            inlet.control.paused.send_replace(paused);
            inlet.control.wake.notify_one();
        }
        self.metrics.set_paused(target, paused);
        tracing::warn!(
            target,
            paused,
            "{}",
            if paused {
                "target paused: jobs queue, nothing is delivered"
            } else {
                "target resumed"
            }
        );
        Ok(())
    }

    /// A marker to pass to [`Fleet::sync_pauses`] with the pauses read after it.
    pub fn pause_epoch(&self) -> u64 {
        self.pause_changes.load(Ordering::SeqCst)
    }

    /// Applies the pauses read from the store (set by any instance), unless
    /// a pause or resume happened here since `epoch` (the read may predate it).
    pub fn sync_pauses(&self, paused: &[String], epoch: u64) {
        if self.pause_epoch() != epoch {
            return;
        }
        *self.stored_pauses.lock().unwrap_or_else(|p| p.into_inner()) = paused.to_vec();
        for (name, inlet) in self.inlets.get().iter() {
            let control = &inlet.control;
            let wanted = paused.contains(name);
            if *control.paused.borrow() != wanted {
                control.paused.send_replace(wanted);
                control.wake.notify_one();
                tracing::warn!(target = %name, paused = wanted, "pause changed by another instance");
            }
        }
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        self.publish_pauses(&running);
    }

    fn publish_pauses(&self, running: &BTreeMap<String, Running>) {
        for (name, r) in running {
            self.metrics
                .set_paused(name, *r.inlet.control.paused.borrow());
        }
    }

    /// Stops every dispatcher and waits until their attempts in flight ended
    /// and were recorded.
    pub async fn shutdown(&self) {
        self.stopping.cancel();
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()));
        for r in running.values() {
            r.stop.cancel();
        }
        for (_, r) in running {
            let _ = r.task.await;
            for predecessor in r.predecessors {
                let _ = predecessor.await;
            }
        }
        self.retiring.close();
        self.retiring.wait().await;
    }
}

/// The store hands fresh jobs to the dispatchers here.
impl FreshJobs for Fleet {
    /// One place in each target's hand-over queue, or nothing (then its jobs
    /// are claimed as usual).
    fn reserve(&self, targets: &[String]) -> Option<Box<dyn Reservation>> {
        let inlets = self.inlets.get();
        let mut permits = Vec::with_capacity(targets.len());
        // The longest of the targets' leases: each job must outlast its own
        // target's attempt (a longer lease only matters after a crash).
        let mut lease = std::time::Duration::ZERO;
        for target in targets {
            let inlet = inlets.get(target)?;
            if !inlet.control.takes_hot.load(Ordering::Relaxed) {
                return None;
            }
            permits.push(inlet.hot.clone().try_reserve_owned().ok()?);
            lease = lease.max(inlet.lease);
        }
        Some(Box::new(Handoff {
            permits,
            leased_until_ms: now_ms() + lease.as_millis() as i64,
        }))
    }

    fn wake(&self, target: &str) {
        Fleet::wake(self, target);
    }
}
