//! The journal's files: segment names, creating and listing segments,
//! setting damaged ones aside, and making names durable.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::SyncMode;
use crate::store::StoreError;

use super::DAMAGED;

/// Where the journal of `database` lives.
pub(in crate::store::sqlite) fn journal_dir(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".intake");
    PathBuf::from(name)
}

pub(super) fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.log"))
}

/// The journal's segments in order.
pub(super) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|err| io_error(dir, err))? {
        let path = entry.map_err(|err| io_error(dir, err))?.path();
        let number = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".log"))
            .and_then(|stem| stem.parse::<u64>().ok());
        if let Some(number) = number {
            found.push((number, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Creates segment `segment`, written out to `prefill` bytes of zeros when
/// the disk has room for several segments (else, or with 0, it grows as
/// records come).
pub(super) fn create_segment(
    dir: &Path,
    segment: u64,
    sync: SyncMode,
    prefill: u64,
) -> Result<File, StoreError> {
    let path = segment_path(dir, segment);
    let file = File::options()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|err| io_error(&path, err))?;
    // Only with room to spare: writing zeros must not be what fills the disk
    // under the database.
    let room = rustix::fs::fstatvfs(&file)
        .map(|stats| stats.f_bavail.saturating_mul(stats.f_frsize))
        .unwrap_or(0);
    if prefill > 0 && room >= 4 * prefill {
        let zeros = vec![0u8; 1024 * 1024];
        let mut left = prefill;
        let mut written = Ok(());
        while left > 0 && written.is_ok() {
            let chunk = left.min(zeros.len() as u64);
            written = (&file).write_all(&zeros[..chunk as usize]);
            left -= chunk;
        }
        if let Err(err) = written.and_then(|()| file.sync_all()) {
            tracing::debug!(segment = %path.display(), error = %err,
                "intake segment not written out beforehand; it grows instead");
            file.set_len(0).map_err(|err| io_error(&path, err))?;
        }
    }
    if sync == SyncMode::Full {
        // The new name must survive a power cut before records in it count.
        sync_dir(dir)?;
    }
    Ok(file)
}

/// fsyncs a directory: what makes the names created in it durable.
pub(in crate::store::sqlite) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| io_error(dir, err))
}

/// How many damaged segments earlier starts kept aside in `dir`.
pub(super) fn damaged_aside(dir: &Path) -> Result<u64, StoreError> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).map_err(|err| io_error(dir, err))? {
        let entry = entry.map_err(|err| io_error(dir, err))?;
        if entry.file_name().to_string_lossy().contains(DAMAGED) {
            count += 1;
        }
    }
    Ok(count)
}

pub(super) fn io_error(path: &Path, err: std::io::Error) -> StoreError {
    StoreError::database_from(format!("intake journal {}: {err}", path.display()), err)
}
