//! Where a dispatcher's outcomes go: attempts and give-backs send them to
//! one recorder task, which writes them to the store in batches.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::store::{Job, JobId, Outcome, Store};

/// How long finished attempts gather before their outcomes are written in one
/// store call, and how many at most.
const OUTCOME_GATHER: Duration = Duration::from_millis(2);
const OUTCOME_BATCH: usize = 256;

/// The way to the recorder.
pub type Outcomes = mpsc::UnboundedSender<(JobId, Outcome)>;

/// Starts the recorder of `target`'s outcomes; it ends once every sender
/// is dropped and all they sent is written.
pub fn start_recorder(
    store: Arc<dyn Store>,
    target: String,
) -> (Outcomes, tokio::task::JoinHandle<()>) {
    let (outcomes, finished) = mpsc::unbounded_channel();
    (
        outcomes,
        tokio::spawn(record_outcomes(store, target, finished)),
    )
}

/// Gives jobs back to the store unattempted (each only if its lease is
/// still the one it was taken under).
pub fn release(jobs: impl Iterator<Item = Job>, outcomes: &Outcomes) {
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
