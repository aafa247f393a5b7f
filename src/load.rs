//! How busy answering Sinch is right now: one value `relay.rs` gives to both
//! sides. Ingest counts the postbacks it is answering; delivery reads the
//! count and yields. Neither side knows the other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How many postbacks are being answered at this moment. Ingest comes first:
/// Sinch waits for each answer, and a delivery can wait a little. While
/// [`IngestLoad::BUSY`] or more are in progress, dispatchers start new
/// attempts on a quarter of their slots only.
#[derive(Default)]
pub struct IngestLoad(AtomicU64);

impl IngestLoad {
    /// Postbacks in progress from which ingest is considered busy: more than
    /// a few serial Sinch connections ever make.
    pub const BUSY: u64 = 8;

    /// Whether deliveries should make room for ingest now.
    pub fn is_busy(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= Self::BUSY
    }

    /// Marks a postback as being answered, until the guard is dropped.
    pub fn answering(self: &Arc<Self>) -> Answering {
        self.0.fetch_add(1, Ordering::Relaxed);
        Answering(self.clone())
    }
}

/// Counts one postback in progress until dropped.
pub struct Answering(Arc<IngestLoad>);

impl Drop for Answering {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_from_the_eighth_answer_until_they_end() {
        let load = Arc::new(IngestLoad::default());
        let answers: Vec<Answering> = (0..IngestLoad::BUSY - 1)
            .map(|_| load.answering())
            .collect();
        assert!(!load.is_busy());
        let eighth = load.answering();
        assert!(load.is_busy());
        drop(eighth);
        assert!(!load.is_busy());
        drop(answers);
        assert_eq!(load.0.load(Ordering::Relaxed), 0);
    }
}
