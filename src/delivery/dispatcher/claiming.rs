//! A dispatcher's claim in flight: it runs on its own task so the dispatcher
//! goes on starting attempts from its ready buffer and the hand-over queue
//! meanwhile. At most one at a time.

use std::sync::Arc;

use crate::delivery::Target;
use crate::store::{Job, Store, StoreError};

/// The claim in flight, or its answer not yet taken.
#[derive(Default)]
pub struct Claiming {
    task: Option<tokio::task::JoinHandle<Result<Vec<Job>, StoreError>>>,
    /// The finished claim's answer, until the dispatcher takes it.
    answer: Option<Result<Vec<Job>, StoreError>>,
    /// How many jobs the last claim asked for: fewer back means the store
    /// has no more due now.
    pub wanted: usize,
}

impl Claiming {
    /// Claims up to `wanted` due jobs of `target` on a task of its own.
    pub fn start(&mut self, store: &Arc<dyn Store>, target: &Target, wanted: usize) {
        let (store, name, lease) = (store.clone(), target.name.clone(), target.lease());
        self.wanted = wanted;
        self.task = Some(tokio::spawn(async move {
            store.claim(&name, wanted, lease).await
        }));
    }

    /// No claim is out and no answer waits.
    pub fn is_idle(&self) -> bool {
        self.task.is_none() && self.answer.is_none()
    }

    /// An answer is there to take without waiting.
    pub fn is_finished(&self) -> bool {
        self.answer.is_some() || self.task.as_ref().is_some_and(|task| task.is_finished())
    }

    /// Resolves once the claim in flight has an answer (kept for
    /// [`Claiming::finish`]); never without a claim. Cancel-safe.
    pub async fn done(&mut self) {
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
    pub async fn finish(&mut self) -> Option<Result<Vec<Job>, StoreError>> {
        if self.task.is_some() {
            self.done().await;
        }
        self.answer.take()
    }
}
