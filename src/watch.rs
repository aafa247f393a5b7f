//! `run --watch`: notices that the config file changed and asks for a reload,
//! as a SIGHUP would.
//!
//! It polls the file's contents once a second rather than using inotify:
//! Kubernetes updates a mounted ConfigMap by swapping a symlink to a new
//! directory, editors replace files by renaming, and both leave an inotify
//! watch on the old inode. Reading a few KiB a second by path sees every
//! kind of change. A change counts once the contents stayed the same for
//! two polls in a row, so a file caught half-written (a non-atomic save) is
//! not applied; its complete version is.

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// How often the file is read.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// Calls `changed` each time the contents of `path` settle (the same on two
/// polls in a row) on something other than the last contents applied, until
/// `stop`. `baseline` is the digest of what the relay started with, read
/// before it started, so a change made while it started is not missed.
pub async fn watch_file(
    path: PathBuf,
    every: Duration,
    stop: CancellationToken,
    baseline: Option<Vec<u8>>,
    mut changed: impl FnMut(),
) {
    let mut applied = baseline;
    let mut previous = applied.clone();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {},
            () = stop.cancelled() => return,
        }
        let now = digest(&path).await;
        // A file that vanished for a moment (a rename in progress) is not a
        // change; its return with other contents is.
        let settled = now.is_some() && now == previous;
        previous = now;
        if settled && previous != applied {
            applied = previous.clone();
            tracing::info!(file = %path.display(), "config file changed; reloading");
            changed();
        }
    }
}

/// A digest of the file's contents, None when it cannot be read right now.
pub async fn digest(path: &std::path::Path) -> Option<Vec<u8>> {
    tokio::fs::read(path)
        .await
        .map(|bytes| Sha256::digest(&bytes).to_vec())
        .ok()
}
