//! How freshly committed jobs leave the store: the one door between the
//! store and delivery.
//!
//! Ingest (and a quarantine replay) give a postback to the [`Committer`]
//! and nothing else. The committer asks the [`FreshJobs`] outlet — delivery
//! implements it, `relay.rs` wires it — for room before the commit, lets the
//! backend insert the jobs leased to this process, and once they exist
//! builds them from the postback it already holds and hands them over in
//! memory, so a fresh delivery costs no claim transaction. Without room (a
//! paused or unreachable target, a full hand-over queue) or with a backend
//! that does not lease at insert, the jobs wait in the store and the outlet
//! is only woken: a claim finds them. After a crash, at worst once their
//! lease ran out.

use std::sync::Arc;

use super::{Acceptance, AfterCommit, Job, JobId, NewPostback, OnCommit, Store, StoreError};

/// Where the store hands the jobs it has just committed.
pub trait FreshJobs: Send + Sync {
    /// Room for one fresh job per target (in order), taken before the
    /// commit; None when any target has none (then the jobs are claimed).
    fn reserve(&self, targets: &[String]) -> Option<Box<dyn Reservation>>;
    /// Jobs of `target` are waiting in the store.
    fn wake(&self, target: &str);
}

/// Room reserved for one postback's fresh jobs.
pub trait Reservation: Send {
    /// Until when the store leases the jobs to this process: each must
    /// outlast its own target's attempt.
    fn leased_until_ms(&self) -> i64;
    /// Hands over the committed jobs, one per reserved target, in order.
    fn hand_over(self: Box<Self>, jobs: Vec<Job>);
}

/// Accepts postbacks into the store and hands their jobs on.
#[derive(Clone)]
pub struct Committer {
    store: Arc<dyn Store>,
    outlet: Arc<dyn FreshJobs>,
}

impl Committer {
    /// Joins a store to the outlet its fresh jobs go to.
    pub fn new(store: Arc<dyn Store>, outlet: Arc<dyn FreshJobs>) -> Committer {
        Committer { store, outlet }
    }

    /// The store behind it, for everything but accepting.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// [`Store::accept`], then the jobs to delivery (see the module docs).
    pub async fn accept(&self, postback: NewPostback) -> Result<Acceptance, StoreError> {
        if postback.targets.is_empty() {
            return self.store.accept(postback, None).await;
        }
        let reservation = self.outlet.reserve(&postback.targets);
        let after = AfterCommit {
            leased_until_ms: reservation.as_ref().map(|r| r.leased_until_ms()),
            run: hand_over(&postback, reservation, self.outlet.clone()),
        };
        self.store.accept(postback, Some(after)).await
    }
}

/// What runs once the jobs exist: the jobs built from `postback` go to the
/// reservation when the backend leased them, else their targets are woken.
fn hand_over(
    postback: &NewPostback,
    reservation: Option<Box<dyn Reservation>>,
    outlet: Arc<dyn FreshJobs>,
) -> OnCommit {
    let targets = postback.targets.clone();
    let jobs = reservation.map(|reservation| {
        let template = Job {
            id: 0,
            event_id: postback.id.clone(),
            tracking_id: postback.tracking_id.clone(),
            target: String::new(),
            attempts: 0,
            created_at_ms: postback.received_at_ms,
            envelope: postback.envelope.clone(),
            raw_body: postback.raw_body.clone(),
            content_type: postback.content_type.clone(),
            leased_until_ms: reservation.leased_until_ms(),
        };
        (reservation, template)
    });
    Box::new(move |leased: &[JobId]| match jobs {
        Some((reservation, template)) if leased.len() == targets.len() => {
            let jobs = targets
                .into_iter()
                .zip(leased)
                .map(|(target, id)| Job {
                    id: *id,
                    target,
                    ..template.clone()
                })
                .collect();
            reservation.hand_over(jobs);
        }
        // Not leased (this backend claims every job): the reservation is
        // dropped, its room given back.
        _ => {
            for target in &targets {
                outlet.wake(target);
            }
        }
    })
}
