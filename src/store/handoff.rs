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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::config::SyncMode;
    use crate::store::{now_ms, QuarantineLimits, SqliteOptions, SqliteStore};

    /// An outlet that records what reaches it; `room` says whether it
    /// reserves.
    #[derive(Default)]
    struct Outlet {
        room: bool,
        handed: Mutex<Vec<Job>>,
        woken: Mutex<Vec<String>>,
    }

    struct Room(Arc<Outlet>, i64);

    impl Reservation for Room {
        fn leased_until_ms(&self) -> i64 {
            self.1
        }
        fn hand_over(self: Box<Self>, jobs: Vec<Job>) {
            self.0.handed.lock().unwrap().extend(jobs);
        }
    }

    impl FreshJobs for Arc<Outlet> {
        fn reserve(&self, _targets: &[String]) -> Option<Box<dyn Reservation>> {
            self.room
                .then(|| Box::new(Room(self.clone(), now_ms() + 60_000)) as Box<dyn Reservation>)
        }
        fn wake(&self, target: &str) {
            self.woken.lock().unwrap().push(target.to_owned());
        }
    }

    fn store(dir: &std::path::Path) -> Arc<dyn Store> {
        Arc::new(
            SqliteStore::open(SqliteOptions {
                path: dir.join("relay.db"),
                sync: SyncMode::Full,
                busy_timeout: Duration::from_secs(1),
                dedupe_window: Duration::from_secs(60),
                min_free_bytes: 0,
                quarantine: QuarantineLimits::default(),
            })
            .unwrap(),
        )
    }

    /// A postback with two targets, received at `at` (within the dedupe
    /// window: it is now).
    fn postback(id: &str, at: i64) -> NewPostback {
        NewPostback {
            id: id.into(),
            dedupe_key: "MMS_MO|N401|T-1".into(),
            received_at_ms: at,
            envelope: Bytes::from_static(b"{\"subject\":\"T-1\"}"),
            raw_body: Bytes::from_static(b"<postback/>"),
            content_type: Some("text/xml".into()),
            targets: vec!["crm".into(), "billing".into()],
            tracking_id: Some("T-1".into()),
        }
    }

    /// Waits (bounded) until `check` holds: the SQLite writer runs the
    /// hand-over on its own thread, after the answer.
    async fn until(check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not handed over within 5 s");
    }

    #[tokio::test]
    async fn with_room_the_committed_jobs_are_handed_over_leased_and_not_claimable() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let outlet = Arc::new(Outlet {
            room: true,
            ..Outlet::default()
        });
        let committer = Committer::new(store.clone(), Arc::new(outlet.clone()));
        let at = now_ms();
        assert_eq!(
            committer.accept(postback("e1", at)).await.unwrap(),
            Acceptance::Accepted
        );
        until(|| outlet.handed.lock().unwrap().len() == 2).await;
        let handed = outlet.handed.lock().unwrap().clone();
        assert_eq!(
            handed.iter().map(|j| j.target.as_str()).collect::<Vec<_>>(),
            ["crm", "billing"]
        );
        for job in &handed {
            assert_eq!(job.event_id, "e1");
            assert_eq!(job.tracking_id.as_deref(), Some("T-1"));
            assert_eq!(job.created_at_ms, at);
            assert_eq!(&job.raw_body[..], b"<postback/>");
            assert_eq!(job.content_type.as_deref(), Some("text/xml"));
            assert!(job.leased_until_ms > now_ms());
        }
        assert_ne!(handed[0].id, handed[1].id, "each target has its own job");
        assert!(outlet.woken.lock().unwrap().is_empty());
        // Leased to the hand-over: a claim does not take them again.
        let claimed = store
            .claim("crm", 10, Duration::from_secs(30))
            .await
            .unwrap();
        assert!(claimed.is_empty(), "claimed a handed-over job: {claimed:?}");
        // A retry of the same postback is a duplicate: nothing handed over.
        let again = committer.accept(postback("e1-retry", at)).await;
        assert!(
            matches!(again, Ok(Acceptance::Duplicate { .. })),
            "{again:?}"
        );
        assert_eq!(outlet.handed.lock().unwrap().len(), 2);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn without_room_the_targets_are_woken_and_their_jobs_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let outlet = Arc::new(Outlet::default());
        let committer = Committer::new(store.clone(), Arc::new(outlet.clone()));
        committer.accept(postback("e2", now_ms())).await.unwrap();
        until(|| outlet.woken.lock().unwrap().len() == 2).await;
        assert_eq!(*outlet.woken.lock().unwrap(), ["crm", "billing"]);
        assert!(outlet.handed.lock().unwrap().is_empty());
        let claimed = store
            .claim("crm", 10, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].event_id, "e2");
        store.close().await.unwrap();
    }
}
