//! The jobs a dispatcher claimed ahead of its attempts, and how many more it
//! should claim: enough that a claim's answer arrives before they run out,
//! few enough that their bodies stay a bounded amount of memory.

use std::collections::VecDeque;

use crate::store::Job;

/// How many rounds (`concurrency` jobs each) a dispatcher keeps claimed
/// ahead of its attempts. A claim waits behind the writer's outcome batches
/// (a few ms under load) while a round lasts under a millisecond at full
/// speed (16 jobs at 20,000 deliveries/s): S4 quick pairs, rounds ahead
/// 2 / 4 / 8 / 16 / 32 gave 0.41–0.44 / 0.43–0.48 / 0.47–0.57 / 0.48–0.54
/// / 0.48–0.52 of the bare client (docs/performance.md, fifth pass).
pub const READY_ROUNDS: usize = 8;

/// Most bytes of bodies (envelope and raw body) the jobs claimed ahead of
/// one target hold: with Sinch's usual postbacks of a few KiB the rounds
/// bound the buffer (8 × 16 jobs ≈ 0.5 MiB); with bodies near
/// `ingest.max_body_bytes` this does.
pub const READY_BYTES: usize = 8 * 1024 * 1024;

/// A dispatcher's claimed jobs, oldest first, with the bytes they hold.
pub struct Ready {
    jobs: VecDeque<Job>,
    round: usize,
    bytes: usize,
    /// Bytes per job in the last claim, to size the next one.
    job_bytes: usize,
}

impl Ready {
    /// Empty, for a target with `round` attempts in flight at most.
    pub fn new(round: usize) -> Ready {
        let round = round.max(1);
        Ready {
            jobs: VecDeque::with_capacity(READY_ROUNDS * round),
            round,
            bytes: 0,
            // Until a claim shows the real size, assume large bodies: the
            // first claim takes at most two rounds.
            job_bytes: READY_BYTES / (2 * round),
        }
    }

    /// How many jobs to claim now (0: none). A claim is worth it once a
    /// round's room is free; it asks for what fills the rounds ahead,
    /// fewer when their bodies would pass [`READY_BYTES`] (at least one
    /// while under it).
    pub fn wanted(&self) -> usize {
        let depth = READY_ROUNDS * self.round;
        if self.jobs.len() + self.round > depth || self.bytes >= READY_BYTES {
            return 0;
        }
        let by_bytes = (READY_BYTES - self.bytes) / self.job_bytes.max(1);
        (depth - self.jobs.len()).min(by_bytes.max(1))
    }

    /// Adds a claim's jobs.
    pub fn extend(&mut self, claimed: Vec<Job>) {
        if claimed.is_empty() {
            return;
        }
        let claimed_bytes: usize = claimed.iter().map(size).sum();
        self.job_bytes = claimed_bytes / claimed.len();
        self.bytes += claimed_bytes;
        self.jobs.extend(claimed);
    }

    /// The oldest claimed job.
    pub fn pop(&mut self) -> Option<Job> {
        let job = self.jobs.pop_front()?;
        self.bytes -= size(&job);
        Some(job)
    }

    /// True when no job is waiting.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Takes every waiting job (to give them back to the store).
    pub fn drain(&mut self) -> impl Iterator<Item = Job> + '_ {
        self.bytes = 0;
        self.jobs.drain(..)
    }
}

fn size(job: &Job) -> usize {
    job.envelope.len() + job.raw_body.len()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn jobs(count: usize, body_bytes: usize) -> Vec<Job> {
        (0..count)
            .map(|id| Job {
                id: id as i64,
                event_id: format!("e{id}"),
                tracking_id: None,
                target: "t".into(),
                attempts: 0,
                created_at_ms: 0,
                envelope: Bytes::from(vec![b'{'; body_bytes / 2]),
                raw_body: Bytes::from(vec![b'<'; body_bytes / 2]),
                content_type: None,
                leased_until_ms: 0,
            })
            .collect()
    }

    #[test]
    fn small_jobs_fill_the_rounds_ahead_and_a_claim_waits_for_a_rounds_room() {
        let mut ready = Ready::new(16);
        assert_eq!(ready.wanted(), 32, "the first claim: two rounds");
        ready.extend(jobs(32, 2_000));
        assert_eq!(ready.wanted(), 8 * 16 - 32);
        ready.extend(jobs(96, 2_000));
        assert_eq!(ready.wanted(), 0, "full");
        for _ in 0..15 {
            ready.pop();
        }
        assert_eq!(ready.wanted(), 0, "less than a round is free");
        ready.pop();
        assert_eq!(ready.wanted(), 16);
    }

    #[test]
    fn large_bodies_are_bounded_by_bytes() {
        let mut ready = Ready::new(16);
        ready.extend(jobs(4, 1024 * 1024));
        assert_eq!(ready.wanted(), 4, "4 MiB held, room for 4 more of 1 MiB");
        ready.extend(jobs(4, 1024 * 1024));
        assert_eq!(ready.wanted(), 0, "8 MiB held");
        ready.pop();
        assert_eq!(ready.wanted(), 1);
        let released: Vec<Job> = ready.drain().collect();
        assert_eq!(released.len(), 7);
        assert!(ready.is_empty());
        assert_eq!(ready.wanted(), 8, "room for 8 MiB of 1 MiB jobs");
    }
}
