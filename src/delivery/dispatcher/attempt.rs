//! One attempt at one job: sent through the target's endpoint, counted,
//! logged, and turned into the outcome the store records (delivered, retry
//! at a time the target's [`RetryPolicy`](crate::delivery::retry::RetryPolicy)
//! computes, or dead letter).

use std::future::Future;
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use crate::clock::now_ms;
use crate::delivery::retry::{Next, Verdict};
use crate::delivery::sink;
use crate::delivery::Target;
use crate::store::{Job, Outcome};

/// Where a dispatcher's attempts go. The relay sends through the target's
/// own sink; tests put a scripted fake here, so the dispatcher's timing
/// can be driven with paused time and no network.
pub trait Endpoint: Send + Sync + 'static {
    /// Makes one attempt, bounded by `timeout`.
    fn send(&self, job: &Job, timeout: Duration) -> impl Future<Output = sink::Attempt> + Send;
}

impl Endpoint for Target {
    fn send(&self, job: &Job, timeout: Duration) -> impl Future<Output = sink::Attempt> + Send {
        self.sink.send(job, timeout)
    }
}

/// Sends one job; counts and logs what happened and returns it.
pub async fn attempt(target: &Target, endpoint: &impl Endpoint, job: &Job) -> Outcome {
    let started = Instant::now();
    let result = endpoint.send(job, target.timeout).await;
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
