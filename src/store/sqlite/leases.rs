//! Claims of the one SQLite instance, kept in memory by its writer thread.
//!
//! A lease only has to outlive an attempt in this process: with SQLite the
//! relay is the only instance, and a restart voids every lease anyway. Kept
//! in the database, a claim was a write (the job's due-index entry moved past
//! the lease) and its outcome another; kept here, a claim is a read and a
//! delivered job costs only its `DELETE`. Jobs handed over in memory by ingest
//! keep their lease in the row (`lease_until`), written with the insert.

use std::collections::HashMap;

use crate::store::JobId;

/// How often leases that ran out are dropped (their jobs are due again
/// either way; this only bounds the map).
const SWEEP_EVERY_MS: i64 = 1_000;

/// The writer's leases: job id → lease end (Unix ms).
#[derive(Debug, Default)]
pub(super) struct Leases {
    until: HashMap<JobId, i64>,
    /// Claims made in the transaction in progress: void if it rolls back,
    /// because their callers are answered with the error.
    uncommitted: Vec<JobId>,
    /// Leases whose outcome the transaction in progress records, ended once
    /// it commits (until then the rows still say "due": the job stays held).
    ending: Vec<(JobId, Option<i64>)>,
    last_sweep_ms: i64,
}

impl Leases {
    /// Whether a claim must skip `job` at `now`.
    pub(super) fn is_held(&self, job: JobId, now: i64) -> bool {
        self.until.get(&job).is_some_and(|&until| until > now)
    }

    /// Leases `job` until `until`, in the transaction in progress.
    pub(super) fn hold(&mut self, job: JobId, until: i64) {
        self.until.insert(job, until);
        self.uncommitted.push(job);
    }

    /// The job's outcome is recorded in the transaction in progress: its
    /// lease ends with the commit. `under`: only if it is still the lease the
    /// job was taken under (a job released after its lease ran out may have
    /// been claimed again already).
    pub(super) fn end(&mut self, job: JobId, under: Option<i64>) {
        self.ending.push((job, under));
    }

    /// The transaction committed: its claims and ends stand. Now and then
    /// drops the leases that ran out (a dispatcher that stopped without an
    /// outcome).
    pub(super) fn commit(&mut self, now: i64) {
        self.uncommitted.clear();
        for (job, under) in self.ending.drain(..) {
            if under.is_none_or(|under| self.until.get(&job) == Some(&under)) {
                self.until.remove(&job);
            }
        }
        if now - self.last_sweep_ms >= SWEEP_EVERY_MS {
            self.last_sweep_ms = now;
            self.until.retain(|_, until| *until > now);
        }
    }

    /// The transaction rolled back: its claims were answered with the
    /// error, so their jobs are free again.
    pub(super) fn rollback(&mut self) {
        for job in self.uncommitted.drain(..) {
            self.until.remove(&job);
        }
        self.ending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_until_it_ends_or_runs_out() {
        let mut leases = Leases::default();
        leases.hold(1, 1_000);
        leases.hold(2, 1_000);
        leases.commit(0);
        assert!(leases.is_held(1, 999));
        assert!(!leases.is_held(1, 1_000), "ran out");
        leases.end(2, None);
        assert!(leases.is_held(2, 0), "held until the outcome commits");
        leases.commit(0);
        assert!(!leases.is_held(2, 0));
        assert!(!leases.is_held(3, 0), "never leased");
    }

    #[test]
    fn a_release_under_an_older_lease_leaves_the_newer_one() {
        let mut leases = Leases::default();
        leases.hold(1, 2_000);
        leases.end(1, Some(1_000));
        leases.commit(0);
        assert!(leases.is_held(1, 1_500));
        leases.end(1, Some(2_000));
        leases.commit(0);
        assert!(!leases.is_held(1, 1_500));
    }

    #[test]
    fn a_rollback_frees_only_the_claims_of_its_transaction() {
        let mut leases = Leases::default();
        leases.hold(1, 5_000);
        leases.commit(0);
        leases.hold(2, 5_000);
        leases.end(1, None);
        leases.rollback();
        assert!(leases.is_held(1, 0), "its end was rolled back too");
        assert!(!leases.is_held(2, 0));
    }

    #[test]
    fn leases_that_ran_out_are_swept() {
        let mut leases = Leases::default();
        leases.hold(1, 500);
        leases.hold(2, 5_000);
        leases.commit(2_000);
        assert_eq!(leases.until.len(), 1);
        assert!(leases.is_held(2, 2_000));
    }
}
