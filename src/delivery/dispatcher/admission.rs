//! The dispatcher's admission rule: from what it knows at one moment, what
//! it may do now — rest, claim from the store, start attempts. Pure, so the
//! whole rule is tested without a clock, a store or a target.

use std::time::Duration;

use crate::delivery::retry::RetryPolicy;

/// Longest pause of a target that answers nothing, so its return is noticed soon.
pub const UNREACHABLE_PAUSE_MAX: Duration = Duration::from_secs(30);

/// What a dispatcher knows when it decides: its own state, the operator's
/// pause and ingest's load, read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Attempts in flight at most: the target's concurrency (at least 1).
    pub round: usize,
    /// Attempts in flight now.
    pub in_flight: usize,
    /// Ingest is answering many postbacks: deliveries make room for it.
    pub ingest_busy: bool,
    /// An operator paused the target.
    pub paused: bool,
    /// Attempts in a row the target gave no answer to (refused, timed out).
    pub unanswered: u32,
    /// The dispatcher has just sat out the pause those misses called for:
    /// one round goes out now to see whether the target is back.
    pub rested: bool,
    /// How many jobs the ready buffer would take from a claim (its count
    /// and bytes bounds, `Ready::wanted`; 0: none).
    pub room_ahead: usize,
    /// The store may hold due jobs (start, wake-up, poll, a full last claim).
    pub backlog: bool,
    /// No claim is in flight, nor its answer waiting to be taken.
    pub claim_idle: bool,
}

/// What the dispatcher may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The target answers nothing: take no hand-overs and start nothing for
    /// this long (the backoff bound of its misses, in rounds), then decide again.
    Rest(Duration),
    /// Go on with this turn.
    Go(Go),
}

/// A turn's decision once the target is not resting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Go {
    /// Ingest may hand fresh jobs over in memory (not paused, answering).
    pub takes_hot: bool,
    /// Jobs to claim from the store now (0: no claim).
    pub claim: usize,
    /// Whether attempts may start, and how many.
    pub launch: Launch,
}

/// Whether attempts may start this turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// Paused: nothing new starts (the next turn gives back what is held).
    Hold,
    /// Ingest is busy and its share of the slots is in use: look again shortly.
    MakeRoom,
    /// Up to this many (at least 1).
    Up(usize),
}

/// The admission rule.
///
/// - A target whose last round of attempts (or more) got no answer at all
///   rests for the backoff bound of its missed rounds, capped at
///   [`UNREACHABLE_PAUSE_MAX`], rather than being hammered job after job;
///   after the rest one round goes out again.
/// - A claim asks for what the ready buffer has room for, when the store
///   may hold due jobs and no claim is already out. It does not look at the
///   pause: a pause that came while the turn waited is handled by the next
///   turn, which gives back whatever the claim brings.
/// - Ingest comes first: while it is busy, attempts use a quarter of the
///   slots (at least one); otherwise all of them.
pub fn admit(view: &View, policy: &RetryPolicy) -> Admission {
    let round = view.round.max(1);
    let answering = view.unanswered < round as u32;
    if !answering && !view.rested {
        let rounds = view.unanswered / round as u32;
        return Admission::Rest(policy.delay_bound(rounds).min(UNREACHABLE_PAUSE_MAX));
    }
    let claim = if view.backlog && view.claim_idle {
        view.room_ahead
    } else {
        0
    };
    let launch = if view.paused {
        Launch::Hold
    } else {
        let allowed = if view.ingest_busy {
            (round / 4).max(1)
        } else {
            round
        };
        match allowed.saturating_sub(view.in_flight) {
            0 => Launch::MakeRoom,
            room => Launch::Up(room),
        }
    };
    Admission::Go(Go {
        takes_hot: answering && !view.paused,
        claim,
        launch,
    })
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod tests;
